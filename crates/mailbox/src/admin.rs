//! The peer's admin HTTP listener (`tube peer --admin ADDR`): `/healthz` and `/metrics`
//! (Prometheus text: clients, HTTP sessions and held fetches, queued messages and bytes,
//! stored, refused and expired messages, forgotten registrations). It shows counts only, never
//! fingerprints; bind it to loopback.

use std::fmt::Write as _;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::peer::PeerState;

/// The admin routes over `state`.
pub fn router(state: PeerState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state)
}

/// Serves the admin routes on `listener` until `shutdown` (at most
/// [`tube_net::http::ADMIN_MAX_CONNECTIONS`] connections).
pub async fn serve(
    listener: TcpListener,
    state: PeerState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = tube_net::http::HttpLimits::admin();
    tube_net::http::serve(listener, router(state), limits, shutdown).await;
    Ok(())
}

async fn metrics(State(s): State<PeerState>) -> impl IntoResponse {
    let (messages, bytes) = s.queued();
    let (stored, refused_full, expired) = s.counters();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
    };
    metric(
        "tube_peer_clients",
        "gauge",
        "Registered clients.",
        s.clients() as u64,
    );
    metric(
        "tube_peer_http_sessions",
        "gauge",
        "Live HTTP sessions (tokens) of clients behind a long-poll proxy.",
        s.http_tokens() as u64,
    );
    metric(
        "tube_peer_http_held",
        "gauge",
        "HTTP fetches held open waiting for a message.",
        s.http_held() as u64,
    );
    metric(
        "tube_peer_queued_messages",
        "gauge",
        "Messages waiting for their recipient.",
        messages as u64,
    );
    metric(
        "tube_peer_queued_bytes",
        "gauge",
        "Bytes waiting for their recipient.",
        bytes as u64,
    );
    metric(
        "tube_peer_messages_stored_total",
        "counter",
        "Messages accepted for delivery.",
        stored,
    );
    metric(
        "tube_peer_messages_refused_full_total",
        "counter",
        "Deliveries refused for a full queue.",
        refused_full,
    );
    metric(
        "tube_peer_messages_expired_total",
        "counter",
        "Messages dropped unfetched after the maximum age.",
        expired,
    );
    metric(
        "tube_peer_registrations_forgotten_total",
        "counter",
        "Registrations forgotten because nothing held them (no connection, session or queued message).",
        s.forgotten(),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
