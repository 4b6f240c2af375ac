//! Chains end to end, in one process: a real hub (TLS, SQLite accounts) and real nodes, each
//! bound to its own loopback address (127.0.0.2, .3, ...) so the hop IP checks are real, driven
//! through their front APIs. Covers seed 000's build order and issue 4's list: a 64 MiB echo
//! through two intermediates with per-node byte counters, refusals, an intermediate killed
//! mid-transfer, strangers at a hop port, single-use passwords across restarts and crashes,
//! logout, and concurrent chains; and issue 8's integrity figure, 256 MiB byte-exact through
//! a chain of three nodes.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tube_chain::front::FrontClient;
use tube_chain::hub::HubConfig;
use tube_chain::node::{NodeConfig, NodeError};
use tube_chain::{AccountError, AccountStore, MemoryAccounts, Password, Registered, Room};
use tube_net::codec::handshake_conn;
use tube_net::tokio_rustls::{TlsAcceptor, TlsConnector};
use tube_net::{Identity, tls};
use tube_proto::chain::{
    CHAIN_PROTOCOL_VERSION, ChainSecret, FrontMessage, HubMessage, encode_hop_hello,
    parse_tunnel_id,
};
use tube_proto::frame::Frame;
use tube_proto::ratelimit::RateLimit;
use tube_testkit::{deadline, echo_server, ended, init_tracing, read_hash, write_pattern};

/// An endpoint front: subscribes, answers every request with `allow`, and connects each
/// established chain to `forward`. Returns once the subscription is active.
async fn endpoint_front(api: SocketAddr, allow: bool, forward: SocketAddr) -> JoinHandle<()> {
    let mut f = FrontClient::connect(api).await.expect("front");
    f.send(&FrontMessage::Subscribe {}).await.expect("send");
    loop {
        if let FrontMessage::Tubes { .. } = f.recv().await.expect("subscribed") {
            break;
        }
    }
    tokio::spawn(async move {
        while let Ok(m) = f.recv().await {
            match m {
                FrontMessage::ConnectionRequest { tunnel_id, .. } => {
                    let reason = if allow { "" } else { "not you" };
                    let a = FrontMessage::Approve {
                        tunnel_id,
                        is_allowed: allow,
                        reason: reason.into(),
                        forward: None,
                    };
                    if f.send(&a).await.is_err() {
                        return;
                    }
                }
                FrontMessage::Established { port, .. } => {
                    tokio::spawn(async move {
                        let far = TcpStream::connect(("127.0.0.1", port)).await;
                        let service = TcpStream::connect(forward).await;
                        if let (Ok(mut far), Ok(mut service)) = (far, service) {
                            let _ = tokio::io::copy_bidirectional(&mut far, &mut service).await;
                        }
                    });
                }
                _ => {}
            }
        }
    })
}

/// A chain refused or closed before it was up: its code and reason.
#[derive(Debug)]
struct Refused {
    code: Option<u16>,
    reason: String,
}

/// What the hub said when it accepted a chain: its hop count and, when shorter than wanted,
/// why.
#[derive(Debug)]
struct Accepted {
    hops: Option<u8>,
    reason: String,
}

/// Requests a chain to `endpoint` as node 0's front: listens when told, returns the API
/// connection (it owns the chain), the chain's near end, the tunnel id and the acceptance.
async fn open_chain(
    api: SocketAddr,
    endpoint: &str,
    local_id: &str,
) -> Result<(FrontClient, TcpStream, String, Accepted), Refused> {
    let mut f = FrontClient::connect(api).await.expect("front");
    let req = FrontMessage::RequestTube {
        endpoint_name: endpoint.into(),
        local_id: local_id.into(),
    };
    f.send(&req).await.expect("send");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut near = None;
    let mut accepted = None;
    loop {
        match f.recv().await.expect("front message") {
            FrontMessage::TubeResult {
                is_allowed: false,
                reason,
                code,
                ..
            }
            | FrontMessage::Closed { reason, code, .. } => return Err(Refused { code, reason }),
            FrontMessage::TubeResult { hops, reason, .. } => {
                accepted = Some(Accepted { hops, reason });
            }
            FrontMessage::Listen { tunnel_id } => {
                let port = listener.local_addr().expect("addr").port();
                f.send(&FrontMessage::Listening { tunnel_id, port })
                    .await
                    .expect("send");
                near = Some(listener.accept().await.expect("node connects").0);
            }
            FrontMessage::Established { tunnel_id, .. } => {
                let near = near.take().expect("node 0 connected before established");
                let accepted = accepted.take().expect("tube_result before established");
                return Ok((f, near, tunnel_id, accepted));
            }
            _ => {}
        }
    }
}

/// Sends `size` bytes through `chain` (to an echo service) and checks they come back intact.
async fn echo_through(chain: TcpStream, size: usize, seed: u64) {
    let (mut rd, mut wr) = chain.into_split();
    let writer = tokio::spawn(async move {
        let h = write_pattern(&mut wr, size, seed).await;
        wr.shutdown().await.expect("half-close");
        h
    });
    let (n, got) = read_hash(&mut rd).await;
    let sent = writer.await.expect("writer");
    assert_eq!(n, size, "bytes echoed");
    assert_eq!(got, sent, "echo differs from what was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_through_two_intermediates_carries_64_mib_byte_exact() {
    deadline(LIMIT, async {
        let hub = start_hub(2).await;
        let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().expect("dir")).collect();
        let names = ["a", "b", "c", "d", "e"];
        let mut nodes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            nodes.push(start_node(&hub, name, 2 + i as u8, dirs[i].path()).await);
        }
        let echo = echo_server().await;
        let _front = endpoint_front(nodes[4].api, true, echo.addr).await;
        let (_owner, near, tunnel_id, accepted) = open_chain(nodes[0].api, "e", "web")
            .await
            .expect("chain up");
        assert_eq!(accepted.hops, Some(3), "two intermediates");
        assert_eq!(accepted.reason, "", "as many intermediates as wanted");

        let chains = hub.state.chains();
        let chain = chains
            .iter()
            .find(|c| c.tunnel_id == tunnel_id)
            .expect("hub knows the chain");
        assert_eq!(chain.state, "established");
        assert_eq!(chain.nodes.len(), 4, "node 0, two intermediates, endpoint");
        assert_eq!(chain.nodes.first().map(String::as_str), Some("a"));
        assert_eq!(chain.nodes.last().map(String::as_str), Some("e"));

        const SIZE: usize = 64 << 20;
        echo_through(near, SIZE, 7).await;
        // Every node of the chain carried every byte both ways; the one left out none.
        assert_counted(&nodes, &names, &chain.nodes, &tunnel_id, SIZE);
    })
    .await;
}

/// Every node on `chain` (names, in order) carried `size` bytes of `tunnel_id` each way; the
/// others none.
fn assert_counted(
    nodes: &[TestNode],
    names: &[&str],
    chain: &[String],
    tunnel_id: &str,
    size: usize,
) {
    for (node, name) in nodes.iter().zip(names) {
        let counted = node.stats.chain_bytes(tunnel_id);
        if chain.iter().any(|n| n == name) {
            let (toward_endpoint, toward_requester) = counted.expect("counted");
            assert_eq!(toward_endpoint, size as u64, "{name} toward the endpoint");
            assert_eq!(toward_requester, size as u64, "{name} toward the requester");
        } else {
            assert_eq!(counted, None, "{name} is not on the chain");
        }
    }
}

/// Issue 8: a chain of three nodes (node 0, one intermediate, the endpoint) carries 256 MiB
/// each way byte-exact (SHA-256), and each of the three counted every byte.
/// `tests/integrity.sh` does the same through the `tube` binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_of_three_nodes_carries_256_mib_byte_exact() {
    deadline(LIMIT, async {
        let hub = start_hub(1).await;
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
        let names = ["a", "b", "c"];
        let mut nodes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            nodes.push(start_node(&hub, name, 2 + i as u8, dirs[i].path()).await);
        }
        let echo = echo_server().await;
        let _front = endpoint_front(nodes[2].api, true, echo.addr).await;
        let (_owner, near, tunnel_id, accepted) = open_chain(nodes[0].api, "c", "bulk")
            .await
            .expect("chain up");
        assert_eq!(accepted.hops, Some(2), "one intermediate");
        let chain = hub
            .state
            .chains()
            .into_iter()
            .find(|c| c.tunnel_id == tunnel_id)
            .expect("hub knows the chain");
        assert_eq!(chain.nodes, ["a", "b", "c"], "three nodes, in order");

        const SIZE: usize = 256 << 20;
        echo_through(near, SIZE, 0x3b0d).await;
        assert_counted(&nodes, &names, &chain.nodes, &tunnel_id, SIZE);
    })
    .await;
}

#[tokio::test]
async fn registrations_are_limited_per_source_address() {
    deadline(LIMIT, async {
        let mut config = memory_hub_config();
        config.register_limit = RateLimit::per_hour(2);
        let hub = start_hub_with_config(config).await;
        // Two new accounts from one address, then 6008 (not final: the node retries later),
        // a taken name counting as an attempt too; another address is not affected.
        registered(&first_answer_from(&hub, 5, register("r1", None)).await);
        registered(&first_answer_from(&hub, 5, register("r2", None)).await);
        let third = first_answer_from(&hub, 5, register("r3", None)).await;
        assert!(
            matches!(third, HubMessage::RegisterResult { .. }) && refusal(&third) == Some(6008),
            "{third:?}"
        );
        registered(&first_answer_from(&hub, 6, register("r3", None)).await);
    })
    .await;
}

#[tokio::test]
async fn logged_in_nodes_are_limited_per_source_address() {
    deadline(LIMIT, async {
        let mut config = memory_hub_config();
        config.max_nodes_per_source = 2;
        let hub = start_hub_with_config(config).await;
        let mut held = Vec::new();
        let mut password = None;
        for name in ["p1", "p2"] {
            let (answer, conn) = login_from(&hub, 7, register(name, None)).await;
            password.get_or_insert(registered(&answer));
            held.push(conn);
        }
        // A third node from the same address is refused (6008, not final) ...
        let third = first_answer_from(&hub, 7, register("p3", None)).await;
        assert!(
            matches!(third, HubMessage::Error { code: 6008, .. }),
            "{third:?}"
        );
        // ... but p1 logging in again from there takes its own session over ...
        let auth = HubMessage::Auth {
            version: CHAIN_PROTOCOL_VERSION.into(),
            name: "p1".into(),
            password: password.expect("p1's password"),
            relay: false,
        };
        let again = first_answer_from(&hub, 7, auth).await;
        assert!(
            matches!(
                again,
                HubMessage::AuthResult {
                    is_success: true,
                    ..
                }
            ),
            "{again:?}"
        );
        // ... and another address is not affected.
        registered(&first_answer_from(&hub, 8, register("p3", None)).await);
        drop(held);
    })
    .await;
}

#[tokio::test]
async fn a_hub_with_a_registration_token_registers_only_nodes_that_bring_it() {
    deadline(LIMIT, async {
        let token = ChainSecret::from_bytes(&[7u8; 32]);
        let mut config = memory_hub_config();
        config.registration_token = Some(token.clone());
        let hub = start_hub_with_config(config).await;
        // Without the token, or with another one: 6001, final for the node.
        for invite in [None, Some(ChainSecret::from_bytes(&[8u8; 32]))] {
            let answer = first_answer_from(&hub, 5, register("t1", invite)).await;
            assert!(
                matches!(answer, HubMessage::RegisterResult { .. })
                    && refusal(&answer) == Some(6001),
                "{answer:?}"
            );
        }
        // A node given the token registers, logs in, and later logs in again without it.
        let dir = tempfile::tempdir().unwrap();
        let mut config = node_config(&hub, "t1", 6, dir.path());
        config.registration_token = Some(token);
        spawn_node(config.clone()).await.online_then_stop().await;
        config.registration_token = None;
        spawn_node(config).await.online_then_stop().await;
        // A node without it stops with the hub's reason.
        let dir = tempfile::tempdir().unwrap();
        let stranger = spawn_node(node_config(&hub, "t2", 7, dir.path())).await;
        let ended = stranger.task_result().await;
        assert!(
            matches!(&ended, Err(e) if e.to_string().contains("registration token")),
            "{ended:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn logins_in_flight_together_cannot_pass_the_node_limits() {
    deadline(LIMIT, async {
        let accounts = GatedAccounts::new();
        let mut config = memory_hub_config();
        config.accounts = accounts.clone();
        config.max_nodes_per_source = 1;
        config.max_nodes = 2;
        let hub = start_hub_with_config(config).await;
        // q1 passes the checks and waits in the account store, not logged in yet ...
        let first = login_from(&hub, 7, register("q1", None));
        let second = async {
            let mut entered = accounts.entered.subscribe();
            entered.wait_for(|n| *n == 1).await.expect("q1's register");
            // ... so a second node from its address finds the one slot taken ...
            let answer = first_answer_from(&hub, 7, register("q2", None)).await;
            // ... and, with q3 from elsewhere holding the other slot, so does a fourth node.
            let q3 = login_from(&hub, 8, register("q3", None));
            let fourth = async {
                entered.wait_for(|n| *n == 2).await.expect("q3's register");
                let over = first_answer_from(&hub, 9, register("q4", None)).await;
                accounts.let_go();
                over
            };
            let ((q3, conn), over) = tokio::join!(q3, fourth);
            (answer, q3, conn, over)
        };
        let ((q1, _q1), (q2, q3, q3_conn, q4)) = tokio::join!(first, second);
        for refused in [&q2, &q4] {
            assert!(
                matches!(refused, HubMessage::Error { code: 6008, .. }),
                "{refused:?}"
            );
        }
        registered(&q1);
        registered(&q3);
        assert_eq!(hub.state.online(), vec!["q1".to_string(), "q3".into()]);
        // q3 logs out; then a login refused after the checks (a taken name) gives its slot
        // back before its answer: the next node from that address gets in.
        let mut q3 = q3_conn;
        q3.send(Frame::Control(HubMessage::Logout {}.to_bytes()))
            .await
            .expect("send logout");
        while let Some(Ok(_)) = q3.next().await {}
        let taken = first_answer_from(&hub, 10, register("q3", None)).await;
        assert_eq!(refusal(&taken), Some(6002), "{taken:?}");
        registered(&first_answer_from(&hub, 10, register("q5", None)).await);
    })
    .await;
}

#[tokio::test]
async fn at_its_account_limit_the_hub_lets_an_unseen_account_go_never_a_logged_in_one() {
    deadline(LIMIT, async {
        let accounts = GatedAccounts::new();
        accounts.let_go();
        let mut config = memory_hub_config();
        config.accounts = accounts.clone();
        config.max_accounts = 2;
        config.evict_unseen_after = Duration::ZERO;
        let hub = start_hub_with_config(config).await;
        // n1 registers and stays logged in; n2 registers and logs out.
        let (answer, _n1) = login_from(&hub, 5, register("n1", None)).await;
        registered(&answer);
        let (answer, mut n2) = login_from(&hub, 6, register("n2", None)).await;
        let p2 = registered(&answer);
        n2.send(Frame::Control(HubMessage::Logout {}.to_bytes()))
            .await
            .expect("send logout");
        // The hub closes after logout_result, once the session has left; the session's end
        // counts as the account's last sight.
        while let Some(Ok(_)) = n2.next().await {}
        assert_eq!(hub.state.online(), vec!["n1".to_string()]);
        let mut seen = accounts.seen.subscribe();
        deadline(LIMIT, seen.wait_for(|names| names == &["n2"]))
            .await
            .expect("n2 seen");

        // The hub is full: n3 takes the place of n2, the account not in use.
        let (answer, _n3) = login_from(&hub, 7, register("n3", None)).await;
        registered(&answer);
        assert_eq!(hub.state.accounts_evicted(), 1);
        let auth = HubMessage::Auth {
            version: CHAIN_PROTOCOL_VERSION.into(),
            name: "n2".into(),
            password: p2,
            relay: false,
        };
        let answer = first_answer_from(&hub, 6, auth).await;
        assert!(
            matches!(answer, HubMessage::AuthResult { .. }) && refusal(&answer) == Some(6001),
            "n2's account is gone: {answer:?}"
        );

        // Both accounts are in use: nothing may give way, and n4 is told to retry (6008).
        let answer = first_answer_from(&hub, 8, register("n4", None)).await;
        assert!(
            matches!(
                &answer,
                HubMessage::RegisterResult {
                    is_success: false,
                    code: Some(6008),
                    message,
                    ..
                } if message.contains("no room")
            ),
            "{answer:?}"
        );
        assert_eq!(hub.state.accounts_evicted(), 1);
        assert_eq!(hub.state.online(), vec!["n1".to_string(), "n3".into()]);

        // The admin API counts it.
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let served = tokio::spawn(tube_chain::hub::admin::serve(
            admin,
            hub.state.clone(),
            stop.clone(),
        ));
        let mut http = TcpStream::connect(admin_addr).await.unwrap();
        http.write_all(b"GET /metrics HTTP/1.1\r\nhost: hub\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        http.read_to_string(&mut body).await.unwrap();
        assert!(
            body.lines()
                .any(|l| l == "tube_hub_accounts_evicted_total 1"),
            "{body}"
        );
        stop.cancel();
        served.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn answered_requests_leave_no_timeout_task_behind() {
    deadline(LIMIT, async {
        let hub = start_hub(0).await;
        let da = tempfile::tempdir().unwrap();
        let a = start_node(&hub, "a", 2, da.path()).await;
        let tasks = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        let mut f = FrontClient::connect(a.api).await.expect("front");
        let mut ask = async |local_id: String| {
            let req = FrontMessage::RequestTube {
                endpoint_name: "nobody".into(),
                local_id,
            };
            f.send(&req).await.expect("send");
            match f.recv().await.expect("front message") {
                FrontMessage::TubeResult { code, .. } => assert_eq!(code, Some(6003)),
                other => panic!("expected tube_result, got {other:?}"),
            }
        };
        ask("warm-up".into()).await;
        // Each request is timed (60 s for the hub's answer); an answered one must not leave
        // its timer sleeping for the rest of the minute.
        let before = tasks();
        for i in 0..200 {
            ask(format!("r{i}")).await;
        }
        let after = tasks();
        assert!(
            after < before + 20,
            "{before} tasks before 200 answered requests, {after} after"
        );
    })
    .await;
}

#[tokio::test]
async fn refusals_carry_their_codes() {
    deadline(LIMIT, async {
        let hub = start_hub(0).await;
        let (da, de, dz) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let a = start_node(&hub, "a", 2, da.path()).await;
        let e = start_node(&hub, "e", 3, de.path()).await;
        let echo = echo_server().await;

        // No front subscribed at the endpoint: refused at once.
        let r = open_chain(a.api, "e", "x1").await.expect_err("no front");
        assert_eq!(r.code, Some(6005), "{r:?}");

        // The endpoint's front says no.
        let front = endpoint_front(e.api, false, echo.addr).await;
        let r = open_chain(a.api, "e", "x2").await.expect_err("denied");
        assert_eq!(r.code, Some(6005), "{r:?}");
        assert!(r.reason.contains("not you"), "{r:?}");
        front.abort();

        // Nobody by that name.
        let r = open_chain(a.api, "nobody", "x3")
            .await
            .expect_err("unknown");
        assert_eq!(r.code, Some(6003), "{r:?}");

        // An account without a session: offline.
        let z = start_node(&hub, "z", 4, dz.path()).await;
        z.stop().await.expect("clean stop");
        let r = open_chain(a.api, "z", "x4").await.expect_err("offline");
        assert_eq!(r.code, Some(6004), "{r:?}");

        // Nothing is left on the hub, and the requester has no chain.
        assert!(hub.state.chains().is_empty());
        drop(e);
    })
    .await;
}

#[tokio::test]
async fn killing_an_intermediate_closes_both_ends() {
    deadline(LIMIT, async {
        let hub = start_hub(1).await;
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
        let a = start_node(&hub, "a", 2, dirs[0].path()).await;
        let b = start_node(&hub, "b", 3, dirs[1].path()).await;
        let e = start_node(&hub, "e", 4, dirs[2].path()).await;
        // The endpoint side is the test itself, so it can watch its end too.
        let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _front = endpoint_front(e.api, true, service.local_addr().unwrap()).await;
        let (_owner, mut near, tunnel_id, _) = open_chain(a.api, "e", "k").await.expect("chain");
        let (mut far, _) = service.accept().await.unwrap();
        assert_eq!(
            hub.state.chains()[0].nodes,
            vec!["a".to_string(), "b".into(), "e".into()]
        );

        // Traffic flows both ways, then the intermediate dies mid-transfer.
        near.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        far.read_exact(&mut buf).await.unwrap();
        far.write_all(b"pong").await.unwrap();
        near.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        near.write_all(&[1u8; 1000]).await.unwrap();
        b.kill().await;

        // Both ends see their connection end (reads drain what was in flight, then stop).
        for s in [&mut near, &mut far] {
            let mut sink = vec![0u8; 4096];
            deadline(Duration::from_secs(10), async {
                while let Ok(n) = s.read(&mut sink).await
                    && n > 0
                {}
            })
            .await;
        }
        // Both remaining nodes forget the chain (a node only does on the hub's close_tube, so
        // by then the hub has forgotten it too).
        for api in [a.api, e.api] {
            wait_gone(api, &tunnel_id).await;
        }
        assert!(hub.state.chains().is_empty());
    })
    .await;
}

/// Returns once the node at `api` no longer has `tunnel_id`: subscribes (the answer is a
/// snapshot) and, if the chain is in it, waits for its `closed` push.
async fn wait_gone(api: SocketAddr, tunnel_id: &str) {
    let mut f = FrontClient::connect(api).await.unwrap();
    f.send(&FrontMessage::Subscribe {}).await.unwrap();
    let present = loop {
        if let FrontMessage::Tubes { items } = f.recv().await.unwrap() {
            break items.iter().any(|t| t.tunnel_id == tunnel_id);
        }
    };
    if present {
        loop {
            if let FrontMessage::Closed { tunnel_id: t, .. } = f.recv().await.unwrap()
                && t == tunnel_id
            {
                return;
            }
        }
    }
}

/// A node whose every step the test scripts, speaking the real hub protocol over TLS.
struct ScriptedNode {
    conn: tube_net::codec::HandshakeConn<tube_net::tokio_rustls::client::TlsStream<TcpStream>>,
}

async fn connect_from(bind: IpAddr, addr: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(bind, 0)).unwrap();
    s.connect(addr).await.expect("connect")
}

impl ScriptedNode {
    async fn register(hub: &TestHub, name: &str, octet: u8, relay: bool) -> Self {
        let tcp = connect_from(ip(octet), hub.addr).await;
        let cfg = tls::pinned_client_config(hub.fingerprint).unwrap();
        let tls = TlsConnector::from(cfg)
            .connect(tls::server_name(), tcp)
            .await
            .expect("tls");
        let mut node = Self {
            conn: handshake_conn(tls),
        };
        node.send(HubMessage::Register {
            version: CHAIN_PROTOCOL_VERSION.into(),
            name: name.into(),
            relay,
            invite: None,
        })
        .await;
        match node.recv().await {
            HubMessage::RegisterResult {
                is_success: true, ..
            } => node,
            other => panic!("register failed: {other:?}"),
        }
    }

    async fn send(&mut self, m: HubMessage) {
        self.conn
            .send(Frame::Control(m.to_bytes()))
            .await
            .expect("send");
    }

    async fn recv(&mut self) -> HubMessage {
        match self.conn.next().await {
            Some(Ok(Frame::Control(b))) => HubMessage::from_bytes(&b).expect("hub message"),
            other => panic!("hub connection: {other:?}"),
        }
    }
}

/// Reads until the peer closes; true if it did within 10 s.
async fn closed_by_peer(s: &mut TcpStream) -> bool {
    ended(s, Duration::from_secs(10)).await.is_some()
}

#[tokio::test]
async fn hop_port_refuses_strangers_and_wrong_secrets_then_takes_the_right_hop() {
    deadline(LIMIT, async {
        let hub = start_hub(0).await;
        let da = tempfile::tempdir().unwrap();
        let a = start_node(&hub, "a", 2, da.path()).await;
        let mut s = ScriptedNode::register(&hub, "s", 7, false).await;

        let chain =
            tokio::spawn(async move { open_chain(a.api, "s", "hop").await.map(|c| (c, a)) });
        let (id, tunnel_id) = match s.recv().await {
            HubMessage::RequestConnection { id, tunnel_id, .. } => (id, tunnel_id),
            other => panic!("expected request_connection, got {other:?}"),
        };
        s.send(HubMessage::RequestConnectionResult {
            id,
            tunnel_id: tunnel_id.clone(),
            is_allowed: true,
            reason: String::new(),
        })
        .await;
        let (id, from, secret) = match s.recv().await {
            HubMessage::MakeTube {
                id,
                from: Some(from),
                to: None,
                secret_out: Some(secret),
                ..
            } => (id, from.parse::<SocketAddr>().unwrap(), secret),
            other => panic!("expected make_tube as endpoint, got {other:?}"),
        };
        let tunnel = parse_tunnel_id(&tunnel_id).unwrap();
        let secret = secret.to_bytes().unwrap();

        // 1. The right preamble from the wrong address: closed.
        let mut stranger = connect_from(ip(9), from).await;
        let _ = stranger.write_all(&encode_hop_hello(tunnel, secret)).await;
        assert!(
            closed_by_peer(&mut stranger).await,
            "stranger's connection closed"
        );
        // 2. The right address with a wrong secret: closed.
        let mut forged = connect_from(ip(7), from).await;
        let mut wrong = secret;
        wrong[0] ^= 1;
        forged
            .write_all(&encode_hop_hello(tunnel, wrong))
            .await
            .unwrap();
        assert!(closed_by_peer(&mut forged).await, "wrong secret closed");
        // 3. The right hop still gets in, and carries bytes.
        let mut hop = connect_from(ip(7), from).await;
        hop.write_all(&encode_hop_hello(tunnel, secret))
            .await
            .unwrap();
        hop.write_all(b"hello from the endpoint").await.unwrap();
        s.send(HubMessage::MakeTubeResult {
            id,
            tunnel_id: tunnel_id.clone(),
            is_allowed: true,
            port: None,
            reason: String::new(),
        })
        .await;
        let ((_owner, mut near, up_id, _), a) = chain.await.unwrap().expect("chain up");
        assert_eq!(up_id, tunnel_id);
        let mut buf = [0u8; 23];
        near.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello from the endpoint");
        near.write_all(b"and back").await.unwrap();
        let mut back = [0u8; 8];
        hop.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"and back");
        assert_eq!(a.stats.refused_hops(), 2, "both bad connections counted");
    })
    .await;
}

/// A bare `auth` as `name` with `password`, like a node that dies right after the answer
/// (it never stores the next password, never sends `password_stored`): the answer.
async fn auth_and_vanish(hub: &TestHub, name: &str, password: &str) -> HubMessage {
    first_answer(
        hub,
        HubMessage::Auth {
            version: CHAIN_PROTOCOL_VERSION.into(),
            name: name.into(),
            password: tube_proto::chain::ChainSecret::new(password),
            relay: false,
        },
    )
    .await
}

/// The hub's answer to `login` (`register` or `auth`) on a fresh connection.
async fn first_answer(hub: &TestHub, login: HubMessage) -> HubMessage {
    first_answer_from(hub, 1, login).await
}

/// [`first_answer`] from 127.0.0.`octet`.
async fn first_answer_from(hub: &TestHub, octet: u8, login: HubMessage) -> HubMessage {
    login_from(hub, octet, login).await.0
}

type NodeSide =
    tube_net::codec::HandshakeConn<tube_net::tokio_rustls::client::TlsStream<TcpStream>>;

/// Sends `login` from 127.0.0.`octet` and returns the hub's first answer and the connection.
async fn login_from(hub: &TestHub, octet: u8, login: HubMessage) -> (HubMessage, NodeSide) {
    let tcp = connect_from(ip(octet), hub.addr).await;
    let cfg = tls::pinned_client_config(hub.fingerprint).expect("tls config");
    let tls = TlsConnector::from(cfg)
        .connect(tls::server_name(), tcp)
        .await
        .expect("tls to the hub");
    let mut conn = handshake_conn(tls);
    conn.send(Frame::Control(login.to_bytes()))
        .await
        .expect("send login");
    match deadline(LIMIT, conn.next()).await {
        Some(Ok(Frame::Control(b))) => (HubMessage::from_bytes(&b).expect("a hub message"), conn),
        other => panic!("expected an answer to the login, got {other:?}"),
    }
}

/// A hub config with accounts in memory.
fn memory_hub_config() -> HubConfig {
    HubConfig::new(
        Identity::generate(&["localhost"]).expect("identity"),
        Arc::new(MemoryAccounts::default()),
    )
}

/// `register` for `name` (no relaying), with `invite` if given.
fn register(name: &str, invite: Option<ChainSecret>) -> HubMessage {
    HubMessage::Register {
        version: CHAIN_PROTOCOL_VERSION.into(),
        name: name.into(),
        relay: false,
        invite,
    }
}

fn refused(answer: &HubMessage) -> bool {
    matches!(
        answer,
        HubMessage::AuthResult {
            is_success: false,
            code: Some(6001),
            ..
        }
    )
}

/// An account store that fails while `failing` is set (a database locked or gone), counting
/// the calls it failed.
#[derive(Debug)]
struct FlakyAccounts {
    inner: MemoryAccounts,
    failing: AtomicBool,
    failed: tokio::sync::watch::Sender<u64>,
}

impl FlakyAccounts {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryAccounts::default(),
            failing: AtomicBool::new(false),
            failed: tokio::sync::watch::channel(0).0,
        })
    }

    fn check(&self) -> Result<(), AccountError> {
        if self.failing.load(Ordering::SeqCst) {
            self.failed.send_modify(|n| *n += 1);
            return Err(AccountError::Store("database is locked".into()));
        }
        Ok(())
    }

    /// Waits until `n` more calls failed than `before`.
    async fn failed_more(&self, before: u64, n: u64) {
        let mut w = self.failed.subscribe();
        deadline(LIMIT, w.wait_for(|f| *f >= before + n))
            .await
            .expect("calls failed");
    }
}

impl AccountStore for FlakyAccounts {
    fn register_in(&self, name: &str, room: &Room<'_>) -> Result<Registered, AccountError> {
        self.check()?;
        self.inner.register_in(name, room)
    }
    fn seen(&self, name: &str) -> Result<(), AccountError> {
        self.inner.seen(name)
    }
    fn authenticate(&self, name: &str, password: &str) -> Result<Password, AccountError> {
        self.check()?;
        self.inner.authenticate(name, password)
    }
    fn confirm_stored(&self, name: &str, password: &Password) -> Result<(), AccountError> {
        self.inner.confirm_stored(name, password)
    }
    fn remove(&self, name: &str) -> Result<(), AccountError> {
        self.inner.remove(name)
    }
    fn exists(&self, name: &str) -> Result<bool, AccountError> {
        self.inner.exists(name)
    }
    fn blocks(&self) -> bool {
        false
    }
}

/// Accounts in memory whose `register` waits, once entered, until the test lets it go; they
/// also list the names the hub said it saw (`seen`).
#[derive(Debug)]
struct GatedAccounts {
    inner: MemoryAccounts,
    /// `register` calls so far.
    entered: tokio::sync::watch::Sender<u32>,
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    /// Names passed to `seen`, in order.
    seen: tokio::sync::watch::Sender<Vec<String>>,
}

impl GatedAccounts {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryAccounts::default(),
            entered: tokio::sync::watch::channel(0).0,
            open: std::sync::Mutex::new(false),
            opened: std::sync::Condvar::new(),
            seen: tokio::sync::watch::channel(Vec::new()).0,
        })
    }

    fn let_go(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl AccountStore for GatedAccounts {
    fn register_in(&self, name: &str, room: &Room<'_>) -> Result<Registered, AccountError> {
        self.entered.send_modify(|n| *n += 1);
        let open = self.open.lock().unwrap();
        let _open = self
            .opened
            .wait_timeout_while(open, LIMIT, |open| !*open)
            .unwrap();
        self.inner.register_in(name, room)
    }
    fn seen(&self, name: &str) -> Result<(), AccountError> {
        self.seen.send_modify(|names| names.push(name.to_owned()));
        self.inner.seen(name)
    }
    fn authenticate(&self, name: &str, password: &str) -> Result<Password, AccountError> {
        self.inner.authenticate(name, password)
    }
    fn confirm_stored(&self, name: &str, password: &Password) -> Result<(), AccountError> {
        self.inner.confirm_stored(name, password)
    }
    fn remove(&self, name: &str) -> Result<(), AccountError> {
        self.inner.remove(name)
    }
    fn exists(&self, name: &str) -> Result<bool, AccountError> {
        self.inner.exists(name)
    }
    // `blocks` stays true: `register` runs on the blocking pool, where it may wait.
}

/// Set when any thread of this test binary panics with "resumed after completion" (a future
/// polled again after it finished).
static POLLED_AFTER_COMPLETION: AtomicBool = AtomicBool::new(false);

#[tokio::test]
async fn a_register_that_ends_after_shutdown_began_still_hands_over_its_password() {
    // The hub's sessions run in tasks, whose panics no test sees: watch for the one a session
    // writer polled after it finished would raise (the early node below reads its 6013 but
    // does not close, so its session's writer ends first).
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.to_string().contains("resumed after completion") {
            POLLED_AFTER_COMPLETION.store(true, Ordering::SeqCst);
        }
        previous(info);
    }));
    deadline(LIMIT, async {
        let accounts = GatedAccounts::new();
        let mut hub = start_hub_on(accounts.clone()).await;
        // A node logged in before: its `error` 6013 tells when the hub is shutting down.
        accounts.let_go();
        let (answer, mut early) = login_from(&hub, 5, register("early", None)).await;
        registered(&answer);
        *accounts.open.lock().unwrap() = false;
        let late = login_from(&hub, 6, register("late", None));
        let shut = async {
            let mut entered = accounts.entered.subscribe();
            entered.wait_for(|n| *n == 2).await.expect("late register");
            hub.shutdown.cancel();
            loop {
                match early.next().await {
                    Some(Ok(Frame::Control(b))) => {
                        if let Ok(HubMessage::Error { code: 6013, .. }) = HubMessage::from_bytes(&b)
                        {
                            break;
                        }
                    }
                    other => panic!("expected 6013 for the early node, got {other:?}"),
                }
            }
            accounts.let_go();
        };
        let ((answer, mut conn), ()) = tokio::join!(late, shut);
        // The account was made: its password comes first, then the refusal.
        registered(&answer);
        match conn.next().await {
            Some(Ok(Frame::Control(b))) => assert!(
                matches!(
                    HubMessage::from_bytes(&b),
                    Ok(HubMessage::Error { code: 6013, .. })
                ),
                "{b:?}"
            ),
            other => panic!("expected error 6013, got {other:?}"),
        }
        assert!(accounts.inner.exists("late").unwrap());
        // Every session has ended once the hub has.
        let task = hub.task.take().expect("hub task");
        deadline(LIMIT, task)
            .await
            .expect("hub task")
            .expect("hub ran");
        drop(early);
        assert!(
            !POLLED_AFTER_COMPLETION.load(Ordering::SeqCst),
            "a hub session polled its finished writer again"
        );
        // Sessions the shutdown ended write nothing to the store on their way out.
        assert!(
            accounts.seen.borrow().is_empty(),
            "{:?}",
            accounts.seen.borrow()
        );
    })
    .await;
}

/// Reconnects after 10 to 50 ms, so a test sees several sessions quickly.
fn quick_retry(mut config: NodeConfig) -> NodeConfig {
    config.reconnect.initial = Duration::from_millis(10);
    config.reconnect.max = Duration::from_millis(50);
    config
}

/// The password a successful `register_result` hands out; fails the test on any other answer.
fn registered(answer: &HubMessage) -> ChainSecret {
    match answer {
        HubMessage::RegisterResult {
            is_success: true,
            password: Some(p),
            ..
        } => p.clone(),
        other => panic!("expected a successful register_result, got {other:?}"),
    }
}

/// The code of a refusal (a failed `register_result` or `auth_result`, or an `error`); `None`
/// for anything else.
fn refusal(answer: &HubMessage) -> Option<u16> {
    match answer {
        HubMessage::RegisterResult {
            is_success: false,
            code,
            ..
        }
        | HubMessage::AuthResult {
            is_success: false,
            code,
            ..
        } => *code,
        HubMessage::Error { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test]
async fn a_hub_whose_account_store_fails_answers_6014_and_nodes_retry_until_it_recovers() {
    deadline(LIMIT, async {
        let accounts = FlakyAccounts::new();
        let hub = start_hub_on(accounts.clone()).await;
        accounts.failing.store(true, Ordering::SeqCst);
        let register = HubMessage::Register {
            version: CHAIN_PROTOCOL_VERSION.into(),
            name: "x".into(),
            relay: false,
            invite: None,
        };
        let answer = first_answer(&hub, register).await;
        assert_eq!(refusal(&answer), Some(6014), "register: {answer:?}");

        // A node registering meanwhile is not stopped by it (6002 would stop it for good):
        // it tries again and again, and logs in once the store works.
        let dir = tempfile::tempdir().unwrap();
        let config = quick_retry(node_config(&hub, "s", 2, dir.path()));
        let before = *accounts.failed.borrow();
        let node = spawn_node(config.clone()).await;
        accounts.failed_more(before, 3).await;
        assert!(!node.task.is_finished(), "the node gave up");
        accounts.failing.store(false, Ordering::SeqCst);
        node.online_then_stop().await;

        // The same for a login (`auth`; 6001 would stop it for good), and the password it
        // holds still works afterwards: a failed store rotated nothing.
        accounts.failing.store(true, Ordering::SeqCst);
        let answer = auth_and_vanish(&hub, "s", &read_password(&config)).await;
        assert_eq!(refusal(&answer), Some(6014), "auth: {answer:?}");
        let before = *accounts.failed.borrow();
        let node = spawn_node(config.clone()).await;
        accounts.failed_more(before, 3).await;
        assert!(!node.task.is_finished(), "the node gave up");
        accounts.failing.store(false, Ordering::SeqCst);
        node.online_then_stop().await;
    })
    .await;
}

/// The hub side of a connection from a node, for a hub the test scripts.
type HubSide = tube_net::codec::HandshakeConn<tube_net::tokio_rustls::server::TlsStream<TcpStream>>;

/// A hub the test plays itself: its listener and TLS acceptor.
struct PlayedHub {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    _dir: tempfile::TempDir,
}

impl PlayedHub {
    /// The hub, and the config of a node named `name` on 127.0.0.`octet` that dials it.
    async fn start(name: &str, octet: u8) -> (Self, NodeConfig) {
        let identity = Identity::generate(&["localhost"]).expect("identity");
        let acceptor = TlsAcceptor::from(identity.server_config().expect("tls"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let dir = tempfile::tempdir().unwrap();
        let mut config = NodeConfig::new(
            listener.local_addr().unwrap().to_string(),
            identity.fingerprint(),
            name.into(),
            dir.path().to_path_buf(),
        );
        config.bind = ip(octet);
        let hub = Self {
            listener,
            acceptor,
            _dir: dir,
        };
        (hub, config)
    }

    /// The node's next connection, past TLS.
    async fn accept(&self) -> HubSide {
        let (tcp, _) = deadline(LIMIT, self.listener.accept())
            .await
            .expect("accept");
        handshake_conn(self.acceptor.accept(tcp).await.expect("tls"))
    }
}

async fn next_from_node(conn: &mut HubSide) -> Option<HubMessage> {
    match deadline(LIMIT, conn.next()).await {
        Some(Ok(Frame::Control(b))) => Some(HubMessage::from_bytes(&b).expect("node message")),
        Some(Ok(other)) => panic!("node sent {other:?}"),
        Some(Err(_)) | None => None,
    }
}

/// Sends the node what only a node may send; returns what the node sent until it closed.
async fn break_protocol(conn: &mut HubSide) -> Vec<HubMessage> {
    conn.send(Frame::Control(HubMessage::Logout {}.to_bytes()))
        .await
        .unwrap();
    let mut sent = Vec::new();
    while let Some(m) = next_from_node(conn).await {
        sent.push(m);
    }
    sent
}

#[tokio::test]
async fn a_node_answers_every_protocol_error_of_its_hub_with_6009_before_closing() {
    deadline(LIMIT, async {
        init_tracing();
        let (hub, config) = PlayedHub::start("n", 2).await;
        let node = spawn_node(quick_retry(config)).await;
        // Every session: log the node in, then send what only a node may send. The node's
        // `error` and its close race each other, so several sessions are needed to see that
        // the error always goes first.
        for session in 0..8u32 {
            let mut conn = hub.accept().await;
            let password = tube_proto::chain::ChainSecret::new(format!("{session:064x}"));
            let answer = match next_from_node(&mut conn).await {
                Some(HubMessage::Register { .. }) => HubMessage::RegisterResult {
                    is_success: true,
                    message: "registered".into(),
                    password: Some(password),
                    code: None,
                },
                Some(HubMessage::Auth { .. }) => HubMessage::AuthResult {
                    is_success: true,
                    message: "welcome".into(),
                    next_password: Some(password),
                    code: None,
                },
                other => panic!("session {session}: expected a login, got {other:?}"),
            };
            conn.send(Frame::Control(answer.to_bytes())).await.unwrap();
            assert!(matches!(
                next_from_node(&mut conn).await,
                Some(HubMessage::PasswordStored {})
            ));
            let sent = break_protocol(&mut conn).await;
            assert!(
                matches!(sent.as_slice(), [HubMessage::Error { code: 6009, .. }]),
                "session {session}: the node sent {sent:?} before closing"
            );
        }
        // The same when the answer to the login itself is one only a node may send.
        let mut conn = hub.accept().await;
        assert!(matches!(
            next_from_node(&mut conn).await,
            Some(HubMessage::Auth { .. })
        ));
        let sent = break_protocol(&mut conn).await;
        assert!(
            matches!(sent.as_slice(), [HubMessage::Error { code: 6009, .. }]),
            "login: the node sent {sent:?} before closing"
        );
        assert!(!node.task.is_finished(), "6009 is not final");
    })
    .await;
}

#[tokio::test]
async fn passwords_are_single_use_across_restarts_and_survive_a_crash_before_storing() {
    deadline(LIMIT, async {
        let hub = start_hub(0).await;
        let dir = tempfile::tempdir().unwrap();
        let config = node_config(&hub, "r", 2, dir.path());

        // First start registers and stores password 1.
        spawn_node(config.clone()).await.online_then_stop().await;
        let p1 = read_password(&config);
        // A restart logs in with 1, stores 2 and says so (`password_stored`): 1 is void at
        // once, refused on its second use.
        spawn_node(config.clone()).await.online_then_stop().await;
        let p2 = read_password(&config);
        assert_ne!(p1, p2, "each login rotates the password");
        assert!(
            refused(&auth_and_vanish(&hub, "r", &p1).await),
            "1 used twice"
        );

        // A crash right after the hub rotated: a login with 2 gets 3, and the node dies
        // before storing it (its file still holds 2, no `password_stored`).
        let p3 = match auth_and_vanish(&hub, "r", &p2).await {
            HubMessage::AuthResult {
                is_success: true,
                next_password: Some(p),
                ..
            } => p.expose().to_string(),
            other => panic!("the login with 2 failed: {other:?}"),
        };
        assert_ne!(p3, p2);
        // The node still logs in with 2 (the hub keeps it until a successor is stored), gets
        // 4 and stores it: 2 and the unsaved 3 are void.
        spawn_node(config.clone()).await.online_then_stop().await;
        let p4 = read_password(&config);
        assert!(p4 != p2 && p4 != p3);

        // Every used or voided password is refused for good, as final.
        for old in [&p1, &p2, &p3] {
            std::fs::write(config.password_path(), old).unwrap();
            let node = spawn_node(config.clone()).await;
            let err = deadline(LIMIT, node.task_result())
                .await
                .expect_err("refused");
            assert!(
                matches!(err, NodeError::Hub { code: 6001, .. }),
                "expected 6001, got {err}"
            );
            assert!(err.is_final());
        }
        // The current one still works.
        std::fs::write(config.password_path(), &p4).unwrap();
        spawn_node(config.clone()).await.online_then_stop().await;
    })
    .await;
}

#[tokio::test]
async fn logout_ends_the_session_and_its_chains() {
    deadline(LIMIT, async {
        let hub = start_hub(0).await;
        let (da, de) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = start_node(&hub, "a", 2, da.path()).await;
        let e = start_node(&hub, "e", 3, de.path()).await;
        let echo = echo_server().await;
        let _front = endpoint_front(e.api, true, echo.addr).await;
        let (mut owner, mut near, tunnel_id, _) = open_chain(a.api, "e", "l").await.expect("chain");
        assert_eq!(hub.state.online(), vec!["a".to_string(), "e".into()]);

        e.stop().await.expect("logout and stop");
        assert_eq!(hub.state.online(), vec!["a".to_string()], "e logged out");
        // Node 0's front is told, and its end of the chain closes.
        loop {
            if let FrontMessage::Closed { tunnel_id: t, .. } = owner.recv().await.unwrap() {
                assert_eq!(t, tunnel_id);
                break;
            }
        }
        assert!(closed_by_peer(&mut near).await);
        assert!(hub.state.chains().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_chains_between_several_pairs() {
    deadline(LIMIT, async {
        let hub = start_hub(1).await;
        let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().expect("dir")).collect();
        let names = ["a", "b", "c", "d"];
        let mut nodes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            nodes.push(start_node(&hub, name, 2 + i as u8, dirs[i].path()).await);
        }
        let echo = echo_server().await;
        let mut fronts = Vec::new();
        for n in &nodes {
            fronts.push(endpoint_front(n.api, true, echo.addr).await);
        }
        // Twelve chains at once: every ordered pair of distinct nodes.
        let mut transfers = Vec::new();
        let mut k = 0u64;
        for (i, from) in nodes.iter().enumerate() {
            for (j, to) in names.iter().enumerate() {
                if i == j {
                    continue;
                }
                k += 1;
                let api = from.api;
                let to = to.to_string();
                transfers.push(tokio::spawn(async move {
                    let local_id = format!("c{k}");
                    let (_owner, near, _, _) =
                        open_chain(api, &to, &local_id).await.expect("chain");
                    echo_through(near, 2 << 20, k).await;
                }));
            }
        }
        for t in transfers {
            t.await.expect("transfer intact");
        }
    })
    .await;
}

#[tokio::test]
async fn nodes_reconnect_after_a_hub_restart_and_chains_work_again() {
    deadline(LIMIT, async {
        let hub = start_hub(0).await;
        let (da, de) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut nodes = Vec::new();
        for (name, octet, dir) in [("a", 2, &da), ("e", 3, &de)] {
            let mut c = node_config(&hub, name, octet, dir.path());
            c.reconnect.initial = Duration::from_millis(50);
            let n = spawn_node(c).await;
            n.online().await;
            nodes.push(n);
        }
        let hub = hub.restart().await;
        for n in &nodes {
            let mut w = n.stats.sessions();
            deadline(LIMIT, w.wait_for(|s| s.logins >= 2 && s.online))
                .await
                .expect("logged in again");
        }
        let echo = echo_server().await;
        let _front = endpoint_front(nodes[1].api, true, echo.addr).await;
        let (_owner, near, _, _) = open_chain(nodes[0].api, "e", "again").await.expect("chain");
        echo_through(near, 1 << 20, 3).await;
        assert_eq!(hub.state.online(), vec!["a".to_string(), "e".into()]);
    })
    .await;
}

#[tokio::test]
async fn with_fewer_relays_online_the_chain_is_shorter_and_says_so() {
    deadline(LIMIT, async {
        let hub = start_hub(2).await;
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
        let a = start_node(&hub, "a", 2, dirs[0].path()).await;
        let _b = start_node(&hub, "b", 3, dirs[1].path()).await;
        let e = start_node(&hub, "e", 4, dirs[2].path()).await;
        let echo = echo_server().await;
        let _front = endpoint_front(e.api, true, echo.addr).await;
        let (_owner, near, _, accepted) = open_chain(a.api, "e", "short").await.expect("chain");
        assert_eq!(accepted.hops, Some(2), "one intermediate");
        assert!(
            accepted
                .reason
                .contains("only 1 intermediate(s) available (2 wanted)"),
            "{accepted:?}"
        );
        echo_through(near, 1 << 20, 5).await;
    })
    .await;
}

#[tokio::test]
async fn a_failed_build_is_torn_down_everywhere_and_leaves_nothing_listening() {
    deadline(LIMIT, async {
        // One relay, scripted: it refuses its first make_tube and ignores its second.
        let hub = start_hub_with(1, Duration::from_secs(1)).await;
        let (da, de) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = start_node(&hub, "a", 2, da.path()).await;
        let e = start_node(&hub, "e", 3, de.path()).await;
        let mut s = ScriptedNode::register(&hub, "s", 7, true).await;
        let echo = echo_server().await;
        let _front = endpoint_front(e.api, true, echo.addr).await;

        for (attempt, want) in [(0, 6006u16), (1, 6007)] {
            let api = a.api;
            let chain =
                tokio::spawn(async move { open_chain(api, "e", &format!("f{attempt}")).await });
            let (id, tunnel_id, from) = match s.recv().await {
                HubMessage::MakeTube {
                    id,
                    tunnel_id,
                    from: Some(from),
                    to: Some(_),
                    ..
                } => (id, tunnel_id, from),
                other => panic!("expected make_tube as intermediate, got {other:?}"),
            };
            // Node 0 was built first and listens for s.
            assert_eq!(*a.stats.listeners().borrow(), 1, "node 0's hop listener");
            if attempt == 0 {
                s.send(HubMessage::MakeTubeResult {
                    id,
                    tunnel_id: tunnel_id.clone(),
                    is_allowed: false,
                    port: None,
                    reason: "cannot connect".into(),
                })
                .await;
            } // else: no answer at all, the hub's 1 s step timeout fires.
            let refused = chain.await.unwrap().expect_err("the build failed");
            assert_eq!(refused.code, Some(want), "{refused:?}");
            // The scripted node is told too.
            match s.recv().await {
                HubMessage::CloseTube {
                    tunnel_id: t, code, ..
                } => {
                    assert_eq!(t, tunnel_id);
                    assert_eq!(code, Some(want));
                }
                other => panic!("expected close_tube, got {other:?}"),
            }
            // Every node forgot it, node 0's hop listener is gone, and so is the hub's chain.
            for api in [a.api, e.api] {
                wait_gone(api, &tunnel_id).await;
            }
            let mut open = a.stats.listeners();
            deadline(LIMIT, open.wait_for(|n| *n == 0)).await.unwrap();
            assert!(
                TcpStream::connect(from.parse::<SocketAddr>().unwrap())
                    .await
                    .is_err(),
                "nothing listens on {from} any more"
            );
            assert!(hub.state.chains().is_empty());
        }
    })
    .await;
}

/// The messages a front receives until `until` returns true for one (that one included).
async fn recv_until(
    f: &mut FrontClient,
    mut until: impl FnMut(&FrontMessage) -> bool,
) -> Vec<FrontMessage> {
    let mut got = Vec::new();
    loop {
        let m = f.recv().await.expect("front message");
        let last = until(&m);
        got.push(m);
        if last {
            return got;
        }
    }
}

/// An endpoint front that approves every request with `forward` (the node dials the service
/// itself) and reports the tunnel id of every chain established to it. Returns once its
/// subscription is active.
async fn forwarding_front(
    api: SocketAddr,
    forward: String,
) -> (JoinHandle<()>, tokio::sync::mpsc::Receiver<String>) {
    let mut ep = FrontClient::connect(api).await.expect("front");
    ep.send(&FrontMessage::Subscribe {}).await.expect("send");
    recv_until(&mut ep, |m| matches!(m, FrontMessage::Tubes { .. })).await;
    let (est_tx, est_rx) = tokio::sync::mpsc::channel(8);
    let task = tokio::spawn(async move {
        while let Ok(m) = ep.recv().await {
            match m {
                FrontMessage::ConnectionRequest { tunnel_id, .. } => {
                    let yes = FrontMessage::Approve {
                        tunnel_id,
                        is_allowed: true,
                        reason: String::new(),
                        forward: Some(forward.clone()),
                    };
                    ep.send(&yes).await.expect("approve");
                }
                FrontMessage::Established { tunnel_id, .. } => {
                    let _ = est_tx.try_send(tunnel_id);
                }
                _ => {}
            }
        }
    });
    (task, est_rx)
}

/// Connects to `addr` and reads: whether the connection ended with a reset (which may come
/// before the connect has returned), rather than an end of stream or data.
async fn reset_seen(addr: String) -> bool {
    let mut user = match TcpStream::connect(&addr).await {
        Ok(s) => s,
        Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(LIMIT, user.read(&mut buf))
        .await
        .expect("the connection ends");
    matches!(read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
}

/// `forward_listen` on node 0 and `approve` with `forward` on the endpoint: the nodes carry
/// the user's connection and dial the service themselves, so no front process is in the data
/// path (node 0 never asks its front to `listen`). A chain the hub refuses resets its user; a
/// front that leaves takes its listener with it; a non-loopback `local` is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_side_ends_carry_chains_without_the_fronts() {
    deadline(LIMIT, async {
        let hub = start_hub(1).await;
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
        let names = ["a", "b", "c"];
        let mut nodes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            nodes.push(start_node(&hub, name, 2 + i as u8, dirs[i].path()).await);
        }
        let echo = echo_server().await;

        // The endpoint's front approves with `forward` and never touches the chain.
        let (ep_task, mut est_rx) = forwarding_front(nodes[2].api, echo.addr.to_string()).await;

        let mut f = FrontClient::connect(nodes[0].api).await.expect("front");
        f.send(&FrontMessage::ForwardListen {
            endpoint_name: "c".into(),
            local: "10.1.2.3:0".into(),
        })
        .await
        .expect("send");
        match f.recv().await.expect("answer") {
            FrontMessage::Error { code, .. } => assert_eq!(code, 6009, "not loopback"),
            other => panic!("expected error 6009, got {other:?}"),
        }
        f.send(&FrontMessage::ForwardListen {
            endpoint_name: "c".into(),
            local: "127.0.0.1:0".into(),
        })
        .await
        .expect("send");
        let local: SocketAddr = match f.recv().await.expect("answer") {
            FrontMessage::ForwardListening {
                endpoint_name,
                local,
            } => {
                assert_eq!(endpoint_name, "c");
                local.parse().expect("an ip:port")
            }
            other => panic!("expected forward_listening, got {other:?}"),
        };
        assert_ne!(local.port(), 0, "the real port");

        // Two users, two chains, each carrying its own bytes through a -> b -> c.
        const SIZE: usize = 4 << 20;
        for seed in 0..2u64 {
            let user = TcpStream::connect(local).await.expect("local port");
            echo_through(user, SIZE, seed).await;
            let tunnel_id = est_rx.recv().await.expect("endpoint established");
            let seen = recv_until(&mut f, |m| matches!(m, FrontMessage::Established { .. })).await;
            assert!(
                seen.iter()
                    .all(|m| !matches!(m, FrontMessage::Listen { .. })),
                "node 0 never asks its front to listen: {seen:?}"
            );
            match seen.last() {
                Some(FrontMessage::Established {
                    tunnel_id: t,
                    local_id,
                    port,
                    ..
                }) => {
                    assert_eq!(*t, tunnel_id);
                    assert!(local_id.starts_with("fwd-"), "{local_id}");
                    assert_eq!(*port, local.port(), "node 0's port is the listener's");
                }
                other => panic!("expected established, got {other:?}"),
            }
            let chain = hub
                .state
                .chains()
                .into_iter()
                .find(|c| c.tunnel_id == tunnel_id)
                .map(|c| c.nodes);
            // The chain may already be closing after its end of stream; the bytes were counted.
            let path = chain.unwrap_or_else(|| names.iter().map(|n| n.to_string()).collect());
            assert_counted(&nodes, &names, &path, &tunnel_id, SIZE);
        }

        // A chain the hub refuses (no such endpoint) resets its user, and the front hears why.
        f.send(&FrontMessage::ForwardListen {
            endpoint_name: "nobody".into(),
            local: "127.0.0.1:0".into(),
        })
        .await
        .expect("send");
        let nowhere = match recv_until(&mut f, |m| {
            matches!(m, FrontMessage::ForwardListening { .. })
        })
        .await
        .pop()
        {
            Some(FrontMessage::ForwardListening { local, .. }) => local,
            other => panic!("expected forward_listening, got {other:?}"),
        };
        let user = tokio::spawn(reset_seen(nowhere.clone()));
        let seen = recv_until(&mut f, |m| matches!(m, FrontMessage::TubeResult { .. })).await;
        match seen.last() {
            Some(FrontMessage::TubeResult {
                local_id,
                is_allowed: false,
                code,
                ..
            }) => {
                assert!(local_id.starts_with("fwd-"), "{local_id}");
                assert_eq!(*code, Some(6003), "unknown endpoint");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(user.await.unwrap(), "a refused chain resets its user");

        // The front leaves: both its listeners close.
        drop(f);
        let mut open = nodes[0].stats.listeners();
        deadline(LIMIT, open.wait_for(|n| *n == 0)).await.unwrap();
        for addr in [local.to_string(), nowhere] {
            assert!(
                TcpStream::connect(&addr).await.is_err(),
                "nothing listens on {addr} any more"
            );
        }
        ep_task.abort();
    })
    .await;
}

/// An endpoint approved with a `forward` nobody listens on fails the build: the requester's
/// user connection is reset and the requester's front hears why (never the service address).
#[tokio::test]
async fn a_forward_to_a_dead_service_fails_the_build_and_resets_the_user() {
    deadline(LIMIT, async {
        let hub = start_hub(0).await;
        let (da, dc) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = start_node(&hub, "a", 2, da.path()).await;
        let c = start_node(&hub, "c", 3, dc.path()).await;
        // A port that was just free: nothing listens there.
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap().to_string();
        drop(dead);
        let _ep = forwarding_front(c.api, dead_addr.clone()).await;
        let mut f = FrontClient::connect(a.api).await.expect("front");
        f.send(&FrontMessage::ForwardListen {
            endpoint_name: "c".into(),
            local: "127.0.0.1:0".into(),
        })
        .await
        .expect("send");
        let local = match f.recv().await.expect("answer") {
            FrontMessage::ForwardListening { local, .. } => local,
            other => panic!("expected forward_listening, got {other:?}"),
        };
        let user = tokio::spawn(reset_seen(local));
        let seen = recv_until(&mut f, |m| matches!(m, FrontMessage::Closed { .. })).await;
        match seen.last() {
            Some(FrontMessage::Closed { reason, code, .. }) => {
                assert_eq!(*code, Some(6006), "build failed: {reason}");
                assert!(!reason.contains(&dead_addr), "{reason}");
            }
            other => panic!("expected closed, got {other:?}"),
        }
        assert!(user.await.unwrap(), "a failed build resets its user");
    })
    .await;
}

/// The endpoint dials its front's service while it builds its part (`approve` with `forward`),
/// before the hub's `establish_connection`. A chain that fails in that window (here the hub,
/// played by the test, closes it with 6006 right after the endpoint's `make_tube_result`) must
/// reset the service's connection and the hop, never end them with a FIN the service could
/// take for a user who finished.
#[tokio::test]
async fn a_chain_failing_after_the_endpoint_dialled_its_service_resets_the_service() {
    deadline(LIMIT, async {
        init_tracing();
        let (played, config) = PlayedHub::start("c", 3).await;
        let node = spawn_node(config).await;
        let mut hub = played.accept().await;
        assert!(matches!(
            next_from_node(&mut hub).await,
            Some(HubMessage::Register { .. })
        ));
        let registered = HubMessage::RegisterResult {
            is_success: true,
            message: "registered".into(),
            password: Some(ChainSecret::new(format!("{:064x}", 7))),
            code: None,
        };
        hub.send(Frame::Control(registered.to_bytes()))
            .await
            .unwrap();
        assert!(matches!(
            next_from_node(&mut hub).await,
            Some(HubMessage::PasswordStored {})
        ));
        node.online().await;

        let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let service_addr = service.local_addr().unwrap().to_string();
        let (_front, _established) = forwarding_front(node.api, service_addr).await;
        // The previous hop, played by the test from 127.0.0.2.
        let hop = TcpListener::bind((ip(2), 0)).await.unwrap();
        let tunnel = "8fb889f4-a766-48f0-8e58-1c5ebdb9d088".to_string();
        let secret = ChainSecret::new(format!("{:064x}", 42));
        let ask = HubMessage::RequestConnection {
            id: 1,
            request_user: "a".into(),
            tunnel_id: tunnel.clone(),
        };
        hub.send(Frame::Control(ask.to_bytes())).await.unwrap();
        match next_from_node(&mut hub).await {
            Some(HubMessage::RequestConnectionResult { is_allowed, .. }) => assert!(is_allowed),
            other => panic!("expected request_connection_result, got {other:?}"),
        }
        let make = HubMessage::MakeTube {
            id: 2,
            tunnel_id: tunnel.clone(),
            from: Some(hop.local_addr().unwrap().to_string()),
            to: None,
            secret_in: None,
            secret_out: Some(secret.clone()),
        };
        hub.send(Frame::Control(make.to_bytes())).await.unwrap();
        let ((mut hop_conn, _), (mut service_conn, _)) =
            tokio::try_join!(hop.accept(), service.accept()).expect("the endpoint dials both");
        let mut hello = [0u8; 52];
        hop_conn.read_exact(&mut hello).await.expect("preamble");
        let id = parse_tunnel_id(&tunnel).unwrap();
        assert_eq!(hello, encode_hop_hello(id, secret.to_bytes().unwrap()));
        match next_from_node(&mut hub).await {
            Some(HubMessage::MakeTubeResult {
                is_allowed, port, ..
            }) => assert!(is_allowed && port.is_none()),
            other => panic!("expected make_tube_result, got {other:?}"),
        }
        // The chain fails before `establish_connection`.
        let close = HubMessage::CloseTube {
            tunnel_id: tunnel.clone(),
            reason: "node b left during the build".into(),
            code: Some(6006),
        };
        hub.send(Frame::Control(close.to_bytes())).await.unwrap();
        let mut buf = [0u8; 8];
        for (who, conn) in [("service", &mut service_conn), ("hop", &mut hop_conn)] {
            let read = conn.read(&mut buf).await;
            assert!(
                matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                "the {who} connection ended with {read:?}, not a reset"
            );
        }
        assert!(
            !node.task.is_finished(),
            "a failed chain is not the node's end"
        );
    })
    .await;
}
