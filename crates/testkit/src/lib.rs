//! Helpers for tube's tests only (and [`proc`] for tests of the binary): start a relay and agents in-process on 127.0.0.1 port 0,
//! echo servers, a deadline around every test body, and a per-test log subscriber.
//!
//! Everything started here stops when its handle is dropped or `stop`ped, so tests clean up
//! even when they fail.

pub mod proc;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tube_agent::{AgentConfig, AgentError, AgentEvent, TunnelSpec};
use tube_net::{Fingerprint, Identity};
use tube_relay::{JwtSecret, RelayConfig};

/// Installs a log subscriber writing to the test's captured output (once per process).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Runs `fut`, failing the test if it takes longer than `limit`.
pub async fn deadline<F: Future>(limit: Duration, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("test did not finish within {limit:?}"),
    }
}

/// A relay running in this process. Tests can read its live state, and restart "the same
/// relay" by starting another with the same identity, secret and data dir.
pub struct TestRelay {
    /// Control address agents connect to.
    pub addr: SocketAddr,
    /// The certificate fingerprint agents pin.
    pub fingerprint: Fingerprint,
    /// The JWT secret (to mint tokens).
    pub jwt: JwtSecret,
    /// Live state (agents, tunnels, counters).
    pub state: std::sync::Arc<tube_relay::RelayState>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// Test relay settings: [`RelayConfig`] defaults, except rate limits high enough for tests
/// that start many agents from 127.0.0.1 (the rate-limit tests set the seed's values), a
/// short auth-failure delay, no shutdown grace, and agents served on two threads of their own
/// as `tube relay` serves them (a test on tokio's paused clock sets `threads` to 0: the
/// relay's threads keep real time).
pub fn relay_config() -> RelayConfig {
    let identity = Identity::generate(&["localhost"]).expect("test identity");
    let jwt = JwtSecret::generate().expect("secret");
    let mut c = RelayConfig::new(identity, jwt);
    let generous = tube_proto::ratelimit::RateLimit::per_minute(100_000);
    c.auth_limit_per_ip = generous;
    c.auth_limit_per_subject = generous;
    c.tunnel_limit_per_subject = generous;
    c.tunnel_limit_per_ip = generous;
    c.auth_failure_delay = Duration::from_millis(20);
    // Stop at once: tests that drain set their own grace.
    c.shutdown_grace = Duration::ZERO;
    c.threads = 2;
    c
}

impl TestRelay {
    /// Starts a relay with default test settings on 127.0.0.1:0.
    pub async fn start() -> Self {
        Self::start_with(relay_config()).await
    }

    /// Starts a relay with `config` on 127.0.0.1:0.
    pub async fn start_with(config: RelayConfig) -> Self {
        let listener = tube_relay::bind(([127, 0, 0, 1], 0).into()).expect("bind relay");
        Self::start_on(config, listener).await
    }

    /// Starts a relay with `config` on `listener`.
    pub async fn start_on(config: RelayConfig, listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("addr");
        let fingerprint = config.identity.fingerprint();
        let jwt = config.jwt.clone();
        let relay = tube_relay::Relay::new(config).expect("relay");
        let state = relay.state();
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        let task = tokio::spawn(async move {
            relay.run(listener, s).await.expect("relay run");
        });
        Self {
            addr,
            fingerprint,
            jwt,
            state,
            shutdown,
            task: Some(task),
        }
    }

    /// A valid token for `subject`.
    pub fn token(&self, subject: &str) -> String {
        self.jwt.mint(subject, Duration::from_secs(3600))
    }

    /// An agent config for this relay exposing `locals`.
    pub fn agent_config(&self, locals: &[SocketAddr]) -> AgentConfig {
        let tunnels = locals
            .iter()
            .map(|l| TunnelSpec {
                local: l.to_string(),
                remote_port: None,
                allow: Vec::new(),
                name: l.to_string(),
            })
            .collect();
        AgentConfig::new(
            self.addr.to_string(),
            self.token("test"),
            self.fingerprint,
            tunnels,
        )
    }

    /// Stops the relay and waits for it to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            deadline(Duration::from_secs(10), t)
                .await
                .expect("relay task");
        }
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An agent running in this process.
pub struct TestAgent {
    /// Public addresses of its tunnels, in the order of the local addresses.
    pub public: Vec<SocketAddr>,
    /// Events after start-up (state changes, tunnels coming back after a reconnect).
    pub events: mpsc::UnboundedReceiver<AgentEvent>,
    /// The events seen while starting, in order.
    pub startup: Vec<AgentEvent>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), AgentError>>>,
    _guard: DropGuard,
}

impl TestAgent {
    /// Starts an agent and waits until all its tunnels are live.
    pub async fn start(config: AgentConfig) -> Self {
        match Self::try_start(config).await {
            Ok(a) => a,
            Err(e) => panic!("agent failed to start: {e}"),
        }
    }

    /// Starts an agent; the error if it stops before all tunnels are live.
    pub async fn try_start(config: AgentConfig) -> Result<Self, AgentError> {
        let n = config.tunnels.len();
        let shutdown = CancellationToken::new();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut task = tokio::spawn(tube_agent::run(config, tx, shutdown.clone()));
        let mut public = Vec::new();
        let mut startup = Vec::new();
        while public.len() < n {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(AgentEvent::TunnelUp { public: p, tunnel_id, local }) => {
                        public.push(p.parse().expect("public addr"));
                        startup.push(AgentEvent::TunnelUp { public: p, tunnel_id, local });
                    }
                    Some(other) => startup.push(other),
                    None => {
                        let r = (&mut task).await.expect("agent task");
                        return Err(match r {
                            Err(e) => e,
                            Ok(()) => AgentError::Protocol("agent stopped".into()),
                        });
                    }
                },
                r = &mut task => {
                    return Err(match r.expect("agent task") {
                        Err(e) => e,
                        Ok(()) => AgentError::Protocol("agent stopped".into()),
                    });
                }
            }
        }
        let guard = shutdown.clone().drop_guard();
        Ok(Self {
            public,
            events: rx,
            startup,
            shutdown,
            task: Some(task),
            _guard: guard,
        })
    }

    /// Waits for the next `TunnelUp` event (after a reconnect) and returns its public address.
    pub async fn next_tunnel_up(&mut self) -> SocketAddr {
        loop {
            match self.events.recv().await {
                Some(AgentEvent::TunnelUp { public, .. }) => {
                    return public.parse().expect("public addr");
                }
                Some(_) => {}
                None => panic!("agent ended before its tunnel came back"),
            }
        }
    }

    /// Waits until the agent enters `state`.
    pub async fn wait_state(&mut self, state: tube_proto::lifecycle::AgentState) {
        loop {
            match self.events.recv().await {
                Some(AgentEvent::State { to, .. }) if to == state => return,
                Some(_) => {}
                None => panic!("agent ended before reaching {state:?}"),
            }
        }
    }

    /// Waits for the agent's next retry and returns why it is retrying.
    pub async fn next_retry_reason(&mut self) -> String {
        loop {
            match self.events.recv().await {
                Some(AgentEvent::Retrying { reason, .. }) => return reason,
                Some(_) => {}
                None => panic!("agent ended before retrying"),
            }
        }
    }

    /// Stops the agent cleanly (it says goodbye) and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let r = deadline(Duration::from_secs(10), t)
                .await
                .expect("agent task");
            r.expect("clean agent stop");
        }
    }

    /// Kills the agent abruptly: its task is aborted, dropping the connection without goodbye.
    pub async fn kill(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Waits for the agent to end on its own and returns how it ended.
    pub async fn wait(mut self) -> Result<(), AgentError> {
        let t = self.task.take().expect("agent task");
        deadline(Duration::from_secs(60), t)
            .await
            .expect("agent task")
    }
}

/// A TCP server running in this process.
pub struct TestServer {
    /// Its address.
    pub addr: SocketAddr,
    _guard: DropGuard,
}

/// Starts an echo server: echoes every byte; on EOF shuts down its write side.
pub async fn echo_server() -> TestServer {
    serve(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// Starts a server running `handler` for every connection.
pub async fn serve<H, F>(handler: H) -> TestServer
where
    H: Fn(TcpStream) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind server");
    let addr = listener.local_addr().expect("addr");
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let tracker = tokio_util::task::TaskTracker::new();
        loop {
            tokio::select! {
                _ = t.cancelled() => break,
                r = listener.accept() => {
                    if let Ok((s, _)) = r {
                        // Small writes go out at once (and paused-clock tests never wait on
                        // Nagle's delayed ACKs).
                        let _ = s.set_nodelay(true);
                        let t2 = t.clone();
                        let fut = handler(s);
                        tracker.spawn(async move {
                            tokio::select! { _ = t2.cancelled() => {}, _ = fut => {} }
                        });
                    }
                }
            }
        }
    });
    TestServer {
        addr,
        _guard: token.drop_guard(),
    }
}

/// Sends `msg`, reads exactly as many bytes back and returns them.
pub async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.expect("write");
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).await.expect("read echo");
    buf
}

/// Whether the connection has ended: `Some(true)` for a reset or error, `Some(false)` for a
/// clean EOF, reading at most `limit` (any data read first is discarded and reported as None).
pub async fn ended(s: &mut TcpStream, limit: Duration) -> Option<bool> {
    let mut b = [0u8; 1];
    match tokio::time::timeout(limit, s.read(&mut b)).await {
        Ok(Ok(0)) => Some(false),
        Ok(Ok(_)) => None,
        Ok(Err(_)) => Some(true),
        Err(_) => None,
    }
}

/// Reads and discards until the peer closes `s` (end of stream or reset), for at most `limit`:
/// the bytes discarded, or `None` if it was still open then.
pub async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Option<usize> {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut got = 0;
    let read = async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok().map(|()| got)
}

/// Deterministic pseudo-random bytes (xorshift), for transfers checked by hash.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `total` bytes of [`pattern`] in chunks, hashing them; returns the SHA-256.
pub async fn write_pattern<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    total: usize,
    seed: u64,
) -> [u8; 32] {
    let chunk = pattern(1 << 20, seed);
    let mut h = Sha256::new();
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len());
        w.write_all(&chunk[..n]).await.expect("write pattern");
        h.update(&chunk[..n]);
        left -= n;
    }
    h.finalize().into()
}

/// Reads to EOF, hashing; returns (bytes, SHA-256).
pub async fn read_hash<R: AsyncReadExt + Unpin>(r: &mut R) -> (usize, [u8; 32]) {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n;
    }
    (total, h.finalize().into())
}

/// A local address nothing listens on (bound then released).
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

/// Re-exported for tests that build payloads.
pub use bytes;

/// A TCP forwarder between an agent and a relay that tests can break: cut every connection
/// (both sides see a reset, like a network failure), hold new ones off, or point at a
/// restarted relay.
pub struct CutProxy {
    /// Where agents connect.
    pub addr: SocketAddr,
    inner: std::sync::Arc<CutInner>,
    _guard: DropGuard,
}

struct CutInner {
    upstream: std::sync::Mutex<SocketAddr>,
    /// Cancelled to cut the current connections; replaced by a fresh token after each cut.
    generation: std::sync::Mutex<CancellationToken>,
    /// While true, new connections are closed at once.
    refusing: std::sync::atomic::AtomicBool,
    /// Connections accepted so far.
    accepted: std::sync::atomic::AtomicUsize,
}

impl CutProxy {
    /// Starts forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let inner = std::sync::Arc::new(CutInner {
            upstream: std::sync::Mutex::new(upstream),
            generation: std::sync::Mutex::new(CancellationToken::new()),
            refusing: false.into(),
            accepted: 0.into(),
        });
        let stop = CancellationToken::new();
        let (i, s) = (inner.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (down, _) = tokio::select! {
                    _ = s.cancelled() => break,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                i.accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i.refusing.load(std::sync::atomic::Ordering::SeqCst) {
                    tube_net::abort_tcp(down);
                    continue;
                }
                let up_addr = *i.upstream.lock().expect("lock");
                let cut = i.generation.lock().expect("lock").clone();
                let s2 = s.clone();
                tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(up_addr).await else {
                        tube_net::abort_tcp(down);
                        return;
                    };
                    let _ = (down.set_nodelay(true), up.set_nodelay(true));
                    let (mut down, mut up) = (down, up);
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = s2.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                    }
                    tube_net::abort_tcp(down);
                    tube_net::abort_tcp(up);
                });
            }
        });
        Self {
            addr,
            inner,
            _guard: stop.drop_guard(),
        }
    }

    /// Resets every connection currently forwarded.
    pub fn cut(&self) {
        let mut g = self.inner.generation.lock().expect("lock");
        g.cancel();
        *g = CancellationToken::new();
    }

    /// While `on`, new connections are reset at once (the relay looks unreachable).
    pub fn refuse(&self, on: bool) {
        self.inner
            .refusing
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Forwards new connections to `upstream` from now on.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.inner.upstream.lock().expect("lock") = upstream;
    }

    /// Connections accepted so far (including refused ones).
    pub fn accepted(&self) -> usize {
        self.inner
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}
