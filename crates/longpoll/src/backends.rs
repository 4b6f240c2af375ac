//! The backends (seed 004's "servers"): one HTTP client for all of them, each backend's rest
//! after failures (exponential backoff), the choice of a backend with failover, and one
//! request of the backend contract (`docs/protocols/longpoll.md` section 2) with its bounds.

use std::sync::Mutex;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use bytes::{Bytes, BytesMut};
use tokio::time::Instant;
use tube_proto::backoff::{Backoff, BackoffConfig};
use tube_proto::longpoll::{self as h, RequestType};

/// Why a backend request failed (the backend then rests).
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// Connecting, sending or receiving failed, or the deadline passed.
    #[error("backend unreachable: {0}")]
    Unreachable(String),
    /// The answer's body was over the limit.
    #[error("backend answer over {0} bytes")]
    TooLarge(usize),
}

/// A backend's answer.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

struct Backend {
    url: reqwest::Url,
    rest: Mutex<Rest>,
}

struct Rest {
    backoff: Backoff,
    until: Option<Instant>,
}

/// All backends, in command-line order.
pub(crate) struct Backends {
    http: reqwest::Client,
    list: Vec<Backend>,
    timeout: Duration,
    max_body: usize,
}

impl Backends {
    /// Parses the URLs; only `http` is spoken (put TLS in front of the proxy and the backends
    /// on a private network, or on the same host).
    pub(crate) fn new(
        urls: &[String],
        timeout: Duration,
        backoff_min: Duration,
        backoff_max: Duration,
        max_body: usize,
    ) -> Result<Self, String> {
        if urls.is_empty() {
            return Err("at least one --backend is needed".into());
        }
        let backoff = BackoffConfig {
            initial: backoff_min,
            max: backoff_max,
            factor: 2.0,
            max_attempts: 0,
            jitter: 0.2,
        };
        let mut list = Vec::new();
        for u in urls {
            let url = reqwest::Url::parse(u).map_err(|e| format!("backend {u}: {e}"))?;
            if url.scheme() != "http" {
                return Err(format!("backend {u}: only http:// URLs are supported"));
            }
            list.push(Backend {
                url,
                rest: Mutex::new(Rest {
                    backoff: Backoff::new(backoff),
                    until: None,
                }),
            });
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            // A redirect is outside the contract (section 2): it is the backend's answer, never
            // a request to send elsewhere (with the client's body and token).
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Backends {
            http,
            list,
            timeout,
            max_body,
        })
    }

    /// How many backends there are.
    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// The first backend not resting, starting at `first` and going round in order; else the
    /// moment the earliest one is due.
    pub(crate) fn pick(&self, first: usize) -> Result<usize, Instant> {
        let now = Instant::now();
        let mut earliest: Option<Instant> = None;
        for k in 0..self.list.len() {
            let i = (first + k) % self.list.len();
            let rest = lock(&self.list[i].rest);
            match rest.until {
                Some(t) if t > now => earliest = Some(earliest.map_or(t, |e| e.min(t))),
                _ => return Ok(i),
            }
        }
        Err(earliest.unwrap_or(now))
    }

    /// Whether backend `i` rests now.
    pub(crate) fn resting(&self, i: usize) -> bool {
        lock(&self.list[i].rest)
            .until
            .is_some_and(|t| t > Instant::now())
    }

    /// Backend `i` failed: it rests for its next backoff delay.
    pub(crate) fn failed(&self, i: usize) {
        let mut random = [0u8; 8];
        // Without randomness the delay is merely not jittered.
        let _ = getrandom::fill(&mut random);
        let mut rest = lock(&self.list[i].rest);
        let delay = rest
            .backoff
            .next_delay(u64::from_le_bytes(random))
            .unwrap_or(Duration::from_secs(1));
        rest.until = Some(Instant::now() + delay);
    }

    /// Backend `i` answered: its backoff starts over.
    pub(crate) fn succeeded(&self, i: usize) {
        let mut rest = lock(&self.list[i].rest);
        rest.backoff.reset();
        rest.until = None;
    }

    /// Sends one request of type `kind` to backend `i`: `headers` (the caller's contract and
    /// `X-*` headers) and `body`. The answer's body is read up to the body limit.
    pub(crate) async fn call(
        &self,
        i: usize,
        kind: RequestType,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Result<Answer, CallError> {
        headers.insert(h::TYPE, HeaderValue::from_static(kind.as_str()));
        let backend = &self.list[i];
        let request = self
            .http
            .post(backend.url.clone())
            .headers(headers)
            .body(body)
            .timeout(self.timeout);
        let fail = |e: reqwest::Error| CallError::Unreachable(e.without_url().to_string());
        let mut response = request.send().await.map_err(fail)?;
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        if response
            .content_length()
            .is_some_and(|n| n > self.max_body as u64)
        {
            return Err(CallError::TooLarge(self.max_body));
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(fail)? {
            if body.len() + chunk.len() > self.max_body {
                return Err(CallError::TooLarge(self.max_body));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            headers,
            body: body.freeze(),
        })
    }
}

fn lock(m: &Mutex<Rest>) -> std::sync::MutexGuard<'_, Rest> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The `X-*` headers of `from` (nothing else).
pub(crate) fn passthrough(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in from {
        if h::is_passthrough(name.as_str()) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}
