//! The hub's admin HTTP listener (`tube hub --admin ADDR`): `/healthz`, `/metrics` (Prometheus
//! text) and a JSON API of live state (`/api/nodes`, `/api/chains`). It carries no traffic and
//! shows no secrets; bind it to loopback or a private network.

use std::fmt::Write as _;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::HubState;

/// The admin routes over `state`.
pub fn router(state: HubState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/api/nodes",
            get(|State(s): State<HubState>| async move { axum::Json(s.online()) }),
        )
        .route(
            "/api/chains",
            get(|State(s): State<HubState>| async move { axum::Json(s.chains()) }),
        )
        .with_state(state)
}

/// Serves the admin routes on `listener` until `shutdown` (at most
/// [`tube_net::http::ADMIN_MAX_CONNECTIONS`] connections).
pub async fn serve(
    listener: TcpListener,
    state: HubState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = tube_net::http::HttpLimits::admin();
    tube_net::http::serve(listener, router(state), limits, shutdown).await;
    Ok(())
}

async fn metrics(State(s): State<HubState>) -> impl IntoResponse {
    let chains = s.chains();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP tube_hub_nodes_online Nodes with a logged-in session."
    );
    let _ = writeln!(out, "# TYPE tube_hub_nodes_online gauge");
    let _ = writeln!(out, "tube_hub_nodes_online {}", s.online().len());
    let _ = writeln!(
        out,
        "# HELP tube_hub_chains Chains the hub knows, by state."
    );
    let _ = writeln!(out, "# TYPE tube_hub_chains gauge");
    for state in ["approval", "building", "established"] {
        let n = chains.iter().filter(|c| c.state == state).count();
        let _ = writeln!(out, "tube_hub_chains{{state=\"{state}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP tube_hub_accounts_evicted_total Accounts removed to make room for new ones (--max-accounts)."
    );
    let _ = writeln!(out, "# TYPE tube_hub_accounts_evicted_total counter");
    let _ = writeln!(
        out,
        "tube_hub_accounts_evicted_total {}",
        s.accounts_evicted()
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
