//! The handshake of an agent connection: TLS 1.3, the relay's greeting, and the agent's
//! `auth` under one deadline, with the per-IP and per-subject rate limits and a uniform delay
//! on every authentication failure.

use super::*;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

type Refusal = (ControlMessage, &'static str);

/// Serves one agent connection to its end.
pub(crate) async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    tls: Arc<ServerConfig>,
    shutdown: CancellationToken,
    permit: crate::HandshakeSlot,
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
        r = handshake(tcp, peer, &shared, tls, session_id) => r,
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
            source: crate::source_key(peer.ip()),
            listening: cancel.child_token(),
            token: cancel,
            tracker: TaskTracker::new(),
            users: TaskTracker::new(),
            draining: false,
            pending: HashMap::new(),
            owned: Vec::new(),
            last_heartbeat: HashMap::new(),
        };
        tracing::Instrument::instrument(session.run(conn, shutdown, peer_window), span).await;
    }
    lock(&state.agents).remove(&session_id);
    state.changed();
}

pub(super) fn set_agent(shared: &Shared, session: u64, f: impl FnOnce(&mut Agent)) {
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
    tls: Arc<ServerConfig>,
    session: u64,
) -> Option<Authed<tube_net::SecureStream<TcpStream>>> {
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let local = tcp.local_addr().ok();
    tube_net::tune_tcp(&tcp);
    let tls = match timeout_at(deadline, tube_net::secure::accept(tcp, tls)).await {
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
            let _ = tube_net::timer::timeout(grace, send_control(&mut conn, &msg)).await;
            let _ = tube_net::timer::timeout(grace, async {
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
    if let Err(retry) = lock(&shared.limits)
        .auth_ip
        .check(&crate::source_key(ip), now)
    {
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
            tube_net::timer::sleep_until(received + cfg.auth_failure_delay).await;
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
