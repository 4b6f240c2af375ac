//! The proxy's admin listener (`--admin ADDR`): `/healthz` and `/metrics` (Prometheus text:
//! clients, buffered packets and bytes per direction, packets moved, backend failures,
//! refused and undeliverable packets, and a histogram of how long client requests were held).
//! Counts only, never client ids or tokens; bind it to loopback.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::state::{POLL_BUCKETS, Shared};

/// The admin routes.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(shared)
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One metric without labels.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    head(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// One metric per direction: `(to_backend, to_client)`.
fn by_direction(out: &mut String, name: &str, kind: &str, help: &str, values: (u64, u64)) {
    head(out, name, kind, help);
    let _ = writeln!(
        out,
        "{name}{{direction=\"to_backend\"}} {}\n{name}{{direction=\"to_client\"}} {}",
        values.0, values.1
    );
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let (clients, waiting, packets, bytes) = {
        let g = s.lock();
        let (mut waiting, mut packets, mut bytes) = (0, (0, 0), (0, 0));
        for c in g.clients.values() {
            waiting += c.waiting as u64;
            packets.0 += c.up.len() as u64;
            packets.1 += c.down.len() as u64;
            bytes.0 += c.up.bytes() as u64;
            bytes.1 += c.down.bytes() as u64;
        }
        (g.clients.len() as u64, waiting, packets, bytes)
    };
    let m = &s.metrics;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let out = &mut String::new();
    single(
        out,
        "tube_longpoll_clients",
        "gauge",
        "Clients known to the proxy.",
        clients,
    );
    single(
        out,
        "tube_longpoll_waiting_requests",
        "gauge",
        "Client requests held open right now.",
        waiting,
    );
    by_direction(
        out,
        "tube_longpoll_buffered_packets",
        "gauge",
        "Packets buffered, by direction.",
        packets,
    );
    by_direction(
        out,
        "tube_longpoll_buffered_bytes",
        "gauge",
        "Bytes buffered, by direction.",
        bytes,
    );
    for (name, help, value) in [
        (
            "tube_longpoll_backend_failures_total",
            "Backend requests that failed (unreachable, timeout, 5xx).",
            &m.backend_failures,
        ),
        (
            "tube_longpoll_packets_refused_total",
            "Packets a backend refused with a 4xx, or answered over max_body (dropped).",
            &m.refused,
        ),
        (
            "tube_longpoll_undeliverable_total",
            "Backend packets for unknown or full clients (dropped).",
            &m.undeliverable,
        ),
        (
            "tube_longpoll_clients_expired_total",
            "Clients forgotten after idle_timeout or with no live token.",
            &m.expired,
        ),
    ] {
        single(out, name, "counter", help, load(value));
    }
    by_direction(
        out,
        "tube_longpoll_packets_total",
        "counter",
        "Packets moved, by direction.",
        (load(&m.to_backend), load(&m.to_client)),
    );
    head(
        out,
        "tube_longpoll_poll_seconds",
        "histogram",
        "How long client requests were held.",
    );
    for (i, upper) in POLL_BUCKETS.iter().enumerate() {
        let _ = writeln!(
            out,
            "tube_longpoll_poll_seconds_bucket{{le=\"{upper}\"}} {}",
            load(&m.poll_buckets[i])
        );
    }
    let polls = load(&m.polls);
    let _ = writeln!(
        out,
        "tube_longpoll_poll_seconds_bucket{{le=\"+Inf\"}} {polls}\n\
         tube_longpoll_poll_seconds_sum {}\n\
         tube_longpoll_poll_seconds_count {polls}",
        load(&m.poll_micros) as f64 / 1e6
    );
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        std::mem::take(out),
    )
}
