//! The agent lifecycle (`tube_proto::lifecycle`), driven by whatever the relay and the network
//! do: the input is any sequence of events.
//!
//! - `AgentState::on` never panics and follows exactly the transition table of seed 001
//!   section 3.1 plus tube's four additions (written out again here, from the module docs);
//!   a refused event names the state and event and leaves the agent where it was.
//! - Whatever the sequence, `Active` is only entered from `Registered` or `Reconnecting`, a
//!   session that got to `Active` went through `Authenticating` and `Registered` first, and
//!   `Disconnect` (when allowed) always ends in `Disconnected`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tube_proto::lifecycle::{AgentState, InvalidTransition, LifecycleEvent};

fuzz_target!(|data: &[u8]| {
    use AgentState as S;
    use LifecycleEvent as E;

    let mut state = S::Disconnected;
    let mut authenticated = false;
    for &b in data {
        let event = E::ALL[usize::from(b) % E::ALL.len()];
        let want = table(state, event);
        match state.on(event) {
            Ok(next) => {
                assert_eq!(Some(next), want, "{state:?} --{event:?}-->");
                if next == S::Active {
                    assert!(matches!(state, S::Registered | S::Reconnecting));
                    assert!(authenticated, "active without authenticating");
                }
                if event == E::Disconnect {
                    assert_eq!(next, S::Disconnected);
                }
                if state == S::Authenticating && next == S::Registered {
                    authenticated = true;
                }
                if next == S::Disconnected {
                    authenticated = false;
                }
                state = next;
            }
            Err(err) => {
                assert_eq!(want, None, "{state:?} refused {event:?}");
                assert_eq!(err, InvalidTransition { from: state, event });
            }
        }
        assert!(!state.name().is_empty());
    }
});

/// The allowed transitions, from the module docs.
fn table(from: AgentState, event: LifecycleEvent) -> Option<AgentState> {
    use AgentState as S;
    use LifecycleEvent as E;
    Some(match (from, event) {
        (S::Disconnected, E::Connect) => S::Authenticating,
        (S::Authenticating, E::AuthSuccess) => S::Registered,
        (S::Authenticating, E::AuthFailed) => S::Disconnected,
        (S::Registered, E::TunnelCreated) => S::Active,
        (S::Active, E::ConnectionLost) => S::Reconnecting,
        (S::Reconnecting, E::ReconnectSuccess) => S::Active,
        (S::Reconnecting, E::ReconnectFailed) => S::Disconnected,
        (S::Active, E::Disconnect) => S::Disconnected,
        (S::Authenticating, E::ConnectionLost) => S::Disconnected,
        (S::Registered, E::ConnectionLost) => S::Disconnected,
        (S::Registered, E::Disconnect) => S::Disconnected,
        (S::Reconnecting, E::Disconnect) => S::Disconnected,
        _ => return None,
    })
}
