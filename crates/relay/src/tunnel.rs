//! One tunnel's public listener: accepts users and turns each into a mux stream.
//!
//! The accept loop and every user connection it made run under the session's token. When the
//! agent leaves, the token is cancelled first: the loop stops and drops the listener (the
//! kernel resets connections still in its backlog), a connection accepted in that same instant
//! is checked against the token and reset, and every proxied connection is reset (the token is
//! also the mux's, whose close resets every stream). No user stays connected to a dead tunnel. When the relay stops, only the accept loop's own token (a child
//! of the session's) is cancelled at first: the port closes, proxied users go on until they end
//! or the shutdown grace runs out. Users outside the tunnel's allow-list are reset before any
//! byte is forwarded.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use tube_net::Mux;
use tube_net::proxy::{ProxyEnd, open_and_proxy};
use tube_proto::cidr::{Cidr, allowed};
use uuid::Uuid;

use crate::state::TunnelCounters;

/// What the accept loop needs to know about its tunnel.
pub(crate) struct TunnelRun {
    pub(crate) listener: TcpListener,
    pub(crate) id: Uuid,
    pub(crate) allowed: Vec<Cidr>,
    pub(crate) counters: Arc<TunnelCounters>,
}

/// Runs the accept loop until `listening` (a child of the session's token, which is also the
/// mux's) is cancelled; each user connection runs on `users` until it ends or the mux closes
/// (which resets its stream).
pub(crate) async fn accept_loop(
    run: TunnelRun,
    mux: Mux,
    listening: CancellationToken,
    users: TaskTracker,
) {
    let TunnelRun {
        listener,
        id,
        allowed: allow,
        counters,
    } = run;
    while let Some((tcp, peer)) = tube_net::accept(&listener, &listening, "tunnel").await {
        if listening.is_cancelled() {
            tube_net::abort_tcp(tcp);
            break;
        }
        if !allowed(&allow, peer.ip()) {
            counters.denied.fetch_add(1, Ordering::Relaxed);
            tracing::info!(tunnel_id = %id, %peer, "user refused by allow-list");
            tube_net::abort_tcp(tcp);
            continue;
        }
        tube_net::tune_accepted(&tcp);
        counters.connections.fetch_add(1, Ordering::Relaxed);
        counters.active.fetch_add(1, Ordering::Relaxed);
        let (mux, counters) = (mux.clone(), counters.clone());
        let span = tracing::debug_span!("user", %peer);
        users.spawn(
            async move {
                match open_and_proxy(
                    &mux,
                    *id.as_bytes(),
                    peer.to_string(),
                    tcp,
                    &counters.traffic,
                )
                .await
                {
                    Ok(ProxyEnd::Clean) => {}
                    Ok(end) => tracing::debug!(?end, "user connection aborted"),
                    Err((e, tcp)) => {
                        tracing::debug!(error = %e, "cannot open stream, resetting user");
                        tube_net::abort_tcp(tcp);
                    }
                }
                counters.active.fetch_sub(1, Ordering::Relaxed);
            }
            .instrument(span),
        );
    }
    drop(listener);
}
