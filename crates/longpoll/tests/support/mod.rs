//! A scriptable backend of the seed 004 contract (a real axum server on 127.0.0.1 port 0),
//! a proxy started on port 0, and a small client, for the long-poll tests.

#![allow(dead_code, unreachable_pub)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tube_longpoll::{Longpoll, LongpollConfig};

/// Bound for every wait in these tests.
pub const LIMIT: Duration = Duration::from_secs(20);

/// One request a backend received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub kind: String,
    pub from: Option<String>,
    pub key: Option<String>,
    pub body: Bytes,
    pub headers: HeaderMap,
}

/// What the backend keeps.
#[derive(Default)]
pub struct Script {
    pub log: Mutex<Vec<Seen>>,
    pub logged: Notify,
    /// Packets waiting for a client's fetch: (body, headers, to).
    pub pushes: Mutex<HashMap<String, VecDeque<(Bytes, HeaderMap)>>>,
    pub pushed: Notify,
    /// Packet requests to answer 500 without acting.
    pub fail_next: AtomicUsize,
    /// Packet requests to act on, then answer 500 (a failure after the work was done).
    pub fail_after_acting: AtomicUsize,
    /// Answers by idempotency key.
    pub keys: Mutex<HashMap<String, (Bytes, String)>>,
    pub fetch_hold: Mutex<Duration>,
    pub tokens: AtomicUsize,
}

/// A running backend.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub script: Arc<Script>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(name, l, Arc::new(Script::default())).await
    }

    /// Starts on `listener` with an existing script (a restart keeps the log).
    pub async fn start_on(name: &str, listener: TcpListener, script: Arc<Script>) -> Backend {
        {
            let mut hold = script.fetch_hold.lock().unwrap();
            if hold.is_zero() {
                *hold = Duration::from_secs(1);
            }
        }
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let state = (name.to_string(), script.clone(), stop.clone());
        let app = Router::new().fallback(handle).with_state(state);
        let s2 = stop.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { s2.cancelled().await })
                .await;
        });
        Backend {
            name: name.to_string(),
            addr,
            script,
            stop,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/in", self.addr)
    }

    /// Stops the backend: its listener is closed once this returns.
    pub async fn stop(self) -> (SocketAddr, Arc<Script>) {
        self.stop.cancel();
        let _ = tokio::time::timeout(LIMIT, self.task).await;
        (self.addr, self.script)
    }

    /// Queues a packet that the next fetch of `client` returns.
    pub fn push(&self, client: &str, body: &str, headers: HeaderMap) {
        self.script
            .pushes
            .lock()
            .unwrap()
            .entry(client.to_string())
            .or_default()
            .push_back((Bytes::from(body.to_string()), headers));
        self.script.pushed.notify_waiters();
    }

    /// Packets (non-empty `Type: Packet` requests) seen so far.
    pub fn packets(&self) -> Vec<Seen> {
        packets(&self.script)
    }

    /// Waits until `n` packets were seen.
    pub async fn wait_packets(&self, n: usize) -> Vec<Seen> {
        wait_packets(&self.script, n).await
    }
}

pub fn packets(script: &Script) -> Vec<Seen> {
    script
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.kind == "Packet" && !s.body.is_empty())
        .cloned()
        .collect()
}

pub async fn wait_packets(script: &Script, n: usize) -> Vec<Seen> {
    tokio::time::timeout(LIMIT, async {
        loop {
            let logged = script.logged.notified();
            tokio::pin!(logged);
            logged.as_mut().enable();
            let p = packets(script);
            if p.len() >= n {
                return p;
            }
            logged.await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("backend saw {} packets, not {n}", packets(script).len()))
}

type BackendState = (String, Arc<Script>, CancellationToken);

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn handle(
    State((name, script, stop)): State<BackendState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let kind = header(&headers, "type").unwrap_or_default();
    let from = header(&headers, "from");
    let key = header(&headers, "idempotency-key");
    let log = |script: &Script| {
        script.log.lock().unwrap().push(Seen {
            kind: kind.clone(),
            from: from.clone(),
            key: key.clone(),
            body: body.clone(),
            headers: headers.clone(),
        });
        script.logged.notify_waiters();
    };
    match kind.as_str() {
        "Auth" | "Register" => {
            log(&script);
            let text = String::from_utf8_lossy(&body).to_string();
            let (user, pass) = text.split_once(':').unwrap_or((&text, ""));
            let perms = header(&headers, "permissions").unwrap_or_default();
            if pass != "secret" {
                return status(StatusCode::UNAUTHORIZED, "bad login");
            }
            if perms.contains("Accept-Debug") && !user.starts_with("debug") {
                return status(StatusCode::FORBIDDEN, "no debug for you");
            }
            let n = script.tokens.fetch_add(1, Ordering::Relaxed);
            let mut r = Response::new(Body::from(format!("{name}-{user}-{n}")));
            if user != "noid" {
                r.headers_mut()
                    .insert("client-id", HeaderValue::from_str(user).unwrap());
            }
            if user.contains("narrow") {
                // Grants less than asked: the proxy must go by this header.
                r.headers_mut()
                    .insert("permissions", HeaderValue::from_static("read"));
            }
            r.headers_mut()
                .insert("x-backend", HeaderValue::from_str(&name).unwrap());
            r.headers_mut()
                .insert("set-cookie", HeaderValue::from_static("s=1"));
            r
        }
        "Packet" if body.is_empty() => {
            log(&script);
            let Some(from) = from else {
                return status(StatusCode::BAD_REQUEST, "no From");
            };
            let hold = *script.fetch_hold.lock().unwrap();
            let deadline = tokio::time::Instant::now() + hold;
            loop {
                let pushed = script.pushed.notified();
                tokio::pin!(pushed);
                pushed.as_mut().enable();
                let next = script
                    .pushes
                    .lock()
                    .unwrap()
                    .get_mut(&from)
                    .and_then(VecDeque::pop_front);
                if let Some((body, extra)) = next {
                    let mut r = Response::new(Body::from(body));
                    r.headers_mut().extend(extra);
                    r.headers_mut()
                        .insert("to", HeaderValue::from_str(&from).unwrap());
                    return r;
                }
                tokio::select! {
                    _ = &mut pushed => {}
                    _ = tokio::time::sleep_until(deadline) => return status(StatusCode::OK, ""),
                    _ = stop.cancelled() => return status(StatusCode::OK, ""),
                }
            }
        }
        "Packet" => {
            if script
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return status(StatusCode::INTERNAL_SERVER_ERROR, "injected");
            }
            if let Some(k) = &key
                && let Some((body, to)) = script.keys.lock().unwrap().get(k).cloned()
            {
                return echo(&name, body, &to);
            }
            log(&script);
            let from = from.unwrap_or_default();
            let reply = Bytes::from(format!("echo:{}", String::from_utf8_lossy(&body)));
            if let Some(k) = key {
                script
                    .keys
                    .lock()
                    .unwrap()
                    .insert(k, (reply.clone(), from.clone()));
            }
            if script
                .fail_after_acting
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return status(StatusCode::BAD_GATEWAY, "injected after acting");
            }
            if body.starts_with(b"quiet") {
                return status(StatusCode::OK, "");
            }
            if body.starts_with(b"big") {
                return echo(&name, Bytes::from(vec![b'b'; 4096]), &from);
            }
            if body.starts_with(b"refuse") {
                return status(StatusCode::BAD_REQUEST, "refused");
            }
            echo(&name, reply, &from)
        }
        _ => status(StatusCode::BAD_REQUEST, "no Type"),
    }
}

fn echo(name: &str, body: Bytes, to: &str) -> Response {
    let mut r = Response::new(Body::from(body));
    let h = r.headers_mut();
    h.insert("to", HeaderValue::from_str(to).unwrap());
    h.insert("x-echo", HeaderValue::from_str(name).unwrap());
    h.insert("set-cookie", HeaderValue::from_static("s=2"));
    h.insert("server-thing", HeaderValue::from_static("z"));
    r
}

fn status(code: StatusCode, text: &str) -> Response {
    let mut r = Response::new(Body::from(text.to_string()));
    *r.status_mut() = code;
    r
}

/// A proxy on 127.0.0.1 port 0 with its admin listener.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: CancellationToken,
}

impl Proxy {
    pub async fn start(config: LongpollConfig) -> Proxy {
        let stop = CancellationToken::new();
        let proxy = Arc::new(Longpoll::new(config, stop.clone()).unwrap());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin) = (l.local_addr().unwrap(), a.local_addr().unwrap());
        let p = proxy.clone();
        tokio::spawn(async move { p.run(l).await });
        tokio::spawn(async move { proxy.run_admin(a).await });
        Proxy { addr, admin, stop }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn metrics(&self) -> String {
        http()
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one metric line (exact name with labels).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Test settings: one or more backends, short timers where a test needs them.
pub fn config(backends: &[&Backend]) -> LongpollConfig {
    let mut c = LongpollConfig::new(backends.iter().map(|b| b.url()).collect());
    c.poll_timeout = Duration::from_secs(10);
    c.backoff_min = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(200);
    c.backend_timeout = Duration::from_secs(5);
    c
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(LIMIT)
        .build()
        .unwrap()
}

/// An answer as the tests look at it.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<String> {
        header(&self.headers, name)
    }
}

pub async fn post(url: &str, headers: &[(&str, &str)], body: &str) -> Got {
    let mut r = http().post(url).body(body.to_string());
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.text().await.unwrap();
    Got {
        status,
        headers,
        body,
    }
}

/// Logs `user` in and returns the token.
pub async fn login(proxy: &Proxy, user: &str, permissions: Option<&str>) -> String {
    let mut h = vec![];
    if let Some(p) = permissions {
        h.push(("Permissions", p));
    }
    let got = post(&proxy.url("/auth"), &h, &format!("{user}:secret")).await;
    assert_eq!(got.status, 200, "{got:?}");
    got.body
}

/// `POST /` with a bearer token.
pub async fn poll(proxy: &Proxy, token: &str, extra: &[(&str, &str)], body: &str) -> Got {
    let bearer = format!("Bearer {token}");
    let mut h = vec![("Authorization", bearer.as_str())];
    h.extend_from_slice(extra);
    post(&proxy.url("/"), &h, body).await
}
