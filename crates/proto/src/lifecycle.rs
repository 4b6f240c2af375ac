//! The agent lifecycle state machine of seed 001, section 3.1.
//!
//! The seed's diagram:
//!
//! ```text
//! [*] --> Disconnected
//! Disconnected --> Authenticating: Connect
//! Authenticating --> Registered: Auth Success
//! Authenticating --> Disconnected: Auth Failed
//! Registered --> Active: Tunnel Created
//! Active --> Reconnecting: Connection Lost
//! Reconnecting --> Active: Reconnect Success
//! Reconnecting --> Disconnected: Reconnect Failed
//! Active --> Disconnected: Disconnect
//! ```
//!
//! tube adds four edges the diagram leaves out, because real connections hit them:
//!
//! - `Authenticating --ConnectionLost--> Disconnected` and
//!   `Registered --ConnectionLost--> Disconnected`: the link died before any tunnel existed, so
//!   there is nothing to resume; the agent starts over with `Connect`.
//! - `Registered --Disconnect--> Disconnected`: the user stopped the agent before it created a
//!   tunnel.
//! - `Reconnecting --Disconnect--> Disconnected`: the user stopped the agent while it was
//!   retrying.
//!
//! Every other (state, event) pair is an [`InvalidTransition`].

/// Where an agent is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentState {
    /// No connection to the relay (the initial state).
    Disconnected,
    /// Connected, waiting for the relay to accept the credentials.
    Authenticating,
    /// Authenticated, no tunnel yet.
    Registered,
    /// Serving a tunnel.
    Active,
    /// Lost the relay while serving; trying to get the tunnel back.
    Reconnecting,
}

/// Something that happened to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LifecycleEvent {
    /// The agent opened a connection to the relay.
    Connect,
    /// The relay accepted the credentials.
    AuthSuccess,
    /// The relay refused the credentials.
    AuthFailed,
    /// The relay created the agent's tunnel.
    TunnelCreated,
    /// The connection to the relay broke.
    ConnectionLost,
    /// A reconnect restored the tunnel.
    ReconnectSuccess,
    /// Reconnecting gave up.
    ReconnectFailed,
    /// The agent was asked to stop.
    Disconnect,
}

impl LifecycleEvent {
    /// Every event, in declaration order.
    pub const ALL: [LifecycleEvent; 8] = [
        LifecycleEvent::Connect,
        LifecycleEvent::AuthSuccess,
        LifecycleEvent::AuthFailed,
        LifecycleEvent::TunnelCreated,
        LifecycleEvent::ConnectionLost,
        LifecycleEvent::ReconnectSuccess,
        LifecycleEvent::ReconnectFailed,
        LifecycleEvent::Disconnect,
    ];
}

/// An event that has no edge out of the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no transition from {from:?} on {event:?}")]
pub struct InvalidTransition {
    /// The state the agent was in.
    pub from: AgentState,
    /// The event that does not apply to it.
    pub event: LifecycleEvent,
}

impl AgentState {
    /// Every state, in declaration order.
    pub const ALL: [AgentState; 5] = [
        AgentState::Disconnected,
        AgentState::Authenticating,
        AgentState::Registered,
        AgentState::Active,
        AgentState::Reconnecting,
    ];

    /// The state after `event`, or [`InvalidTransition`] if the lifecycle has no such edge.
    pub fn on(self, event: LifecycleEvent) -> Result<AgentState, InvalidTransition> {
        use AgentState as S;
        use LifecycleEvent as E;
        match (self, event) {
            // The diagram of seed 001, section 3.1.
            (S::Disconnected, E::Connect) => Ok(S::Authenticating),
            (S::Authenticating, E::AuthSuccess) => Ok(S::Registered),
            (S::Authenticating, E::AuthFailed) => Ok(S::Disconnected),
            (S::Registered, E::TunnelCreated) => Ok(S::Active),
            (S::Active, E::ConnectionLost) => Ok(S::Reconnecting),
            (S::Reconnecting, E::ReconnectSuccess) => Ok(S::Active),
            (S::Reconnecting, E::ReconnectFailed) => Ok(S::Disconnected),
            (S::Active, E::Disconnect) => Ok(S::Disconnected),
            // tube's additions (see the module docs).
            (S::Authenticating | S::Registered, E::ConnectionLost) => Ok(S::Disconnected),
            (S::Registered | S::Reconnecting, E::Disconnect) => Ok(S::Disconnected),
            (from, event) => Err(InvalidTransition { from, event }),
        }
    }

    /// snake_case name for logs, metrics and JSON: "disconnected", "authenticating",
    /// "registered", "active", "reconnecting".
    pub fn name(self) -> &'static str {
        match self {
            AgentState::Disconnected => "disconnected",
            AgentState::Authenticating => "authenticating",
            AgentState::Registered => "registered",
            AgentState::Active => "active",
            AgentState::Reconnecting => "reconnecting",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AgentState as S;
    use LifecycleEvent as E;
    use std::collections::HashSet;

    const DIAGRAM: [(S, E, S); 8] = [
        (S::Disconnected, E::Connect, S::Authenticating),
        (S::Authenticating, E::AuthSuccess, S::Registered),
        (S::Authenticating, E::AuthFailed, S::Disconnected),
        (S::Registered, E::TunnelCreated, S::Active),
        (S::Active, E::ConnectionLost, S::Reconnecting),
        (S::Reconnecting, E::ReconnectSuccess, S::Active),
        (S::Reconnecting, E::ReconnectFailed, S::Disconnected),
        (S::Active, E::Disconnect, S::Disconnected),
    ];

    const ADDITIONS: [(S, E, S); 4] = [
        (S::Authenticating, E::ConnectionLost, S::Disconnected),
        (S::Registered, E::ConnectionLost, S::Disconnected),
        (S::Registered, E::Disconnect, S::Disconnected),
        (S::Reconnecting, E::Disconnect, S::Disconnected),
    ];

    #[test]
    fn every_diagram_edge() {
        for (from, event, to) in DIAGRAM {
            assert_eq!(from.on(event), Ok(to), "{from:?} --{event:?}-->");
        }
    }

    #[test]
    fn exactly_the_allowed_transitions_over_all_pairs() {
        let allowed: Vec<(S, E, S)> = DIAGRAM.into_iter().chain(ADDITIONS).collect();
        let mut seen = 0;
        for from in S::ALL {
            for event in E::ALL {
                let want = allowed
                    .iter()
                    .find(|(f, e, _)| *f == from && *e == event)
                    .map(|(_, _, to)| *to);
                match (from.on(event), want) {
                    (Ok(to), Some(w)) => assert_eq!(to, w, "{from:?} --{event:?}-->"),
                    (Err(err), None) => {
                        assert_eq!(err, InvalidTransition { from, event });
                    }
                    (got, want) => panic!("{from:?} on {event:?}: got {got:?}, want {want:?}"),
                }
                seen += 1;
            }
        }
        assert_eq!(seen, 40);
        let ok = S::ALL
            .iter()
            .flat_map(|s| E::ALL.iter().map(move |e| s.on(*e)))
            .filter(Result::is_ok)
            .count();
        assert_eq!(ok, 12);
    }

    #[test]
    fn a_full_session() {
        let mut s = S::Disconnected;
        for e in [
            E::Connect,
            E::AuthSuccess,
            E::TunnelCreated,
            E::ConnectionLost,
            E::ReconnectSuccess,
            E::ConnectionLost,
            E::ReconnectFailed,
            E::Connect,
        ] {
            s = s.on(e).unwrap();
        }
        assert_eq!(s, S::Authenticating);
        assert_eq!(
            S::Disconnected.on(E::Disconnect),
            Err(InvalidTransition {
                from: S::Disconnected,
                event: E::Disconnect
            })
        );
    }

    #[test]
    fn names_are_unique_snake_case() {
        let names: Vec<&str> = S::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "disconnected",
                "authenticating",
                "registered",
                "active",
                "reconnecting"
            ]
        );
        assert_eq!(names.iter().collect::<HashSet<_>>().len(), 5);
        assert_eq!(S::ALL.iter().collect::<HashSet<_>>().len(), 5);
        assert_eq!(E::ALL.iter().collect::<HashSet<_>>().len(), 8);
    }

    #[test]
    fn error_message() {
        let err = S::Active.on(E::Connect).unwrap_err();
        assert_eq!(err.to_string(), "no transition from Active on Connect");
    }
}
