//! The HTTP long-poll packet proxy of seed 004 (`tube longpoll`), specified in
//! `docs/protocols/longpoll.md`.
//!
//! Clients that can only make HTTP requests authenticate through a backend (`POST /auth`,
//! `POST /register`) and then exchange packets with `POST /`: each request may carry one
//! packet and returns the oldest packet waiting for the client, holding the request open
//! until one arrives or the poll timeout passes. The proxy buffers both directions per client,
//! hands packets to the backends in order with failover and backoff, and keeps a fetch open at
//! a backend for every online client.
//!
//! - [`config`]: settings and defaults.
//! - `buffer`: the bounded per-client queues (pure).
//! - `state`: tokens, clients, wake-ups, expiry, counters.
//! - `routes`: the client endpoints.
//! - `backends`: backend choice, backoff and one request of the backend contract.
//! - `worker`: per client, the sender and the fetcher towards the backends.
//! - `admin`: `/metrics` and `/healthz`.

pub mod buffer;
pub mod config;

mod admin;
mod backends;
mod routes;
mod state;
mod worker;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::LongpollConfig;

/// Errors of starting the proxy.
#[derive(Debug, thiserror::Error)]
pub enum LongpollError {
    /// The configuration cannot work (no backend, a bad URL).
    #[error("{0}")]
    Config(String),
}

/// A configured proxy, ready to serve.
pub struct Longpoll {
    shared: Arc<state::Shared>,
}

impl std::fmt::Debug for Longpoll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Backend URLs may carry credentials: only their number is shown.
        f.debug_struct("Longpoll")
            .field("backends", &self.shared.config.backends.len())
            .finish()
    }
}

impl Longpoll {
    /// Checks `config`; the proxy stops when `shutdown` is cancelled.
    pub fn new(config: LongpollConfig, shutdown: CancellationToken) -> Result<Self, LongpollError> {
        config.validate().map_err(LongpollError::Config)?;
        let backends = backends::Backends::new(
            &config.backends,
            config.backend_timeout,
            config.backoff_min,
            config.backoff_max,
            config.max_body,
        )
        .map_err(LongpollError::Config)?;
        Ok(Longpoll {
            shared: Arc::new(state::Shared::new(config, backends, shutdown)),
        })
    }

    /// Serves clients on `listener` until shutdown, under [`LongpollConfig::http`]; waiting
    /// requests are answered empty then.
    pub async fn run(&self, listener: TcpListener) -> std::io::Result<()> {
        let sweeper = tokio::spawn(self.shared.clone().sweeper());
        tube_net::http::serve(
            listener,
            routes::router(self.shared.clone()),
            self.shared.config.http,
            self.shared.shutdown.clone(),
        )
        .await;
        sweeper.abort();
        Ok(())
    }

    /// Serves the admin routes on `listener` until shutdown (at most
    /// [`tube_net::http::ADMIN_MAX_CONNECTIONS`] connections).
    pub async fn run_admin(&self, listener: TcpListener) -> std::io::Result<()> {
        tube_net::http::serve(
            listener,
            admin::router(self.shared.clone()),
            tube_net::http::HttpLimits::admin(),
            self.shared.shutdown.clone(),
        )
        .await;
        Ok(())
    }
}
