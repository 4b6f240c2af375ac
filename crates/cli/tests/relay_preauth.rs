//! The relay before authentication, under connections that never authenticate: one deadline
//! over accept + TLS + greeting + auth cuts 500 slowloris connections while a real agent still
//! gets through; the per-source handshake cap keeps a flood from one 127.0.0.x address away
//! from the others; and the real `tube relay` binary, run out of file descriptors (limit 256),
//! stays up and serves again once the flood stops.
//!
//! Every test runs under a deadline and synchronises on events (the relay's state, bytes and
//! closes on sockets, log lines); each prints what it measured.

use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tube_net::codec::{HandshakeConn, handshake_conn, recv_control, send_control};
use tube_net::tokio_rustls::{TlsConnector, client::TlsStream};
use tube_net::{Fingerprint, tls};
use tube_proto::control::{ClientInfo, ControlMessage};
use tube_proto::{ErrorCode, Frame};
use tube_testkit::proc::Proc;
use tube_testkit::*;

const TUBE: &str = env!("CARGO_BIN_EXE_tube");

const LIMIT: Duration = Duration::from_secs(60);

type Conn = HandshakeConn<TlsStream<TcpStream>>;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// A TCP connection to `relay` from `src` (any address of 127.0.0.0/8).
async fn connect_from(src: IpAddr, relay: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::new(src, 0)).expect("bind source");
    sock.connect(relay).await.expect("connect")
}

/// TLS over `tcp`, pinned to `fp`.
async fn tls_over(tcp: TcpStream, fp: Fingerprint) -> std::io::Result<Conn> {
    let cfg = tls::pinned_client_config(fp).expect("client config");
    let tls = TlsConnector::from(cfg)
        .connect(tls::server_name(), tcp)
        .await?;
    Ok(handshake_conn(tls))
}

/// TLS + greeting + auth from `src`; true when the relay answered `auth_response`.
async fn authenticates_from(src: IpAddr, relay: SocketAddr, fp: Fingerprint, token: &str) -> bool {
    let Ok(mut c) = tls_over(connect_from(src, relay).await, fp).await else {
        return false;
    };
    if !matches!(recv_control(&mut c).await, Ok(ControlMessage::Hello { .. })) {
        return false;
    }
    let auth = ControlMessage::Auth {
        token: token.into(),
        version: "1.0".into(),
        client_info: ClientInfo::default(),
        window: None,
    };
    send_control(&mut c, &auth).await.expect("send auth");
    matches!(
        recv_control(&mut c).await,
        Ok(ControlMessage::AuthResponse { .. })
    )
}

/// Connections the relay holds in the handshake, from `src` (`None`: from anywhere).
fn pending(relay: &tube_relay::RelayState, src: Option<IpAddr>) -> usize {
    relay
        .agents()
        .iter()
        .filter(|a| a.state == "authenticating")
        .filter(|a| {
            src.is_none_or(|ip| {
                a.peer
                    .as_deref()
                    .and_then(|p| p.parse::<SocketAddr>().ok())
                    .is_some_and(|p| p.ip() == ip)
            })
        })
        .count()
}

/// How a slowloris connection stalls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slow {
    /// TCP connect, then nothing.
    Silent,
    /// A TLS record header announcing a 512-byte ClientHello, and only 100 bytes of it.
    PartialHello,
    /// The same header, then one byte of the ClientHello every 250 ms.
    Drip,
    /// TLS done and `hello` read, then nothing.
    NoAuth,
    /// TLS done, `hello` read, then half of an `auth` frame.
    PartialAuth,
}

impl Slow {
    /// 150 silent, 150 partial ClientHellos, 100 drips, 50 of each after TLS (per 500).
    fn of(i: usize) -> Self {
        match i % 10 {
            0..=2 => Slow::Silent,
            3..=5 => Slow::PartialHello,
            6 | 7 => Slow::Drip,
            8 => Slow::NoAuth,
            _ => Slow::PartialAuth,
        }
    }
}

/// What one slowloris connection saw: how long after it started connecting the relay closed
/// it, and the error code it was sent first, if any.
struct SlowEnd {
    kind: Slow,
    open_for: Duration,
    code: Option<u16>,
}

/// TLS record header: handshake, TLS 1.0 record version, 512 bytes; then the start of a
/// ClientHello (type 1, length 508, client version TLS 1.2).
const HELLO_START: [u8; 11] = [
    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
];

/// Reads until the connection ends (end of stream or an error).
async fn until_closed(tcp: &mut TcpStream) {
    let mut buf = [0u8; 256];
    while let Ok(n) = tcp.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// Reads frames until the connection ends; the code of the first `error` message seen.
async fn until_closed_tls(c: &mut Conn) -> Option<u16> {
    let mut code = None;
    while let Some(Ok(f)) = c.next().await {
        if let Frame::Control(b) = f
            && let Ok(ControlMessage::Error { code: c, .. }) = ControlMessage::from_bytes(&b)
        {
            code = code.or(Some(c));
        }
    }
    code
}

/// One slowloris connection from `src`: stalls as `kind` says, reports on `ready` once it is
/// stalling, and returns when the relay has closed it.
async fn slowloris(
    src: IpAddr,
    relay: SocketAddr,
    fp: Fingerprint,
    kind: Slow,
    ready: tokio::sync::mpsc::Sender<()>,
    closed: Arc<AtomicUsize>,
) -> SlowEnd {
    // Taken before connecting: the relay accepts (and starts its deadline) only after that.
    let opened = Instant::now();
    let mut tcp = connect_from(src, relay).await;
    let mut code = None;
    match kind {
        Slow::Silent => {
            ready.send(()).await.expect("ready");
            until_closed(&mut tcp).await;
        }
        Slow::PartialHello => {
            let mut part = HELLO_START.to_vec();
            part.resize(5 + 100, 0);
            tcp.write_all(&part).await.expect("write");
            ready.send(()).await.expect("ready");
            until_closed(&mut tcp).await;
        }
        Slow::Drip => {
            tcp.write_all(&HELLO_START[..5]).await.expect("write");
            ready.send(()).await.expect("ready");
            let mut drip = HELLO_START[5..].iter().copied().chain(std::iter::repeat(0));
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let mut buf = [0u8; 256];
            loop {
                tokio::select! {
                    r = tcp.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { break },
                    _ = tick.tick() => {
                        let byte = [drip.next().unwrap_or(0)];
                        // A failed write means the relay reset the connection.
                        if tcp.write_all(&byte).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        Slow::NoAuth | Slow::PartialAuth => {
            let mut c = tls_over(tcp, fp).await.expect("tls");
            let hello = recv_control(&mut c).await.expect("hello");
            assert!(matches!(hello, ControlMessage::Hello { .. }), "{hello:?}");
            if kind == Slow::PartialAuth {
                // A CONTROL header announcing 100 bytes, and 14 of them.
                let mut part = vec![0x00, 0, 0, 0, 0, 0, 0, 0, 100];
                part.extend_from_slice(b"{\"type\":\"auth\"");
                c.get_mut().write_all(&part).await.expect("write");
                c.get_mut().flush().await.expect("flush");
            }
            ready.send(()).await.expect("ready");
            code = until_closed_tls(&mut c).await;
        }
    }
    let open_for = opened.elapsed();
    closed.fetch_add(1, Ordering::SeqCst);
    SlowEnd {
        kind,
        open_for,
        code,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_cut_at_the_deadline_while_an_agent_gets_through() {
    init_tracing();
    const SLOW: usize = 500;
    const HANDSHAKE: Duration = Duration::from_secs(2);
    // How late a close may come after the deadline on a loaded 2-core machine.
    const MARGIN: Duration = Duration::from_secs(2);
    let sources = [
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
        "127.0.0.5",
        "127.0.0.6",
    ];
    deadline(LIMIT, async {
        let started = Instant::now();
        let mut cfg = relay_config();
        cfg.handshake_timeout = HANDSHAKE;
        // Room for the 500 (100 per source) and the agent.
        cfg.max_handshakes = SLOW + 16;
        cfg.max_handshakes_per_ip = SLOW / sources.len();
        // Bound as `tube relay` binds it (backlog 1024): the burst of 500 connects would
        // overflow the default backlog of 128, and the kernel would drop some of them.
        let listener = tube_relay::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let relay = TestRelay::start_on(cfg, listener).await;
        let svc = echo_server().await;
        let (ready_tx, mut ready) = tokio::sync::mpsc::channel(SLOW);
        let closed = Arc::new(AtomicUsize::new(0));
        let mut slow = tokio::task::JoinSet::new();
        for i in 0..SLOW {
            let src = ip(sources[i % sources.len()]);
            slow.spawn(slowloris(
                src,
                relay.addr,
                relay.fingerprint,
                Slow::of(i),
                ready_tx.clone(),
                closed.clone(),
            ));
        }
        drop(ready_tx);
        for _ in 0..SLOW {
            ready.recv().await.expect("every slowloris gets going");
        }
        let stalled_after = started.elapsed();
        // All of them in the relay's handshake at once (or, if setting them up took longer
        // than the deadline, the first ones already closed: that fails just below).
        relay
            .state
            .wait_until(|s| pending(s, None) == SLOW || closed.load(Ordering::SeqCst) > 0)
            .await;
        assert_eq!(
            closed.load(Ordering::SeqCst),
            0,
            "none closed before the deadline (all stalling after {stalled_after:?})"
        );

        // A real agent, from 127.0.0.1, authenticates and gets a tunnel meanwhile.
        let t = Instant::now();
        let agent = TestAgent::start(relay.agent_config(&[svc.addr])).await;
        let agent_took = t.elapsed();
        let mut user = TcpStream::connect(agent.public[0]).await.unwrap();
        assert_eq!(roundtrip(&mut user, b"through").await, b"through");
        assert_eq!(
            closed.load(Ordering::SeqCst),
            0,
            "the agent got through while all {SLOW} were still pending"
        );
        assert!(
            agent_took < Duration::from_secs(1),
            "agent took {agent_took:?} to authenticate and get its tunnel"
        );

        let mut ends = Vec::new();
        while let Some(end) = slow.join_next().await {
            ends.push(end.expect("slowloris task"));
        }
        assert_eq!(ends.len(), SLOW);
        for e in &ends {
            assert!(
                e.open_for >= HANDSHAKE,
                "{:?} closed early, after {:?}",
                e.kind,
                e.open_for
            );
            assert!(
                e.open_for <= HANDSHAKE + MARGIN,
                "{:?} closed late, after {:?}",
                e.kind,
                e.open_for
            );
            // Past TLS the relay says why; before it, it just closes.
            let want = matches!(e.kind, Slow::NoAuth | Slow::PartialAuth)
                .then_some(ErrorCode::HandshakeTimeout as u16);
            assert_eq!(e.code, want, "{:?}", e.kind);
        }
        relay.state.wait_until(|s| pending(s, None) == 0).await;
        let min = ends.iter().map(|e| e.open_for).min().unwrap_or_default();
        let max = ends.iter().map(|e| e.open_for).max().unwrap_or_default();
        println!(
            "{SLOW} slowloris connections from {} sources all stalling {stalled_after:?} after \
             the start; agent authenticated with its tunnel up in {agent_took:?}; closed \
             {min:?}..{max:?} after connecting (deadline {HANDSHAKE:?})",
            sources.len()
        );
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_flood_from_one_address_leaves_other_addresses_unaffected() {
    init_tracing();
    const CAP: usize = 8;
    deadline(LIMIT, async {
        let mut cfg = relay_config();
        cfg.max_handshakes_per_ip = CAP;
        // Long enough that only the cap, never the deadline, ends a flood connection here.
        cfg.handshake_timeout = Duration::from_secs(60);
        let relay = TestRelay::start_with(cfg).await;
        let (addr, fp) = (relay.addr, relay.fingerprint);
        let flooder = ip("127.0.0.2");
        let mut held = Vec::new();
        for _ in 0..CAP {
            held.push(connect_from(flooder, addr).await);
        }
        relay
            .state
            .wait_until(|s| pending(s, Some(flooder)) == CAP)
            .await;

        // Beyond the cap, each connection from the flooding address is closed before TLS.
        let mut slowest_refusal = Duration::ZERO;
        for _ in 0..20 {
            let t = Instant::now();
            let tcp = connect_from(flooder, addr).await;
            let r = tokio::time::timeout(Duration::from_secs(5), tls_over(tcp, fp)).await;
            assert!(
                matches!(r, Ok(Err(_))),
                "a connection over the cap must be closed at once"
            );
            slowest_refusal = slowest_refusal.max(t.elapsed());
        }
        assert_eq!(pending(&relay.state, Some(flooder)), CAP);

        // Another address authenticates at once, and so does an agent from 127.0.0.1.
        let t = Instant::now();
        assert!(authenticates_from(ip("127.0.0.3"), addr, fp, &relay.token("b")).await);
        let other_took = t.elapsed();
        assert!(other_took < Duration::from_secs(1), "{other_took:?}");
        let svc = echo_server().await;
        let agent = TestAgent::start(relay.agent_config(&[svc.addr])).await;
        let mut user = TcpStream::connect(agent.public[0]).await.unwrap();
        assert_eq!(roundtrip(&mut user, b"unaffected").await, b"unaffected");

        // Once the flood stops, the flooding address has its slots back.
        drop(held);
        relay
            .state
            .wait_until(|s| pending(s, Some(flooder)) == 0)
            .await;
        assert!(authenticates_from(flooder, addr, fp, &relay.token("a")).await);
        println!(
            "per-address cap {CAP}: 20 connections over it refused in at most \
             {slowest_refusal:?} each; 127.0.0.3 authenticated in {other_took:?}"
        );
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

/// User + system CPU time of process `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name (which may hold spaces) start at field 3 (state);
    // utime and stime are fields 14 and 15, in clock ticks.
    let rest = &stat[stat.rfind(')').expect("comm") + 1..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().expect("ticks"))
        .collect();
    let hz: u64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100);
    Duration::from_millis((f[0] + f[1]) * 1000 / hz)
}

#[tokio::test]
async fn the_relay_survives_running_out_of_file_descriptors() {
    init_tracing();
    const FDS: usize = 256;
    const FLOOD: usize = 320;
    deadline(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().expect("utf-8 dir");
        // Caps and deadline far above the limit: file descriptors run out first.
        let script = format!("ulimit -n {FDS} && exec \"$0\" \"$@\"");
        let mut relay = Proc::spawn(
            "bash",
            &[
                "-c",
                &script,
                TUBE,
                "relay",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                d,
                "--max-handshakes",
                "10000",
                "--max-handshakes-per-ip",
                "10000",
                "--handshake-timeout",
                "60s",
            ],
            &[],
            Stdio::null(),
        );
        let control = relay.line().await;
        let control = control
            .strip_prefix("listening control ")
            .expect("control line");
        let addr: SocketAddr = control.parse().unwrap();
        let fp: Fingerprint = relay
            .line()
            .await
            .strip_prefix("fingerprint ")
            .expect("fingerprint line")
            .parse()
            .unwrap();
        let pid = relay.child.id().expect("relay pid");
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        assert!(
            limits
                .lines()
                .any(|l| l.starts_with("Max open files") && l.contains(&format!(" {FDS} "))),
            "{limits}"
        );

        // More silent connections than the relay has descriptors; the rest wait in the backlog.
        let mut flood = Vec::with_capacity(FLOOD);
        for _ in 0..FLOOD {
            flood.push(TcpStream::connect(addr).await.unwrap());
        }
        let line = relay
            .stderr_line("accept failed")
            .await
            .unwrap_or_else(|all| panic!("the relay exited:\n{all}"));
        assert!(line.contains("os error 24"), "{line}");

        // Out of descriptors, it backs off instead of spinning: measured over a window.
        const WINDOW: Duration = Duration::from_secs(2);
        let failures = |r: &Proc| r.stderr_now().matches("accept failed").count();
        let (cpu0, logged0) = (cpu_time(pid), failures(&relay));
        tokio::time::sleep(WINDOW).await;
        let (cpu, logged) = (cpu_time(pid) - cpu0, failures(&relay) - logged0);
        assert!(
            relay.child.try_wait().unwrap().is_none(),
            "the relay must stay up:\n{}",
            relay.stderr_now()
        );
        assert!(
            cpu < WINDOW / 2,
            "the relay used {cpu:?} of CPU in {WINDOW:?}"
        );
        assert!(
            logged <= 60,
            "{logged} accept failures logged in {WINDOW:?}: no backoff"
        );

        // The flood stops; an agent authenticates and its tunnel carries traffic.
        drop(flood);
        let t = Instant::now();
        let (jwt, _) = tube_relay::JwtSecret::load_or_create(dir.path()).unwrap();
        let svc = echo_server().await;
        let cfg = tube_agent::AgentConfig::new(
            addr.to_string(),
            jwt.mint("after-flood", Duration::from_secs(600)),
            fp,
            vec![tube_agent::TunnelSpec {
                local: svc.addr.to_string(),
                remote_port: None,
                allow: Vec::new(),
                name: "echo".into(),
            }],
        );
        let agent = TestAgent::start(cfg).await;
        let mut user = TcpStream::connect(agent.public[0]).await.unwrap();
        assert_eq!(roundtrip(&mut user, b"served again").await, b"served again");
        let recovered = t.elapsed();
        println!(
            "ulimit -n {FDS}, {FLOOD} connections: relay alive, {logged} accept failures \
             logged and {cpu:?} CPU in {WINDOW:?}; agent tunnel up {recovered:?} after the \
             flood stopped"
        );
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}
