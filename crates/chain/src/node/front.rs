//! One front API connection: newline-delimited JSON on loopback (`docs/protocols/chain.md`
//! section 8). Lines are cut by [`LineBuffer`] with its cap; every answer and push goes
//! through the connection's bounded queue, written by the same task.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tracing::Instrument;
use tube_proto::chain::{
    ChainErrorCode, ChainRole, FrontMessage, HubMessage, LineBuffer, decode_line, encode_line,
};

use super::Node;
use super::state::{Chain, FrontSlot, Near, TUBE_ANSWER_TIMEOUT, TubeRequest, timer};

/// Lines queued for one front before it counts as too slow.
const FRONT_QUEUE: usize = 256;

/// Front API connections at once; more are closed at once.
const MAX_FRONTS: usize = 64;

/// `forward_listen` listeners per front connection.
const MAX_FORWARD_LISTENERS: usize = 16;

/// Longest time one line may take to write to a front.
const FRONT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

impl Node {
    pub(super) fn spawn_front(self: &Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        // Messages are single lines: without TCP_NODELAY, Nagle meeting the front's delayed
        // ACK held a connection request back for 24-38 ms on every chain build.
        tube_net::tune_tcp(&tcp);
        let (tx, rx) = mpsc::channel(FRONT_QUEUE);
        let id = {
            let mut st = self.state();
            if st.fronts.len() >= MAX_FRONTS {
                tracing::warn!(%peer, "too many front API connections, closing");
                return;
            }
            st.next_front += 1;
            let id = st.next_front;
            st.fronts.insert(
                id,
                FrontSlot {
                    tx,
                    subscribed: false,
                    gone: self.token.child_token(),
                    listeners: 0,
                },
            );
            id
        };
        let span = tracing::debug_span!("front", front = id, %peer);
        let node = self.clone();
        // Not through `spawn`: on cancel the task flushes its queue (the `closed` pushes).
        self.tracker
            .spawn(async move { node.serve_front(id, tcp, rx).await }.instrument(span));
    }

    async fn serve_front(
        self: Arc<Self>,
        id: u64,
        tcp: TcpStream,
        mut rx: mpsc::Receiver<FrontMessage>,
    ) {
        tracing::debug!("front connected");
        let (mut rd, mut wr) = tcp.into_split();
        let mut lines = LineBuffer::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                _ = self.token.cancelled() => {
                    while let Ok(m) = rx.try_recv() {
                        if !write_line(&mut wr, &m).await {
                            break;
                        }
                    }
                    break;
                }
                m = rx.recv() => match m {
                    Some(m) => if !write_line(&mut wr, &m).await { break },
                    None => break,
                },
                n = rd.read(&mut buf) => {
                    let n = match n {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let mut input = buf.get(..n).unwrap_or_default();
                    while !input.is_empty() {
                        match lines.poll_line(&mut input) {
                            Ok(Some(line)) => self.handle_front(id, &line).await,
                            Ok(None) => break,
                            Err(e) => self.front_error(id, ChainErrorCode::ProtocolError, e.to_string()),
                        }
                    }
                }
            }
        }
        let _ = wr.shutdown().await;
        self.front_gone(id).await;
        tracing::debug!("front disconnected");
    }

    async fn handle_front(self: &Arc<Self>, id: u64, line: &[u8]) {
        let msg = match decode_line(line) {
            Ok(m) if m.is_from_front() => m,
            Ok(m) => {
                let why = format!("{} is sent by the node, not a front", m.kind());
                return self.front_error(id, ChainErrorCode::ProtocolError, why);
            }
            Err(e) => {
                return self.front_error(id, ChainErrorCode::ProtocolError, e.to_string());
            }
        };
        tracing::debug!(kind = msg.kind(), "from front");
        match msg {
            FrontMessage::RequestTube {
                endpoint_name,
                local_id,
            } => {
                self.front_request_tube(id, endpoint_name, local_id, None)
                    .await
            }
            FrontMessage::RequestCloseTube {
                local_id,
                tunnel_id,
            } => {
                let found = {
                    let st = self.state();
                    match (&local_id, &tunnel_id) {
                        (_, Some(t)) => st.chains.contains_key(t).then(|| t.clone()),
                        (Some(l), None) => st
                            .chains
                            .iter()
                            .find(|(_, c)| {
                                c.role == ChainRole::Requester && c.local_id.as_ref() == Some(l)
                            })
                            .map(|(t, _)| t.clone()),
                        (None, None) => None,
                    }
                };
                match found {
                    Some(tunnel_id) => {
                        self.send_hub(HubMessage::RequestCloseTube { tunnel_id })
                            .await;
                    }
                    None => {
                        let what = match (local_id, tunnel_id) {
                            (_, Some(t)) => format!("tunnel_id {t}"),
                            (Some(l), None) => format!("local_id {l}"),
                            (None, None) => String::new(),
                        };
                        let msg = format!("no chain with {what}");
                        self.front_error(id, ChainErrorCode::UnknownTunnel, msg);
                    }
                }
            }
            FrontMessage::Approve {
                tunnel_id,
                is_allowed,
                reason,
                forward,
            } => {
                self.front_approve(id, tunnel_id, is_allowed, reason, forward)
                    .await
            }
            FrontMessage::ForwardListen {
                endpoint_name,
                local,
            } => self.front_forward_listen(id, endpoint_name, local).await,
            FrontMessage::Listening { tunnel_id, port } => {
                let waiting = self.state().listen_waits.remove(&tunnel_id);
                match waiting {
                    Some(tx) => {
                        let _ = tx.send(port);
                    }
                    None => {
                        let msg = format!("no listen pending for tunnel_id {tunnel_id}");
                        self.front_error(id, ChainErrorCode::UnknownTunnel, msg);
                    }
                }
            }
            FrontMessage::List {} => {
                let st = self.state();
                st.push(id, st.tubes());
            }
            FrontMessage::Subscribe {} => {
                let mut st = self.state();
                if let Some(slot) = st.fronts.get_mut(&id) {
                    slot.subscribed = true;
                }
                st.push(id, st.tubes());
            }
            // `is_from_front` let only the seven messages above through.
            _ => {}
        }
    }

    /// A chain request of front `id`: its own `request_tube`, or (with `near`) one of its
    /// `forward_listen` listeners' connections. A refusal resets `near`.
    async fn front_request_tube(
        self: &Arc<Self>,
        id: u64,
        endpoint_name: String,
        local_id: String,
        near: Option<Near>,
    ) {
        let refusal = {
            let st = self.state();
            if !self.online() {
                Some((
                    ChainErrorCode::NotAuthenticated,
                    "no hub session (reconnecting)",
                ))
            } else if st.local_id_in_use(&local_id) {
                Some((ChainErrorCode::ProtocolError, "local_id already in use"))
            } else if st.chains.len() + st.tube_requests.len() >= self.config.max_chains {
                Some((ChainErrorCode::Limit, "node at its chain limit"))
            } else {
                None
            }
        };
        if let Some((code, reason)) = refusal {
            let msg = FrontMessage::TubeResult {
                local_id,
                is_allowed: false,
                reason: reason.into(),
                tunnel_id: None,
                code: Some(code as u16),
                hops: None,
            };
            return self.state().push(id, msg);
        }
        let hub_id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (done, timer) = timer();
        {
            let mut st = self.state();
            // A listener's connection can arrive as its front leaves: checked under the same
            // lock `front_gone` takes, so the request is never left without its front (the
            // dropped `near` resets the user).
            if !st.fronts.contains_key(&id) {
                return;
            }
            st.tube_requests.insert(
                hub_id,
                TubeRequest {
                    front: id,
                    local_id: local_id.clone(),
                    endpoint: endpoint_name.clone(),
                    near,
                    _timer: timer,
                },
            );
        }
        self.send_hub(HubMessage::RequestTube {
            id: hub_id,
            endpoint_name,
            local_id,
        })
        .await;
        let node = self.clone();
        self.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(TUBE_ANSWER_TIMEOUT) => {}
                _ = done.cancelled() => return,
            }
            let mut st = node.state();
            if let Some(req) = st.tube_requests.remove(&hub_id) {
                let msg = FrontMessage::TubeResult {
                    local_id: req.local_id,
                    is_allowed: false,
                    reason: "no answer from the hub".into(),
                    tunnel_id: None,
                    code: Some(ChainErrorCode::Timeout as u16),
                    hops: None,
                };
                st.push(req.front, msg);
            }
        });
    }

    /// `forward_listen`: binds `local` and gives every connection accepted there a chain of its
    /// own to `endpoint_name` (the connection is node 0's near end), until the front's
    /// connection closes.
    async fn front_forward_listen(self: &Arc<Self>, id: u64, endpoint_name: String, local: String) {
        let addr = match local.parse::<SocketAddr>() {
            Ok(a) if a.ip().is_loopback() => a,
            _ => {
                let msg = format!("local {local} is not a loopback ip:port");
                return self.front_error(id, ChainErrorCode::ProtocolError, msg);
            }
        };
        let gone = {
            let mut st = self.state();
            match st.fronts.get_mut(&id) {
                Some(slot) if slot.listeners < MAX_FORWARD_LISTENERS => {
                    slot.listeners += 1;
                    Some(slot.gone.clone())
                }
                Some(_) => None,
                None => return,
            }
        };
        let Some(gone) = gone else {
            let msg = format!("at most {MAX_FORWARD_LISTENERS} forward_listen per connection");
            return self.front_error(id, ChainErrorCode::Limit, msg);
        };
        let bound = async {
            let listener = TcpListener::bind(addr).await?;
            let bound = listener.local_addr()?;
            std::io::Result::Ok((listener, bound))
        };
        let (listener, bound) = match bound.await {
            Ok(x) => x,
            Err(e) => {
                if let Some(slot) = self.state().fronts.get_mut(&id) {
                    slot.listeners -= 1;
                }
                let msg = format!("cannot listen on {addr}: {e}");
                return self.front_error(id, ChainErrorCode::Unavailable, msg);
            }
        };
        self.state().push(
            id,
            FrontMessage::ForwardListening {
                endpoint_name: endpoint_name.clone(),
                local: bound.to_string(),
            },
        );
        tracing::info!(%bound, endpoint = %endpoint_name, "forwarding a local port");
        let node = self.clone();
        self.spawn(async move {
            let _open = node.stats.listener_opened();
            // Declared after the guard, so dropped before it: the count falls once the port
            // is closed.
            let listener = listener;
            while let Some((tcp, peer)) = tube_net::accept(&listener, &gone, "forward").await {
                tube_net::tune_tcp(&tcp);
                let local_id = format!("fwd-{:016x}", super::random_u64());
                tracing::debug!(%peer, %local_id, "forwarded connection, requesting a chain");
                let near = Near::new(tcp, bound.port());
                node.front_request_tube(id, endpoint_name.clone(), local_id, Some(near))
                    .await;
            }
            tracing::info!(%bound, "forwarding listener closed");
        });
    }

    async fn front_approve(
        self: &Arc<Self>,
        id: u64,
        tunnel_id: String,
        is_allowed: bool,
        mut reason: String,
        forward: Option<String>,
    ) {
        let answer = {
            let mut st = self.state();
            match st.approvals.remove(&tunnel_id) {
                None => None,
                Some(a) => {
                    let mut allowed = is_allowed;
                    if allowed && st.chains.len() >= self.config.max_chains {
                        allowed = false;
                        reason = "node at its chain limit".into();
                    }
                    if allowed {
                        let mut chain = Chain::new(ChainRole::Endpoint, self.token.child_token());
                        chain.peer = Some(a.request_user);
                        chain.owner = Some(id);
                        chain.forward = forward;
                        st.chains.insert(tunnel_id.clone(), chain);
                    }
                    Some((a.hub_id, allowed))
                }
            }
        };
        match answer {
            None => {
                let msg = format!("no open question for tunnel_id {tunnel_id}");
                self.front_error(id, ChainErrorCode::UnknownTunnel, msg);
            }
            Some((hub_id, allowed)) => {
                tracing::info!(%tunnel_id, allowed, "connection request answered");
                self.send_hub(HubMessage::RequestConnectionResult {
                    id: hub_id,
                    tunnel_id,
                    is_allowed: allowed,
                    reason: if allowed { String::new() } else { reason },
                })
                .await;
            }
        }
    }

    /// A front connection closed: the chains it owns are closed through the hub.
    async fn front_gone(&self, id: u64) {
        let owned: Vec<String> = {
            let mut st = self.state();
            if let Some(slot) = st.fronts.remove(&id) {
                slot.gone.cancel();
            }
            st.tube_requests.retain(|_, r| r.front != id);
            st.chains
                .iter()
                .filter(|(_, c)| c.owner == Some(id))
                .map(|(t, _)| t.clone())
                .collect()
        };
        if self.token.is_cancelled() || !self.online() {
            return;
        }
        for tunnel_id in owned {
            tracing::info!(%tunnel_id, "owning front left, closing chain");
            self.send_hub(HubMessage::RequestCloseTube { tunnel_id })
                .await;
        }
    }
}

/// Writes one line; `false` if the front is gone or too slow.
async fn write_line(wr: &mut tokio::net::tcp::OwnedWriteHalf, msg: &FrontMessage) -> bool {
    matches!(
        timeout(FRONT_WRITE_TIMEOUT, wr.write_all(&encode_line(msg))).await,
        Ok(Ok(()))
    )
}
