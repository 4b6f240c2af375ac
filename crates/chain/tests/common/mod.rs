//! What the chain tests share: a real hub (TLS, SQLite accounts unless a test brings its own
//! store) on 127.0.0.1 port 0, and real nodes on 127.0.0.x with their front API on port 0.
// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tube_chain::hub::{Hub, HubConfig, HubState};
use tube_chain::node::{NodeConfig, NodeError, NodeStats};
use tube_chain::{AccountStore, SqliteAccounts};
use tube_net::{Fingerprint, Identity};
use tube_testkit::{deadline, init_tracing};

pub(crate) const LIMIT: Duration = Duration::from_secs(60);

/// A hub on 127.0.0.1 port 0 with its accounts in a temp dir.
pub(crate) struct TestHub {
    pub(crate) identity: Identity,
    pub(crate) task: Option<JoinHandle<Result<(), tube_chain::hub::HubError>>>,
    pub(crate) addr: SocketAddr,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) state: HubState,
    pub(crate) shutdown: CancellationToken,
    pub(crate) dir: Option<tempfile::TempDir>,
}

impl TestHub {
    /// Stops the hub (nodes get 6013) and starts it again on the same address, certificate
    /// and account database.
    pub(crate) async fn restart(mut self) -> TestHub {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            deadline(LIMIT, t)
                .await
                .expect("hub task")
                .expect("hub ran");
        }
        let listener = TcpListener::bind(self.addr).await.expect("rebind hub");
        let dir = self.dir.take().expect("dir");
        run_hub(
            dir,
            self.identity.clone(),
            listener,
            0,
            Duration::from_secs(5),
        )
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub(crate) async fn start_hub(intermediates: usize) -> TestHub {
    start_hub_with(intermediates, Duration::from_secs(5)).await
}

/// A hub whose nodes get `hop_timeout` to answer each `make_tube`.
pub(crate) async fn start_hub_with(intermediates: usize, hop_timeout: Duration) -> TestHub {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::generate(&["localhost"]).expect("identity");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind hub");
    run_hub(dir, identity, listener, intermediates, hop_timeout)
}

/// Runs a hub on `listener` with the accounts in `dir` (a restart passes the same ones).
pub(crate) fn run_hub(
    dir: tempfile::TempDir,
    identity: Identity,
    listener: TcpListener,
    intermediates: usize,
    hop_timeout: Duration,
) -> TestHub {
    let accounts = SqliteAccounts::open(&dir.path().join("nodes.sqlite3")).expect("accounts");
    run_hub_on(
        dir,
        identity,
        listener,
        Arc::new(accounts),
        intermediates,
        hop_timeout,
    )
}

/// A hub on 127.0.0.1 port 0 keeping its accounts in `accounts`.
pub(crate) async fn start_hub_on(accounts: Arc<dyn AccountStore>) -> TestHub {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::generate(&["localhost"]).expect("identity");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind hub");
    run_hub_on(dir, identity, listener, accounts, 0, Duration::from_secs(5))
}

fn run_hub_on(
    dir: tempfile::TempDir,
    identity: Identity,
    listener: TcpListener,
    accounts: Arc<dyn AccountStore>,
    intermediates: usize,
    hop_timeout: Duration,
) -> TestHub {
    let mut config = HubConfig::new(identity, accounts);
    config.intermediates = intermediates;
    config.hop_timeout = hop_timeout;
    config.approval_timeout = Duration::from_secs(10);
    run_hub_config(dir, listener, config)
}

/// A hub on 127.0.0.1 port 0 with `config` (its data dir a fresh temp dir).
pub(crate) async fn start_hub_with_config(config: HubConfig) -> TestHub {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind hub");
    run_hub_config(dir, listener, config)
}

fn run_hub_config(dir: tempfile::TempDir, listener: TcpListener, config: HubConfig) -> TestHub {
    let fingerprint = config.identity.fingerprint();
    let addr = listener.local_addr().expect("addr");
    let config_identity = config.identity.clone();
    let hub = Hub::new(config);
    let state = hub.state();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(hub.run(listener, shutdown.clone()));
    TestHub {
        identity: config_identity,
        task: Some(task),
        addr,
        fingerprint,
        state,
        shutdown,
        dir: Some(dir),
    }
}

/// A node on 127.0.0.`octet`, its front API on 127.0.0.1 port 0.
pub(crate) struct TestNode {
    pub(crate) api: SocketAddr,
    pub(crate) stats: NodeStats,
    pub(crate) shutdown: CancellationToken,
    pub(crate) task: JoinHandle<Result<(), NodeError>>,
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub(crate) fn ip(octet: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet))
}

pub(crate) fn node_config(hub: &TestHub, name: &str, octet: u8, dir: &Path) -> NodeConfig {
    let mut c = NodeConfig::new(
        hub.addr.to_string(),
        hub.fingerprint,
        name.into(),
        dir.to_path_buf(),
    );
    c.bind = ip(octet);
    c.hop_timeout = Duration::from_secs(5);
    c
}

pub(crate) async fn spawn_node(config: NodeConfig) -> TestNode {
    let api = TcpListener::bind("127.0.0.1:0").await.expect("bind api");
    let addr = api.local_addr().expect("addr");
    let stats = NodeStats::default();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(tube_chain::node::run_with_stats(
        api,
        config,
        stats.clone(),
        shutdown.clone(),
    ));
    TestNode {
        api: addr,
        stats,
        shutdown,
        task,
    }
}

/// Starts a node and waits until it is logged in.
pub(crate) async fn start_node(hub: &TestHub, name: &str, octet: u8, dir: &Path) -> TestNode {
    let node = spawn_node(node_config(hub, name, octet, dir)).await;
    node.online().await;
    node
}

impl TestNode {
    pub(crate) async fn online(&self) {
        let mut w = self.stats.sessions();
        deadline(LIMIT, w.wait_for(|s| s.online))
            .await
            .expect("node logged in");
    }

    /// Graceful stop (sends `logout`); returns how `run` ended.
    pub(crate) async fn stop(mut self) -> Result<(), NodeError> {
        self.shutdown.cancel();
        deadline(LIMIT, &mut self.task).await.expect("node task")
    }

    /// Like a killed process: every task and socket of the node goes at once, no `logout`.
    pub(crate) async fn kill(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

/// The password in the node's file (64 hex digits; the file ends in a newline).
pub(crate) fn read_password(config: &NodeConfig) -> String {
    let text = std::fs::read_to_string(config.password_path()).expect("password file");
    text.trim_end().to_string()
}

impl TestNode {
    pub(crate) async fn online_then_stop(self) {
        self.online().await;
        self.stop().await.expect("clean stop");
    }

    pub(crate) async fn task_result(mut self) -> Result<(), NodeError> {
        (&mut self.task).await.expect("node task")
    }
}
