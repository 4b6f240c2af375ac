//! One connection's life: connect (TCP, TLS 1.3 with the pinned fingerprint, the relay's
//! greeting), authenticate, register the tunnels one at a time (taking them back with their
//! reconnect tokens), then serve streams and heartbeats until the connection ends.

use super::*;
use tube_proto::control::ErrorDetails;

type Conn = HandshakeConn<SecureStream<TcpStream>>;

/// One connection's life: connect, authenticate, register, serve.
pub(crate) async fn session(
    config: &AgentConfig,
    life: &mut Lifecycle<'_>,
    held: &mut [Option<Held>],
    traffic: &[Arc<Traffic>],
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    let connecting = async {
        let (mut conn, relay_window) = timeout(config.handshake_timeout, connect(config))
            .await
            .map_err(|_| AgentError::Connect {
            addr: config.relay.clone(),
            message: "handshake timed out".into(),
        })??;
        authenticate(config, &mut conn).await?;
        Ok::<_, AgentError>((conn, relay_window))
    };
    let (conn, relay_window) = tokio::select! {
        r = connecting => r?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    tracing::info!(relay = %config.relay, "authenticated");
    if life.state == AgentState::Authenticating {
        life.to(LifecycleEvent::AuthSuccess);
    }
    let token = CancellationToken::new();
    // If this future is dropped (the caller aborted it), the connection and every stream
    // task go with it.
    let _stop_on_drop = token.clone().drop_guard();
    let tracker = TaskTracker::new();
    // User streams apart from the mux's own tasks, so shutdown can wait for just them.
    let streams = TaskTracker::new();
    let mut mux_cfg = config.mux.clone();
    mux_cfg.peer_window = relay_window;
    let (mux, mut ev) = Mux::start(conn, Role::Acceptor, mux_cfg, token.clone(), &tracker);
    let mut serving = Serving {
        config,
        mux: &mux,
        held,
        traffic,
        streams: &streams,
        token: &token,
        locals: HashMap::new(),
        since: HashMap::new(),
    };
    let result = match serving.serve(&mut ev, life, shutdown).await {
        Err(AgentError::ConnectionLost(why)) => {
            Err(last_word(&mut ev).unwrap_or(AgentError::ConnectionLost(why)))
        }
        r => r,
    };
    token.cancel();
    tracker.close();
    streams.close();
    tracker.wait().await;
    streams.wait().await;
    result
}

async fn connect(config: &AgentConfig) -> Result<(Conn, u32), AgentError> {
    let err = |message: String| AgentError::Connect {
        addr: config.relay.clone(),
        message,
    };
    let tcp = TcpStream::connect(&config.relay)
        .await
        .map_err(|e| err(e.to_string()))?;
    tube_net::tune_tcp(&tcp);
    let tls_cfg = tls::pinned_client_config(config.fingerprint).map_err(|e| err(e.to_string()))?;
    let tls = tube_net::secure::connect(tcp, tls_cfg, tls::server_name())
        .await
        .map_err(|e| {
            if e.to_string().contains(tls::PIN_MISMATCH) {
                AgentError::FingerprintMismatch(config.fingerprint)
            } else {
                err(format!("tls: {e}"))
            }
        })?;
    let mut conn = handshake_conn(tls);
    // The relay speaks first: its greeting carries the protocol version and its window.
    match recv_control(&mut conn).await {
        Ok(ControlMessage::Hello {
            version, window, ..
        }) => {
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
                    retry_after: None,
                });
            }
            Ok((
                conn,
                tube_net::mux::clamp_window(window.unwrap_or(DEFAULT_WINDOW)),
            ))
        }
        Ok(ControlMessage::Error {
            code,
            message,
            details,
        }) => Err(relay_error(code, message, &details)),
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

async fn authenticate(config: &AgentConfig, conn: &mut Conn) -> Result<(), AgentError> {
    let auth = ControlMessage::Auth {
        token: config.token.clone(),
        version: config.protocol_version.clone(),
        client_info: ClientInfo {
            os: std::env::consts::OS.into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        window: Some(tube_net::mux::clamp_window(config.mux.window)),
    };
    send_control(conn, &auth)
        .await
        .map_err(|e| AgentError::ConnectionLost(e.to_string()))?;
    match timeout(config.handshake_timeout, recv_control(conn)).await {
        Err(_) => Err(AgentError::ConnectionLost("no answer to auth".into())),
        Ok(Err(e)) => Err(AgentError::ConnectionLost(format!(
            "reading auth response: {e}"
        ))),
        Ok(Ok(ControlMessage::AuthResponse { .. })) => Ok(()),
        Ok(Ok(ControlMessage::Error {
            code,
            message,
            details,
        })) => Err(relay_error(code, message, &details)),
        Ok(Ok(other)) => Err(AgentError::Protocol(format!(
            "unexpected {} message",
            other.kind()
        ))),
    }
}

/// The relay's last word, if it sent one before closing (an error, a goodbye) that the serving
/// loop did not read: the relay sends its error and closes together, and the close can win the
/// loop's race with the message already delivered. Read it so that a final refusal stops the
/// agent and a `retry_after` is honoured, instead of a plain lost connection.
fn last_word(ev: &mut tube_net::MuxEvents) -> Option<AgentError> {
    while let Ok(msg) = ev.control.try_recv() {
        match msg {
            ControlMessage::Error {
                code,
                message,
                details,
            } if !is_heartbeat_warning(code, &details) => {
                return Some(relay_error(code, message, &details));
            }
            ControlMessage::Disconnect { reason } => return Some(said_goodbye(&reason)),
            _ => {}
        }
    }
    None
}

/// An `error` message from the relay as the agent's error.
fn relay_error(code: u16, message: String, details: &ErrorDetails) -> AgentError {
    AgentError::Relay {
        code,
        message,
        retry_after: details.retry_after,
    }
}

/// A refused heartbeat (sent too often): a warning, the connection goes on.
fn is_heartbeat_warning(code: u16, details: &ErrorDetails) -> bool {
    code == ErrorCode::RateLimit as u16 && details.reason.as_deref() == Some("heartbeat_rate")
}

fn said_goodbye(reason: &str) -> AgentError {
    AgentError::ConnectionLost(format!("relay said goodbye: {reason}"))
}

struct Serving<'a> {
    config: &'a AgentConfig,
    mux: &'a Mux,
    held: &'a mut [Option<Held>],
    traffic: &'a [Arc<Traffic>],
    /// The user streams being served (each task owns one).
    streams: &'a TaskTracker,
    token: &'a CancellationToken,
    /// Tunnel UUID bytes to (local address, spec index).
    locals: HashMap<[u8; 16], (String, usize)>,
    /// Spec index to when the tunnel became active.
    since: HashMap<usize, SystemTime>,
}

impl Serving<'_> {
    async fn serve(
        &mut self,
        ev: &mut tube_net::MuxEvents,
        life: &mut Lifecycle<'_>,
        shutdown: &CancellationToken,
    ) -> Result<(), AgentError> {
        let lost = |mux: &Mux| AgentError::ConnectionLost(mux.close_reason().to_string());
        let mut liveness = Liveness::new(
            self.config.heartbeat_interval,
            self.config.heartbeat_misses,
            Instant::now().into_std(),
        );
        // Registrations go one at a time: each answer (or refusal) belongs to the last one sent.
        let mut next = 0;
        let mut awaiting = false;
        let mut register_deadline = Instant::now() + self.config.handshake_timeout;
        // A registration refused by a rate limit is sent again at this instant.
        let mut retry_register: Option<Instant> = None;
        // Set at shutdown: open streams may go on until then; new ones are refused.
        let mut drain: Option<Instant> = None;
        // Whether streams were open when the drain began, and whether they have ended and a
        // heartbeat went out behind their last bytes.
        let mut drained_some = false;
        let mut barrier = false;
        let goodbye = |mux: &Mux| {
            mux.close_with(&ControlMessage::Disconnect {
                reason: "agent stopping".into(),
            })
        };
        loop {
            if !awaiting && next < self.config.tunnels.len() && drain.is_none() {
                self.send(self.register_msg(next)).await?;
                awaiting = true;
                register_deadline = Instant::now() + self.config.handshake_timeout;
            }
            let wake = Instant::from_std(liveness.poll_timeout());
            tokio::select! {
                _ = shutdown.cancelled(), if drain.is_none() => {
                    self.streams.close();
                    drain = Some(Instant::now() + self.config.shutdown_grace);
                    let open_streams = self.streams.len();
                    drained_some = open_streams > 0;
                    tracing::info!(open_streams, grace_ms = self.config.shutdown_grace.as_millis() as u64, "stopping: refusing new streams, letting open ones finish");
                    let _ = life.events.send(AgentEvent::Stopping { open_streams });
                }
                _ = self.streams.wait(), if drain.is_some() && !barrier => {
                    if !drained_some {
                        goodbye(self.mux);
                        return Ok(());
                    }
                    // The streams' last bytes are queued; the relay's answer to a heartbeat
                    // sent after them says it has read them, so the goodbye cannot overtake
                    // them there. (An id this session never used: answered, not rate limited.)
                    let hb = ControlMessage::Heartbeat { tunnel_id: String::new(), stats: TunnelStats::default() };
                    self.send(hb).await?;
                    barrier = true;
                }
                _ = tube_net::timer::sleep_until(drain.unwrap_or(register_deadline)), if drain.is_some() => {
                    if !self.streams.is_empty() {
                        tracing::warn!(open_streams = self.streams.len(), "streams still open after the shutdown grace, closing them");
                    }
                    goodbye(self.mux);
                    return Ok(());
                }
                _ = self.token.cancelled() => return Err(lost(self.mux)),
                _ = tube_net::timer::sleep_until(retry_register.unwrap_or(register_deadline)), if retry_register.is_some() => {
                    retry_register = None;
                    awaiting = false;
                }
                _ = tube_net::timer::sleep_until(register_deadline), if awaiting && retry_register.is_none() => {
                    self.mux.close();
                    return Err(AgentError::ConnectionLost("no answer to register".into()));
                }
                _ = tube_net::timer::sleep_until(wake) => {
                    let now = Instant::now().into_std();
                    if liveness.is_dead(now) {
                        self.mux.close();
                        return Err(AgentError::ConnectionLost("relay stopped answering heartbeats".into()));
                    }
                    if liveness.poll_send(now) {
                        self.heartbeats(&liveness).await?;
                    }
                }
                msg = ev.control.recv() => {
                    let Some(msg) = msg else { return Err(lost(self.mux)) };
                    liveness.handle_heard(Instant::now().into_std());
                    if barrier {
                        goodbye(self.mux);
                        return Ok(());
                    }
                    match msg {
                        ControlMessage::RegisterResponse { tunnel_id, config: tc, reconnect_token, .. } if awaiting => {
                            awaiting = false;
                            self.activated(next, tunnel_id, tc.endpoint, reconnect_token, life).await?;
                            next += 1;
                        }
                        ControlMessage::Error { code, message, details } => {
                            if is_heartbeat_warning(code, &details) {
                                tracing::warn!(%message, "relay refused a heartbeat as too frequent");
                                continue;
                            }
                            if awaiting && code == ErrorCode::ReconnectRefused as u16 {
                                // Our lease is gone or was refused: register this tunnel anew.
                                tracing::warn!(local = %self.config.tunnels[next].local, "reconnect token refused, registering anew");
                                self.held[next] = None;
                                awaiting = false;
                                continue;
                            }
                            if awaiting && code == ErrorCode::RateLimit as u16 {
                                // Wait as asked and register again on this same connection.
                                let wait = Duration::from_secs(details.retry_after.unwrap_or(1).max(1));
                                tracing::warn!(%message, retry_after = wait.as_secs(), "registration rate limited, waiting");
                                retry_register = Some(Instant::now() + wait);
                                continue;
                            }
                            let err = relay_error(code, message, &details);
                            if err.is_final() {
                                // Stopping for good: say goodbye so the relay frees our ports.
                                self.mux.close_with(&ControlMessage::Disconnect { reason: "refused".into() });
                            } else {
                                // Coming back: no goodbye, so the relay keeps our leases.
                                self.mux.close();
                            }
                            return Err(err);
                        }
                        ControlMessage::HeartbeatResponse { .. } => {}
                        ControlMessage::Disconnect { reason } => {
                            return Err(said_goodbye(&reason));
                        }
                        other => tracing::warn!(kind = other.kind(), "ignoring unexpected control message"),
                    }
                }
                inc = ev.incoming.recv() => {
                    let Some(inc) = inc else { return Err(lost(self.mux)) };
                    if drain.is_some() {
                        tracing::debug!(peer = %inc.peer, "stopping: stream refused");
                        inc.stream.reset(ErrorCode::ShuttingDown);
                        continue;
                    }
                    let target = self.locals.get(&inc.tunnel).cloned();
                    let traffic = target.as_ref().map(|(_, i)| self.traffic[*i].clone());
                    self.streams.spawn(serve_stream(inc, target.map(|(l, _)| l), traffic, self.config.local_connect_timeout));
                }
            }
        }
    }

    fn register_msg(&self, i: usize) -> ControlMessage {
        let spec = &self.config.tunnels[i];
        let held = self.held[i].clone();
        ControlMessage::Register {
            tunnel_info: TunnelInfo {
                name: spec.name.clone(),
                protocol: "tcp".into(),
                ports: spec.remote_port.into_iter().collect(),
                public_key: None,
                allowed_ips: spec.allow.clone(),
                tunnel_id: held.as_ref().map(|h| h.tunnel_id.clone()),
                reconnect_token: held.and_then(|h| h.reconnect_token),
            },
        }
    }

    async fn activated(
        &mut self,
        i: usize,
        tunnel_id: String,
        public: String,
        reconnect_token: Option<String>,
        life: &mut Lifecycle<'_>,
    ) -> Result<(), AgentError> {
        let Ok(uuid) = uuid::Uuid::parse_str(&tunnel_id) else {
            return Err(AgentError::Protocol("bad tunnel id".into()));
        };
        let spec = &self.config.tunnels[i];
        self.locals
            .insert(*uuid.as_bytes(), (spec.local.clone(), i));
        self.held[i] = Some(Held {
            tunnel_id: tunnel_id.clone(),
            reconnect_token,
        });
        self.send(ControlMessage::RegisterConfirm {
            tunnel_id: tunnel_id.clone(),
        })
        .await?;
        self.since.insert(i, SystemTime::now());
        tracing::info!(%tunnel_id, %public, local = %spec.local, "tunnel up");
        match life.state {
            AgentState::Registered => life.to(LifecycleEvent::TunnelCreated),
            AgentState::Reconnecting => life.to(LifecycleEvent::ReconnectSuccess),
            _ => {}
        }
        let _ = life.events.send(AgentEvent::TunnelUp {
            tunnel_id,
            public,
            local: spec.local.clone(),
        });
        Ok(())
    }

    async fn heartbeats(&self, liveness: &Liveness) -> Result<(), AgentError> {
        for (i, h) in self.held.iter().enumerate() {
            let (Some(h), Some(since)) = (h, self.since.get(&i)) else {
                continue;
            };
            let (bytes_in, bytes_out) = self.traffic[i].get();
            let msg = ControlMessage::Heartbeat {
                tunnel_id: h.tunnel_id.clone(),
                stats: TunnelStats {
                    // Seen from the tunnel's public side: bytes_in came from users.
                    bytes_in: bytes_out,
                    bytes_out: bytes_in,
                    connected_since: rfc3339(*since),
                },
            };
            // A relay that stops reading must not wedge the agent: give up at the deadline.
            match tube_net::timer::timeout_at(
                Instant::from_std(liveness.deadline()),
                self.mux.send_control(&msg),
            )
            .await
            {
                Ok(Ok(())) => {}
                _ => {
                    self.mux.close();
                    return Err(AgentError::ConnectionLost("cannot send heartbeat".into()));
                }
            }
        }
        Ok(())
    }

    async fn send(&self, msg: ControlMessage) -> Result<(), AgentError> {
        let lost = || AgentError::ConnectionLost(self.mux.close_reason().to_string());
        match timeout(self.config.handshake_timeout, self.mux.send_control(&msg)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(lost()),
        }
    }
}

async fn serve_stream(
    inc: Incoming,
    local: Option<String>,
    traffic: Option<Arc<Traffic>>,
    connect_timeout: Duration,
) {
    let (Some(local), Some(traffic)) = (local, traffic) else {
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
    let end = tube_net::proxy::proxy(tcp, inc.stream, &traffic).await;
    tracing::debug!(peer = %inc.peer, ?end, "stream ended");
}
