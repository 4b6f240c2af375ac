//! The relay server (`tube relay`): agents behind NAT connect over TLS 1.3, authenticate with a
//! JWT and register tunnels; each tunnel gets a public port whose user connections are
//! multiplexed to the agent as streams.
//!
//! Layout: [`config`] (what the relay takes), [`auth`] (JWT), [`state`] (agents, tunnels,
//! counters, Prometheus text), [`store`] (leases in SQLite), [`admin`] (HTTP API), `registry`
//! (public ports), `session` (one agent connection), `tunnel` (one public listener). The wire
//! protocol is in `docs/protocols/relay.md`.

pub mod admin;
pub mod auth;
pub mod config;
mod registry;
mod session;
pub mod state;
pub mod store;
mod tunnel;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tube_net::tokio_rustls::TlsAcceptor;
use tube_proto::ratelimit::KeyedLimiter;
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
}

/// Keys a limiter tracks at most (beyond that, new keys are refused until old ones refill).
const MAX_LIMITER_KEYS: usize = 100_000;

/// The rate limiters of seed 001 section 5.2.
#[derive(Debug)]
pub(crate) struct Limits {
    pub(crate) auth_ip: KeyedLimiter<std::net::IpAddr>,
    pub(crate) auth_subject: KeyedLimiter<String>,
    pub(crate) tunnel_subject: KeyedLimiter<String>,
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
        };
        Ok(Self {
            shared: Arc::new(Shared {
                fingerprint: config.identity.fingerprint().to_string(),
                config,
                state,
                limits: Mutex::new(limits),
                store,
            }),
        })
    }

    /// The live state (agents, tunnels, counters).
    pub fn state(&self) -> Arc<RelayState> {
        self.shared.state.clone()
    }

    /// Serves agents on `listener` until `shutdown` is cancelled, then tells every agent,
    /// closes every tunnel (keeping leases so agents get their ports back after a restart)
    /// and waits, up to the configured grace, for sessions to end.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), RelayError> {
        let shared = self.shared;
        let acceptor = TlsAcceptor::from(shared.config.identity.server_config()?);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(
            shared.config.max_handshakes.max(1),
        ));
        let tracker = TaskTracker::new();
        tracker.spawn(sweep_leases(shared.clone(), shutdown.clone()));
        while let Some((tcp, peer)) = tube_net::accept(&listener, &shutdown, "control").await {
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "too many handshakes in progress, closing");
                drop(tcp);
                continue;
            };
            tracker.spawn(session::serve(
                tcp,
                peer,
                shared.clone(),
                acceptor.clone(),
                shutdown.clone(),
                permit,
            ));
        }
        shared.state.set_ready(false);
        drop(listener);
        tracker.close();
        if tokio::time::timeout(shared.config.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("sessions still running after the shutdown grace period");
        }
        tracing::info!("relay stopped");
        Ok(())
    }
}

/// Serves agents on `listener` with `config` until `shutdown` (see [`Relay::run`]).
pub async fn run(
    listener: TcpListener,
    config: RelayConfig,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    Relay::new(config)?.run(listener, shutdown).await
}

/// Drops leases whose grace period has passed, and prunes idle rate-limiter keys.
async fn sweep_leases(shared: Arc<Shared>, shutdown: CancellationToken) {
    let every =
        (shared.config.lease_grace / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut tick = tokio::time::interval(every);
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
    }
}
