//! One agent connection: TLS, greeting, auth under a deadline and rate limits, then the control
//! loop over the running mux (register, confirm, heartbeat, disconnect) until the agent leaves,
//! goes silent, or the relay stops. On the way out the agent's tunnels are either removed (the
//! agent said goodbye) or kept as leases for a reconnect.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tube_net::codec::{ControlError, HandshakeConn, handshake_conn, recv_control, send_control};
use tube_net::mux::DEFAULT_WINDOW;
use tube_net::tokio_rustls::TlsAcceptor;
use tube_net::{Mux, Role};
use tube_proto::cidr::Cidr;
use tube_proto::control::{ControlMessage, ServerInfo, TunnelConfig, TunnelInfo};
use tube_proto::heartbeat::Liveness;
use tube_proto::lifecycle::AgentState;
use tube_proto::{ErrorCode, RELAY_PROTOCOL_VERSION, relay_version_compatible};
use uuid::Uuid;

use crate::Shared;
use crate::auth::Claims;
use crate::registry::{AllocError, allocate, bind};
use crate::state::{Agent, Tunnel, TunnelCounters, TunnelState, lock, unix_in};
use crate::store::Lease;
use crate::tunnel::{TunnelRun, accept_loop};

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

type Refusal = (ControlMessage, &'static str);

/// Serves one agent connection to its end.
pub(crate) async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    shutdown: CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let session_id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let cancel = CancellationToken::new();
    let state = &shared.state;
    lock(&state.agents).insert(
        session_id,
        Agent {
            session: session_id,
            subject: String::new(),
            peer,
            state: AgentState::Authenticating,
            connected_since: SystemTime::now(),
            cancel: cancel.clone(),
        },
    );
    state.changed();
    let outcome = tokio::select! {
        r = handshake(tcp, peer, &shared, &acceptor, session_id) => r,
        _ = shutdown.cancelled() => None,
    };
    drop(permit);
    if let Some((conn, claims, peer_window, local)) = outcome {
        let span = tracing::info_span!("agent", %peer, session = session_id, subject = %claims.sub);
        set_agent(&shared, session_id, |a| {
            a.subject = claims.sub.clone();
            a.state = AgentState::Registered;
        });
        span.in_scope(|| tracing::info!(state = "registered", "agent authenticated"));
        let public_ip = shared
            .config
            .public_bind
            .or(local.map(|a| a.ip()))
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
        let public_host = shared
            .config
            .public_host
            .clone()
            .unwrap_or_else(|| local.map(|a| a.ip().to_string()).unwrap_or_default());
        let session = Session {
            id: session_id,
            subject: claims.sub,
            shared: shared.clone(),
            public_host,
            public_ip,
            token: cancel,
            tracker: TaskTracker::new(),
            pending: HashMap::new(),
            owned: Vec::new(),
            last_heartbeat: HashMap::new(),
        };
        tracing::Instrument::instrument(session.run(conn, shutdown, peer_window), span).await;
    }
    lock(&state.agents).remove(&session_id);
    state.changed();
}

fn set_agent(shared: &Shared, session: u64, f: impl FnOnce(&mut Agent)) {
    if let Some(a) = lock(&shared.state.agents).get_mut(&session) {
        f(a);
    }
    shared.state.changed();
}

type Authed<T> = (HandshakeConn<T>, Claims, u32, Option<SocketAddr>);

async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    acceptor: &TlsAcceptor,
    session: u64,
) -> Option<Authed<tube_net::tokio_rustls::server::TlsStream<TcpStream>>> {
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let local = tcp.local_addr().ok();
    tube_net::tune_tcp(&tcp);
    let tls = match timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "tls handshake failed");
            return None;
        }
        Err(_) => {
            tracing::warn!(%peer, "tls handshake timed out");
            return None;
        }
    };
    let mut conn = handshake_conn(tls);
    match authenticate(&mut conn, shared, peer.ip(), deadline).await {
        Ok((claims, window)) => Some((conn, claims, window, local)),
        Err((msg, reason)) => {
            if let ControlMessage::Error { code, .. } = &msg {
                tracing::warn!(%peer, session, code, reason, "agent refused");
                shared.state.count_error(*code);
            }
            let grace = std::time::Duration::from_secs(1);
            let _ = tokio::time::timeout(grace, send_control(&mut conn, &msg)).await;
            let _ = tokio::time::timeout(grace, async {
                use tokio::io::AsyncWriteExt;
                conn.get_mut().shutdown().await
            })
            .await;
            None
        }
    }
}

async fn authenticate<T>(
    conn: &mut HandshakeConn<T>,
    shared: &Shared,
    ip: IpAddr,
    deadline: Instant,
) -> Result<(Claims, u32), Refusal>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let cfg = &shared.config;
    let hello = ControlMessage::Hello {
        version: RELAY_PROTOCOL_VERSION.into(),
        server_info: server_info(),
        window: Some(tube_net::mux::clamp_window(cfg.mux.window)),
    };
    let protocol = |m: String| {
        (
            ControlMessage::error(ErrorCode::ProtocolError, m, Some("protocol")),
            "protocol",
        )
    };
    let timeout = || {
        (
            ControlMessage::error(
                ErrorCode::HandshakeTimeout,
                "handshake timed out",
                Some("timeout"),
            ),
            "timeout",
        )
    };
    match timeout_at(deadline, send_control(conn, &hello)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err(protocol("write failed".into())),
        Err(_) => return Err(timeout()),
    }
    let msg = match timeout_at(deadline, recv_control(conn)).await {
        Err(_) => return Err(timeout()),
        Ok(Err(ControlError::Closed)) => return Err(protocol("closed".into())),
        Ok(Err(e)) => return Err(protocol(format!("expected auth: {e}"))),
        Ok(Ok(m)) => m,
    };
    let ControlMessage::Auth {
        token,
        version,
        window,
        ..
    } = msg
    else {
        return Err(protocol(format!("expected auth, got {}", msg.kind())));
    };
    let received = Instant::now();
    if !relay_version_compatible(&version) {
        let m = format!(
            "protocol version {version} is not supported (relay speaks {RELAY_PROTOCOL_VERSION})"
        );
        return Err((
            ControlMessage::error(
                ErrorCode::UnsupportedVersion,
                m,
                Some("unsupported_version"),
            ),
            "version",
        ));
    }
    let now = received.into_std();
    if let Err(retry) = lock(&shared.limits).auth_ip.check(&ip, now) {
        shared.state.count_rate_limited("auth_ip");
        let m = ControlMessage::error_retry(
            ErrorCode::RateLimit,
            "too many authentication attempts",
            "auth_attempts",
            retry.as_secs(),
        );
        return Err((m, "rate_limit"));
    }
    let claims = match cfg.jwt.verify(&token) {
        Ok(c) => c,
        Err(f) => {
            // Answer every failure at the same moment, whichever check failed.
            tokio::time::sleep_until(received + cfg.auth_failure_delay).await;
            return Err((
                ControlMessage::error(f.0, f.message(), Some(f.reason())),
                "auth",
            ));
        }
    };
    if let Err(retry) = lock(&shared.limits).auth_subject.check(&claims.sub, now) {
        shared.state.count_rate_limited("auth_subject");
        let m = ControlMessage::error_retry(
            ErrorCode::RateLimit,
            "too many authentication attempts",
            "auth_attempts",
            retry.as_secs(),
        );
        return Err((m, "rate_limit"));
    }
    let ok = ControlMessage::AuthResponse {
        status: "success".into(),
        server_info: server_info(),
    };
    match timeout_at(deadline, send_control(conn, &ok)).await {
        Ok(Ok(())) => Ok((
            claims,
            tube_net::mux::clamp_window(window.unwrap_or(DEFAULT_WINDOW)),
        )),
        Ok(Err(_)) => Err(protocol("write failed".into())),
        Err(_) => Err(timeout()),
    }
}

fn server_info() -> ServerInfo {
    ServerInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        features: vec![
            "tunnel".into(),
            "tcp".into(),
            "mux".into(),
            "reconnect".into(),
        ],
    }
}

struct Session {
    id: u64,
    subject: String,
    shared: Arc<Shared>,
    public_host: String,
    public_ip: IpAddr,
    /// Cancelled when this agent's connection ends: stops its listeners and user connections.
    token: CancellationToken,
    /// Owns the mux tasks, accept loops and user connections of this agent.
    tracker: TaskTracker,
    /// Registered but not yet confirmed tunnels, with their listeners.
    pending: HashMap<Uuid, TcpListener>,
    /// Tunnels this session holds (pending or active).
    owned: Vec<Uuid>,
    /// Last heartbeat per tunnel, for the heartbeat rate limit.
    last_heartbeat: HashMap<String, Instant>,
}

impl Session {
    async fn run<T>(mut self, conn: HandshakeConn<T>, shutdown: CancellationToken, peer_window: u32)
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        // If this future is dropped, the agent's connection and user connections go with it.
        let _stop_on_drop = self.token.clone().drop_guard();
        let mut cfg = self.shared.config.mux.clone();
        cfg.peer_window = peer_window;
        let (mux, mut events) =
            Mux::start(conn, Role::Opener, cfg, self.token.clone(), &self.tracker);
        let c = &self.shared.config;
        let mut liveness = Liveness::new(
            c.heartbeat_interval,
            c.heartbeat_misses,
            Instant::now().into_std(),
        );
        let mut goodbye = false;
        loop {
            // Biased: messages the agent sent before its connection closed (its goodbye) are
            // handled before the close itself.
            let msg = tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.send_error_close(&mux, ControlMessage::error(
                        ErrorCode::ShuttingDown, "relay is shutting down", Some("shutdown")));
                    break;
                }
                m = events.control.recv() => m,
                _ = self.token.cancelled() => break,
                _ = tokio::time::sleep_until(Instant::from_std(liveness.deadline())) => {
                    if liveness.is_dead(Instant::now().into_std()) {
                        tracing::warn!("no heartbeat from agent, dropping it");
                        self.shared.state.counters.heartbeat_timeouts.fetch_add(1, Ordering::Relaxed);
                        self.send_error_close(&mux, ControlMessage::error(
                            ErrorCode::HeartbeatTimeout, "no heartbeat received in time", Some("heartbeat_timeout")));
                        break;
                    }
                    continue;
                }
            };
            let Some(msg) = msg else { break };
            liveness.handle_heard(Instant::now().into_std());
            let reply = match msg {
                ControlMessage::Register { tunnel_info } => Some(self.register(tunnel_info).await),
                ControlMessage::RegisterConfirm { tunnel_id } => self.confirm(&tunnel_id, &mux),
                ControlMessage::Heartbeat { tunnel_id, .. } => Some(self.heartbeat(tunnel_id)),
                ControlMessage::Disconnect { reason } => {
                    tracing::info!(%reason, "agent disconnected");
                    goodbye = true;
                    break;
                }
                ControlMessage::Error { code, message, .. } => {
                    tracing::warn!(code, %message, "agent reported an error");
                    None
                }
                other => {
                    self.send_error_close(
                        &mux,
                        ControlMessage::error(
                            ErrorCode::ProtocolError,
                            format!("unexpected {} message", other.kind()),
                            Some("protocol"),
                        ),
                    );
                    break;
                }
            };
            if let Some(reply) = reply {
                if let ControlMessage::Error { code, .. } = &reply {
                    self.shared.state.count_error(*code);
                }
                let sent = tokio::select! {
                    r = mux.send_control(&reply) => r.is_ok(),
                    _ = self.token.cancelled() => false,
                    _ = shutdown.cancelled() => false,
                };
                if !sent {
                    break;
                }
            }
        }
        // Stop every listener and user connection of this agent before touching its tunnels.
        self.token.cancel();
        self.pending.clear();
        self.tracker.close();
        self.tracker.wait().await;
        self.release(goodbye).await;
        tracing::info!(reason = %mux.close_reason(), goodbye, "agent session ended");
    }

    fn send_error_close(&self, mux: &Mux, msg: ControlMessage) {
        if let ControlMessage::Error { code, .. } = &msg {
            self.shared.state.count_error(*code);
        }
        mux.close_with(&msg);
    }

    /// Removes this session's tunnels (after a goodbye) or keeps them as leases.
    async fn release(&mut self, goodbye: bool) {
        let state = &self.shared.state;
        let grace = self.shared.config.lease_grace;
        let mut changes = Vec::new();
        {
            let mut tunnels = lock(&state.tunnels);
            let mut ports = lock(&state.ports);
            for id in self.owned.drain(..) {
                let Some(t) = tunnels.get_mut(&id) else {
                    continue;
                };
                let mine = matches!(t.state, TunnelState::Pending { session } | TunnelState::Active { session } if session == self.id);
                if !mine {
                    continue; // taken over by a newer connection of the same agent
                }
                if goodbye {
                    ports.remove(&t.port);
                    tunnels.remove(&id);
                    changes.push((id, None));
                } else {
                    let expires_at = unix_in(grace);
                    t.state = TunnelState::Reconnecting { expires_at };
                    changes.push((id, Some(lease_of(t, Some(expires_at)))));
                }
            }
        }
        state.changed();
        for (id, lease) in changes {
            match lease {
                None => {
                    tracing::info!(tunnel_id = %id, "tunnel removed");
                    self.shared.store_remove(id.to_string()).await;
                }
                Some(l) => {
                    tracing::info!(tunnel_id = %id, state = "reconnecting", grace_secs = grace.as_secs(), "tunnel waiting for its agent");
                    self.shared.store_put(l).await;
                }
            }
        }
    }

    fn heartbeat(&mut self, tunnel_id: String) -> ControlMessage {
        let now = Instant::now();
        // Heartbeats for tunnels this connection does not hold share one rate-limit key, so
        // made-up ids neither grow the map nor escape the limit.
        let owned = Uuid::parse_str(&tunnel_id).is_ok_and(|id| self.owned.contains(&id));
        let tunnel_id = if owned { tunnel_id } else { String::new() };
        let min = self.shared.config.heartbeat_min_interval;
        if let Some(last) = self.last_heartbeat.get(&tunnel_id) {
            let since = now.saturating_duration_since(*last);
            if since < min {
                self.shared.state.count_rate_limited("heartbeat");
                let retry = (min - since).as_secs_f64().ceil().max(1.0) as u64;
                // The refusal is itself counted as an error; the agent stays connected.
                return ControlMessage::error_retry(
                    ErrorCode::RateLimit,
                    "heartbeats too frequent",
                    "heartbeat_rate",
                    retry,
                );
            }
        }
        self.last_heartbeat.insert(tunnel_id, now);
        ControlMessage::HeartbeatResponse {
            status: "ok".into(),
            server_time: rfc3339(SystemTime::now()),
        }
    }

    fn confirm(&mut self, tunnel_id: &str, mux: &Mux) -> Option<ControlMessage> {
        let id = Uuid::parse_str(tunnel_id).ok();
        let Some((id, listener)) = id.and_then(|id| self.pending.remove(&id).map(|l| (id, l)))
        else {
            return Some(ControlMessage::error(
                ErrorCode::InvalidConfig,
                "unknown tunnel id",
                Some("unknown_tunnel"),
            ));
        };
        let run = {
            let mut tunnels = lock(&self.shared.state.tunnels);
            let t = tunnels.get_mut(&id)?;
            t.state = TunnelState::Active { session: self.id };
            t.active_since = SystemTime::now();
            tracing::info!(tunnel_id = %id, port = t.port, state = "active", "tunnel active");
            TunnelRun {
                listener,
                id,
                allowed: t.allowed.clone(),
                counters: t.counters.clone(),
            }
        };
        set_agent(&self.shared, self.id, |a| a.state = AgentState::Active);
        self.tracker.spawn(accept_loop(
            run,
            mux.clone(),
            self.token.clone(),
            self.tracker.clone(),
        ));
        None
    }

    async fn register(&mut self, info: TunnelInfo) -> ControlMessage {
        match self.try_register(info).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(code = e.code as u16, reason = e.reason, "tunnel refused");
                ControlMessage::error(e.code, e.message, Some(e.reason))
            }
        }
    }

    async fn try_register(&mut self, info: TunnelInfo) -> Result<ControlMessage, AllocError> {
        let invalid = |message: String, reason: &'static str| AllocError {
            code: ErrorCode::InvalidConfig,
            message,
            reason,
        };
        if info.protocol != "tcp" {
            return Err(invalid(
                format!("protocol {:?} is not supported (only tcp)", info.protocol),
                "unsupported_protocol",
            ));
        }
        if info.ports.len() > 1 || info.name.len() > 128 {
            return Err(invalid(
                "a tunnel takes at most one port and a name of at most 128 bytes".into(),
                "invalid_tunnel_info",
            ));
        }
        if self.owned.len() >= self.shared.config.max_tunnels_per_agent {
            return Err(invalid(
                "too many tunnels on one connection".into(),
                "too_many_tunnels",
            ));
        }
        let allowed = self.allow_list(&info.allowed_ips)?;
        if let (Some(id), Some(token)) = (&info.tunnel_id, &info.reconnect_token)
            && let Some(reply) = self.reclaim(id, token, &info, &allowed).await?
        {
            return Ok(reply);
        }
        let now = Instant::now().into_std();
        if let Err(retry) = lock(&self.shared.limits)
            .tunnel_subject
            .check(&self.subject, now)
        {
            self.shared.state.count_rate_limited("tunnel_creation");
            tracing::warn!(
                retry_after = retry.as_secs(),
                "tunnel creation rate limited"
            );
            return Ok(ControlMessage::error_retry(
                ErrorCode::RateLimit,
                "too many new tunnels",
                "tunnel_creation",
                retry.as_secs(),
            ));
        }
        let id = Uuid::new_v4();
        let listener = {
            let mut ports = lock(&self.shared.state.ports);
            allocate(
                &mut ports,
                id,
                self.public_ip,
                info.ports.first().copied(),
                &self.shared.config.port_range,
                random_u64(),
            )?
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let token = random_token();
        let tunnel = Tunnel {
            id,
            subject: self.subject.clone(),
            name: info.name.clone(),
            port,
            endpoint: join_host_port(&self.public_host, port),
            allowed,
            token_hash: Sha256::digest(token.as_bytes()).into(),
            state: TunnelState::Pending { session: self.id },
            counters: Arc::new(TunnelCounters::default()),
            active_since: SystemTime::now(),
        };
        tracing::info!(tunnel_id = %id, port, name = %info.name, state = "registered", "tunnel registered");
        Ok(self.install(tunnel, listener, token).await)
    }

    /// Takes a tunnel back with its reconnect token. `Ok(None)`: the lease is gone, register
    /// anew.
    async fn reclaim(
        &mut self,
        id: &str,
        token: &str,
        info: &TunnelInfo,
        allowed: &[Cidr],
    ) -> Result<Option<ControlMessage>, AllocError> {
        let refused = || AllocError {
            code: ErrorCode::ReconnectRefused,
            message: "reconnect token not accepted; register the tunnel anew".into(),
            reason: "reconnect_refused",
        };
        let Ok(id) = Uuid::parse_str(id) else {
            return Ok(None);
        };
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let holder = {
            let tunnels = lock(&self.shared.state.tunnels);
            let Some(t) = tunnels.get(&id) else {
                return Ok(None);
            };
            let ok: bool = t.token_hash.ct_eq(&hash).into();
            if !ok || t.subject != self.subject {
                tracing::warn!(tunnel_id = %id, "reconnect token refused");
                return Err(refused());
            }
            match t.state {
                TunnelState::Pending { session } | TunnelState::Active { session }
                    if session != self.id =>
                {
                    Some(session)
                }
                TunnelState::Pending { .. } | TunnelState::Active { .. } => return Err(refused()),
                TunnelState::Reconnecting { .. } => None,
            }
        };
        if let Some(old) = holder {
            // The same agent, back on a new connection while the relay still holds the old,
            // half-open one: end the old session and wait until it has let the port go.
            tracing::info!(tunnel_id = %id, old_session = old, "agent took its tunnel over from a stale connection");
            let cancel = lock(&self.shared.state.agents)
                .get(&old)
                .map(|a| a.cancel.clone());
            if let Some(c) = cancel {
                c.cancel();
            }
            let state = &self.shared.state;
            let wait = state.wait_until(|s| {
                lock(&s.tunnels)
                    .get(&id)
                    .is_none_or(|t| matches!(t.state, TunnelState::Reconnecting { .. }))
            });
            if tokio::time::timeout(std::time::Duration::from_secs(5), wait)
                .await
                .is_err()
            {
                return Err(AllocError {
                    code: ErrorCode::ServerError,
                    message: "previous connection did not end".into(),
                    reason: "takeover_timeout",
                });
            }
        }
        let (port, name, counters) = {
            let tunnels = lock(&self.shared.state.tunnels);
            let Some(t) = tunnels.get(&id) else {
                return Ok(None);
            };
            (t.port, t.name.clone(), t.counters.clone())
        };
        let listener = bind(self.public_ip, port).map_err(|_| AllocError {
            code: ErrorCode::PortUnavailable,
            message: format!("port {port} cannot be bound"),
            reason: "port_in_use",
        })?;
        let token = random_token();
        let tunnel = Tunnel {
            id,
            subject: self.subject.clone(),
            name: if info.name.is_empty() {
                name
            } else {
                info.name.clone()
            },
            port,
            endpoint: join_host_port(&self.public_host, port),
            allowed: allowed.to_vec(),
            token_hash: Sha256::digest(token.as_bytes()).into(),
            state: TunnelState::Pending { session: self.id },
            counters,
            active_since: SystemTime::now(),
        };
        tracing::info!(tunnel_id = %id, port, state = "registered", "tunnel reclaimed with its reconnect token");
        Ok(Some(self.install(tunnel, listener, token).await))
    }

    async fn install(
        &mut self,
        tunnel: Tunnel,
        listener: TcpListener,
        token: String,
    ) -> ControlMessage {
        let id = tunnel.id;
        let reply = ControlMessage::RegisterResponse {
            status: "success".into(),
            tunnel_id: id.to_string(),
            config: TunnelConfig {
                endpoint: tunnel.endpoint.clone(),
                public_key: self.shared.fingerprint.clone(),
                allowed_ips: tunnel.allowed.iter().map(|c| c.to_string()).collect(),
            },
            reconnect_token: Some(token),
        };
        let lease = lease_of(&tunnel, None);
        lock(&self.shared.state.tunnels).insert(id, tunnel);
        self.shared.state.changed();
        self.pending.insert(id, listener);
        self.owned.push(id);
        self.shared.store_put(lease).await;
        reply
    }

    fn allow_list(&self, requested: &[String]) -> Result<Vec<Cidr>, AllocError> {
        let cfg = &self.shared.config;
        let invalid = |message: String| AllocError {
            code: ErrorCode::InvalidConfig,
            message,
            reason: "invalid_allowed_ips",
        };
        if requested.len() > cfg.max_allowed_ips {
            return Err(invalid(format!(
                "at most {} allowed_ips entries",
                cfg.max_allowed_ips
            )));
        }
        let mut out = Vec::with_capacity(requested.len());
        for r in requested {
            let c: Cidr = r
                .parse()
                .map_err(|_| invalid(format!("{r:?} is not an address range")))?;
            if !cfg.allowed_ips_policy.is_empty()
                && !cfg.allowed_ips_policy.iter().any(|p| p.covers(&c))
            {
                return Err(invalid(format!("{c} is outside the relay's policy")));
            }
            out.push(c);
        }
        if out.is_empty() {
            out = cfg.allowed_ips_policy.clone();
        }
        Ok(out)
    }
}

fn lease_of(t: &Tunnel, expires_at: Option<u64>) -> Lease {
    Lease {
        tunnel_id: t.id.to_string(),
        subject: t.subject.clone(),
        name: t.name.clone(),
        port: t.port,
        endpoint: t.endpoint.clone(),
        token_hash: t.token_hash,
        allowed_ips: t.allowed.iter().map(|c| c.to_string()).collect(),
        expires_at,
    }
}

fn random_token() -> String {
    let mut b = [0u8; 32];
    // getrandom failing means the OS has no entropy source; the token would then be all
    // zeros, so fall back to a v4 UUID pair (also OS randomness) rather than panic.
    if getrandom::fill(&mut b).is_err() {
        return format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    }
    hex::encode(b)
}

pub(crate) fn join_host_port(host: &str, port: u16) -> String {
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

pub use tube_proto::time::rfc3339;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(join_host_port("::1", 80), "[::1]:80");
        assert_eq!(join_host_port("relay.example", 80), "relay.example:80");
    }
}
