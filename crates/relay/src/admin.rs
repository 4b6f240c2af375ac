//! The relay's admin HTTP listener (`--admin ADDR`): `/metrics` (Prometheus text), `/healthz`,
//! `/ready`, and a JSON API of live state (`/api/agents`, `/api/tunnels`). It carries no user
//! traffic and exposes no secrets; bind it to loopback or a private network.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::state::RelayState;

/// The admin routes over `state`.
pub fn router(state: Arc<RelayState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/api/agents", get(agents))
        .route("/api/tunnels", get(tunnels))
        .with_state(state)
}

/// Serves the admin routes on `listener` until `shutdown` (at most
/// [`tube_net::http::ADMIN_MAX_CONNECTIONS`] connections).
pub async fn serve(
    listener: TcpListener,
    state: Arc<RelayState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = tube_net::http::HttpLimits::admin();
    tube_net::http::serve(listener, router(state), limits, shutdown).await;
    Ok(())
}

async fn metrics(State(s): State<Arc<RelayState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.render_metrics(),
    )
}

async fn ready(State(s): State<Arc<RelayState>>) -> impl IntoResponse {
    if s.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn agents(State(s): State<Arc<RelayState>>) -> impl IntoResponse {
    axum::Json(s.agents())
}

async fn tunnels(State(s): State<Arc<RelayState>>) -> impl IntoResponse {
    axum::Json(s.tunnels())
}
