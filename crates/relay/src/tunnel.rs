//! One tunnel's public listener: accepts users and turns each into a mux stream.
//!
//! The accept loop and every user connection it made run under the session's token. When the
//! agent leaves, the token is cancelled first: the loop stops and drops the listener (the
//! kernel resets connections still in its backlog), a connection accepted in that same instant
//! is checked against the token and reset, and every proxied connection is reset. No user stays
//! connected to a dead tunnel.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use tube_net::Mux;
use tube_net::proxy::{ProxyEnd, proxy};
use uuid::Uuid;

/// Counters of one tunnel.
#[derive(Debug, Default)]
pub(crate) struct TunnelCounters {
    /// User connections accepted.
    pub(crate) connections: AtomicU64,
    /// Bytes from users towards the agent.
    pub(crate) bytes_in: AtomicU64,
    /// Bytes from the agent towards users.
    pub(crate) bytes_out: AtomicU64,
}

/// Runs the accept loop until `token` is cancelled.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    tunnel_id: Uuid,
    mux: Mux,
    token: CancellationToken,
    tracker: TaskTracker,
    counters: Arc<TunnelCounters>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors or a transient error: back off briefly, keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        if token.is_cancelled() {
            tube_net::abort_tcp(tcp);
            break;
        }
        tube_net::tune_tcp(&tcp);
        counters.connections.fetch_add(1, Ordering::Relaxed);
        let (mux, token, counters) = (mux.clone(), token.clone(), counters.clone());
        let span = tracing::debug_span!("user", %peer);
        tracker.spawn(
            async move {
                match mux.open(*tunnel_id.as_bytes(), peer.to_string()).await {
                    Ok(stream) => {
                        let (end, stats) = proxy(tcp, stream, &token).await;
                        counters
                            .bytes_in
                            .fetch_add(stats.socket_to_stream, Ordering::Relaxed);
                        counters
                            .bytes_out
                            .fetch_add(stats.stream_to_socket, Ordering::Relaxed);
                        if end != ProxyEnd::Clean {
                            tracing::debug!(?end, "user connection aborted");
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot open stream, resetting user");
                        tube_net::abort_tcp(tcp);
                    }
                }
            }
            .instrument(span),
        );
    }
    drop(listener);
}
