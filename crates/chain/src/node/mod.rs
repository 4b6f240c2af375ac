//! The node daemon (`tube node`, the seed's "client server"): one TLS session to the hub, a
//! loopback front API, and the hops of the chains the hub builds through this node.
//!
//! [`run`] connects to the hub, registers (first start) or logs in with the stored one-time
//! password, and persists the password it gets back before using the session. It then serves
//! the hub's requests (`make_tube`, `close_tube`, `request_connection`,
//! `establish_connection`) and the fronts' lines (`docs/protocols/chain.md` sections 5 to 8).
//!
//! Layout: this file holds the configuration, the errors, the session loop and the shared
//! state; `front` serves one front API connection (with its `forward_listen` listeners);
//! `hop` carries out `make_tube` (dials, hop listeners with their IP and secret checks, the
//! endpoint's dial of an approved `forward`, splicing).
//!
//! A lost hub session closes every chain and is followed by a new one after a backoff; the
//! front API keeps serving meanwhile. Shutdown sends `logout`.

mod front;
mod hop;
mod state;

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use tube_net::codec::{HandshakeConn, handshake_conn};
use tube_net::tokio_rustls::{TlsConnector, client::TlsStream};
use tube_net::{Fingerprint, tls};
use tube_proto::backoff::{Backoff, BackoffConfig};
use tube_proto::chain::{CHAIN_PROTOCOL_VERSION, ChainErrorCode, ChainSecret, HubMessage};
use tube_proto::frame::Frame;

use crate::accounts::Password;
use crate::password_file;

use state::State;

type Conn = HandshakeConn<TlsStream<TcpStream>>;

/// What [`run`] needs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The hub's address, `host:port`.
    pub hub: String,
    /// The hub certificate's pinned fingerprint.
    pub hub_fingerprint: Fingerprint,
    /// This node's account name.
    pub name: String,
    /// Whether this node accepts to be an intermediate of other nodes' chains.
    pub relay: bool,
    /// Address the hub connection, hop listeners and hop dials use (unspecified: any).
    pub bind: IpAddr,
    /// Where the password file `node-<name>.password` lives.
    pub data_dir: PathBuf,
    /// The build timeout: hop dials, the front's `listen` answer and each preamble read get half
    /// of it, a hop listener waits twice as long for its valid dialer, the endpoint waits this
    /// long for its front's connection.
    pub hop_timeout: Duration,
    /// Most chains this node takes part in at once (any role).
    pub max_chains: usize,
    /// Deadline for connecting (TCP + TLS) and for the answer to `register` / `auth`.
    pub handshake_timeout: Duration,
    /// Delays between hub sessions (chain.md section 4.1: 1 s doubling to 60 s, jitter,
    /// forever).
    pub reconnect: BackoffConfig,
    /// The hub's registration token, sent with `register` (a hub run with
    /// `--registration-token` takes new accounts only with it).
    pub registration_token: Option<ChainSecret>,
}

impl NodeConfig {
    /// Defaults: relay on, bind to any address, 10 s hop and handshake timeouts, 16 chains,
    /// reconnect forever (1 s doubling to 60 s).
    pub fn new(hub: String, hub_fingerprint: Fingerprint, name: String, data_dir: PathBuf) -> Self {
        Self {
            hub,
            hub_fingerprint,
            name,
            relay: true,
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            data_dir,
            hop_timeout: Duration::from_secs(10),
            max_chains: tube_proto::chain::DEFAULT_MAX_CHAINS_PER_NODE,
            handshake_timeout: Duration::from_secs(10),
            reconnect: BackoffConfig {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(60),
                factor: 2.0,
                max_attempts: 0,
                jitter: 0.2,
            },
            registration_token: None,
        }
    }

    /// The file holding the password for the next login.
    pub fn password_path(&self) -> PathBuf {
        self.data_dir.join(format!("node-{}.password", self.name))
    }
}

/// Why the node stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The hub refused us (`auth_result` / `register_result` failure or an `error` message).
    #[error("error {}: {message}", ChainErrorCode::describe(*.code))]
    Hub {
        /// The code number (6001 AUTH_FAILED, 6002 NAME_TAKEN, ...).
        code: u16,
        /// The hub's text.
        message: String,
    },
    /// The hub's certificate is not the pinned one.
    #[error("hub certificate fingerprint does not match {0}")]
    FingerprintMismatch(Fingerprint),
    /// TCP or TLS to the hub failed.
    #[error("connecting to hub {addr}: {message}")]
    Connect {
        /// The hub address.
        addr: String,
        /// What failed.
        message: String,
    },
    /// The password file could not be read, or does not hold a password: final (retrying
    /// cannot help until someone mends the file).
    #[error("password file {}: {source}", .path.display())]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// The failure (never holds the password).
        source: std::io::Error,
    },
    /// The password a login returned could not be stored. Not final: the node closes the
    /// session and logs in again later with the password it still has, which the hub still
    /// accepts (chain.md section 4.2).
    #[error("storing the password in {}: {source}", .path.display())]
    PasswordStore {
        /// The file.
        path: PathBuf,
        /// The failure (never holds the password).
        source: std::io::Error,
    },
    /// The front API listener is not on a loopback address, or is unusable.
    #[error("front API: {0}")]
    Api(String),
    /// The hub broke the protocol.
    #[error("hub protocol error: {0}")]
    Protocol(String),
    /// The hub session ended; every chain was closed (the node reconnects).
    #[error("hub connection lost: {0}")]
    HubLost(String),
}

impl NodeError {
    /// Whether retrying cannot help (6001, 6002, 6011, a wrong fingerprint, an unreadable
    /// password file, an unusable front API).
    pub fn is_final(&self) -> bool {
        match self {
            NodeError::Hub { code, .. } => matches!(code, 6001 | 6002 | 6011),
            NodeError::FingerprintMismatch(_)
            | NodeError::PasswordFile { .. }
            | NodeError::Api(_) => true,
            _ => false,
        }
    }
}

/// Counters a running node exposes (clone it before [`run_with_stats`]; tests read it).
#[derive(Debug, Clone, Default)]
pub struct NodeStats(Arc<StatsInner>);

#[derive(Debug, Default)]
struct StatsInner {
    refused_hops: AtomicU64,
    chains: Mutex<VecDeque<(String, Arc<ChainBytes>)>>,
    /// Successful logins so far, and whether a session is up now.
    sessions: tokio::sync::watch::Sender<SessionCount>,
    /// Hop and endpoint listeners open now.
    listeners: tokio::sync::watch::Sender<usize>,
}

/// Counts one open listener in [`NodeStats::listeners`] while it lives.
#[derive(Debug)]
pub(crate) struct ListenerGuard(NodeStats);

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        self.0.0.listeners.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// What [`NodeStats::sessions`] reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionCount {
    /// Hub sessions that logged in since the node started.
    pub logins: u64,
    /// Whether a hub session is up now.
    pub online: bool,
}

/// Bytes one chain carried through this node.
#[derive(Debug, Default)]
pub struct ChainBytes {
    /// Bytes read from the requester's side and written towards the endpoint.
    pub toward_endpoint: AtomicU64,
    /// Bytes read from the endpoint's side and written towards the requester.
    pub toward_requester: AtomicU64,
}

/// How many chains' byte counts [`NodeStats`] remembers.
const STATS_CHAINS: usize = 64;

impl NodeStats {
    /// Hop connections refused (wrong source IP, bad preamble, wrong tunnel or secret, too many
    /// unverified, too slow).
    pub fn refused_hops(&self) -> u64 {
        self.0.refused_hops.load(Ordering::Relaxed)
    }

    /// `(toward_endpoint, toward_requester)` bytes of a chain (kept for the last 64 chains).
    pub fn chain_bytes(&self, tunnel_id: &str) -> Option<(u64, u64)> {
        let chains = lock(&self.0.chains);
        chains.iter().find(|(t, _)| t == tunnel_id).map(|(_, b)| {
            (
                b.toward_endpoint.load(Ordering::Relaxed),
                b.toward_requester.load(Ordering::Relaxed),
            )
        })
    }

    /// Watches the node's hub sessions (a test waits on it instead of sleeping).
    pub fn sessions(&self) -> tokio::sync::watch::Receiver<SessionCount> {
        self.0.sessions.subscribe()
    }

    /// Watches how many hop, endpoint and `forward_listen` listeners are open (none once every
    /// chain and every front that asked for a listener is gone).
    pub fn listeners(&self) -> tokio::sync::watch::Receiver<usize> {
        self.0.listeners.subscribe()
    }

    fn listener_opened(&self) -> ListenerGuard {
        self.0.listeners.send_modify(|n| *n += 1);
        ListenerGuard(self.clone())
    }

    fn set_online(&self, online: bool) {
        self.0.sessions.send_modify(|s| {
            if online {
                s.logins += 1;
            }
            s.online = online;
        });
    }

    fn refused(&self) {
        self.0.refused_hops.fetch_add(1, Ordering::Relaxed);
    }

    fn track(&self, tunnel_id: &str) -> Arc<ChainBytes> {
        let mut chains = lock(&self.0.chains);
        if let Some((_, b)) = chains.iter().find(|(t, _)| t == tunnel_id) {
            return b.clone();
        }
        let b = Arc::new(ChainBytes::default());
        if chains.len() >= STATS_CHAINS {
            chains.pop_front();
        }
        chains.push_back((tunnel_id.to_owned(), b.clone()));
        b
    }
}

/// Runs the node until `shutdown` (then `Ok`) or a final refusal (an error).
pub async fn run(
    api: TcpListener,
    config: NodeConfig,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    run_with_stats(api, config, NodeStats::default(), shutdown).await
}

/// [`run`], updating `stats` as it goes.
///
/// The front API serves from the start and across hub sessions (a `request_tube` without a
/// session is refused with 6010). A session that ends for any reason but a final one (6001,
/// 6002, 6011, a wrong fingerprint, an unreadable password file) closes every chain and is
/// followed by a new one after the reconnect backoff; the backoff starts over after every
/// session that logged in. On shutdown the node sends `logout` and waits briefly for its answer.
pub async fn run_with_stats(
    api: TcpListener,
    config: NodeConfig,
    stats: NodeStats,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    let api_ip = api
        .local_addr()
        .map_err(|e| NodeError::Api(e.to_string()))?
        .ip();
    if !api_ip.is_loopback() {
        return Err(NodeError::Api(format!(
            "{api_ip} is not a loopback address (the API has no authentication)"
        )));
    }
    let token = shutdown.child_token();
    let _stop_on_drop = token.clone().drop_guard();
    let tracker = TaskTracker::new();
    let mut backoff = Backoff::new(config.reconnect);
    let node = Arc::new(Node {
        config,
        api_ip,
        hub: Mutex::new(None),
        state: Mutex::new(State::default()),
        stats,
        tracker: tracker.clone(),
        token: token.clone(),
        next_id: AtomicU64::new(1),
        unsaved: Mutex::new(None),
    });
    tracker.spawn(node.clone().accept_fronts(api));
    let result = loop {
        let (logged_in, r) = node.session(&shutdown).await;
        let e = match r {
            Ok(()) => break Ok(()),
            Err(e) if e.is_final() => break Err(e),
            Err(e) => e,
        };
        if logged_in {
            backoff.reset();
        }
        let Some(delay) = backoff.next_delay(random_u64()) else {
            break Err(e);
        };
        tracing::warn!(error = %e, retry_in = ?delay, "hub session ended, reconnecting");
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    };
    token.cancel();
    tracker.close();
    let _ = timeout(Duration::from_secs(5), tracker.wait()).await;
    result
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // Jitter only spreads reconnects out; zeros still give a valid delay.
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

/// What every task of the node shares, across hub sessions.
struct Node {
    config: NodeConfig,
    /// The front API's loopback address (node 0 dials its front there; the endpoint listens).
    api_ip: IpAddr,
    /// Messages to the hub, written by [`hub_writer`]; `None` between sessions.
    hub: Mutex<Option<mpsc::Sender<HubMessage>>>,
    state: Mutex<State>,
    stats: NodeStats,
    tracker: TaskTracker,
    /// Cancelled when the node stops; each chain gets a child.
    token: CancellationToken,
    /// The node's request ids towards the hub (one counter for the whole process).
    next_id: AtomicU64,
    /// The newest password, while it could not be stored: the next login uses it.
    unsaved: Mutex<Option<Password>>,
}

impl Node {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Whether a hub session is up.
    fn online(&self) -> bool {
        lock(&self.hub).is_some()
    }

    async fn send_hub(&self, msg: HubMessage) {
        let tx = lock(&self.hub).clone();
        match tx {
            Some(tx) => {
                tracing::debug!(kind = msg.kind(), "to hub");
                // Fails only when the writer is gone, and then the session is ending anyway.
                let _ = tx.send(msg).await;
            }
            None => tracing::debug!(kind = msg.kind(), "no hub session, message dropped"),
        }
    }

    fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let token = self.token.clone();
        self.tracker.spawn(
            async move {
                tokio::select! {
                    _ = fut => {}
                    _ = token.cancelled() => {}
                }
            }
            .in_current_span(),
        );
    }

    async fn accept_fronts(self: Arc<Self>, api: TcpListener) {
        while let Some((tcp, peer)) = tube_net::accept(&api, &self.token, "api").await {
            self.spawn_front(tcp, peer);
        }
    }

    /// One hub session: connect, log in, serve until it ends. Says whether it logged in.
    async fn session(
        self: &Arc<Self>,
        shutdown: &CancellationToken,
    ) -> (bool, Result<(), NodeError>) {
        let config = &self.config;
        let login = async {
            let mut conn = timeout(config.handshake_timeout, connect(config))
                .await
                .map_err(|_| NodeError::Connect {
                    addr: config.hub.clone(),
                    message: "timed out".into(),
                })??;
            login(config, &mut conn, &self.unsaved).await?;
            Ok::<_, NodeError>(conn)
        };
        let conn = tokio::select! {
            r = login => match r {
                Ok(c) => c,
                Err(e) => return (false, Err(e)),
            },
            _ = shutdown.cancelled() => return (false, Ok(())),
        };
        tracing::info!(hub = %config.hub, name = %config.name, "logged in to the hub");
        let (sink, stream) = conn.split();
        let (hub_tx, hub_rx) = mpsc::channel(256);
        // Not a child of the node's token: on shutdown the writer still has to send `logout`.
        let session = CancellationToken::new();
        // If this future is dropped (the node's task aborted), the writer and the connection go
        // with it.
        let _close_on_drop = session.clone().drop_guard();
        let writer = tokio::spawn(hub_writer(sink, hub_rx, session.clone()));
        *lock(&self.hub) = Some(hub_tx.clone());
        self.stats.set_online(true);
        let result = self.serve(stream, &session, shutdown).await;
        *lock(&self.hub) = None;
        self.stats.set_online(false);
        let reason = match &result {
            Ok(()) => "node shutting down",
            Err(_) => "hub connection lost",
        };
        self.close_all(reason);
        if result.is_ok() {
            // `logout` was sent by `serve`; let the writer flush it.
            drop(hub_tx);
            let _ = timeout(Duration::from_secs(2), writer).await;
        } else {
            // The writer sends what is queued (the `error` 6009 of our own protocol error) and
            // ends; a hub that does not take it within a second is cut off.
            drop(hub_tx);
            let mut writer = writer;
            if timeout(Duration::from_secs(1), &mut writer).await.is_err() {
                session.cancel();
                let _ = writer.await;
            }
        }
        (true, result)
    }

    async fn serve(
        self: &Arc<Self>,
        mut stream: SplitStream<Conn>,
        session: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Result<(), NodeError> {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return self.logout(&mut stream).await,
                _ = session.cancelled() => {
                    return Err(NodeError::HubLost("writing to the hub failed".into()));
                }
                frame = stream.next() => {
                    let msg = match frame {
                        None => return Err(NodeError::HubLost("closed by the hub".into())),
                        Some(Err(e)) => {
                            return Err(self.protocol_error(format!("bad frame: {e}")).await);
                        }
                        Some(Ok(Frame::Control(b))) => match HubMessage::from_bytes(&b) {
                            Ok(m) if m.is_from_hub() => m,
                            Ok(m) => {
                                let why = format!("{} is not sent by a hub", m.kind());
                                return Err(self.protocol_error(why).await);
                            }
                            Err(e) => return Err(self.protocol_error(e.to_string()).await),
                        },
                        Some(Ok(_)) => {
                            return Err(self.protocol_error("frame other than CONTROL".into()).await);
                        }
                    };
                    self.handle_hub(msg).await?;
                }
            }
        }
    }

    /// Sends `logout` and waits up to 2 s for `logout_result` (the hub then closes the
    /// session and its chains; without an answer the node closes anyway).
    async fn logout(&self, stream: &mut SplitStream<Conn>) -> Result<(), NodeError> {
        self.send_hub(HubMessage::Logout {}).await;
        let answered = async {
            while let Some(Ok(frame)) = stream.next().await {
                if let Frame::Control(b) = frame
                    && let Ok(HubMessage::LogoutResult { .. }) = HubMessage::from_bytes(&b)
                {
                    return true;
                }
            }
            false
        };
        match timeout(Duration::from_secs(2), answered).await {
            Ok(true) => tracing::info!("logged out of the hub"),
            _ => tracing::warn!("no answer to logout, closing"),
        }
        Ok(())
    }

    async fn protocol_error(&self, why: String) -> NodeError {
        tracing::warn!(reason = %why, "hub broke the protocol");
        self.send_hub(HubMessage::error(
            ChainErrorCode::ProtocolError,
            "protocol error",
        ))
        .await;
        NodeError::Protocol(why)
    }

    async fn handle_hub(self: &Arc<Self>, msg: HubMessage) -> Result<(), NodeError> {
        tracing::debug!(kind = msg.kind(), "from hub");
        match msg {
            HubMessage::RequestTubeResult {
                id,
                is_allowed,
                reason,
                tunnel_id,
                hops,
                code,
            } => self.on_request_tube_result(id, is_allowed, reason, tunnel_id, code, hops),
            HubMessage::MakeTube {
                id,
                tunnel_id,
                from,
                to,
                secret_in,
                secret_out,
            } => {
                let span = tracing::info_span!("make_tube", tunnel_id = %tunnel_id);
                let req = hop::MakeTube {
                    id,
                    tunnel_id,
                    from,
                    to,
                    secret_in,
                    secret_out,
                };
                let node = self.clone();
                self.spawn(hop::build(node, req).instrument(span));
            }
            HubMessage::CloseTube {
                tunnel_id,
                reason,
                code,
            } => self.close_chain(&tunnel_id, &reason, code, code.is_some()),
            HubMessage::RequestConnection {
                id,
                request_user,
                tunnel_id,
            } => {
                self.on_request_connection(id, request_user, tunnel_id)
                    .await
            }
            HubMessage::EstablishConnection {
                tunnel_id,
                local_id,
                endpoint_user,
            } => self.on_establish(&tunnel_id, local_id, endpoint_user),
            HubMessage::Error { code, message } => {
                tracing::warn!(code, message = %message, "error from the hub");
                if matches!(code, 6009 | 6010 | 6011 | 6013) {
                    return Err(NodeError::Hub { code, message });
                }
            }
            other => {
                let why = format!("unexpected {} during the session", other.kind());
                return Err(self.protocol_error(why).await);
            }
        }
        Ok(())
    }
}

/// Locks a mutex, going on with the data if a panicking thread poisoned it (every critical
/// section leaves the state consistent between statements).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn hub_writer(
    mut sink: SplitSink<Conn, Frame>,
    mut rx: mpsc::Receiver<HubMessage>,
    token: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            // Queued messages first: cancelling ends the writer, not what it was given.
            biased;
            m = rx.recv() => m,
            _ = token.cancelled() => None,
        };
        let Some(msg) = msg else { break };
        let sent = tokio::select! {
            r = sink.send(Frame::Control(msg.to_bytes())) => r,
            _ = token.cancelled() => break,
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "writing to the hub failed");
            token.cancel();
            break;
        }
    }
    let _ = timeout(Duration::from_secs(1), sink.close()).await;
}

/// Answers a hub that broke the protocol during the login with `error` 6009 (a second at
/// most: the connection closes next anyway).
async fn login_protocol_error(conn: &mut Conn, why: String) -> NodeError {
    tracing::warn!(reason = %why, "hub broke the protocol");
    let error = HubMessage::error(ChainErrorCode::ProtocolError, "protocol error");
    let _ = timeout(
        Duration::from_secs(1),
        conn.send(Frame::Control(error.to_bytes())),
    )
    .await;
    NodeError::Protocol(why)
}

/// Dials `addr` from `bind` (any local address when `bind` is unspecified).
async fn connect_from(bind: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let tcp = if bind.is_unspecified() {
        TcpStream::connect(addr).await?
    } else {
        let socket = if bind.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(bind, 0))?;
        socket.connect(addr).await?
    };
    tube_net::tune_tcp(&tcp);
    Ok(tcp)
}

/// Connects to the hub from `--bind`, with TCP keepalive (chain.md section 2).
async fn connect_hub(bind: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let tcp = connect_from(bind, addr).await?;
    crate::hub_keepalive(&tcp);
    Ok(tcp)
}

async fn connect(config: &NodeConfig) -> Result<Conn, NodeError> {
    let err = |message: String| NodeError::Connect {
        addr: config.hub.clone(),
        message,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&config.hub)
        .await
        .map_err(|e| err(e.to_string()))?
        .collect();
    let addr = addrs
        .iter()
        .find(|a| config.bind.is_unspecified() || a.is_ipv4() == config.bind.is_ipv4())
        .copied()
        .ok_or_else(|| err("no address of the hub matches --bind".into()))?;
    let tcp = connect_hub(config.bind, addr)
        .await
        .map_err(|e| err(e.to_string()))?;
    let tls_cfg =
        tls::pinned_client_config(config.hub_fingerprint).map_err(|e| err(e.to_string()))?;
    let tls = TlsConnector::from(tls_cfg)
        .connect(tls::server_name(), tcp)
        .await
        .map_err(|e| {
            if e.to_string().contains(tls::PIN_MISMATCH) {
                NodeError::FingerprintMismatch(config.hub_fingerprint)
            } else {
                err(format!("tls: {e}"))
            }
        })?;
    Ok(handshake_conn(tls))
}

/// `register` or `auth`, then stores the password the hub handed out and tells the hub
/// (`password_stored`) before returning. A password that cannot be stored stays in `unsaved`
/// for the next login (the hub accepts it, chain.md section 4.2), so a node whose disk fails
/// right after `register` keeps its account while it runs.
async fn login(
    config: &NodeConfig,
    conn: &mut Conn,
    unsaved: &Mutex<Option<Password>>,
) -> Result<(), NodeError> {
    let path = config.password_path();
    let file_err = |source| NodeError::PasswordFile {
        path: path.clone(),
        source,
    };
    let kept = lock(unsaved).clone();
    let stored = match kept {
        Some(p) => Some(p),
        None => password_file::load(&path).map_err(file_err)?,
    };
    let first = match &stored {
        None => HubMessage::Register {
            version: CHAIN_PROTOCOL_VERSION.into(),
            name: config.name.clone(),
            relay: config.relay,
            invite: config.registration_token.clone(),
        },
        Some(p) => HubMessage::Auth {
            version: CHAIN_PROTOCOL_VERSION.into(),
            name: config.name.clone(),
            password: ChainSecret::new(p.expose()),
            relay: config.relay,
        },
    };
    let lost = |e: String| NodeError::HubLost(e);
    conn.send(Frame::Control(first.to_bytes()))
        .await
        .map_err(|e| lost(e.to_string()))?;
    let reply = match timeout(config.handshake_timeout, conn.next()).await {
        Err(_) => return Err(lost("no answer to the login".into())),
        Ok(None) => return Err(lost("closed before answering the login".into())),
        Ok(Some(Err(e))) => return Err(login_protocol_error(conn, e.to_string()).await),
        Ok(Some(Ok(Frame::Control(b)))) => match HubMessage::from_bytes(&b) {
            Ok(m) => m,
            Err(e) => return Err(login_protocol_error(conn, e.to_string()).await),
        },
        Ok(Some(Ok(_))) => {
            return Err(login_protocol_error(conn, "frame other than CONTROL".into()).await);
        }
    };
    let fresh = match (reply, stored.is_some()) {
        (
            HubMessage::RegisterResult {
                is_success: true,
                password: Some(p),
                ..
            },
            false,
        )
        | (
            HubMessage::AuthResult {
                is_success: true,
                next_password: Some(p),
                ..
            },
            true,
        ) => p,
        (
            HubMessage::RegisterResult {
                is_success: false,
                message,
                code,
                ..
            },
            false,
        ) => {
            return Err(NodeError::Hub {
                code: code.unwrap_or(ChainErrorCode::NameTaken as u16),
                message,
            });
        }
        (
            HubMessage::AuthResult {
                is_success: false,
                message,
                code,
                ..
            },
            true,
        ) => {
            return Err(NodeError::Hub {
                code: code.unwrap_or(ChainErrorCode::AuthFailed as u16),
                message,
            });
        }
        (HubMessage::Error { code, message }, _) => return Err(NodeError::Hub { code, message }),
        (other, _) => {
            let why = format!("unexpected {} in answer to the login", other.kind());
            return Err(login_protocol_error(conn, why).await);
        }
    };
    let Ok(password) = fresh.expose().parse::<Password>() else {
        let why = "the hub sent a malformed password".into();
        return Err(login_protocol_error(conn, why).await);
    };
    // Kept until it is on disk: if storing fails, the next login uses it.
    *lock(unsaved) = Some(password.clone());
    let store_path = path.clone();
    let store_err = |source| NodeError::PasswordStore {
        path: path.clone(),
        source,
    };
    tokio::task::spawn_blocking(move || password_file::store(&store_path, &password))
        .await
        .map_err(|e| store_err(std::io::Error::other(e.to_string())))?
        .map_err(store_err)?;
    *lock(unsaved) = None;
    // On disk: the hub may now void the password this login used.
    conn.send(Frame::Control(HubMessage::PasswordStored {}.to_bytes()))
        .await
        .map_err(|e| lost(e.to_string()))?;
    Ok(())
}
