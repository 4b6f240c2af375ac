//! The hub's shared state: online nodes, chains waiting for approval, chains being built or up.
//!
//! Everything here is synchronous and runs under one `std::sync::Mutex` (never held across an
//! `.await`): a session handler locks, applies one input, and pushes the resulting messages
//! into the nodes' bounded outboxes with `try_send`. A node whose outbox is full is too slow to
//! keep up with: its session is killed, which tears down its chains like any departure.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tube_proto::chain::{ChainErrorCode, HubMessage, MAX_REASON_LEN, format_tunnel_id};

use crate::build::{Build, HopNode};
use crate::plan::{Candidate, PlanError, PlanRequest, plan};

use super::HubConfig;

/// What a session's writer is told.
#[derive(Debug)]
pub(crate) enum Out {
    /// Send this message.
    Msg(HubMessage),
    /// Flush what came before, close the connection, stop.
    Close,
}

/// One logged-in node.
#[derive(Debug)]
pub(crate) struct NodeEntry {
    /// The session that holds the name now (a takeover replaces it).
    pub(crate) session: u64,
    pub(crate) ip: IpAddr,
    pub(crate) relay: bool,
    pub(crate) tx: mpsc::Sender<Out>,
    /// Ends the session at once, without a message.
    pub(crate) kill: CancellationToken,
    /// Tunnel ids of the chains this node takes part in, in any phase.
    pub(crate) chains: HashSet<String>,
}

#[derive(Debug)]
enum Phase {
    /// `request_connection` sent to the endpoint; waiting for its answer.
    Approval { id: u64, deadline: Instant },
    /// Approved: built (or up) by the state machine.
    Build(Box<Build>),
}

#[derive(Debug)]
struct Chain {
    requester: String,
    endpoint: String,
    local_id: String,
    /// The requester's `request_tube` id.
    request_id: u64,
    phase: Phase,
}

impl Chain {
    fn members(&self) -> Vec<String> {
        match &self.phase {
            Phase::Approval { .. } => vec![self.requester.clone(), self.endpoint.clone()],
            Phase::Build(b) => b.hops().iter().map(|h| h.name.clone()).collect(),
        }
    }
}

/// A chain as [`super::HubState::chains`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChainInfo {
    /// The chain's tunnel id.
    pub tunnel_id: String,
    /// Node names, node 0 first (only the two ends while waiting for approval).
    pub nodes: Vec<String>,
    /// `approval`, `building` or `established`.
    pub state: &'static str,
}

/// The state behind the hub's mutex.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) nodes: HashMap<String, NodeEntry>,
    chains: HashMap<String, Chain>,
    /// The last request id the hub used (`request_connection`); ids start at 1.
    last_id: u64,
    /// Set when shutdown began: no new logins.
    pub(crate) closing: bool,
    /// Slots held by logins past their checks and not yet logged in, per source
    /// ([`tube_proto::ratelimit::source_key`]) and in all: the node limits count them too.
    pub(crate) reserved: HashMap<std::net::IpAddr, usize>,
    pub(crate) reserved_total: usize,
}

/// Sends `msg` to `node` if it is online; a full or closed outbox kills its session.
fn send(nodes: &HashMap<String, NodeEntry>, node: &str, msg: HubMessage) {
    if let Some(n) = nodes.get(node)
        && n.tx.try_send(Out::Msg(msg)).is_err()
    {
        tracing::warn!(node, "node outbox full or closed, ending its session");
        n.kill.cancel();
    }
}

fn refusal(id: u64, code: ChainErrorCode, reason: impl Into<String>) -> HubMessage {
    HubMessage::RequestTubeResult {
        id,
        is_allowed: false,
        reason: truncate(reason.into()),
        tunnel_id: None,
        hops: 0,
        code: Some(code as u16),
    }
}

fn truncate(mut text: String) -> String {
    if text.len() > MAX_REASON_LEN {
        let mut end = MAX_REASON_LEN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // Without OS randomness the choice of intermediates is merely predictable, not unsafe.
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

fn random_secret() -> [u8; 32] {
    let mut b = [0u8; 32];
    if getrandom::fill(&mut b).is_err() {
        // Never use a predictable hop secret: fall back to a v4 UUID pair (also OS random).
        b[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        b[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    }
    b
}

impl State {
    /// Gives back a slot a login reserved (see [`State::reserved`]).
    pub(crate) fn unreserve(&mut self, source: std::net::IpAddr) {
        self.reserved_total = self.reserved_total.saturating_sub(1);
        if let std::collections::hash_map::Entry::Occupied(mut e) = self.reserved.entry(source) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    /// Whether `session` still holds `name`.
    pub(crate) fn holds(&self, name: &str, session: u64) -> bool {
        self.nodes.get(name).is_some_and(|n| n.session == session)
    }

    /// Names of the online nodes, sorted.
    pub(crate) fn online(&self) -> Vec<String> {
        let mut v: Vec<String> = self.nodes.keys().cloned().collect();
        v.sort();
        v
    }

    pub(crate) fn chains(&self) -> Vec<ChainInfo> {
        let mut v: Vec<ChainInfo> = self
            .chains
            .iter()
            .map(|(tid, c)| ChainInfo {
                tunnel_id: tid.clone(),
                nodes: c.members(),
                state: match &c.phase {
                    Phase::Approval { .. } => "approval",
                    Phase::Build(b) if b.is_finished() => "closed",
                    Phase::Build(b) => match b.state() {
                        crate::build::BuildState::Established => "established",
                        _ => "building",
                    },
                },
            })
            .collect();
        v.sort_by(|a, b| a.tunnel_id.cmp(&b.tunnel_id));
        v
    }

    /// The earliest deadline of any chain (approval or build step).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.chains
            .values()
            .filter_map(|c| match &c.phase {
                Phase::Approval { deadline, .. } => Some(*deadline),
                Phase::Build(b) => b.poll_timeout(),
            })
            .min()
    }

    /// Logs `name` in as `session`: an older session of the same name is ended first (its
    /// chains torn down, its connection killed without a message).
    pub(crate) fn login(&mut self, name: &str, entry: NodeEntry) {
        if let Some(old) = self.nodes.get(name) {
            tracing::info!(node = name, "newer session takes over");
            let kill = old.kill.clone();
            self.leave(name, None);
            kill.cancel();
        }
        self.nodes.insert(name.to_owned(), entry);
    }

    /// `name`'s session ended (when `session` is given, only if it still holds the name):
    /// its chains end and it is forgotten. Closing its connection is the caller's job.
    pub(crate) fn leave(&mut self, name: &str, session: Option<u64>) {
        if let Some(s) = session
            && !self.holds(name, s)
        {
            return;
        }
        let Some(entry) = self.nodes.remove(name) else {
            return;
        };
        for tid in entry.chains {
            self.node_gone(&tid, name);
        }
    }

    /// A node of chain `tid` left.
    fn node_gone(&mut self, tid: &str, name: &str) {
        let Some(chain) = self.chains.get_mut(tid) else {
            return;
        };
        match &mut chain.phase {
            Phase::Approval { .. } => {
                let (requester, endpoint, rid) = (
                    chain.requester.clone(),
                    chain.endpoint.clone(),
                    chain.request_id,
                );
                if name == endpoint {
                    let why = format!("{endpoint} went offline");
                    send(
                        &self.nodes,
                        &requester,
                        refusal(rid, ChainErrorCode::EndpointOffline, why),
                    );
                } else {
                    let msg = HubMessage::CloseTube {
                        tunnel_id: tid.to_owned(),
                        reason: truncate(format!("node {name} disconnected")),
                        code: None,
                    };
                    send(&self.nodes, &endpoint, msg);
                }
                self.forget(tid);
            }
            Phase::Build(b) => {
                b.handle_node_gone(name);
                self.flush(tid);
            }
        }
    }

    /// Sends what chain `tid`'s build queued, and forgets the chain once it is over.
    fn flush(&mut self, tid: &str) {
        let Some(chain) = self.chains.get_mut(tid) else {
            return;
        };
        let Phase::Build(b) = &mut chain.phase else {
            return;
        };
        while let Some(out) = b.poll_transmit() {
            send(&self.nodes, &out.node, out.message);
        }
        if b.is_finished() {
            self.forget(tid);
        }
    }

    /// Removes chain `tid` and its entries in its nodes.
    fn forget(&mut self, tid: &str) {
        if let Some(chain) = self.chains.remove(tid) {
            for m in chain.members() {
                if let Some(n) = self.nodes.get_mut(&m) {
                    n.chains.remove(tid);
                }
            }
        }
    }

    fn chain_count(&self, name: &str) -> usize {
        self.nodes.get(name).map_or(0, |n| n.chains.len())
    }

    fn pending_approvals(&self, endpoint: &str) -> usize {
        self.chains
            .values()
            .filter(|c| c.endpoint == endpoint && matches!(c.phase, Phase::Approval { .. }))
            .count()
    }

    /// `request_tube` from `requester` for an endpoint that is online. Returns the refusal to
    /// send, if any; otherwise `request_connection` went to the endpoint.
    pub(crate) fn request_tube(
        &mut self,
        config: &HubConfig,
        requester: &str,
        id: u64,
        endpoint: &str,
        local_id: &str,
        now: Instant,
    ) -> Option<HubMessage> {
        if !self.nodes.contains_key(endpoint) {
            return Some(refusal(
                id,
                ChainErrorCode::EndpointOffline,
                format!("{endpoint} is offline"),
            ));
        }
        for n in [requester, endpoint] {
            if self.chain_count(n) >= config.max_chains_per_node {
                return Some(refusal(
                    id,
                    ChainErrorCode::Limit,
                    format!("{n} takes part in too many chains"),
                ));
            }
        }
        if self.pending_approvals(endpoint) >= config.max_pending_approvals {
            return Some(refusal(
                id,
                ChainErrorCode::Limit,
                format!("{endpoint} has too many requests pending"),
            ));
        }
        let tid = format_tunnel_id(uuid::Uuid::new_v4().as_bytes());
        self.last_id += 1;
        let hub_id = self.last_id;
        let deadline = now + config.approval_timeout;
        self.chains.insert(
            tid.clone(),
            Chain {
                requester: requester.to_owned(),
                endpoint: endpoint.to_owned(),
                local_id: local_id.to_owned(),
                request_id: id,
                phase: Phase::Approval {
                    id: hub_id,
                    deadline,
                },
            },
        );
        for n in [requester, endpoint] {
            if let Some(e) = self.nodes.get_mut(n) {
                e.chains.insert(tid.clone());
            }
        }
        tracing::debug!(tunnel_id = %tid, requester, endpoint, "asking the endpoint");
        send(
            &self.nodes,
            endpoint,
            HubMessage::RequestConnection {
                id: hub_id,
                request_user: requester.to_owned(),
                tunnel_id: tid,
            },
        );
        None
    }

    /// `request_connection_result` from `endpoint`.
    pub(crate) fn approval(
        &mut self,
        config: &HubConfig,
        endpoint: &str,
        msg: &HubMessage,
        now: Instant,
    ) {
        let HubMessage::RequestConnectionResult {
            id,
            tunnel_id,
            is_allowed,
            reason,
        } = msg
        else {
            return;
        };
        let Some(chain) = self.chains.get(tunnel_id.as_str()) else {
            return;
        };
        let Phase::Approval { id: want, .. } = chain.phase else {
            return;
        };
        if chain.endpoint != endpoint || want != *id {
            tracing::debug!(tunnel_id = %tunnel_id, "stale or foreign approval ignored");
            return;
        }
        let (requester, rid, local_id) = (
            chain.requester.clone(),
            chain.request_id,
            chain.local_id.clone(),
        );
        if !*is_allowed {
            let why = if reason.is_empty() {
                format!("{endpoint} refused")
            } else {
                format!("{endpoint} refused: {reason}")
            };
            tracing::info!(tunnel_id = %tunnel_id, "chain denied by the endpoint");
            send(
                &self.nodes,
                &requester,
                refusal(rid, ChainErrorCode::Denied, why),
            );
            self.forget(tunnel_id);
            return;
        }
        // Plan among the online nodes; this chain already counts for both ends, so leave it out.
        let candidates: Vec<Candidate> = self
            .nodes
            .iter()
            .map(|(name, n)| Candidate {
                name: name.clone(),
                relay: n.relay,
                online: true,
                busy_chains: n.chains.len() - usize::from(n.chains.contains(tunnel_id)),
            })
            .collect();
        let req = PlanRequest {
            from: &requester,
            to: endpoint,
            intermediates: config.intermediates,
            max_chains_per_node: config.max_chains_per_node,
        };
        let planned = plan(&req, &candidates, random_u64());
        let hops = match planned {
            Ok(p) => p.hops,
            Err(e) => {
                let code = match e {
                    PlanError::SameNode => ChainErrorCode::Denied,
                    PlanError::UnknownNode(_) => ChainErrorCode::UnknownNode,
                    PlanError::Offline(_) => ChainErrorCode::EndpointOffline,
                    PlanError::Busy(_) => ChainErrorCode::Limit,
                };
                self.refuse_approved(tunnel_id, &requester, rid, code, e.to_string());
                return;
            }
        };
        let hop_nodes: Vec<HopNode> = hops
            .iter()
            .filter_map(|n| {
                self.nodes.get(n).map(|e| HopNode {
                    name: n.clone(),
                    ip: e.ip,
                })
            })
            .collect();
        let Some(tid_bytes) = tube_proto::chain::parse_tunnel_id(tunnel_id) else {
            return;
        };
        let build = match Build::new(
            tid_bytes,
            local_id,
            hop_nodes,
            now,
            config.hop_timeout,
            random_secret,
        ) {
            Ok(b) => b,
            Err(e) => {
                let why = e.to_string();
                self.refuse_approved(tunnel_id, &requester, rid, ChainErrorCode::BuildFailed, why);
                return;
            }
        };
        let hop_count = u8::try_from(hops.len() - 1).unwrap_or(u8::MAX);
        // Fewer relaying nodes online than asked for: the chain is shorter, and says so.
        let intermediates = hops.len().saturating_sub(2);
        let reason = if intermediates < config.intermediates {
            format!(
                "only {intermediates} intermediate(s) available ({} wanted)",
                config.intermediates
            )
        } else {
            String::new()
        };
        send(
            &self.nodes,
            &requester,
            HubMessage::RequestTubeResult {
                id: rid,
                is_allowed: true,
                reason,
                tunnel_id: Some(tunnel_id.clone()),
                hops: hop_count,
                code: None,
            },
        );
        for n in &hops {
            if let Some(e) = self.nodes.get_mut(n) {
                e.chains.insert(tunnel_id.clone());
            }
        }
        tracing::info!(tunnel_id = %tunnel_id, hops = hop_count, "building chain");
        if let Some(c) = self.chains.get_mut(tunnel_id.as_str()) {
            c.phase = Phase::Build(Box::new(build));
        }
        self.flush(tunnel_id);
    }

    /// Refuses an approved request that cannot be built: the requester gets the refusal, the
    /// endpoint (which approved) `close_tube`.
    fn refuse_approved(
        &mut self,
        tid: &str,
        requester: &str,
        rid: u64,
        code: ChainErrorCode,
        why: String,
    ) {
        let endpoint = self.chains.get(tid).map(|c| c.endpoint.clone());
        send(&self.nodes, requester, refusal(rid, code, why.clone()));
        if let Some(ep) = endpoint {
            send(
                &self.nodes,
                &ep,
                HubMessage::CloseTube {
                    tunnel_id: tid.to_owned(),
                    reason: truncate(why),
                    code: Some(code as u16),
                },
            );
        }
        self.forget(tid);
    }

    /// `make_tube_result` from `node`.
    pub(crate) fn make_tube_result(&mut self, node: &str, msg: &HubMessage, now: Instant) {
        let Some(tid) = msg.tunnel_id().map(str::to_owned) else {
            return;
        };
        let Some(chain) = self.chains.get_mut(&tid) else {
            return;
        };
        if let Phase::Build(b) = &mut chain.phase {
            b.handle_result(node, msg, now);
            self.flush(&tid);
        }
    }

    /// `request_close_tube` from `node`: ignored unless `node` is part of the chain.
    pub(crate) fn request_close(&mut self, node: &str, tid: &str) {
        let Some(chain) = self.chains.get_mut(tid) else {
            return;
        };
        if !chain.members().iter().any(|m| m == node) {
            return;
        }
        tracing::info!(tunnel_id = %tid, node, "chain closed on request");
        match &mut chain.phase {
            Phase::Approval { .. } => {
                let (requester, rid, endpoint) = (
                    chain.requester.clone(),
                    chain.request_id,
                    chain.endpoint.clone(),
                );
                let why = format!("closed by {node}");
                send(
                    &self.nodes,
                    &requester,
                    refusal(rid, ChainErrorCode::Denied, why.clone()),
                );
                send(
                    &self.nodes,
                    &endpoint,
                    HubMessage::CloseTube {
                        tunnel_id: tid.to_owned(),
                        reason: why,
                        code: None,
                    },
                );
                self.forget(tid);
            }
            Phase::Build(b) => {
                b.close(format!("closed by {node}"));
                self.flush(tid);
            }
        }
    }

    /// Time passed: late approvals and late build steps fail (6007).
    pub(crate) fn handle_timeouts(&mut self, now: Instant) {
        let due: Vec<String> = self
            .chains
            .iter()
            .filter(|(_, c)| match &c.phase {
                Phase::Approval { deadline, .. } => *deadline <= now,
                Phase::Build(b) => b.poll_timeout().is_some_and(|d| d <= now),
            })
            .map(|(t, _)| t.clone())
            .collect();
        for tid in due {
            let Some(chain) = self.chains.get_mut(&tid) else {
                continue;
            };
            match &mut chain.phase {
                Phase::Approval { .. } => {
                    let (requester, rid) = (chain.requester.clone(), chain.request_id);
                    let why = format!("{} did not answer in time", chain.endpoint);
                    tracing::info!(tunnel_id = %tid, "approval timed out");
                    self.refuse_approved(&tid, &requester, rid, ChainErrorCode::Timeout, why);
                }
                Phase::Build(b) => {
                    b.handle_timeout(now);
                    self.flush(&tid);
                }
            }
        }
    }

    /// Hub shutdown: every chain ends with 6013, every session gets `error` 6013 and is
    /// closed; no new logins from now on.
    pub(crate) fn shut_down(&mut self) {
        self.closing = true;
        let tids: Vec<String> = self.chains.keys().cloned().collect();
        for tid in tids {
            let Some(chain) = self.chains.get_mut(&tid) else {
                continue;
            };
            match &mut chain.phase {
                Phase::Approval { .. } => {
                    let (requester, rid) = (chain.requester.clone(), chain.request_id);
                    let why = "the hub is shutting down".to_owned();
                    self.refuse_approved(&tid, &requester, rid, ChainErrorCode::ShuttingDown, why);
                }
                Phase::Build(b) => {
                    b.fail(ChainErrorCode::ShuttingDown, "the hub is shutting down");
                    self.flush(&tid);
                }
            }
        }
        for n in self.nodes.values() {
            let bye = HubMessage::error(ChainErrorCode::ShuttingDown, "the hub is shutting down");
            if n.tx.try_send(Out::Msg(bye)).is_err() || n.tx.try_send(Out::Close).is_err() {
                n.kill.cancel();
            }
        }
    }
}
