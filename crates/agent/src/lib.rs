//! The agent (`tube expose`): runs next to a local service behind NAT, keeps one TLS 1.3
//! connection to a relay, registers a tunnel per local address, and serves every stream the
//! relay opens by dialling the local service and proxying bytes.
//!
//! [`run`] performs one connection's life: connect, greeting, auth, registration, serve. It
//! reports tunnels through [`AgentEvent`]s so the CLI can print them.

use std::collections::HashMap;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tube_net::codec::{ControlError, handshake_conn, recv_control, send_control};
use tube_net::tokio_rustls::TlsConnector;
use tube_net::{Fingerprint, Incoming, Mux, MuxConfig, Role, tls};
use tube_proto::control::{ClientInfo, ControlMessage, TunnelInfo, describe_code};
use tube_proto::{ErrorCode, RELAY_PROTOCOL_VERSION, relay_version_compatible};

/// One local service to expose.
#[derive(Debug, Clone)]
pub struct TunnelSpec {
    /// `host:port` of the local service.
    pub local: String,
    /// Public port to ask for; `None` lets the relay choose.
    pub remote_port: Option<u16>,
    /// Label sent to the relay.
    pub name: String,
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
    /// Deadline for connect + TLS + greeting + auth + registration.
    pub handshake_timeout: Duration,
    /// Deadline for dialling the local service for one user.
    pub local_connect_timeout: Duration,
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
            mux: MuxConfig::default(),
            protocol_version: RELAY_PROTOCOL_VERSION.into(),
        }
    }
}

/// What the agent reports while running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// A tunnel is live: users can connect to `public`.
    TunnelUp {
        /// The tunnel's id at the relay.
        tunnel_id: String,
        /// Public `host:port`.
        public: String,
        /// The local address it forwards to.
        local: String,
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
    /// The relay broke the protocol or the connection died.
    #[error("{0}")]
    Protocol(String),
    /// The connection to the relay was lost after the tunnels were up.
    #[error("connection to relay lost: {0}")]
    ConnectionLost(String),
}

impl AgentError {
    /// The protocol code, where the error has one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            AgentError::Relay { code, .. } => ErrorCode::from_u16(*code),
            _ => None,
        }
    }
}

/// Connects, registers every tunnel and serves until `shutdown` (then says goodbye and returns
/// `Ok`), the relay refuses something, or the connection is lost.
pub async fn run(
    config: AgentConfig,
    events: mpsc::UnboundedSender<AgentEvent>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let hs = timeout(config.handshake_timeout, connect(&config));
    let mut conn = match hs.await {
        Ok(r) => r?,
        Err(_) => {
            return Err(AgentError::Connect {
                addr: config.relay.clone(),
                message: "handshake timed out".into(),
            });
        }
    };
    // Authenticate.
    let auth = ControlMessage::Auth {
        token: config.token.clone(),
        version: config.protocol_version.clone(),
        client_info: ClientInfo {
            os: std::env::consts::OS.into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
    };
    let io = |e: tube_net::codec::CodecError| AgentError::Protocol(e.to_string());
    send_control(&mut conn, &auth).await.map_err(io)?;
    match timeout(config.handshake_timeout, recv_control(&mut conn)).await {
        Err(_) => return Err(AgentError::Protocol("no answer to auth".into())),
        Ok(Err(e)) => return Err(AgentError::Protocol(format!("reading auth response: {e}"))),
        Ok(Ok(ControlMessage::AuthResponse { .. })) => {}
        Ok(Ok(ControlMessage::Error { code, message, .. })) => {
            return Err(AgentError::Relay { code, message });
        }
        Ok(Ok(other)) => {
            return Err(AgentError::Protocol(format!(
                "unexpected {} message",
                other.kind()
            )));
        }
    }
    tracing::info!(relay = %config.relay, "authenticated");

    let token = CancellationToken::new();
    // If this future is dropped (the caller aborted it), the connection and every stream
    // task go with it.
    let _stop_on_drop = token.clone().drop_guard();
    let tracker = TaskTracker::new();
    let (mux, mut ev) = Mux::start(
        conn,
        Role::Acceptor,
        config.mux.clone(),
        token.clone(),
        &tracker,
    );
    let result = serve(&config, &mux, &mut ev, &events, &shutdown, &tracker, &token).await;
    token.cancel();
    tracker.close();
    tracker.wait().await;
    result
}

async fn connect(
    config: &AgentConfig,
) -> Result<
    tube_net::codec::HandshakeConn<tube_net::tokio_rustls::client::TlsStream<TcpStream>>,
    AgentError,
> {
    let err = |message: String| AgentError::Connect {
        addr: config.relay.clone(),
        message,
    };
    let tcp = TcpStream::connect(&config.relay)
        .await
        .map_err(|e| err(e.to_string()))?;
    tube_net::tune_tcp(&tcp);
    let tls_cfg = tls::pinned_client_config(config.fingerprint).map_err(|e| err(e.to_string()))?;
    let tls = TlsConnector::from(tls_cfg)
        .connect(tls::server_name(), tcp)
        .await
        .map_err(|e| {
            if e.to_string().contains(tls::PIN_MISMATCH) {
                AgentError::FingerprintMismatch(config.fingerprint)
            } else {
                err(format!("tls: {e}"))
            }
        })?;
    let mut conn = handshake_conn(tls);
    // The relay speaks first: its greeting carries the protocol version.
    match recv_control(&mut conn).await {
        Ok(ControlMessage::Hello { version, .. }) => {
            if !relay_version_compatible(&version) {
                let msg = ControlMessage::error(
                    ErrorCode::UnsupportedVersion,
                    format!("agent speaks {RELAY_PROTOCOL_VERSION}"),
                    Some("unsupported_version"),
                );
                let _ = send_control(&mut conn, &msg).await;
                return Err(AgentError::Relay {
                    code: ErrorCode::UnsupportedVersion as u16,
                    message: format!(
                        "relay speaks protocol {version}, this agent {RELAY_PROTOCOL_VERSION}"
                    ),
                });
            }
            Ok(conn)
        }
        Ok(ControlMessage::Error { code, message, .. }) => Err(AgentError::Relay { code, message }),
        Ok(other) => Err(AgentError::Protocol(format!(
            "expected greeting, got {}",
            other.kind()
        ))),
        Err(ControlError::Closed) => {
            Err(err("relay closed the connection before its greeting".into()))
        }
        Err(e) => Err(AgentError::Protocol(format!("reading greeting: {e}"))),
    }
}

async fn serve(
    config: &AgentConfig,
    mux: &Mux,
    ev: &mut tube_net::MuxEvents,
    events: &mpsc::UnboundedSender<AgentEvent>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
    token: &CancellationToken,
) -> Result<(), AgentError> {
    let lost = |mux: &Mux| AgentError::ConnectionLost(mux.close_reason().to_string());
    // Registrations are answered in order; send them all, then match answers to specs.
    for spec in &config.tunnels {
        let info = TunnelInfo {
            name: spec.name.clone(),
            protocol: "tcp".into(),
            ports: spec.remote_port.into_iter().collect(),
            public_key: None,
            allowed_ips: Vec::new(),
        };
        mux.send_control(&ControlMessage::Register { tunnel_info: info })
            .await
            .map_err(|_| lost(mux))?;
    }
    let mut awaiting = config.tunnels.iter();
    let mut locals: HashMap<[u8; 16], String> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                mux.close_with(&ControlMessage::Disconnect { reason: "agent stopping".into() });
                return Ok(());
            }
            _ = token.cancelled() => return Err(lost(mux)),
            msg = ev.control.recv() => match msg {
                None => return Err(lost(mux)),
                Some(ControlMessage::RegisterResponse { tunnel_id, config: tc, .. }) => {
                    let Some(spec) = awaiting.next() else {
                        return Err(AgentError::Protocol("unexpected register_response".into()));
                    };
                    let Ok(uuid) = uuid::Uuid::parse_str(&tunnel_id) else {
                        return Err(AgentError::Protocol("bad tunnel id".into()));
                    };
                    locals.insert(*uuid.as_bytes(), spec.local.clone());
                    let confirm = ControlMessage::RegisterConfirm { tunnel_id: tunnel_id.clone() };
                    mux.send_control(&confirm).await.map_err(|_| lost(mux))?;
                    tracing::info!(%tunnel_id, public = %tc.endpoint, local = %spec.local, "tunnel up");
                    let _ = events.send(AgentEvent::TunnelUp {
                        tunnel_id, public: tc.endpoint, local: spec.local.clone(),
                    });
                }
                Some(ControlMessage::Error { code, message, .. }) => {
                    mux.close_with(&ControlMessage::Disconnect { reason: "refused".into() });
                    return Err(AgentError::Relay { code, message });
                }
                Some(ControlMessage::HeartbeatResponse { .. }) => {}
                Some(ControlMessage::Disconnect { reason }) => {
                    return Err(AgentError::ConnectionLost(format!("relay said goodbye: {reason}")));
                }
                Some(other) => {
                    tracing::warn!(kind = other.kind(), "ignoring unexpected control message");
                }
            },
            inc = ev.incoming.recv() => {
                let Some(inc) = inc else { return Err(lost(mux)) };
                let local = locals.get(&inc.tunnel).cloned();
                tracker.spawn(serve_stream(inc, local, config.local_connect_timeout, token.clone()));
            }
        }
    }
}

async fn serve_stream(
    inc: Incoming,
    local: Option<String>,
    connect_timeout: Duration,
    token: CancellationToken,
) {
    let Some(local) = local else {
        tracing::warn!(peer = %inc.peer, "stream for an unknown tunnel");
        inc.stream.reset(ErrorCode::InvalidConfig);
        return;
    };
    let tcp = match timeout(connect_timeout, TcpStream::connect(&local)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            tracing::warn!(%local, error = %e, "cannot reach local service");
            inc.stream.reset(ErrorCode::ConnectFailed);
            return;
        }
        Err(_) => {
            tracing::warn!(%local, "local service did not answer in time");
            inc.stream.reset(ErrorCode::ConnectFailed);
            return;
        }
    };
    tube_net::tune_tcp(&tcp);
    let (end, _) = tube_net::proxy::proxy(tcp, inc.stream, &token).await;
    tracing::debug!(peer = %inc.peer, ?end, "stream ended");
}
