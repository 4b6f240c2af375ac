//! The client endpoints of seed 004 (`docs/protocols/longpoll.md` sections 1, 3 and 4):
//! `POST /auth` and `POST /register` pass through to a backend; `POST /` queues a packet and
//! long-polls for the oldest packet waiting for the client. Each reads its body within
//! `body_timeout` (408 past it) and at most `max_body` bytes (413).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use tokio::time::Instant;
use tube_net::http::BodyError;
use tube_proto::longpoll::{self as h, RequestType};

use crate::backends::{CallError, passthrough};
use crate::buffer::{Delivery, Packet};
use crate::state::{Admitted, Shared, token_key};

/// The client routes.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", post(packet))
        .route("/auth", post(auth))
        .route("/register", post(register))
        .layer(middleware::from_fn(body_limit))
        .with_state(shared)
}

/// A body refused for its size (413, at once when `Content-Length` claims more than
/// `max_body`) or its slowness (408, see [`read_body`]) closes the connection: the rest of the
/// body is not read.
async fn body_limit(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    if matches!(
        response.status(),
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
    ) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A refused request: a status, a short plain-text reason, and for 429 and 503 when to retry.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    why: &'static str,
    retry_after: Option<u64>,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut r = (self.status, format!("{}\n", self.why)).into_response();
        if let Some(secs) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}

/// A short plain-text answer.
fn refuse(status: StatusCode, why: &'static str) -> Refusal {
    Refusal {
        status,
        why,
        retry_after: None,
    }
}

/// A 429 or 503 with `Retry-After`.
fn busy(status: StatusCode, retry_after: u64, why: &'static str) -> Refusal {
    Refusal {
        status,
        why,
        retry_after: Some(retry_after),
    }
}

/// The request body, read within `body_timeout` and up to `max_body` bytes; else 413, 408, or
/// 400 for a body that broke off.
async fn read_body(s: &Shared, headers: &HeaderMap, body: Body) -> Result<Bytes, Refusal> {
    let (max, limit) = (s.config.max_body, s.config.body_timeout);
    tube_net::http::read_body(headers, body, max, limit)
        .await
        .map_err(|e| {
            let why = match e {
                BodyError::TooLarge => "body over the limit",
                BodyError::TimedOut => "body not received in time",
                BodyError::Broken => "unreadable body",
            };
            refuse(e.status(), why)
        })
}

async fn auth(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    match read_body(&s, &headers, body).await {
        Ok(body) => authorize(s, RequestType::Auth, headers, body).await,
        Err(r) => r.into_response(),
    }
}

async fn register(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    match read_body(&s, &headers, body).await {
        Ok(body) => authorize(s, RequestType::Register, headers, body).await,
        Err(r) => r.into_response(),
    }
}

/// `/auth` and `/register`: ask backends in turn until one answers.
async fn authorize(s: Arc<Shared>, kind: RequestType, headers: HeaderMap, body: Bytes) -> Response {
    let requested = match headers.get(h::PERMISSIONS) {
        None => Vec::new(),
        Some(v) => match h::parse_permissions(v.as_bytes()) {
            Ok(p) => p,
            Err(_) => {
                return refuse(StatusCode::BAD_REQUEST, "malformed Permissions header")
                    .into_response();
            }
        },
    };
    let mut out = passthrough(&headers);
    if let Some(v) = headers.get(h::PERMISSIONS) {
        out.insert(h::PERMISSIONS, v.clone());
    }
    let n = s.backends.len();
    let start = s.next_backend.fetch_add(1, Ordering::Relaxed) % n;
    for k in 0..n {
        let i = (start + k) % n;
        if s.backends.resting(i) {
            continue;
        }
        let answer = match s.backends.call(i, kind, out.clone(), body.clone()).await {
            Ok(a) if !a.status.is_server_error() => a,
            Ok(a) => {
                tracing::warn!(backend = i, status = %a.status, "backend failed an auth request");
                s.metrics.backend_failures.fetch_add(1, Ordering::Relaxed);
                s.backends.failed(i);
                continue;
            }
            Err(e @ CallError::TooLarge(_)) => {
                // An answer, just not one the contract allows (no token is that long): the
                // backend is not failing, so it does not rest.
                tracing::warn!(backend = i, error = %e, "backend answered auth outside the contract");
                s.backends.succeeded(i);
                return refuse(
                    StatusCode::BAD_GATEWAY,
                    "backend answer outside the contract",
                )
                .into_response();
            }
            Err(e) => {
                tracing::warn!(backend = i, error = %e, "backend failed an auth request");
                s.metrics.backend_failures.fetch_add(1, Ordering::Relaxed);
                s.backends.failed(i);
                continue;
            }
        };
        s.backends.succeeded(i);
        return match answer.status {
            StatusCode::OK => admit(&s, i, &requested, answer),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                let mut r = Response::new(Body::from(answer.body));
                *r.status_mut() = answer.status;
                r.headers_mut().extend(passthrough(&answer.headers));
                r
            }
            status => {
                tracing::warn!(backend = i, %status, "backend answered auth outside the contract");
                refuse(
                    StatusCode::BAD_GATEWAY,
                    "backend answer outside the contract",
                )
                .into_response()
            }
        };
    }
    let wait = match s.backends.pick(0) {
        Err(due) => due.saturating_duration_since(Instant::now()),
        Ok(_) => Duration::ZERO,
    };
    busy(
        StatusCode::SERVICE_UNAVAILABLE,
        wait.as_secs().max(1),
        "no backend reachable",
    )
    .into_response()
}

/// A backend said 200 to `/auth` or `/register`: remember the token.
fn admit(
    s: &Arc<Shared>,
    backend: usize,
    requested: &[String],
    answer: crate::backends::Answer,
) -> Response {
    let Some(Ok(id)) = answer
        .headers
        .get(h::CLIENT_ID)
        .map(|v| h::parse_id("Client-Id", v.as_bytes()))
    else {
        tracing::warn!(backend, "backend granted auth without a valid Client-Id");
        return refuse(
            StatusCode::BAD_GATEWAY,
            "backend answer outside the contract",
        )
        .into_response();
    };
    let Ok(token) = h::parse_id("token", &answer.body) else {
        tracing::warn!(backend, "backend granted auth with an unusable token");
        return refuse(
            StatusCode::BAD_GATEWAY,
            "backend answer outside the contract",
        )
        .into_response();
    };
    let granted = match answer.headers.get(h::PERMISSIONS) {
        None => requested.to_vec(),
        Some(v) => match h::parse_permissions(v.as_bytes()) {
            Ok(p) => p,
            Err(_) => {
                return refuse(
                    StatusCode::BAD_GATEWAY,
                    "backend answer outside the contract",
                )
                .into_response();
            }
        },
    };
    let is_debug = granted.iter().any(|p| p == h::ACCEPT_DEBUG);
    match s.admit(&id, &token, is_debug, backend) {
        Admitted::Full => {
            return busy(StatusCode::SERVICE_UNAVAILABLE, 5, "too many clients").into_response();
        }
        Admitted::New(signals, stop) => {
            tokio::spawn(crate::worker::run(
                s.clone(),
                Arc::from(id.as_str()),
                signals,
                stop,
            ));
        }
        Admitted::Known => {}
    }
    tracing::debug!(client = %id, debug_server = is_debug, "client authorised");
    let mut r = Response::new(Body::from(token));
    r.headers_mut().extend(passthrough(&answer.headers));
    r
}

/// Headers of `POST /` read before anything is queued.
struct Ask {
    token: String,
    seq: Option<u64>,
    ack: Option<u64>,
    to: Option<String>,
}

fn parse_ask(headers: &HeaderMap) -> Result<Ask, Refusal> {
    let unauthorized = || refuse(StatusCode::UNAUTHORIZED, "missing or malformed token");
    let token = headers
        .get(h::AUTHORIZATION)
        .ok_or_else(unauthorized)
        .and_then(|v| h::parse_bearer(v.as_bytes()).map_err(|_| unauthorized()))?;
    let bad = |_| refuse(StatusCode::BAD_REQUEST, "malformed Seq, Ack or To header");
    let seq = headers
        .get(h::SEQ)
        .map(|v| h::parse_counter("Seq", v.as_bytes()))
        .transpose()
        .map_err(bad)?;
    let ack = headers
        .get(h::ACK)
        .map(|v| h::parse_counter("Ack", v.as_bytes()))
        .transpose()
        .map_err(bad)?;
    let to = headers
        .get(h::TO)
        .or_else(|| headers.get(h::DEBUG))
        .map(|v| h::parse_id("To", v.as_bytes()))
        .transpose()
        .map_err(bad)?;
    Ok(Ask {
        token,
        seq,
        ack,
        to,
    })
}

/// Decrements the client's count of waiting requests however the request ends.
struct Waiting<'a> {
    shared: &'a Shared,
    id: Arc<str>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.shared.lock().clients.get_mut(&self.id) {
            c.waiting = c.waiting.saturating_sub(1);
            c.last_seen = Instant::now();
        }
    }
}

/// `POST /`.
async fn packet(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let body = match read_body(&s, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let started = Instant::now();
    let ask = match parse_ask(&headers) {
        Ok(a) => a,
        Err(r) => return r.into_response(),
    };
    let (id, signals, generation) = match accept(&s, &ask, &headers, body) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    signals.online.notify_one();
    // Supersede an older waiting request of this client.
    signals.down.notify_waiters();
    let _waiting = Waiting {
        shared: &s,
        id: id.clone(),
    };
    let deadline = started + s.config.poll_timeout;
    let answer = loop {
        let arrived = signals.down.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        {
            let mut g = s.lock();
            let inner = &mut *g;
            let Some(c) = inner.clients.get_mut(&id) else {
                return refuse(StatusCode::UNAUTHORIZED, "token expired").into_response();
            };
            if c.poll_gen != generation {
                break empty(c.down.len());
            }
            if let Some(d) = c.down.deliver(ask.ack.is_some()) {
                inner.total_bytes = inner.total_bytes.saturating_sub(d.freed);
                let room = c.signals.clone();
                drop(g);
                room.room.notify_waiters();
                break deliver(d);
            }
        }
        tokio::select! {
            _ = &mut arrived => {}
            _ = tokio::time::sleep_until(deadline) => break empty(0),
            _ = s.shutdown.cancelled() => break empty(0),
        }
    };
    s.metrics.poll(started.elapsed());
    answer
}

/// Checks the token and queues the request's packet; registers the request as the client's
/// waiting one. Returns the client, its signals and the request's generation.
fn accept(
    s: &Shared,
    ask: &Ask,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(Arc<str>, Arc<crate::state::Signals>, u64), Refusal> {
    let now = Instant::now();
    let key = token_key(&ask.token);
    let mut g = s.lock();
    let inner = &mut *g;
    let expired = || refuse(StatusCode::UNAUTHORIZED, "unknown or expired token");
    let entry = inner.tokens.get(&key).ok_or_else(expired)?;
    if now.saturating_duration_since(entry.issued) >= s.config.token_ttl {
        let id = entry.client.clone();
        inner.tokens.remove(&key);
        if let Some(c) = inner.clients.get_mut(&id) {
            c.tokens.retain(|k| *k != key);
        }
        return Err(expired());
    }
    let id = entry.client.clone();
    let last_seq = entry.last_seq;
    let (debug, freed) = {
        let c = inner.clients.get_mut(&id).ok_or_else(expired)?;
        c.last_seen = now;
        let freed = ask.ack.map_or(0, |upto| c.down.ack(upto));
        (c.debug, freed)
    };
    inner.total_bytes = inner.total_bytes.saturating_sub(freed);
    let duplicate = matches!(ask.seq, Some(n) if n <= last_seq);
    if !body.is_empty() && !duplicate {
        let mut packet = Packet {
            body,
            headers: passthrough(headers),
            from: None,
        };
        let cost = packet.cost();
        if inner.total_bytes.saturating_add(cost) > s.config.max_total_bytes {
            return Err(busy(
                StatusCode::SERVICE_UNAVAILABLE,
                5,
                "proxy buffers full",
            ));
        }
        let queued = match &ask.to {
            Some(to) => {
                let target = inner
                    .clients
                    .get_mut(to.as_str())
                    .ok_or_else(|| refuse(StatusCode::NOT_FOUND, "no such client"))?;
                if !target.debug && !debug {
                    return Err(refuse(StatusCode::FORBIDDEN, "To must name a debug server"));
                }
                packet.from = Some(id.clone());
                target.down.push(packet).map(|_| target.signals.clone())
            }
            None => {
                let c = inner.clients.get_mut(&id).ok_or_else(expired)?;
                c.up.push(packet).map(|_| c.signals.clone())
            }
        };
        let Ok(target) = queued else {
            return Err(busy(StatusCode::TOO_MANY_REQUESTS, 1, "client buffer full"));
        };
        inner.total_bytes += cost;
        if ask.to.is_some() {
            target.down.notify_waiters();
            s.metrics.to_client.fetch_add(1, Ordering::Relaxed);
        } else {
            target.up.notify_one();
        }
        if let (Some(n), Some(t)) = (ask.seq, inner.tokens.get_mut(&key)) {
            t.last_seq = n;
        }
    }
    let c = inner.clients.get_mut(&id).ok_or_else(expired)?;
    c.poll_gen += 1;
    c.waiting += 1;
    Ok((id, c.signals.clone(), c.poll_gen))
}

/// 200 with no packet.
fn empty(more: usize) -> Response {
    let mut r = Response::new(Body::empty());
    r.headers_mut().insert(h::MORE, HeaderValue::from(more));
    r
}

/// 200 with a packet.
fn deliver(d: Delivery) -> Response {
    let mut r = Response::new(Body::from(d.packet.body));
    let headers = r.headers_mut();
    headers.extend(d.packet.headers);
    headers.insert(h::MORE, HeaderValue::from(d.more));
    headers.insert(h::SEQ, HeaderValue::from(d.seq));
    if let Some(from) = d.packet.from
        && let Ok(v) = HeaderValue::from_str(&from)
    {
        headers.insert(h::FROM, v);
    }
    r
}
