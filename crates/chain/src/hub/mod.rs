//! The hub (`tube hub`, the seed's "main server"): nodes connect over TLS 1.3, register or log
//! in with their one-time password, ask for chains to other nodes, and the hub asks the
//! endpoint, picks intermediates ([`crate::plan`]) and drives each build
//! ([`crate::build::Build`]) by sending `make_tube` to one node after the other
//! (`docs/protocols/chain.md` sections 2 to 7).
//!
//! Layout: this module (config, [`Hub`], the accept loop, the timer task, shutdown),
//! `session` (one node connection: TLS, login, reader and writer), `state` (nodes and chains
//! under one mutex, synchronous). Accounts live behind [`crate::AccountStore`].

pub mod admin;
mod session;
mod state;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tube_net::tokio_rustls::TlsAcceptor;
use tube_proto::chain::{
    DEFAULT_APPROVAL_TIMEOUT, DEFAULT_HOP_BUILD_TIMEOUT, DEFAULT_MAX_CHAINS_PER_NODE,
    DEFAULT_MAX_PENDING_APPROVALS,
};

use crate::AccountStore;

pub use state::ChainInfo;
use state::State;

/// Default limit of logged-in nodes.
pub const DEFAULT_MAX_NODES: usize = 1024;

/// Default limit of logged-in nodes from one source (IPv4 address or IPv6 /64): several nodes
/// behind one NAT are normal, a sixteenth of all slots is not.
pub const DEFAULT_MAX_NODES_PER_SOURCE: usize = 64;

/// Default `register`s per source (IPv4 address or IPv6 /64) per hour: accounts are free to
/// make, so one address may not make them without end (each is a row on disk, and throwaway
/// accounts could hold every node slot).
pub const DEFAULT_REGISTRATIONS_PER_HOUR: u32 = 10;

/// Default limit of accounts the hub keeps (a row of about 200 bytes each on disk); at the
/// limit an account unseen for [`DEFAULT_EVICT_UNSEEN_AFTER`] gives way to a new one, or the
/// registration gets 6008 (see [`crate::Room`]).
pub const DEFAULT_MAX_ACCOUNTS: usize = 100_000;

/// Default time an account stays unseen (its node neither logged in nor connected) before it
/// may give way to a new one at [`DEFAULT_MAX_ACCOUNTS`].
pub const DEFAULT_EVICT_UNSEEN_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

/// Sources the registration limit tracks at most (see [`tube_proto::ratelimit::KeyedLimiter`]).
const MAX_REGISTRATION_SOURCES: usize = 65_536;

/// Default limit of connections in the login phase (TLS and first message) at once.
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;

/// Default time from TCP accept to the first message (chain.md section 2).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default time sessions get to finish after shutdown, before the hub stops waiting.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Messages queued for one node before it counts as too slow (its session is then ended).
pub(crate) const OUTBOX: usize = 256;

/// What the hub takes.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The TLS certificate and key the hub presents; nodes pin its fingerprint.
    pub identity: tube_net::Identity,
    /// Node accounts and their rotating passwords.
    pub accounts: Arc<dyn AccountStore>,
    /// Intermediates per chain (fewer when fewer qualify).
    pub intermediates: usize,
    /// Chains one node may take part in at once, in any role.
    pub max_chains_per_node: usize,
    /// `request_connection`s waiting for one endpoint's answer at once.
    pub max_pending_approvals: usize,
    /// Time the endpoint has to answer `request_connection`.
    pub approval_timeout: Duration,
    /// Time each node has to answer its `make_tube`.
    pub hop_timeout: Duration,
    /// Time from TCP accept to the first message (TLS included).
    pub handshake_timeout: Duration,
    /// Connections in the login phase at once; more are closed before TLS.
    pub max_handshakes: usize,
    /// Logged-in nodes at once.
    pub max_nodes: usize,
    /// Logged-in nodes at once from one source (IPv4 address or IPv6 /64), so one address
    /// cannot take every slot of `max_nodes`.
    pub max_nodes_per_source: usize,
    /// `register`s per source; one more is refused with 6008 (the node retries later).
    pub register_limit: tube_proto::ratelimit::RateLimit,
    /// Accounts kept at most; at the limit a `register` takes the place of the account unseen
    /// longest, if that one is not logged in and unseen for `evict_unseen_after`, else 6008.
    pub max_accounts: usize,
    /// How long an account stays unseen before it may give way at `max_accounts`.
    pub evict_unseen_after: Duration,
    /// When set, `register` must carry this token (`invite`), else it is refused with 6001:
    /// new accounts only for nodes the operator gave the token to.
    pub registration_token: Option<tube_proto::chain::ChainSecret>,
    /// Time sessions get to end after shutdown.
    pub shutdown_grace: Duration,
}

impl HubConfig {
    /// A config with the protocol's defaults.
    pub fn new(identity: tube_net::Identity, accounts: Arc<dyn AccountStore>) -> Self {
        Self {
            identity,
            accounts,
            intermediates: crate::plan::DEFAULT_INTERMEDIATES,
            max_chains_per_node: DEFAULT_MAX_CHAINS_PER_NODE,
            max_pending_approvals: DEFAULT_MAX_PENDING_APPROVALS,
            approval_timeout: DEFAULT_APPROVAL_TIMEOUT,
            hop_timeout: DEFAULT_HOP_BUILD_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_nodes: DEFAULT_MAX_NODES,
            max_nodes_per_source: DEFAULT_MAX_NODES_PER_SOURCE,
            register_limit: tube_proto::ratelimit::RateLimit::per_hour(
                DEFAULT_REGISTRATIONS_PER_HOUR,
            ),
            max_accounts: DEFAULT_MAX_ACCOUNTS,
            evict_unseen_after: DEFAULT_EVICT_UNSEEN_AFTER,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            registration_token: None,
        }
    }
}

/// Errors that stop the hub.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] tube_net::TlsError),
}

/// State shared by the accept loop, the sessions and the timer task.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: HubConfig,
    pub(crate) state: Mutex<State>,
    /// Wakes the timer task when a deadline may have changed.
    pub(crate) changed: Notify,
    /// `register`s per source ([`tube_proto::ratelimit::source_key`]).
    pub(crate) registrations: Mutex<tube_proto::ratelimit::KeyedLimiter<std::net::IpAddr>>,
    /// Accounts removed to make room for new ones (`max_accounts`).
    pub(crate) evicted: AtomicU64,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A read-only view of a running hub, for tests and the admin API.
#[derive(Debug, Clone)]
pub struct HubState {
    shared: Arc<Shared>,
}

impl HubState {
    /// Names of the logged-in nodes, sorted.
    pub fn online(&self) -> Vec<String> {
        self.shared.lock().online()
    }

    /// The chains the hub knows (waiting for approval, building, up), by tunnel id.
    pub fn chains(&self) -> Vec<ChainInfo> {
        self.shared.lock().chains()
    }

    /// Accounts removed so far to make room for new ones.
    pub fn accounts_evicted(&self) -> u64 {
        self.shared
            .evicted
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A hub, built from its config; [`Hub::state`] gives a view of it.
#[derive(Debug)]
pub struct Hub {
    shared: Arc<Shared>,
}

impl Hub {
    /// A hub with `config`, not yet serving.
    pub fn new(config: HubConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                registrations: Mutex::new(tube_proto::ratelimit::KeyedLimiter::new(
                    config.register_limit,
                    MAX_REGISTRATION_SOURCES,
                )),
                config,
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                evicted: AtomicU64::new(0),
            }),
        }
    }

    /// A view of the live state.
    pub fn state(&self) -> HubState {
        HubState {
            shared: self.shared.clone(),
        }
    }

    /// Serves nodes on `listener` until `shutdown` is cancelled; then closes every chain
    /// (6013), sends every session `error` 6013, closes them and waits up to the grace period.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), HubError> {
        let shared = self.shared;
        let acceptor = TlsAcceptor::from(shared.config.identity.server_config()?);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(
            shared.config.max_handshakes.max(1),
        ));
        let tracker = TaskTracker::new();
        tracker.spawn(timers(shared.clone(), shutdown.clone()));
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, fingerprint = %shared.config.identity.fingerprint(), "hub listening");
        }
        while let Some((tcp, peer)) = tube_net::accept(&listener, &shutdown, "hub").await {
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "too many logins in progress, closing");
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
        drop(listener);
        shared.lock().shut_down();
        tracker.close();
        if tokio::time::timeout(shared.config.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("sessions still running after the shutdown grace period");
            for n in shared.lock().nodes.values() {
                n.kill.cancel();
            }
        }
        tracing::info!("hub stopped");
        Ok(())
    }
}

/// Serves nodes on `listener` with `config` until `shutdown` (see [`Hub::run`]).
pub async fn run(
    listener: TcpListener,
    config: HubConfig,
    shutdown: CancellationToken,
) -> Result<(), HubError> {
    Hub::new(config).run(listener, shutdown).await
}

/// Fires approval and build-step deadlines.
async fn timers(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        // Register interest before reading the deadline, so no change is missed.
        let changed = shared.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let next = shared.lock().next_deadline();
        let sleep = async {
            match next {
                Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = changed => continue,
            _ = sleep => {}
        }
        let now = tokio::time::Instant::now().into_std();
        shared.lock().handle_timeouts(now);
    }
}
