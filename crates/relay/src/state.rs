//! The relay's live state: agent sessions, tunnels (active or held for a reconnecting agent),
//! port reservations and counters. The admin API, metrics and tests read it; sessions change it.
//!
//! Every change bumps a version on a `watch` channel, so tests and waiters synchronise on
//! events ([`RelayState::wait_until`]) instead of sleeping.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tube_net::proxy::Traffic;
use tube_proto::ErrorCode;
use tube_proto::cidr::Cidr;
use tube_proto::lifecycle::AgentState;
use uuid::Uuid;

use crate::session::rfc3339;

/// Counters of one tunnel (they survive its agent reconnecting).
#[derive(Debug, Default)]
pub struct TunnelCounters {
    /// Bytes in each direction (users to agent: `socket_to_stream`).
    pub traffic: Traffic,
    /// User connections accepted.
    pub connections: AtomicU64,
    /// User connections open now.
    pub active: AtomicI64,
    /// User connections refused by the allow-list.
    pub denied: AtomicU64,
}

/// Whether a tunnel is serving or waiting for its agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelState {
    /// Registered, port bound, waiting for `register_confirm`.
    Pending {
        /// Owning session.
        session: u64,
    },
    /// Accepting users for `session`.
    Active {
        /// Owning session.
        session: u64,
    },
    /// The agent's connection was lost; the port is reserved until `expires_at` (unix secs).
    Reconnecting {
        /// When the lease lapses.
        expires_at: u64,
    },
}

/// One tunnel.
#[derive(Debug, Clone)]
pub struct Tunnel {
    /// Id.
    pub id: Uuid,
    /// Owner (JWT subject).
    pub subject: String,
    /// Name from the registration.
    pub name: String,
    /// Public port.
    pub port: u16,
    /// Public endpoint string.
    pub endpoint: String,
    /// Effective allow-list (empty: everyone).
    pub allowed: Vec<Cidr>,
    /// SHA-256 of the current reconnect token.
    pub token_hash: [u8; 32],
    /// State.
    pub state: TunnelState,
    /// Counters.
    pub counters: Arc<TunnelCounters>,
    /// When it last became active.
    pub active_since: SystemTime,
}

/// One agent connection.
#[derive(Debug, Clone)]
pub struct Agent {
    /// Session id.
    pub session: u64,
    /// JWT subject (empty until authenticated).
    pub subject: String,
    /// Remote address.
    pub peer: SocketAddr,
    /// Lifecycle state as the relay sees it.
    pub state: AgentState,
    /// When the connection was accepted.
    pub connected_since: SystemTime,
    /// Cancels the session (used when the same agent takes its tunnels over from a half-open
    /// connection).
    pub cancel: CancellationToken,
}

/// Relay-wide counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Error messages sent, by code.
    pub errors: Mutex<BTreeMap<u16, u64>>,
    /// Failed authentications (codes 1001-1003).
    pub auth_failures: AtomicU64,
    /// Rate-limit refusals, by limit name.
    pub rate_limited: Mutex<BTreeMap<&'static str, u64>>,
    /// Agents dropped at their liveness deadline (silent, or not reading their answers).
    pub heartbeat_timeouts: AtomicU64,
}

/// Shared state of one relay instance.
#[derive(Debug)]
pub struct RelayState {
    pub(crate) agents: Mutex<HashMap<u64, Agent>>,
    pub(crate) tunnels: Mutex<HashMap<Uuid, Tunnel>>,
    /// Public ports reserved by tunnels (active or reconnecting).
    pub(crate) ports: Mutex<HashMap<u16, Uuid>>,
    /// Counters.
    pub counters: Counters,
    version: watch::Sender<u64>,
    ready: std::sync::atomic::AtomicBool,
}

impl Default for RelayState {
    fn default() -> Self {
        Self {
            agents: Mutex::default(),
            tunnels: Mutex::default(),
            ports: Mutex::default(),
            counters: Counters::default(),
            version: watch::channel(0).0,
            ready: false.into(),
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain maps and counters stay consistent even if a holder panicked.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A JSON view of one agent for the admin API.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AgentView {
    /// Session id (0 for an agent known only by tunnels waiting for it).
    pub session: u64,
    /// JWT subject.
    pub subject: String,
    /// Remote address, if connected.
    pub peer: Option<String>,
    /// Lifecycle state (`authenticating`, `registered`, `active`, `reconnecting`).
    pub state: String,
    /// RFC 3339.
    pub connected_since: Option<String>,
    /// Seconds connected.
    pub connected_seconds: u64,
}

/// A JSON view of one tunnel for the admin API.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TunnelView {
    /// Tunnel id.
    pub tunnel_id: String,
    /// Owner.
    pub subject: String,
    /// Name.
    pub name: String,
    /// Public endpoint.
    pub endpoint: String,
    /// Public port.
    pub port: u16,
    /// `pending`, `active` or `reconnecting`.
    pub state: String,
    /// Allow-list.
    pub allowed_ips: Vec<String>,
    /// Bytes from users.
    pub bytes_in: u64,
    /// Bytes to users.
    pub bytes_out: u64,
    /// User connections accepted.
    pub connections: u64,
    /// User connections open now.
    pub active_connections: i64,
    /// User connections refused by the allow-list.
    pub denied_connections: u64,
    /// When the lease lapses, for a reconnecting tunnel (unix seconds).
    pub lease_expires_at: Option<u64>,
}

impl RelayState {
    /// Marks a change for waiters.
    pub(crate) fn changed(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Waits until `pred` holds (checked now and after every change).
    pub async fn wait_until(&self, mut pred: impl FnMut(&RelayState) -> bool) {
        let mut rx = self.version.subscribe();
        loop {
            if pred(self) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Whether the relay is accepting agents.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        self.changed();
    }

    /// Counts an error message sent to an agent.
    pub(crate) fn count_error(&self, code: u16) {
        *lock(&self.counters.errors).entry(code).or_default() += 1;
        if (1001..=1003).contains(&code) {
            self.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a rate-limit refusal.
    /// (The error message itself is counted where it is sent.)
    pub(crate) fn count_rate_limited(&self, limit: &'static str) {
        *lock(&self.counters.rate_limited).entry(limit).or_default() += 1;
    }

    /// Agents: live sessions, plus owners of tunnels waiting for a reconnect.
    pub fn agents(&self) -> Vec<AgentView> {
        let now = SystemTime::now();
        let mut out: Vec<AgentView> = lock(&self.agents)
            .values()
            .map(|a| AgentView {
                session: a.session,
                subject: a.subject.clone(),
                peer: Some(a.peer.to_string()),
                state: a.state.name().into(),
                connected_since: Some(rfc3339(a.connected_since)),
                connected_seconds: now
                    .duration_since(a.connected_since)
                    .unwrap_or_default()
                    .as_secs(),
            })
            .collect();
        let live: Vec<String> = out.iter().map(|a| a.subject.clone()).collect();
        let mut waiting: Vec<String> = lock(&self.tunnels)
            .values()
            .filter(|t| matches!(t.state, TunnelState::Reconnecting { .. }))
            .map(|t| t.subject.clone())
            .filter(|s| !live.contains(s))
            .collect();
        waiting.sort();
        waiting.dedup();
        out.extend(waiting.into_iter().map(|subject| AgentView {
            session: 0,
            subject,
            peer: None,
            state: AgentState::Reconnecting.name().into(),
            connected_since: None,
            connected_seconds: 0,
        }));
        out.sort_by(|a, b| (a.session, &a.subject).cmp(&(b.session, &b.subject)));
        out
    }

    /// Tunnels with their counters.
    pub fn tunnels(&self) -> Vec<TunnelView> {
        let mut out: Vec<TunnelView> = lock(&self.tunnels)
            .values()
            .map(|t| {
                let (bytes_in, bytes_out) = t.counters.traffic.get();
                let (state, expires) = match &t.state {
                    TunnelState::Pending { .. } => ("pending", None),
                    TunnelState::Active { .. } => ("active", None),
                    TunnelState::Reconnecting { expires_at } => ("reconnecting", Some(*expires_at)),
                };
                TunnelView {
                    tunnel_id: t.id.to_string(),
                    subject: t.subject.clone(),
                    name: t.name.clone(),
                    endpoint: t.endpoint.clone(),
                    port: t.port,
                    state: state.into(),
                    allowed_ips: t.allowed.iter().map(|c| c.to_string()).collect(),
                    bytes_in,
                    bytes_out,
                    connections: t.counters.connections.load(Ordering::Relaxed),
                    active_connections: t.counters.active.load(Ordering::Relaxed),
                    denied_connections: t.counters.denied.load(Ordering::Relaxed),
                    lease_expires_at: expires,
                }
            })
            .collect();
        out.sort_by_key(|t| t.port);
        out
    }

    /// The tunnel with this public port, if any.
    pub fn tunnel_by_port(&self, port: u16) -> Option<TunnelView> {
        self.tunnels().into_iter().find(|t| t.port == port)
    }

    /// Prometheus text exposition of every metric.
    pub fn render_metrics(&self) -> String {
        let mut o = String::new();
        let agents = self.agents();
        let tunnels = self.tunnels();
        let gauge = |o: &mut String, name: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
        };
        gauge(&mut o, "tube_relay_agents", "Agents by lifecycle state.");
        for st in AgentState::ALL {
            let n = agents.iter().filter(|a| a.state == st.name()).count();
            let _ = writeln!(o, "tube_relay_agents{{state=\"{}\"}} {n}", st.name());
        }
        gauge(&mut o, "tube_relay_tunnels", "Tunnels by state.");
        for st in ["pending", "active", "reconnecting"] {
            let n = tunnels.iter().filter(|t| t.state == st).count();
            let _ = writeln!(o, "tube_relay_tunnels{{state=\"{st}\"}} {n}");
        }
        gauge(
            &mut o,
            "tube_relay_active_tunnels",
            "Tunnels accepting users.",
        );
        let _ = writeln!(
            o,
            "tube_relay_active_tunnels {}",
            tunnels.iter().filter(|t| t.state == "active").count()
        );
        gauge(
            &mut o,
            "tube_relay_user_connections",
            "User connections open now.",
        );
        let open: i64 = tunnels.iter().map(|t| t.active_connections).sum();
        let _ = writeln!(o, "tube_relay_user_connections {open}");
        gauge(
            &mut o,
            "tube_relay_agent_connection_seconds",
            "Seconds each agent has been connected.",
        );
        for a in agents.iter().filter(|a| a.session != 0) {
            let _ = writeln!(
                o,
                "tube_relay_agent_connection_seconds{{session=\"{}\",subject=\"{}\"}} {}",
                a.session,
                escape(&a.subject),
                a.connected_seconds
            );
        }
        let counter = |o: &mut String, name: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
        };
        counter(
            &mut o,
            "tube_relay_bytes_total",
            "Bytes carried per tunnel and direction.",
        );
        for t in &tunnels {
            for (dir, v) in [("in", t.bytes_in), ("out", t.bytes_out)] {
                let _ = writeln!(
                    o,
                    "tube_relay_bytes_total{{tunnel_id=\"{}\",direction=\"{dir}\"}} {v}",
                    t.tunnel_id
                );
            }
        }
        counter(
            &mut o,
            "tube_relay_user_connections_total",
            "User connections accepted per tunnel.",
        );
        for t in &tunnels {
            let _ = writeln!(
                o,
                "tube_relay_user_connections_total{{tunnel_id=\"{}\"}} {}",
                t.tunnel_id, t.connections
            );
        }
        counter(
            &mut o,
            "tube_relay_denied_connections_total",
            "User connections refused by a tunnel's allow-list.",
        );
        for t in &tunnels {
            let _ = writeln!(
                o,
                "tube_relay_denied_connections_total{{tunnel_id=\"{}\"}} {}",
                t.tunnel_id, t.denied_connections
            );
        }
        counter(
            &mut o,
            "tube_relay_errors_total",
            "Error messages sent to agents, by code.",
        );
        for (code, n) in lock(&self.counters.errors).iter() {
            let name = ErrorCode::from_u16(*code)
                .map(|c| c.name())
                .unwrap_or("UNKNOWN");
            let _ = writeln!(
                o,
                "tube_relay_errors_total{{code=\"{code}\",name=\"{name}\"}} {n}"
            );
        }
        counter(
            &mut o,
            "tube_relay_auth_failures_total",
            "Failed agent authentications.",
        );
        let _ = writeln!(
            o,
            "tube_relay_auth_failures_total {}",
            self.counters.auth_failures.load(Ordering::Relaxed)
        );
        counter(
            &mut o,
            "tube_relay_rate_limited_total",
            "Requests refused by a rate limit.",
        );
        for (limit, n) in lock(&self.counters.rate_limited).iter() {
            let _ = writeln!(o, "tube_relay_rate_limited_total{{limit=\"{limit}\"}} {n}");
        }
        counter(
            &mut o,
            "tube_relay_heartbeat_timeouts_total",
            "Agents dropped at their liveness deadline (silent, or not reading).",
        );
        let _ = writeln!(
            o,
            "tube_relay_heartbeat_timeouts_total {}",
            self.counters.heartbeat_timeouts.load(Ordering::Relaxed)
        );
        o
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Unix seconds now.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `now + d` in unix seconds.
pub(crate) fn unix_in(d: Duration) -> u64 {
    unix_now().saturating_add(d.as_secs())
}
