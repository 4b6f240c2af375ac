//! The hub's state machine for building and tearing down one chain (seed 000, section 2;
//! `docs/protocols/chain.md` sections 5.2, 5.3 and 7).
//!
//! Nodes are built **one at a time, node 0 first**: each `make_tube` goes out only after the
//! previous node's `make_tube_result`, because it carries that node's listening port. Each link
//! i -> i+1 gets one fresh 32-byte secret: node i *listens* and requires it (`secret_in`),
//! node i+1 *dials* node i and presents it (`secret_out`).
//!
//! ```text
//!  hub:   make_tube #1 ----> node0   from: null            to: ip1   in: S0
//!         <---- result #1 (port p0)
//!         make_tube #2 ----> n1      from: ip0:p0  out: S0  to: ip2   in: S1
//!         <---- result #2 (port p1)
//!         make_tube #3 ----> node2   from: ip1:p1  out: S1  to: null
//!         <---- result #3 (port null)
//!         establish_connection ----> node2 (endpoint), then ----> node0
//!
//!  hops:  node0 <--TCP-- n1 <--TCP-- node2     (each node dials the previous one)
//! ```
//!
//! A refusal, an accepted answer without a port (on any node but the endpoint), a missing
//! answer within the per-hop timeout, or any chain node leaving ends the build: `close_tube`
//! goes once to every node that has heard of the chain and is still connected (every node
//! asked so far, the one that failed included, plus the endpoint, which approved the chain
//! before the build), and the state becomes [`BuildState::Failed`]. After establishment a node
//! leaving, or [`Build::close`], tears the chain down the same way, to every node.
//!
//! Pure, in the style of `STYLE.md` section 2: [`Build::handle_result`],
//! [`Build::handle_timeout`] and [`Build::handle_node_gone`] take input (and `now`);
//! [`Build::poll_transmit`] and [`Build::poll_timeout`] say what to do. No IO, no clock; the
//! hop secrets come from the caller.

use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tube_proto::chain::{
    ChainErrorCode, ChainSecret, HubMessage, MAX_HOPS, MAX_REASON_LEN, format_tunnel_id,
};

/// One node of the chain, as the hub sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopNode {
    /// The node's account name (its hub session).
    pub name: String,
    /// The source IP of the node's hub connection: what the other nodes see (chain.md 5.3).
    pub ip: IpAddr,
}

/// A message for the hub to send on one node's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The node's account name.
    pub node: String,
    /// The message.
    pub message: HubMessage,
}

/// Where the build stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildState {
    /// Waiting for the `make_tube_result` of the node at this index (0 = node 0).
    Building {
        /// Index in the hops of the node whose answer is awaited.
        hop: usize,
    },
    /// Every node answered; `establish_connection` went to the endpoint and node 0.
    Established,
    /// The build or the chain failed; `close_tube` carried `code`.
    Failed {
        /// The code sent in `close_tube`.
        code: ChainErrorCode,
        /// The reason sent in `close_tube`.
        reason: String,
    },
    /// The chain was closed on request or by a node leaving after establishment.
    Closed,
}

impl BuildState {
    /// Whether the chain is over (failed or closed).
    pub fn is_finished(&self) -> bool {
        matches!(self, Self::Failed { .. } | Self::Closed)
    }
}

/// Why a build cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// A chain needs at least node 0 and the endpoint.
    #[error("a chain needs at least 2 nodes, got {0}")]
    TooFewHops(usize),
    /// More hop connections than the protocol allows ([`MAX_HOPS`]).
    #[error("a chain has at most {max} hop connections, got {0}", max = MAX_HOPS)]
    TooManyHops(usize),
    /// A node appears twice in the chain.
    #[error("node {0:?} appears twice in the chain")]
    DuplicateNode(String),
}

/// The answer the build is waiting for.
#[derive(Debug, Clone)]
struct Awaited {
    /// Index of the node in `hops`.
    hop: usize,
    /// Id of its `make_tube`.
    id: u64,
    /// When the answer is late (`None`: beyond what `Instant` can hold).
    deadline: Option<Instant>,
}

/// Builds and tears down one chain. See the [module documentation](self).
#[derive(Debug)]
pub struct Build {
    tunnel_id: String,
    local_id: String,
    hops: Vec<HopNode>,
    /// `secrets[i]` protects the link from node i+1 to node i.
    secrets: Vec<ChainSecret>,
    timeout_per_hop: Duration,
    /// The last request id used (ids start at 1).
    last_id: u64,
    /// Number of nodes sent a `make_tube` so far (they are a prefix of `hops`).
    asked: usize,
    /// Port each node reported (`None` until it answered).
    ports: Vec<Option<u16>>,
    awaited: Option<Awaited>,
    gone: HashSet<String>,
    queue: VecDeque<Outgoing>,
    state: BuildState,
    ignored: u64,
}

impl Build {
    /// Starts building `hops` (node 0 first, the endpoint last) as tunnel `tunnel_id`, and
    /// queues the first `make_tube`, to node 0, whose answer is due `timeout_per_hop` after
    /// `now` (the protocol's default is [`tube_proto::chain::DEFAULT_HOP_BUILD_TIMEOUT`]).
    ///
    /// `local_id` is node 0's label for the chain, handed back in `establish_connection`.
    /// `secrets` is called once per link, in chain order (the link from node 1 to node 0
    /// first), for 32 fresh random bytes each.
    ///
    /// Refuses fewer than 2 nodes, more than [`MAX_HOPS`] hop connections, and a node named
    /// twice.
    pub fn new(
        tunnel_id: [u8; 16],
        local_id: impl Into<String>,
        hops: Vec<HopNode>,
        now: Instant,
        timeout_per_hop: Duration,
        mut secrets: impl FnMut() -> [u8; 32],
    ) -> Result<Build, BuildError> {
        if hops.len() < 2 {
            return Err(BuildError::TooFewHops(hops.len()));
        }
        if hops.len() - 1 > usize::from(MAX_HOPS) {
            return Err(BuildError::TooManyHops(hops.len() - 1));
        }
        let mut names = HashSet::new();
        for hop in &hops {
            if !names.insert(hop.name.as_str()) {
                return Err(BuildError::DuplicateNode(hop.name.clone()));
            }
        }
        let secrets = (1..hops.len())
            .map(|_| ChainSecret::from_bytes(&secrets()))
            .collect();
        let mut build = Build {
            tunnel_id: format_tunnel_id(&tunnel_id),
            local_id: local_id.into(),
            ports: vec![None; hops.len()],
            hops,
            secrets,
            timeout_per_hop,
            last_id: 0,
            asked: 0,
            awaited: None,
            gone: HashSet::new(),
            queue: VecDeque::new(),
            state: BuildState::Building { hop: 0 },
            ignored: 0,
        };
        build.ask(0, now);
        Ok(build)
    }

    /// The chain's tunnel id in canonical text.
    pub fn tunnel_id(&self) -> &str {
        &self.tunnel_id
    }

    /// The chain's nodes, node 0 first.
    pub fn hops(&self) -> &[HopNode] {
        &self.hops
    }

    /// Where the build stands.
    pub fn state(&self) -> &BuildState {
        &self.state
    }

    /// Whether the chain is over (failed or closed). Teardown messages may still wait in
    /// [`Build::poll_transmit`].
    pub fn is_finished(&self) -> bool {
        self.state.is_finished()
    }

    /// How many inputs were ignored: results from the wrong node, with the wrong id or tunnel,
    /// duplicates, results after the end, and messages that are not `make_tube_result`.
    pub fn ignored(&self) -> u64 {
        self.ignored
    }

    /// The node and request id whose `make_tube_result` is awaited, while building.
    pub fn awaiting(&self) -> Option<(&str, u64)> {
        let awaited = self.awaited.as_ref()?;
        let node = self.hops.get(awaited.hop)?;
        Some((node.name.as_str(), awaited.id))
    }

    /// The next message to send, if any. Drain it after every `new` / `handle_*` / `close`.
    pub fn poll_transmit(&mut self) -> Option<Outgoing> {
        self.queue.pop_front()
    }

    /// When [`Build::handle_timeout`] must be called next: the deadline of the awaited answer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.awaited.as_ref().and_then(|a| a.deadline)
    }

    /// An answer from `node`. Only the `make_tube_result` of the awaited node, with the awaited
    /// id and this chain's tunnel id, counts; anything else is ignored (see
    /// [`Build::ignored`]). A refusal, or an acceptance without a port from any node but the
    /// endpoint, fails the build (6006 BUILD_FAILED).
    pub fn handle_result(&mut self, node: &str, msg: &HubMessage, now: Instant) {
        let HubMessage::MakeTubeResult {
            id,
            tunnel_id,
            is_allowed,
            port,
            reason,
        } = msg
        else {
            self.ignored += 1;
            return;
        };
        let Some(awaited) = self.awaited.clone() else {
            self.ignored += 1;
            return;
        };
        let Some(expected) = self.hops.get(awaited.hop) else {
            self.ignored += 1;
            return;
        };
        if expected.name != node || awaited.id != *id || self.tunnel_id != *tunnel_id {
            self.ignored += 1;
            return;
        }
        let last = awaited.hop + 1 == self.hops.len();
        if !*is_allowed {
            let why = if reason.is_empty() {
                format!("node {node} refused make_tube")
            } else {
                format!("node {node} refused make_tube: {reason}")
            };
            self.teardown(Some(ChainErrorCode::BuildFailed), why);
            return;
        }
        // The endpoint's port is not used (chain.md: it answers `null`); any other node must
        // name the port the next node will dial.
        let port = port.filter(|p| *p != 0);
        if !last && port.is_none() {
            self.teardown(
                Some(ChainErrorCode::BuildFailed),
                format!("node {node} accepted make_tube without a port"),
            );
            return;
        }
        if let Some(slot) = self.ports.get_mut(awaited.hop) {
            *slot = port;
        }
        self.awaited = None;
        if last {
            self.establish();
        } else {
            self.ask(awaited.hop + 1, now);
        }
    }

    /// Time passed: if the awaited answer is late at `now`, the build fails (6007 TIMEOUT).
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(awaited) = &self.awaited else {
            return;
        };
        let Some(deadline) = awaited.deadline else {
            return;
        };
        if now < deadline {
            return;
        }
        let name = self
            .hops
            .get(awaited.hop)
            .map(|h| h.name.clone())
            .unwrap_or_default();
        let why = format!(
            "node {name} did not answer make_tube within {:?}",
            self.timeout_per_hop
        );
        self.teardown(Some(ChainErrorCode::Timeout), why);
    }

    /// `node`'s hub session ended. Nothing more is sent to it (queued messages to it are
    /// dropped). If it is a node of this chain: during the build, the build fails
    /// (6006 BUILD_FAILED); after establishment, the chain is closed. Either way the other
    /// nodes get `close_tube`.
    pub fn handle_node_gone(&mut self, node: &str) {
        if !self.hops.iter().any(|h| h.name == node) {
            return;
        }
        self.gone.insert(node.to_owned());
        self.queue.retain(|o| o.node != node);
        let why = format!("node {node} disconnected");
        match self.state {
            BuildState::Building { .. } => self.teardown(Some(ChainErrorCode::BuildFailed), why),
            BuildState::Established => self.teardown(None, why),
            BuildState::Failed { .. } | BuildState::Closed => {}
        }
    }

    /// Closes the chain on request (a node's `request_close_tube`, say): `close_tube` without
    /// a code to every node that has heard of it; the state becomes [`BuildState::Closed`].
    /// Does nothing once the chain is over (the first cause wins).
    pub fn close(&mut self, reason: impl Into<String>) {
        self.teardown(None, reason.into());
    }

    /// Ends the chain for a cause from outside the build (hub shutdown: 6013 SHUTTING_DOWN):
    /// `close_tube` with `code` to every node that has heard of it; the state becomes
    /// [`BuildState::Failed`]. Does nothing once the chain is over.
    pub fn fail(&mut self, code: ChainErrorCode, reason: impl Into<String>) {
        self.teardown(Some(code), reason.into());
    }

    /// Queues `make_tube` for the node at `hop` and waits for its answer.
    fn ask(&mut self, hop: usize, now: Instant) {
        let Some(node) = self.hops.get(hop) else {
            return;
        };
        let from = match hop.checked_sub(1) {
            None => None,
            Some(prev) => {
                let (Some(prev_node), Some(Some(port))) =
                    (self.hops.get(prev), self.ports.get(prev))
                else {
                    // Unreachable: `ask(hop)` follows the previous node's answer with a port.
                    return;
                };
                Some(SocketAddr::new(prev_node.ip, *port).to_string())
            }
        };
        let to = self.hops.get(hop + 1).map(|next| next.ip.to_string());
        let secret_in = to.as_ref().and_then(|_| self.secrets.get(hop).cloned());
        let secret_out = from.as_ref().and_then(|_| {
            hop.checked_sub(1)
                .and_then(|i| self.secrets.get(i).cloned())
        });
        self.last_id += 1;
        let id = self.last_id;
        self.queue.push_back(Outgoing {
            node: node.name.clone(),
            message: HubMessage::MakeTube {
                id,
                tunnel_id: self.tunnel_id.clone(),
                from,
                to,
                secret_in,
                secret_out,
            },
        });
        self.asked = self.asked.max(hop + 1);
        self.awaited = Some(Awaited {
            hop,
            id,
            deadline: now.checked_add(self.timeout_per_hop),
        });
        self.state = BuildState::Building { hop };
    }

    /// Queues `establish_connection` to the endpoint, then to node 0 (chain.md 5.3).
    fn establish(&mut self) {
        let endpoint_user = self.hops.last().map(|h| h.name.clone()).unwrap_or_default();
        let message = HubMessage::EstablishConnection {
            tunnel_id: self.tunnel_id.clone(),
            local_id: self.local_id.clone(),
            endpoint_user: endpoint_user.clone(),
        };
        let requester = self.hops.first().map(|h| h.name.clone());
        for node in [Some(endpoint_user), requester].into_iter().flatten() {
            self.queue.push_back(Outgoing {
                node,
                message: message.clone(),
            });
        }
        self.state = BuildState::Established;
    }

    /// Queues `close_tube` once to every node that has heard of the chain and is still
    /// connected, and ends the chain. No-op once it is over.
    fn teardown(&mut self, code: Option<ChainErrorCode>, reason: String) {
        if self.state.is_finished() {
            return;
        }
        let reason = truncate(reason, MAX_REASON_LEN);
        let last = self.hops.len().saturating_sub(1);
        for (i, hop) in self.hops.iter().enumerate() {
            let heard = i < self.asked || i == last;
            if heard && !self.gone.contains(&hop.name) {
                self.queue.push_back(Outgoing {
                    node: hop.name.clone(),
                    message: HubMessage::CloseTube {
                        tunnel_id: self.tunnel_id.clone(),
                        reason: reason.clone(),
                        code: code.map(|c| c as u16),
                    },
                });
            }
        }
        self.awaited = None;
        self.state = match code {
            Some(code) => BuildState::Failed { code, reason },
            None => BuildState::Closed,
        };
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const TID: [u8; 16] = [
        0x8f, 0xb8, 0x89, 0xf4, 0xa7, 0x66, 0x48, 0xf0, 0x8e, 0x58, 0x1c, 0x5e, 0xbd, 0xb9, 0xd0,
        0x88,
    ];
    const TID_TEXT: &str = "8fb889f4-a766-48f0-8e58-1c5ebdb9d088";
    const T: Duration = Duration::from_secs(10);

    fn name(i: usize) -> String {
        format!("node{i}")
    }

    fn ip(i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, i as u8 + 1))
    }

    fn nodes(n: usize) -> Vec<HopNode> {
        (0..n)
            .map(|i| HopNode {
                name: name(i),
                ip: ip(i),
            })
            .collect()
    }

    fn counter() -> impl FnMut() -> [u8; 32] {
        let mut c = 0u8;
        move || {
            c += 1;
            [c; 32]
        }
    }

    /// The secret of link i -> i+1 with the counter above.
    fn secret(link: usize) -> ChainSecret {
        ChainSecret::from_bytes(&[link as u8 + 1; 32])
    }

    fn port(i: usize) -> u16 {
        41001 + i as u16
    }

    fn start(n: usize, now: Instant) -> Build {
        match Build::new(TID, "web", nodes(n), now, T, counter()) {
            Ok(b) => b,
            Err(e) => panic!("build refused: {e}"),
        }
    }

    /// Everything queued; each message must pass the codec's checks.
    fn drain(b: &mut Build) -> Vec<Outgoing> {
        let mut out = Vec::new();
        while let Some(o) = b.poll_transmit() {
            assert_eq!(o.message.validate(), Ok(()), "{o:?}");
            assert!(o.message.is_from_hub());
            out.push(o);
        }
        out
    }

    fn result(id: u64, is_allowed: bool, port: Option<u16>, reason: &str) -> HubMessage {
        HubMessage::MakeTubeResult {
            id,
            tunnel_id: TID_TEXT.to_owned(),
            is_allowed,
            port,
            reason: reason.to_owned(),
        }
    }

    fn allowed(id: u64, port: Option<u16>) -> HubMessage {
        result(id, true, port, "")
    }

    fn expected_make_tube(i: usize, n: usize) -> Outgoing {
        let last = i + 1 == n;
        Outgoing {
            node: name(i),
            message: HubMessage::MakeTube {
                id: i as u64 + 1,
                tunnel_id: TID_TEXT.to_owned(),
                from: (i > 0).then(|| format!("10.0.0.{}:{}", i, port(i - 1))),
                to: (!last).then(|| format!("10.0.0.{}", i + 2)),
                secret_in: (!last).then(|| secret(i)),
                secret_out: (i > 0).then(|| secret(i - 1)),
            },
        }
    }

    fn close_to(nodes: &[usize], reason: &str, code: Option<ChainErrorCode>) -> Vec<Outgoing> {
        nodes
            .iter()
            .map(|&i| Outgoing {
                node: name(i),
                message: HubMessage::CloseTube {
                    tunnel_id: TID_TEXT.to_owned(),
                    reason: reason.to_owned(),
                    code: code.map(|c| c as u16),
                },
            })
            .collect()
    }

    /// The nodes that hear of a failure at position `k` of `n`: 0..=k and the endpoint.
    fn heard(k: usize, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..=k).collect();
        if k + 1 < n {
            v.push(n - 1);
        }
        v
    }

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    /// Starts an `n`-node build at `t0` and lets nodes 0..k accept (node i at `t0 + i` s), so
    /// that node k's answer is awaited (since `t0 + k` s).
    fn advance_to(n: usize, k: usize, t0: Instant) -> Build {
        let mut b = start(n, t0);
        for i in 0..k {
            assert_eq!(drain(&mut b), vec![expected_make_tube(i, n)]);
            let p = (i + 1 < n).then(|| port(i));
            b.handle_result(&name(i), &allowed(i as u64 + 1, p), at(t0, i as u64 + 1));
        }
        assert_eq!(drain(&mut b), vec![expected_make_tube(k, n)]);
        assert_eq!(b.state(), &BuildState::Building { hop: k });
        b
    }

    fn assert_silent(b: &mut Build) {
        assert_eq!(b.poll_transmit(), None);
        assert_eq!(b.poll_timeout(), None);
        assert_eq!(b.awaiting(), None);
    }

    fn happy_path(n: usize) {
        let t0 = Instant::now();
        let mut b = start(n, t0);
        assert_eq!(b.tunnel_id(), TID_TEXT);
        assert_eq!(b.hops().len(), n);
        let mut sent = Vec::new();
        for i in 0..n {
            let now = at(t0, i as u64);
            let out = drain(&mut b);
            assert_eq!(out, vec![expected_make_tube(i, n)], "hop {i}");
            sent.extend(out);
            assert_eq!(b.state(), &BuildState::Building { hop: i });
            assert_eq!(b.awaiting(), Some((name(i).as_str(), i as u64 + 1)));
            assert_eq!(b.poll_timeout(), Some(now + T));
            // Not late yet.
            b.handle_timeout(now + T - Duration::from_millis(1));
            assert!(!b.is_finished());
            let last = i + 1 == n;
            b.handle_result(
                &name(i),
                &allowed(i as u64 + 1, (!last).then(|| port(i))),
                at(t0, i as u64 + 1),
            );
        }
        let establish = HubMessage::EstablishConnection {
            tunnel_id: TID_TEXT.to_owned(),
            local_id: "web".to_owned(),
            endpoint_user: name(n - 1),
        };
        assert_eq!(
            drain(&mut b),
            vec![
                Outgoing {
                    node: name(n - 1),
                    message: establish.clone(),
                },
                Outgoing {
                    node: name(0),
                    message: establish,
                },
            ]
        );
        assert_eq!(b.state(), &BuildState::Established);
        assert!(!b.is_finished());
        assert_silent(&mut b);
        assert_eq!(b.ignored(), 0);

        // Cross-check each link: the dialer presents what the listener requires, dials the
        // listener's ip:port, and the listener admits the dialer's ip.
        let fields: Vec<_> = sent
            .iter()
            .map(|o| match &o.message {
                HubMessage::MakeTube {
                    id,
                    from,
                    to,
                    secret_in,
                    secret_out,
                    ..
                } => (
                    *id,
                    from.clone(),
                    to.clone(),
                    secret_in.clone(),
                    secret_out.clone(),
                ),
                other => panic!("not make_tube: {other:?}"),
            })
            .collect();
        for (i, pair) in fields.windows(2).enumerate() {
            let (id0, _, to0, in0, _) = &pair[0];
            let (id1, from1, _, _, out1) = &pair[1];
            assert!(id1 > id0);
            assert!(in0.is_some());
            assert_eq!(in0, out1, "link {i}");
            assert_eq!(to0.as_deref(), Some(ip(i + 1).to_string().as_str()));
            assert_eq!(from1.clone(), Some(format!("{}:{}", ip(i), port(i))));
        }
        // Every link has its own secret.
        let distinct: HashSet<String> = fields
            .iter()
            .filter_map(|f| f.3.as_ref().map(|s| s.expose().to_owned()))
            .collect();
        assert_eq!(distinct.len(), n - 1);
        assert_eq!(fields.first().map(|f| f.1.clone()), Some(None));
        assert_eq!(fields.last().map(|f| f.2.clone()), Some(None));
    }

    #[test]
    fn happy_path_2_hops() {
        happy_path(2);
    }

    #[test]
    fn happy_path_3_hops() {
        happy_path(3);
    }

    #[test]
    fn happy_path_5_hops() {
        happy_path(5);
    }

    #[test]
    fn happy_path_17_nodes_is_the_maximum() {
        happy_path(usize::from(MAX_HOPS) + 1);
    }

    #[test]
    fn refuses_bad_hop_lists() {
        let t0 = Instant::now();
        for n in 0..2 {
            let e = Build::new(TID, "web", nodes(n), t0, T, counter()).err();
            assert_eq!(e, Some(BuildError::TooFewHops(n)));
        }
        let e = Build::new(TID, "web", nodes(18), t0, T, counter()).err();
        assert_eq!(e, Some(BuildError::TooManyHops(17)));
        let mut dup = nodes(3);
        dup[2].name = name(0);
        let e = Build::new(TID, "web", dup, t0, T, counter()).err();
        assert_eq!(e, Some(BuildError::DuplicateNode(name(0))));
    }

    #[test]
    fn secrets_are_drawn_once_per_link_in_order() {
        let mut calls = 0;
        let b = Build::new(TID, "web", nodes(5), Instant::now(), T, || {
            calls += 1;
            [calls; 32]
        });
        assert!(b.is_ok());
        assert_eq!(calls, 4);
    }

    #[test]
    fn ipv6_addresses_are_bracketed_in_from() {
        let t0 = Instant::now();
        let v6 = |s: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, s));
        let hops = vec![
            HopNode {
                name: "a".into(),
                ip: v6(1),
            },
            HopNode {
                name: "b".into(),
                ip: v6(2),
            },
        ];
        let mut b = match Build::new(TID, "web", hops, t0, T, counter()) {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        };
        let first = drain(&mut b);
        assert!(matches!(
            &first[0].message,
            HubMessage::MakeTube { to: Some(to), .. } if to == "2001:db8::2"
        ));
        b.handle_result("a", &allowed(1, Some(41001)), t0);
        let second = drain(&mut b);
        assert!(matches!(
            &second[0].message,
            HubMessage::MakeTube { from: Some(from), .. } if from == "[2001:db8::1]:41001"
        ));
    }

    #[test]
    fn refusal_at_each_position_closes_the_nodes_that_heard() {
        for n in [2, 3, 5] {
            for k in 0..n {
                let t0 = Instant::now();
                let mut b = advance_to(n, k, t0);
                b.handle_result(&name(k), &result(k as u64 + 1, false, None, "no"), t0);
                let why = format!("node node{k} refused make_tube: no");
                assert_eq!(
                    drain(&mut b),
                    close_to(&heard(k, n), &why, Some(ChainErrorCode::BuildFailed)),
                    "n {n} k {k}"
                );
                assert_eq!(
                    b.state(),
                    &BuildState::Failed {
                        code: ChainErrorCode::BuildFailed,
                        reason: why
                    }
                );
                assert!(b.is_finished());
                assert_silent(&mut b);
                // Late answers, timeouts, departures and closes change nothing.
                b.handle_result(&name(k), &allowed(k as u64 + 1, Some(1)), t0);
                assert_eq!(b.ignored(), 1);
                b.handle_timeout(at(t0, 1000));
                b.handle_node_gone(&name(0));
                b.close("again");
                assert_silent(&mut b);
            }
        }
    }

    #[test]
    fn refusal_without_reason_and_long_reasons() {
        let t0 = Instant::now();
        let mut b = advance_to(3, 1, t0);
        b.handle_result(&name(1), &result(2, false, None, ""), t0);
        assert_eq!(
            drain(&mut b),
            close_to(
                &[0, 1, 2],
                "node node1 refused make_tube",
                Some(ChainErrorCode::BuildFailed)
            )
        );

        let mut b = advance_to(3, 1, t0);
        let long = "é".repeat(300);
        b.handle_result(&name(1), &result(2, false, None, &long), t0);
        let out = drain(&mut b); // validates every reason's length
        assert_eq!(out.len(), 3);
        match b.state() {
            BuildState::Failed { reason, .. } => assert!(reason.len() <= MAX_REASON_LEN),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn accepted_without_port_fails_except_on_the_endpoint() {
        for n in [2, 4] {
            for k in 0..n - 1 {
                for p in [None, Some(0)] {
                    let t0 = Instant::now();
                    let mut b = advance_to(n, k, t0);
                    b.handle_result(&name(k), &allowed(k as u64 + 1, p), t0);
                    let why = format!("node node{k} accepted make_tube without a port");
                    assert_eq!(
                        drain(&mut b),
                        close_to(&heard(k, n), &why, Some(ChainErrorCode::BuildFailed))
                    );
                }
            }
            // The endpoint may answer with a port: it is not used.
            let t0 = Instant::now();
            let mut b = advance_to(n, n - 1, t0);
            b.handle_result(&name(n - 1), &allowed(n as u64, Some(53100)), t0);
            assert_eq!(b.state(), &BuildState::Established);
            assert_eq!(drain(&mut b).len(), 2);
        }
    }

    #[test]
    fn timeout_at_each_position_closes_the_nodes_that_heard() {
        for n in [2, 3, 5] {
            for k in 0..n {
                let t0 = Instant::now();
                let mut b = advance_to(n, k, t0);
                // Node k was asked when node k-1 answered, at t0 + k s.
                let deadline = at(t0, k as u64) + T;
                assert_eq!(b.poll_timeout(), Some(deadline));
                b.handle_timeout(deadline - Duration::from_millis(1));
                assert_eq!(b.poll_transmit(), None);
                assert_eq!(b.state(), &BuildState::Building { hop: k });
                b.handle_timeout(deadline);
                let why = format!("node node{k} did not answer make_tube within 10s");
                assert_eq!(
                    drain(&mut b),
                    close_to(&heard(k, n), &why, Some(ChainErrorCode::Timeout)),
                    "n {n} k {k}"
                );
                assert_eq!(
                    b.state(),
                    &BuildState::Failed {
                        code: ChainErrorCode::Timeout,
                        reason: why
                    }
                );
                assert_silent(&mut b);
                // The answer arriving after the timeout is ignored.
                let p = (k + 1 < n).then(|| port(k));
                b.handle_result(&name(k), &allowed(k as u64 + 1, p), deadline);
                assert_eq!(b.ignored(), 1);
                assert_silent(&mut b);
            }
        }
    }

    #[test]
    fn node_gone_mid_build_closes_the_others_that_heard() {
        let n = 5;
        for k in 0..n {
            for g in 0..n {
                let t0 = Instant::now();
                let mut b = advance_to(n, k, t0);
                b.handle_node_gone(&name(g));
                let why = format!("node node{g} disconnected");
                let to: Vec<usize> = heard(k, n).into_iter().filter(|&i| i != g).collect();
                assert_eq!(
                    drain(&mut b),
                    close_to(&to, &why, Some(ChainErrorCode::BuildFailed)),
                    "k {k} gone {g}"
                );
                assert!(b.is_finished());
                assert_silent(&mut b);
                b.handle_node_gone(&name((g + 1) % n));
                assert_silent(&mut b);
            }
        }
    }

    #[test]
    fn a_node_outside_the_chain_leaving_changes_nothing() {
        let t0 = Instant::now();
        let mut b = advance_to(3, 1, t0);
        b.handle_node_gone("stranger");
        assert_eq!(b.state(), &BuildState::Building { hop: 1 });
        assert_eq!(b.poll_transmit(), None);
    }

    #[test]
    fn node_gone_before_its_make_tube_is_polled_gets_nothing() {
        let t0 = Instant::now();
        let mut b = start(3, t0);
        b.handle_node_gone(&name(0));
        // The queued make_tube to node0 is dropped; only the endpoint hears.
        assert_eq!(
            drain(&mut b),
            close_to(
                &[2],
                "node node0 disconnected",
                Some(ChainErrorCode::BuildFailed)
            )
        );
    }

    fn established(n: usize, t0: Instant) -> Build {
        let mut b = advance_to(n, n - 1, t0);
        b.handle_result(&name(n - 1), &allowed(n as u64, None), t0);
        assert_eq!(drain(&mut b).len(), 2);
        assert_eq!(b.state(), &BuildState::Established);
        b
    }

    #[test]
    fn node_gone_after_establishment_closes_all_the_others() {
        let n = 5;
        for g in 0..n {
            let t0 = Instant::now();
            let mut b = established(n, t0);
            b.handle_node_gone(&name(g));
            let to: Vec<usize> = (0..n).filter(|&i| i != g).collect();
            assert_eq!(
                drain(&mut b),
                close_to(&to, &format!("node node{g} disconnected"), None)
            );
            assert_eq!(b.state(), &BuildState::Closed);
            assert_silent(&mut b);
        }
    }

    #[test]
    fn node_gone_before_establish_is_polled_drops_its_establish() {
        let t0 = Instant::now();
        let mut b = advance_to(3, 2, t0);
        b.handle_result(&name(2), &allowed(3, None), t0);
        b.handle_node_gone(&name(0));
        let out = drain(&mut b);
        assert_eq!(out.len(), 3);
        assert!(matches!(
            &out[0].message,
            HubMessage::EstablishConnection { .. }
        ));
        assert_eq!(out[0].node, name(2));
        assert_eq!(
            out[1..].to_vec(),
            close_to(&[1, 2], "node node0 disconnected", None)
        );
    }

    #[test]
    fn close_after_established_reaches_every_node_once() {
        let t0 = Instant::now();
        let mut b = established(5, t0);
        b.close("closed by node0");
        assert_eq!(
            drain(&mut b),
            close_to(&[0, 1, 2, 3, 4], "closed by node0", None)
        );
        assert_eq!(b.state(), &BuildState::Closed);
        b.close("closed by node4");
        b.fail(ChainErrorCode::ShuttingDown, "hub stopping");
        assert_eq!(b.state(), &BuildState::Closed);
        assert_silent(&mut b);
    }

    #[test]
    fn close_and_fail_during_the_build() {
        let t0 = Instant::now();
        let mut b = advance_to(5, 2, t0);
        b.close("closed by node0");
        assert_eq!(
            drain(&mut b),
            close_to(&[0, 1, 2, 4], "closed by node0", None)
        );
        assert_eq!(b.state(), &BuildState::Closed);

        let mut b = advance_to(5, 1, t0);
        b.fail(ChainErrorCode::ShuttingDown, "hub stopping");
        assert_eq!(
            drain(&mut b),
            close_to(
                &[0, 1, 4],
                "hub stopping",
                Some(ChainErrorCode::ShuttingDown)
            )
        );
        assert!(b.is_finished());
    }

    #[test]
    fn stray_results_are_ignored_and_counted() {
        let t0 = Instant::now();
        let mut b = advance_to(4, 1, t0);
        // Duplicate of node0's answer.
        b.handle_result(&name(0), &allowed(1, Some(port(0))), t0);
        // Right id, wrong node (the next one, and one that was never asked).
        b.handle_result(&name(0), &allowed(2, Some(port(1))), t0);
        b.handle_result(&name(2), &allowed(2, Some(port(1))), t0);
        // Right node, wrong ids.
        b.handle_result(&name(1), &allowed(1, Some(port(1))), t0);
        b.handle_result(&name(1), &allowed(3, Some(port(1))), t0);
        b.handle_result(&name(1), &result(7, false, None, "x"), t0);
        // Wrong tunnel.
        let other = HubMessage::MakeTubeResult {
            id: 2,
            tunnel_id: "00000000-0000-4000-8000-000000000000".into(),
            is_allowed: false,
            port: None,
            reason: String::new(),
        };
        b.handle_result(&name(1), &other, t0);
        // Not a make_tube_result at all.
        b.handle_result(&name(1), &HubMessage::Logout {}, t0);
        b.handle_result("stranger", &allowed(2, Some(1)), t0);
        assert_eq!(b.ignored(), 9);
        assert_eq!(b.poll_transmit(), None);
        assert_eq!(b.state(), &BuildState::Building { hop: 1 });

        // The real answer still counts, and its duplicate is ignored.
        b.handle_result(&name(1), &allowed(2, Some(port(1))), t0);
        assert_eq!(drain(&mut b), vec![expected_make_tube(2, 4)]);
        b.handle_result(&name(1), &allowed(2, Some(port(1))), t0);
        assert_eq!(b.ignored(), 10);
        assert_eq!(b.poll_transmit(), None);

        // After establishment every result is late.
        b.handle_result(&name(2), &allowed(3, Some(port(2))), t0);
        drain(&mut b);
        b.handle_result(&name(3), &allowed(4, None), t0);
        assert_eq!(drain(&mut b).len(), 2);
        b.handle_result(&name(3), &allowed(4, None), t0);
        assert_eq!(b.ignored(), 11);
        assert_eq!(b.state(), &BuildState::Established);
        assert_silent(&mut b);
    }

    #[test]
    fn debug_does_not_print_secrets() {
        let b = start(3, Instant::now());
        let text = format!("{b:?}");
        assert!(!text.contains(&secret(0).expose().to_owned()));
        assert!(text.contains("redacted"));
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// The awaited node answers yes, with a port or not.
        Allow(Option<u16>),
        /// The awaited node refuses.
        Refuse,
        /// The awaited node answers with another id.
        WrongId(u64),
        /// Another node answers with the awaited id.
        WrongNode(usize),
        /// The last answer again.
        Duplicate,
        /// Time passes (milliseconds).
        Tick(u64),
        /// A node's session ends.
        Gone(usize),
        /// Someone closes the chain.
        Close,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => prop_oneof![Just(None), (1u16..=65535).prop_map(Some)].prop_map(Op::Allow),
            1 => Just(Op::Refuse),
            1 => (0u64..20).prop_map(Op::WrongId),
            1 => (0usize..8).prop_map(Op::WrongNode),
            1 => Just(Op::Duplicate),
            2 => (0u64..7000).prop_map(Op::Tick),
            1 => (0usize..8).prop_map(Op::Gone),
            1 => Just(Op::Close),
        ]
    }

    /// What the proptest saw, built only from what the machine sent and what it was fed.
    #[derive(Default)]
    struct Model {
        n: usize,
        /// node -> id of the make_tube it got.
        asked: HashMap<String, u64>,
        /// Nodes whose awaited make_tube_result was an acceptance with what it needs.
        accepted: HashSet<String>,
        closes: HashMap<String, usize>,
        establishes: usize,
        gone: HashSet<String>,
        gone_at_finish: Option<HashSet<String>>,
        last_id: u64,
        last_make: Option<(String, u64)>,
        last_answer: Option<(String, HubMessage)>,
        drained_finished: bool,
    }

    impl Model {
        fn step(&mut self, b: &mut Build) -> Result<(), TestCaseError> {
            let finished = b.is_finished();
            let out = drain(b);
            if self.drained_finished {
                prop_assert!(out.is_empty(), "message after the end: {:?}", out);
            }
            for o in &out {
                prop_assert!(!self.gone.contains(&o.node), "to a gone node: {:?}", o);
                match &o.message {
                    HubMessage::MakeTube { id, .. } => {
                        prop_assert!(!finished);
                        prop_assert!(*id > self.last_id, "ids must increase");
                        self.last_id = *id;
                        prop_assert!(self.asked.insert(o.node.clone(), *id).is_none());
                        self.last_make = Some((o.node.clone(), *id));
                    }
                    HubMessage::EstablishConnection { .. } => {
                        prop_assert!(!finished);
                        prop_assert_eq!(self.accepted.len(), self.n, "establish too early");
                        prop_assert!(o.node == name(0) || o.node == name(self.n - 1));
                        self.establishes += 1;
                    }
                    HubMessage::CloseTube { .. } => {
                        prop_assert!(finished);
                        let c = self.closes.entry(o.node.clone()).or_insert(0);
                        *c += 1;
                        prop_assert_eq!(*c, 1, "close_tube twice to {}", o.node);
                    }
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            if finished {
                if self.gone_at_finish.is_none() {
                    self.gone_at_finish = Some(self.gone.clone());
                }
                self.drained_finished = true;
            }
            prop_assert!(self.establishes <= 2);
            Ok(())
        }
    }

    proptest! {
        #[test]
        fn random_sequences_keep_the_invariants(
            n in 2usize..=7,
            ops in proptest::collection::vec(op(), 0..40),
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut b = start(n, t0);
            let mut m = Model { n, ..Model::default() };
            m.step(&mut b)?;
            for op in ops {
                let awaited = m.last_make.clone();
                match op {
                    Op::Allow(p) => {
                        if let Some((node, id)) = awaited {
                            let msg = allowed(id, p);
                            let last = node == name(n - 1);
                            if (last || p.is_some()) && b.awaiting() == Some((node.as_str(), id)) {
                                m.accepted.insert(node.clone());
                            }
                            b.handle_result(&node, &msg, now);
                            m.last_answer = Some((node, msg));
                        }
                    }
                    Op::Refuse => {
                        if let Some((node, id)) = awaited {
                            let msg = result(id, false, None, "no");
                            b.handle_result(&node, &msg, now);
                            m.last_answer = Some((node, msg));
                        }
                    }
                    Op::WrongId(delta) => {
                        if let Some((node, id)) = awaited {
                            let before = b.ignored();
                            b.handle_result(&node, &allowed(id + 1 + delta, Some(1)), now);
                            prop_assert_eq!(b.ignored(), before + 1);
                        }
                    }
                    Op::WrongNode(i) => {
                        if let Some((node, id)) = awaited {
                            let other = name(i);
                            if other != node {
                                let before = b.ignored();
                                b.handle_result(&other, &allowed(id, Some(1)), now);
                                prop_assert_eq!(b.ignored(), before + 1);
                            }
                        }
                    }
                    Op::Duplicate => {
                        if let Some((node, msg)) = m.last_answer.clone() {
                            let before = b.ignored();
                            b.handle_result(&node, &msg, now);
                            prop_assert_eq!(b.ignored(), before + 1);
                        }
                    }
                    Op::Tick(ms) => {
                        now += Duration::from_millis(ms);
                        if let Some(deadline) = b.poll_timeout() {
                            prop_assert!(deadline > t0);
                        }
                        b.handle_timeout(now);
                    }
                    Op::Gone(i) => {
                        if i < n {
                            m.gone.insert(name(i));
                        }
                        b.handle_node_gone(&name(i));
                    }
                    Op::Close => b.close("closed by node0"),
                }
                m.step(&mut b)?;
            }

            match b.state() {
                BuildState::Established => {
                    prop_assert_eq!(m.establishes, 2);
                    prop_assert!(m.closes.is_empty());
                }
                BuildState::Building { hop } => {
                    prop_assert!(m.closes.is_empty());
                    prop_assert_eq!(m.establishes, 0);
                    prop_assert_eq!(b.awaiting().map(|a| a.0.to_owned()), Some(name(*hop)));
                }
                BuildState::Failed { .. } | BuildState::Closed => {
                    let gone_then = m.gone_at_finish.clone().unwrap_or_default();
                    for node in m.asked.keys() {
                        let expected = usize::from(!gone_then.contains(node));
                        prop_assert_eq!(
                            m.closes.get(node).copied().unwrap_or(0),
                            expected,
                            "close_tube count for {}", node
                        );
                    }
                    let endpoint = name(n - 1);
                    if !gone_then.contains(&endpoint) {
                        prop_assert_eq!(m.closes.get(&endpoint).copied(), Some(1));
                    }
                    for node in m.closes.keys() {
                        prop_assert!(m.asked.contains_key(node) || *node == endpoint);
                    }
                }
            }
        }
    }
}
