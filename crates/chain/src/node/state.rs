//! The node's shared state (fronts, chains, pending questions) and the hub messages that only
//! change it: `request_tube_result`, `close_tube`, `request_connection`, `establish_connection`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};
use tube_proto::chain::{
    ChainErrorCode, ChainRole, ChainState, DEFAULT_APPROVAL_TIMEOUT, DEFAULT_MAX_PENDING_APPROVALS,
    FrontMessage, HubMessage, MAX_LIST_ITEMS, TubeInfo,
};

use super::Node;

/// Longest wait for the hub's answer to `request_tube` (approval plus choosing the chain).
pub(super) const TUBE_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Default)]
pub(super) struct State {
    pub(super) fronts: HashMap<u64, FrontSlot>,
    pub(super) next_front: u64,
    pub(super) chains: HashMap<String, Chain>,
    /// The node's `request_tube` ids awaiting the hub's answer.
    pub(super) tube_requests: HashMap<u64, TubeRequest>,
    /// Questions asked to the fronts, by tunnel id.
    pub(super) approvals: HashMap<String, Approval>,
    /// Node 0 waiting for its front's `listening`, by tunnel id.
    pub(super) listen_waits: HashMap<String, oneshot::Sender<u16>>,
}

pub(super) struct FrontSlot {
    pub(super) tx: mpsc::Sender<FrontMessage>,
    pub(super) subscribed: bool,
    /// Cancelled when the connection closes: its `forward_listen` listeners close.
    pub(super) gone: CancellationToken,
    /// Its `forward_listen` listeners.
    pub(super) listeners: usize,
}

/// A user connection accepted by a `forward_listen` listener: node 0's near end, and the
/// listener's port (the chain's `port`). Dropped before [`Near::take`] (the request refused,
/// the chain closed before it was built), it resets the connection: the user never mistakes a
/// chain that never was for a service that closed.
pub(super) struct Near {
    tcp: Option<TcpStream>,
    pub(super) port: u16,
}

impl Near {
    pub(super) fn new(tcp: TcpStream, port: u16) -> Self {
        Self {
            tcp: Some(tcp),
            port,
        }
    }

    /// The connection, to carry it.
    pub(super) fn take(mut self) -> Option<TcpStream> {
        self.tcp.take()
    }
}

impl Drop for Near {
    fn drop(&mut self) {
        if let Some(tcp) = self.tcp.take() {
            tube_net::abort_tcp(tcp);
        }
    }
}

pub(super) struct TubeRequest {
    pub(super) front: u64,
    pub(super) local_id: String,
    pub(super) endpoint: String,
    /// The near end, for a request made by a `forward_listen` listener.
    pub(super) near: Option<Near>,
    /// Ends the request's timeout task once the request is gone (answered or dropped).
    pub(super) _timer: DropGuard,
}

pub(super) struct Approval {
    pub(super) hub_id: u64,
    pub(super) request_user: String,
    /// Ends the question's timeout task once the question is gone (answered or dropped).
    pub(super) _timer: DropGuard,
}

/// A timeout task's cancellation, and the guard that cancels it when dropped with the pending
/// request it times: a request answered at once leaves no sleeping task behind.
pub(super) fn timer() -> (CancellationToken, DropGuard) {
    let token = CancellationToken::new();
    (token.clone(), token.drop_guard())
}

pub(super) struct Chain {
    pub(super) role: ChainRole,
    pub(super) state: ChainState,
    pub(super) local_id: Option<String>,
    pub(super) peer: Option<String>,
    pub(super) port: Option<u16>,
    /// The front connection that requested or approved it.
    pub(super) owner: Option<u64>,
    /// Tells the chain's task to close.
    pub(super) closing: Closing,
    /// Whether `make_tube` arrived (a second one is refused).
    pub(super) building: bool,
    /// The endpoint's signal that `establish_connection` arrived.
    pub(super) established: Option<oneshot::Sender<()>>,
    /// Node 0 of a `forward_listen` chain: the user's connection, until `make_tube` takes it.
    pub(super) near: Option<Near>,
    /// An endpoint approved with `forward`: the service the node connects the chain to.
    pub(super) forward: Option<String>,
}

/// How a chain's task is told to close: a token, and whether the close is a failure.
#[derive(Debug, Clone)]
pub(super) struct Closing {
    token: CancellationToken,
    abort: Arc<AtomicBool>,
}

impl Closing {
    /// Closes the chain; `abort` for a failure (no draining).
    pub(super) fn close(&self, abort: bool) {
        if abort {
            self.abort.store(true, Ordering::SeqCst);
        }
        self.token.cancel();
    }

    /// Resolves once the chain is closed.
    pub(super) async fn closed(&self) {
        self.token.cancelled().await;
    }

    /// Whether the chain is closed.
    pub(super) fn is_closed(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Whether the close was a failure.
    pub(super) fn aborted(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
    }
}

impl Chain {
    pub(super) fn new(role: ChainRole, token: CancellationToken) -> Self {
        Self {
            role,
            state: ChainState::Building,
            local_id: None,
            peer: None,
            port: None,
            owner: None,
            closing: Closing {
                token,
                abort: Arc::new(AtomicBool::new(false)),
            },
            building: false,
            established: None,
            near: None,
            forward: None,
        }
    }
}

impl State {
    /// Sends a line to one front; a front whose queue is full misses it (logged).
    pub(super) fn push(&self, front: u64, msg: FrontMessage) {
        if let Some(slot) = self.fronts.get(&front)
            && slot.tx.try_send(msg).is_err()
        {
            tracing::warn!(front, "front too slow, message dropped");
        }
    }

    /// Sends a line to `owner` and every subscribed front, once each.
    pub(super) fn notify(&self, owner: Option<u64>, msg: &FrontMessage) {
        for (id, slot) in &self.fronts {
            if (Some(*id) == owner || slot.subscribed) && slot.tx.try_send(msg.clone()).is_err() {
                tracing::warn!(front = id, "front too slow, message dropped");
            }
        }
    }

    pub(super) fn tubes(&self) -> FrontMessage {
        let items = self
            .chains
            .iter()
            .take(MAX_LIST_ITEMS)
            .map(|(t, c)| TubeInfo {
                tunnel_id: t.clone(),
                role: c.role,
                state: c.state,
                local_id: c.local_id.clone(),
                peer: c.peer.clone(),
                port: c.port,
            })
            .collect();
        FrontMessage::Tubes { items }
    }

    pub(super) fn local_id_in_use(&self, local_id: &str) -> bool {
        self.chains
            .values()
            .any(|c| c.role == ChainRole::Requester && c.local_id.as_deref() == Some(local_id))
            || self.tube_requests.values().any(|r| r.local_id == local_id)
    }
}

impl Node {
    pub(super) fn on_request_tube_result(
        &self,
        id: u64,
        is_allowed: bool,
        reason: String,
        tunnel_id: Option<String>,
        code: Option<u16>,
        hops: u8,
    ) {
        let mut st = self.state();
        let Some(req) = st.tube_requests.remove(&id) else {
            tracing::debug!(id, "answer to a forgotten request_tube ignored");
            return;
        };
        if is_allowed && let Some(t) = &tunnel_id {
            let mut chain = Chain::new(ChainRole::Requester, self.token.child_token());
            chain.local_id = Some(req.local_id.clone());
            chain.peer = Some(req.endpoint.clone());
            chain.owner = Some(req.front);
            if let Some(near) = req.near {
                chain.port = Some(near.port);
                chain.near = Some(near);
            }
            st.chains.insert(t.clone(), chain);
            tracing::info!(tunnel_id = %t, local_id = %req.local_id, "chain accepted by the hub");
        }
        st.push(
            req.front,
            FrontMessage::TubeResult {
                local_id: req.local_id,
                is_allowed,
                reason,
                tunnel_id,
                code,
                hops: (is_allowed && hops > 0).then_some(hops),
            },
        );
    }

    /// Closes a chain and tells its fronts `closed`. With `abort` (a failure: the hub sent a
    /// code, or the session is ending) its sockets and listener close at once, with a reset;
    /// otherwise (a node or front asked) too, unless the chain's stream is already ending on
    /// its own, which the splice then lets finish (see `hop::DRAIN`).
    pub(super) fn close_chain(
        &self,
        tunnel_id: &str,
        reason: &str,
        code: Option<u16>,
        abort: bool,
    ) {
        let mut st = self.state();
        st.listen_waits.remove(tunnel_id);
        let withdrawn = st.approvals.remove(tunnel_id).is_some();
        let Some(chain) = st.chains.remove(tunnel_id) else {
            if withdrawn {
                tracing::info!(%tunnel_id, "connection request withdrawn by the hub");
            }
            return;
        };
        chain.closing.close(abort);
        tracing::info!(%tunnel_id, reason = %reason, "chain closed");
        let msg = FrontMessage::Closed {
            tunnel_id: tunnel_id.to_owned(),
            reason: reason.to_owned(),
            code,
        };
        st.notify(chain.owner, &msg);
    }

    /// Closes every chain (the session is ending).
    pub(super) fn close_all(&self, reason: &str) {
        let ids: Vec<String> = self.state().chains.keys().cloned().collect();
        for id in ids {
            self.close_chain(&id, reason, None, true);
        }
        let mut st = self.state();
        st.approvals.clear();
        st.listen_waits.clear();
        st.tube_requests.clear();
    }

    pub(super) async fn on_request_connection(
        self: &Arc<Self>,
        id: u64,
        request_user: String,
        tunnel_id: String,
    ) {
        let asked = {
            let mut st = self.state();
            let subscribed = st.fronts.values().any(|f| f.subscribed);
            if !subscribed {
                Err("no front")
            } else if st.approvals.len() >= DEFAULT_MAX_PENDING_APPROVALS {
                Err("too many pending approvals")
            } else if st.chains.len() >= self.config.max_chains {
                Err("node at its chain limit")
            } else if st.approvals.contains_key(&tunnel_id) || st.chains.contains_key(&tunnel_id) {
                Err("duplicate tunnel id")
            } else {
                let msg = FrontMessage::ConnectionRequest {
                    tunnel_id: tunnel_id.clone(),
                    request_user: request_user.clone(),
                };
                st.notify(None, &msg);
                let (done, timer) = timer();
                st.approvals.insert(
                    tunnel_id.clone(),
                    Approval {
                        hub_id: id,
                        request_user,
                        _timer: timer,
                    },
                );
                Ok(done)
            }
        };
        let done = match asked {
            Ok(done) => done,
            Err(reason) => {
                tracing::info!(%tunnel_id, reason, "connection request refused");
                self.send_hub(HubMessage::RequestConnectionResult {
                    id,
                    tunnel_id,
                    is_allowed: false,
                    reason: reason.into(),
                })
                .await;
                return;
            }
        };
        let node = self.clone();
        self.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(DEFAULT_APPROVAL_TIMEOUT) => {}
                _ = done.cancelled() => return,
            }
            let expired = node.state().approvals.remove(&tunnel_id);
            if let Some(a) = expired {
                tracing::info!(%tunnel_id, "no front answered the connection request");
                node.send_hub(HubMessage::RequestConnectionResult {
                    id: a.hub_id,
                    tunnel_id,
                    is_allowed: false,
                    reason: "no answer from the front".into(),
                })
                .await;
            }
        });
    }

    pub(super) fn on_establish(&self, tunnel_id: &str, local_id: String, endpoint_user: String) {
        let mut st = self.state();
        let Some(chain) = st.chains.get_mut(tunnel_id) else {
            tracing::debug!(%tunnel_id, "establish_connection for an unknown chain ignored");
            return;
        };
        chain.state = ChainState::Established;
        chain.local_id = Some(local_id.clone());
        if let Some(tx) = chain.established.take() {
            let _ = tx.send(());
        }
        let (owner, port) = (chain.owner, chain.port);
        let Some(port) = port else {
            tracing::warn!(%tunnel_id, "establish_connection before this node's part was built");
            return;
        };
        tracing::info!(%tunnel_id, "chain established");
        let msg = FrontMessage::Established {
            tunnel_id: tunnel_id.to_owned(),
            local_id,
            endpoint_user,
            port,
        };
        st.notify(owner, &msg);
    }

    /// The answer a front gets for a request the node refuses itself.
    pub(super) fn front_error(&self, front: u64, code: ChainErrorCode, message: String) {
        self.state().push(front, FrontMessage::error(code, message));
    }
}
