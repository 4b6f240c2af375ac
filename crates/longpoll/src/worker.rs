//! One worker per client, talking to the backends on its behalf: the sender hands the client's
//! packets to a backend one at a time, in order, retrying the same packet (same
//! `Idempotency-Key`) on another backend or later when one fails; the fetcher keeps an empty
//! `Type: Packet` request open while the client is online and has room. Answers carrying a
//! packet go into the buffer of the client their `To` names.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tube_proto::longpoll::{self as h, RequestType};

use crate::backends::{Answer, CallError, passthrough};
use crate::buffer::Packet;
use crate::state::{Shared, Signals};

/// Runs the client's sender and fetcher until the client is forgotten or the proxy stops.
pub(crate) async fn run(
    shared: Arc<Shared>,
    id: Arc<str>,
    signals: Arc<Signals>,
    stop: CancellationToken,
) {
    tokio::join!(
        sender(&shared, &id, &signals, &stop),
        fetcher(&shared, &id, &signals, &stop),
    );
}

/// What a request to a backend needs from the client's entry.
struct Job {
    seq: u64,
    packet: Packet,
    home: usize,
    headers: HeaderMap,
}

/// The contract headers of a `Type: Packet` request for client `id`.
fn packet_headers(id: &str, token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(id) {
        headers.insert(h::FROM, v);
    }
    if let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {token}")) {
        v.set_sensitive(true);
        headers.insert(h::AUTHORIZATION, v);
    }
    headers
}

/// The next packet of `id` towards the backends, or None if its buffer is empty; Err when the
/// client is gone.
fn next_job(shared: &Shared, id: &str) -> Result<Option<Job>, ()> {
    let g = shared.lock();
    let c = g.clients.get(id).ok_or(())?;
    let Some((seq, packet)) = c.up.front() else {
        return Ok(None);
    };
    let mut headers = packet_headers(id, &c.backend_token);
    for (name, value) in &packet.headers {
        headers.append(name.clone(), value.clone());
    }
    let key = format!("{}-{}-{}", shared.instance, c.serial, seq);
    if let Ok(v) = HeaderValue::from_str(&key) {
        headers.insert(h::IDEMPOTENCY_KEY, v);
    }
    Ok(Some(Job {
        seq: *seq,
        packet: packet.clone(),
        home: c.home,
        headers,
    }))
}

/// Removes packet `seq` from the front of `id`'s outgoing buffer once a backend took it.
fn sent(shared: &Shared, id: &str, seq: u64) {
    let mut g = shared.lock();
    let inner = &mut *g;
    if let Some(c) = inner.clients.get_mut(id)
        && c.up.front().is_some_and(|(s, _)| *s == seq)
        && let Some((_, _, freed)) = c.up.pop()
    {
        inner.total_bytes = inner.total_bytes.saturating_sub(freed);
    }
}

async fn sender(shared: &Shared, id: &Arc<str>, signals: &Signals, stop: &CancellationToken) {
    loop {
        let job = match next_job(shared, id) {
            Err(()) => return,
            Ok(Some(job)) => job,
            Ok(None) => {
                tokio::select! {
                    _ = signals.up.notified() => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        let Some(answer) =
            call_with_failover(shared, job.home, &job.headers, &job.packet.body, stop).await
        else {
            return;
        };
        match answer.status {
            StatusCode::OK => {
                sent(shared, id, job.seq);
                shared.metrics.to_backend.fetch_add(1, Ordering::Relaxed);
                route(shared, id, answer).await;
            }
            StatusCode::UNAUTHORIZED => return unknown_to_backend(shared, id),
            status => {
                // A 4xx is the backend's final word on this packet.
                tracing::warn!(client = &**id, %status, "backend refused a packet; dropped");
                sent(shared, id, job.seq);
                shared.metrics.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A backend answered 401: it no longer knows the client (it restarted, or the session
/// expired there). The proxy forgets the client too, so its next request gets 401 and it logs
/// in again.
fn unknown_to_backend(shared: &Shared, id: &str) {
    tracing::info!(
        client = id,
        "backend refused the client's token; client forgotten"
    );
    shared.forget(id);
}

/// Sends one packet request, failing over between backends and waiting out their rests,
/// until a backend answers with anything but 5xx. None when `stop` ends the wait.
async fn call_with_failover(
    shared: &Shared,
    home: usize,
    headers: &HeaderMap,
    body: &Bytes,
    stop: &CancellationToken,
) -> Option<Answer> {
    loop {
        let i = match shared.backends.pick(home) {
            Ok(i) => i,
            Err(due) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => continue,
                    _ = stop.cancelled() => return None,
                }
            }
        };
        let call = shared
            .backends
            .call(i, RequestType::Packet, headers.clone(), body.clone());
        let result = tokio::select! {
            r = call => r,
            _ = stop.cancelled() => return None,
        };
        match result {
            Ok(answer) if !answer.status.is_server_error() => {
                shared.backends.succeeded(i);
                return Some(answer);
            }
            Ok(answer) => {
                tracing::warn!(backend = i, status = %answer.status, "backend failed");
            }
            Err(e @ CallError::TooLarge(_)) => {
                // The backend answered, but with more than the proxy will hold: a final answer
                // (refused and counted by the caller), not a reason to ask again.
                tracing::warn!(backend = i, error = %e, "backend answer dropped");
                shared.backends.succeeded(i);
                return Some(Answer {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    headers: HeaderMap::new(),
                    body: Bytes::new(),
                });
            }
            Err(e) => tracing::warn!(backend = i, error = %e, "backend failed"),
        }
        shared
            .metrics
            .backend_failures
            .fetch_add(1, Ordering::Relaxed);
        shared.backends.failed(i);
    }
}

/// Puts the packet an answer carries (if any) into the buffer of the client its `To` names
/// (the requesting client `id` when `To` is missing).
async fn route(shared: &Shared, id: &str, answer: Answer) {
    if answer.body.is_empty() {
        return;
    }
    let to = match answer.headers.get(h::TO) {
        Some(v) => match h::parse_id("To", v.as_bytes()) {
            Ok(to) => to,
            Err(_) => {
                shared.metrics.undeliverable.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    client = id,
                    "backend answer with a malformed To header dropped"
                );
                return;
            }
        },
        None => id.to_string(),
    };
    let packet = Packet {
        body: answer.body,
        headers: passthrough(&answer.headers),
        from: None,
    };
    shared.deliver_to_client(&to, packet).await;
}

/// Whether `id` is online with room for a packet; Err when it is gone.
fn wants_fetch(shared: &Shared, id: &str) -> Result<Option<(usize, HeaderMap)>, ()> {
    let g = shared.lock();
    let c = g.clients.get(id).ok_or(())?;
    let room = c.down.len() < shared.config.max_client_packets
        && c.down.bytes() < shared.config.max_client_bytes;
    if room && c.online(Instant::now(), shared.config.poll_timeout) {
        Ok(Some((c.home, packet_headers(id, &c.backend_token))))
    } else {
        Ok(None)
    }
}

async fn fetcher(shared: &Shared, id: &Arc<str>, signals: &Signals, stop: &CancellationToken) {
    let empty = Bytes::new();
    loop {
        let (home, headers) = match wants_fetch(shared, id) {
            Err(()) => return,
            Ok(Some(job)) => job,
            Ok(None) => {
                let room = signals.room.notified();
                tokio::pin!(room);
                room.as_mut().enable();
                if matches!(wants_fetch(shared, id), Ok(Some(_))) {
                    continue;
                }
                // Going offline is a matter of time: look again after a poll timeout.
                tokio::select! {
                    _ = signals.online.notified() => {}
                    _ = &mut room => {}
                    _ = tokio::time::sleep(shared.config.poll_timeout) => {}
                    _ = stop.cancelled() => return,
                }
                continue;
            }
        };
        let started = Instant::now();
        let Some(answer) = call_with_failover(shared, home, &headers, &empty, stop).await else {
            return;
        };
        match answer.status {
            StatusCode::OK if !answer.body.is_empty() => route(shared, id, answer).await,
            StatusCode::OK => {
                // A backend that does not hold fetches is asked at most every backoff_min.
                let next = started + shared.config.backoff_min;
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {}
                    _ = stop.cancelled() => return,
                }
            }
            StatusCode::UNAUTHORIZED => return unknown_to_backend(shared, id),
            status => {
                tracing::warn!(client = &**id, %status, "backend refused a fetch");
                tokio::select! {
                    _ = tokio::time::sleep(shared.config.backoff_max) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}
