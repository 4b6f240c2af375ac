//! One agent connection: TLS, greeting, auth under a deadline and rate limits
//! ([`handshake`]), then the control loop over the running mux (register, confirm, heartbeat,
//! disconnect) until the agent leaves, goes silent, or the relay stops. On the way out the
//! agent's tunnels are either removed (the agent said goodbye) or kept as leases for a
//! reconnect. Registration and taking tunnels back live in [`register`].

mod handshake;
mod register;

pub(crate) use handshake::serve;
use handshake::set_agent;
use register::lease_of;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tube_net::codec::{ControlError, HandshakeConn, handshake_conn, recv_control, send_control};
use tube_net::mux::DEFAULT_WINDOW;
use tube_net::timer::timeout_at;
use tube_net::tokio_rustls::rustls::ServerConfig;
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

struct Session {
    id: u64,
    subject: String,
    shared: Arc<Shared>,
    public_host: String,
    public_ip: IpAddr,
    /// The agent's source for per-IP limits ([`crate::source_key`] of its address).
    source: IpAddr,
    /// Cancelled when this agent's connection ends: stops its listeners and user connections.
    token: CancellationToken,
    /// A child of `token`, cancelled alone when the relay starts to stop: the public listeners
    /// close while the user connections already proxied go on.
    listening: CancellationToken,
    /// Owns the mux tasks and accept loops of this agent.
    tracker: TaskTracker,
    /// Owns the proxied user connections of this agent (waited for by a draining relay).
    users: TaskTracker,
    /// Set when the relay starts to stop: new tunnels are refused.
    draining: bool,
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
        T: tube_net::Transport,
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
        // Set when the relay starts to stop: until then open user connections may finish.
        let mut drain_until: Option<Instant> = None;
        let users = self.users.clone();
        loop {
            // Biased: messages the agent sent before its connection closed (its goodbye) are
            // handled before the close itself.
            let msg = tokio::select! {
                biased;
                _ = shutdown.cancelled(), if drain_until.is_none() => {
                    drain_until = Some(self.start_draining());
                    continue;
                }
                _ = users.wait(), if drain_until.is_some() => {
                    self.send_error_close(&mux, shutting_down());
                    break;
                }
                _ = tube_net::timer::sleep_until(drain_until.unwrap_or_else(Instant::now)), if drain_until.is_some() => {
                    tracing::warn!(open_users = self.users.len(), "user connections still open after the shutdown grace, resetting them");
                    self.send_error_close(&mux, shutting_down());
                    break;
                }
                m = events.control.recv() => m,
                _ = self.token.cancelled() => break,
                _ = tube_net::timer::sleep_until(Instant::from_std(liveness.deadline())) => {
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
                // An agent that stops reading blocks this send: its liveness deadline still
                // ends the session (nothing it sends is read meanwhile).
                let send = mux.send_control(&reply);
                tokio::pin!(send);
                let sent = loop {
                    tokio::select! {
                        r = &mut send => break r.is_ok(),
                        _ = self.token.cancelled() => break false,
                        _ = shutdown.cancelled() => break false,
                        _ = tube_net::timer::sleep_until(Instant::from_std(liveness.deadline())) => {
                            if liveness.is_dead(Instant::now().into_std()) {
                                tracing::warn!("agent stopped reading, dropping it");
                                self.shared.state.counters.heartbeat_timeouts.fetch_add(1, Ordering::Relaxed);
                                break false;
                            }
                        }
                    }
                };
                if !sent {
                    break;
                }
            }
        }
        // A goodbye the agent sent before its connection closed counts however the loop ended:
        // a stopping agent sends a last heartbeat, its goodbye and its close together, and the
        // close can end the loop while the heartbeat's answer is still being sent.
        while !goodbye && let Ok(msg) = events.control.try_recv() {
            if let ControlMessage::Disconnect { reason } = msg {
                tracing::info!(%reason, "agent disconnected");
                goodbye = true;
            }
        }
        // Stop every listener and user connection of this agent before touching its tunnels.
        self.token.cancel();
        self.pending.clear();
        self.tracker.close();
        self.users.close();
        self.tracker.wait().await;
        self.users.wait().await;
        self.release(goodbye).await;
        tracing::info!(reason = %mux.close_reason(), goodbye, "agent session ended");
    }

    /// The relay is stopping: close this agent's public listeners at once (new users are
    /// refused by the kernel), refuse new tunnels, and let the user connections already
    /// proxied go on until they end or the shutdown grace runs out. Returns that deadline.
    fn start_draining(&mut self) -> Instant {
        let grace = self.shared.config.shutdown_grace;
        self.draining = true;
        self.listening.cancel();
        self.pending.clear();
        self.users.close();
        tracing::info!(
            open_users = self.users.len(),
            grace_ms = grace.as_millis() as u64,
            "relay stopping: public ports closed, letting open user connections finish"
        );
        Instant::now() + grace
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
            self.listening.clone(),
            self.users.clone(),
        ));
        None
    }
}

pub use tube_proto::time::rfc3339;

/// The `error` a stopping relay closes each agent connection with.
fn shutting_down() -> ControlMessage {
    ControlMessage::error(
        ErrorCode::ShuttingDown,
        "relay is shutting down",
        Some("shutdown"),
    )
}
