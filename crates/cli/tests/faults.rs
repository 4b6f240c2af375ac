//! Faults, with the figures of issue 8 (item 5): an agent killed mid-transfer resets every
//! user within 2 s; a frozen agent (SIGSTOP) is declared dead by the relay, and a frozen relay
//! by the agent, within heartbeat interval x misses + 1 s; agents are back on their ports within
//! the backoff cap + 2 s of a killed relay's restart; a chain's middle node killed resets both
//! ends within 2 s and leaves no listener open. These run the real `tube` binary and send real
//! signals. SIGTERM drains: `tube relay` closes its ports at once and lets open users finish
//! within `--shutdown-grace`, then resets the rest and exits; `tube expose` refuses new users
//! at once and lets open ones finish within its `--shutdown-grace` (both with the binaries;
//! the agent's drain is also checked in-process, with its events).
//!
//! Every test synchronises on events (stdout contract lines, stderr log lines, agent events,
//! bytes, connection ends), runs under a deadline, and measures each interval from just before
//! the signal to the moment the event is seen. Stopped processes are continued before the test
//! ends; every process is killed when its handle drops.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tube_agent::{AgentError, AgentEvent};
use tube_chain::front::FrontClient;
use tube_proto::chain::FrontMessage;
use tube_testkit::proc::{Hub, Node, Proc, RelayLines};
use tube_testkit::*;

const TUBE: &str = env!("CARGO_BIN_EXE_tube");

/// Deadline of every test body (generous: the machine may be compiling meanwhile).
const LIMIT: Duration = Duration::from_secs(120);

/// The figure for resets after a kill.
const RESET_BOUND: Duration = Duration::from_secs(2);

/// Heartbeats of the liveness tests: every second, dead after two silent intervals.
const HEARTBEAT: Duration = Duration::from_secs(1);
const MISSES: u32 = 2;

/// Sends `sig` (`STOP`, `CONT`, `TERM`, ...) to the process.
async fn signal(p: &Proc, sig: &str) {
    let pid = p.child.id().expect("the process is running");
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .await
        .expect("run kill");
    assert!(ok.success(), "kill -{sig} {pid}");
}

/// A running `tube relay` and what it printed.
struct Relay {
    proc: Proc,
    control: String,
    admin: Option<String>,
    fingerprint: String,
}

impl Relay {
    /// `tube relay --listen listen --data-dir dir` plus `extra` (which may hold `--admin`).
    async fn start_on(listen: &str, dir: &Path, extra: &[&str]) -> Option<Self> {
        let d = dir.to_str().expect("utf-8 dir");
        let mut args = vec!["relay", "--listen", listen, "--data-dir", d];
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn(TUBE, &args, &[], Stdio::null());
        let RelayLines {
            control,
            admin,
            fingerprint,
        } = RelayLines::read(&mut proc).await?;
        Some(Self {
            proc,
            control,
            admin,
            fingerprint,
        })
    }

    async fn start(dir: &Path, extra: &[&str]) -> Self {
        match Self::start_on("127.0.0.1:0", dir, extra).await {
            Some(r) => r,
            None => panic!("the relay did not start"),
        }
    }

    /// A token for `subject` from `tube token` on the relay's data dir.
    async fn token(dir: &Path, subject: &str) -> String {
        let out = Command::new(TUBE)
            .args(["token", "--subject", subject, "--ttl", "1h", "--data-dir"])
            .arg(dir)
            .output()
            .await
            .expect("run tube token");
        assert!(out.status.success(), "tube token failed");
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_string()
    }

    /// `tube expose locals... --relay .. --token .. --fingerprint ..` plus `extra`.
    fn expose(&self, locals: &[SocketAddr], token: &str, extra: &[&str]) -> Proc {
        let locals: Vec<String> = locals.iter().map(|a| a.to_string()).collect();
        let mut args = vec!["expose"];
        args.extend(locals.iter().map(String::as_str));
        args.extend([
            "--relay",
            &self.control,
            "--token",
            token,
            "--fingerprint",
            &self.fingerprint,
        ]);
        args.extend_from_slice(extra);
        Proc::spawn(TUBE, &args, &[], Stdio::null())
    }
}

/// Restarts a relay on `port` (its previous process killed) with `dir`, retrying while the
/// port is not free yet. A port from port 0 can be taken by another test's port-0 bind in
/// between; then the test cannot go on, and says so.
async fn restart_relay(port: u16, dir: &Path) -> Relay {
    let listen = format!("127.0.0.1:{port}");
    for _ in 0..100 {
        if let Some(r) = Relay::start_on(&listen, dir, &[]).await {
            assert_eq!(r.control, listen, "the same port");
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{listen} never became free again")
}

/// The public address of a `tunnel <public> <local>` line.
fn public_of(line: &str) -> String {
    let parts: Vec<&str> = line.split(' ').collect();
    assert!(
        parts.len() == 3 && parts[0] == "tunnel",
        "expected `tunnel <public> <local>`, got {line:?}"
    );
    parts[1].to_string()
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Reset (or another error): the failure is visible.
    Reset(std::io::ErrorKind),
    /// A clean end of stream: looks like success.
    Eof,
}

/// Reads until the connection ends, discarding data; `moving` fires once 256 KiB arrived.
/// Returns how and when it ended, and the byte count.
async fn read_until_end<R: AsyncRead + Unpin>(
    mut rd: R,
    moving: oneshot::Sender<()>,
) -> (End, Instant, u64) {
    let mut moving = Some(moving);
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        match rd.read(&mut buf).await {
            Ok(0) => return (End::Eof, Instant::now(), total),
            Ok(n) => {
                total += n as u64;
                if total >= 256 << 10
                    && let Some(m) = moving.take()
                {
                    let _ = m.send(());
                }
            }
            Err(e) => return (End::Reset(e.kind()), Instant::now(), total),
        }
    }
}

/// Writes pattern data until a write fails (the streaming service).
async fn write_until_error(mut wr: TcpStream) {
    let chunk = pattern(64 << 10, 3);
    while wr.write_all(&chunk).await.is_ok() {}
}

/// A connection kept busy in both directions: a reader task, and a writer task that can be
/// paused.
struct Busy {
    reader: tokio::task::JoinHandle<(End, Instant, u64)>,
    /// Fires once data is flowing to the reader.
    flowing: oneshot::Receiver<()>,
    pause: CancellationToken,
    writer: tokio::task::JoinHandle<tokio::net::tcp::OwnedWriteHalf>,
}

fn busy(s: TcpStream) -> Busy {
    let (rd, mut wr) = s.into_split();
    let pause = CancellationToken::new();
    let p = pause.clone();
    let writer = tokio::spawn(async move {
        let chunk = pattern(64 << 10, 3);
        loop {
            tokio::select! {
                _ = p.cancelled() => break,
                r = wr.write_all(&chunk) => if r.is_err() { break },
            }
        }
        wr
    });
    let (tx, flowing) = oneshot::channel();
    Busy {
        reader: tokio::spawn(read_until_end(rd, tx)),
        flowing,
        pause,
        writer,
    }
}

impl Busy {
    /// Waits until data flows, then stops writing (keeping the write half open: no FIN) and
    /// returns the reader and the write half. The fault comes with data still in flight, but
    /// with no write racing the read: the socket reports a reset to the first call that looks,
    /// and after a write took it, a read would only see the end of stream.
    async fn quiet(
        self,
    ) -> (
        tokio::task::JoinHandle<(End, Instant, u64)>,
        tokio::net::tcp::OwnedWriteHalf,
    ) {
        self.flowing.await.expect("data flows before the fault");
        self.pause.cancel();
        (self.reader, self.writer.await.expect("writer task"))
    }
}

/// Waits for every reader, checks each saw a reset within `RESET_BOUND` of `t0`, and returns
/// the slowest.
async fn all_reset(
    what: &str,
    readers: Vec<tokio::task::JoinHandle<(End, Instant, u64)>>,
    t0: Instant,
) -> Duration {
    let mut slowest = Duration::ZERO;
    for (i, r) in readers.into_iter().enumerate() {
        let (end, at, bytes) = r.await.expect("reader task");
        assert!(at >= t0, "{what} {i}: ended with {end:?} before the fault");
        let took = at - t0;
        assert!(
            matches!(end, End::Reset(_)),
            "{what} {i}: ended with {end:?} after {bytes} bytes, {took:?} after the fault, not a reset"
        );
        assert!(
            took <= RESET_BOUND,
            "{what} {i}: reset after {took:?}, bound {RESET_BOUND:?}"
        );
        slowest = slowest.max(took);
    }
    slowest
}

#[tokio::test]
async fn a_killed_agent_resets_every_user_mid_transfer_within_2_s() {
    deadline(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let relay = Relay::start(dir.path(), &[]).await;
        let t = Relay::token(dir.path(), "alice").await;
        // A source streaming to every user, and an echo service (both directions busy).
        let source = serve(write_until_error).await;
        let echo = echo_server().await;
        let mut agent = relay.expose(&[source.addr, echo.addr], &t, &[]);
        let down = public_of(&agent.line().await);
        let both = public_of(&agent.line().await);
        let mut readers = Vec::new();
        let mut flowing = Vec::new();
        let mut uploads = Vec::new();
        let mut write_halves = Vec::new();
        for i in 0..8 {
            let s = TcpStream::connect(if i % 2 == 0 { &down } else { &both })
                .await
                .expect("user connects");
            if i % 2 == 0 {
                let (tx, rx) = oneshot::channel();
                readers.push(tokio::spawn(read_until_end(s, tx)));
                flowing.push(rx);
            } else {
                uploads.push(busy(s));
            }
        }
        for f in flowing {
            f.await.expect("data flows to every user before the kill");
        }
        for b in uploads {
            let (r, w) = b.quiet().await;
            readers.push(r);
            write_halves.push(w);
        }
        let t0 = Instant::now();
        agent.kill().await;
        let slowest = all_reset("user", readers, t0).await;
        eprintln!("8 users mid-transfer reset {slowest:?} after SIGKILL of the agent at most");
        // The tunnels' ports serve no one any more (the relay keeps them as leases): a
        // connection is refused, or reset if it slipped into the backlog of a closing listener.
        for public in [&down, &both] {
            if let Ok(mut s) = TcpStream::connect(public.as_str()).await {
                assert!(
                    ended(&mut s, RESET_BOUND).await.is_some(),
                    "{public} still serves users"
                );
            }
        }
    })
    .await;
}

/// The relay (with an admin API) and an agent exposing an echo service, both heartbeating every
/// second and declaring the other dead after `MISSES` silent intervals; the agent reconnects
/// every 100-500 ms. Returns them and the agent's tunnel line once heartbeats have kept the
/// agent connected longer than the dead-peer deadline (so they do flow).
async fn heartbeating(dir: &Path, echo: SocketAddr) -> (Relay, Proc, String) {
    let misses = MISSES.to_string();
    let interval = format!("{}ms", HEARTBEAT.as_millis());
    let relay = Relay::start(
        dir,
        &[
            "--admin",
            "127.0.0.1:0",
            "--heartbeat-interval",
            &interval,
            "--heartbeat-misses",
            &misses,
            "--heartbeat-min-interval",
            "100ms",
        ],
    )
    .await;
    let t = Relay::token(dir, "bob").await;
    let mut agent = relay.expose(
        &[echo],
        &t,
        &[
            "--heartbeat-interval",
            &interval,
            "--heartbeat-misses",
            &misses,
            "--reconnect-initial",
            "100ms",
            "--reconnect-max",
            "500ms",
            "--reconnect-attempts",
            "0",
        ],
    );
    let line = agent.line().await;
    let admin = relay.admin.clone().expect("admin");
    let alive = (HEARTBEAT * MISSES).as_secs() + 1;
    while connected_seconds(&admin).await < alive {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (relay, agent, line)
}

/// The longest `tube_relay_agent_connection_seconds` on the relay's `/metrics`.
async fn connected_seconds(admin: &str) -> u64 {
    let mut s = TcpStream::connect(admin).await.expect("admin connects");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("response");
    text.lines()
        .filter(|l| l.starts_with("tube_relay_agent_connection_seconds{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// How long after `t0` the line with `needle` appeared on `p`'s stderr.
async fn logged_after(p: &mut Proc, needle: &str, t0: Instant) -> Duration {
    if let Err(all) = p.stderr_line(needle).await {
        panic!("exited without logging {needle:?}:\n{all}");
    }
    Instant::now() - t0
}

/// Checks a liveness detection time against the figure, interval x misses + 1 s, and against
/// the least it can be: the peer was last heard at most one interval before it froze.
fn assert_detected(what: &str, took: Duration) {
    let bound = HEARTBEAT * MISSES + Duration::from_secs(1);
    let least = HEARTBEAT * (MISSES - 1);
    assert!(
        took <= bound,
        "{what} declared dead after {took:?}, bound {bound:?}"
    );
    assert!(
        took >= least.saturating_sub(Duration::from_millis(200)),
        "{what} declared dead after {took:?}: too early to be the heartbeat deadline"
    );
}

#[tokio::test]
async fn a_frozen_agent_is_declared_dead_within_interval_times_misses_plus_1_s() {
    deadline(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let echo = echo_server().await;
        let (mut relay, agent, first) = heartbeating(dir.path(), echo.addr).await;
        let public = public_of(&first);
        let mut user = TcpStream::connect(public.as_str()).await.unwrap();
        assert_eq!(roundtrip(&mut user, b"before").await, b"before");

        let t0 = Instant::now();
        signal(&agent, "STOP").await;
        let took = logged_after(&mut relay.proc, "no heartbeat from agent", t0).await;
        eprintln!("frozen agent declared dead after {took:?}");
        assert_detected("the frozen agent", took);
        assert_eq!(
            ended(&mut user, RESET_BOUND).await,
            Some(true),
            "its user is reset with it"
        );

        // Thawed, it finds itself dropped, reconnects and gets its port back.
        signal(&agent, "CONT").await;
        let mut agent = agent;
        assert_eq!(agent.line().await, first);
        let mut user = TcpStream::connect(public.as_str()).await.unwrap();
        assert_eq!(roundtrip(&mut user, b"after").await, b"after");
    })
    .await;
}

#[tokio::test]
async fn a_frozen_relay_is_declared_dead_by_the_agent_within_interval_times_misses_plus_1_s() {
    deadline(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let echo = echo_server().await;
        let (relay, mut agent, first) = heartbeating(dir.path(), echo.addr).await;

        let t0 = Instant::now();
        signal(&relay.proc, "STOP").await;
        let took = logged_after(&mut agent, "relay stopped answering heartbeats", t0).await;
        eprintln!("frozen relay declared dead after {took:?}");
        assert_detected("the frozen relay", took);

        // Thawed, the relay takes the agent back on the same port.
        signal(&relay.proc, "CONT").await;
        assert_eq!(agent.line().await, first);
        let mut user = TcpStream::connect(public_of(&first).as_str())
            .await
            .unwrap();
        assert_eq!(roundtrip(&mut user, b"after").await, b"after");
    })
    .await;
}

#[tokio::test]
async fn agents_are_back_on_their_ports_within_the_backoff_cap_plus_2_s_of_a_relay_restart() {
    deadline(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = Relay::start(dir.path(), &[]).await;
        let echo = echo_server().await;
        // Backoff 100 ms doubling to the cap of 1 s: the fifth retry waits the cap.
        let cap = Duration::from_secs(1);
        let flags = [
            "--reconnect-initial",
            "100ms",
            "--reconnect-max",
            "1s",
            "--reconnect-attempts",
            "0",
        ];
        let mut agents = Vec::new();
        for subject in ["carol", "dave"] {
            let t = Relay::token(dir.path(), subject).await;
            let mut a = relay.expose(&[echo.addr], &t, &flags);
            let line = a.line().await;
            agents.push((a, line));
        }

        relay.proc.kill().await;
        for (a, _) in &mut agents {
            if let Err(all) = a.stderr_line(" attempt=5 ").await {
                panic!("the agent gave up:\n{all}");
            }
        }
        let port = relay
            .control
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("port");
        let _again = restart_relay(port, dir.path()).await;
        // The relay listened before it printed its address.
        let t0 = Instant::now();
        let mut slowest = Duration::ZERO;
        for (a, first) in &mut agents {
            let back = a.line().await;
            let took = Instant::now() - t0;
            assert_eq!(&back, first, "the agent gets the same public address back");
            slowest = slowest.max(took);
        }
        eprintln!("agents back {slowest:?} after the relay restarted (cap {cap:?})");
        assert!(
            slowest <= cap + Duration::from_secs(2),
            "back after {slowest:?}, bound {:?}",
            cap + Duration::from_secs(2)
        );
        for (_, line) in &agents {
            let mut u = TcpStream::connect(public_of(line).as_str()).await.unwrap();
            assert_eq!(roundtrip(&mut u, b"back").await, b"back");
        }
    })
    .await;
}

/// The TCP ports `pid` is listening on (its socket inodes matched against /proc/net/tcp*).
fn listening_ports(pid: u32) -> BTreeSet<u16> {
    let inodes: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let mut ports = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
                let port = cols[1].rsplit(':').next().unwrap_or_default();
                if let Ok(p) = u16::from_str_radix(port, 16) {
                    ports.insert(p);
                }
            }
        }
    }
    ports
}

/// Opens a chain from `from` (node 0's front: this test) to the node `to` whose front
/// (`endpoint`, subscribed) approves it; returns both ends, the hop count and the fronts
/// (which own the chain: keep them).
async fn chain_ends(
    from: SocketAddr,
    endpoint: &mut FrontClient,
    to: &str,
) -> (TcpStream, TcpStream, Option<u8>, FrontClient) {
    let mut f = FrontClient::connect(from).await.expect("front");
    f.send(&FrontMessage::RequestTube {
        endpoint_name: to.into(),
        local_id: "fault".into(),
    })
    .await
    .expect("request");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut near = None;
    let mut hops = None;
    // The endpoint's front approves and learns its port; node 0's front listens and learns the
    // chain is complete. Both conversations run at once.
    let endpoint_side = async {
        loop {
            match endpoint.recv().await.expect("endpoint front") {
                FrontMessage::ConnectionRequest { tunnel_id, .. } => {
                    let yes = FrontMessage::Approve {
                        tunnel_id,
                        is_allowed: true,
                        reason: String::new(),
                        forward: None,
                    };
                    endpoint.send(&yes).await.expect("approve");
                }
                FrontMessage::Established { port, .. } => {
                    return TcpStream::connect(("127.0.0.1", port))
                        .await
                        .expect("far end connects");
                }
                _ => {}
            }
        }
    };
    let requester_side = async {
        loop {
            match f.recv().await.expect("requester front") {
                FrontMessage::TubeResult {
                    is_allowed: false,
                    reason,
                    ..
                } => panic!("chain refused: {reason}"),
                FrontMessage::TubeResult { hops: h, .. } => hops = h,
                FrontMessage::Listen { tunnel_id } => {
                    let port = listener.local_addr().expect("addr").port();
                    f.send(&FrontMessage::Listening { tunnel_id, port })
                        .await
                        .expect("listening");
                    near = Some(listener.accept().await.expect("node 0 connects").0);
                }
                FrontMessage::Established { .. } => return,
                FrontMessage::Closed { reason, .. } => panic!("chain closed: {reason}"),
                _ => {}
            }
        }
    };
    let (far, ()) = tokio::join!(endpoint_side, requester_side);
    (near.expect("near end"), far, hops, f)
}

/// A chain a -> m -> e over three `tube node`s; `m` is killed with the chain busy in both
/// directions (`busy_chain`) or idle after one exchange. Both ends must see a reset within 2 s,
/// and a and e must end with the listeners they had before the chain.
async fn kill_the_middle_node(busy_chain: bool) {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let hub = Hub::start(TUBE, dirs[0].path(), &["--intermediates", "1"], &[]).await;
    let mut nodes = Vec::new();
    for (i, (name, bind)) in [("a", "127.0.0.2"), ("m", "127.0.0.3"), ("e", "127.0.0.4")]
        .into_iter()
        .enumerate()
    {
        let mut node = hub
            .node(TUBE, name, bind, Some(dirs[i + 1].path()), &[])
            .await;
        node.logged_in().await;
        nodes.push(node);
    }
    let [a, mut m, e] = <[Node; 3]>::try_from(nodes).unwrap_or_else(|_| unreachable!());
    let api = |n: &Node| -> SocketAddr { n.api.parse().expect("api address") };
    let pids = [
        a.proc.child.id().expect("pid"),
        e.proc.child.id().expect("pid"),
    ];
    let before: Vec<_> = pids.iter().map(|p| listening_ports(*p)).collect();
    assert!(before.iter().all(|l| !l.is_empty()), "each API listens");

    let mut endpoint = FrontClient::connect(api(&e)).await.expect("front");
    endpoint
        .send(&FrontMessage::Subscribe {})
        .await
        .expect("subscribe");
    // The answer says the subscription is active: requests for e reach this front from now on.
    while !matches!(endpoint.recv().await, Ok(FrontMessage::Tubes { .. })) {}
    let (mut near, mut far, hops, _owner) = chain_ends(api(&a), &mut endpoint, "e").await;
    assert_eq!(hops, Some(2), "one intermediate: a -> m -> e");
    near.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    far.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    let mut write_halves = Vec::new();
    let readers = if busy_chain {
        let (near, far) = (busy(near), busy(far));
        let mut readers = Vec::new();
        for b in [near, far] {
            let (r, w) = b.quiet().await;
            readers.push(r);
            write_halves.push(w);
        }
        readers
    } else {
        [near, far]
            .into_iter()
            .map(|s| {
                let (tx, _) = oneshot::channel();
                tokio::spawn(read_until_end(s, tx))
            })
            .collect()
    };
    let t0 = Instant::now();
    m.proc.kill().await;
    let slowest = all_reset("chain end", readers, t0).await;
    eprintln!("both ends reset {slowest:?} after SIGKILL of the middle node (busy: {busy_chain})");
    // Nothing of the chain stays listening on the surviving nodes.
    for (pid, was) in pids.iter().zip(&before) {
        let by = Instant::now() + RESET_BOUND;
        while listening_ports(*pid) != *was && Instant::now() < by {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(&listening_ports(*pid), was, "listeners of node {pid}");
    }
}

#[tokio::test]
async fn killing_the_middle_node_of_a_busy_chain_resets_both_ends_within_2_s() {
    deadline(LIMIT, kill_the_middle_node(true)).await;
}

#[tokio::test]
async fn killing_the_middle_node_of_an_idle_chain_resets_both_ends_within_2_s() {
    deadline(LIMIT, kill_the_middle_node(false)).await;
}

/// An agent run in-process with `grace`, exposing a service whose connections are handed to
/// the test; returns its shutdown token, events, task, public address and the service side.
async fn draining_agent(
    relay: &TestRelay,
    grace: Duration,
) -> (
    CancellationToken,
    mpsc::UnboundedReceiver<AgentEvent>,
    tokio::task::JoinHandle<Result<(), AgentError>>,
    SocketAddr,
    mpsc::UnboundedReceiver<TcpStream>,
    TestServer,
) {
    let (to_test, served) = mpsc::unbounded_channel();
    let svc = serve(move |s| {
        let _ = to_test.send(s);
        async {}
    })
    .await;
    let mut cfg = relay.agent_config(&[svc.addr]);
    cfg.shutdown_grace = grace;
    let stop = CancellationToken::new();
    let (tx, mut events) = mpsc::unbounded_channel();
    let task = tokio::spawn(tube_agent::run(cfg, tx, stop.clone()));
    let public = loop {
        match events.recv().await.expect("agent events") {
            AgentEvent::TunnelUp { public, .. } => break public.parse().expect("address"),
            _ => continue,
        }
    };
    (stop, events, task, public, served, svc)
}

/// Waits for the agent's `Stopping` event; returns the open streams it reported.
async fn stopping(events: &mut mpsc::UnboundedReceiver<AgentEvent>) -> usize {
    loop {
        if let AgentEvent::Stopping { open_streams } = events.recv().await.expect("agent events") {
            return open_streams;
        }
    }
}

#[tokio::test]
async fn a_stopping_agent_refuses_new_users_at_once_and_lets_open_streams_finish() {
    deadline(LIMIT, async {
        let relay = TestRelay::start().await;
        let grace = Duration::from_secs(20);
        let (stop, mut events, task, public, mut served, _svc) =
            draining_agent(&relay, grace).await;
        let mut user = TcpStream::connect(public).await.unwrap();
        user.write_all(b"request").await.unwrap();
        let mut svc = served.recv().await.expect("the service gets the user");
        let mut buf = [0u8; 7];
        svc.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"request");

        let t0 = Instant::now();
        stop.cancel();
        assert_eq!(stopping(&mut events).await, 1, "one stream open");
        // A user arriving now is reset at once and never reaches the service.
        let mut late = TcpStream::connect(public).await.unwrap();
        assert_eq!(
            ended(&mut late, RESET_BOUND).await,
            Some(true),
            "a new user is refused with a reset"
        );
        assert!(
            served.try_recv().is_err(),
            "the service got a new connection"
        );
        // The open stream goes on both ways and ends cleanly, then the agent leaves.
        svc.write_all(b"response").await.unwrap();
        let mut buf = [0u8; 8];
        user.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"response");
        user.write_all(b"more").await.unwrap();
        user.shutdown().await.unwrap();
        let mut got = Vec::new();
        svc.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"more");
        svc.write_all(b"tail").await.unwrap();
        svc.shutdown().await.unwrap();
        let mut got = Vec::new();
        user.read_to_end(&mut got)
            .await
            .expect("a clean end, not a reset");
        assert_eq!(got, b"tail");
        task.await.expect("agent task").expect("a clean stop");
        let took = Instant::now() - t0;
        assert!(took < grace, "left after {took:?}: it waited for the grace");
        // It said goodbye: its tunnel is gone, not kept for a reconnect.
        relay.state.wait_until(|s| s.tunnels().is_empty()).await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_stopping_agent_resets_streams_still_open_when_its_grace_runs_out() {
    deadline(LIMIT, async {
        let relay = TestRelay::start().await;
        let grace = Duration::from_secs(1);
        let (stop, mut events, task, public, mut served, _svc) =
            draining_agent(&relay, grace).await;
        let mut user = TcpStream::connect(public).await.unwrap();
        assert_eq!(roundtrip_via(&mut user, &mut served).await, b"ping");

        let t0 = Instant::now();
        stop.cancel();
        assert_eq!(stopping(&mut events).await, 1);
        task.await.expect("agent task").expect("a clean stop");
        let took = Instant::now() - t0;
        assert!(
            took >= grace && took <= grace + Duration::from_secs(1),
            "left after {took:?}, grace {grace:?}"
        );
        assert_eq!(
            ended(&mut user, RESET_BOUND).await,
            Some(true),
            "the unfinished stream is reset"
        );
        relay.stop().await;
    })
    .await;
}

/// Sends `ping` from the user to the service the agent dials and returns what arrived.
async fn roundtrip_via(
    user: &mut TcpStream,
    served: &mut mpsc::UnboundedReceiver<TcpStream>,
) -> Vec<u8> {
    user.write_all(b"ping").await.unwrap();
    let mut svc = served.recv().await.expect("the service gets the user");
    let mut buf = vec![0u8; 4];
    svc.read_exact(&mut buf).await.unwrap();
    // Keep the service's side open: the stream must stay in flight.
    tokio::spawn(async move {
        let mut sink = [0u8; 64];
        while matches!(svc.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    buf
}

/// A connection to `public` is turned away: refused, or reset if it slipped into the backlog
/// of a listener closing that instant.
async fn turned_away(public: &str) {
    if let Ok(mut s) = TcpStream::connect(public).await {
        assert_eq!(
            ended(&mut s, RESET_BOUND).await,
            Some(true),
            "{public} still takes new users"
        );
    }
}

/// A relay and an agent (binaries) with an echo service, and one user with a round trip
/// done; `relay_extra` / `agent_extra` go on their command lines.
async fn one_user(
    dir: &Path,
    echo: SocketAddr,
    relay_extra: &[&str],
    agent_extra: &[&str],
) -> (Relay, Proc, String, TcpStream) {
    let relay = Relay::start(dir, relay_extra).await;
    let t = Relay::token(dir, "alice").await;
    let mut agent = relay.expose(&[echo], &t, agent_extra);
    let public = public_of(&agent.line().await);
    let mut user = TcpStream::connect(public.as_str()).await.unwrap();
    assert_eq!(roundtrip(&mut user, b"before").await, b"before");
    (relay, agent, public, user)
}

/// SIGTERM to `proc` (relay or agent, started with a 30 s `--shutdown-grace`) while `user` is
/// connected through `public`: it logs `drain_log`, new users are turned away, `user` goes on
/// both ways and ends cleanly, then `proc` exits 0 well before the grace. Returns the time
/// from the signal to the exit.
async fn drains_one_user(
    proc: &mut Proc,
    drain_log: &str,
    public: &str,
    mut user: TcpStream,
) -> Duration {
    let grace = Duration::from_secs(30);
    let t0 = Instant::now();
    signal(proc, "TERM").await;
    proc.stderr_line(drain_log)
        .await
        .expect("the process logs its drain");
    turned_away(public).await;
    assert_eq!(roundtrip(&mut user, b"during").await, b"during");
    user.shutdown().await.unwrap();
    let mut rest = Vec::new();
    user.read_to_end(&mut rest)
        .await
        .expect("a clean end, not a reset");
    assert!(rest.is_empty());
    let (status, _) = proc.wait_exit().await;
    let took = Instant::now() - t0;
    assert!(status.success(), "exit status {status}");
    assert!(
        took < grace,
        "exited {took:?} after SIGTERM: it waited for the grace"
    );
    took
}

#[tokio::test]
async fn sigterm_to_the_relay_closes_its_ports_at_once_and_lets_open_users_finish() {
    deadline(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let echo = echo_server().await;
        let (mut relay, _agent, public, user) =
            one_user(dir.path(), echo.addr, &["--shutdown-grace", "30s"], &[]).await;
        let took = drains_one_user(&mut relay.proc, "public ports closed", &public, user).await;
        eprintln!("relay drained one user and exited {took:?} after SIGTERM");
    })
    .await;
}

#[tokio::test]
async fn sigterm_to_the_relay_resets_users_still_open_when_its_grace_runs_out() {
    deadline(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let echo = echo_server().await;
        let grace = Duration::from_secs(1);
        let (mut relay, _agent, _public, mut user) =
            one_user(dir.path(), echo.addr, &["--shutdown-grace", "1s"], &[]).await;
        let t0 = Instant::now();
        signal(&relay.proc, "TERM").await;
        assert_eq!(
            ended(&mut user, grace + RESET_BOUND).await,
            Some(true),
            "the open user is reset"
        );
        let reset = Instant::now() - t0;
        assert!(reset >= grace, "reset after {reset:?}, before the grace");
        let (status, _) = relay.proc.wait_exit().await;
        let took = Instant::now() - t0;
        assert!(status.success(), "the relay exits 0: {status}");
        let bound = grace + tube_relay::SESSION_CLOSE_TIMEOUT;
        assert!(
            took <= bound,
            "exited {took:?} after SIGTERM, bound {bound:?}"
        );
        eprintln!(
            "relay reset an open user {reset:?} and exited {took:?} after SIGTERM (grace 1 s)"
        );
    })
    .await;
}

#[tokio::test]
async fn sigterm_to_the_agent_refuses_new_users_and_lets_open_ones_finish() {
    deadline(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let echo = echo_server().await;
        let (_relay, mut agent, public, user) =
            one_user(dir.path(), echo.addr, &[], &["--shutdown-grace", "30s"]).await;
        let took = drains_one_user(&mut agent, "refusing new streams", &public, user).await;
        eprintln!("agent drained one user and exited {took:?} after SIGTERM");
    })
    .await;
}
