//! Security figures of issue 8 (item 6) not proven elsewhere: the tunnel limit counts per
//! identity across connections and source addresses, and per source address across
//! identities; hub logins with an unknown name and
//! with a wrong password take the same time (real clock, real binary); and no secret reaches
//! a log or an error message when every service runs with `RUST_LOG=trace`, through both
//! successful and refused authentications.
//!
//! The secrets check knows the secrets the test can read (JWT key, private keys, tokens, node
//! passwords, reconnect tokens, mailbox keys) and looks for them verbatim; it also flags every
//! run of 32 or more hex digits and every JWT-shaped string in the logs that is not a public
//! value the test has seen (fingerprints, client ids), so secrets the test never sees (hop
//! secrets, HTTP tokens) are caught by their shape.
//!
//! Related figures proven elsewhere: the sixth auth per IP and per subject, the eleventh tunnel
//! on one connection, reconnect tokens single use and the paused-clock uniform auth delay
//! (`relay_protocol.rs`); node passwords single use once their successor is used
//! (`tube-chain` accounts tests, `chains.rs`); JWT algorithm pinning and leeway edges
//! (`tube-relay` `auth` unit tests); a node API only on loopback (`chain_cli.rs`).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::process::Command;
use tokio::time::Instant;
use tube_chain::front::FrontClient;
use tube_net::codec::{HandshakeConn, handshake_conn, recv_control, send_control};
use tube_net::tokio_rustls::{TlsConnector, client::TlsStream};
use tube_net::{Fingerprint, tls};
use tube_proto::ErrorCode;
use tube_proto::chain::{
    CHAIN_PROTOCOL_VERSION, ChainErrorCode, ChainSecret, FrontMessage, HubMessage,
};
use tube_proto::control::{ClientInfo, ControlMessage, TunnelInfo};
use tube_proto::frame::Frame;
use tube_proto::ratelimit::RateLimit;
use tube_relay::JwtSecret;
use tube_testkit::proc::{Hub, LINE_LIMIT, Proc, field};
use tube_testkit::*;

const TUBE: &str = env!("CARGO_BIN_EXE_tube");

/// Deadline of every test body (generous: the machine may be compiling meanwhile).
const LIMIT: Duration = Duration::from_secs(120);

type Conn = HandshakeConn<TlsStream<TcpStream>>;

/// TCP from `src` to `addr`, then TLS pinned to `fp`.
async fn tls_from(src: IpAddr, addr: SocketAddr, fp: Fingerprint) -> Conn {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::new(src, 0)).expect("bind source");
    let tcp = sock.connect(addr).await.expect("connect");
    let tls = TlsConnector::from(tls::pinned_client_config(fp).expect("tls config"))
        .connect(tls::server_name(), tcp)
        .await
        .expect("tls");
    handshake_conn(tls)
}

/// A relay connection from `src`, past the greeting and authenticated with `token`.
async fn agent_from(src: IpAddr, relay: SocketAddr, fp: Fingerprint, token: &str) -> Conn {
    let mut c = tls_from(src, relay, fp).await;
    let hello = recv_control(&mut c).await.expect("greeting");
    assert!(matches!(hello, ControlMessage::Hello { .. }), "{hello:?}");
    let auth = ControlMessage::Auth {
        token: token.into(),
        version: "1.0".into(),
        client_info: ClientInfo::default(),
        window: None,
    };
    send_control(&mut c, &auth).await.expect("send auth");
    let r = recv_control(&mut c).await.expect("auth answer");
    assert!(matches!(r, ControlMessage::AuthResponse { .. }), "{r:?}");
    c
}

/// Registers a tunnel (taking back `reclaim = (id, reconnect token)` if given) and confirms
/// it; returns (tunnel id, reconnect token), or the refusal.
async fn tunnel(
    c: &mut Conn,
    name: &str,
    reclaim: Option<(&str, &str)>,
) -> Result<(String, String), ControlMessage> {
    let info = TunnelInfo {
        name: name.into(),
        protocol: "tcp".into(),
        tunnel_id: reclaim.map(|(id, _)| id.to_string()),
        reconnect_token: reclaim.map(|(_, t)| t.to_string()),
        ..Default::default()
    };
    send_control(c, &ControlMessage::Register { tunnel_info: info })
        .await
        .expect("register");
    match recv_control(c).await.expect("register answer") {
        ControlMessage::RegisterResponse {
            tunnel_id,
            reconnect_token,
            ..
        } => {
            let confirm = ControlMessage::RegisterConfirm {
                tunnel_id: tunnel_id.clone(),
            };
            send_control(c, &confirm).await.expect("confirm");
            Ok((tunnel_id, reconnect_token.expect("a reconnect token")))
        }
        other => Err(other),
    }
}

/// The answer to an eleventh tunnel within the hour: 3001 `tunnel_creation`, retry in 360 s.
fn refused_as_the_eleventh(answer: Result<(String, String), ControlMessage>) {
    match answer {
        Err(ControlMessage::Error { code, details, .. }) => {
            assert_eq!(code, ErrorCode::RateLimit as u16);
            assert_eq!(details.reason.as_deref(), Some("tunnel_creation"));
            assert_eq!(details.retry_after, Some(360));
        }
        other => panic!("the eleventh tunnel was not refused: {other:?}"),
    }
}

#[tokio::test]
async fn the_eleventh_tunnel_in_an_hour_is_refused_per_identity_across_connections_and_addresses() {
    deadline(LIMIT, async {
        let mut cfg = relay_config();
        cfg.auth_limit_per_ip = RateLimit::per_minute(5);
        cfg.auth_limit_per_subject = RateLimit::per_minute(5);
        cfg.tunnel_limit_per_subject = RateLimit::per_hour(10);
        let relay = TestRelay::start_with(cfg).await;
        let alice = relay.token("alice");
        let ip = |last: u8| IpAddr::from([127, 0, 0, last]);
        // Ten tunnels for alice from three connections on three addresses.
        let mut conns = Vec::new();
        for (last, n) in [(2u8, 4), (3, 4), (4, 2)] {
            let mut c = agent_from(ip(last), relay.addr, relay.fingerprint, &alice).await;
            for i in 0..n {
                tunnel(&mut c, &format!("t{last}-{i}"), None)
                    .await
                    .expect("within the limit");
            }
            conns.push(c);
        }
        // The eleventh, from a fourth connection on a fourth address: refused.
        let mut c = agent_from(ip(5), relay.addr, relay.fingerprint, &alice).await;
        refused_as_the_eleventh(tunnel(&mut c, "t11", None).await);
        // Another identity on that same address is not affected.
        let mut b = agent_from(ip(5), relay.addr, relay.fingerprint, &relay.token("bob")).await;
        tunnel(&mut b, "bob", None)
            .await
            .expect("bob's first tunnel");
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_eleventh_tunnel_in_an_hour_is_refused_per_source_address_across_identities() {
    deadline(LIMIT, async {
        let mut cfg = relay_config();
        cfg.tunnel_limit_per_ip = RateLimit::per_hour(10);
        let relay = TestRelay::start_with(cfg).await;
        let ip = |last: u8| IpAddr::from([127, 0, 0, last]);
        // Ten tunnels from 127.0.0.2, five each for two identities.
        let mut conns = Vec::new();
        for who in ["alice", "bob"] {
            let mut c = agent_from(ip(2), relay.addr, relay.fingerprint, &relay.token(who)).await;
            for i in 0..5 {
                tunnel(&mut c, &format!("{who}-{i}"), None)
                    .await
                    .expect("within the limit");
            }
            conns.push(c);
        }
        // The eleventh from that address, by a third identity with no tunnel yet: refused.
        let carol = relay.token("carol");
        let mut c = agent_from(ip(2), relay.addr, relay.fingerprint, &carol).await;
        refused_as_the_eleventh(tunnel(&mut c, "carol", None).await);
        // The refusal cost carol nothing: from another address her first tunnel passes.
        let mut c = agent_from(ip(3), relay.addr, relay.fingerprint, &carol).await;
        tunnel(&mut c, "carol", None)
            .await
            .expect("carol's first tunnel from 127.0.0.3");
        let metrics = relay.state.render_metrics();
        assert!(
            metrics.contains("tube_relay_rate_limited_total{limit=\"tunnel_creation_ip\"} 1"),
            "{metrics}"
        );
        relay.stop().await;
    })
    .await;
}

/// Starts a `tube hub` (one intermediate per chain) in `dir` with `env`.
async fn start_hub(dir: &Path, env: &[(&str, &str)]) -> Hub {
    Hub::start(TUBE, dir, &["--intermediates", "1"], env).await
}

/// Sends `first` on a fresh connection to `hub` and returns the answer and how long it took
/// (from the message written to the answer read; TLS is set up before the clock starts).
async fn ask(hub: &Hub, first: HubMessage) -> (HubMessage, Duration) {
    let addr = hub.control.parse().expect("hub address");
    let fp = hub.fingerprint.parse().expect("hub fingerprint");
    let mut c = tls_from([127, 0, 0, 1].into(), addr, fp).await;
    let t0 = Instant::now();
    c.send(Frame::Control(first.to_bytes()))
        .await
        .expect("send");
    let answer = match c.next().await {
        Some(Ok(Frame::Control(b))) => HubMessage::from_bytes(&b).expect("a hub message"),
        other => panic!("no answer from the hub: {other:?}"),
    };
    (answer, Instant::now() - t0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// 64 random lowercase hex digits (a well-formed node password nobody holds).
fn random_password() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("randomness");
    hex::encode(b)
}

#[tokio::test]
async fn hub_logins_with_an_unknown_name_or_a_wrong_password_take_the_same_time() {
    deadline(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let hub = start_hub(dir.path(), &[]).await;
        let (answer, _) = ask(
            &hub,
            HubMessage::Register {
                version: CHAIN_PROTOCOL_VERSION.into(),
                name: "alice".into(),
                relay: false,
                invite: None,
            },
        )
        .await;
        assert!(
            matches!(
                answer,
                HubMessage::RegisterResult {
                    is_success: true,
                    ..
                }
            ),
            "{answer:?}"
        );
        let login = |name: &str| HubMessage::Auth {
            version: CHAIN_PROTOCOL_VERSION.into(),
            name: name.into(),
            password: ChainSecret::new(random_password()),
            relay: false,
        };
        // Interleaved, so load on the machine hits both kinds alike.
        let (mut unknown, mut wrong) = (Vec::new(), Vec::new());
        for i in 0..30 {
            for (name, times) in [
                (format!("mallory{i}"), &mut unknown),
                ("alice".into(), &mut wrong),
            ] {
                let (answer, took) = ask(&hub, login(&name)).await;
                match answer {
                    HubMessage::AuthResult {
                        is_success: false,
                        message,
                        code,
                        ..
                    } => {
                        assert_eq!(code, Some(ChainErrorCode::AuthFailed as u16), "{name}");
                        assert_eq!(message, "authentication failed", "the same answer");
                    }
                    other => panic!("{name}: {other:?}"),
                }
                times.push(took);
            }
        }
        let (u, w) = (median(unknown), median(wrong));
        eprintln!("hub login refusals, median of 30: unknown name {u:?}, wrong password {w:?}");
        // Both are one SQLite read and a refusal; a check that skipped work for unknown names
        // (or did expensive work only for known ones) would show as a gap well over this.
        let gap = u.abs_diff(w);
        let allowed = Duration::from_millis(2).max(u.max(w) / 4);
        assert!(gap <= allowed, "unknown {u:?} vs wrong {w:?}: gap {gap:?}");
    })
    .await;
}

/// Every log (and error line) of one run, and what may appear in it.
#[derive(Default)]
struct Logs {
    /// (who, stderr text).
    texts: Vec<(String, String)>,
    /// Secrets the test knows, by name.
    secrets: Vec<(String, String)>,
    /// Public values with a secret's shape (fingerprints, ids) seen on stdout.
    public: Vec<String>,
}

impl Logs {
    fn log(&mut self, who: &str, text: String) {
        self.texts.push((who.into(), text));
    }

    fn secret(&mut self, what: &str, value: &str) {
        let value = value.trim();
        assert!(
            value.len() >= 16,
            "{what} is too short to search for: {value:?}"
        );
        self.secrets.push((what.into(), value.into()));
    }

    /// The body lines of a PEM private key file (each long enough never to match by chance).
    fn pem_secret(&mut self, what: &str, path: &Path) {
        let pem = std::fs::read_to_string(path).expect("read key file");
        let body: Vec<&str> = pem
            .lines()
            .map(str::trim)
            .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
            .collect();
        assert!(!body.is_empty(), "a PEM body in {}", path.display());
        for l in body {
            self.secret(what, l);
        }
    }

    /// Checks every log: no known secret, and nothing secret-shaped but public values.
    fn check(&self) {
        let mut traced = false;
        for (who, text) in &self.texts {
            traced |= text.contains("TRACE");
            for (what, secret) in &self.secrets {
                assert!(
                    !text.contains(secret.as_str()),
                    "{what} appears in {who}'s stderr"
                );
            }
            for line in ours(text) {
                for s in secret_shaped(line) {
                    let public = self.public.iter().any(|p| p.eq_ignore_ascii_case(&s));
                    assert!(public, "{who} logged a secret-shaped value: {line}");
                }
            }
        }
        assert!(traced, "the services logged at trace level");
    }
}

/// The lines of `text` that are tube's own: log lines of a `tube*` target with their
/// continuation lines (indented, as in a pretty-printed value), and every other line (error
/// messages). Third-party trace output (rustls, hyper) is left out of the shape check, since it
/// carries public handshake values such as the TLS hello randoms; known secrets are still
/// searched for in it.
fn ours(text: &str) -> Vec<&str> {
    let mut keep = true;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (first, level, target) = (words.next(), words.next(), words.next());
        let header = first.is_some_and(|t| t.ends_with('Z') && t.contains('T'))
            && level.is_some_and(|l| ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&l));
        let continuation = line.starts_with(|c: char| c.is_whitespace() || "}])".contains(c));
        if header {
            keep = target.is_some_and(|t| t.starts_with("tube"));
        } else if !continuation {
            keep = true;
        }
        if keep {
            out.push(line);
        }
    }
    out
}

/// Runs of 32 or more hex digits, and strings shaped like a JWT (`eyJ...x.y.z`), in `line`.
fn secret_shaped(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut run = String::new();
    for c in line.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_hexdigit() {
            run.push(c);
        } else {
            if run.len() >= 32 {
                found.push(run.clone());
            }
            run.clear();
        }
    }
    let jwt_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
    let mut rest = line;
    while let Some(i) = rest.find("eyJ") {
        let tail = &rest[i..];
        let end = tail.find(|c| !jwt_char(c)).unwrap_or(tail.len());
        if tail[..end].matches('.').count() == 2 {
            found.push(tail[..end].to_string());
        }
        rest = &tail[end.max(3)..];
    }
    found
}

#[test]
fn the_shape_check_sees_hex_secrets_and_jwts_in_tube_lines_only() {
    let hop = "8f1c".repeat(16);
    let jwt = "eyJ0eXAiOiJKV1QifQ.eyJzdWIiOiJhIn0.c2ln";
    let log = format!(
        "2026-11-30T00:00:00.000000Z TRACE tube_chain::node: hop secret={hop}\n\
         2026-11-30T00:00:00.000001Z TRACE rustls::client::hs: Sending ClientHello {{\n\
         \x20   random: {hop},\n\
         }}\n\
         error 1002 INVALID_TOKEN: {jwt} is not valid\n"
    );
    let lines = ours(&log);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(secret_shaped(lines[0]), vec![hop.clone()]);
    assert_eq!(secret_shaped(lines[1]), vec![jwt.to_string()]);
    // Shorter hex (ids cut to 16 digits, UUID groups) is not secret-shaped.
    assert!(
        secret_shaped("client_fp=3c1329aa00ff10ab tunnel 7d444840-9dc0-11d1-b245-5ffdce74fad2")
            .is_empty()
    );
}

const TRACE: [(&str, &str); 1] = [("RUST_LOG", "trace")];

/// Runs `tube args...`, which must succeed, logs its stderr as `who`'s and returns its stdout.
async fn step(logs: &mut Logs, who: &str, args: Vec<String>) -> String {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = run(&refs).await;
    assert!(ok, "{who} {args:?}: {err}");
    logs.log(who, err);
    out
}

/// `tube args...` to its end with trace logs; (success, stdout, stderr).
async fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(TUBE)
        .args(args)
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(LINE_LIMIT, out).await {
        Ok(out) => out.expect("run tube"),
        Err(_) => panic!("tube {args:?} did not finish within {LINE_LIMIT:?}"),
    };
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn no_secret_reaches_the_relay_or_agent_logs_at_trace_level() {
    deadline(LIMIT, async {
        let mut logs = Logs::default();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let mut relay = Proc::spawn(
            TUBE,
            &[
                "relay",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                d,
                "--auth-attempts-per-minute",
                "100",
            ],
            &TRACE,
            Stdio::null(),
        );
        let control = field(&relay.line().await, "listening control ");
        let fingerprint = field(&relay.line().await, "fingerprint ");
        logs.public.push(fingerprint["sha256:".len()..].to_string());
        let jwt_hex = std::fs::read_to_string(dir.path().join("relay-jwt.key")).unwrap();
        logs.secret("the JWT secret", &jwt_hex);
        logs.pem_secret("the relay's private key", &dir.path().join("relay-key.pem"));
        let jwt = JwtSecret::from_bytes(hex::decode(jwt_hex.trim()).unwrap());
        let good = jwt.mint("alice", Duration::from_secs(600));
        logs.secret("the agent's token", &good);

        // An agent that works, with a user through its tunnel.
        let svc = echo_server().await;
        let svc_addr = svc.addr.to_string();
        let expose = |token: &str| {
            let args = [
                "expose",
                &svc_addr,
                "--relay",
                &control,
                "--token",
                token,
                "--fingerprint",
                &fingerprint,
            ];
            Proc::spawn(TUBE, &args, &TRACE, Stdio::null())
        };
        let mut agent = expose(&good);
        let line = agent.line().await;
        let public = line.split(' ').nth(1).expect("tunnel line").to_string();
        let mut u = TcpStream::connect(public.as_str()).await.unwrap();
        assert_eq!(roundtrip(&mut u, b"hello").await, b"hello");

        // Refused agents: a token signed with another key, and an expired one.
        let forged = JwtSecret::generate()
            .unwrap()
            .mint("alice", Duration::from_secs(600));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let expired = jwt.mint_at("alice", now - 100, now - 10);
        for (what, token, code) in [
            ("a forged token", &forged, "1002"),
            ("an expired token", &expired, "1003"),
        ] {
            logs.secret(what, token);
            let mut a = expose(token);
            let (status, err) = a.wait_exit().await;
            assert!(!status.success(), "{what} was accepted");
            assert!(err.contains(&format!("error {code}")), "{what}: {err}");
            logs.log(&format!("the agent with {what}"), err);
        }

        // Reconnect tokens, as a scripted agent sees them: used once, then refused.
        let fp: Fingerprint = fingerprint.parse().unwrap();
        let addr: SocketAddr = control.parse().unwrap();
        let local: IpAddr = [127, 0, 0, 1].into();
        let mut c = agent_from(local, addr, fp, &good).await;
        let (id, first) = tunnel(&mut c, "scripted", None).await.expect("tunnel");
        logs.secret("a reconnect token", &first);
        drop(c);
        // Taken back at once: a lease, or a takeover if the relay has not noticed the drop.
        let mut c = agent_from(local, addr, fp, &good).await;
        let (_, second) = tunnel(&mut c, "scripted", Some((&id, &first)))
            .await
            .expect("reclaimed with the reconnect token");
        logs.secret("the next reconnect token", &second);
        let mut c = agent_from(local, addr, fp, &good).await;
        match tunnel(&mut c, "scripted", Some((&id, &first))).await {
            Err(ControlMessage::Error { code, .. }) => {
                assert_eq!(
                    code,
                    ErrorCode::ReconnectRefused as u16,
                    "second use refused"
                )
            }
            other => panic!("a used reconnect token was accepted: {other:?}"),
        }
        drop(c);

        agent.stop().await;
        logs.log("the agent", agent.stderr_now());
        relay.stop().await;
        let relay_log = relay.stderr_now();
        // The ready-to-paste `tube expose` line mints its token with `tube token` when run;
        // the relay logs no JWT at all (every JWT starts with the base64 of `{"`).
        assert!(
            relay_log.contains("expose a local service with: TUBE_TOKEN=$(tube token"),
            "the example command: {relay_log}"
        );
        assert!(!relay_log.contains("eyJ"), "a JWT in the relay's log");
        // ... and that part, run as logged, mints one.
        let minting = relay_log
            .split("TUBE_TOKEN=$(tube token ")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .expect("the token command");
        let out = tokio::process::Command::new(TUBE)
            .arg("token")
            .args(minting.split_whitespace())
            .output()
            .await
            .expect("run tube token");
        let token = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && token.starts_with("eyJ"),
            "`tube token {minting}`: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        logs.log("the relay", relay_log);
        logs.check();
    })
    .await;
}

/// The hub's registration token in the hub and node test below (given to both by variable).
const REGISTRATION_TOKEN: &str = "3c1f5a7e9b2d4f6081a3c5e7f9b1d3f5a7c9e1b3d5f7092a4c6e8f0b2d4f6a8c";

/// Trace logs and the registration token.
const HUB_ENV: [(&str, &str); 2] = [
    ("RUST_LOG", "trace"),
    ("TUBE_REGISTRATION_TOKEN", REGISTRATION_TOKEN),
];

/// A `tube node` with trace logs and the registration token, once logged in; its front API
/// address.
async fn node(hub: &Hub, name: &str, bind: &str, dir: &Path) -> (Proc, SocketAddr) {
    let mut node = hub.node(TUBE, name, bind, Some(dir), &HUB_ENV).await;
    node.logged_in().await;
    let api = node.api.parse().expect("api");
    (node.proc, api)
}

#[tokio::test]
async fn no_secret_reaches_the_hub_or_node_logs_at_trace_level() {
    deadline(LIMIT, async {
        let mut logs = Logs::default();
        let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
        // The hub registers only nodes with its token (and no log line may show it).
        let mut hub = start_hub(dirs[0].path(), &HUB_ENV).await;
        logs.secret("the registration token", REGISTRATION_TOKEN);
        logs.public
            .push(hub.fingerprint["sha256:".len()..].to_string());
        logs.pem_secret("the hub's private key", &dirs[0].path().join("hub-key.pem"));
        let password = |i: usize, name: &str| {
            std::fs::read_to_string(dirs[i].path().join(format!("node-{name}.password")))
                .expect("password file")
        };
        let (mut a, a_api) = node(&hub, "a", "127.0.0.2", dirs[1].path()).await;
        let (mut m, _) = node(&hub, "m", "127.0.0.3", dirs[2].path()).await;
        let (mut e, e_api) = node(&hub, "e", "127.0.0.4", dirs[3].path()).await;
        for (i, name) in [(1, "a"), (2, "m"), (3, "e")] {
            logs.secret(&format!("{name}'s password"), &password(i, name));
        }

        // A chain a -> m -> e carrying bytes (its hops use one-time secrets).
        let mut endpoint = FrontClient::connect(e_api).await.unwrap();
        endpoint.send(&FrontMessage::Subscribe {}).await.unwrap();
        while !matches!(endpoint.recv().await, Ok(FrontMessage::Tubes { .. })) {}
        let mut owner = FrontClient::connect(a_api).await.unwrap();
        owner
            .send(&FrontMessage::RequestTube {
                endpoint_name: "e".into(),
                local_id: "x".into(),
            })
            .await
            .unwrap();
        let near_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut near = None;
        let mut far = None;
        while near.is_none() || far.is_none() {
            tokio::select! {
                m = owner.recv() => match m.expect("owner front") {
                    FrontMessage::Listen { tunnel_id } => {
                        let port = near_listener.local_addr().unwrap().port();
                        owner.send(&FrontMessage::Listening { tunnel_id, port }).await.unwrap();
                        near = Some(near_listener.accept().await.unwrap().0);
                    }
                    FrontMessage::TubeResult { is_allowed: false, reason, .. } => panic!("{reason}"),
                    _ => {}
                },
                m = endpoint.recv() => match m.expect("endpoint front") {
                    FrontMessage::ConnectionRequest { tunnel_id, .. } => {
                        let yes = FrontMessage::Approve { tunnel_id, is_allowed: true, reason: String::new(), forward: None };
                        endpoint.send(&yes).await.unwrap();
                    }
                    FrontMessage::Established { port, .. } => {
                        far = Some(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
                    }
                    _ => {}
                },
            }
        }
        let (mut near, mut far) = (near.unwrap(), far.unwrap());
        near.write_all(b"through the chain").await.unwrap();
        let mut buf = [0u8; 17];
        tokio::io::AsyncReadExt::read_exact(&mut far, &mut buf)
            .await
            .unwrap();
        drop((near, far, owner, endpoint));

        // Two restarts rotate a's password twice; the first one, used and followed by a used
        // successor, is then refused.
        let stale = password(1, "a");
        a.stop().await;
        logs.log("node a", a.stderr_now());
        for restart in 1..=2 {
            let (mut a, _) = node(&hub, "a", "127.0.0.2", dirs[1].path()).await;
            logs.secret("a's next password", &password(1, "a"));
            a.stop().await;
            logs.log(&format!("node a, restart {restart}"), a.stderr_now());
        }
        std::fs::write(dirs[1].path().join("node-a.password"), &stale).unwrap();
        let d = dirs[1].path().to_str().unwrap();
        let args = [
            "node",
            "--hub",
            &hub.control,
            "--hub-fingerprint",
            &hub.fingerprint,
            "--name",
            "a",
            "--bind",
            "127.0.0.2",
            "--api",
            "127.0.0.1:0",
            "--data-dir",
            d,
        ];
        let (ok, _, err) = run(&args).await;
        assert!(!ok, "a stale password was accepted");
        assert!(err.contains("6001"), "{err}");
        logs.log("node a, with a used password", err);

        for (name, p) in [("m", &mut m), ("e", &mut e)] {
            p.stop().await;
            logs.log(&format!("node {name}"), p.stderr_now());
        }
        hub.proc.stop().await;
        logs.log("the hub", hub.proc.stderr_now());
        logs.check();
    })
    .await;
}

#[tokio::test]
async fn no_secret_reaches_the_mailbox_or_longpoll_logs_at_trace_level() {
    deadline(LIMIT, async {
        let mut logs = Logs::default();
        let mut peer = Proc::spawn(
            TUBE,
            &["peer", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"],
            &TRACE,
            Stdio::null(),
        );
        let p = field(&peer.line().await, "listening peer ");
        let backend = format!("http://{}", field(&peer.line().await, "listening http "));
        let mut proxy = Proc::spawn(
            TUBE,
            &["longpoll", "--listen", "127.0.0.1:0", "--backend", &backend],
            &TRACE,
            Stdio::null(),
        );
        let via = format!("http://{}", field(&proxy.line().await, "listening http "));

        // a speaks TCP, b HTTP through the proxy.
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let msg = |dir: &Path, args: &[&str]| {
            let mut all = vec!["msg"];
            all.extend_from_slice(args);
            all.extend(["--data-dir", dir.to_str().unwrap()]);
            all.iter().map(|s| s.to_string()).collect::<Vec<String>>()
        };
        for (who, d) in [("a", a.path()), ("b", b.path())] {
            let out = step(&mut logs, who, msg(d, &["init"])).await;
            logs.public.push(field(out.trim(), "fingerprint "));
        }
        let addr_a = step(&mut logs, "a", msg(a.path(), &["id", "--peer", &p])).await;
        let addr_b = step(&mut logs, "b", msg(b.path(), &["id", "--peer", &p])).await;
        let (addr_a, addr_b) = (addr_a.trim().to_owned(), addr_b.trim().to_owned());
        step(&mut logs, "a", msg(a.path(), &["fetch", "--peer", &p])).await;
        step(
            &mut logs,
            "b",
            msg(b.path(), &["fetch", "--peer", &p, "--via", &via]),
        )
        .await;
        step(
            &mut logs,
            "a",
            msg(a.path(), &["send", "--to", &addr_b, "hello b"]),
        )
        .await;
        let got = step(
            &mut logs,
            "b",
            msg(b.path(), &["fetch", "--peer", &p, "--via", &via]),
        )
        .await;
        assert_eq!(got, format!("{addr_a} hello b\n"));
        step(
            &mut logs,
            "b",
            msg(b.path(), &["send", "--via", &via, "--to", &addr_a, "hi a"]),
        )
        .await;
        let got = step(&mut logs, "a", msg(a.path(), &["fetch", "--peer", &p])).await;
        assert_eq!(got, format!("{addr_b} hi a\n"));
        for d in [a.path(), b.path()] {
            let key = std::fs::read_to_string(d.join("mailbox-identity.key")).unwrap();
            logs.secret("a mailbox identity key", &key);
        }

        // Refused: packets with a made-up token, and a login the backend does not accept.
        let http = format!("{}/", via);
        let client = reqwest::Client::new();
        let forged = "0123456789abcdef0123456789abcdef0123456789abcdef";
        let r = client
            .post(&http)
            .header("Authorization", format!("Bearer {forged}"))
            .body("x")
            .send()
            .await
            .expect("proxy answers");
        assert_eq!(r.status(), 401);
        let r = client
            .post(format!("{via}/auth"))
            .body("mallory:not-a-registration")
            .send()
            .await
            .expect("proxy answers");
        assert!(r.status().is_client_error(), "{}", r.status());
        // The made-up token is secret-shaped: the test knows it is not real, the logs must
        // not carry it either.
        logs.secret("a made-up bearer token", forged);

        proxy.stop().await;
        logs.log("the longpoll proxy", proxy.stderr_now());
        peer.stop().await;
        logs.log("the peer", peer.stderr_now());
        logs.check();
    })
    .await;
}
