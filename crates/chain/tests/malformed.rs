//! Malformed input against one running hub and one node (issue 8), as a table over the three
//! connections of `docs/protocols/chain.md`: the hub connection (sections 2 to 4: answered with
//! `error`, `register_result` or `auth_result` and the code, then closed; a frame header that
//! claims `u32::MAX` bytes is refused from the header alone), the node's front API (section 8:
//! answered with `error`, the connection stays open) and a hop listener (section 6: closed
//! without a word). Every case has its own connection; a node session, a front connection and a
//! chain in the middle of its build, all opened before the table, still work after it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tube_chain::SqliteAccounts;
use tube_chain::front::FrontClient;
use tube_chain::hub::{Hub, HubConfig, HubState};
use tube_chain::node::{NodeConfig, NodeStats};
use tube_net::codec::{HandshakeConn, handshake_conn};
use tube_net::tokio_rustls::TlsConnector;
use tube_net::tokio_rustls::client::TlsStream;
use tube_net::{Fingerprint, Identity, tls};
use tube_proto::chain::{
    CHAIN_PROTOCOL_VERSION, FrontMessage, HubMessage, decode_line, encode_hop_hello,
    parse_tunnel_id,
};
use tube_proto::frame::Frame;
use tube_testkit::{deadline, init_tracing};

const LIMIT: Duration = Duration::from_secs(60);

/// Longest wait for one answer or one close.
const STEP: Duration = Duration::from_secs(8);

/// A well-formed password or hop secret (64 lowercase hex digits).
const PW: &str = "abababababababababababababababababababababababababababababababab";

/// A well-formed tunnel id that names no chain.
const TID: &str = "8fb889f4-a766-48f0-8e58-1c5ebdb9d088";

fn ip(octet: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet))
}

async fn connect_from(bind: IpAddr, addr: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::new(bind, 0)).expect("bind");
    s.connect(addr).await.expect("connect")
}

/// The bytes of one frame: type, stream, claimed length, then `payload` (which may be shorter
/// than claimed).
fn frame(kind: u8, stream: u32, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend_from_slice(&stream.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// A CONTROL frame carrying `payload`.
fn control(payload: impl AsRef<[u8]>) -> Vec<u8> {
    let p = payload.as_ref();
    frame(0, 0, p.len() as u32, p)
}

// ---- the hub connection ----

type HubConn = HandshakeConn<TlsStream<TcpStream>>;

/// What the hub must answer before closing.
#[derive(Debug, Clone, Copy)]
enum HubAnswer {
    /// `error` with this code.
    Error(u16),
    /// `register_result` refused with this code.
    Register(u16),
    /// `auth_result` refused with this code.
    Auth(u16),
}

struct HubCase {
    name: &'static str,
    /// Register a fresh account on the connection first (the bytes then come after login).
    logged_in: bool,
    bytes: Vec<u8>,
    answer: HubAnswer,
}

fn hub_case(name: &'static str, logged_in: bool, bytes: Vec<u8>, answer: HubAnswer) -> HubCase {
    HubCase {
        name,
        logged_in,
        bytes,
        answer,
    }
}

#[rustfmt::skip]
fn hub_cases() -> Vec<HubCase> {
    use HubAnswer::{Auth, Error, Register};
    let pre = |name, bytes, answer| hub_case(name, false, bytes, answer);
    let post = |name, bytes, answer| hub_case(name, true, bytes, answer);
    let n65 = "n".repeat(65);
    let r257 = "r".repeat(257);
    let upper_pw = PW.to_uppercase();
    let short_pw = &PW[1..];
    let upper_tid = TID.to_uppercase();
    vec![
        pre("control frame claiming u32::MAX bytes, header only", frame(0, 0, u32::MAX, b""), Error(6009)),
        pre("control frame claiming 65537 bytes, header only", frame(0, 0, 65537, b""), Error(6009)),
        pre("unknown frame type 0x7f", frame(0x7f, 0, 0, b""), Error(6009)),
        pre("DATA frame", frame(2, 1, 5, b"hello"), Error(6009)),
        pre("PING frame", frame(6, 0, 8, &[0; 8]), Error(6009)),
        pre("CONTROL frame on stream 1", frame(0, 1, 2, b"{}"), Error(6009)),
        pre("empty CONTROL payload", frame(0, 0, 0, b""), Error(6009)),
        pre("payload is not JSON", control("hello"), Error(6009)),
        pre("payload is not UTF-8", control([0xff, 0xfe, 0x7b]), Error(6009)),
        pre("JSON array", control("[1,2]"), Error(6009)),
        pre("JSON object without type", control(r#"{"name":"x"}"#), Error(6009)),
        pre("unknown type", control(r#"{"type":"hello"}"#), Error(6009)),
        pre("type is a number", control(r#"{"type":7}"#), Error(6009)),
        pre("trailing bytes after the object", control(r#"{"type":"logout"} x"#), Error(6009)),
        pre("register without name", control(r#"{"type":"register","version":"1.0","relay":true}"#), Error(6009)),
        pre("register name with a space", control(r#"{"type":"register","version":"1.0","name":"a b","relay":true}"#), Error(6009)),
        pre("register name of 65 bytes", control(format!(r#"{{"type":"register","version":"1.0","name":"{n65}","relay":true}}"#)), Error(6009)),
        pre("register empty name", control(r#"{"type":"register","version":"1.0","name":"","relay":true}"#), Error(6009)),
        pre("register relay is a string", control(r#"{"type":"register","version":"1.0","name":"x","relay":"yes"}"#), Error(6009)),
        pre("register empty version", control(r#"{"type":"register","version":"","name":"x","relay":true}"#), Error(6009)),
        pre("register invite of 63 hex digits", control(format!(r#"{{"type":"register","version":"1.0","name":"x","relay":true,"invite":"{}"}}"#, "a".repeat(63))), Error(6009)),
        pre("register invite not hex", control(format!(r#"{{"type":"register","version":"1.0","name":"x","relay":true,"invite":"{}"}}"#, "g".repeat(64))), Error(6009)),
        pre("register version 2.0", control(r#"{"type":"register","version":"2.0","name":"v2node","relay":true}"#), Register(6011)),
        pre("register a taken name", control(r#"{"type":"register","version":"1.0","name":"s","relay":true}"#), Register(6002)),
        pre("auth version 0.9", control(format!(r#"{{"type":"auth","version":"0.9","name":"s","password":"{PW}","relay":true}}"#)), Auth(6011)),
        pre("auth password in upper case", control(format!(r#"{{"type":"auth","version":"1.0","name":"s","password":"{upper_pw}","relay":true}}"#)), Error(6009)),
        pre("auth password of 63 digits", control(format!(r#"{{"type":"auth","version":"1.0","name":"s","password":"{short_pw}","relay":true}}"#)), Error(6009)),
        pre("auth unknown name", control(format!(r#"{{"type":"auth","version":"1.0","name":"nobody","password":"{PW}","relay":true}}"#)), Auth(6001)),
        pre("auth wrong password", control(format!(r#"{{"type":"auth","version":"1.0","name":"s","password":"{PW}","relay":true}}"#)), Auth(6001)),
        pre("logout before login", control(r#"{"type":"logout"}"#), Error(6010)),
        pre("password_stored before login", control(r#"{"type":"password_stored"}"#), Error(6010)),
        pre("request_tube before login", control(r#"{"type":"request_tube","id":1,"endpoint_name":"s","local_id":"x"}"#), Error(6010)),
        pre("error before login", control(r#"{"type":"error","code":6009,"message":"x"}"#), Error(6010)),
        pre("request_tube id 2^53 before login", control(r#"{"type":"request_tube","id":9007199254740992,"endpoint_name":"s","local_id":"x"}"#), Error(6009)),
        pre("make_tube (hub to node) from a node", control(format!(r#"{{"type":"make_tube","id":1,"tunnel_id":"{TID}","from":null,"to":"127.0.0.1","secret_in":"{PW}","secret_out":null}}"#)), Error(6009)),
        post("second register", control(r#"{"type":"register","version":"1.0","name":"again","relay":true}"#), Error(6009)),
        post("auth after login", control(format!(r#"{{"type":"auth","version":"1.0","name":"s","password":"{PW}","relay":true}}"#)), Error(6009)),
        post("request_tube id 2^53", control(r#"{"type":"request_tube","id":9007199254740992,"endpoint_name":"s","local_id":"x"}"#), Error(6009)),
        post("request_tube negative id", control(r#"{"type":"request_tube","id":-1,"endpoint_name":"s","local_id":"x"}"#), Error(6009)),
        post("request_tube endpoint name of 65 bytes", control(format!(r#"{{"type":"request_tube","id":1,"endpoint_name":"{n65}","local_id":"x"}}"#)), Error(6009)),
        post("request_tube local_id with a control character", control(r#"{"type":"request_tube","id":1,"endpoint_name":"s","local_id":"a\u0001b"}"#), Error(6009)),
        post("request_close_tube tunnel id in upper case", control(format!(r#"{{"type":"request_close_tube","tunnel_id":"{upper_tid}"}}"#)), Error(6009)),
        post("make_tube_result port 0", control(format!(r#"{{"type":"make_tube_result","id":1,"tunnel_id":"{TID}","is_allowed":true,"port":0,"reason":""}}"#)), Error(6009)),
        post("make_tube_result refused with a port", control(format!(r#"{{"type":"make_tube_result","id":1,"tunnel_id":"{TID}","is_allowed":false,"port":5000,"reason":"no"}}"#)), Error(6009)),
        post("request_connection_result reason of 257 bytes", control(format!(r#"{{"type":"request_connection_result","id":1,"tunnel_id":"{TID}","is_allowed":false,"reason":"{r257}"}}"#)), Error(6009)),
        post("close_tube (hub to node) from a node", control(format!(r#"{{"type":"close_tube","tunnel_id":"{TID}","reason":""}}"#)), Error(6009)),
        post("register_result (hub to node) from a node", control(r#"{"type":"register_result","is_success":false,"message":""}"#), Error(6009)),
        post("control frame claiming u32::MAX bytes after login, header only", frame(0, 0, u32::MAX, b""), Error(6009)),
        post("DATA frame after login", frame(2, 1, 1, b"x"), Error(6009)),
        post("payload is not JSON after login", control("{"), Error(6009)),
    ]
}

/// TLS to the hub from 127.0.0.1, pinned.
async fn hub_conn(addr: SocketAddr, fingerprint: Fingerprint) -> Result<HubConn, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let cfg = tls::pinned_client_config(fingerprint).map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(cfg)
        .connect(tls::server_name(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(handshake_conn(tls))
}

async fn recv_hub(conn: &mut HubConn) -> Result<HubMessage, String> {
    match tokio::time::timeout(STEP, conn.next()).await {
        Err(_) => Err("no answer in time".into()),
        Ok(Some(Ok(Frame::Control(b)))) => HubMessage::from_bytes(&b).map_err(|e| e.to_string()),
        Ok(other) => Err(format!("expected a message, got {other:?}")),
    }
}

async fn run_hub_case(i: usize, case: &HubCase, hub: &TestHub) -> Result<(), String> {
    let mut conn = hub_conn(hub.addr, hub.fingerprint).await?;
    if case.logged_in {
        let register = HubMessage::Register {
            version: CHAIN_PROTOCOL_VERSION.into(),
            name: format!("case{i}"),
            relay: false,
            invite: None,
        };
        conn.send(Frame::Control(register.to_bytes()))
            .await
            .map_err(|e| e.to_string())?;
        match recv_hub(&mut conn).await? {
            HubMessage::RegisterResult {
                is_success: true, ..
            } => {}
            other => return Err(format!("register failed: {other:?}")),
        }
    }
    let io = conn.get_mut();
    io.write_all(&case.bytes).await.map_err(|e| e.to_string())?;
    io.flush().await.map_err(|e| e.to_string())?;
    let got = recv_hub(&mut conn).await?;
    let code = match (case.answer, &got) {
        (HubAnswer::Error(_), HubMessage::Error { code, .. }) => Some(*code),
        (
            HubAnswer::Register(_),
            HubMessage::RegisterResult {
                is_success: false,
                code,
                ..
            },
        ) => *code,
        (
            HubAnswer::Auth(_),
            HubMessage::AuthResult {
                is_success: false,
                code,
                ..
            },
        ) => *code,
        _ => return Err(format!("expected {:?}, got {got:?}", case.answer)),
    };
    let want = match case.answer {
        HubAnswer::Error(c) | HubAnswer::Register(c) | HubAnswer::Auth(c) => c,
    };
    if code != Some(want) {
        return Err(format!("expected code {want}, got {got:?}"));
    }
    match tokio::time::timeout(STEP, conn.next()).await {
        Ok(None) | Ok(Some(Err(_))) => Ok(()),
        Ok(Some(Ok(f))) => Err(format!("expected the close, got {f:?}")),
        Err(_) => Err("the hub did not close the connection".into()),
    }
}

// ---- the front API ----

struct FrontCase {
    name: &'static str,
    line: Vec<u8>,
    code: u16,
}

fn front_case(name: &'static str, mut line: Vec<u8>, code: u16) -> FrontCase {
    line.push(b'\n');
    FrontCase { name, line, code }
}

#[rustfmt::skip]
fn front_cases() -> Vec<FrontCase> {
    let c = |name, line: String, code| front_case(name, line.into_bytes(), code);
    let n65 = "n".repeat(65);
    let l129 = "l".repeat(129);
    let r257 = "r".repeat(257);
    vec![
        c("blank line", String::new(), 6009),
        c("not JSON", "hello".into(), 6009),
        c("empty object", "{}".into(), 6009),
        c("unknown type", r#"{"type":"hello"}"#.into(), 6009),
        c("type is a number", r#"{"type":42}"#.into(), 6009),
        c("JSON array", "[1,2]".into(), 6009),
        c("JSON null", "null".into(), 6009),
        front_case("not UTF-8", vec![0xff, 0xfe, b'{'], 6009),
        c("truncated object", r#"{"type":"list""#.into(), 6009),
        c("trailing bytes after the object", r#"{"type":"list"}{"#.into(), 6009),
        c("request_tube without fields", r#"{"type":"request_tube"}"#.into(), 6009),
        c("endpoint_name with a space", r#"{"type":"request_tube","endpoint_name":"a b","local_id":"x"}"#.into(), 6009),
        c("endpoint_name of 65 bytes", format!(r#"{{"type":"request_tube","endpoint_name":"{n65}","local_id":"x"}}"#), 6009),
        c("empty local_id", r#"{"type":"request_tube","endpoint_name":"s","local_id":""}"#.into(), 6009),
        c("local_id with a control character", r#"{"type":"request_tube","endpoint_name":"s","local_id":"a\u0007"}"#.into(), 6009),
        c("local_id of 129 bytes", format!(r#"{{"type":"request_tube","endpoint_name":"s","local_id":"{l129}"}}"#), 6009),
        c("request_close_tube naming nothing", r#"{"type":"request_close_tube"}"#.into(), 6009),
        c("request_close_tube naming both", format!(r#"{{"type":"request_close_tube","local_id":"x","tunnel_id":"{TID}"}}"#), 6009),
        c("request_close_tube malformed tunnel_id", r#"{"type":"request_close_tube","tunnel_id":"not-a-uuid"}"#.into(), 6009),
        c("request_close_tube unknown local_id", r#"{"type":"request_close_tube","local_id":"nothing"}"#.into(), 6012),
        c("request_close_tube unknown tunnel_id", format!(r#"{{"type":"request_close_tube","tunnel_id":"{TID}"}}"#), 6012),
        c("approve an unknown chain", format!(r#"{{"type":"approve","tunnel_id":"{TID}","is_allowed":true,"reason":""}}"#), 6012),
        c("approve reason of 257 bytes", format!(r#"{{"type":"approve","tunnel_id":"{TID}","is_allowed":false,"reason":"{r257}"}}"#), 6009),
        c("approve is_allowed is a string", format!(r#"{{"type":"approve","tunnel_id":"{TID}","is_allowed":"yes"}}"#), 6009),
        c("listening port 0", format!(r#"{{"type":"listening","tunnel_id":"{TID}","port":0}}"#), 6009),
        c("listening port 70000", format!(r#"{{"type":"listening","tunnel_id":"{TID}","port":70000}}"#), 6009),
        c("listening for an unknown chain", format!(r#"{{"type":"listening","tunnel_id":"{TID}","port":5000}}"#), 6012),
        c("listen (node to front) from a front", format!(r#"{{"type":"listen","tunnel_id":"{TID}"}}"#), 6009),
        c("tubes from a front", r#"{"type":"tubes","items":[]}"#.into(), 6009),
        c("error from a front", r#"{"type":"error","code":6009,"message":""}"#.into(), 6009),
        c("established from a front", format!(r#"{{"type":"established","tunnel_id":"{TID}","local_id":"x","endpoint_user":"s","port":1}}"#), 6009),
        c("tube_result from a front", r#"{"type":"tube_result","local_id":"x","is_allowed":false,"reason":""}"#.into(), 6009),
        c("connection_request from a front", format!(r#"{{"type":"connection_request","tunnel_id":"{TID}","request_user":"s"}}"#), 6009),
        c("closed from a front", format!(r#"{{"type":"closed","tunnel_id":"{TID}","reason":""}}"#), 6009),
        c("line of 65537 bytes", "x".repeat(65537), 6009),
    ]
}

/// Reads the node's next line on a front connection.
async fn front_line(
    rd: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
) -> Result<FrontMessage, String> {
    let mut line = Vec::new();
    match tokio::time::timeout(STEP, rd.read_until(b'\n', &mut line)).await {
        Err(_) => Err("no answer in time".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(0)) => Err("the node closed the connection".into()),
        Ok(Ok(_)) => decode_line(&line).map_err(|e| e.to_string()),
    }
}

async fn run_front_case(case: &FrontCase, api: SocketAddr) -> Result<(), String> {
    let tcp = TcpStream::connect(api).await.map_err(|e| e.to_string())?;
    let (rd, mut wr) = tcp.into_split();
    let mut rd = BufReader::new(rd);
    wr.write_all(&case.line).await.map_err(|e| e.to_string())?;
    match front_line(&mut rd).await? {
        FrontMessage::Error { code, .. } if code == case.code => {}
        other => return Err(format!("expected error {}, got {other:?}", case.code)),
    }
    // The connection stays open and usable.
    wr.write_all(b"{\"type\":\"list\"}\n")
        .await
        .map_err(|e| e.to_string())?;
    match front_line(&mut rd).await? {
        FrontMessage::Tubes { .. } => Ok(()),
        other => Err(format!("after the error, list answered {other:?}")),
    }
}

// ---- a hop listener ----

#[derive(Clone, Copy)]
enum HopEnd {
    /// Keep the connection open after the bytes (the node must close it).
    Stay,
    /// Half-close after the bytes.
    Eof,
}

struct HopCase {
    name: &'static str,
    from: u8,
    bytes: Vec<u8>,
    end: HopEnd,
}

#[rustfmt::skip]
fn hop_cases(tunnel: [u8; 16], secret: [u8; 32], dialer: u8) -> Vec<HopCase> {
    let right = encode_hop_hello(tunnel, secret).to_vec();
    let mut other_tunnel = tunnel;
    other_tunnel[15] ^= 1;
    let mut other_secret = secret;
    other_secret[31] ^= 1;
    let mut version_2 = right.clone();
    version_2[3] = b'2';
    let h = |name, from, bytes, end| HopCase { name, from, bytes, end };
    vec![
        // First: it waits out the node's preamble timeout while the others run.
        h("the right magic, then silence", dialer, right[..4].to_vec(), HopEnd::Stay),
        h("an HTTP request", dialer, b"GET / HTTP/1.1\r\n\r\n".to_vec(), HopEnd::Stay),
        h("magic of version 2", dialer, version_2, HopEnd::Stay),
        h("magic wrong in its third byte", dialer, b"TBX".to_vec(), HopEnd::Stay),
        h("another tunnel id", dialer, encode_hop_hello(other_tunnel, secret).to_vec(), HopEnd::Stay),
        h("a wrong secret", dialer, encode_hop_hello(tunnel, other_secret).to_vec(), HopEnd::Stay),
        h("52 zero bytes", dialer, vec![0; 52], HopEnd::Stay),
        h("the right preamble from another address", 9, right.clone(), HopEnd::Stay),
        h("51 bytes of the right preamble, then end of stream", dialer, right[..51].to_vec(), HopEnd::Eof),
        h("end of stream before any byte", dialer, Vec::new(), HopEnd::Eof),
    ]
}

async fn run_hop_case(case: &HopCase, addr: SocketAddr) -> Result<(), String> {
    let mut s = connect_from(ip(case.from), addr).await;
    // The node may close before everything is written: that is the refusal itself.
    let _ = s.write_all(&case.bytes).await;
    if let HopEnd::Eof = case.end {
        let _ = s.shutdown().await;
    }
    let mut got = Vec::new();
    match tokio::time::timeout(STEP, s.read_to_end(&mut got)).await {
        Err(_) => Err("the node did not close the connection".into()),
        Ok(_) if !got.is_empty() => Err(format!("the node sent {} bytes", got.len())),
        // A clean end of stream or a reset: either way the connection is closed.
        Ok(_) => Ok(()),
    }
}

// ---- the servers ----

struct TestHub {
    addr: SocketAddr,
    fingerprint: Fingerprint,
    state: HubState,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start_hub() -> TestHub {
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::generate(&["localhost"]).expect("identity");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind hub");
    let accounts = SqliteAccounts::open(&dir.path().join("nodes.sqlite3")).expect("accounts");
    let fingerprint = identity.fingerprint();
    let mut config = HubConfig::new(identity, Arc::new(accounts));
    config.intermediates = 0;
    // Every case registers a node of its own, all from 127.0.0.1.
    config.register_limit = tube_proto::ratelimit::RateLimit::per_hour(10_000);
    // The scripted endpoint answers its make_tube only after the hop table.
    config.hop_timeout = Duration::from_secs(40);
    let addr = listener.local_addr().expect("addr");
    let hub = Hub::new(config);
    let state = hub.state();
    let shutdown = CancellationToken::new();
    tokio::spawn(hub.run(listener, shutdown.clone()));
    TestHub {
        addr,
        fingerprint,
        state,
        shutdown,
        _dir: dir,
    }
}

/// The endpoint, played by the test over the hub protocol from 127.0.0.`octet`.
async fn scripted_node(hub: &TestHub, name: &str, octet: u8) -> HubConn {
    let tcp = connect_from(ip(octet), hub.addr).await;
    let cfg = tls::pinned_client_config(hub.fingerprint).expect("tls config");
    let tls = TlsConnector::from(cfg)
        .connect(tls::server_name(), tcp)
        .await
        .expect("tls");
    let mut conn = handshake_conn(tls);
    let register = HubMessage::Register {
        version: CHAIN_PROTOCOL_VERSION.into(),
        name: name.into(),
        relay: false,
        invite: None,
    };
    conn.send(Frame::Control(register.to_bytes()))
        .await
        .expect("send");
    match recv_hub(&mut conn).await {
        Ok(HubMessage::RegisterResult {
            is_success: true, ..
        }) => conn,
        other => panic!("register failed: {other:?}"),
    }
}

async fn send_hub(conn: &mut HubConn, m: HubMessage) {
    conn.send(Frame::Control(m.to_bytes())).await.expect("send");
}

async fn recv_front(f: &mut FrontClient) -> FrontMessage {
    tokio::time::timeout(STEP, f.recv())
        .await
        .expect("front message in time")
        .expect("front message")
}

/// Runs `cases` at most 8 at a time; returns the failures as "name: why" and the time taken.
async fn run_all<'a, C, F>(
    cases: &'a [C],
    run: impl Fn(usize, &'a C) -> F,
    name: impl Fn(&C) -> &'static str,
) -> (Vec<String>, Duration)
where
    F: std::future::Future<Output = Result<(), String>>,
{
    let started = Instant::now();
    let name = &name;
    let results: Vec<_> = futures_util::stream::iter(cases.iter().enumerate())
        .map(|(i, c)| {
            let f = run(i, c);
            async move { f.await.map_err(|e| format!("{}: {e}", name(c))) }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let failed = results.into_iter().filter_map(Result::err).collect();
    (failed, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_table_gets_its_code_and_closes_only_its_own_connection() {
    init_tracing();
    deadline(LIMIT, async {
        let hub = start_hub().await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = NodeConfig::new(
            hub.addr.to_string(),
            hub.fingerprint,
            "a".into(),
            dir.path().to_path_buf(),
        );
        config.bind = ip(2);
        config.hop_timeout = Duration::from_secs(8);
        let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_addr = api.local_addr().unwrap();
        let stats = NodeStats::default();
        let node_stop = CancellationToken::new();
        let _node_guard = node_stop.clone().drop_guard();
        tokio::spawn(tube_chain::node::run_with_stats(
            api,
            config,
            stats.clone(),
            node_stop,
        ));
        let mut sessions = stats.sessions();
        deadline(STEP, sessions.wait_for(|s| s.online))
            .await
            .expect("node logged in");

        // Opened before the table: the endpoint's hub session, a subscribed front, and a chain
        // whose hop listener is waiting for the endpoint.
        let mut s = scripted_node(&hub, "s", 7).await;
        let mut watcher = FrontClient::connect(api_addr).await.unwrap();
        watcher.send(&FrontMessage::Subscribe {}).await.unwrap();
        assert!(matches!(recv_front(&mut watcher).await, FrontMessage::Tubes { .. }));
        let mut owner = FrontClient::connect(api_addr).await.unwrap();
        owner
            .send(&FrontMessage::RequestTube {
                endpoint_name: "s".into(),
                local_id: "probe".into(),
            })
            .await
            .unwrap();
        let (id, tunnel_id) = match recv_hub(&mut s).await.unwrap() {
            HubMessage::RequestConnection { id, tunnel_id, .. } => (id, tunnel_id),
            other => panic!("expected request_connection, got {other:?}"),
        };
        send_hub(
            &mut s,
            HubMessage::RequestConnectionResult {
                id,
                tunnel_id: tunnel_id.clone(),
                is_allowed: true,
                reason: String::new(),
            },
        )
        .await;
        let near_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        loop {
            match recv_front(&mut owner).await {
                FrontMessage::TubeResult {
                    is_allowed: true, ..
                } => {}
                FrontMessage::Listen { tunnel_id: t } if t == tunnel_id => {
                    let port = near_listener.local_addr().unwrap().port();
                    owner
                        .send(&FrontMessage::Listening { tunnel_id: t, port })
                        .await
                        .unwrap();
                    break;
                }
                other => panic!("owner front got {other:?}"),
            }
        }
        let (mut near, _) = near_listener.accept().await.expect("node 0 connects");
        let (make_id, hop_addr, secret) = match recv_hub(&mut s).await.unwrap() {
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

        // The table.
        let hub_table = hub_cases();
        let front_table = front_cases();
        let hop_table = hop_cases(tunnel, secret, 7);
        let total = hub_table.len() + front_table.len() + hop_table.len();
        assert!(total >= 40, "only {total} cases");
        let hop_run = async {
            let started = Instant::now();
            // The silent one waits out the node's preamble timeout; the others run one after
            // the other beside it, so the listener never has more than two unverified.
            let (first, rest) = hop_table.split_first().unwrap();
            let silent = async { run_hop_case(first, hop_addr).await.map_err(|e| format!("{}: {e}", first.name)) };
            let others = async {
                let mut failed = Vec::new();
                for c in rest {
                    if let Err(e) = run_hop_case(c, hop_addr).await {
                        failed.push(format!("{}: {e}", c.name));
                    }
                }
                failed
            };
            let (silent, mut failed) = tokio::join!(silent, others);
            failed.extend(silent.err());
            (failed, started.elapsed())
        };
        let ((hub_failed, hub_time), (front_failed, front_time), (hop_failed, hop_time)) = tokio::join!(
            run_all(&hub_table, |i, c| run_hub_case(i, c, &hub), |c| c.name),
            run_all(&front_table, |_, c| run_front_case(c, api_addr), |c| c.name),
            hop_run,
        );
        println!(
            "chain malformed cases: hub {} in {hub_time:?}, front API {} in {front_time:?}, hop {} in {hop_time:?}",
            hub_table.len(),
            front_table.len(),
            hop_table.len()
        );
        let failed: Vec<_> = hub_failed.into_iter().chain(front_failed).chain(hop_failed).collect();
        assert!(failed.is_empty(), "{} of {total} cases failed:\n{}", failed.len(), failed.join("\n"));

        // Every bad hop connection was counted as refused, and nothing else.
        let want = hop_table.len() as u64;
        deadline(STEP, async {
            while stats.refused_hops() < want {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert_eq!(stats.refused_hops(), want);

        // Only the offending connections closed: the real hop still gets in and carries
        // bytes, the endpoint's session finishes the build, both fronts hear of it, and the
        // node never lost its hub session.
        let mut hop = connect_from(ip(7), hop_addr).await;
        hop.write_all(&encode_hop_hello(tunnel, secret)).await.unwrap();
        hop.write_all(b"after the table").await.unwrap();
        send_hub(
            &mut s,
            HubMessage::MakeTubeResult {
                id: make_id,
                tunnel_id: tunnel_id.clone(),
                is_allowed: true,
                port: None,
                reason: String::new(),
            },
        )
        .await;
        assert!(matches!(
            recv_hub(&mut s).await.unwrap(),
            HubMessage::EstablishConnection { .. }
        ));
        let mut buf = [0u8; 15];
        near.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"after the table");
        near.write_all(b"and back").await.unwrap();
        let mut back = [0u8; 8];
        hop.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"and back");
        for f in [&mut owner, &mut watcher] {
            loop {
                if let FrontMessage::Established { tunnel_id: t, .. } = recv_front(f).await {
                    assert_eq!(t, tunnel_id);
                    break;
                }
            }
        }
        watcher.send(&FrontMessage::List {}).await.unwrap();
        match recv_front(&mut watcher).await {
            FrontMessage::Tubes { items } => {
                assert_eq!(items.len(), 1);
                assert_eq!(items[0].tunnel_id, tunnel_id);
            }
            other => panic!("expected tubes, got {other:?}"),
        }
        let now = *stats.sessions().borrow();
        assert!(now.online, "node still online");
        assert_eq!(now.logins, 1, "node never reconnected");
        assert_eq!(hub.state.online(), vec!["a".to_string(), "s".to_string()]);
    })
    .await;
}
