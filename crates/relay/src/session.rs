//! One agent connection: TLS, greeting, auth under a deadline, then the control loop that
//! registers tunnels over the running mux, until the agent leaves or the relay stops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tube_net::codec::{ControlError, HandshakeConn, handshake_conn, recv_control, send_control};
use tube_net::tokio_rustls::TlsAcceptor;
use tube_net::{Mux, Role};
use tube_proto::control::{ControlMessage, ServerInfo, TunnelConfig, TunnelInfo};
use tube_proto::{ErrorCode, RELAY_PROTOCOL_VERSION, relay_version_compatible};
use uuid::Uuid;

use crate::registry::AllocError;
use crate::tunnel::{TunnelCounters, accept_loop};
use crate::{Shared, auth::Claims};

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Serves one agent connection to its end.
pub(crate) async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    shutdown: CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let local = tcp.local_addr().ok();
    tube_net::tune_tcp(&tcp);
    let tls = match timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "tls handshake failed");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "tls handshake timed out");
            return;
        }
    };
    let mut conn = handshake_conn(tls);
    let claims = match authenticate(&mut conn, &shared, deadline).await {
        Ok(c) => c,
        Err((code, message, reason)) => {
            tracing::warn!(%peer, code = code as u16, reason, "agent refused");
            let msg = ControlMessage::error(code, message, Some(reason));
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                send_control(&mut conn, &msg),
            )
            .await;
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                use tokio::io::AsyncWriteExt;
                conn.get_mut().shutdown().await
            })
            .await;
            return;
        }
    };
    drop(permit);
    let session_id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("agent", %peer, session = session_id, subject = %claims.sub);
    let _enter = span.enter();
    tracing::info!("agent authenticated");
    drop(_enter);
    let session = Session {
        id: session_id,
        shared: shared.clone(),
        public_host: shared
            .config
            .public_host
            .clone()
            .unwrap_or_else(|| local.map(|a| a.ip().to_string()).unwrap_or_default()),
        public_ip: shared
            .config
            .public_bind
            .or(local.map(|a| a.ip()))
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
        token: CancellationToken::new(),
        tracker: TaskTracker::new(),
        pending: HashMap::new(),
        tunnels: 0,
    };
    tracing::Instrument::instrument(session.run(conn, shutdown), span).await;
}

type Refusal = (ErrorCode, String, &'static str);

async fn authenticate<T>(
    conn: &mut HandshakeConn<T>,
    shared: &Shared,
    deadline: Instant,
) -> Result<Claims, Refusal>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let hello = ControlMessage::Hello {
        version: RELAY_PROTOCOL_VERSION.into(),
        server_info: server_info(),
    };
    let timeout = || {
        (
            ErrorCode::HandshakeTimeout,
            "handshake timed out".to_string(),
            "timeout",
        )
    };
    match timeout_at(deadline, send_control(conn, &hello)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err((ErrorCode::ProtocolError, "write failed".into(), "io")),
        Err(_) => return Err(timeout()),
    }
    let msg = match timeout_at(deadline, recv_control(conn)).await {
        Err(_) => return Err(timeout()),
        Ok(Err(ControlError::Closed)) => {
            return Err((ErrorCode::ProtocolError, "closed".into(), "closed"));
        }
        Ok(Err(e)) => {
            return Err((
                ErrorCode::ProtocolError,
                format!("expected auth: {e}"),
                "protocol",
            ));
        }
        Ok(Ok(m)) => m,
    };
    let ControlMessage::Auth { token, version, .. } = msg else {
        return Err((
            ErrorCode::ProtocolError,
            format!("expected auth, got {}", msg.kind()),
            "protocol",
        ));
    };
    if !relay_version_compatible(&version) {
        return Err((
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {version} is not supported (relay speaks {RELAY_PROTOCOL_VERSION})"
            ),
            "unsupported_version",
        ));
    }
    let claims = shared
        .config
        .jwt
        .verify(&token)
        .map_err(|f| (f.0, f.message().to_string(), f.reason()))?;
    let ok = ControlMessage::AuthResponse {
        status: "success".into(),
        server_info: server_info(),
    };
    match timeout_at(deadline, send_control(conn, &ok)).await {
        Ok(Ok(())) => Ok(claims),
        Ok(Err(_)) => Err((ErrorCode::ProtocolError, "write failed".into(), "io")),
        Err(_) => Err(timeout()),
    }
}

fn server_info() -> ServerInfo {
    ServerInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        features: vec!["tunnel".into(), "tcp".into(), "mux".into()],
    }
}

struct Session {
    id: u64,
    shared: Arc<Shared>,
    public_host: String,
    public_ip: std::net::IpAddr,
    /// Cancelled when this agent's connection ends: stops its listeners and user connections.
    token: CancellationToken,
    /// Owns the mux tasks, accept loops and user connections of this agent.
    tracker: TaskTracker,
    /// Registered but not yet confirmed tunnels.
    pending: HashMap<Uuid, tokio::net::TcpListener>,
    tunnels: usize,
}

impl Session {
    async fn run<T>(mut self, conn: HandshakeConn<T>, shutdown: CancellationToken)
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        // If this future is dropped, the agent's connection and user connections go with it.
        let _stop_on_drop = self.token.clone().drop_guard();
        let cfg = self.shared.config.mux.clone();
        let (mux, mut events) =
            Mux::start(conn, Role::Opener, cfg, self.token.clone(), &self.tracker);
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => {
                    mux.close_with(&ControlMessage::error(
                        ErrorCode::ShuttingDown, "relay is shutting down", Some("shutdown")));
                    break;
                }
                _ = self.token.cancelled() => break,
                m = events.control.recv() => m,
            };
            let Some(msg) = msg else { break };
            match msg {
                ControlMessage::Register { tunnel_info } => {
                    let reply = self.register(tunnel_info);
                    if mux.send_control(&reply).await.is_err() {
                        break;
                    }
                }
                ControlMessage::RegisterConfirm { tunnel_id } => {
                    let Some(listener) = Uuid::parse_str(&tunnel_id)
                        .ok()
                        .and_then(|id| self.pending.remove(&id).map(|l| (id, l)))
                    else {
                        let reply = ControlMessage::error(
                            ErrorCode::InvalidConfig,
                            "unknown tunnel id",
                            Some("unknown_tunnel"),
                        );
                        let _ = mux.send_control(&reply).await;
                        continue;
                    };
                    let (id, listener) = listener;
                    tracing::info!(tunnel_id = %id, port = listener.local_addr().map(|a| a.port()).unwrap_or(0), "tunnel active");
                    self.tracker.spawn(accept_loop(
                        listener,
                        id,
                        mux.clone(),
                        self.token.clone(),
                        self.tracker.clone(),
                        Arc::new(TunnelCounters::default()),
                    ));
                }
                ControlMessage::Heartbeat { .. } => {
                    let reply = ControlMessage::HeartbeatResponse {
                        status: "ok".into(),
                        server_time: rfc3339(SystemTime::now()),
                    };
                    if mux.send_control(&reply).await.is_err() {
                        break;
                    }
                }
                ControlMessage::Disconnect { reason } => {
                    tracing::info!(%reason, "agent disconnected");
                    break;
                }
                other => {
                    mux.close_with(&ControlMessage::error(
                        ErrorCode::ProtocolError,
                        format!("unexpected {} message", other.kind()),
                        Some("protocol"),
                    ));
                    break;
                }
            }
        }
        // Stop every listener and user connection of this agent before giving its ports back.
        self.token.cancel();
        self.pending.clear();
        self.tracker.close();
        self.tracker.wait().await;
        self.shared.registry.release_session(self.id);
        tracing::info!(reason = %mux.close_reason(), "agent session ended");
    }

    fn register(&mut self, info: TunnelInfo) -> ControlMessage {
        let refuse = |e: AllocError| ControlMessage::error(e.code, e.message, Some(e.reason));
        if info.protocol != "tcp" {
            return refuse(AllocError {
                code: ErrorCode::InvalidConfig,
                message: format!("protocol {:?} is not supported (only tcp)", info.protocol),
                reason: "unsupported_protocol",
            });
        }
        if info.ports.len() > 1 || info.name.len() > 128 {
            return refuse(AllocError {
                code: ErrorCode::InvalidConfig,
                message: "a tunnel takes at most one port and a name of at most 128 bytes".into(),
                reason: "invalid_tunnel_info",
            });
        }
        if self.tunnels >= self.shared.config.max_tunnels_per_agent {
            return refuse(AllocError {
                code: ErrorCode::InvalidConfig,
                message: "too many tunnels on one connection".into(),
                reason: "too_many_tunnels",
            });
        }
        let seed = random_u64();
        let listener = match self.shared.registry.allocate(
            self.id,
            self.public_ip,
            info.ports.first().copied(),
            &self.shared.config.port_range,
            seed,
        ) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(code = e.code as u16, reason = e.reason, "tunnel refused");
                return refuse(e);
            }
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let id = Uuid::new_v4();
        self.pending.insert(id, listener);
        self.tunnels += 1;
        tracing::info!(tunnel_id = %id, port, name = %info.name, "tunnel registered");
        ControlMessage::RegisterResponse {
            status: "success".into(),
            tunnel_id: id.to_string(),
            config: TunnelConfig {
                endpoint: join_host_port(&self.public_host, port),
                public_key: self.shared.fingerprint.clone(),
                allowed_ips: Vec::new(),
            },
        }
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // Only spreads port choices; a failure leaves the first port of the range as the start.
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

/// Formats a time as RFC 3339 UTC with seconds.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm), proleptic Gregorian calendar.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_435_200);
        assert_eq!(rfc3339(t), "2026-11-23T08:00:00Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(join_host_port("::1", 80), "[::1]:80");
        assert_eq!(join_host_port("relay.example", 80), "relay.example:80");
    }
}
