//! Malformed input against one running proxy (issue 8): a table of raw HTTP requests, each on
//! its own TCP connection, covering `docs/protocols/longpoll.md` section 1 (bad, missing or
//! unknown tokens, bad `Permissions`, `Seq`, `Ack`, `To`, oversized bodies and the limits of
//! section 5), wrong methods and paths, HTTP that does not parse, and backend answers outside
//! the contract of section 2 (answered 502 on `/auth`; for packets, dropped and counted). A
//! `Content-Length` of `u32::MAX` is refused from the header alone. Each case checks its status
//! and whether its connection stays usable; a keep-alive connection opened before the table
//! still works after it.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use support::{LIMIT, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tube_longpoll::LongpollConfig;

/// Longest wait for one answer or one close.
const STEP: Duration = Duration::from_secs(8);

/// The proxy's `max_body`.
const MAX_BODY: usize = 8192;

/// The proxy's `poll_timeout`: requests whose packet gets no answer return empty after it.
const POLL: Duration = Duration::from_secs(2);

// ---- a backend that keeps the contract for most users and breaks it on purpose ----

fn answer(status: StatusCode, body: impl Into<Body>, headers: &[(&str, &str)]) -> Response {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            r.headers_mut().insert(k, v);
        }
    }
    r
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// `Type: Auth` / `Register`: the body is `user:secret`; some users get answers outside the
/// contract. `Type: Packet`: echoes, except for bodies that ask for a broken answer.
async fn backend(headers: HeaderMap, body: Bytes) -> Response {
    let ok = StatusCode::OK;
    match header(&headers, "type") {
        "Auth" | "Register" => {
            let text = String::from_utf8_lossy(&body).into_owned();
            let (user, pass) = text.split_once(':').unwrap_or((&text, ""));
            if pass != "secret" {
                return answer(StatusCode::UNAUTHORIZED, "bad login", &[]);
            }
            if header(&headers, "permissions").contains("Accept-Debug") {
                return answer(StatusCode::FORBIDDEN, "not a debug server", &[]);
            }
            let token = format!("{user}-token");
            match user {
                "noid" => answer(ok, token, &[]),
                "badid" => answer(ok, token, &[("client-id", "a b")]),
                "badtoken" => answer(ok, "tok en", &[("client-id", user)]),
                "longtoken" => answer(ok, "t".repeat(257), &[("client-id", user)]),
                "hugetoken" => answer(ok, "t".repeat(MAX_BODY + 1), &[("client-id", user)]),
                "badperm" => answer(ok, token, &[("client-id", user), ("permissions", "a;b")]),
                "redirect" => answer(StatusCode::FOUND, "", &[("location", "/elsewhere")]),
                "teapot" => answer(StatusCode::IM_A_TEAPOT, "", &[]),
                _ => answer(ok, token, &[("client-id", user)]),
            }
        }
        "Packet" if body.is_empty() => {
            // Holds the fetch a while, as a long-polling backend does; never pushes.
            tokio::time::sleep(Duration::from_secs(1)).await;
            answer(ok, "", &[])
        }
        "Packet" => {
            let from = header(&headers, "from").to_owned();
            match &body[..] {
                b"bad-to" => answer(ok, "x", &[("to", "a b")]),
                b"to-nobody" => answer(ok, "x", &[("to", "nobody")]),
                b"refuse" => answer(StatusCode::BAD_REQUEST, "no", &[]),
                b"teapot" => answer(StatusCode::IM_A_TEAPOT, "", &[]),
                b"big" => answer(ok, vec![b'b'; MAX_BODY + 1], &[("to", &from)]),
                _ => {
                    let echo = [b"echo:", &body[..]].concat();
                    answer(ok, echo, &[("to", &from)])
                }
            }
        }
        _ => answer(StatusCode::BAD_REQUEST, "no Type", &[]),
    }
}

async fn start_backend(stop: CancellationToken) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = l.local_addr().expect("addr");
    let app = Router::new().fallback(backend);
    tokio::spawn(async move {
        let _ = axum::serve(l, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    addr
}

// ---- raw HTTP ----

/// One HTTP/1.1 request with `Content-Length` (unless a header of the case replaces it).
fn req(method: &str, path: &str, headers: &[(&str, &[u8])], body: &[u8]) -> Vec<u8> {
    let mut b = format!("{method} {path} HTTP/1.1\r\nhost: proxy\r\n").into_bytes();
    if !headers.iter().any(|(k, _)| {
        k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding")
    }) {
        b.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    for (k, v) in headers {
        b.extend_from_slice(k.as_bytes());
        b.extend_from_slice(b": ");
        b.extend_from_slice(v);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(b"\r\n");
    b.extend_from_slice(body);
    b
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A client connection that keeps what it read past one answer.
struct Conn {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Result<Conn, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        Ok(Conn {
            tcp,
            buf: Vec::new(),
        })
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.tcp.write_all(bytes).await.map_err(|e| e.to_string())
    }

    /// Reads more bytes; false at the end of the stream.
    async fn fill(&mut self) -> Result<bool, String> {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(STEP, self.tcp.read(&mut chunk)).await {
            Err(_) => Err("no answer in time".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(0)) => Ok(false),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
        }
    }

    /// Reads until `n` bytes are buffered, then takes them.
    async fn take(&mut self, n: usize) -> Result<Vec<u8>, String> {
        while self.buf.len() < n {
            if !self.fill().await? {
                return Err("closed in the middle of an answer".into());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads up to and including the next CRLF; returns the line without it.
    async fn line(&mut self) -> Result<String, String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.take(i + 2).await?;
                return Ok(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            if !self.fill().await? {
                return Err("closed before a full line".into());
            }
        }
    }

    async fn reply(&mut self) -> Result<Reply, String> {
        let status_line = self.line().await?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let mut headers = Vec::new();
        loop {
            let l = self.line().await?;
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').ok_or("bad header line")?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        let mut reply = Reply {
            status,
            headers,
            body: Vec::new(),
        };
        if let Some(n) = reply.header("content-length") {
            let n = n.parse().map_err(|_| "bad content-length")?;
            reply.body = self.take(n).await?;
        } else if reply.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = self.line().await?;
                let size = usize::from_str_radix(size.trim(), 16).map_err(|_| "bad chunk")?;
                let chunk = self.take(size + 2).await?;
                reply.body.extend_from_slice(&chunk[..size]);
                if size == 0 {
                    break;
                }
            }
        }
        Ok(reply)
    }

    /// Whether the server closed the connection (rather than answering one more request).
    async fn closed(&mut self) -> Result<bool, String> {
        // A request of our own that would be answered 404 on a connection still open.
        let _ = self.send(&req("POST", "/nope", &[], b"")).await;
        match self.reply().await {
            Ok(r) if r.status == 404 => Ok(false),
            Ok(r) => Err(format!("the follow-up request got {}", r.status)),
            Err(e) if e.starts_with("closed") => Ok(true),
            Err(e) if e.contains("reset") || e.contains("Broken pipe") => Ok(true),
            Err(e) => Err(e),
        }
    }
}

// ---- the table ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// The connection answers another request.
    Kept,
    /// The server closed the connection.
    Closed,
}

struct HttpCase {
    name: &'static str,
    request: Vec<u8>,
    status: u16,
    retry_after: Option<&'static str>,
    after: After,
}

fn case(name: &'static str, request: Vec<u8>, status: u16, after: After) -> HttpCase {
    HttpCase {
        name,
        request,
        status,
        retry_after: None,
        after,
    }
}

/// Tokens the table uses: `mallory` (a plain client), a token per backend-answer case, and
/// `victim`, a live client that is not a debug server.
struct Tokens {
    mallory: String,
    packets: Vec<String>,
}

#[rustfmt::skip]
fn cases(t: &Tokens) -> Vec<HttpCase> {
    use After::{Closed, Kept};
    let bearer = format!("Bearer {}", t.mallory).into_bytes();
    let auth = |extra: &[(&str, &[u8])], body: &[u8]| {
        let mut h: Vec<(&str, &[u8])> = vec![("authorization", &bearer)];
        h.extend_from_slice(extra);
        req("POST", "/", &h, body)
    };
    let long_token = format!("Bearer {}", "t".repeat(257));
    let long_id = "i".repeat(257);
    let perm65 = "p".repeat(65);
    let perms17 = (0..17).map(|i| format!("p{i}")).collect::<Vec<_>>().join(",");
    let packet = |i: usize, body: &[u8]| {
        let bearer = format!("Bearer {}", t.packets[i]);
        req("POST", "/", &[("authorization", bearer.as_bytes())], body)
    };
    let login = |user: &str| req("POST", "/auth", &[], format!("{user}:secret").as_bytes());
    let headers200: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
    let mut too_many_headers = b"POST / HTTP/1.1\r\nhost: proxy\r\ncontent-length: 0\r\n".to_vec();
    too_many_headers.extend_from_slice(headers200.as_bytes());
    too_many_headers.extend_from_slice(b"\r\n");
    let mut chunked_big = req("POST", "/", &[("authorization", &bearer), ("transfer-encoding", b"chunked")], b"");
    for _ in 0..3 {
        chunked_big.extend_from_slice(format!("{:x}\r\n", 4096).as_bytes());
        chunked_big.extend_from_slice(&[b'c'; 4096]);
        chunked_big.extend_from_slice(b"\r\n");
    }
    chunked_big.extend_from_slice(b"0\r\n\r\n");
    let busy = |name, request, status, retry| HttpCase { name, request, status, retry_after: Some(retry), after: Kept };
    vec![
        // POST /: the token.
        case("no Authorization", req("POST", "/", &[], b"x"), 401, Kept),
        case("Basic instead of Bearer", req("POST", "/", &[("authorization", b"Basic YTpi")], b"x"), 401, Kept),
        case("Bearer without a token", req("POST", "/", &[("authorization", b"Bearer")], b"x"), 401, Kept),
        case("token of 257 characters", req("POST", "/", &[("authorization", long_token.as_bytes())], b"x"), 401, Kept),
        case("token with a space", req("POST", "/", &[("authorization", b"Bearer a b")], b"x"), 401, Kept),
        case("token with a comma", req("POST", "/", &[("authorization", b"Bearer a,b")], b"x"), 401, Kept),
        case("token with a byte over 0x7f", req("POST", "/", &[("authorization", b"Bearer a\xffb")], b"x"), 401, Kept),
        case("unknown token", req("POST", "/", &[("authorization", b"Bearer nobody-token")], b"x"), 401, Kept),
        // POST /: Seq, Ack, To.
        case("Seq not a number", auth(&[("seq", b"abc")], b"x"), 400, Kept),
        case("Seq negative", auth(&[("seq", b"-1")], b"x"), 400, Kept),
        case("Seq of u64::MAX + 1", auth(&[("seq", b"18446744073709551616")], b"x"), 400, Kept),
        case("Seq of 21 digits", auth(&[("seq", b"000000000000000000001")], b"x"), 400, Kept),
        case("Seq empty", auth(&[("seq", b"")], b"x"), 400, Kept),
        case("Seq of two numbers", auth(&[("seq", b"1 2")], b"x"), 400, Kept),
        case("Seq in hex", auth(&[("seq", b"0x10")], b"x"), 400, Kept),
        case("Ack not a number", auth(&[("ack", b"x")], b""), 400, Kept),
        case("Ack with a fraction", auth(&[("ack", b"1.5")], b""), 400, Kept),
        case("Ack with a sign", auth(&[("ack", b"+1")], b""), 400, Kept),
        case("Ack over u64::MAX", auth(&[("ack", b"99999999999999999999")], b""), 400, Kept),
        case("To with a space", auth(&[("to", b"a b")], b"x"), 400, Kept),
        case("To of 257 characters", auth(&[("to", long_id.as_bytes())], b"x"), 400, Kept),
        case("To empty", auth(&[("to", b"")], b"x"), 400, Kept),
        case("Debug with a comma", auth(&[("debug", b"a,b")], b"x"), 400, Kept),
        case("To names no live client", auth(&[("to", b"nobody")], b"x"), 404, Kept),
        case("To names a client that is not a debug server", auth(&[("to", b"victim")], b"x"), 403, Kept),
        // POST /: limits.
        case("body over max_body", auth(&[], &vec![b'b'; MAX_BODY + 1]), 413, Closed),
        case("Content-Length of u32::MAX, header only", auth(&[("content-length", b"4294967295")], b""), 413, Closed),
        case("chunked body over max_body", chunked_big, 413, Closed),
        busy("packet over the proxy's total buffer", auth(&[], &vec![b'b'; 7000]), 503, "5"),
        busy("packet over the client's buffer", auth(&[], &vec![b'b'; 3000]), 429, "1"),
        // /auth and /register.
        case("Permissions with a space in a code", req("POST", "/auth", &[("permissions", b"a b")], b"u:secret"), 400, Kept),
        case("Permissions code of 65 characters", req("POST", "/auth", &[("permissions", perm65.as_bytes())], b"u:secret"), 400, Kept),
        case("Permissions with 17 codes", req("POST", "/auth", &[("permissions", perms17.as_bytes())], b"u:secret"), 400, Kept),
        case("register Permissions with a semicolon", req("POST", "/register", &[("permissions", b"read;write")], b"u:secret"), 400, Kept),
        case("auth wrong password", req("POST", "/auth", &[], b"u:wrong"), 401, Kept),
        case("auth asks for a permission not granted", req("POST", "/auth", &[("permissions", b"Accept-Debug")], b"u:secret"), 403, Kept),
        case("auth body over max_body", req("POST", "/auth", &[], &vec![b'a'; MAX_BODY + 1]), 413, Closed),
        case("register Content-Length of u32::MAX, header only", req("POST", "/register", &[("content-length", b"4294967295")], b""), 413, Closed),
        // Backend answers to /auth outside the contract.
        case("backend grants without Client-Id", login("noid"), 502, Kept),
        case("backend Client-Id with a space", login("badid"), 502, Kept),
        case("backend token with a space", login("badtoken"), 502, Kept),
        case("backend token of 257 characters", login("longtoken"), 502, Kept),
        case("backend token over max_body", login("hugetoken"), 502, Kept),
        case("backend Permissions malformed", login("badperm"), 502, Kept),
        case("backend answers 302", login("redirect"), 502, Kept),
        case("backend answers 418", login("teapot"), 502, Kept),
        // Backend answers to packets outside the contract: the packet is stored (200), its
        // answer dropped and counted, so the request returns empty after the poll timeout.
        case("backend answer with a malformed To", packet(0, b"bad-to"), 200, Kept),
        case("backend answer To a client nobody knows", packet(1, b"to-nobody"), 200, Kept),
        case("backend answers 400 to a packet", packet(2, b"refuse"), 200, Kept),
        case("backend answers 418 to a packet", packet(3, b"teapot"), 200, Kept),
        case("backend answer over max_body", packet(4, b"big"), 200, Kept),
        // Methods and paths.
        case("GET /", req("GET", "/", &[], b""), 405, Kept),
        case("DELETE /", req("DELETE", "/", &[], b""), 405, Kept),
        case("PUT /auth", req("PUT", "/auth", &[], b""), 405, Kept),
        case("GET /register", req("GET", "/register", &[], b""), 405, Kept),
        case("POST /nothing", req("POST", "/nothing", &[], b""), 404, Kept),
        case("POST /auth/ with a trailing slash", req("POST", "/auth/", &[], b""), 404, Kept),
        // HTTP that does not parse.
        case("not HTTP", b"hello there\r\n\r\n".to_vec(), 400, Closed),
        case("unknown HTTP version", b"POST / HTTP/3.0\r\nhost: proxy\r\n\r\n".to_vec(), 400, Closed),
        case("header name with a space", b"POST / HTTP/1.1\r\nhost: proxy\r\nbad header: x\r\n\r\n".to_vec(), 400, Closed),
        case("Content-Length not a number", req("POST", "/", &[("content-length", b"abc")], b""), 400, Closed),
        case("two different Content-Lengths", b"POST / HTTP/1.1\r\nhost: proxy\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nxy".to_vec(), 400, Closed),
        case("200 headers", too_many_headers, 431, Closed),
        case("chunk size not hex", req("POST", "/", &[("authorization", &bearer), ("transfer-encoding", b"chunked")], b"zz\r\nabc\r\n0\r\n\r\n"), 400, Closed),
    ]
}

async fn run_case(case: &HttpCase, addr: SocketAddr) -> Result<(), String> {
    let mut c = Conn::open(addr).await?;
    // The server may answer before it read everything (a refusal from the header alone).
    let _ = c.send(&case.request).await;
    let r = c.reply().await?;
    if r.status != case.status {
        let body = String::from_utf8_lossy(&r.body);
        return Err(format!(
            "expected {}, got {} {body:?}",
            case.status, r.status
        ));
    }
    if r.header("retry-after") != case.retry_after {
        return Err(format!("Retry-After {:?}", r.header("retry-after")));
    }
    if r.status == 200 && (!r.body.is_empty() || r.header("more") != Some("0")) {
        return Err(format!("expected an empty answer with More: 0, got {r:?}"));
    }
    let closed = c.closed().await?;
    let after = if closed { After::Closed } else { After::Kept };
    if after != case.after {
        return Err(format!("connection {after:?}, expected {:?}", case.after));
    }
    Ok(())
}

/// Logs `user` in through the proxy; returns the token.
async fn login(addr: SocketAddr, user: &str) -> String {
    let mut c = Conn::open(addr).await.expect("connect");
    let body = format!("{user}:secret");
    c.send(&req("POST", "/auth", &[], body.as_bytes()))
        .await
        .expect("send");
    let r = c.reply().await.expect("auth answer");
    assert_eq!(r.status, 200, "login {user}: {r:?}");
    String::from_utf8(r.body).expect("token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_table_gets_its_status_and_closes_only_its_own_connection() {
    let test = async {
        let stop = CancellationToken::new();
        let _stop = stop.clone().drop_guard();
        let backend = start_backend(stop).await;
        let mut config = LongpollConfig::new(vec![format!("http://{backend}/in")]);
        config.poll_timeout = POLL;
        config.backend_timeout = Duration::from_secs(5);
        config.max_body = MAX_BODY;
        config.max_client_bytes = 2000;
        config.max_total_bytes = 6000;
        let proxy = Proxy::start(config).await;

        // Before the table: a client on a keep-alive connection that has made one request.
        let alice = login(proxy.addr, "alice").await;
        let mut kept = Conn::open(proxy.addr).await.unwrap();
        let bearer = format!("Bearer {alice}");
        let hello = req(
            "POST",
            "/",
            &[("authorization", bearer.as_bytes())],
            b"before",
        );
        kept.send(&hello).await.unwrap();
        let r = kept.reply().await.unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"echo:before"[..]));

        login(proxy.addr, "victim").await;
        let mut packets = Vec::new();
        for i in 0..5 {
            packets.push(login(proxy.addr, &format!("p{i}")).await);
        }
        let tokens = Tokens {
            mallory: login(proxy.addr, "mallory").await,
            packets,
        };
        let table = cases(&tokens);
        let count = table.len();
        assert!(count >= 40, "only {count} cases");
        let started = Instant::now();
        let mut running = JoinSet::new();
        for c in table {
            let addr = proxy.addr;
            running.spawn(async move {
                run_case(&c, addr)
                    .await
                    .map_err(|e| format!("{}: {e}", c.name))
            });
        }
        let results = running.join_all().await;
        println!(
            "longpoll malformed cases: {count} in {:?}",
            started.elapsed()
        );
        let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
        assert!(
            failed.is_empty(),
            "{} of {count} cases failed:\n{}",
            failed.len(),
            failed.join("\n")
        );

        // Every broken packet answer was dropped and counted, nothing else.
        let counted = async {
            loop {
                let refused = proxy.metric("tube_longpoll_packets_refused_total").await;
                let undeliverable = proxy.metric("tube_longpoll_undeliverable_total").await;
                if refused >= 3.0 && undeliverable >= 2.0 {
                    return (refused, undeliverable);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let counts = tokio::time::timeout(STEP, counted)
            .await
            .expect("answers counted");
        assert_eq!(counts, (3.0, 2.0), "(refused, undeliverable)");
        // Only the offending connections closed: the connection opened before still works.
        let again = req(
            "POST",
            "/",
            &[("authorization", bearer.as_bytes())],
            b"after",
        );
        kept.send(&again).await.unwrap();
        let r = kept.reply().await.unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"echo:after"[..]));
    };
    match tokio::time::timeout(LIMIT * 3, test).await {
        Ok(()) => {}
        Err(_) => panic!("test did not finish within {:?}", LIMIT * 3),
    }
}
