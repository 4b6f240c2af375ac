//! The proxy's shared state: tokens, clients with their two buffers, the byte budget, the
//! wake-ups between request handlers and backend workers, counters, and the sweeper that
//! expires tokens and idle clients.
//!
//! One mutex guards tokens and clients; nothing awaits while holding it. Tokens are kept only
//! as SHA-256 digests, so the table never holds a usable secret and a lookup compares digests.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backends::Backends;
use crate::buffer::{Packet, Queue};
use crate::config::LongpollConfig;

/// SHA-256 of a token: the key of the token table.
pub(crate) type TokenKey = [u8; 32];

/// The digest a token is known by.
pub(crate) fn token_key(token: &str) -> TokenKey {
    Sha256::digest(token.as_bytes()).into()
}

/// Everything the handlers and workers share.
pub(crate) struct Shared {
    pub(crate) config: LongpollConfig,
    inner: Mutex<Inner>,
    pub(crate) metrics: Metrics,
    pub(crate) backends: Backends,
    /// Random per start: makes idempotency keys unique across restarts.
    pub(crate) instance: String,
    pub(crate) shutdown: CancellationToken,
    /// Round-robin start for `/auth` and `/register`.
    pub(crate) next_backend: AtomicUsize,
}

/// The tables behind the mutex.
pub(crate) struct Inner {
    pub(crate) tokens: HashMap<TokenKey, TokenEntry>,
    pub(crate) clients: HashMap<Arc<str>, Client>,
    /// Bytes in every buffer, both directions.
    pub(crate) total_bytes: usize,
    next_serial: u64,
}

/// One live token.
pub(crate) struct TokenEntry {
    pub(crate) client: Arc<str>,
    pub(crate) issued: Instant,
    /// The highest `Seq` stored from this token (extension; 0 = none yet).
    pub(crate) last_seq: u64,
}

/// Wake-ups of one client.
#[derive(Default)]
pub(crate) struct Signals {
    /// A packet arrived for the client, or a newer request superseded a waiting one
    /// (`notify_waiters`).
    pub(crate) down: Notify,
    /// A packet waits to go to a backend (`notify_one`).
    pub(crate) up: Notify,
    /// The client's incoming buffer has room again (`notify_waiters`).
    pub(crate) room: Notify,
    /// The client made a request (`notify_one`): fetching may resume.
    pub(crate) online: Notify,
}

/// One client of the proxy, known by the backend's client id.
pub(crate) struct Client {
    pub(crate) id: Arc<str>,
    /// Unique per client entry (idempotency keys).
    pub(crate) serial: u64,
    pub(crate) debug: bool,
    /// The backend that authorised it: its packets go there first.
    pub(crate) home: usize,
    /// Its live tokens' digests, oldest first.
    pub(crate) tokens: VecDeque<TokenKey>,
    /// The newest token, sent to backends with its packets (extension).
    pub(crate) backend_token: String,
    /// Packets towards the backends.
    pub(crate) up: Queue,
    /// Packets waiting for the client.
    pub(crate) down: Queue,
    pub(crate) last_seen: Instant,
    /// Requests of this client waiting right now.
    pub(crate) waiting: usize,
    /// Bumped by every request: an older waiting request answers empty.
    pub(crate) poll_gen: u64,
    pub(crate) signals: Arc<Signals>,
    /// Cancelled when the client is forgotten: ends its backend worker.
    pub(crate) stop: CancellationToken,
}

impl Client {
    /// Whether the proxy should keep a fetch open for it.
    pub(crate) fn online(&self, now: Instant, poll_timeout: Duration) -> bool {
        self.waiting > 0 || now.saturating_duration_since(self.last_seen) < poll_timeout
    }
}

/// What a new authorisation did.
pub(crate) enum Admitted {
    /// A new client: its worker must be started.
    New(Arc<Signals>, CancellationToken),
    /// A known client got one more token.
    Known,
    /// The proxy holds `max_clients` already.
    Full,
}

impl Shared {
    pub(crate) fn new(
        config: LongpollConfig,
        backends: Backends,
        shutdown: CancellationToken,
    ) -> Self {
        let mut nonce = [0u8; 8];
        // Without randomness keys of two starts could meet; the clock is a fallback.
        if getrandom::fill(&mut nonce).is_err() {
            nonce = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                .to_be_bytes();
        }
        Shared {
            config,
            inner: Mutex::new(Inner {
                tokens: HashMap::new(),
                clients: HashMap::new(),
                total_bytes: 0,
                next_serial: 1,
            }),
            metrics: Metrics::default(),
            backends,
            instance: hex::encode(nonce),
            shutdown,
            next_backend: AtomicUsize::new(0),
        }
    }

    /// Locks the tables. A panic elsewhere while holding the lock leaves consistent-enough
    /// counters, so a poisoned lock is taken over rather than spreading the panic.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a token the backend `home` issued for `id` with `permissions`.
    pub(crate) fn admit(&self, id: &str, token: &str, debug: bool, home: usize) -> Admitted {
        let now = Instant::now();
        let key = token_key(token);
        let mut g = self.lock();
        let inner = &mut *g;
        let known = inner.clients.contains_key(id);
        if !known && inner.clients.len() >= self.config.max_clients {
            return Admitted::Full;
        }
        // A token reissued to another client moves to this one.
        if let Some(old) = inner.tokens.remove(&key)
            && let Some(c) = inner.clients.get_mut(&old.client)
        {
            c.tokens.retain(|k| *k != key);
        }
        let admitted = if known {
            Admitted::Known
        } else {
            let serial = inner.next_serial;
            inner.next_serial += 1;
            let signals = Arc::new(Signals::default());
            let stop = self.shutdown.child_token();
            let id: Arc<str> = Arc::from(id);
            inner.clients.insert(
                id.clone(),
                Client {
                    id,
                    serial,
                    debug,
                    home,
                    tokens: VecDeque::new(),
                    backend_token: String::new(),
                    up: Queue::new(self.config.max_client_packets, self.config.max_client_bytes),
                    down: Queue::new(self.config.max_client_packets, self.config.max_client_bytes),
                    last_seen: now,
                    waiting: 0,
                    poll_gen: 0,
                    signals: signals.clone(),
                    stop: stop.clone(),
                },
            );
            Admitted::New(signals, stop)
        };
        let Some(client) = inner.clients.get_mut(id) else {
            return Admitted::Full;
        };
        client.debug = debug;
        client.home = home;
        client.last_seen = now;
        client.backend_token = token.to_string();
        client.tokens.push_back(key);
        let id = client.id.clone();
        let mut dropped = Vec::new();
        while client.tokens.len() > self.config.max_tokens_per_client.max(1) {
            if let Some(k) = client.tokens.pop_front() {
                dropped.push(k);
            }
        }
        for k in dropped {
            inner.tokens.remove(&k);
        }
        inner.tokens.insert(
            key,
            TokenEntry {
                client: id,
                issued: now,
                last_seq: 0,
            },
        );
        admitted
    }

    /// Forgets a client: its tokens, its buffers, its worker.
    pub(crate) fn forget(&self, id: &str) {
        let mut g = self.lock();
        forget_locked(&mut g, id);
    }

    /// Expires old tokens and idle clients until shutdown.
    pub(crate) async fn sweeper(self: Arc<Self>) {
        let every = (self.config.idle_timeout.min(self.config.token_ttl) / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(10));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let mut g = self.lock();
            let inner = &mut *g;
            let ttl = self.config.token_ttl;
            let expired: Vec<TokenKey> = inner
                .tokens
                .iter()
                .filter(|(_, t)| now.saturating_duration_since(t.issued) >= ttl)
                .map(|(k, _)| *k)
                .collect();
            for k in expired {
                if let Some(t) = inner.tokens.remove(&k)
                    && let Some(c) = inner.clients.get_mut(&t.client)
                {
                    c.tokens.retain(|x| *x != k);
                }
            }
            let idle = self.config.idle_timeout;
            let gone: Vec<Arc<str>> = inner
                .clients
                .values()
                .filter(|c| {
                    c.tokens.is_empty()
                        || (c.waiting == 0 && now.saturating_duration_since(c.last_seen) >= idle)
                })
                .map(|c| c.id.clone())
                .collect();
            for id in gone {
                forget_locked(inner, &id);
                self.metrics.expired.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Puts `packet` into the incoming buffer of `to`, waiting up to the backend timeout for
    /// room. Returns false when `to` is unknown or stays full (the packet is counted as
    /// undeliverable).
    pub(crate) async fn deliver_to_client(&self, to: &str, packet: Packet) -> bool {
        let deadline = Instant::now() + self.config.backend_timeout;
        let mut packet = packet;
        loop {
            let signals = {
                let mut g = self.lock();
                let inner = &mut *g;
                let Some(c) = inner.clients.get_mut(to) else {
                    break;
                };
                let cost = packet.cost();
                if inner.total_bytes + cost <= self.config.max_total_bytes {
                    match c.down.push(packet) {
                        Ok(_) => {
                            inner.total_bytes += cost;
                            let s = c.signals.clone();
                            drop(g);
                            s.down.notify_waiters();
                            self.metrics.to_client.fetch_add(1, Ordering::Relaxed);
                            return true;
                        }
                        Err(p) => packet = *p,
                    }
                }
                c.signals.clone()
            };
            let room = signals.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            // Room may have appeared between the unlock and `enable`: try again at once then.
            if self.has_room(to, packet.cost()) {
                continue;
            }
            tokio::select! {
                _ = &mut room => {}
                _ = tokio::time::sleep_until(deadline) => break,
                _ = self.shutdown.cancelled() => break,
            }
        }
        self.metrics.undeliverable.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(client = to, "packet for a full or unknown client dropped");
        false
    }

    fn has_room(&self, to: &str, cost: usize) -> bool {
        let g = self.lock();
        g.clients.get(to).is_some_and(|c| c.down.has_room(cost))
            && g.total_bytes + cost <= self.config.max_total_bytes
    }
}

/// Removes a client and everything it holds; the lock is held by the caller.
pub(crate) fn forget_locked(inner: &mut Inner, id: &str) {
    if let Some(c) = inner.clients.remove(id) {
        for k in &c.tokens {
            inner.tokens.remove(k);
        }
        inner.total_bytes = inner
            .total_bytes
            .saturating_sub(c.up.bytes() + c.down.bytes());
        c.stop.cancel();
        // Wake its waiting requests so they answer 401 now rather than at their timeout.
        c.signals.down.notify_waiters();
    }
}

/// Upper bounds (seconds) of the poll duration histogram.
pub(crate) const POLL_BUCKETS: [f64; 10] =
    [0.005, 0.025, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Counters for `/metrics`.
#[derive(Default)]
pub(crate) struct Metrics {
    pub(crate) polls: AtomicU64,
    pub(crate) poll_buckets: [AtomicU64; POLL_BUCKETS.len()],
    pub(crate) poll_micros: AtomicU64,
    pub(crate) to_backend: AtomicU64,
    pub(crate) to_client: AtomicU64,
    pub(crate) backend_failures: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) undeliverable: AtomicU64,
    pub(crate) expired: AtomicU64,
}

impl Metrics {
    /// Records one client request held for `held`.
    pub(crate) fn poll(&self, held: Duration) {
        self.polls.fetch_add(1, Ordering::Relaxed);
        self.poll_micros
            .fetch_add(held.as_micros() as u64, Ordering::Relaxed);
        let secs = held.as_secs_f64();
        for (i, upper) in POLL_BUCKETS.iter().enumerate() {
            if secs <= *upper {
                self.poll_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
