//! Settings of the long-poll proxy, with the defaults of `docs/protocols/longpoll.md`
//! section 5.

use std::time::Duration;

/// Everything `tube longpoll` can be told. Build with [`LongpollConfig::new`] and adjust.
#[derive(Debug, Clone)]
pub struct LongpollConfig {
    /// Backend URLs (`http://...`), in order of preference for failover.
    pub backends: Vec<String>,
    /// How long `POST /` waits for a packet before answering empty.
    pub poll_timeout: Duration,
    /// How long a token stays valid after it was issued.
    pub token_ttl: Duration,
    /// A client without a request for this long is forgotten with its buffers.
    pub idle_timeout: Duration,
    /// Deadline of one request to a backend (a backend may hold a fetch for less).
    pub backend_timeout: Duration,
    /// First rest of a failed backend; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest rest of a failed backend.
    pub backoff_max: Duration,
    /// Largest request body.
    pub max_body: usize,
    /// Packets buffered per client and direction.
    pub max_client_packets: usize,
    /// Bytes buffered per client and direction.
    pub max_client_bytes: usize,
    /// Bytes buffered for all clients together, both directions.
    pub max_total_bytes: usize,
    /// Clients known at once.
    pub max_clients: usize,
    /// Live tokens per client id (the oldest is dropped).
    pub max_tokens_per_client: usize,
}

impl LongpollConfig {
    /// Defaults for the given backends.
    pub fn new(backends: Vec<String>) -> Self {
        LongpollConfig {
            backends,
            poll_timeout: Duration::from_secs(25),
            token_ttl: Duration::from_secs(24 * 3600),
            idle_timeout: Duration::from_secs(600),
            backend_timeout: Duration::from_secs(60),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            max_body: 1 << 20,
            max_client_packets: 256,
            max_client_bytes: 4 << 20,
            max_total_bytes: 256 << 20,
            max_clients: 100_000,
            max_tokens_per_client: 8,
        }
    }
}
