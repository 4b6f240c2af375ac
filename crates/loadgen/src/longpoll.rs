//! Long-poll benchmarking (`docs/protocols/longpoll.md`): `longpoll-echo`, a backend that
//! speaks the backend contract and sends every packet straight back to its client, and the
//! `longpoll` client: N HTTP clients log in through the proxy and each sends its share of the
//! packets, one at a time, receiving each echo on a long poll; as fast as they can, or paced
//! at a fixed offered rate (so latency can be read below saturation).
//!
//! A packet carries its index, its client and the time it was sent, so the client measures
//! send-to-echo latency on one clock and checks that every echo is intact, its own and in
//! order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tube_proto::longpoll::{self as h, RequestType};

use crate::latency::{self, Latency};

/// Logins in progress at once.
const LOGIN_CONCURRENCY: u32 = 64;

/// Longest client id the echo backend accepts (its token is the id with a prefix, and both
/// must fit the contract's 256 characters).
const MAX_ID: usize = 200;

/// Binds `listen`, prints `listening longpoll-echo <addr>` and serves the backend contract
/// until killed: logins succeed for any valid client id (the body), a packet is answered with
/// itself addressed to its sender, and an empty fetch is held for `hold`, then answered empty
/// (the echo never has anything else to send).
pub(crate) async fn serve_echo(listen: SocketAddr, hold: Duration) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!("listening longpoll-echo {}", listener.local_addr()?);
    axum::serve(listener, echo_backend(hold))
        .await
        .context("serving the echo backend")
}

/// The echo backend's routes (see [`serve_echo`]).
fn echo_backend(hold: Duration) -> Router {
    Router::new().route("/", post(echo)).with_state(hold)
}

/// The token the echo backend issues to client `id`.
fn token_of(id: &str) -> String {
    format!("echo-{id}")
}

async fn echo(State(hold): State<Duration>, headers: HeaderMap, body: Bytes) -> Response {
    let kind = headers
        .get(h::TYPE)
        .and_then(|v| RequestType::parse(v.as_bytes()));
    match kind {
        Some(RequestType::Auth | RequestType::Register) => match h::parse_id("Client-Id", &body) {
            Ok(id) if id.len() <= MAX_ID => match HeaderValue::from_str(&id) {
                Ok(v) => ([(h::CLIENT_ID, v)], token_of(&id)).into_response(),
                Err(_) => StatusCode::UNAUTHORIZED.into_response(),
            },
            _ => StatusCode::UNAUTHORIZED.into_response(),
        },
        Some(RequestType::Packet) => {
            let from = headers
                .get(h::FROM)
                .and_then(|v| h::parse_id("From", v.as_bytes()).ok());
            let token = headers
                .get(h::AUTHORIZATION)
                .and_then(|v| h::parse_bearer(v.as_bytes()).ok());
            let (Some(from), Some(token)) = (from, token) else {
                return StatusCode::UNAUTHORIZED.into_response();
            };
            if token != token_of(&from) {
                return StatusCode::UNAUTHORIZED.into_response();
            }
            if body.is_empty() {
                tokio::time::sleep(hold).await;
                return StatusCode::OK.into_response();
            }
            match HeaderValue::from_str(&from) {
                Ok(to) => ([(h::TO, to)], body).into_response(),
                Err(_) => StatusCode::UNAUTHORIZED.into_response(),
            }
        }
        None => StatusCode::BAD_REQUEST.into_response(),
    }
}

/// What the client runs.
#[derive(Debug, Clone)]
pub(crate) struct Params {
    /// The proxy's base URL (`http://host:port`).
    pub(crate) url: String,
    /// Clients polling at once.
    pub(crate) clients: u32,
    /// Packets in all, shared out evenly over the clients.
    pub(crate) packets: u32,
    /// Packet size in bytes (at least [`latency::HEADER`]).
    pub(crate) size: usize,
    /// Packets per second offered over the whole run (0: each client as fast as it can).
    pub(crate) rate: u32,
}

/// Result of a run.
#[derive(Debug)]
pub(crate) struct Run {
    /// Time to log all clients in.
    pub(crate) login_secs: f64,
    /// From the clients' start to the last echo.
    pub(crate) secs: f64,
    /// Packets sent and echoed per second over `secs`.
    pub(crate) packets_per_sec: f64,
    /// Send-to-echo latency.
    pub(crate) latency: Latency,
}

/// Runs the client side against the proxy; `step` bounds every request.
pub(crate) async fn longpoll(p: Params, step: Duration) -> anyhow::Result<Run> {
    anyhow::ensure!(p.clients > 0, "no clients");
    let http = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .timeout(step)
        .connect_timeout(step)
        .build()
        .context("HTTP client")?;
    let base_url = p.url.trim_end_matches('/').to_string();
    let started = Instant::now();
    let tokens = login_all(&http, &base_url, p.clients).await?;
    let login_secs = started.elapsed().as_secs_f64();

    let base = Instant::now();
    let mut clients = JoinSet::new();
    for (c, token) in tokens.into_iter().enumerate() {
        let c = c as u32;
        // Client c sends packets c, c + clients, ...: the first `packets % clients` send one more.
        let n = p.packets / p.clients + u32::from(c < p.packets % p.clients);
        let (http, url) = (http.clone(), base_url.clone());
        let params = p.clone();
        clients.spawn(async move {
            exchange(&http, &url, &token, c, n, &params, base)
                .await
                .with_context(|| format!("client {c}"))
        });
    }
    let mut samples = Vec::with_capacity(p.packets as usize);
    let mut last = 0;
    while let Some(r) = clients.join_next().await {
        let (got, at) = r.context("a client task panicked")??;
        samples.extend(got);
        last = last.max(at);
    }
    let secs = Duration::from_nanos(last).as_secs_f64();
    Ok(Run {
        login_secs,
        secs,
        packets_per_sec: f64::from(p.packets) / secs,
        latency: Latency::of(samples),
    })
}

/// Logs `clients` clients in (`POST /auth`, the body a client id unique to this run), at most
/// [`LOGIN_CONCURRENCY`] at a time; their tokens in order.
async fn login_all(http: &reqwest::Client, url: &str, clients: u32) -> anyhow::Result<Vec<String>> {
    // Client ids unique to this run: the proxy keeps those of earlier runs for a while.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let run = latency::mix(u64::from(std::process::id()) ^ now);
    let next = Arc::new(AtomicU32::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..LOGIN_CONCURRENCY.min(clients) {
        let (http, url, next) = (http.clone(), url.to_string(), next.clone());
        workers.spawn(async move {
            let mut got = Vec::new();
            loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                if c >= clients {
                    return Ok::<_, anyhow::Error>(got);
                }
                let resp = http
                    .post(format!("{url}/auth"))
                    .body(format!("loadgen-{run:016x}-{c}"))
                    .send()
                    .await
                    .with_context(|| format!("logging in client {c}"))?;
                let status = resp.status();
                anyhow::ensure!(
                    status == StatusCode::OK,
                    "client {c}: /auth answered {status}"
                );
                let token = resp.text().await.context("reading a token")?;
                got.push((c, token));
            }
        });
    }
    let mut all = Vec::with_capacity(clients as usize);
    while let Some(r) = workers.join_next().await {
        all.extend(r.context("a login task panicked")??);
    }
    all.sort_unstable_by_key(|(c, _)| *c);
    Ok(all.into_iter().map(|(_, t)| t).collect())
}

/// Client `c`: sends its `n` packets one at a time (packet k is the run's packet
/// `k * clients + c`, for pacing), each in a `POST /` that then waits for the echo (polling
/// again, empty, if an answer comes back without it). Returns the latencies and the stamp of
/// the last echo.
async fn exchange(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    c: u32,
    n: u32,
    p: &Params,
    base: Instant,
) -> anyhow::Result<(Vec<Duration>, u64)> {
    let size = p.size;
    let mut samples = Vec::with_capacity(n as usize);
    let mut last = 0;
    for k in 0..u64::from(n) {
        latency::pace(base, k * u64::from(p.clients) + u64::from(c), p.rate).await;
        let packet = latency::body(k, latency::stamp(base), u64::from(c), size);
        let mut answer = poll(http, url, token, packet).await?;
        loop {
            if !answer.is_empty() {
                let (index, sent, to) =
                    latency::parse(&answer, size).context("an echo arrived corrupted or cut")?;
                anyhow::ensure!(
                    to == u64::from(c) && index == samples.len() as u64,
                    "got packet {index} of client {to} where its own packet {} was due",
                    samples.len()
                );
                samples.push(latency::since(base, sent).context("an echo from the future")?);
                last = latency::stamp(base);
            }
            if samples.len() as u64 > k {
                break;
            }
            answer = poll(http, url, token, Vec::new()).await?;
        }
    }
    Ok((samples, last))
}

/// One `POST /` with `body` (empty: only asks); the packet it returns, or empty.
async fn poll(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: Vec<u8>,
) -> anyhow::Result<Bytes> {
    let resp = http
        .post(format!("{url}/"))
        .bearer_auth(token)
        .body(body)
        .send()
        .await
        .context("POST /")?;
    let status = resp.status();
    anyhow::ensure!(
        status == StatusCode::OK,
        "POST / answered {status}{}",
        match status.as_u16() {
            429 => " (the client's buffer is full)",
            503 => " (the proxy's buffers are full)",
            _ => "",
        }
    );
    resp.bytes().await.context("reading an answer")
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;
    use tube_longpoll::{Longpoll, LongpollConfig};
    use tube_testkit::deadline;

    use super::*;

    /// An echo backend and a proxy in front of it; the proxy's URL. Both stop with `stop`.
    async fn proxy_with_echo(stop: &CancellationToken) -> String {
        let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let backend_url = format!("http://{}", backend.local_addr().expect("addr"));
        let until = stop.clone();
        tokio::spawn(async move {
            let serve = axum::serve(backend, echo_backend(Duration::from_secs(5)))
                .with_graceful_shutdown(async move { until.cancelled().await });
            let _ = serve.await;
        });
        let proxy = Longpoll::new(LongpollConfig::new(vec![backend_url]), stop.clone())
            .expect("proxy config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = proxy.run(listener).await;
        });
        url
    }

    #[tokio::test]
    async fn every_packet_comes_back_through_the_proxy() {
        deadline(Duration::from_secs(30), async {
            let stop = CancellationToken::new();
            let url = proxy_with_echo(&stop).await;
            // 7 packets over 3 clients: uneven shares (3, 2, 2).
            let p = Params {
                url,
                clients: 3,
                packets: 7,
                size: 100,
                rate: 0,
            };
            let r = longpoll(p, Duration::from_secs(10)).await.expect("run");
            assert!(r.secs > 0.0 && r.packets_per_sec > 0.0);
            assert!(r.latency.p50_us > 0.0 && r.latency.p50_us <= r.latency.p99_us);
            stop.cancel();
        })
        .await;
    }

    #[tokio::test]
    async fn a_paced_run_takes_as_long_as_its_rate_says() {
        deadline(Duration::from_secs(30), async {
            let stop = CancellationToken::new();
            let url = proxy_with_echo(&stop).await;
            // 20 packets at 40 per second: the last is due 19/40 s = 475 ms after the start.
            let p = Params {
                url,
                clients: 4,
                packets: 20,
                size: 24,
                rate: 40,
            };
            let r = longpoll(p, Duration::from_secs(10)).await.expect("run");
            assert!(r.secs >= 0.475, "a paced run took {} s", r.secs);
            stop.cancel();
        })
        .await;
    }

    #[tokio::test]
    async fn the_echo_backend_refuses_a_packet_with_another_clients_token() {
        deadline(Duration::from_secs(30), async {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let url = format!("http://{}", listener.local_addr().expect("addr"));
            let server = tokio::spawn(async move {
                let _ = axum::serve(listener, echo_backend(Duration::from_secs(5))).await;
            });
            let http = reqwest::Client::new();
            let send = |from: &'static str, token: &'static str| {
                http.post(&url)
                    .header("Type", "Packet")
                    .header("From", from)
                    .bearer_auth(token)
                    .body("hello")
                    .send()
            };
            let ok = send("alice", "echo-alice").await.expect("request");
            assert_eq!(ok.status(), StatusCode::OK);
            assert_eq!(ok.headers().get("to").expect("To"), "alice");
            assert_eq!(ok.bytes().await.expect("body"), "hello");
            let bad = send("alice", "echo-bob").await.expect("request");
            assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
            server.abort();
        })
        .await;
    }
}
