//! The relay protocol of seed 001 end to end, in-process on 127.0.0.1: lifecycle, heartbeats
//! and dead links (on tokio's paused clock), rate limits, reconnect with leases and single-use
//! tokens, takeover of a half-open connection, allow-lists, and uniform auth failure timing.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tube_agent::{AgentEvent, TunnelSpec};
use tube_net::codec::{HandshakeConn, handshake_conn, recv_control, send_control};
use tube_net::tokio_rustls::{TlsAcceptor, TlsConnector, client::TlsStream};
use tube_net::{Fingerprint, Identity, tls};
use tube_proto::ErrorCode;
use tube_proto::backoff::BackoffConfig;
use tube_proto::control::{
    ClientInfo, ControlMessage, ServerInfo, TunnelConfig, TunnelInfo, TunnelStats,
};
use tube_proto::lifecycle::AgentState;
use tube_proto::ratelimit::RateLimit;
use tube_relay::RelayConfig;
use tube_testkit::*;

const LIMIT: Duration = Duration::from_secs(60);

type Conn = HandshakeConn<TlsStream<TcpStream>>;

fn fast_backoff() -> BackoffConfig {
    BackoffConfig {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        factor: 2.0,
        max_attempts: 0,
        jitter: 0.0,
    }
}

/// TLS connect from `src` (an address of 127.0.0.0/8) and read the greeting.
async fn dial_from(src: IpAddr, relay: SocketAddr, fp: Fingerprint) -> Conn {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(src, 0)).unwrap();
    dial(sock, relay, fp).await
}

/// TLS connect on `sock` and read the greeting.
async fn dial(sock: TcpSocket, relay: SocketAddr, fp: Fingerprint) -> Conn {
    let tcp = sock.connect(relay).await.unwrap();
    let cfg = tls::pinned_client_config(fp).unwrap();
    let tls = TlsConnector::from(cfg)
        .connect(tls::server_name(), tcp)
        .await
        .unwrap();
    let mut c = handshake_conn(tls);
    assert!(matches!(
        recv_control(&mut c).await.unwrap(),
        ControlMessage::Hello { .. }
    ));
    c
}

/// Sends auth and returns the answer.
async fn auth(c: &mut Conn, token: &str) -> ControlMessage {
    let m = ControlMessage::Auth {
        token: token.into(),
        version: "1.0".into(),
        client_info: ClientInfo::default(),
        window: None,
    };
    send_control(c, &m).await.unwrap();
    recv_control(c).await.unwrap()
}

async fn authed(relay: SocketAddr, fp: Fingerprint, token: &str) -> Conn {
    let mut c = dial_from("127.0.0.1".parse().unwrap(), relay, fp).await;
    let r = auth(&mut c, token).await;
    assert!(matches!(r, ControlMessage::AuthResponse { .. }), "{r:?}");
    c
}

fn tcp_tunnel(name: &str) -> TunnelInfo {
    TunnelInfo {
        name: name.into(),
        protocol: "tcp".into(),
        ..Default::default()
    }
}

async fn register(c: &mut Conn, info: TunnelInfo) -> ControlMessage {
    send_control(c, &ControlMessage::Register { tunnel_info: info })
        .await
        .unwrap();
    recv_control(c).await.unwrap()
}

/// Registers and confirms; returns (tunnel id, endpoint, reconnect token).
async fn open_tunnel(c: &mut Conn, info: TunnelInfo) -> (String, SocketAddr, String) {
    match register(c, info).await {
        ControlMessage::RegisterResponse {
            tunnel_id,
            config,
            reconnect_token,
            ..
        } => {
            send_control(
                c,
                &ControlMessage::RegisterConfirm {
                    tunnel_id: tunnel_id.clone(),
                },
            )
            .await
            .unwrap();
            (
                tunnel_id,
                config.endpoint.parse().unwrap(),
                reconnect_token.expect("token"),
            )
        }
        other => panic!("register refused: {other:?}"),
    }
}

fn error_of(m: &ControlMessage) -> (u16, Option<String>, Option<u64>) {
    match m {
        ControlMessage::Error { code, details, .. } => {
            (*code, details.reason.clone(), details.retry_after)
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Reads frames until the connection ends; returns the code of the last error message seen.
async fn closing_error(c: &mut Conn) -> Option<u16> {
    let mut last = None;
    while let Some(Ok(f)) = c.next().await {
        if let tube_proto::Frame::Control(b) = f
            && let Ok(ControlMessage::Error { code, .. }) = ControlMessage::from_bytes(&b)
        {
            last = Some(code);
        }
    }
    last
}

fn seed_limits(mut c: RelayConfig) -> RelayConfig {
    c.auth_limit_per_ip = RateLimit::per_minute(5);
    c.auth_limit_per_subject = RateLimit::per_minute(5);
    c.tunnel_limit_per_subject = RateLimit::per_hour(10);
    c
}

#[tokio::test]
async fn lifecycle_follows_the_seed_diagram_and_the_relay_shows_it() {
    init_tracing();
    deadline(LIMIT, async {
        let keys = Keys::new();
        let relay = TestRelay::start_with(keys.config(None)).await;
        let proxy = CutProxy::start(relay.addr).await;
        let svc = echo_server().await;
        let mut agent = TestAgent::start(keys.agent(proxy.addr, &[svc.addr])).await;
        // The start-up transitions, in the seed's order.
        let states: Vec<(AgentState, AgentState)> = agent
            .startup
            .iter()
            .filter_map(|e| match e {
                AgentEvent::State { from, to } => Some((*from, *to)),
                _ => None,
            })
            .collect();
        use AgentState::*;
        assert_eq!(
            states,
            vec![
                (Disconnected, Authenticating),
                (Authenticating, Registered),
                (Registered, Active)
            ]
        );
        let port = agent.public[0].port();
        // Agent and tunnel are updated one after the other (apart, seen from another thread).
        relay
            .state
            .wait_until(|s| {
                s.agents().iter().any(|a| a.state == "active")
                    && s.tunnel_by_port(port).is_some_and(|t| t.state == "active")
            })
            .await;

        // The link dies and the relay cannot be reached for a while.
        proxy.refuse(true);
        proxy.cut();
        agent.wait_state(AgentState::Reconnecting).await;
        // The session marks its tunnel reconnecting, then leaves the agent list (seen from
        // another thread, the two are apart), after which the agent shows as reconnecting.
        relay
            .state
            .wait_until(|s| {
                s.tunnel_by_port(port)
                    .is_some_and(|t| t.state == "reconnecting")
                    && s.agents()
                        .iter()
                        .any(|a| a.state == "reconnecting" && a.session == 0)
            })
            .await;
        // While reconnecting, users are refused at once.
        assert!(
            TcpStream::connect(("127.0.0.1", port)).await.is_err(),
            "port must not accept"
        );

        proxy.refuse(false);
        // Reconnecting goes straight back to Active (the diagram's Reconnect Success).
        loop {
            match agent.events.recv().await {
                Some(AgentEvent::State { from, to }) => {
                    assert_eq!((from, to), (AgentState::Reconnecting, AgentState::Active));
                    break;
                }
                Some(_) => {}
                None => panic!("agent ended"),
            }
        }
        assert_eq!(
            agent.next_tunnel_up().await.port(),
            port,
            "same public port after reconnect"
        );
        relay
            .state
            .wait_until(|s| s.tunnel_by_port(port).is_some_and(|t| t.state == "active"))
            .await;
        let mut u = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        assert_eq!(roundtrip(&mut u, b"back").await, b"back");
        agent.stop().await;
        relay.state.wait_until(|s| s.tunnels().is_empty()).await;
        relay.stop().await;
    })
    .await;
}

/// A relay whose identity and secret the test keeps, so it can be restarted as "the same
/// relay" on the same data dir.
struct Keys {
    identity: Identity,
    jwt: tube_relay::JwtSecret,
}

impl Keys {
    fn new() -> Self {
        Self {
            identity: Identity::generate(&["localhost"]).unwrap(),
            jwt: tube_relay::JwtSecret::generate().unwrap(),
        }
    }
    fn config(&self, data: Option<&std::path::Path>) -> RelayConfig {
        let mut c = relay_config();
        c.identity = self.identity.clone();
        c.jwt = self.jwt.clone();
        c.data_dir = data.map(|d| d.to_path_buf());
        c
    }
    /// [`Keys::config`] for a test on tokio's paused clock: the relay serves agents on the
    /// test's runtime, not on threads of their own, whose clocks would not be paused.
    fn paused_config(&self) -> RelayConfig {
        let mut c = self.config(None);
        c.threads = 0;
        c
    }

    fn agent(&self, via: SocketAddr, locals: &[SocketAddr]) -> tube_agent::AgentConfig {
        let tunnels = locals
            .iter()
            .map(|l| TunnelSpec {
                local: l.to_string(),
                name: l.to_string(),
                ..Default::default()
            })
            .collect();
        let token = self.jwt.mint("alice", Duration::from_secs(3600));
        let mut c = tube_agent::AgentConfig::new(
            via.to_string(),
            token,
            self.identity.fingerprint(),
            tunnels,
        );
        c.backoff = fast_backoff();
        c
    }
}

#[tokio::test]
async fn a_cut_connection_comes_back_on_the_same_port_and_open_users_see_a_close() {
    init_tracing();
    deadline(LIMIT, async {
        let keys = Keys::new();
        let relay = TestRelay::start_with(keys.config(None)).await;
        let proxy = CutProxy::start(relay.addr).await;
        let svc = echo_server().await;
        let mut agent = TestAgent::start(keys.agent(proxy.addr, &[svc.addr])).await;
        let public = agent.public[0];
        // A transfer is running when the link is cut.
        let mut u = TcpStream::connect(public).await.unwrap();
        assert_eq!(roundtrip(&mut u, b"before").await, b"before");
        proxy.cut();
        assert!(
            ended(&mut u, Duration::from_secs(5)).await.is_some(),
            "the user sees a close, not a hang"
        );
        assert_eq!(agent.next_tunnel_up().await, public);
        let mut u2 = TcpStream::connect(public).await.unwrap();
        assert_eq!(roundtrip(&mut u2, b"after").await, b"after");
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn after_a_relay_restart_on_the_same_data_dir_agents_get_their_ports_back() {
    init_tracing();
    deadline(LIMIT, async {
        let keys = Keys::new();
        let data = tempfile::tempdir().unwrap();
        let relay = TestRelay::start_with(keys.config(Some(data.path()))).await;
        let proxy = CutProxy::start(relay.addr).await;
        let svc = echo_server().await;
        let mut agent = TestAgent::start(keys.agent(proxy.addr, &[svc.addr, svc.addr])).await;
        let before = agent.public.clone();
        relay.stop().await;
        agent.wait_state(AgentState::Reconnecting).await;
        // A new relay process: same identity, secret and data dir, new control port.
        let relay = TestRelay::start_with(keys.config(Some(data.path()))).await;
        assert_eq!(
            relay.state.tunnels().len(),
            2,
            "leases restored from SQLite"
        );
        assert!(
            relay
                .state
                .tunnels()
                .iter()
                .all(|t| t.state == "reconnecting")
        );
        proxy.set_upstream(relay.addr);
        let mut after = vec![agent.next_tunnel_up().await, agent.next_tunnel_up().await];
        after.sort();
        let mut b = before.clone();
        b.sort();
        assert_eq!(after, b, "both tunnels are back on their ports");
        for p in &before {
            let mut u = TcpStream::connect(p).await.unwrap();
            assert_eq!(roundtrip(&mut u, b"restarted").await, b"restarted");
        }
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn reconnect_tokens_are_single_use_and_bound_to_their_owner() {
    init_tracing();
    deadline(LIMIT, async {
        let keys = Keys::new();
        let relay = TestRelay::start_with(keys.config(None)).await;
        let fp = keys.identity.fingerprint();
        let alice = keys.jwt.mint("alice", Duration::from_secs(600));
        let bob = keys.jwt.mint("bob", Duration::from_secs(600));
        let mut c = authed(relay.addr, fp, &alice).await;
        let (id, endpoint, t1) = open_tunnel(&mut c, tcp_tunnel("web")).await;
        drop(c); // connection lost, no goodbye
        relay
            .state
            .wait_until(|s| {
                s.tunnel_by_port(endpoint.port())
                    .is_some_and(|t| t.state == "reconnecting")
            })
            .await;
        let reclaim = |token: &str| TunnelInfo {
            tunnel_id: Some(id.clone()),
            reconnect_token: Some(token.into()),
            ..tcp_tunnel("web")
        };
        // Someone else with the token: refused.
        let mut b = authed(relay.addr, fp, &bob).await;
        let r = register(&mut b, reclaim(&t1)).await;
        assert_eq!(error_of(&r).0, ErrorCode::ReconnectRefused as u16);
        assert_eq!(error_of(&r).1.as_deref(), Some("reconnect_refused"));
        // A wrong token from the owner: refused.
        let mut a = authed(relay.addr, fp, &alice).await;
        let r = register(&mut a, reclaim("00ff")).await;
        assert_eq!(error_of(&r).0, ErrorCode::ReconnectRefused as u16);
        // The owner with the token: same id and port, and a new token.
        let (id2, endpoint2, t2) = open_tunnel(&mut a, reclaim(&t1)).await;
        assert_eq!((id2.as_str(), endpoint2), (id.as_str(), endpoint));
        assert_ne!(t2, t1);
        drop(a);
        relay
            .state
            .wait_until(|s| {
                s.tunnel_by_port(endpoint.port())
                    .is_some_and(|t| t.state == "reconnecting")
            })
            .await;
        // The first token was used up.
        let mut a = authed(relay.addr, fp, &alice).await;
        let r = register(&mut a, reclaim(&t1)).await;
        assert_eq!(
            error_of(&r).0,
            ErrorCode::ReconnectRefused as u16,
            "second use refused"
        );
        let (_, endpoint3, _) = open_tunnel(&mut a, reclaim(&t2)).await;
        assert_eq!(endpoint3, endpoint);
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_same_agent_takes_its_tunnel_over_from_a_half_open_connection() {
    init_tracing();
    deadline(LIMIT, async {
        let keys = Keys::new();
        let relay = TestRelay::start_with(keys.config(None)).await;
        let fp = keys.identity.fingerprint();
        let alice = keys.jwt.mint("alice", Duration::from_secs(600));
        let mut old = authed(relay.addr, fp, &alice).await;
        let (id, endpoint, t1) = open_tunnel(&mut old, tcp_tunnel("web")).await;
        relay
            .state
            .wait_until(|s| {
                s.tunnel_by_port(endpoint.port())
                    .is_some_and(|t| t.state == "active")
            })
            .await;
        // The old connection is still open as far as the relay knows; the agent comes back.
        let mut new = authed(relay.addr, fp, &alice).await;
        let info = TunnelInfo {
            tunnel_id: Some(id.clone()),
            reconnect_token: Some(t1),
            ..tcp_tunnel("web")
        };
        let (id2, endpoint2, _) = open_tunnel(&mut new, info).await;
        assert_eq!((id2, endpoint2), (id, endpoint));
        // The stale connection was ended by the relay.
        assert!(
            tokio::time::timeout(Duration::from_secs(5), closing_error(&mut old))
                .await
                .is_ok()
        );
        relay
            .state
            .wait_until(|s| {
                s.tunnel_by_port(endpoint.port())
                    .is_some_and(|t| t.state == "active")
            })
            .await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_relay_drops_an_agent_that_stops_sending_heartbeats() {
    init_tracing();
    deadline(Duration::from_secs(600), async {
        let keys = Keys::new();
        let relay = TestRelay::start_with(keys.paused_config()).await;
        let alice = keys.jwt.mint("alice", Duration::from_secs(3600));
        let mut c = authed(relay.addr, keys.identity.fingerprint(), &alice).await;
        let (_, endpoint, _) = open_tunnel(&mut c, tcp_tunnel("quiet")).await;
        let mut user = TcpStream::connect(endpoint).await.unwrap();
        let start = Instant::now();
        // Two heartbeats, 30 s apart, keep it alive; then silence.
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_secs(30)).await;
            let hb = ControlMessage::Heartbeat {
                tunnel_id: "x".into(),
                stats: TunnelStats::default(),
            };
            send_control(&mut c, &hb).await.unwrap();
        }
        let last = Instant::now();
        assert_eq!(
            closing_error(&mut c).await,
            Some(ErrorCode::HeartbeatTimeout as u16)
        );
        let silent = Instant::now() - last;
        assert!(
            silent >= Duration::from_secs(90) && silent < Duration::from_secs(92),
            "dropped after {silent:?}"
        );
        assert!(Instant::now() - start >= Duration::from_secs(150));
        // Its user connections went with it.
        assert!(ended(&mut user, Duration::from_secs(5)).await.is_some());
        relay.stop().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_relay_drops_an_agent_that_stops_reading_its_answers() {
    init_tracing();
    deadline(Duration::from_secs(900), async {
        let keys = Keys::new();
        let relay = TestRelay::start_with(keys.paused_config()).await;
        let alice = keys.jwt.mint("alice", Duration::from_secs(3600));
        // A small receive buffer, so that what the relay sends backs up soon.
        let sock = TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut c = dial(sock, relay.addr, keys.identity.fingerprint()).await;
        assert!(matches!(
            auth(&mut c, &alice).await,
            ControlMessage::AuthResponse { .. }
        ));
        let (_, endpoint, _) = open_tunnel(&mut c, tcp_tunnel("deaf")).await;
        // Users send (each up to its stream's window) to an agent that reads nothing more,
        // so the relay's writes to it back up, and so does its answer to a heartbeat. The
        // agent keeps sending one every 30 s, as a live one would: only what the relay reads
        // counts. When the liveness deadline passes, the relay drops the agent and its users.
        let mut users = Vec::new();
        let mut writers = Vec::new();
        for _ in 0..32 {
            let user = TcpStream::connect(endpoint).await.unwrap();
            let (r, mut w) = user.into_split();
            writers.push(tokio::spawn(async move {
                let _ = w.write_all(&vec![7u8; 1 << 20]).await;
                w
            }));
            users.push(r);
        }
        let (mut sink, _unread) = c.split();
        let beats = tokio::spawn(async move {
            loop {
                let hb = ControlMessage::Heartbeat {
                    tunnel_id: "x".into(),
                    stats: TunnelStats::default(),
                };
                let f = tube_proto::Frame::Control(hb.to_bytes());
                if futures_util::SinkExt::send(&mut sink, f).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        });
        for user in &mut users {
            let mut buf = [0u8; 64];
            let end = tokio::time::timeout(Duration::from_secs(600), user.read(&mut buf)).await;
            assert!(
                matches!(end, Ok(Ok(0)) | Ok(Err(_))),
                "a user of a deaf agent is still connected: {end:?}"
            );
        }
        beats.abort();
        for w in writers {
            w.abort();
        }
        relay.stop().await;
    })
    .await;
}

/// A fake relay that completes the handshake and registration, then never answers again.
async fn silent_relay() -> (
    SocketAddr,
    Fingerprint,
    tokio::sync::mpsc::UnboundedReceiver<Instant>,
) {
    let identity = Identity::generate(&["localhost"]).unwrap();
    let fp = identity.fingerprint();
    let acceptor = TlsAcceptor::from(identity.server_config().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let tracker = tokio_util::task::TaskTracker::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tx.send(Instant::now());
            let acceptor = acceptor.clone();
            // Like the real relay: with Nagle on, a second handshake write would wait in the
            // kernel for a delayed ACK while the paused clock jumps ahead.
            let _ = tcp.set_nodelay(true);
            tracker.spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return None;
                };
                let mut c = handshake_conn(tls);
                let hello = ControlMessage::Hello {
                    version: "1.0".into(),
                    server_info: ServerInfo::default(),
                    window: None,
                };
                send_control(&mut c, &hello).await.ok()?;
                let _auth = recv_control(&mut c).await.ok()?;
                let ok = ControlMessage::AuthResponse {
                    status: "success".into(),
                    server_info: ServerInfo::default(),
                };
                send_control(&mut c, &ok).await.ok()?;
                let _reg = recv_control(&mut c).await.ok()?;
                let resp = ControlMessage::RegisterResponse {
                    status: "success".into(),
                    tunnel_id: uuid_like(),
                    config: TunnelConfig {
                        endpoint: "127.0.0.1:1".into(),
                        ..Default::default()
                    },
                    reconnect_token: None,
                };
                send_control(&mut c, &resp).await.ok()?;
                // Keep the connection open and read (so TCP stays healthy), answer nothing.
                while let Some(Ok(_)) = c.next().await {}
                Some(())
            });
        }
    });
    (addr, fp, rx)
}

fn uuid_like() -> String {
    "7d444840-9dc0-11d1-b245-5ffdce74fad2".into()
}

#[tokio::test(start_paused = true)]
async fn an_agent_whose_relay_stops_answering_reconnects_within_the_bound() {
    init_tracing();
    deadline(Duration::from_secs(600), async {
        let (addr, fp, mut accepted) = silent_relay().await;
        let svc = echo_server().await;
        let spec = TunnelSpec {
            local: svc.addr.to_string(),
            name: "x".into(),
            ..Default::default()
        };
        let mut cfg = tube_agent::AgentConfig::new(addr.to_string(), "t".into(), fp, vec![spec]);
        cfg.backoff = BackoffConfig {
            initial: Duration::from_secs(1),
            jitter: 0.0,
            ..Default::default()
        };
        let mut agent = TestAgent::start(cfg).await;
        let first = accepted.recv().await.unwrap();
        agent.wait_state(AgentState::Reconnecting).await;
        let second = accepted.recv().await.unwrap();
        let gap = second - first;
        // 3 missed 30 s intervals, then the 1 s first backoff.
        assert!(
            gap >= Duration::from_secs(90) && gap <= Duration::from_secs(92),
            "reconnected after {gap:?}"
        );
        agent.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_sixth_auth_in_a_minute_is_refused_per_ip_and_per_subject() {
    init_tracing();
    deadline(LIMIT, async {
        let keys = Keys::new();
        let relay = TestRelay::start_with(seed_limits(keys.config(None))).await;
        let fp = keys.identity.fingerprint();
        // Per IP: five attempts from 127.0.0.2 (any subject, even failing ones) pass the
        // limiter, the sixth is refused before the token is looked at.
        let ip2: IpAddr = "127.0.0.2".parse().unwrap();
        for i in 0..5 {
            let token = keys.jwt.mint(&format!("user{i}"), Duration::from_secs(600));
            let mut c = dial_from(ip2, relay.addr, fp).await;
            assert!(
                matches!(
                    auth(&mut c, &token).await,
                    ControlMessage::AuthResponse { .. }
                ),
                "attempt {i}"
            );
        }
        let mut c = dial_from(ip2, relay.addr, fp).await;
        let r = auth(&mut c, &keys.jwt.mint("user9", Duration::from_secs(600))).await;
        let (code, reason, retry) = error_of(&r);
        assert_eq!(code, ErrorCode::RateLimit as u16);
        assert_eq!(reason.as_deref(), Some("auth_attempts"));
        assert_eq!(retry, Some(12), "one attempt comes back every 60/5 s");
        // Another address is not affected.
        let mut c = dial_from("127.0.0.3".parse().unwrap(), relay.addr, fp).await;
        assert!(matches!(
            auth(&mut c, &keys.jwt.mint("carol", Duration::from_secs(600))).await,
            ControlMessage::AuthResponse { .. }
        ));
        // Per subject: dave from five different addresses, then a sixth.
        let dave = keys.jwt.mint("dave", Duration::from_secs(600));
        for i in 10..15u8 {
            let mut c = dial_from(IpAddr::from([127, 0, 0, i]), relay.addr, fp).await;
            assert!(matches!(
                auth(&mut c, &dave).await,
                ControlMessage::AuthResponse { .. }
            ));
        }
        let mut c = dial_from("127.0.0.20".parse().unwrap(), relay.addr, fp).await;
        let (code, ..) = error_of(&auth(&mut c, &dave).await);
        assert_eq!(code, ErrorCode::RateLimit as u16);
        let m = relay.state.render_metrics();
        assert!(
            m.contains("tube_relay_rate_limited_total{limit=\"auth_ip\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("tube_relay_rate_limited_total{limit=\"auth_subject\"} 1"),
            "{m}"
        );
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_eleventh_tunnel_in_an_hour_is_refused_and_heartbeats_are_rate_limited() {
    init_tracing();
    deadline(LIMIT, async {
        let keys = Keys::new();
        let relay = TestRelay::start_with(seed_limits(keys.config(None))).await;
        let alice = keys.jwt.mint("alice", Duration::from_secs(600));
        let mut c = authed(relay.addr, keys.identity.fingerprint(), &alice).await;
        let mut ids = Vec::new();
        for i in 0..10 {
            let (id, ..) = open_tunnel(&mut c, tcp_tunnel(&format!("t{i}"))).await;
            ids.push(id);
        }
        let r = register(&mut c, tcp_tunnel("t10")).await;
        let (code, reason, retry) = error_of(&r);
        assert_eq!(code, ErrorCode::RateLimit as u16);
        assert_eq!(reason.as_deref(), Some("tunnel_creation"));
        assert_eq!(retry, Some(360), "one tunnel comes back every 3600/10 s");
        // Heartbeats closer than the minimum interval are refused; the connection stays up.
        let hb = |id: &str| ControlMessage::Heartbeat {
            tunnel_id: id.into(),
            stats: TunnelStats::default(),
        };
        let id = ids[0].clone();
        send_control(&mut c, &hb(&id)).await.unwrap();
        assert!(matches!(
            recv_control(&mut c).await.unwrap(),
            ControlMessage::HeartbeatResponse { .. }
        ));
        send_control(&mut c, &hb(&id)).await.unwrap();
        let (code, reason, retry) = error_of(&recv_control(&mut c).await.unwrap());
        assert_eq!(
            (code, reason.as_deref()),
            (ErrorCode::RateLimit as u16, Some("heartbeat_rate"))
        );
        assert!(retry.is_some_and(|r| (1..=15).contains(&r)));
        let other = ControlMessage::Heartbeat {
            tunnel_id: ids[1].clone(),
            stats: TunnelStats::default(),
        };
        send_control(&mut c, &other).await.unwrap();
        assert!(matches!(
            recv_control(&mut c).await.unwrap(),
            ControlMessage::HeartbeatResponse { .. }
        ));
        relay.stop().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_rate_limited_agent_waits_retry_after_before_trying_again() {
    init_tracing();
    deadline(Duration::from_secs(600), async {
        let keys = Keys::new();
        let mut cfg = keys.paused_config();
        cfg.auth_limit_per_ip = RateLimit::per_minute(1);
        let relay = TestRelay::start_with(cfg).await;
        let svc = echo_server().await;
        let first = TestAgent::start(keys.agent(relay.addr, &[svc.addr])).await;
        first.stop().await;
        let started = Instant::now();
        let mut second = TestAgent::start(keys.agent(relay.addr, &[svc.addr])).await;
        let waited = Instant::now() - started;
        assert!(
            waited >= Duration::from_secs(60),
            "came back after {waited:?}, before retry_after"
        );
        let retried = second.startup.iter().find_map(|e| match e {
            AgentEvent::Retrying { delay, reason, .. } => Some((*delay, reason.clone())),
            _ => None,
        });
        let (delay, reason) = retried.expect("a retry");
        assert_eq!(delay, Duration::from_secs(60));
        assert!(reason.contains("3001 RATE_LIMIT"), "{reason}");
        let _ = second.events.try_recv();
        second.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn auth_failures_take_the_same_time_whichever_check_failed() {
    init_tracing();
    deadline(LIMIT, async {
        let keys = Keys::new();
        let mut cfg = keys.paused_config();
        cfg.auth_failure_delay = Duration::from_millis(250);
        let relay = TestRelay::start_with(cfg).await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let other = tube_relay::JwtSecret::generate().unwrap();
        let cases = [
            ("garbage", "not-a-jwt".to_string(), ErrorCode::InvalidToken),
            (
                "wrong key",
                other.mint("alice", Duration::from_secs(60)),
                ErrorCode::InvalidToken,
            ),
            (
                "expired",
                keys.jwt.mint_at("alice", now - 100, now - 10),
                ErrorCode::TokenExpired,
            ),
            ("empty", String::new(), ErrorCode::AuthFailed),
        ];
        for (name, token, want) in cases {
            let mut c = dial_from(
                "127.0.0.1".parse().unwrap(),
                relay.addr,
                keys.identity.fingerprint(),
            )
            .await;
            let t0 = Instant::now();
            let r = auth(&mut c, &token).await;
            let took = Instant::now() - t0;
            assert_eq!(error_of(&r).0, want as u16, "{name}");
            assert_eq!(
                took,
                Duration::from_millis(250),
                "{name} answered after {took:?}"
            );
        }
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn allow_lists_refuse_other_addresses_before_any_byte() {
    init_tracing();
    deadline(LIMIT, async {
        let keys = Keys::new();
        let mut cfg = keys.config(None);
        cfg.allowed_ips_policy = vec!["127.0.0.0/24".parse().unwrap()];
        let relay = TestRelay::start_with(cfg).await;
        let svc = serve(|mut s| async move {
            let _ = s.write_all(b"secret banner").await;
        })
        .await;
        let mut ac = keys.agent(relay.addr, &[svc.addr]);
        ac.tunnels[0].allow = vec!["127.0.0.2/32".into()];
        let agent = TestAgent::start(ac.clone()).await;
        let public = agent.public[0];
        // From 127.0.0.1: reset, nothing forwarded (a relay on threads of its own may reset it
        // before `connect` has returned here).
        match TcpStream::connect(public).await {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            Ok(mut u) => {
                let mut buf = Vec::new();
                let r = u.read_to_end(&mut buf).await;
                assert!(
                    buf.is_empty() && r.is_err(),
                    "refused with a reset before any byte: {r:?} {buf:?}"
                );
            }
        }
        // From 127.0.0.2: served.
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut u = sock.connect(public).await.unwrap();
        let mut buf = Vec::new();
        u.read_to_end(&mut buf).await.unwrap();
        assert_eq!(buf, b"secret banner");
        let t = relay.state.tunnel_by_port(public.port()).unwrap();
        assert_eq!(t.allowed_ips, vec!["127.0.0.2/32"]);
        assert_eq!(t.denied_connections, 1);
        agent.stop().await;
        // A range outside the relay's policy is refused with INVALID_CONFIG.
        ac.tunnels[0].allow = vec!["10.0.0.0/8".into()];
        let e = TestAgent::try_start(ac).await.err().expect("refused");
        assert_eq!(e.code(), Some(ErrorCode::InvalidConfig), "{e}");
        relay.stop().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_rate_limited_registration_waits_on_the_same_connection_and_keeps_the_first_tunnel() {
    init_tracing();
    deadline(Duration::from_secs(600), async {
        let keys = Keys::new();
        let mut cfg = keys.paused_config();
        cfg.tunnel_limit_per_subject = RateLimit {
            burst: 1,
            period: Duration::from_secs(60),
        };
        let relay = TestRelay::start_with(cfg).await;
        let svc = echo_server().await;
        let started = Instant::now();
        let agent = TestAgent::start(keys.agent(relay.addr, &[svc.addr, svc.addr])).await;
        let waited = Instant::now() - started;
        assert!(
            waited >= Duration::from_secs(60),
            "second tunnel came after {waited:?}"
        );
        // One connection all along: no retry, no reconnect.
        assert!(
            !agent
                .startup
                .iter()
                .any(|e| matches!(e, AgentEvent::Retrying { .. }))
        );
        assert_eq!(relay.state.agents().len(), 1);
        relay
            .state
            .wait_until(|s| s.tunnels().iter().filter(|t| t.state == "active").count() == 2)
            .await;
        for p in &agent.public {
            let mut u = TcpStream::connect(p).await.unwrap();
            assert_eq!(roundtrip(&mut u, b"both").await, b"both");
        }
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_goodbye_right_behind_a_heartbeat_removes_the_tunnel() {
    init_tracing();
    deadline(LIMIT, async {
        let keys = Keys::new();
        // The relay on this test's runtime: it runs only when the test waits, so it reads the
        // heartbeat, the goodbye and the close in one go, every time. Which of the close and
        // the heartbeat's answer it then sees first is up to `select!`: ten agents in turn.
        let mut cfg = keys.config(None);
        cfg.threads = 0;
        let relay = TestRelay::start_with(cfg).await;
        let alice = keys.jwt.mint("alice", Duration::from_secs(3600));
        for i in 0..10 {
            let mut c = authed(relay.addr, keys.identity.fingerprint(), &alice).await;
            let (id, endpoint, _) = open_tunnel(&mut c, tcp_tunnel(&format!("brief-{i}"))).await;
            let port = endpoint.port();
            relay
                .state
                .wait_until(|s| s.tunnel_by_port(port).is_some_and(|t| t.state == "active"))
                .await;
            // As a stopping agent does: a last heartbeat, the goodbye right behind it, and the
            // connection closed, before the relay has answered the heartbeat.
            let hb = ControlMessage::Heartbeat {
                tunnel_id: id,
                stats: Default::default(),
            };
            send_control(&mut c, &hb).await.unwrap();
            let bye = ControlMessage::Disconnect {
                reason: "agent stopping".into(),
            };
            send_control(&mut c, &bye).await.unwrap();
            drop(c);
            // The tunnel is removed, not kept as a lease for a reconnect that never comes.
            relay
                .state
                .wait_until(|s| {
                    s.tunnel_by_port(port)
                        .is_none_or(|t| t.state == "reconnecting")
                })
                .await;
            assert_eq!(
                relay.state.tunnel_by_port(port).map(|t| t.state),
                None,
                "agent {i}: the goodbye was lost"
            );
        }
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_agent_reports_the_relay_stopping_not_a_lost_connection() {
    init_tracing();
    deadline(LIMIT, async {
        let keys = Keys::new();
        let svc = echo_server().await;
        // Relay and agent on this test's runtime: the agent reads the relay's SHUTTING_DOWN
        // and its close in one go, and its serving loop then sees both at once. Which it
        // takes is up to `select!`: ten relays in turn.
        for i in 0..10 {
            let mut cfg = keys.config(None);
            cfg.threads = 0;
            let relay = TestRelay::start_with(cfg).await;
            let mut agent = TestAgent::start(keys.agent(relay.addr, &[svc.addr])).await;
            relay.stop().await;
            let reason = agent.next_retry_reason().await;
            assert!(reason.contains("5001 SHUTTING_DOWN"), "agent {i}: {reason}");
            agent.kill().await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_lease_expires_after_its_grace_period_and_the_port_is_free_again() {
    init_tracing();
    deadline(LIMIT, async {
        let keys = Keys::new();
        let mut cfg = keys.config(None);
        cfg.lease_grace = Duration::from_millis(300);
        let relay = TestRelay::start_with(cfg).await;
        let proxy = CutProxy::start(relay.addr).await;
        let svc = echo_server().await;
        let mut agent = TestAgent::start(keys.agent(proxy.addr, &[svc.addr])).await;
        let port = agent.public[0].port();
        // The agent is cut off and cannot come back.
        proxy.refuse(true);
        proxy.cut();
        agent.wait_state(AgentState::Reconnecting).await;
        relay
            .state
            .wait_until(|s| {
                s.tunnel_by_port(port)
                    .is_some_and(|t| t.state == "reconnecting")
            })
            .await;
        // The grace period passes: the lease is dropped.
        relay.state.wait_until(|s| s.tunnels().is_empty()).await;
        // The port can now go to someone else.
        let mut other = keys.agent(relay.addr, &[svc.addr]);
        other.tunnels[0].remote_port = Some(port);
        let taker = TestAgent::start(other).await;
        assert_eq!(taker.public[0].port(), port);
        taker.stop().await;
        agent.kill().await;
        relay.stop().await;
    })
    .await;
}
