//! The relay server (`tube relay`): agents behind NAT connect over TLS 1.3, authenticate with a
//! JWT and register tunnels; each tunnel gets a public port whose user connections are
//! multiplexed to the agent as streams.
//!
//! Layout: [`config`] (what the relay takes), [`auth`] (JWT), [`state`] (agents, tunnels,
//! counters, Prometheus text), [`store`] (leases in SQLite), [`admin`] (HTTP API), `registry`
//! (public ports), `session` (one agent connection), `tunnel` (one public listener). The wire
//! protocol is in `docs/protocols/relay.md`.
//!
//! With [`RelayConfig::threads`] set (as `tube relay` sets it), each accepted agent connection
//! is served on one of that many single-threaded runtimes (`tube_net::shards`), and everything
//! it starts (its tunnels' listeners, their users' proxies, the mux's tasks) stays there; the
//! accept loop, lease sweeps and the admin API stay on the caller's runtime.

pub mod admin;
pub mod auth;
pub mod config;
mod registry;
mod session;
pub mod state;
pub mod store;
mod tunnel;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tube_net::shards::Shards;
use tube_proto::ratelimit::KeyedLimiter;
pub(crate) use tube_proto::ratelimit::source_key;
use uuid::Uuid;

pub use auth::JwtSecret;
pub use config::RelayConfig;
pub use registry::AllocError;
pub use session::rfc3339;
pub use state::RelayState;

use state::{Tunnel, TunnelCounters, TunnelState, lock, unix_in, unix_now};
use store::{Lease, LeaseStore, MemoryStore, SqliteStore};

/// Errors that stop the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] tube_net::TlsError),
    /// The lease store could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The threads that serve agent connections could not be started.
    #[error("cannot start the relay's threads: {0}")]
    Threads(std::io::Error),
}

/// How long a stopping relay waits for sessions to close after their drain (sending 5001,
/// TLS close_notify, saving leases).
pub const SESSION_CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Keys a limiter tracks at most (beyond that, new keys are refused until old ones refill).
const MAX_LIMITER_KEYS: usize = 100_000;

/// The rate limiters of seed 001 section 5.2.
#[derive(Debug)]
pub(crate) struct Limits {
    pub(crate) auth_ip: KeyedLimiter<std::net::IpAddr>,
    pub(crate) auth_subject: KeyedLimiter<String>,
    pub(crate) tunnel_subject: KeyedLimiter<String>,
    /// Keyed by [`source_key`] of the agent's address, like the handshake cap.
    pub(crate) tunnel_ip: KeyedLimiter<std::net::IpAddr>,
}

/// State shared by all sessions.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: RelayConfig,
    pub(crate) state: Arc<RelayState>,
    pub(crate) limits: Mutex<Limits>,
    pub(crate) store: Arc<dyn LeaseStore>,
    pub(crate) fingerprint: String,
}

impl Shared {
    /// Writes a lease (off the async threads); a failure is logged and the relay goes on
    /// from memory.
    pub(crate) async fn store_put(&self, lease: Lease) {
        let r = if self.store.blocks() {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.put(&lease))
                .await
                .unwrap_or(Ok(()))
        } else {
            self.store.put(&lease)
        };
        if let Err(e) = r {
            tracing::error!(error = %e, "cannot save lease");
        }
    }

    /// Deletes a lease (off the async threads).
    pub(crate) async fn store_remove(&self, tunnel_id: String) {
        let r = if self.store.blocks() {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.remove(&tunnel_id))
                .await
                .unwrap_or(Ok(()))
        } else {
            self.store.remove(&tunnel_id)
        };
        if let Err(e) = r {
            tracing::error!(error = %e, "cannot delete lease");
        }
    }
}

/// A relay, built from its config; [`Relay::state`] gives the admin API and tests a view.
#[derive(Debug)]
pub struct Relay {
    shared: Arc<Shared>,
    /// The threads agents are served on ([`RelayConfig::threads`]), started here so that a
    /// relay is whole before `run`; `None`: the caller's runtime.
    shards: Option<Shards>,
}

impl Relay {
    /// Opens the lease store and restores leases from an earlier run: each becomes a tunnel
    /// waiting for its agent, with a fresh grace period from now.
    pub fn new(config: RelayConfig) -> Result<Self, RelayError> {
        let store: Arc<dyn LeaseStore> = match &config.data_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| store::StoreError::from_io(dir, e))?;
                Arc::new(SqliteStore::open(&dir.join(store::LEASE_DB))?)
            }
            None => Arc::new(MemoryStore::default()),
        };
        let state = Arc::new(RelayState::default());
        let expires_at = unix_in(config.lease_grace);
        for lease in store.load()? {
            let Ok(id) = Uuid::parse_str(&lease.tunnel_id) else {
                continue;
            };
            lock(&state.ports).insert(lease.port, id);
            lock(&state.tunnels).insert(
                id,
                Tunnel {
                    id,
                    subject: lease.subject,
                    name: lease.name,
                    port: lease.port,
                    endpoint: lease.endpoint,
                    allowed: lease
                        .allowed_ips
                        .iter()
                        .filter_map(|c| c.parse().ok())
                        .collect(),
                    token_hash: lease.token_hash,
                    state: TunnelState::Reconnecting { expires_at },
                    counters: Arc::new(TunnelCounters::default()),
                    active_since: std::time::SystemTime::now(),
                },
            );
        }
        // Ready from here: the caller has bound (or is about to bind) the control listener,
        // whose backlog holds agents until `run` accepts them.
        state.set_ready(true);
        let restored = lock(&state.tunnels).len();
        if restored > 0 {
            tracing::info!(
                leases = restored,
                "restored tunnel leases, waiting for their agents"
            );
        }
        let limits = Limits {
            auth_ip: KeyedLimiter::new(config.auth_limit_per_ip, MAX_LIMITER_KEYS),
            auth_subject: KeyedLimiter::new(config.auth_limit_per_subject, MAX_LIMITER_KEYS),
            tunnel_subject: KeyedLimiter::new(config.tunnel_limit_per_subject, MAX_LIMITER_KEYS),
            tunnel_ip: KeyedLimiter::new(config.tunnel_limit_per_ip, MAX_LIMITER_KEYS),
        };
        let shards = match config.threads {
            0 => None,
            n => Some(Shards::start(n, "tube-relay").map_err(RelayError::Threads)?),
        };
        Ok(Self {
            shared: Arc::new(Shared {
                fingerprint: config.identity.fingerprint().to_string(),
                config,
                state,
                limits: Mutex::new(limits),
                store,
            }),
            shards,
        })
    }

    /// The live state (agents, tunnels, counters).
    pub fn state(&self) -> Arc<RelayState> {
        self.shared.state.clone()
    }

    /// Serves agents on `listener` until `shutdown` is cancelled. Then it drains: the control
    /// listener and every public port close at once, user connections already proxied go on
    /// until they end or [`RelayConfig::shutdown_grace`] runs out; then each agent gets `error`
    /// 5001 and its session closes (keeping leases so agents get their ports back after a
    /// restart). Sessions get [`SESSION_CLOSE_TIMEOUT`] beyond the grace to finish closing.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), RelayError> {
        let Self { shared, shards } = self;
        let mut tls = (*shared.config.identity.server_config()?).clone();
        // Agents never resume a session, so no tickets are sent.
        tls.send_tls13_tickets = 0;
        let tls = Arc::new(tls);
        let slots = HandshakeSlots::new(
            shared.config.max_handshakes,
            shared.config.max_handshakes_per_ip,
        );
        let mut refusals = RefusalLog::default();
        let tracker = TaskTracker::new();
        tracker.spawn(sweep_leases(shared.clone(), shutdown.clone()));
        while let Some((tcp, peer)) = tube_net::accept(&listener, &shutdown, "control").await {
            let permit = match slots.try_acquire(peer.ip()) {
                Ok(p) => p,
                Err(full) => {
                    // Closed before TLS: a flood costs one accept and one close per connection.
                    refusals.note(peer, full);
                    drop(tcp);
                    continue;
                }
            };
            let (shared, tls, shutdown) = (shared.clone(), tls.clone(), shutdown.clone());
            let serve = move |tcp| session::serve(tcp, peer, shared, tls, shutdown, permit);
            match &shards {
                Some(shards) => shards.spawn(&tracker, tcp, serve),
                None => drop(tracker.spawn(serve(tcp))),
            }
        }
        shared.state.set_ready(false);
        drop(listener);
        tracker.close();
        let wait = shared.config.shutdown_grace + SESSION_CLOSE_TIMEOUT;
        if tube_net::timer::timeout(wait, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("sessions still running after the shutdown grace period");
        }
        if let Some(shards) = shards {
            shards.stop().await;
        }
        tracing::info!("relay stopped");
        Ok(())
    }
}

/// Binds a control listener on `addr` as `tube relay` does: a listen backlog of 1024, since
/// the 128 that `TcpListener::bind` (std's and tokio's) asks for overflows under a burst of
/// connections and the kernel then drops connection attempts, so an agent arriving during a
/// flood would wait for a SYN retransmit (1 s and more); SO_REUSEADDR on Unix.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    registry::bind(addr.ip(), addr.port())
}

/// Serves agents on `listener` with `config` until `shutdown` (see [`Relay::run`]).
pub async fn run(
    listener: TcpListener,
    config: RelayConfig,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    Relay::new(config)?.run(listener, shutdown).await
}

/// Handshake slots: at most `max` connections in the handshake at once, and at most `per_ip`
/// of them from one source (see [`source_key`]). The per-source map holds only sources with a
/// handshake in progress, so it never has more than `max` entries.
#[derive(Debug)]
struct HandshakeSlots {
    global: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_ip: usize,
}

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotsFull {
    Global,
    PerIp,
}

/// One connection's handshake slot, given back (globally and for its source) when dropped.
#[derive(Debug)]
pub(crate) struct HandshakeSlot {
    _global: OwnedSemaphorePermit,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    key: IpAddr,
}

impl HandshakeSlots {
    /// Caps of 0 count as 1.
    fn new(max: usize, max_per_ip: usize) -> Self {
        Self {
            global: Arc::new(Semaphore::new(max.max(1))),
            per_ip: Arc::default(),
            max_per_ip: max_per_ip.max(1),
        }
    }

    fn try_acquire(&self, ip: IpAddr) -> Result<HandshakeSlot, SlotsFull> {
        let global = self
            .global
            .clone()
            .try_acquire_owned()
            .map_err(|_| SlotsFull::Global)?;
        let key = source_key(ip);
        let mut per_ip = lock(&self.per_ip);
        let n = per_ip.entry(key).or_default();
        if *n >= self.max_per_ip {
            // `n` is at least 1 here (the cap is), so no empty entry is left behind.
            return Err(SlotsFull::PerIp);
        }
        *n += 1;
        drop(per_ip);
        Ok(HandshakeSlot {
            _global: global,
            per_ip: self.per_ip.clone(),
            key,
        })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut per_ip = lock(&self.per_ip);
        if let Some(n) = per_ip.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_ip.remove(&self.key);
            }
        }
    }
}

/// Logs refused connections at most once a second, with the number left out since the last
/// line, so a flood does not become a flood of log lines.
#[derive(Debug, Default)]
struct RefusalLog {
    last: Option<tokio::time::Instant>,
    unlogged: u64,
}

impl RefusalLog {
    fn note(&mut self, peer: SocketAddr, full: SlotsFull) {
        let now = tokio::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.unlogged += 1;
            return;
        }
        let limit = match full {
            SlotsFull::Global => "max_handshakes",
            SlotsFull::PerIp => "max_handshakes_per_ip",
        };
        tracing::warn!(%peer, limit, also_refused = self.unlogged, "too many handshakes in progress, closing");
        self.last = Some(now);
        self.unlogged = 0;
    }
}

/// Drops leases whose grace period has passed, and prunes idle rate-limiter keys.
async fn sweep_leases(shared: Arc<Shared>, shutdown: CancellationToken) {
    let every =
        (shared.config.lease_grace / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut tick = tube_net::timer::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = unix_now();
        let expired: Vec<Uuid> = {
            let mut tunnels = lock(&shared.state.tunnels);
            let mut ports = lock(&shared.state.ports);
            let gone: Vec<Uuid> = tunnels
                .values()
                .filter(|t| matches!(t.state, TunnelState::Reconnecting { expires_at } if expires_at <= now))
                .map(|t| t.id)
                .collect();
            for id in &gone {
                if let Some(t) = tunnels.remove(id) {
                    ports.remove(&t.port);
                }
            }
            gone
        };
        if !expired.is_empty() {
            shared.state.changed();
        }
        for id in expired {
            tracing::info!(tunnel_id = %id, "lease expired, tunnel removed");
            shared.store_remove(id.to_string()).await;
        }
        let now = tokio::time::Instant::now().into_std();
        let mut l = lock(&shared.limits);
        l.auth_ip.prune(now);
        l.auth_subject.prune(now);
        l.tunnel_subject.prune(now);
        l.tunnel_ip.prune(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_source_cap_refuses_only_that_source_and_forgets_it_at_zero() {
        let slots = HandshakeSlots::new(10, 2);
        let a1 = slots.try_acquire(ip("127.0.0.2")).unwrap();
        let a2 = slots.try_acquire(ip("127.0.0.2")).unwrap();
        assert_eq!(
            slots.try_acquire(ip("127.0.0.2")).err(),
            Some(SlotsFull::PerIp)
        );
        let b = slots.try_acquire(ip("127.0.0.3")).unwrap();
        // A refusal gives its global slot back: 3 held, 7 free.
        assert_eq!(slots.global.available_permits(), 7);
        drop(a1);
        let a3 = slots.try_acquire(ip("127.0.0.2")).unwrap();
        drop((a2, a3, b));
        assert!(
            lock(&slots.per_ip).is_empty(),
            "no entry outlives its slots"
        );
        assert_eq!(slots.global.available_permits(), 10);
    }

    #[test]
    fn global_cap_applies_across_sources() {
        let slots = HandshakeSlots::new(2, 2);
        let _a = slots.try_acquire(ip("10.0.0.1")).unwrap();
        let _b = slots.try_acquire(ip("10.0.0.2")).unwrap();
        assert_eq!(
            slots.try_acquire(ip("10.0.0.3")).err(),
            Some(SlotsFull::Global)
        );
        assert_eq!(lock(&slots.per_ip).len(), 2);
    }

    #[test]
    fn sources_are_ipv4_addresses_or_ipv6_slash_64s() {
        let slots = HandshakeSlots::new(10, 1);
        let _a = slots.try_acquire(ip("2001:db8::1")).unwrap();
        assert_eq!(
            slots.try_acquire(ip("2001:db8::2")).err(),
            Some(SlotsFull::PerIp)
        );
    }
}
