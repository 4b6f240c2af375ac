//! Slow and idle clients against a running proxy (raw TCP on 127.0.0.1): a body that stalls
//! gets 408 after `body_timeout` on `POST /`, `/auth` and `/register` and its connection
//! closes; a half-sent header is cut after the listener's header timeout; a long poll held
//! longer than the listener's idle timeout is still answered.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::{Backend, LIMIT, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An answer read off the wire.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Reads one answer with `Content-Length`.
async fn reply(s: &mut TcpStream) -> Reply {
    tokio::time::timeout(LIMIT, async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).await.expect("read an answer");
            assert!(n > 0, "closed before an answer");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let status = head[9..12].parse().expect("a status");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().expect("a length"));
        while buf.len() < end + len {
            let n = s.read(&mut chunk).await.expect("read a body");
            assert!(n > 0, "closed in the middle of a body");
            buf.extend_from_slice(&chunk[..n]);
        }
        Reply {
            status,
            head,
            body: buf[end..end + len].to_vec(),
        }
    })
    .await
    .expect("an answer in time")
}

/// Waits until the proxy closes `s` (end of stream or reset).
async fn closed(s: &mut TcpStream) {
    tube_testkit::read_until_closed(s, LIMIT)
        .await
        .expect("the proxy closes the connection");
}

/// Sends the header and 3 of the 10 body bytes `content-length` announces.
async fn stalled_body(addr: SocketAddr, path: &str, token: Option<&str>) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let head = format!("POST {path} HTTP/1.1\r\nhost: proxy\r\n{auth}content-length: 10\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(b"abc").await.unwrap();
    s
}

#[tokio::test]
async fn a_stalled_body_gets_408_after_the_body_timeout_and_its_connection_closes() {
    let backend = Backend::start("b1").await;
    let mut config = support::config(&[&backend]);
    config.body_timeout = Duration::from_millis(300);
    let proxy = Proxy::start(config).await;
    let token = support::login(&proxy, "alice", None).await;

    for (path, token) in [
        ("/", Some(token.as_str())),
        ("/auth", None),
        ("/register", None),
    ] {
        let started = Instant::now();
        let mut s = stalled_body(proxy.addr, path, token).await;
        let r = reply(&mut s).await;
        assert_eq!(r.status, 408, "{path}: {r:?}");
        assert!(r.head.contains("connection: close"), "{path}: {r:?}");
        assert!(started.elapsed() >= Duration::from_millis(300), "{path}");
        closed(&mut s).await;
    }
    // Nothing of the stalled packet reached the backend.
    assert!(backend.packets().is_empty());
    // A whole packet still goes through.
    let got = support::poll(&proxy, &token, &[], "whole").await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(backend.wait_packets(1).await[0].body, "whole");
}

#[tokio::test]
async fn the_client_listener_cuts_half_headers_but_answers_a_poll_held_past_its_idle_timeout() {
    let backend = Backend::start("b1").await;
    let mut config = support::config(&[&backend]);
    config.poll_timeout = Duration::from_millis(1200);
    config.http.header_timeout = Duration::from_millis(300);
    config.http.idle_timeout = Duration::from_millis(400);
    let proxy = Proxy::start(config).await;
    let token = support::login(&proxy, "alice", None).await;

    let mut half = TcpStream::connect(proxy.addr).await.unwrap();
    half.write_all(b"POST / HTTP/1.1\r\nhost: pro")
        .await
        .unwrap();

    let mut held = TcpStream::connect(proxy.addr).await.unwrap();
    let asked = Instant::now();
    let head = format!(
        "POST / HTTP/1.1\r\nhost: proxy\r\nauthorization: Bearer {token}\r\ncontent-length: 0\r\n\r\n"
    );
    held.write_all(head.as_bytes()).await.unwrap();

    closed(&mut half).await;
    let r = reply(&mut held).await;
    assert_eq!((r.status, r.body.len()), (200, 0), "{r:?}");
    assert!(asked.elapsed() >= Duration::from_millis(1200));
    // Then idle: closed after the idle timeout.
    closed(&mut held).await;
}
