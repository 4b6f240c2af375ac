//! Relay + agent end to end, in-process on 127.0.0.1: every scenario of seed 002's test list,
//! the agent-leaves race, flow control under a slow reader, large transfers (256 MiB each way;
//! 100 concurrent streams), half-close, resets, and port allocation. `tests/integrity.sh` runs
//! the transfer figures of issue 8 at full size (1 GiB; 100 x 10 MiB) on the release binaries.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tube_agent::TunnelSpec;
use tube_proto::ErrorCode;
use tube_testkit::*;

const LIMIT: Duration = Duration::from_secs(60);
const PROMPT: Duration = Duration::from_secs(3);

/// Sends `msg` and reads `expect.len()` bytes back.
async fn exchange(s: &mut TcpStream, msg: &[u8], expect: &[u8]) {
    s.write_all(msg).await.expect("write");
    let mut buf = vec![0u8; expect.len()];
    s.read_exact(&mut buf).await.expect("read");
    assert_eq!(buf, expect);
}

async fn user(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("user connect")
}

/// A connection that must be over (EOF or reset) promptly, without delivering data.
async fn assert_closed(s: &mut TcpStream, what: &str) {
    let r = ended(s, PROMPT).await;
    assert!(
        r.is_some(),
        "{what}: connection still open or delivered data"
    );
}

/// After an agent left, a new connection to its port is refused or closed at once.
async fn assert_port_dead(addr: SocketAddr) {
    if let Ok(mut s) = TcpStream::connect(addr).await {
        if s.local_addr().ok() == s.peer_addr().ok() {
            return; // self-connect to a free port, see the race test
        }
        let _ = s.write_all(b"anyone?").await;
        assert_closed(&mut s, "connection to a dead tunnel").await;
    }
}

#[tokio::test]
async fn agent_opens_tunnel_then_agent_and_relay_stop() {
    init_tracing();
    deadline(LIMIT, async {
        let relay = TestRelay::start().await;
        let svc = echo_server().await;
        let agent = TestAgent::start(relay.agent_config(&[svc.addr])).await;
        let public = agent.public[0];
        assert_eq!(public.ip().to_string(), "127.0.0.1");
        agent.stop().await;
        assert_port_dead(public).await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn user_sends_message_disconnects_then_agent_and_relay_stop() {
    init_tracing();
    deadline(LIMIT, async {
        let relay = TestRelay::start().await;
        let svc = echo_server().await;
        let agent = TestAgent::start(relay.agent_config(&[svc.addr])).await;
        let mut u = user(agent.public[0]).await;
        assert_eq!(
            roundtrip(&mut u, b"hello through the tunnel").await,
            b"hello through the tunnel"
        );
        drop(u);
        let mut u = user(agent.public[0]).await;
        assert_eq!(roundtrip(&mut u, b"again").await, b"again");
        agent.stop().await;
        assert_closed(&mut u, "user of a stopped agent").await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn two_users_on_the_same_tunnel() {
    init_tracing();
    deadline(LIMIT, async {
        let relay = TestRelay::start().await;
        let svc = echo_server().await;
        let agent = TestAgent::start(relay.agent_config(&[svc.addr])).await;
        let mut u1 = user(agent.public[0]).await;
        let mut u2 = user(agent.public[0]).await;
        // u1 sends a message.
        assert_eq!(roundtrip(&mut u1, b"u1 first").await, b"u1 first");
        // Both send, interleaved, and each gets only its own bytes back.
        u1.write_all(b"u1-a").await.unwrap();
        u2.write_all(b"u2-a").await.unwrap();
        u1.write_all(b"u1-b").await.unwrap();
        u2.write_all(b"u2-b").await.unwrap();
        let mut b1 = [0u8; 8];
        let mut b2 = [0u8; 8];
        u1.read_exact(&mut b1).await.unwrap();
        u2.read_exact(&mut b2).await.unwrap();
        assert_eq!(&b1, b"u1-au1-b");
        assert_eq!(&b2, b"u2-au2-b");
        // u1 disconnects; u2 still works.
        drop(u1);
        assert_eq!(
            roundtrip(&mut u2, b"u2 after u1 left").await,
            b"u2 after u1 left"
        );
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn two_agents_two_services_two_users_each_interleaved() {
    init_tracing();
    deadline(LIMIT, async {
        let relay = TestRelay::start().await;
        let svc_a = echo_server().await;
        // The second protected service answers with a prefix, so crossed wires would show.
        let svc_b = serve(|mut s| async move {
            let mut buf = [0u8; 1024];
            loop {
                let n = match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut out = b"B:".to_vec();
                out.extend_from_slice(&buf[..n]);
                if s.write_all(&out).await.is_err() {
                    break;
                }
            }
        })
        .await;
        let agent_a = TestAgent::start(relay.agent_config(&[svc_a.addr])).await;
        let agent_b = TestAgent::start(relay.agent_config(&[svc_b.addr])).await;
        assert_ne!(agent_a.public[0], agent_b.public[0]);
        let mut a1 = user(agent_a.public[0]).await;
        let mut a2 = user(agent_a.public[0]).await;
        let mut b1 = user(agent_b.public[0]).await;
        let mut b2 = user(agent_b.public[0]).await;
        // u1 sends, then u2, then u1 disconnects, u2 sends, u2 disconnects: on both tunnels,
        // interleaved across them.
        assert_eq!(roundtrip(&mut a1, b"a1").await, b"a1");
        exchange(&mut b1, b"b1", b"B:b1").await;
        assert_eq!(roundtrip(&mut a2, b"a2").await, b"a2");
        exchange(&mut b2, b"b2", b"B:b2").await;
        drop(a1);
        exchange(&mut b2, b"b2 again", b"B:b2 again").await;
        drop(b1);
        assert_eq!(roundtrip(&mut a2, b"a2 again").await, b"a2 again");
        exchange(&mut b2, b"b2 third", b"B:b2 third").await;
        drop(a2);
        drop(b2);
        // One agent leaving does not disturb the other.
        agent_a.stop().await;
        let mut b3 = user(agent_b.public[0]).await;
        exchange(&mut b3, b"still here", b"B:still here").await;
        agent_b.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn several_local_services_over_one_connection() {
    init_tracing();
    deadline(LIMIT, async {
        let relay = TestRelay::start().await;
        let s1 = echo_server().await;
        let s2 = serve(|mut s| async move {
            let _ = s.write_all(b"banner-2").await;
        })
        .await;
        let agent = TestAgent::start(relay.agent_config(&[s1.addr, s2.addr])).await;
        assert_eq!(agent.public.len(), 2);
        let mut u1 = user(agent.public[0]).await;
        assert_eq!(roundtrip(&mut u1, b"one").await, b"one");
        let mut u2 = user(agent.public[1]).await;
        let mut banner = Vec::new();
        u2.read_to_end(&mut banner).await.unwrap();
        assert_eq!(banner, b"banner-2");
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn many_users_on_several_tunnels_and_agents_at_once() {
    init_tracing();
    deadline(LIMIT, async {
        let relay = TestRelay::start().await;
        let svc = echo_server().await;
        let a = TestAgent::start(relay.agent_config(&[svc.addr, svc.addr])).await;
        let b = TestAgent::start(relay.agent_config(&[svc.addr, svc.addr])).await;
        let ports: Vec<SocketAddr> = a.public.iter().chain(b.public.iter()).copied().collect();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..100u64 {
            let addr = ports[i as usize % ports.len()];
            tasks.spawn(async move {
                let mut s = user(addr).await;
                for round in 0..5u64 {
                    let msg = pattern(1000 + (i as usize * 37) % 5000, i * 100 + round);
                    assert_eq!(roundtrip(&mut s, &msg).await, msg);
                }
            });
        }
        let mut done = 0;
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
            done += 1;
        }
        assert_eq!(done, 100);
        a.stop().await;
        b.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn half_close_is_carried_in_both_directions() {
    init_tracing();
    deadline(LIMIT, async {
        let relay = TestRelay::start().await;
        let (count_tx, mut count_rx) = tokio::sync::mpsc::unbounded_channel();
        // The service sends a banner and closes its write side at once, then keeps reading
        // until the user's EOF and reports how much it got.
        let svc = serve(move |mut s| {
            let tx = count_tx.clone();
            async move {
                s.write_all(b"bye early").await.unwrap();
                s.shutdown().await.unwrap();
                let mut n = 0usize;
                let mut buf = [0u8; 65536];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                }
                let _ = tx.send(n);
            }
        })
        .await;
        let agent = TestAgent::start(relay.agent_config(&[svc.addr])).await;
        let mut u = user(agent.public[0]).await;
        let mut got = Vec::new();
        u.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got, b"bye early",
            "service's half-close reaches the user as EOF"
        );
        // The user's direction is still open: send 1 MiB after the EOF, then half-close.
        let sent = pattern(1 << 20, 9);
        u.write_all(&sent).await.unwrap();
        u.shutdown().await.unwrap();
        assert_eq!(count_rx.recv().await, Some(sent.len()));

        // And the other way round: the user closes first, the service answers after EOF.
        let svc2 = serve(|mut s| async move {
            let mut all = Vec::new();
            s.read_to_end(&mut all).await.unwrap();
            s.write_all(format!("got {}", all.len()).as_bytes())
                .await
                .unwrap();
        })
        .await;
        let agent2 = TestAgent::start(relay.agent_config(&[svc2.addr])).await;
        let mut u = user(agent2.public[0]).await;
        u.write_all(&[7u8; 100_000]).await.unwrap();
        u.shutdown().await.unwrap();
        let mut reply = String::new();
        u.read_to_string(&mut reply).await.unwrap();
        assert_eq!(reply, "got 100000");
        agent.stop().await;
        agent2.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn unreachable_local_service_closes_the_user_at_once() {
    init_tracing();
    deadline(LIMIT, async {
        let relay = TestRelay::start().await;
        let dead = dead_addr().await;
        let agent = TestAgent::start(relay.agent_config(&[dead])).await;
        let mut u = user(agent.public[0]).await;
        let _ = u.write_all(b"hello?").await;
        assert_eq!(
            ended(&mut u, PROMPT).await,
            Some(true),
            "user must see a reset"
        );
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn resets_propagate_in_both_directions() {
    init_tracing();
    deadline(LIMIT, async {
        let relay = TestRelay::start().await;
        // A service that resets every connection after reading one byte.
        let rst = serve(|mut s| async move {
            let mut b = [0u8; 1];
            let _ = s.read(&mut b).await;
            tube_net::abort_tcp(s);
        })
        .await;
        // A service that reports how its connection ended.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watch = serve(move |mut s| {
            let tx = tx.clone();
            async move {
                let _ = s.write_all(b"ready").await;
                let _ = tx.send(ended(&mut s, Duration::from_secs(30)).await);
            }
        })
        .await;
        let agent = TestAgent::start(relay.agent_config(&[rst.addr, watch.addr])).await;
        let mut u = user(agent.public[0]).await;
        u.write_all(b"x").await.unwrap();
        assert_eq!(
            ended(&mut u, PROMPT).await,
            Some(true),
            "service reset reaches the user"
        );

        let mut u = user(agent.public[1]).await;
        let mut ready = [0u8; 5];
        u.read_exact(&mut ready).await.unwrap();
        tube_net::abort_tcp(u);
        assert_eq!(
            rx.recv().await,
            Some(Some(true)),
            "user reset reaches the service"
        );
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn killed_agent_resets_every_user_connection() {
    init_tracing();
    deadline(LIMIT, async {
        let relay = TestRelay::start().await;
        let svc = echo_server().await;
        let agent = TestAgent::start(relay.agent_config(&[svc.addr, svc.addr])).await;
        let public = agent.public.clone();
        let mut users = Vec::new();
        for i in 0..20 {
            let mut u = user(public[i % 2]).await;
            assert_eq!(roundtrip(&mut u, b"alive").await, b"alive");
            users.push(u);
        }
        agent.kill().await;
        for (i, u) in users.iter_mut().enumerate() {
            assert_eq!(
                ended(u, PROMPT).await,
                Some(true),
                "user {i} must see a reset"
            );
        }
        assert_port_dead(public[0]).await;
        assert_port_dead(public[1]).await;
        relay.stop().await;
    })
    .await;
}

/// Seed 002's race: users connecting while the agent leaves. Whatever the interleaving, once
/// the agent is gone no user connection stays open or receives data.
#[tokio::test]
async fn users_connecting_while_the_agent_leaves_are_never_left_connected() {
    init_tracing();
    deadline(Duration::from_secs(120), async {
        let relay = TestRelay::start().await;
        // The service greets every connection, so a user who got through sees bytes.
        let svc = serve(|mut s| async move {
            let _ = s.write_all(b"hi").await;
            let mut buf = [0u8; 64];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        })
        .await;
        for iteration in 0..40u32 {
            let agent = TestAgent::start(relay.agent_config(&[svc.addr])).await;
            let public = agent.public[0];
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let connecting = tokio::spawn(async move {
                for _ in 0..20 {
                    if let Ok(s) = TcpStream::connect(public).await {
                        let _ = tx.send(s);
                    }
                    tokio::task::yield_now().await;
                }
            });
            // Leave after a varying number of connections have been attempted.
            for _ in 0..(iteration % 10) {
                tokio::task::yield_now().await;
            }
            if iteration % 2 == 0 {
                agent.kill().await;
            } else {
                agent.stop().await;
            }
            connecting.await.unwrap();
            while let Ok(mut s) = rx.try_recv() {
                // A connect to a port nobody listens on any more can pick that same port as
                // its source and connect to itself (TCP simultaneous open): not a relay user.
                if s.local_addr().ok() == s.peer_addr().ok() {
                    continue;
                }
                // Drain what the service may have sent before the agent left, then the
                // connection must end and never deliver data sent after that.
                let mut buf = [0u8; 64];
                let mut outcome = None;
                for _ in 0..4 {
                    match tokio::time::timeout(PROMPT, s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => {
                            outcome = Some(());
                            break;
                        }
                        Ok(Ok(_)) => continue,
                        Err(_) => break,
                    }
                }
                assert!(
                    outcome.is_some(),
                    "iteration {iteration}: a user stayed connected: local {:?} peer {:?}",
                    s.local_addr(),
                    s.peer_addr()
                );
                let _ = s.write_all(b"echo?").await;
                assert!(
                    !matches!(tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await, Ok(Ok(n)) if n > 0),
                    "iteration {iteration}: data after the agent left"
                );
            }
            assert_port_dead(public).await;
        }
        relay.stop().await;
    })
    .await;
}

/// One user stops reading while another on the same tunnel pulls 100 MiB: the second is not
/// held back, and the first still gets all of its data once it reads.
#[tokio::test]
async fn a_user_who_stops_reading_does_not_slow_the_others() {
    init_tracing();
    deadline(Duration::from_secs(120), async {
        let relay = TestRelay::start().await;
        const SIZE: usize = 100 << 20;
        let svc = serve(|mut s| async move {
            let mut seed = [0u8; 8];
            if s.read_exact(&mut seed).await.is_err() {
                return;
            }
            write_pattern(&mut s, SIZE, u64::from_le_bytes(seed)).await;
        })
        .await;
        let agent = TestAgent::start(relay.agent_config(&[svc.addr])).await;
        let mut stalled = user(agent.public[0]).await;
        stalled.write_all(&1u64.to_le_bytes()).await.unwrap();
        let mut fast = user(agent.public[0]).await;
        fast.write_all(&2u64.to_le_bytes()).await.unwrap();
        let expected_fast = {
            let mut c = std::io::Cursor::new(Vec::new());
            write_pattern(&mut c, SIZE, 2).await
        };
        let (n, hash) = read_hash(&mut fast).await;
        assert_eq!(n, SIZE);
        assert_eq!(hash, expected_fast);
        // Nothing was lost for the stalled user either.
        let expected_stalled = {
            let mut c = std::io::Cursor::new(Vec::new());
            write_pattern(&mut c, SIZE, 1).await
        };
        let (n, hash) = read_hash(&mut stalled).await;
        assert_eq!(n, SIZE);
        assert_eq!(hash, expected_stalled);
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn transfer_256_mib_each_way_is_byte_exact() {
    init_tracing();
    deadline(Duration::from_secs(240), async {
        let relay = TestRelay::start().await;
        let svc = echo_server().await;
        let agent = TestAgent::start(relay.agent_config(&[svc.addr])).await;
        const SIZE: usize = 256 << 20;
        let u = user(agent.public[0]).await;
        let (mut r, mut w) = u.into_split();
        let writer = tokio::spawn(async move {
            let h = write_pattern(&mut w, SIZE, 77).await;
            w.shutdown().await.unwrap();
            h
        });
        let (n, got) = read_hash(&mut r).await;
        let sent = writer.await.unwrap();
        assert_eq!(n, SIZE);
        assert_eq!(got, sent);
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

/// Issue 8's integrity figure at test scale: 100 user connections on one tunnel at once, each
/// echoing 1 MiB of its own pattern in both directions; every one gets back exactly its own
/// bytes (SHA-256 per stream). `tests/integrity.sh` runs 10 MiB per stream through the release
/// binaries (about 20 s in a debug build, too long here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_streams_each_come_back_byte_exact() {
    init_tracing();
    deadline(Duration::from_secs(120), async {
        let relay = TestRelay::start().await;
        let svc = echo_server().await;
        let agent = TestAgent::start(relay.agent_config(&[svc.addr])).await;
        const STREAMS: u64 = 100;
        const SIZE: usize = 1 << 20;
        let public = agent.public[0];
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..STREAMS {
            tasks.spawn(async move {
                let (mut r, mut w) = user(public).await.into_split();
                let writer = async {
                    let h = write_pattern(&mut w, SIZE, 1000 + i).await;
                    w.shutdown().await.expect("half-close");
                    h
                };
                let (sent, (n, got)) = tokio::join!(writer, read_hash(&mut r));
                assert_eq!(n, SIZE, "stream {i}: bytes echoed");
                assert_eq!(got, sent, "stream {i}: SHA-256 of the echo");
                i
            });
        }
        let mut done = Vec::new();
        while let Some(r) = tasks.join_next().await {
            done.push(r.expect("stream intact"));
        }
        done.sort_unstable();
        assert_eq!(
            done,
            (0..STREAMS).collect::<Vec<_>>(),
            "every stream finished"
        );
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_port_held_by_another_tunnel_is_refused_with_tunnel_exists() {
    init_tracing();
    deadline(LIMIT, async {
        let port = dead_addr().await.port();
        let mut cfg = relay_config();
        cfg.port_range = port..=port;
        let relay = TestRelay::start_with(cfg).await;
        let svc = echo_server().await;
        let spec = |p: u16| TunnelSpec {
            local: svc.addr.to_string(),
            remote_port: Some(p),
            name: "t".into(),
            ..Default::default()
        };
        let mut c = relay.agent_config(&[]);
        c.tunnels = vec![spec(port)];
        let first = TestAgent::start(c.clone()).await;
        assert_eq!(first.public[0].port(), port);
        let err = TestAgent::try_start(c.clone())
            .await
            .err()
            .expect("second must fail");
        assert_eq!(err.code(), Some(ErrorCode::TunnelExists), "{err}");
        assert!(
            err.to_string().starts_with("error 2001 TUNNEL_EXISTS: "),
            "{err}"
        );
        // Outside the relay's range: INVALID_CONFIG. Range exhausted: PORT_UNAVAILABLE.
        c.tunnels = vec![spec(port.wrapping_add(1).max(1))];
        let err = TestAgent::try_start(c.clone())
            .await
            .err()
            .expect("out of range");
        assert_eq!(err.code(), Some(ErrorCode::InvalidConfig), "{err}");
        let mut any = relay.agent_config(&[svc.addr]);
        // PORT_UNAVAILABLE is worth retrying (a port may free up); give up after one retry.
        any.backoff = tube_proto::backoff::BackoffConfig {
            initial: Duration::from_millis(10),
            max_attempts: 1,
            ..Default::default()
        };
        let err = TestAgent::try_start(any)
            .await
            .err()
            .expect("range exhausted");
        assert_eq!(err.code(), Some(ErrorCode::PortUnavailable), "{err}");
        // The first tunnel is unaffected; once it leaves, the port can be taken again.
        let mut u = user(first.public[0]).await;
        assert_eq!(roundtrip(&mut u, b"ok").await, b"ok");
        drop(u);
        first.stop().await;
        c.tunnels = vec![spec(port)];
        let again = wait_for_port(&c).await;
        assert_eq!(again.public[0].port(), port);
        again.stop().await;
        relay.stop().await;
    })
    .await;
}

/// The relay releases a port once the old session's teardown finished; retry until then.
async fn wait_for_port(c: &tube_agent::AgentConfig) -> TestAgent {
    loop {
        match TestAgent::try_start(c.clone()).await {
            Ok(a) => return a,
            Err(e) if e.code() == Some(ErrorCode::TunnelExists) => tokio::task::yield_now().await,
            Err(e) => panic!("unexpected: {e}"),
        }
    }
}
