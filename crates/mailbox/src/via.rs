//! A small client of the long-poll proxy (`tube longpoll`, `docs/protocols/longpoll.md`
//! sections 1 and 4): `POST {url}/register` for a token, then `POST {url}/`, one request at a
//! time, each carrying at most one packet and answered with at most one. `Seq` on a send makes a
//! retried send stored once; `Ack` on every request makes an answer lost on the way come again,
//! and the answer's `Seq` lets a repeated one be dropped. Every request has a timeout (a bit
//! above the proxy's 25 s poll).
//!
//! Packets are opaque bytes here; `client` gives them their mailbox meaning.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use tube_proto::longpoll as lp;

use crate::http::{MAX_BODY, REQUEST_TAG};

/// Settings of a [`Via`].
#[derive(Debug, Clone)]
pub struct ViaConfig {
    /// Limit of one HTTP request, held ones included: keep it above the proxy's poll timeout
    /// (25 s by default).
    pub request_timeout: Duration,
    /// Limit of connecting to the proxy.
    pub connect_timeout: Duration,
    /// Attempts of one request when the proxy is unreachable, times out or is busy (429,
    /// 503, 5xx); a send is retried with the same `Seq`.
    pub attempts: u32,
}

impl Default for ViaConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            attempts: 3,
        }
    }
}

/// Why a request to the proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum ViaError {
    /// No answer, no connection, or busy after the retries.
    #[error("{0}")]
    Unavailable(String),
    /// 401 or 403: refused credentials, or a token the proxy no longer knows.
    #[error("not authorised (HTTP {0})")]
    Unauthorized(u16),
    /// Another refusal (400, 404, 413, ...), or an answer the contract does not allow.
    #[error("the proxy refused the request (HTTP {0})")]
    Refused(u16),
}

/// One packet answered by the proxy.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The packet.
    pub body: Bytes,
    /// The backend's [`REQUEST_TAG`] echo: the tag of the request this answers, if any.
    pub tag: Option<String>,
}

/// A client registered with a proxy.
pub struct Via {
    http: reqwest::Client,
    base: String,
    token: String,
    cfg: ViaConfig,
    /// The `Seq` of the last packet sent (numbers are never reused: a send cut off by a
    /// timeout may have been stored, and gaps are fine).
    sent: u64,
    /// The `Seq` of the last packet received from the proxy (our `Ack`).
    acked: u64,
    /// The proxy's `More` on its last answer.
    more: u64,
}

impl std::fmt::Debug for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a credential: never printed.
        f.debug_struct("Via")
            .field("base", &self.base)
            .field("sent", &self.sent)
            .field("acked", &self.acked)
            .finish_non_exhaustive()
    }
}

impl Via {
    /// `POST {url}/register` with `body`; the proxy's 200 body is the token. One attempt: the
    /// caller decides about retrying a registration.
    pub async fn register(url: &str, body: Bytes, cfg: &ViaConfig) -> Result<Self, ViaError> {
        let http = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .connect_timeout(cfg.connect_timeout)
            .build()
            .map_err(|e| ViaError::Unavailable(format!("http client: {e}")))?;
        let base = url.trim_end_matches('/').to_owned();
        let resp = http
            .post(format!("{base}/register"))
            .body(body)
            .send()
            .await
            .map_err(|e| ViaError::Unavailable(describe(&e)))?;
        let status = resp.status();
        let token = read_body(resp).await?;
        match status {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(ViaError::Unauthorized(status.as_u16()));
            }
            s if retryable(s) => {
                return Err(ViaError::Unavailable(format!(
                    "the proxy answered HTTP {s}"
                )));
            }
            s => return Err(ViaError::Refused(s.as_u16())),
        }
        let token = lp::parse_id("token", &token).map_err(|_| ViaError::Refused(200))?;
        Ok(Self {
            http,
            base,
            token,
            cfg: cfg.clone(),
            sent: 0,
            acked: 0,
            more: 0,
        })
    }

    /// One `POST {url}/`: sends `packet` (with its tag) when there is one, and returns the
    /// packet the proxy answers with, `None` for an empty answer (nothing arrived within the
    /// proxy's poll timeout) or a repeated one.
    pub async fn exchange(
        &mut self,
        packet: Option<(Bytes, &str)>,
    ) -> Result<Option<Answer>, ViaError> {
        let seq = match packet {
            Some(_) => {
                self.sent += 1;
                Some(self.sent)
            }
            None => None,
        };
        let mut last = String::new();
        for attempt in 1..=self.cfg.attempts.max(1) {
            let mut req = self
                .http
                .post(format!("{}/", self.base))
                .bearer_auth(&self.token)
                .header(lp::ACK, self.acked);
            if let (Some((body, tag)), Some(seq)) = (&packet, seq) {
                req = req
                    .header(lp::SEQ, seq)
                    .header(REQUEST_TAG, *tag)
                    .body(body.clone());
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    last = describe(&e);
                    tracing::debug!(attempt, error = %last, "proxy request failed");
                    backoff(attempt, None).await;
                    continue;
                }
            };
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = match read_body(resp).await {
                Ok(b) => b,
                Err(ViaError::Unavailable(e)) => {
                    last = e;
                    backoff(attempt, None).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match status {
                StatusCode::OK => return Ok(self.accept(&headers, body)),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    return Err(ViaError::Unauthorized(status.as_u16()));
                }
                s if retryable(s) => {
                    last = format!("the proxy answered HTTP {s}");
                    tracing::debug!(attempt, status = s.as_u16(), "proxy busy");
                    backoff(attempt, counter(&headers, lp::RETRY_AFTER)).await;
                }
                s => return Err(ViaError::Refused(s.as_u16())),
            }
        }
        Err(ViaError::Unavailable(last))
    }

    /// How many packets the proxy said still wait after its last answer.
    pub fn more(&self) -> u64 {
        self.more
    }

    /// A 200 (our packet, if any, is stored): the answer's packet is new unless its `Seq` is
    /// one we have already acknowledged.
    fn accept(&mut self, headers: &HeaderMap, body: Bytes) -> Option<Answer> {
        self.more = counter(headers, lp::MORE).unwrap_or(0);
        if body.is_empty() {
            return None;
        }
        if let Some(seq) = counter(headers, lp::SEQ) {
            if seq <= self.acked {
                tracing::debug!(seq, "repeated packet from the proxy dropped");
                return None;
            }
            self.acked = seq;
        }
        let tag = headers
            .get(REQUEST_TAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Some(Answer { body, tag })
    }
}

/// 408, 429 and 5xx are worth another attempt.
fn retryable(s: StatusCode) -> bool {
    s == StatusCode::TOO_MANY_REQUESTS || s == StatusCode::REQUEST_TIMEOUT || s.is_server_error()
}

fn counter(headers: &HeaderMap, name: &'static str) -> Option<u64> {
    headers
        .get(name)
        .and_then(|v| lp::parse_counter(name, v.as_bytes()).ok())
}

/// Waits before the next attempt: `Retry-After` (at most 5 s), else 200 ms per attempt so far.
async fn backoff(attempt: u32, retry_after: Option<u64>) {
    let wait = match retry_after {
        Some(s) => Duration::from_secs(s.min(5)),
        None => Duration::from_millis(200) * attempt,
    };
    tokio::time::sleep(wait).await;
}

/// Reads a response body of at most [`MAX_BODY`] bytes.
async fn read_body(mut resp: reqwest::Response) -> Result<Bytes, ViaError> {
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(ViaError::Refused(resp.status().as_u16()));
    }
    let mut out = BytesMut::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| ViaError::Unavailable(describe(&e)))?
    {
        if out.len() + chunk.len() > MAX_BODY {
            return Err(ViaError::Refused(resp.status().as_u16()));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

/// A reqwest error with its causes (its own text alone is "error sending request").
fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
