//! Settings of the long-poll proxy, with the defaults of `docs/protocols/longpoll.md`
//! section 5, and the check [`crate::Longpoll::new`] makes of them.

use std::time::Duration;

use tube_net::http::HttpLimits;

/// Longest value of any duration setting: far beyond a sensible one (100 years), and far
/// enough from the clock's range that "now + setting" cannot overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

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
    /// Time to receive the body of `POST /`, `/auth` or `/register` once its header is in:
    /// past it the request gets 408 and its connection closes.
    pub body_timeout: Duration,
    /// The client listener's header and keep-alive timeouts and its cap on open connections
    /// (one held request per online client; 10 000 by default, the mailbox peer's bound on
    /// held fetches, which the proxy keeps one of per online client).
    pub http: HttpLimits,
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
            body_timeout: Duration::from_secs(30),
            http: HttpLimits::default(),
        }
    }

    /// Refuses a duration setting over [`MAX_DURATION`] (backend URLs are checked when the
    /// proxy builds its HTTP client).
    pub fn validate(&self) -> Result<(), String> {
        let durations = [
            ("poll_timeout", self.poll_timeout),
            ("token_ttl", self.token_ttl),
            ("idle_timeout", self.idle_timeout),
            ("backend_timeout", self.backend_timeout),
            ("backoff_min", self.backoff_min),
            ("backoff_max", self.backoff_max),
            ("body_timeout", self.body_timeout),
            // Named as `tube longpoll`'s flags and file keys call them.
            ("header_timeout", self.http.header_timeout),
            ("http_idle_timeout", self.http.idle_timeout),
            ("write_timeout", self.http.write_timeout),
            ("http.shutdown_grace", self.http.shutdown_grace),
        ];
        match durations.iter().find(|(_, d)| *d > MAX_DURATION) {
            Some((name, _)) => Err(format!("{name} is longer than 100 years")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Longpoll;
    use proptest::prelude::*;
    use tokio_util::sync::CancellationToken;

    /// Short and long durations, the limit and just over it, and any at all.
    fn duration() -> impl Strategy<Value = Duration> {
        prop_oneof![
            8 => (0u64..1_000_000).prop_map(Duration::from_millis),
            1 => Just(MAX_DURATION),
            1 => Just(MAX_DURATION + Duration::from_nanos(1)),
            1 => Just(Duration::MAX),
            1 => (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        ]
    }

    /// Backend URLs: good ones, other schemes, and arbitrary text.
    fn backend() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => Just("http://127.0.0.1:8080/in".to_string()),
            3 => "http://[a-z0-9.]{1,20}(:[0-9]{1,6})?/[a-z]{0,5}",
            1 => "(https?|ftp|file|HTTP)://.{0,20}",
            1 => ".{0,40}",
        ]
    }

    fn is_http_url(s: &str) -> bool {
        reqwest::Url::parse(s).is_ok_and(|u| u.scheme() == "http")
    }

    proptest! {
        /// Whatever a config file or flags put in [`LongpollConfig`], building the proxy
        /// returns (never panics), and it refuses exactly: no backend, a backend that is not
        /// an `http://` URL, or a duration over [`MAX_DURATION`].
        #[test]
        fn longpoll_config_any_values_are_accepted_or_refused_without_panicking(
            backends in prop::collection::vec(backend(), 0..4),
            d in prop::array::uniform11(duration()),
            n in any::<[usize; 7]>(),
        ) {
            let config = LongpollConfig {
                backends: backends.clone(),
                poll_timeout: d[0],
                token_ttl: d[1],
                idle_timeout: d[2],
                backend_timeout: d[3],
                backoff_min: d[4],
                backoff_max: d[5],
                max_body: n[0],
                max_client_packets: n[1],
                max_client_bytes: n[2],
                max_total_bytes: n[3],
                max_clients: n[4],
                max_tokens_per_client: n[5],
                body_timeout: d[6],
                http: HttpLimits {
                    header_timeout: d[7],
                    idle_timeout: d[8],
                    max_connections: n[6],
                    shutdown_grace: d[9],
                    write_timeout: d[10],
                },
            };
            let valid = !backends.is_empty()
                && backends.iter().all(|b| is_http_url(b))
                && d.iter().all(|d| *d <= MAX_DURATION);
            let built = Longpoll::new(config, CancellationToken::new());
            prop_assert_eq!(built.is_ok(), valid, "{:?}", built.err());
        }
    }

    /// One duration setting of a config, to change it.
    type Setting = fn(&mut LongpollConfig) -> &mut Duration;

    #[test]
    fn longpoll_config_every_duration_over_100_years_is_refused_by_name() {
        let fields: [(&str, Setting); 11] = [
            ("poll_timeout", |c| &mut c.poll_timeout),
            ("token_ttl", |c| &mut c.token_ttl),
            ("idle_timeout", |c| &mut c.idle_timeout),
            ("backend_timeout", |c| &mut c.backend_timeout),
            ("backoff_min", |c| &mut c.backoff_min),
            ("backoff_max", |c| &mut c.backoff_max),
            ("body_timeout", |c| &mut c.body_timeout),
            ("header_timeout", |c| &mut c.http.header_timeout),
            ("http_idle_timeout", |c| &mut c.http.idle_timeout),
            ("write_timeout", |c| &mut c.http.write_timeout),
            ("http.shutdown_grace", |c| &mut c.http.shutdown_grace),
        ];
        for (name, field) in fields {
            let mut c = LongpollConfig::new(vec!["http://127.0.0.1:1/".into()]);
            *field(&mut c) = MAX_DURATION;
            assert_eq!(c.validate(), Ok(()), "{name} at the limit");
            *field(&mut c) = MAX_DURATION + Duration::from_nanos(1);
            let e = c.validate().expect_err(name);
            assert!(e.starts_with(name), "{e}");
            let e = Longpoll::new(c, CancellationToken::new()).expect_err(name);
            assert!(e.to_string().starts_with(name), "{e}");
        }
        let defaults = LongpollConfig::new(vec!["http://127.0.0.1:1/".into()]);
        assert_eq!(defaults.validate(), Ok(()));
    }
}
