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

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let (clients, up, down, up_bytes, down_bytes, waiting) = {
        let g = s.lock();
        let mut t = (g.clients.len(), 0, 0, 0, 0, 0);
        for c in g.clients.values() {
            t.1 += c.up.len();
            t.2 += c.down.len();
            t.3 += c.up.bytes();
            t.4 += c.down.bytes();
            t.5 += c.waiting;
        }
        t
    };
    let m = &s.metrics;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    head(
        &mut out,
        "tube_longpoll_clients",
        "gauge",
        "Clients known to the proxy.",
    );
    let mut body = format!("tube_longpoll_clients {clients}\n");
    let _ = write!(out, "{body}");
    head(
        &mut out,
        "tube_longpoll_waiting_requests",
        "gauge",
        "Client requests held open right now.",
    );
    body = format!("tube_longpoll_waiting_requests {waiting}\n");
    let _ = write!(out, "{body}");
    head(
        &mut out,
        "tube_longpoll_buffered_packets",
        "gauge",
        "Packets buffered, by direction.",
    );
    body = format!(
        "tube_longpoll_buffered_packets{{direction=\"to_backend\"}} {up}\n\
         tube_longpoll_buffered_packets{{direction=\"to_client\"}} {down}\n"
    );
    let _ = write!(out, "{body}");
    head(
        &mut out,
        "tube_longpoll_buffered_bytes",
        "gauge",
        "Bytes buffered, by direction.",
    );
    body = format!(
        "tube_longpoll_buffered_bytes{{direction=\"to_backend\"}} {up_bytes}\n\
         tube_longpoll_buffered_bytes{{direction=\"to_client\"}} {down_bytes}\n"
    );
    let _ = write!(out, "{body}");
    let counters = [
        (
            "tube_longpoll_backend_failures_total",
            "Backend requests that failed (unreachable, timeout, 5xx).",
            load(&m.backend_failures),
        ),
        (
            "tube_longpoll_packets_refused_total",
            "Packets a backend refused with a 4xx (dropped).",
            load(&m.refused),
        ),
        (
            "tube_longpoll_undeliverable_total",
            "Backend packets for unknown or full clients (dropped).",
            load(&m.undeliverable),
        ),
        (
            "tube_longpoll_clients_expired_total",
            "Clients forgotten after idle_timeout or with no live token.",
            load(&m.expired),
        ),
    ];
    for (name, help, value) in counters {
        head(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
    }
    head(
        &mut out,
        "tube_longpoll_packets_total",
        "counter",
        "Packets moved, by direction.",
    );
    let _ = writeln!(
        out,
        "tube_longpoll_packets_total{{direction=\"to_backend\"}} {}\n\
         tube_longpoll_packets_total{{direction=\"to_client\"}} {}",
        load(&m.to_backend),
        load(&m.to_client)
    );
    head(
        &mut out,
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
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
