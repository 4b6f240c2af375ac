//! The agent (`tube expose`): runs next to local services behind NAT, keeps one TLS 1.3
//! connection to a relay, registers a tunnel per local address, and serves every stream the
//! relay opens by dialling the local service and proxying bytes.
//!
//! [`run`] drives the lifecycle of seed 001 (Disconnected, Authenticating, Registered, Active,
//! Reconnecting): on a lost connection it retries with exponential backoff and jitter,
//! presenting each tunnel's single-use reconnect token so it gets the same public port back.
//! Authentication and configuration failures are final; a rate limit is waited out. Heartbeats
//! carry per-tunnel byte counts; a relay that stops answering is treated as gone.

mod session;

use session::session;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tube_net::codec::{ControlError, HandshakeConn, handshake_conn, recv_control, send_control};
use tube_net::mux::DEFAULT_WINDOW;
use tube_net::proxy::Traffic;
use tube_net::timer::timeout;
use tube_net::{Fingerprint, Incoming, Mux, MuxConfig, Role, SecureStream, tls};
use tube_proto::backoff::{Backoff, BackoffConfig};
use tube_proto::control::{ClientInfo, ControlMessage, TunnelInfo, TunnelStats, describe_code};
use tube_proto::heartbeat::Liveness;
use tube_proto::lifecycle::{AgentState, LifecycleEvent};
use tube_proto::time::rfc3339;
use tube_proto::{ErrorCode, RELAY_PROTOCOL_VERSION, relay_version_compatible};

/// One local service to expose.
#[derive(Debug, Clone, Default)]
pub struct TunnelSpec {
    /// `host:port` of the local service.
    pub local: String,
    /// Public port to ask for; `None` lets the relay choose.
    pub remote_port: Option<u16>,
    /// Label sent to the relay.
    pub name: String,
    /// Source ranges allowed to use the public port (CIDR strings; empty: the relay's policy).
    pub allow: Vec<String>,
}

/// What [`run`] needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The relay's control address (`host:port`).
    pub relay: String,
    /// JWT for the relay.
    pub token: String,
    /// The relay certificate's pinned fingerprint.
    pub fingerprint: Fingerprint,
    /// Tunnels to open.
    pub tunnels: Vec<TunnelSpec>,
    /// Deadline for each handshake step (connect + TLS + greeting, then auth, then each
    /// registration).
    pub handshake_timeout: Duration,
    /// Deadline for dialling the local service for one user.
    pub local_connect_timeout: Duration,
    /// How often heartbeats are sent.
    pub heartbeat_interval: Duration,
    /// Intervals without any answer after which the relay counts as gone.
    pub heartbeat_misses: u32,
    /// Reconnect schedule.
    pub backoff: BackoffConfig,
    /// On shutdown, how long user streams already open may go on before the agent says
    /// goodbye and closes (new streams are refused from the start of shutdown). Zero, the
    /// default here: goodbye at once; `tube expose` sets its own.
    pub shutdown_grace: Duration,
    /// Multiplexer limits.
    pub mux: MuxConfig,
    /// Protocol version announced in `auth` (tests use this to exercise version checks).
    pub protocol_version: String,
}

impl AgentConfig {
    /// Defaults for a relay, token, fingerprint and tunnels.
    pub fn new(
        relay: String,
        token: String,
        fingerprint: Fingerprint,
        tunnels: Vec<TunnelSpec>,
    ) -> Self {
        Self {
            relay,
            token,
            fingerprint,
            tunnels,
            handshake_timeout: Duration::from_secs(10),
            local_connect_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_misses: 3,
            backoff: BackoffConfig::default(),
            shutdown_grace: Duration::ZERO,
            mux: MuxConfig::default(),
            protocol_version: RELAY_PROTOCOL_VERSION.into(),
        }
    }
}

/// What the agent reports while running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// A lifecycle transition.
    State {
        /// Previous state.
        from: AgentState,
        /// New state.
        to: AgentState,
    },
    /// A tunnel is live: users can connect to `public` (again after each reconnect).
    TunnelUp {
        /// The tunnel's id at the relay.
        tunnel_id: String,
        /// Public `host:port`.
        public: String,
        /// The local address it forwards to.
        local: String,
    },
    /// Shutdown began: new streams are refused from now on, and the agent says goodbye once
    /// the open ones end (or the shutdown grace runs out).
    Stopping {
        /// User streams open at that moment.
        open_streams: usize,
    },
    /// Waiting before the next connection attempt.
    Retrying {
        /// Attempt number (1-based) about to be made.
        attempt: u32,
        /// How long the agent waits first.
        delay: Duration,
        /// Why the last attempt ended.
        reason: String,
    },
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The relay answered with a protocol error.
    #[error("error {}: {message}", describe_code(*.code))]
    Relay {
        /// Code number.
        code: u16,
        /// The relay's message.
        message: String,
        /// Seconds the relay asked us to wait, if any.
        retry_after: Option<u64>,
    },
    /// The relay's certificate is not the pinned one.
    #[error(
        "relay certificate fingerprint does not match {0} (wrong --fingerprint, or not the relay you meant)"
    )]
    FingerprintMismatch(Fingerprint),
    /// TCP or TLS failed.
    #[error("connecting to {addr}: {message}")]
    Connect {
        /// The relay address.
        addr: String,
        /// What failed.
        message: String,
    },
    /// The relay broke the protocol.
    #[error("{0}")]
    Protocol(String),
    /// The connection to the relay was lost.
    #[error("connection to relay lost: {0}")]
    ConnectionLost(String),
    /// Every reconnect attempt failed.
    #[error("gave up after {attempts} attempts: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: Box<AgentError>,
    },
}

impl AgentError {
    /// The protocol code, where the error has one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            AgentError::Relay { code, .. } => ErrorCode::from_u16(*code),
            AgentError::GaveUp { last, .. } => last.code(),
            _ => None,
        }
    }

    /// Whether retrying cannot help (bad credentials, refused configuration, wrong relay).
    pub fn is_final(&self) -> bool {
        match self {
            AgentError::Relay { code, .. } => {
                ErrorCode::from_u16(*code).is_some_and(ErrorCode::is_final)
            }
            AgentError::FingerprintMismatch(_) | AgentError::GaveUp { .. } => true,
            _ => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            AgentError::Relay {
                retry_after: Some(s),
                ..
            } => Some(Duration::from_secs(*s)),
            _ => None,
        }
    }
}

/// What the agent remembers about a tunnel across connections.
#[derive(Debug, Clone)]
struct Held {
    tunnel_id: String,
    reconnect_token: Option<String>,
}

/// Runs the agent until `shutdown`, a final error, or the reconnect attempts run out.
///
/// On `shutdown` the agent drains: streams the relay opens from then on are reset at once
/// (`SHUTTING_DOWN`), streams already open go on for up to
/// [`AgentConfig::shutdown_grace`]; then it says goodbye (the relay resets what is left and
/// frees the ports) and returns `Ok`.
pub async fn run(
    config: AgentConfig,
    events: mpsc::UnboundedSender<AgentEvent>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let mut life = Lifecycle {
        state: AgentState::Disconnected,
        events: &events,
    };
    let mut backoff = Backoff::new(config.backoff);
    let mut held: Vec<Option<Held>> = vec![None; config.tunnels.len()];
    let traffic: Vec<Arc<Traffic>> = config.tunnels.iter().map(|_| Arc::default()).collect();
    loop {
        if life.state == AgentState::Disconnected {
            life.to(LifecycleEvent::Connect);
        }
        let result = session(&config, &mut life, &mut held, &traffic, &shutdown).await;
        let err = match result {
            Ok(()) => {
                life.to(LifecycleEvent::Disconnect);
                return Ok(());
            }
            Err(e) => e,
        };
        if shutdown.is_cancelled() {
            life.to(LifecycleEvent::Disconnect);
            return Ok(());
        }
        let was_active = life.state == AgentState::Active;
        if was_active {
            backoff.reset();
            life.to(LifecycleEvent::ConnectionLost);
        } else if life.state != AgentState::Reconnecting {
            life.to(if life.state == AgentState::Authenticating {
                LifecycleEvent::AuthFailed
            } else {
                LifecycleEvent::ConnectionLost
            });
        }
        if err.is_final() {
            if life.state == AgentState::Reconnecting {
                life.to(LifecycleEvent::ReconnectFailed);
            }
            return Err(err);
        }
        let Some(mut delay) = backoff.next_delay(random_u64()) else {
            if life.state == AgentState::Reconnecting {
                life.to(LifecycleEvent::ReconnectFailed);
            }
            return Err(AgentError::GaveUp {
                attempts: backoff.attempts(),
                last: Box::new(err),
            });
        };
        if let Some(wait) = err.retry_after() {
            delay = delay.max(wait);
        }
        tracing::warn!(error = %err, attempt = backoff.attempts(), delay_ms = delay.as_millis() as u64, "connection attempt failed, retrying");
        let _ = events.send(AgentEvent::Retrying {
            attempt: backoff.attempts(),
            delay,
            reason: err.to_string(),
        });
        tokio::select! {
            _ = shutdown.cancelled() => {
                if life.state == AgentState::Reconnecting {
                    life.to(LifecycleEvent::Disconnect);
                }
                return Ok(());
            }
            _ = tube_net::timer::sleep(delay) => {}
        }
    }
}

struct Lifecycle<'a> {
    state: AgentState,
    events: &'a mpsc::UnboundedSender<AgentEvent>,
}

impl Lifecycle<'_> {
    /// Applies `event`; transitions the diagram does not have are logged and ignored.
    fn to(&mut self, event: LifecycleEvent) {
        match self.state.on(event) {
            Ok(next) => {
                tracing::info!(from = self.state.name(), to = next.name(), "agent state");
                let _ = self.events.send(AgentEvent::State {
                    from: self.state,
                    to: next,
                });
                self.state = next;
            }
            Err(e) => tracing::debug!(error = %e, "lifecycle event ignored"),
        }
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // Only jitters the backoff; without entropy the delay is simply the un-jittered one.
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}
