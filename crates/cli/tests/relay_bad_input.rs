//! Bad input at the relay: each case gets its protocol error (or a closed connection where no
//! protocol is spoken yet) and never disturbs an agent that is already serving users.
//!
//! The malformed-input table at the end (at least 40 cases: framing, lengths, JSON, fields,
//! messages in the wrong phase, stream misuse) runs each case on its own connection against
//! one shared relay, checks the exact answer docs/protocols/relay.md gives for it (error code
//! and close, refusal on a connection that stays, or silence), and then that an agent's
//! tunnel and an idle session opened before the table still work.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tube_net::codec::{HandshakeConn, handshake_conn, recv_control, send_control};
use tube_net::tokio_rustls::{TlsConnector, client::TlsStream};
use tube_net::{Fingerprint, tls};
use tube_proto::control::{ClientInfo, ControlMessage, TunnelInfo};
use tube_proto::{ErrorCode, Frame};
use tube_testkit::*;

const LIMIT: Duration = Duration::from_secs(60);

type Conn = HandshakeConn<TlsStream<TcpStream>>;

/// A relay with an agent serving an echo service, to prove bad input elsewhere harms nothing.
struct Bystander {
    relay: TestRelay,
    agent: TestAgent,
    _svc: TestServer,
}

impl Bystander {
    async fn start_with(cfg: tube_relay::RelayConfig) -> Self {
        let relay = TestRelay::start_with(cfg).await;
        let svc = echo_server().await;
        let agent = TestAgent::start(relay.agent_config(&[svc.addr])).await;
        let b = Self {
            relay,
            agent,
            _svc: svc,
        };
        b.check().await;
        b
    }

    async fn start() -> Self {
        Self::start_with(relay_config()).await
    }

    async fn check(&self) {
        let mut u = TcpStream::connect(self.agent.public[0]).await.unwrap();
        assert_eq!(roundtrip(&mut u, b"still serving").await, b"still serving");
    }

    async fn stop(self) {
        self.check().await;
        self.agent.stop().await;
        self.relay.stop().await;
    }
}

async fn tls_connect(addr: SocketAddr, fp: Fingerprint) -> Conn {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let cfg = tls::pinned_client_config(fp).unwrap();
    let tls = TlsConnector::from(cfg)
        .connect(tls::server_name(), tcp)
        .await
        .unwrap();
    handshake_conn(tls)
}

/// TLS + greeting + auth with `token`; returns the connection after a successful auth.
async fn authed(addr: SocketAddr, fp: Fingerprint, token: &str) -> Conn {
    let mut c = tls_connect(addr, fp).await;
    assert!(matches!(
        recv_control(&mut c).await.unwrap(),
        ControlMessage::Hello { .. }
    ));
    send_control(&mut c, &auth_msg(token, "1.0")).await.unwrap();
    assert!(matches!(
        recv_control(&mut c).await.unwrap(),
        ControlMessage::AuthResponse { .. }
    ));
    c
}

fn auth_msg(token: &str, version: &str) -> ControlMessage {
    ControlMessage::Auth {
        token: token.into(),
        version: version.into(),
        client_info: ClientInfo::default(),
        window: None,
    }
}

/// Reads until the relay's `error` message; returns its code, then expects the close.
async fn expect_error(c: &mut Conn) -> u16 {
    loop {
        match c.next().await {
            Some(Ok(Frame::Control(b))) => {
                if let Ok(ControlMessage::Error { code, .. }) = ControlMessage::from_bytes(&b) {
                    // After the error the relay closes the connection.
                    loop {
                        match c.next().await {
                            None | Some(Err(_)) => return code,
                            Some(Ok(_)) => {}
                        }
                    }
                }
            }
            Some(Ok(_)) => {}
            None | Some(Err(_)) => panic!("connection closed without an error message"),
        }
    }
}

async fn agent_error(
    b: &Bystander,
    edit: impl FnOnce(&mut tube_agent::AgentConfig),
) -> tube_agent::AgentError {
    let svc = echo_server().await;
    let mut cfg = b.relay.agent_config(&[svc.addr]);
    edit(&mut cfg);
    TestAgent::try_start(cfg)
        .await
        .err()
        .expect("agent must be refused")
}

#[tokio::test]
async fn bad_expired_and_missing_tokens_get_their_codes() {
    init_tracing();
    deadline(LIMIT, async {
        let b = Bystander::start().await;
        let other = tube_relay::JwtSecret::generate().unwrap();
        let e = agent_error(&b, |c| {
            c.token = other.mint("mallory", Duration::from_secs(60))
        })
        .await;
        assert_eq!(e.code(), Some(ErrorCode::InvalidToken), "{e}");
        assert_eq!(e.to_string(), "error 1002 INVALID_TOKEN: invalid token");
        let e = agent_error(&b, |c| c.token = "garbage".into()).await;
        assert_eq!(e.code(), Some(ErrorCode::InvalidToken), "{e}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let expired = b.relay.jwt.mint_at("alice", now - 120, now - 60);
        let e = agent_error(&b, |c| c.token = expired).await;
        assert_eq!(e.code(), Some(ErrorCode::TokenExpired), "{e}");
        assert_eq!(e.to_string(), "error 1003 TOKEN_EXPIRED: token expired");
        let e = agent_error(&b, |c| c.token = String::new()).await;
        assert_eq!(e.code(), Some(ErrorCode::AuthFailed), "{e}");
        // The secret never appears in what the agent is told.
        assert!(!e.to_string().contains(&b.relay.token("x")[..20]));
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn wrong_fingerprint_is_refused_by_the_agent() {
    init_tracing();
    deadline(LIMIT, async {
        let b = Bystander::start().await;
        let wrong: Fingerprint = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        let e = agent_error(&b, |c| c.fingerprint = wrong).await;
        assert!(
            matches!(e, tube_agent::AgentError::FingerprintMismatch(_)),
            "{e}"
        );
        assert!(e.to_string().contains("fingerprint does not match"), "{e}");
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn unsupported_protocol_version_is_refused() {
    init_tracing();
    deadline(LIMIT, async {
        let b = Bystander::start().await;
        let e = agent_error(&b, |c| c.protocol_version = "2.0".into()).await;
        assert_eq!(e.code(), Some(ErrorCode::UnsupportedVersion), "{e}");
        assert!(
            e.to_string()
                .starts_with("error 1004 UNSUPPORTED_VERSION: "),
            "{e}"
        );
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn garbage_instead_of_tls_closes_only_that_connection() {
    init_tracing();
    deadline(LIMIT, async {
        let b = Bystander::start().await;
        let mut raw = TcpStream::connect(b.relay.addr).await.unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        raw.write_all(&[0xff; 4096]).await.unwrap();
        let mut buf = Vec::new();
        // The relay answers with at most a TLS alert, then closes.
        let _ = raw.read_to_end(&mut buf).await;
        assert!(buf.len() < 64, "no application data for a non-TLS client");
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn garbage_frames_after_tls_get_protocol_error() {
    init_tracing();
    deadline(LIMIT, async {
        let b = Bystander::start().await;
        let (addr, fp) = (b.relay.addr, b.relay.fingerprint);
        // Before auth: an unknown frame type.
        let mut c = tls_connect(addr, fp).await;
        let _hello = recv_control(&mut c).await.unwrap();
        c.get_mut()
            .write_all(&[0x7f, 0, 0, 0, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        assert_eq!(expect_error(&mut c).await, ErrorCode::ProtocolError as u16);
        // Before auth: valid frame, wrong message.
        let mut c = tls_connect(addr, fp).await;
        let _hello = recv_control(&mut c).await.unwrap();
        let reg = ControlMessage::Register {
            tunnel_info: TunnelInfo::default(),
        };
        send_control(&mut c, &reg).await.unwrap();
        assert_eq!(expect_error(&mut c).await, ErrorCode::ProtocolError as u16);
        // Before auth: JSON that is not a message.
        let mut c = tls_connect(addr, fp).await;
        let _hello = recv_control(&mut c).await.unwrap();
        c.send(Frame::Control(bytes::Bytes::from_static(
            b"{\"type\":\"teleport\"}",
        )))
        .await
        .unwrap();
        assert_eq!(expect_error(&mut c).await, ErrorCode::ProtocolError as u16);
        // After auth: a length of u32::MAX is refused from the header.
        let mut c = authed(addr, fp, &b.relay.token("x")).await;
        c.get_mut()
            .write_all(&[0x02, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        assert_eq!(expect_error(&mut c).await, ErrorCode::ProtocolError as u16);
        // After auth: an agent may not open streams.
        let mut c = authed(addr, fp, &b.relay.token("x")).await;
        c.send(Frame::Open {
            stream: 1,
            tunnel: [0; 16],
            peer: "x".into(),
        })
        .await
        .unwrap();
        assert_eq!(expect_error(&mut c).await, ErrorCode::ProtocolError as u16);
        // After auth: a second auth is a protocol error.
        let mut c = authed(addr, fp, &b.relay.token("x")).await;
        send_control(&mut c, &auth_msg("x", "1.0")).await.unwrap();
        assert_eq!(expect_error(&mut c).await, ErrorCode::ProtocolError as u16);
        b.stop().await;
    })
    .await;
}

// A stream sending beyond its window (4002 FLOW_CONTROL_ERROR) is tested on the mux itself
// (`crates/net/src/mux.rs`), where the test owns the consumer: through a relay, the user's
// kernel buffers return credit at a pace the test cannot control.

#[tokio::test]
async fn silent_clients_are_cut_at_the_handshake_deadline() {
    init_tracing();
    deadline(LIMIT, async {
        let mut cfg = relay_config();
        cfg.handshake_timeout = Duration::from_millis(300);
        let b = Bystander::start_with(cfg).await;
        // TLS done, greeting read, but no auth: error 4004, then close.
        let mut c = tls_connect(b.relay.addr, b.relay.fingerprint).await;
        let _hello = recv_control(&mut c).await.unwrap();
        assert_eq!(
            expect_error(&mut c).await,
            ErrorCode::HandshakeTimeout as u16
        );
        // No TLS at all: closed.
        let mut raw = TcpStream::connect(b.relay.addr).await.unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(raw.read(&mut buf).await, Ok(0) | Err(_)));
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn pending_handshakes_are_capped() {
    init_tracing();
    deadline(LIMIT, async {
        let mut cfg = relay_config();
        cfg.max_handshakes = 2;
        cfg.handshake_timeout = Duration::from_secs(30);
        let relay = TestRelay::start_with(cfg).await;
        // Two silent connections hold both handshake slots.
        let idle1 = TcpStream::connect(relay.addr).await.unwrap();
        let idle2 = TcpStream::connect(relay.addr).await.unwrap();
        // The third is closed at once. (Retry: the relay may not have accepted the first two
        // yet, in which case the third took a slot and a later one is refused.)
        let mut refused = false;
        let mut extra = Vec::new();
        for _ in 0..10 {
            let mut s = TcpStream::connect(relay.addr).await.unwrap();
            let mut b = [0u8; 1];
            match tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    refused = true;
                    break;
                }
                _ => extra.push(s),
            }
        }
        assert!(
            refused,
            "a connection beyond the cap must be closed at once"
        );
        // Once the silent ones go away, agents are served again.
        drop((idle1, idle2, extra));
        let svc = echo_server().await;
        let agent = loop {
            match TestAgent::try_start(relay.agent_config(&[svc.addr])).await {
                Ok(a) => break a,
                Err(_) => tokio::task::yield_now().await,
            }
        };
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn invalid_tunnel_requests_are_refused_without_closing_the_connection() {
    init_tracing();
    deadline(LIMIT, async {
        let b = Bystander::start().await;
        let mut c = authed(b.relay.addr, b.relay.fingerprint, &b.relay.token("x")).await;
        let bad = [
            TunnelInfo {
                name: "udp".into(),
                protocol: "udp".into(),
                ..Default::default()
            },
            TunnelInfo {
                name: "two".into(),
                protocol: "tcp".into(),
                ports: vec![1, 2],
                ..Default::default()
            },
            TunnelInfo {
                name: "n".repeat(200),
                protocol: "tcp".into(),
                ..Default::default()
            },
        ];
        for info in bad {
            send_control(&mut c, &ControlMessage::Register { tunnel_info: info })
                .await
                .unwrap();
            match recv_control(&mut c).await.unwrap() {
                ControlMessage::Error { code, .. } => {
                    assert_eq!(code, ErrorCode::InvalidConfig as u16)
                }
                other => panic!("expected error, got {other:?}"),
            }
        }
        // The same connection can still register a valid tunnel.
        let ok = TunnelInfo {
            name: "ok".into(),
            protocol: "tcp".into(),
            ..Default::default()
        };
        send_control(&mut c, &ControlMessage::Register { tunnel_info: ok })
            .await
            .unwrap();
        assert!(matches!(
            recv_control(&mut c).await.unwrap(),
            ControlMessage::RegisterResponse { .. }
        ));
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_tls_1_2_client_is_refused() {
    init_tracing();
    deadline(LIMIT, async {
        let b = Bystander::start().await;
        // A stock provider: tube's own offers TLS 1.3 suites only.
        let stock = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(stock)
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let tcp = TcpStream::connect(b.relay.addr).await.unwrap();
        let res = TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(tls::server_name(), tcp)
            .await;
        let Err(err) = res else {
            panic!("TLS 1.2 must be refused")
        };
        assert!(
            err.to_string().to_lowercase().contains("protocolversion"),
            "{err}"
        );
        b.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The malformed-input table: every case on its own connection to one shared relay.

/// How far a case's connection gets before its bytes are sent.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// TLS done and `hello` read; no `auth` yet.
    Greeted,
    /// Authenticated (session phase).
    Authed,
    /// Authenticated, with a confirmed tunnel and one user connected to it: the relay has
    /// opened stream 1 (its send credit on it is the default window, 262144).
    Streaming,
}

/// What the relay must do with a case's bytes (docs/protocols/relay.md).
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// `error` with this code as the next frame, then the connection closes.
    Close(ErrorCode),
    /// `error` with this code (after any `heartbeat_response`), and the connection stays.
    Refuse(ErrorCode),
    /// Nothing sent back; the connection stays.
    Ignore,
    /// PONG with the PING's 8 bytes, and the connection stays.
    Pong(u64),
}

struct Case {
    name: &'static str,
    phase: Phase,
    bytes: Vec<u8>,
    expect: Expect,
}

const CONTROL: u8 = 0x00;
const OPEN: u8 = 0x01;
const DATA: u8 = 0x02;
const WINDOW: u8 = 0x03;
const FIN: u8 = 0x04;
const RESET: u8 = 0x05;
const PING: u8 = 0x06;
const PONG: u8 = 0x07;

/// A raw frame whose header claims `len` bytes, followed by `payload` (which may be shorter).
fn raw(kind: u8, stream: u32, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A well-formed frame of `kind` on `stream` carrying `payload`.
fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    raw(kind, stream, payload.len() as u32, payload)
}

/// A CONTROL frame carrying `text`.
fn ctl(text: &str) -> Vec<u8> {
    frame(CONTROL, 0, text.as_bytes())
}

/// A CONTROL frame carrying `msg`.
fn msg(msg: &ControlMessage) -> Vec<u8> {
    frame(CONTROL, 0, &msg.to_bytes())
}

/// An OPEN payload: tunnel id, address length `n`, then `addr`.
fn open_payload(n: u8, addr: &[u8]) -> Vec<u8> {
    let mut v = vec![0xab; 16];
    v.push(n);
    v.extend_from_slice(addr);
    v
}

/// A well-formed heartbeat for tunnel id `t`.
const HEARTBEAT: &str = concat!(
    r#"{"type":"heartbeat","tunnel_id":"t","#,
    r#""stats":{"bytes_in":0,"bytes_out":0,"connected_since":"2026-11-23T21:17:09Z"}}"#
);

/// The table. `relay` mints the tokens the auth cases need.
#[rustfmt::skip] // one case per line
fn cases(relay: &TestRelay) -> Vec<Case> {
    use Expect::*;
    use Phase::*;
    let good = relay.token("table");
    let other = tube_relay::JwtSecret::generate().unwrap().mint("table", Duration::from_secs(60));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let expired = relay.jwt.mint_at("table", now - 120, now - 60);
    let auth_with = |token: &str, version: &str| msg(&auth_msg(token, version));
    let auth_json = |rest: &str| ctl(&format!(r#"{{"type":"auth","token":"{good}"{rest}}}"#));
    let register = |info: &str| ctl(&format!(r#"{{"type":"register","tunnel_info":{info}}}"#));
    let confirm = |id: &str| ctl(&format!(r#"{{"type":"register_confirm","tunnel_id":{id}}}"#));
    let hello = ctl(r#"{"type":"hello","version":"1.0","server_info":{"version":"0"}}"#);
    let long_name = msg(&ControlMessage::Register {
        tunnel_info: TunnelInfo { name: "n".repeat(200), protocol: "tcp".into(), ..Default::default() },
    });
    let ping = 0x0102_0304_0506_0708u64;
    let protocol = Close(ErrorCode::ProtocolError);
    let invalid = Refuse(ErrorCode::InvalidConfig);
    let c = |name, phase, bytes, expect| Case { name, phase, bytes, expect };
    vec![
        // Before auth: framing.
        c("unknown frame type 0x08", Greeted, raw(0x08, 0, 0, &[]), protocol),
        c("unknown frame type 0xff", Greeted, raw(0xff, 0, 4, &[1, 2, 3, 4]), protocol),
        c("CONTROL claiming u32::MAX bytes, header only", Greeted, raw(CONTROL, 0, u32::MAX, &[]), protocol),
        c("CONTROL claiming 65537 bytes, header only", Greeted, raw(CONTROL, 0, 65537, &[]), protocol),
        c("DATA claiming u32::MAX bytes before auth", Greeted, raw(DATA, 1, u32::MAX, &[]), protocol),
        c("empty CONTROL", Greeted, raw(CONTROL, 0, 0, &[]), protocol),
        c("CONTROL on stream 1", Greeted, frame(CONTROL, 1, &auth_msg(&good, "1.0").to_bytes()), protocol),
        // Before auth: the payload.
        c("CONTROL that is not JSON", Greeted, ctl("hello relay"), protocol),
        c("CONTROL that is not UTF-8", Greeted, frame(CONTROL, 0, &[0xff, 0xfe, 0xfd]), protocol),
        c("a JSON array", Greeted, ctl("[]"), protocol),
        c("JSON without a type", Greeted, ctl(r#"{"token":"x","version":"1.0"}"#), protocol),
        c("unknown message type", Greeted, ctl(r#"{"type":"teleport"}"#), protocol),
        c("type that is a number", Greeted, ctl(r#"{"type":5}"#), protocol),
        c("truncated auth JSON", Greeted, ctl(r#"{"type":"auth","token":"abc","vers"#), protocol),
        c("auth token that is a number", Greeted, ctl(r#"{"type":"auth","token":5,"version":"1.0"}"#), protocol),
        c("auth without a token", Greeted, ctl(r#"{"type":"auth","version":"1.0"}"#), protocol),
        c("auth without a version", Greeted, auth_json(""), protocol),
        c("auth version that is a number", Greeted, auth_json(r#","version":1"#), protocol),
        c("auth with a negative window", Greeted, auth_json(r#","version":"1.0","window":-1"#), protocol),
        c("auth with a window above u32", Greeted, auth_json(r#","version":"1.0","window":4294967296"#), protocol),
        c("auth with client_info a string", Greeted, auth_json(r#","version":"1.0","client_info":"x""#), protocol),
        // Before auth: the auth checks.
        c("auth version 2.0", Greeted, auth_with(&good, "2.0"), Close(ErrorCode::UnsupportedVersion)),
        c("auth version 0.9", Greeted, auth_with(&good, "0.9"), Close(ErrorCode::UnsupportedVersion)),
        c("auth with an empty version", Greeted, auth_with(&good, ""), Close(ErrorCode::UnsupportedVersion)),
        c("auth with an empty token", Greeted, auth_with("", "1.0"), Close(ErrorCode::AuthFailed)),
        c("auth with a token that is not a JWT", Greeted, auth_with("garbage", "1.0"), Close(ErrorCode::InvalidToken)),
        c("auth with another relay's token", Greeted, auth_with(&other, "1.0"), Close(ErrorCode::InvalidToken)),
        c("auth with an expired token", Greeted, auth_with(&expired, "1.0"), Close(ErrorCode::TokenExpired)),
        // Before auth: the wrong message or frame.
        c("register before auth", Greeted, register(r#"{"name":"x","protocol":"tcp"}"#), protocol),
        c("heartbeat before auth", Greeted, ctl(HEARTBEAT), protocol),
        c("disconnect before auth", Greeted, ctl(r#"{"type":"disconnect","reason":"bye"}"#), protocol),
        c("error before auth", Greeted, ctl(r#"{"type":"error","code":5000,"message":"x"}"#), protocol),
        c("hello from the agent", Greeted, hello.clone(), protocol),
        c("DATA before auth", Greeted, frame(DATA, 1, b"x"), protocol),
        c("PING before auth", Greeted, frame(PING, 0, &[0; 8]), protocol),
        c("OPEN before auth", Greeted, frame(OPEN, 1, &open_payload(3, b"1:2")), protocol),
        // Session: framing (a wrong length is refused from the header alone).
        c("CONTROL claiming u32::MAX bytes after auth", Authed, raw(CONTROL, 0, u32::MAX, &[]), protocol),
        c("DATA claiming u32::MAX bytes", Authed, raw(DATA, 1, u32::MAX, &[]), protocol),
        c("DATA claiming 32769 bytes", Authed, raw(DATA, 1, 32769, &[]), protocol),
        c("empty DATA", Authed, raw(DATA, 1, 0, &[]), protocol),
        c("DATA on stream 0", Authed, frame(DATA, 0, b"x"), protocol),
        c("WINDOW of 5 bytes", Authed, frame(WINDOW, 1, &[0, 0, 0, 1, 0]), protocol),
        c("WINDOW of 3 bytes", Authed, frame(WINDOW, 1, &[0, 0, 1]), protocol),
        c("WINDOW with increment 0", Authed, frame(WINDOW, 1, &[0; 4]), protocol),
        c("WINDOW on stream 0", Authed, frame(WINDOW, 0, &[0, 0, 0, 1]), protocol),
        c("FIN with a payload", Authed, frame(FIN, 1, &[0]), protocol),
        c("RESET of 3 bytes", Authed, frame(RESET, 1, &[0, 0, 0]), protocol),
        c("RESET of 1 byte", Authed, frame(RESET, 1, &[0]), protocol),
        c("RESET on stream 0", Authed, frame(RESET, 0, &[0x0f, 0xa1]), protocol),
        c("PING of 7 bytes", Authed, frame(PING, 0, &[0; 7]), protocol),
        c("PING on stream 5", Authed, frame(PING, 5, &[0; 8]), protocol),
        c("PONG of 9 bytes", Authed, frame(PONG, 0, &[0; 9]), protocol),
        c("OPEN from the agent", Authed, frame(OPEN, 1, &open_payload(3, b"1:2")), protocol),
        c("OPEN of 16 bytes", Authed, frame(OPEN, 1, &[0xab; 16]), protocol),
        c("OPEN whose address length disagrees", Authed, frame(OPEN, 1, &open_payload(5, b"1:2")), protocol),
        c("OPEN claiming 82 bytes, header only", Authed, raw(OPEN, 1, 82, &[]), protocol),
        c("OPEN with a non-ASCII address", Authed, frame(OPEN, 1, &open_payload(2, "é".as_bytes())), protocol),
        c("OPEN on stream 0", Authed, frame(OPEN, 0, &open_payload(3, b"1:2")), protocol),
        c("unknown frame type after auth", Authed, raw(0x08, 0, 0, &[]), protocol),
        // Session: control messages.
        c("empty CONTROL after auth", Authed, raw(CONTROL, 0, 0, &[]), protocol),
        c("CONTROL that is not JSON after auth", Authed, ctl("{{{"), protocol),
        c("unknown message type after auth", Authed, ctl(r#"{"type":"teleport"}"#), protocol),
        c("a second auth", Authed, auth_with(&good, "1.0"), protocol),
        c("hello from the agent after auth", Authed, hello, protocol),
        c("auth_response from the agent", Authed,
          ctl(r#"{"type":"auth_response","status":"success","server_info":{"version":"0"}}"#), protocol),
        c("register_response from the agent", Authed,
          ctl(r#"{"type":"register_response","status":"success","tunnel_id":"x","config":{"endpoint":"a:1"}}"#),
          protocol),
        c("heartbeat_response from the agent", Authed,
          ctl(r#"{"type":"heartbeat_response","status":"ok","server_time":"x"}"#), protocol),
        c("register asking for port 70000", Authed,
          register(r#"{"name":"x","protocol":"tcp","ports":[70000]}"#), protocol),
        c("register with a numeric name", Authed, register(r#"{"name":7,"protocol":"tcp"}"#), protocol),
        c("register without a protocol", Authed, register(r#"{"name":"x"}"#), protocol),
        c("register without tunnel_info", Authed, ctl(r#"{"type":"register"}"#), protocol),
        c("heartbeat without stats", Authed, ctl(r#"{"type":"heartbeat","tunnel_id":"t"}"#), protocol),
        c("heartbeat with negative bytes_in", Authed,
          ctl(&HEARTBEAT.replace(r#""bytes_in":0"#, r#""bytes_in":-1"#)), protocol),
        c("register_confirm with a numeric tunnel_id", Authed, confirm("42"), protocol),
        // Session: refused requests; the connection stays.
        c("register for udp", Authed, register(r#"{"name":"x","protocol":"udp"}"#), invalid),
        c("register for two ports", Authed,
          register(r#"{"name":"x","protocol":"tcp","ports":[20001,20002]}"#), invalid),
        c("register with a 200-byte name", Authed, long_name, invalid),
        c("register for a port outside the range", Authed,
          register(r#"{"name":"x","protocol":"tcp","ports":[1]}"#), invalid),
        c("register allowing something not a range", Authed,
          register(r#"{"name":"x","protocol":"tcp","allowed_ips":["everyone"]}"#), invalid),
        c("register_confirm of an unknown tunnel", Authed,
          confirm(r#""8fb889f4-a766-48f0-8e58-1c5ebdb9d088""#), invalid),
        c("register_confirm of something not a UUID", Authed, confirm(r#""x""#), invalid),
        c("unknown fields are ignored, the message answered", Authed, confirm(r#""x","colour":"blue""#), invalid),
        c("two heartbeats for one tunnel back to back", Authed, [ctl(HEARTBEAT), ctl(HEARTBEAT)].concat(),
          Refuse(ErrorCode::RateLimit)),
        // Session: ignored frames.
        c("DATA on a stream never opened", Authed, frame(DATA, 7, b"abc"), Ignore),
        c("DATA on stream u32::MAX", Authed, frame(DATA, u32::MAX, b"x"), Ignore),
        c("WINDOW on a stream never opened", Authed, frame(WINDOW, 7, &[0, 0, 0, 1]), Ignore),
        c("FIN on a stream never opened", Authed, frame(FIN, 7, &[]), Ignore),
        c("RESET on a stream never opened", Authed, frame(RESET, 7, &[0x0f, 0xa6]), Ignore),
        c("PONG nobody asked for", Authed, frame(PONG, 0, &[1; 8]), Ignore),
        c("error from the agent", Authed, ctl(r#"{"type":"error","code":4005,"message":"x"}"#), Ignore),
        c("PING", Authed, frame(PING, 0, &ping.to_be_bytes()), Pong(ping)),
        // With an open stream.
        c("WINDOW raising credit above 2^31-1", Streaming, frame(WINDOW, 1, &0x7fff_ffffu32.to_be_bytes()),
          Close(ErrorCode::FlowControlError)),
        c("WINDOW raising credit to exactly 2^31-1", Streaming,
          frame(WINDOW, 1, &(0x7fff_ffff - 262_144u32).to_be_bytes()), Ignore),
        c("OPEN of a stream already open", Streaming, frame(OPEN, 1, &open_payload(3, b"1:2")), protocol),
        c("DATA claiming u32::MAX bytes on an open stream", Streaming, raw(DATA, 1, u32::MAX, &[]), protocol),
    ]
}

/// The next frame, failing the case after 10 s.
async fn next_frame(c: &mut Conn) -> Result<Option<Frame>, String> {
    match tokio::time::timeout(Duration::from_secs(10), c.next()).await {
        Err(_) => Err("nothing from the relay within 10 s".into()),
        Ok(None) | Ok(Some(Err(_))) => Ok(None),
        Ok(Some(Ok(f))) => Ok(Some(f)),
    }
}

/// The next control message (`None`: the connection ended); any other frame fails the case.
async fn next_control(c: &mut Conn) -> Result<Option<ControlMessage>, String> {
    match next_frame(c).await? {
        None => Ok(None),
        Some(Frame::Control(b)) => ControlMessage::from_bytes(&b)
            .map(Some)
            .map_err(|e| format!("relay sent a bad message: {e}")),
        Some(f) => Err(format!("unexpected frame {f:?}")),
    }
}

/// Asks something every session answers (a confirm of a tunnel that does not exist gets
/// 2002): proves the connection still serves, and that nothing else was sent before.
async fn still_serving(c: &mut Conn) -> Result<(), String> {
    let probe = ControlMessage::RegisterConfirm {
        tunnel_id: "00000000-0000-0000-0000-000000000000".into(),
    };
    send_control(c, &probe)
        .await
        .map_err(|e| format!("connection closed: {e}"))?;
    match next_control(c).await? {
        Some(ControlMessage::Error { code, .. }) if code == ErrorCode::InvalidConfig as u16 => {
            Ok(())
        }
        other => Err(format!(
            "probe answered with {other:?}, connection should still serve"
        )),
    }
}

/// A connection in `phase`, plus the user connection that keeps its stream open.
async fn reach(phase: Phase, relay: &TestRelay) -> (Conn, Option<TcpStream>) {
    let (addr, fp) = (relay.addr, relay.fingerprint);
    match phase {
        Phase::Greeted => {
            let mut c = tls_connect(addr, fp).await;
            let hello = recv_control(&mut c).await.unwrap();
            assert!(matches!(hello, ControlMessage::Hello { .. }), "{hello:?}");
            (c, None)
        }
        Phase::Authed => (authed(addr, fp, &relay.token("table")).await, None),
        Phase::Streaming => {
            let mut c = authed(addr, fp, &relay.token("table")).await;
            let info = TunnelInfo {
                name: "table".into(),
                protocol: "tcp".into(),
                ..Default::default()
            };
            send_control(&mut c, &ControlMessage::Register { tunnel_info: info })
                .await
                .unwrap();
            let ControlMessage::RegisterResponse {
                tunnel_id, config, ..
            } = recv_control(&mut c).await.unwrap()
            else {
                panic!("register refused");
            };
            send_control(&mut c, &ControlMessage::RegisterConfirm { tunnel_id })
                .await
                .unwrap();
            let user = TcpStream::connect(config.endpoint.as_str()).await.unwrap();
            match c.next().await {
                Some(Ok(Frame::Open { stream: 1, .. })) => {}
                other => panic!("expected OPEN of stream 1, got {other:?}"),
            }
            (c, Some(user))
        }
    }
}

/// Runs one case on its own connection.
async fn run_case(case: &Case, relay: &TestRelay) -> Result<(), String> {
    let (mut c, _user) = reach(case.phase, relay).await;
    c.get_mut()
        .write_all(&case.bytes)
        .await
        .map_err(|e| format!("write: {e}"))?;
    c.get_mut()
        .flush()
        .await
        .map_err(|e| format!("flush: {e}"))?;
    match case.expect {
        Expect::Close(want) => {
            match next_control(&mut c).await? {
                Some(ControlMessage::Error { code, .. }) if code == want as u16 => {}
                other => return Err(format!("expected error {}, got {other:?}", want as u16)),
            }
            match next_frame(&mut c).await? {
                None => Ok(()),
                Some(f) => Err(format!("expected the close, got {f:?}")),
            }
        }
        Expect::Refuse(want) => {
            loop {
                match next_control(&mut c).await? {
                    Some(ControlMessage::HeartbeatResponse { .. }) => {}
                    Some(ControlMessage::Error { code, .. }) if code == want as u16 => break,
                    other => {
                        return Err(format!("expected error {}, got {other:?}", want as u16));
                    }
                }
            }
            still_serving(&mut c).await
        }
        Expect::Ignore => still_serving(&mut c).await,
        Expect::Pong(v) => match next_frame(&mut c).await? {
            Some(Frame::Pong(p)) if p == v => still_serving(&mut c).await,
            other => Err(format!("expected PONG {v:#x}, got {other:?}")),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_table_gets_exact_codes_and_closes_only_that_connection() {
    init_tracing();
    deadline(LIMIT, async {
        let started = std::time::Instant::now();
        let b = Bystander::start().await;
        // A session opened before the table, idle during it, must serve after it too.
        let mut before = authed(b.relay.addr, b.relay.fingerprint, &b.relay.token("x")).await;
        let table = cases(&b.relay);
        assert!(table.len() >= 40, "{} cases", table.len());
        let relay = &b.relay;
        // Eight at a time: concurrent, and well under the per-source handshake cap (32).
        let failures: Vec<String> = futures_util::stream::iter(&table)
            .map(|case| async move {
                run_case(case, relay)
                    .await
                    .err()
                    .map(|e| format!("{} ({:?}): {e}", case.name, case.phase))
            })
            .buffer_unordered(8)
            .filter_map(std::future::ready)
            .collect()
            .await;
        assert!(
            failures.is_empty(),
            "failed cases:\n{}",
            failures.join("\n")
        );
        still_serving(&mut before).await.unwrap();
        b.check().await;
        println!(
            "{} malformed-input cases passed in {:?}",
            table.len(),
            started.elapsed()
        );
        b.stop().await;
    })
    .await;
}
