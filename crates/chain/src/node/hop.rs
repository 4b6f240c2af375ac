//! `make_tube` (`docs/protocols/chain.md` sections 5.3 and 6): the near side (node 0 dials its
//! front, or takes the user connection its `forward_listen` listener accepted; every other
//! node dials `from` and presents the hop preamble), the far side (a hop listener that takes
//! only `to` with `secret_in`; at the endpoint, its loopback listener for the front, or the
//! service the front's `approve` named, dialled by the node), then the splice that counts the
//! bytes both ways.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};
use tube_proto::chain::{
    ChainRole, ChainSecret, ChainState, FrontMessage, HOP_HELLO_LEN, HubMessage, decode_hop_hello,
    encode_hop_hello, parse_tunnel_id,
};

use super::state::{Chain, Closing};
use super::{ChainBytes, ListenerGuard, Node, connect_from};

/// Connections in the preamble check at once, per hop listener.
const MAX_UNVERIFIED: usize = 8;

/// A `make_tube` from the hub.
pub(super) struct MakeTube {
    pub(super) id: u64,
    pub(super) tunnel_id: String,
    pub(super) from: Option<String>,
    pub(super) to: Option<String>,
    pub(super) secret_in: Option<ChainSecret>,
    pub(super) secret_out: Option<ChainSecret>,
}

/// Where the far side of this node's part comes from.
enum Far {
    /// The next node dials in from `to` with the preamble (`tunnel`, `secret`).
    Hop {
        listener: TcpListener,
        to: IpAddr,
        tunnel: [u8; 16],
        secret: [u8; 32],
        _open: ListenerGuard,
    },
    /// The endpoint's front connects once `establish_connection` arrived.
    Local {
        listener: TcpListener,
        established: oneshot::Receiver<()>,
        _open: ListenerGuard,
    },
    /// The endpoint's service (the front's `approve` named it), connected already; carried
    /// once `establish_connection` arrived.
    Service {
        tcp: TcpStream,
        established: oneshot::Receiver<()>,
    },
}

/// Carries out one `make_tube`, answers it, then carries the chain until it ends.
pub(super) async fn build(node: Arc<Node>, req: MakeTube) {
    let (closing, established) = match node.prepare(&req) {
        Ok(x) => x,
        Err(reason) => return node.answer(&req, Err(reason)).await,
    };
    let bytes = node.stats.track(&req.tunnel_id);
    let setup = tokio::select! {
        r = setup(&node, &req, established) => r,
        _ = closing.closed() => Err("chain closed during the build".into()),
    };
    let (near, far, port) = match setup {
        Ok(x) => x,
        Err(reason) => {
            tracing::warn!(reason = %reason, "make_tube failed");
            // The hub closes the chain on every node that heard of it (build failure).
            return node.answer(&req, Err(reason)).await;
        }
    };
    node.answer(&req, Ok(port)).await;
    let carried = carry(&node, &req.tunnel_id, near, far, &bytes, &closing).await;
    if closing.is_closed() {
        // Closed by the hub (or the session ended): nothing to report.
        return;
    }
    match carried {
        Ok(()) => tracing::info!("chain ended"),
        Err(reason) => tracing::warn!(reason = %reason, "chain failed"),
    }
    node.send_hub(HubMessage::RequestCloseTube {
        tunnel_id: req.tunnel_id.clone(),
    })
    .await;
}

impl Node {
    /// Records the chain (or checks the one a front asked for or approved) and returns its
    /// token, plus the endpoint's signal for `establish_connection`.
    fn prepare(&self, req: &MakeTube) -> Result<(Closing, Option<oneshot::Receiver<()>>), String> {
        let mut st = self.state();
        let role = match (&req.from, &req.to) {
            (None, _) => ChainRole::Requester,
            (Some(_), None) => ChainRole::Endpoint,
            (Some(_), Some(_)) => ChainRole::Intermediate,
        };
        if role == ChainRole::Intermediate {
            if !self.config.relay {
                return Err("this node does not relay".into());
            }
            if st.chains.contains_key(&req.tunnel_id) {
                return Err("this node is already part of the chain".into());
            }
            if st.chains.len() >= self.config.max_chains {
                return Err("node at its chain limit".into());
            }
            let chain = Chain::new(role, self.token.child_token());
            st.chains.insert(req.tunnel_id.clone(), chain);
        }
        let chain = match st.chains.get_mut(&req.tunnel_id) {
            Some(c) if c.role == role && !c.building => c,
            _ => return Err(format!("not a chain this node expects as {role:?}")),
        };
        chain.building = true;
        let established = (role == ChainRole::Endpoint).then(|| {
            let (tx, rx) = oneshot::channel();
            chain.established = Some(tx);
            rx
        });
        Ok((chain.closing.clone(), established))
    }

    async fn answer(&self, req: &MakeTube, result: Result<Option<u16>, String>) {
        let msg = match result {
            Ok(port) => HubMessage::MakeTubeResult {
                id: req.id,
                tunnel_id: req.tunnel_id.clone(),
                is_allowed: true,
                port,
                reason: String::new(),
            },
            Err(mut reason) => {
                reason.truncate(200);
                HubMessage::MakeTubeResult {
                    id: req.id,
                    tunnel_id: req.tunnel_id.clone(),
                    is_allowed: false,
                    port: None,
                    reason,
                }
            }
        };
        self.send_hub(msg).await;
    }

    /// Node 0's near end, when a `forward_listen` listener accepted it.
    fn take_near(&self, tunnel_id: &str) -> Option<TcpStream> {
        let near = self.state().chains.get_mut(tunnel_id)?.near.take()?;
        let tcp = near.take()?;
        // Until the splice ends cleanly, closing it (a build that fails or is cancelled
        // half-way) resets the user, as dropping the `Near` would have.
        reset_on_close(&tcp, true);
        Some(tcp)
    }

    /// The service an endpoint's front approved the chain with.
    fn forward_of(&self, tunnel_id: &str) -> Option<String> {
        self.state().chains.get(tunnel_id)?.forward.clone()
    }

    fn set_port(&self, tunnel_id: &str, port: u16) {
        if let Some(c) = self.state().chains.get_mut(tunnel_id) {
            c.port = Some(port);
        }
    }

    fn refuse_hop(&self, peer: SocketAddr, reason: &str) {
        self.stats.refused();
        tracing::warn!(%peer, reason, "hop connection refused");
    }
}

/// The near connection, the far side to wait for, and the port to report.
async fn setup(
    node: &Node,
    req: &MakeTube,
    established: Option<oneshot::Receiver<()>>,
) -> Result<(TcpStream, Far, Option<u16>), String> {
    let half = node.config.hop_timeout / 2;
    let tunnel = parse_tunnel_id(&req.tunnel_id).ok_or("bad tunnel id")?;
    let near = match (&req.from, &req.secret_out) {
        (None, _) if let Some(tcp) = node.take_near(&req.tunnel_id) => tcp,
        (None, _) => {
            let (tx, rx) = oneshot::channel();
            {
                let mut st = node.state();
                let owner = st.chains.get(&req.tunnel_id).and_then(|c| c.owner);
                let owner = owner
                    .filter(|o| st.fronts.contains_key(o))
                    .ok_or("the requesting front is gone")?;
                st.listen_waits.insert(req.tunnel_id.clone(), tx);
                let listen = FrontMessage::Listen {
                    tunnel_id: req.tunnel_id.clone(),
                };
                st.push(owner, listen);
            }
            let port = match timeout(half, rx).await {
                Ok(Ok(port)) => port,
                _ => {
                    node.state().listen_waits.remove(&req.tunnel_id);
                    return Err("the front did not answer listen in time".into());
                }
            };
            let addr = SocketAddr::new(node.api_ip, port);
            let tcp = timeout(half, TcpStream::connect(addr))
                .await
                .map_err(|_| format!("connect to the front's port {port} timed out"))?
                .map_err(|e| format!("connect to the front's port {port}: {e}"))?;
            tube_net::tune_tcp(&tcp);
            node.set_port(&req.tunnel_id, port);
            tcp
        }
        (Some(from), Some(secret)) => {
            let addr: SocketAddr = from.parse().map_err(|_| "bad from address")?;
            let secret = secret.to_bytes().ok_or("bad secret_out")?;
            let mut tcp = timeout(half, connect_from(node.config.bind, addr))
                .await
                .map_err(|_| format!("connect to {addr} timed out"))?
                .map_err(|e| format!("connect to {addr}: {e}"))?;
            let hello = encode_hop_hello(tunnel, secret);
            timeout(half, tcp.write_all(&hello))
                .await
                .map_err(|_| format!("sending the preamble to {addr} timed out"))?
                .map_err(|e| format!("sending the preamble to {addr}: {e}"))?;
            tcp
        }
        (Some(_), None) => return Err("make_tube without secret_out".into()),
    };
    match far_side(node, req, tunnel, established).await {
        Ok((far, port)) => Ok((near, far, port)),
        Err(e) => {
            // The near end never carried a byte: a reset, not an end of stream.
            tube_net::abort_tcp(near);
            Err(e)
        }
    }
}

/// The far side of this node's part, and the port to report.
async fn far_side(
    node: &Node,
    req: &MakeTube,
    tunnel: [u8; 16],
    established: Option<oneshot::Receiver<()>>,
) -> Result<(Far, Option<u16>), String> {
    let half = node.config.hop_timeout / 2;
    let far = match (&req.to, &req.secret_in) {
        (Some(to), Some(secret)) => {
            let to: IpAddr = to.parse().map_err(|_| "bad to address")?;
            let secret = secret.to_bytes().ok_or("bad secret_in")?;
            let listener = TcpListener::bind(SocketAddr::new(node.config.bind, 0))
                .await
                .map_err(|e| format!("hop listener: {e}"))?;
            let port = listener
                .local_addr()
                .map_err(|e| format!("hop listener: {e}"))?
                .port();
            let far = Far::Hop {
                listener,
                to,
                tunnel,
                secret,
                _open: node.stats.listener_opened(),
            };
            (far, Some(port))
        }
        (Some(_), None) => return Err("make_tube without secret_in".into()),
        (None, _) if let Some(forward) = node.forward_of(&req.tunnel_id) => {
            let established = established.ok_or("not the endpoint")?;
            let tcp = match timeout(half, TcpStream::connect(forward.as_str())).await {
                Ok(Ok(tcp)) => tcp,
                failed => {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".into(),
                    };
                    // The details stay here: the reason travels to the requesting node.
                    tracing::warn!(%forward, %error, "cannot connect to the service");
                    return Err("the endpoint cannot reach its service".into());
                }
            };
            tube_net::tune_tcp(&tcp);
            // A chain that fails before it carries the connection resets the service, as it
            // resets the user: never a clean end of stream.
            reset_on_close(&tcp, true);
            let port = tcp
                .local_addr()
                .map_err(|e| format!("service: {e}"))?
                .port();
            node.set_port(&req.tunnel_id, port);
            (Far::Service { tcp, established }, None)
        }
        (None, _) => {
            let established = established.ok_or("not the endpoint")?;
            let listener = TcpListener::bind(SocketAddr::new(node.api_ip, 0))
                .await
                .map_err(|e| format!("local listener: {e}"))?;
            let port = listener
                .local_addr()
                .map_err(|e| format!("local listener: {e}"))?
                .port();
            node.set_port(&req.tunnel_id, port);
            (
                Far::Local {
                    listener,
                    established,
                    _open: node.stats.listener_opened(),
                },
                None,
            )
        }
    };
    Ok(far)
}

/// Waits for the far connection, then splices the two.
async fn carry(
    node: &Node,
    tunnel_id: &str,
    near: TcpStream,
    far: Far,
    bytes: &Arc<ChainBytes>,
    closing: &Closing,
) -> Result<(), String> {
    let hop_timeout = node.config.hop_timeout;
    let far = async {
        match far {
            Far::Hop {
                listener,
                to,
                tunnel,
                secret,
                _open,
            } => accept_hop(node, listener, to, tunnel, secret).await,
            Far::Local {
                listener,
                established,
                _open,
            } => {
                wait_established(established, hop_timeout * 2).await?;
                let deadline = Instant::now() + hop_timeout;
                loop {
                    let (tcp, peer) = tokio::time::timeout_at(deadline, listener.accept())
                        .await
                        .map_err(|_| "the front did not connect in time")?
                        .map_err(|e| format!("local accept: {e}"))?;
                    if peer.ip().is_loopback() {
                        tube_net::tune_tcp(&tcp);
                        break Ok((tcp, Vec::new()));
                    }
                    tracing::warn!(%peer, "non-loopback connection to the endpoint's port refused");
                }
            }
            Far::Service { tcp, established } => {
                wait_established(established, hop_timeout * 2).await?;
                Ok((tcp, Vec::new()))
            }
        }
    };
    let far = tokio::select! {
        r = far => r,
        _ = closing.closed() => Err("chain closed".into()),
    };
    let (far, leftover) = match far {
        Ok(x) => x,
        Err(e) => {
            tube_net::abort_tcp(near);
            return Err(e);
        }
    };
    if let Some(c) = node.state().chains.get_mut(tunnel_id)
        && c.role == ChainRole::Intermediate
    {
        c.state = ChainState::Established;
    }
    tracing::info!("hops connected, forwarding");
    splice(near, far, leftover, bytes, closing)
        .await
        .map_err(|e| format!("splice: {e}"))
}

/// Waits, at most `within`, for the endpoint's `establish_connection`.
async fn wait_established(
    established: oneshot::Receiver<()>,
    within: Duration,
) -> Result<(), String> {
    match timeout(within, established).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("chain forgotten".into()),
        Err(_) => Err("no establish_connection in time".into()),
    }
}

/// Accepts until a connection from `to` presents the preamble for `tunnel` with `secret`.
async fn accept_hop(
    node: &Node,
    listener: TcpListener,
    to: IpAddr,
    tunnel: [u8; 16],
    secret: [u8; 32],
) -> Result<(TcpStream, Vec<u8>), String> {
    let deadline = Instant::now() + node.config.hop_timeout * 2;
    let read_timeout = node.config.hop_timeout / 2;
    let mut checks: JoinSet<Checked> = JoinSet::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                return Err("no valid hop connection in time".into());
            }
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "hop accept failed");
                        continue;
                    }
                };
                if peer.ip().to_canonical() != to.to_canonical() {
                    node.refuse_hop(peer, "unexpected source address");
                    continue;
                }
                if checks.len() >= MAX_UNVERIFIED {
                    node.refuse_hop(peer, "too many unverified connections");
                    continue;
                }
                checks.spawn(check_preamble(tcp, peer, tunnel, secret, read_timeout));
            }
            Some(done) = checks.join_next(), if !checks.is_empty() => match done {
                Ok(Ok(hop)) => return Ok(hop),
                Ok(Err((peer, why))) => node.refuse_hop(peer, why),
                Err(e) => tracing::warn!(error = %e, "preamble check failed"),
            },
        }
    }
}

/// A verified hop and the bytes after its preamble, or who was refused and why.
type Checked = Result<(TcpStream, Vec<u8>), (SocketAddr, &'static str)>;

/// Reads the preamble and checks it; returns the bytes that followed it.
async fn check_preamble(
    mut tcp: TcpStream,
    peer: SocketAddr,
    tunnel: [u8; 16],
    secret: [u8; 32],
    read_timeout: std::time::Duration,
) -> Checked {
    let mut buf = Vec::with_capacity(4096);
    let read = async {
        loop {
            match decode_hop_hello(&buf) {
                Err(_) => return Err("bad preamble magic"),
                Ok(Some(hello)) => return Ok(hello),
                Ok(None) => {}
            }
            if buf.len() == buf.capacity() {
                buf.reserve(4096);
            }
            match tcp.read_buf(&mut buf).await {
                Ok(0) => return Err("closed before its preamble"),
                Ok(_) => {}
                Err(_) => return Err("failed before its preamble"),
            }
        }
    };
    let (t, s) = match timeout(read_timeout, read).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(why)) => return Err((peer, why)),
        Err(_) => return Err((peer, "no preamble in time")),
    };
    let ok = t.ct_eq(&tunnel) & s.ct_eq(&secret);
    if !bool::from(ok) {
        return Err((peer, "wrong tunnel or secret"));
    }
    tube_net::tune_tcp(&tcp);
    let leftover = buf.split_off(HOP_HELLO_LEN.min(buf.len()));
    Ok((tcp, leftover))
}

/// How long a splice whose stream is already ending may go on after its chain was closed
/// without a failure: the end of stream travels hop by hop, and the hub's `close_tube` can
/// overtake the last bytes.
const DRAIN: Duration = Duration::from_secs(2);

/// Copies both ways with half-close; `near` is the requester's side. On a failure (a reset, an
/// error, the chain closed) both connections are closed with a reset, so neither end mistakes
/// a broken chain for a clean end of stream. A close that is not a failure, arriving after an
/// end of stream passed this node, lets the copy finish for up to [`DRAIN`] first (when the
/// first node finishes cleanly, every node has seen at least one end of stream).
async fn splice(
    mut near: TcpStream,
    far: TcpStream,
    leftover: Vec<u8>,
    bytes: &Arc<ChainBytes>,
    closing: &Closing,
) -> io::Result<()> {
    // While splicing, a close of these sockets is an abort: if this process dies (SIGKILL, a
    // crash), the kernel resets both connections instead of sending FINs, which the neighbours
    // would pass on as a clean end of stream. Only a splice that ends cleanly closes with FIN.
    reset_on_close(&near, true);
    reset_on_close(&far, true);
    let eof = AtomicBool::new(false);
    let mut result = Ok(());
    if !leftover.is_empty() {
        result = near.write_all(&leftover).await;
        add(&bytes.toward_requester, leftover.len());
    }
    if result.is_ok() {
        let counters = tube_net::splice::Counters {
            a_to_b: &bytes.toward_endpoint,
            b_to_a: &bytes.toward_requester,
            eof: &eof,
        };
        let copy = tube_net::splice::copy_bidirectional(&near, &far, counters);
        tokio::pin!(copy);
        result = tokio::select! {
            r = &mut copy => r,
            _ = closing.closed() => {
                if !closing.aborted() && eof.load(Ordering::SeqCst) {
                    match timeout(DRAIN, &mut copy).await {
                        Ok(r) => r,
                        Err(_) => Err(io::Error::other("chain closed")),
                    }
                } else {
                    Err(io::Error::other("chain closed"))
                }
            }
        };
    }
    if result.is_err() {
        tube_net::abort_tcp(near);
        tube_net::abort_tcp(far);
    } else {
        reset_on_close(&near, false);
        reset_on_close(&far, false);
    }
    result
}

/// `SO_LINGER` 0 (`on`: closing the socket sends RST) or the default (orderly close). Neither
/// setting blocks on close, which is why tokio's deprecation of `set_linger` does not apply.
#[allow(deprecated)]
fn reset_on_close(tcp: &TcpStream, on: bool) {
    // Without it a dying node's neighbours may see a FIN; the hub's close_tube still resets
    // them, a moment later.
    let _ = tcp.set_linger(on.then_some(Duration::ZERO));
}

fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}
