//! `tube_net::http::serve` against raw TCP clients on 127.0.0.1: a half-sent header is cut
//! after the header timeout, connections beyond the cap are closed at once, an idle kept-alive
//! connection is closed after the idle timeout while a request held longer is answered in
//! full, a client that stops reading a response is closed after the write timeout, and shutdown
//! finishes requests in progress but not stuck connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tube_net::http::{HttpLimits, serve};
use tube_testkit::read_until_closed;

/// Bound of every wait in these tests.
const LIMIT: Duration = Duration::from_secs(10);

/// The answer of `GET /held`, long enough to take several writes.
const HELD_BODY: usize = 256 * 1024;

/// A server on port 0; cancelled when dropped.
struct Server {
    addr: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Server {
    async fn start(router: Router, limits: HttpLimits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(listener, router, limits, stop.clone()));
        Server {
            addr,
            stop,
            task: Some(task),
        }
    }

    /// Cancels the server and waits for `serve` to return.
    async fn stop(mut self) {
        self.stop.cancel();
        let task = self.task.take().unwrap();
        tube_net::timer::timeout(LIMIT, task)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What `/held` signals and waits for.
#[derive(Default)]
struct Hold {
    /// Notified (a stored permit) when a `/held` request reaches its handler.
    started: Notify,
    /// Answers a `/held` request before its time.
    release: Notify,
}

/// `/hello` answers at once; `/held` answers after `hold` (or when released, whichever comes
/// first), with a large body.
fn router(hold: Duration, signals: Arc<Hold>) -> Router {
    Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route(
            "/held",
            get(move || {
                let signals = signals.clone();
                async move {
                    signals.started.notify_one();
                    let release = signals.release.notified();
                    tokio::select! {
                        _ = tube_net::timer::sleep(hold) => {}
                        _ = release => {}
                    }
                    vec![b'h'; HELD_BODY]
                }
            }),
        )
}

fn limits(header: Duration, idle: Duration, max: usize) -> HttpLimits {
    HttpLimits {
        header_timeout: header,
        idle_timeout: idle,
        max_connections: max,
        ..HttpLimits::default()
    }
}

fn request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").into_bytes()
}

/// Reads one response (with `Content-Length`); returns its status and body.
async fn response(s: &mut TcpStream) -> (u16, Vec<u8>) {
    tube_net::timer::timeout(LIMIT, async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).await.expect("read a response");
            assert!(n > 0, "closed before a response");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let status = head[9..12].parse().unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().unwrap())
            .expect("content-length");
        while buf.len() < head_end + len {
            let n = s.read(&mut chunk).await.expect("read a body");
            assert!(n > 0, "closed in the middle of a body");
            buf.extend_from_slice(&chunk[..n]);
        }
        (status, buf[head_end..head_end + len].to_vec())
    })
    .await
    .expect("a response in time")
}

/// Waits until the server closes `s` (end of stream or reset); the time it took.
async fn closed(s: &mut TcpStream) -> Duration {
    let start = Instant::now();
    read_until_closed(s, LIMIT)
        .await
        .expect("the server closes the connection");
    start.elapsed()
}

/// Whether the server has neither sent anything on `s` nor closed it (yet).
fn still_open(s: &TcpStream) -> bool {
    let mut chunk = [0u8; 16];
    matches!(s.try_read(&mut chunk), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[tokio::test]
async fn a_half_sent_header_is_cut_after_the_header_timeout_while_other_requests_are_answered() {
    let header = Duration::from_millis(300);
    let notify = Arc::new(Hold::default());
    let server = Server::start(
        router(LIMIT, notify),
        limits(header, Duration::from_secs(60), 100),
    )
    .await;

    let started = Instant::now();
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /hello HTTP/1.1\r\nhost: te")
        .await
        .unwrap();

    let mut other = TcpStream::connect(server.addr).await.unwrap();
    other.write_all(&request("/hello")).await.unwrap();
    assert_eq!(response(&mut other).await, (200, b"hello".to_vec()));
    assert!(still_open(&slow) || started.elapsed() >= header);

    closed(&mut slow).await;
    assert!(
        started.elapsed() >= header,
        "closed after {:?}, before the header timeout",
        started.elapsed()
    );
    // The answered connection is kept alive and still works.
    other.write_all(&request("/hello")).await.unwrap();
    assert_eq!(response(&mut other).await, (200, b"hello".to_vec()));
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once_and_those_within_keep_working() {
    let notify = Arc::new(Hold::default());
    // Timeouts far beyond the test: only the cap can close a connection here.
    let server = Server::start(
        router(LIMIT, notify),
        limits(Duration::from_secs(60), Duration::from_secs(60), 2),
    )
    .await;

    let mut within = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        // An answer proves the connection was accepted and holds a slot.
        s.write_all(&request("/hello")).await.unwrap();
        assert_eq!(response(&mut s).await, (200, b"hello".to_vec()));
        within.push(s);
    }
    for _ in 0..3 {
        let mut beyond = TcpStream::connect(server.addr).await.unwrap();
        let _ = beyond.write_all(&request("/hello")).await;
        let took = closed(&mut beyond).await;
        assert!(took < Duration::from_secs(5), "closed only after {took:?}");
    }
    for s in &mut within {
        s.write_all(&request("/hello")).await.unwrap();
        assert_eq!(response(s).await, (200, b"hello".to_vec()));
    }

    // A closed connection frees its slot: a new one is served (once the server has seen the
    // close; until then new ones are closed, which is what the loop waits out).
    drop(within.pop());
    tube_net::timer::timeout(LIMIT, async {
        loop {
            let mut s = TcpStream::connect(server.addr).await.unwrap();
            if s.write_all(&request("/hello")).await.is_err() {
                continue;
            }
            let mut first = [0u8; 1];
            if matches!(s.peek(&mut first).await, Ok(1)) {
                assert_eq!(response(&mut s).await, (200, b"hello".to_vec()));
                return;
            }
        }
    })
    .await
    .expect("a freed slot is used again");
    server.stop().await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout_but_a_longer_held_request_is_answered()
{
    let header = Duration::from_millis(200);
    let idle = Duration::from_millis(800);
    let hold = Duration::from_millis(1500);
    let notify = Arc::new(Hold::default());
    let server = Server::start(router(hold, notify), limits(header, idle, 100)).await;

    let mut held = TcpStream::connect(server.addr).await.unwrap();
    let asked = Instant::now();
    held.write_all(&request("/held")).await.unwrap();

    let mut kept = TcpStream::connect(server.addr).await.unwrap();
    kept.write_all(&request("/hello")).await.unwrap();
    assert_eq!(response(&mut kept).await, (200, b"hello".to_vec()));
    // Idle from here: closed after the idle timeout, not the (shorter) header timeout.
    let took = closed(&mut kept).await;
    assert!(
        took >= idle - Duration::from_millis(100),
        "closed after {took:?}"
    );

    let (status, body) = response(&mut held).await;
    assert_eq!((status, body.len()), (200, HELD_BODY));
    assert!(body.iter().all(|b| *b == b'h'));
    assert!(asked.elapsed() >= hold);
    // Kept alive after the long request: the next one is answered too.
    held.write_all(&request("/hello")).await.unwrap();
    assert_eq!(response(&mut held).await, (200, b"hello".to_vec()));
    server.stop().await;
}

#[tokio::test]
async fn shutdown_finishes_a_request_in_progress_and_closes_idle_connections() {
    let hold = Arc::new(Hold::default());
    let server = Server::start(
        router(LIMIT * 2, hold.clone()),
        HttpLimits {
            shutdown_grace: LIMIT,
            ..HttpLimits::default()
        },
    )
    .await;
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(&request("/hello")).await.unwrap();
    assert_eq!(response(&mut idle).await, (200, b"hello".to_vec()));
    let mut busy = TcpStream::connect(server.addr).await.unwrap();
    busy.write_all(&request("/held")).await.unwrap();
    tube_net::timer::timeout(LIMIT, hold.started.notified())
        .await
        .expect("the held request reaches its handler");
    server.stop.cancel();
    closed(&mut idle).await;
    hold.release.notify_one();
    let (status, body) = response(&mut busy).await;
    assert_eq!((status, body.len()), (200, HELD_BODY));
    closed(&mut busy).await;
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_a_stuck_connection_after_the_grace_period() {
    let notify = Arc::new(Hold::default());
    let server = Server::start(
        router(LIMIT, notify),
        HttpLimits {
            header_timeout: LIMIT * 6,
            shutdown_grace: Duration::from_millis(200),
            ..HttpLimits::default()
        },
    )
    .await;
    let mut stuck = TcpStream::connect(server.addr).await.unwrap();
    stuck.write_all(b"GET /hello HTTP/1.1\r\n").await.unwrap();
    let mut other = TcpStream::connect(server.addr).await.unwrap();
    other.write_all(&request("/hello")).await.unwrap();
    assert_eq!(response(&mut other).await, (200, b"hello".to_vec()));
    let addr = server.addr;
    server.stop().await;
    closed(&mut stuck).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_a_response_is_closed_after_the_write_timeout() {
    const BIG: usize = 32 << 20;
    let big = Router::new().route("/big", get(|| async { vec![7u8; BIG] }));
    let server = Server::start(
        big,
        HttpLimits {
            write_timeout: Duration::from_secs(30),
            // Longer than the test: hyper holds the whole body once the handler returned, so
            // the idle timeout would also run out on the stuck connection.
            idle_timeout: Duration::from_secs(3600),
            ..HttpLimits::default()
        },
    )
    .await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(&request("/big")).await.unwrap();
    // The client reads nothing for two minutes (of the paused clock, which moves on when
    // every task waits): the server's writes fill the socket buffers and stop.
    tube_net::timer::sleep(Duration::from_secs(120)).await;
    // Then it reads: what the buffers held, and the end of the stream, not the whole body.
    let got = read_until_closed(&mut s, LIMIT)
        .await
        .expect("the server closes the connection");
    assert!(got < BIG, "the whole response came ({got} bytes)");
    server.stop().await;
}
