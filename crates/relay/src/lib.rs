//! The relay server (`tube relay`): agents behind NAT connect over TLS 1.3, authenticate with a
//! JWT and register tunnels; each tunnel gets a public port whose user connections are
//! multiplexed to the agent as streams.
//!
//! Layout: [`config`] (what `run` takes), [`auth`] (JWT), [`registry`] (public ports),
//! `session` (one agent connection), `tunnel` (one public listener). The wire protocol is in
//! `docs/protocols/relay.md`.

pub mod auth;
pub mod config;
pub mod registry;
mod session;
mod tunnel;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tube_net::tokio_rustls::TlsAcceptor;

pub use auth::JwtSecret;
pub use config::RelayConfig;
pub use session::rfc3339;

/// Errors that stop the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] tube_net::TlsError),
}

/// State shared by all sessions.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: RelayConfig,
    pub(crate) registry: registry::Registry,
    pub(crate) fingerprint: String,
}

/// Serves agents on `listener` until `shutdown` is cancelled, then tells every agent, closes
/// every tunnel and waits (up to the configured grace) for sessions to end.
pub async fn run(
    listener: TcpListener,
    config: RelayConfig,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    let acceptor = TlsAcceptor::from(config.identity.server_config()?);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(config.max_handshakes.max(1)));
    let shared = Arc::new(Shared {
        fingerprint: config.identity.fingerprint().to_string(),
        config,
        registry: registry::Registry::default(),
    });
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "control accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => continue,
                }
            }
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many handshakes in progress, closing");
            drop(tcp);
            continue;
        };
        tracker.spawn(session::serve(
            tcp,
            peer,
            shared.clone(),
            acceptor.clone(),
            shutdown.clone(),
            permit,
        ));
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(shared.config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("sessions still running after the shutdown grace period");
    }
    tracing::info!("relay stopped");
    Ok(())
}
