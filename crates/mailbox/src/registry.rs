//! The peer's shared state: registered clients with their RAM queues, the rate limiters, and
//! one function per client operation (register, deliver, fetch, ack, certificate), used alike
//! by the TCP sessions (`peer`) and the HTTP backend (`http`), so both transports follow the
//! same checks and limits. Each operation takes the lock once and never awaits under it.
//!
//! A client may be served over TCP and over HTTP at once; the newest *receiver* takes over: a
//! TCP registration closes the client's older TCP connection and ends its HTTP receiving (the
//! receiving session's next fetch is told 7006), and a FETCH over HTTP closes its TCP
//! connection (and tells an older receiving HTTP session). HTTP sessions stay valid for sending
//! either way.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tube_proto::mailbox::{Fingerprint, MailboxError, MessageId, Packet};
use tube_proto::ratelimit::{KeyedLimiter, source_key};

use crate::http::{HttpSide, ReplayCache, Session};
use crate::peer::PeerConfig;

/// Keys the rate limiters track at most, each.
pub(crate) const LIMITER_KEYS: usize = 65_536;

/// At the client limit, an idle registration gives way to a new client only once it has been
/// idle this long (a client between two connections keeps its place): the default of
/// `PeerConfig::evict_after_idle`.
pub(crate) const EVICT_MIN_IDLE: Duration = Duration::from_secs(600);

/// Idle registrations picked, oldest first, by one scan of all clients at the client limit;
/// the next new clients take their places without scanning again.
const EVICT_BATCH: usize = 1024;

/// At the client limit with no idle registration to give way, all clients are scanned again
/// at most this often.
const EVICT_RESCAN: Duration = Duration::from_secs(1);

/// One message waiting for its recipient.
pub(crate) struct Queued {
    pub(crate) seq: u64,
    pub(crate) received_ms: u64,
    pub(crate) at: Instant,
    pub(crate) blob: Bytes,
}

/// A registered client: its certificate, its queue, and how it is reached.
pub(crate) struct Client {
    pub(crate) cert: Bytes,
    pub(crate) queue: VecDeque<Queued>,
    pub(crate) bytes: usize,
    pub(crate) next_seq: u64,
    /// The registered TCP connection that receives pushes once it has fetched.
    pub(crate) live: Option<Live>,
    /// Tokens, cursor and remembered answers of the HTTP backend.
    pub(crate) http: HttpSide,
    /// Woken when a message is stored for this client or its receiving changes (HTTP fetches
    /// held open wait on it).
    pub(crate) wake: Arc<Notify>,
    /// When the client registered, or was last seen holding something (see [`Client::idle`]);
    /// refreshed by registrations and by every sweep that finds it not idle.
    pub(crate) active: Instant,
}

impl Client {
    fn new(cert: Bytes, now: Instant) -> Self {
        Self {
            cert,
            queue: VecDeque::new(),
            bytes: 0,
            next_seq: 1,
            live: None,
            http: HttpSide::default(),
            wake: Arc::new(Notify::new()),
            active: now,
        }
    }

    /// Nothing holds the registration: no TCP connection, no HTTP session, no queued message.
    pub(crate) fn idle(&self) -> bool {
        self.live.is_none() && self.http.sessions() == 0 && self.queue.is_empty()
    }
}

/// A TCP connection registered for a client.
pub(crate) struct Live {
    pub(crate) conn: u64,
    pub(crate) tx: mpsc::Sender<Packet>,
    pub(crate) kill: CancellationToken,
    pub(crate) listening: bool,
}

/// Who a rate limit per source counts: the TCP connection's address (counted as its
/// [`source_key`]), or over HTTP (where every request comes from the proxy's address) the
/// authenticated client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    Addr(IpAddr),
    Client(Fingerprint),
}

impl Source {
    /// The key the limiter counts: an address as its source, a client as itself.
    fn key(self) -> Self {
        match self {
            Source::Addr(ip) => Source::Addr(source_key(ip)),
            client => client,
        }
    }
}

/// How a registration reaches the client.
pub(crate) enum Via {
    Tcp(Live),
    Http,
}

/// Who asks for the queue.
pub(crate) enum Fetcher<'a> {
    /// A TCP connection: the backlog is written to `tx`, then pushes follow.
    Tcp {
        conn: u64,
        tx: &'a mpsc::Sender<Packet>,
    },
    /// An HTTP session: it becomes the receiver, from the oldest unacknowledged message.
    Http(Session),
}

/// What a fetch did.
pub(crate) enum Fetched {
    /// The backlog has this many messages (sent, or to be fetched over HTTP).
    Backlog(u32),
    /// The TCP connection's outbox is full: it must be closed.
    Overflow,
    /// The client is not registered (any more).
    Unknown,
}

pub(crate) struct Inner {
    pub(crate) clients: HashMap<Fingerprint, Client>,
    pub(crate) total_bytes: usize,
    /// Registrations per source, keyed by [`source_key`].
    pub(crate) reg_ip: KeyedLimiter<IpAddr>,
    pub(crate) reg_fp: KeyedLimiter<Fingerprint>,
    pub(crate) del_src: KeyedLimiter<Source>,
    pub(crate) del_fp: KeyedLimiter<Fingerprint>,
    pub(crate) expired: u64,
    pub(crate) delivered: u64,
    pub(crate) refused_full: u64,
    /// HTTP tokens of all clients together.
    pub(crate) tokens: usize,
    /// Registrations forgotten because nothing held them (see the module docs).
    pub(crate) evicted: u64,
    /// Idle registrations that may give way to new clients, the oldest last; each is checked
    /// again (still there, still idle, not active since) when its turn comes.
    evictable: Vec<(Instant, Fingerprint)>,
    /// When all clients were last scanned for `evictable`.
    scanned: Option<Instant>,
}

impl Inner {
    pub(crate) fn new(config: &PeerConfig, keys: usize) -> Self {
        Self {
            clients: HashMap::new(),
            total_bytes: 0,
            reg_ip: KeyedLimiter::new(config.register_limit, keys),
            reg_fp: KeyedLimiter::new(config.register_limit, keys),
            del_src: KeyedLimiter::new(config.deliver_limit, keys),
            del_fp: KeyedLimiter::new(config.deliver_limit, keys),
            expired: 0,
            delivered: 0,
            refused_full: 0,
            tokens: 0,
            evicted: 0,
            evictable: Vec::new(),
            scanned: None,
        }
    }

    /// Makes room for one new client by forgetting the registration idle longest, if one has
    /// been idle at least `min_idle`; `false` if none may go.
    fn evict_one(&mut self, now: Instant, min_idle: Duration) -> bool {
        loop {
            while let Some((at, fp)) = self.evictable.pop() {
                let gone = self
                    .clients
                    .get(&fp)
                    .is_some_and(|c| c.active == at && c.idle());
                if gone {
                    self.clients.remove(&fp);
                    self.evicted += 1;
                    return true;
                }
            }
            let recent = self
                .scanned
                .is_some_and(|t| now.saturating_duration_since(t) < EVICT_RESCAN);
            if recent {
                return false;
            }
            self.scanned = Some(now);
            let mut idle: Vec<(Instant, Fingerprint)> = self
                .clients
                .iter()
                .filter(|(_, c)| c.idle() && now.saturating_duration_since(c.active) >= min_idle)
                .map(|(fp, c)| (c.active, *fp))
                .collect();
            if idle.is_empty() {
                return false;
            }
            if idle.len() > EVICT_BATCH {
                idle.select_nth_unstable(EVICT_BATCH - 1);
                idle.truncate(EVICT_BATCH);
            }
            // Newest first, so `pop` takes the oldest.
            idle.sort_unstable_by(|a, b| b.cmp(a));
            self.evictable = idle;
        }
    }
}

pub(crate) struct Shared {
    pub(crate) config: PeerConfig,
    pub(crate) inner: Mutex<Inner>,
    /// Open TCP connections.
    pub(crate) connections: AtomicU64,
    /// Signatures of recent HTTP registrations (replay protection).
    pub(crate) replay: Mutex<ReplayCache>,
    /// HTTP fetches held open at once, at most `max_connections`.
    pub(crate) held: Semaphore,
}

impl Shared {
    pub(crate) fn new(config: PeerConfig) -> Self {
        let inner = Inner::new(&config, LIMITER_KEYS);
        let held = Semaphore::new(config.max_connections);
        Self {
            config,
            inner: Mutex::new(inner),
            connections: AtomicU64::new(0),
            replay: Mutex::new(ReplayCache::default()),
            held,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the maps consistent; keep serving after a panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a registration attempt from `ip` against the limit per source ([`source_key`]):
    /// `Err` is how long to wait.
    pub(crate) fn check_register_source(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        self.lock().reg_ip.check(&source_key(ip), now)
    }

    /// Registers `fp` (its proof already checked): rate limit per fingerprint, client limit.
    /// Over TCP the connection becomes the client's live one (see the module docs for
    /// takeovers). `Err` is the refusal to send.
    pub(crate) fn register(
        &self,
        fp: Fingerprint,
        cert: Bytes,
        now: Instant,
        via: Via,
    ) -> Result<(), Packet> {
        let mut st = self.lock();
        if let Err(wait) = st.reg_fp.check(&fp, now) {
            let why = format!("too many registrations, retry in {}s", wait.as_secs() + 1);
            return Err(Packet::error(MailboxError::RateLimited, why));
        }
        if !st.clients.contains_key(&fp)
            && st.clients.len() >= self.config.max_clients
            && !st.evict_one(now, self.config.evict_after_idle)
        {
            return Err(Packet::error(MailboxError::Busy, "client limit reached"));
        }
        // A copy: `cert` may share the connection's whole read buffer, and a registration
        // may live for as long as the peer runs.
        let c = st
            .clients
            .entry(fp)
            .or_insert_with(|| Client::new(Bytes::copy_from_slice(&cert), now));
        c.active = now;
        if let Via::Tcp(live) = via {
            let conn = live.conn;
            // The newest connection of a client wins; an older one is closed.
            if let Some(old) = c.live.replace(live)
                && old.conn != conn
            {
                old.kill.cancel();
            }
            if c.http.end_receiving() {
                c.wake.notify_waiters();
            }
        }
        tracing::debug!(client_fp = %hex::encode(&fp[..8]), "registered");
        Ok(())
    }

    /// The TCP connection `conn` receives for `fp` no more (it ended, or it registered another
    /// client): `fp` is idle from now on if nothing else holds it.
    pub(crate) fn release(&self, fp: &Fingerprint, conn: u64, now: Instant) {
        let mut st = self.lock();
        if let Some(c) = st.clients.get_mut(fp)
            && c.live.as_ref().is_some_and(|l| l.conn == conn)
        {
            c.live = None;
            c.active = now;
        }
    }

    /// Stores a message for `to` and pushes it to a listening TCP connection: STORED, or the
    /// ERROR to send. `key` (HTTP: the sender and a hash of its `Idempotency-Key`) makes a
    /// repeated delivery answer STORED again without storing twice.
    pub(crate) fn deliver(
        &self,
        src: Source,
        to: Fingerprint,
        id: MessageId,
        blob: Bytes,
        now: Instant,
        key: Option<(Fingerprint, [u8; 32])>,
    ) -> Packet {
        let config = &self.config;
        let mut st = self.lock();
        if let Some((sender, k)) = &key
            && let Some(c) = st.clients.get(sender)
            && let Some(id) = c.http.stored(k)
        {
            return Packet::Stored { id };
        }
        let limited = st
            .del_src
            .check(&src.key(), now)
            .and_then(|()| st.del_fp.check(&to, now));
        if let Err(wait) = limited {
            let why = format!("too many deliveries, retry in {}s", wait.as_secs() + 1);
            return Packet::error(MailboxError::RateLimited, why);
        }
        expire(&mut st, &to, now, config.max_age);
        let total = st.total_bytes;
        let Some(c) = st.clients.get_mut(&to) else {
            return Packet::error(MailboxError::UnknownRecipient, "no such recipient here");
        };
        let full = c.queue.len() >= config.max_queue_messages
            || c.bytes + blob.len() > config.max_queue_bytes
            || total + blob.len() > config.max_total_bytes;
        if full {
            st.refused_full += 1;
            return Packet::error(MailboxError::QueueFull, "the recipient's queue is full");
        }
        // Queued as a copy of exactly its bytes: the decoded blob shares the allocation of the
        // connection's read buffer (8 KiB or more, however small the blob) or of the HTTP
        // body, and the queue limits count `blob.len()` only.
        let blob = Bytes::copy_from_slice(&blob);
        let seq = c.next_seq;
        c.next_seq += 1;
        let received_ms = now_ms();
        let size = blob.len();
        c.bytes += size;
        let push = Packet::Message {
            seq,
            received_ms,
            blob: blob.clone(),
        };
        c.queue.push_back(Queued {
            seq,
            received_ms,
            at: now,
            blob,
        });
        if let Some(l) = &c.live
            && l.listening
            && l.tx.try_send(push).is_err()
        {
            l.kill.cancel();
        }
        c.wake.notify_waiters();
        st.total_bytes += size;
        st.delivered += 1;
        if let Some((sender, k)) = key
            && let Some(c) = st.clients.get_mut(&sender)
        {
            c.http.remember(k, id);
        }
        Packet::Stored { id }
    }

    /// Starts (again) from the oldest unacknowledged message of `fp`, for a TCP connection or
    /// for HTTP fetches (see [`Fetcher`]).
    pub(crate) fn fetch(&self, fp: &Fingerprint, now: Instant, who: Fetcher<'_>) -> Fetched {
        let mut st = self.lock();
        expire(&mut st, fp, now, self.config.max_age);
        let Some(c) = st.clients.get_mut(fp) else {
            return Fetched::Unknown;
        };
        c.active = now;
        let count = u32::try_from(c.queue.len()).unwrap_or(u32::MAX);
        match who {
            Fetcher::Tcp { conn, tx } => {
                // Under the lock, so no push can come between the backlog and the live stream.
                for m in &c.queue {
                    let p = Packet::Message {
                        seq: m.seq,
                        received_ms: m.received_ms,
                        blob: m.blob.clone(),
                    };
                    if tx.try_send(p).is_err() {
                        return Fetched::Overflow;
                    }
                }
                if let Some(l) = &mut c.live
                    && l.conn == conn
                {
                    l.listening = true;
                }
            }
            Fetcher::Http(session) => {
                if let Some(old) = c.live.take() {
                    old.kill.cancel();
                }
                c.http.start_receiving(session);
                c.wake.notify_waiters();
            }
        }
        Fetched::Backlog(count)
    }

    /// Forgets every message of `fp` up to and including `seq`.
    pub(crate) fn ack(&self, fp: &Fingerprint, seq: u64) {
        let mut st = self.lock();
        let mut freed = 0;
        if let Some(c) = st.clients.get_mut(fp) {
            while let Some(m) = c.queue.front()
                && m.seq <= seq
            {
                freed += m.blob.len();
                c.queue.pop_front();
            }
            c.bytes -= freed;
        }
        st.total_bytes -= freed;
    }

    /// CERT for a registered fingerprint, or ERROR 7003.
    pub(crate) fn cert(&self, fp: &Fingerprint) -> Packet {
        match self.lock().clients.get(fp).map(|c| c.cert.clone()) {
            Some(cert) => Packet::Cert { cert },
            None => Packet::error(MailboxError::UnknownRecipient, "no such recipient here"),
        }
    }

    /// Once a minute: expired messages, idle HTTP tokens, registrations nothing has held for
    /// `max_age`, stale rate-limit keys.
    pub(crate) fn sweep(&self, now: Instant) {
        let mut st = self.lock();
        let fps: Vec<Fingerprint> = st.clients.keys().copied().collect();
        for fp in fps {
            expire(&mut st, &fp, now, self.config.max_age);
        }
        crate::http::purge_tokens(&mut st, now, self.config.idle_timeout);
        let max_age = self.config.max_age;
        let before = st.clients.len();
        st.clients.retain(|_, c| {
            if !c.idle() {
                c.active = now;
                true
            } else {
                now.saturating_duration_since(c.active) < max_age
            }
        });
        let forgotten = before - st.clients.len();
        st.evicted += forgotten as u64;
        st.reg_ip.prune(now);
        st.reg_fp.prune(now);
        st.del_src.prune(now);
        st.del_fp.prune(now);
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Drops the messages of `fp` older than `max_age` (and counts them).
pub(crate) fn expire(st: &mut Inner, fp: &Fingerprint, now: Instant, max_age: Duration) {
    let Some(c) = st.clients.get_mut(fp) else {
        return;
    };
    let mut freed = 0;
    let mut n = 0;
    while let Some(m) = c.queue.front()
        && now.duration_since(m.at) > max_age
    {
        freed += m.blob.len();
        n += 1;
        c.queue.pop_front();
    }
    c.bytes -= freed;
    st.total_bytes -= freed;
    st.expired += n;
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use tube_proto::mailbox::{decode, encode};
    use tube_proto::ratelimit::RateLimit;

    #[test]
    fn messages_older_than_max_age_are_dropped_and_counted() {
        let config = PeerConfig::default();
        let mut st = Inner::new(&config, 8);
        let t0 = Instant::now();
        let fp = [1u8; 32];
        let mut c = Client::new(Bytes::new(), t0);
        for (i, age_days) in [(1u64, 8u64), (2, 7), (3, 1)] {
            c.queue.push_back(Queued {
                seq: i,
                received_ms: 0,
                at: t0 + Duration::from_secs((8 - age_days) * 24 * 3600),
                blob: Bytes::from(vec![0u8; 10]),
            });
        }
        c.bytes = 30;
        c.next_seq = 4;
        st.clients.insert(fp, c);
        st.total_bytes = 30;
        // Eight days after t0: the first is 8 days old (dropped), the second exactly 7 (kept).
        expire(
            &mut st,
            &fp,
            t0 + Duration::from_secs(8 * 24 * 3600),
            config.max_age,
        );
        let c = &st.clients[&fp];
        assert_eq!(
            c.queue.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!((c.bytes, st.total_bytes, st.expired), (20, 20, 1));
    }

    fn shared() -> Shared {
        Shared::new(PeerConfig::default())
    }

    #[test]
    fn an_http_fetch_takes_over_from_tcp_and_a_tcp_registration_back() {
        let s = shared();
        let now = Instant::now();
        let fp = [7u8; 32];
        let (tx, _rx) = mpsc::channel(4);
        let kill = CancellationToken::new();
        let live = Live {
            conn: 1,
            tx: tx.clone(),
            kill: kill.clone(),
            listening: false,
        };
        s.register(fp, Bytes::from_static(b"c"), now, Via::Tcp(live))
            .unwrap();
        s.register(fp, Bytes::from_static(b"c"), now, Via::Http)
            .unwrap();
        assert!(
            !kill.is_cancelled(),
            "an HTTP registration alone takes nothing over"
        );
        assert!(matches!(
            s.fetch(&fp, now, Fetcher::Http([1; 8])),
            Fetched::Backlog(0)
        ));
        assert!(
            kill.is_cancelled(),
            "the HTTP fetch closed the TCP connection"
        );
        let live = Live {
            conn: 2,
            tx,
            kill: CancellationToken::new(),
            listening: false,
        };
        s.register(fp, Bytes::from_static(b"c"), now, Via::Tcp(live))
            .unwrap();
        assert!(
            !s.lock().clients.get_mut(&fp).unwrap().http.end_receiving(),
            "TCP took receiving over already"
        );
    }

    #[test]
    fn a_repeated_idempotency_key_is_stored_once() {
        let s = shared();
        let now = Instant::now();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        for fp in [a, b] {
            s.register(fp, Bytes::from_static(b"c"), now, Via::Http)
                .unwrap();
        }
        let key = Some((a, [9u8; 32]));
        let blob = Bytes::from_static(b"sealed");
        for _ in 0..3 {
            let p = s.deliver(Source::Client(a), b, [3; 16], blob.clone(), now, key);
            assert_eq!(p, Packet::Stored { id: [3; 16] });
        }
        assert_eq!(s.lock().clients[&b].queue.len(), 1);
        s.deliver(Source::Client(a), b, [4; 16], blob, now, Some((a, [8; 32])));
        assert_eq!(s.lock().clients[&b].queue.len(), 2);
        s.ack(&b, 1);
        assert_eq!(s.lock().clients[&b].queue.len(), 1);
        assert_eq!(s.cert(&[5; 32]).kind(), 15);
    }

    /// The first packet on a connection's read buffer (8 KiB, as the framed reader starts).
    fn decoded(p: &Packet) -> (Packet, BytesMut) {
        let mut buf = BytesMut::with_capacity(READ_BUF);
        encode(p, &mut buf);
        let p = decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        (p, buf)
    }

    const READ_BUF: usize = 8 * 1024;

    #[test]
    fn a_queued_blob_does_not_keep_the_read_buffer_alive() {
        let s = shared();
        let now = Instant::now();
        let to = [3u8; 32];
        s.register(to, Bytes::from_static(b"c"), now, Via::Http)
            .unwrap();
        let deliver = Packet::Deliver {
            to,
            id: [1; 16],
            blob: Bytes::from_static(b"tiny"),
        };
        let (Packet::Deliver { to, id, blob }, mut buf) = decoded(&deliver) else {
            panic!("not a deliver");
        };
        // Decoding is zero-copy: while the decoded blob lives, the buffer is shared.
        assert!(!buf.try_reclaim(READ_BUF));
        let answer = s.deliver(Source::Client([9; 32]), to, id, blob, now, None);
        assert_eq!(answer, Packet::Stored { id });
        assert!(
            buf.try_reclaim(READ_BUF),
            "the queued 4-byte blob still holds the whole read buffer"
        );
        let st = s.lock();
        assert_eq!(&st.clients[&to].queue[0].blob[..], b"tiny");
        assert_eq!((st.clients[&to].bytes, st.total_bytes), (4, 4));
    }

    #[test]
    fn a_registered_certificate_does_not_keep_the_read_buffer_alive() {
        let s = shared();
        let register = Packet::Register {
            cert: Bytes::from_static(b"\x30\x03der"),
        };
        let (Packet::Register { cert }, mut buf) = decoded(&register) else {
            panic!("not a register");
        };
        assert!(!buf.try_reclaim(READ_BUF));
        s.register([4; 32], cert, Instant::now(), Via::Http)
            .unwrap();
        assert!(
            buf.try_reclaim(READ_BUF),
            "the registered certificate still holds the whole read buffer"
        );
        let cert = Bytes::from_static(b"\x30\x03der");
        assert_eq!(s.cert(&[4; 32]), Packet::Cert { cert });
    }

    /// A live TCP connection for a registration (its receiving end kept by the caller).
    fn live(conn: u64) -> (Live, mpsc::Receiver<Packet>) {
        let (tx, rx) = mpsc::channel(4);
        let kill = CancellationToken::new();
        let l = Live {
            conn,
            tx,
            kill,
            listening: false,
        };
        (l, rx)
    }

    fn register(s: &Shared, fp: Fingerprint, now: Instant, via: Via) -> Result<(), u16> {
        s.register(fp, Bytes::from_static(b"c"), now, via)
            .map_err(|p| match p {
                Packet::Error { code, .. } => code,
                other => panic!("{other:?}"),
            })
    }

    #[test]
    fn registrations_nothing_holds_are_forgotten_after_max_age() {
        let s = shared();
        let max_age = s.config.max_age;
        let t0 = Instant::now();
        let (idle, queued, connected) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let (l, _rx) = live(1);
        register(&s, idle, t0, Via::Http).unwrap();
        register(&s, queued, t0, Via::Http).unwrap();
        register(&s, connected, t0, Via::Tcp(l)).unwrap();
        let blob = Bytes::from_static(b"m");
        let stored = s.deliver(Source::Client(idle), queued, [1; 16], blob, t0, None);
        assert_eq!(stored, Packet::Stored { id: [1; 16] });
        s.sweep(t0 + max_age - Duration::from_secs(1));
        {
            let st = s.lock();
            assert_eq!((st.clients.len(), st.evicted), (3, 0));
        }
        s.sweep(t0 + max_age + Duration::from_secs(1));
        let st = s.lock();
        assert!(!st.clients.contains_key(&idle));
        assert!(st.clients.contains_key(&connected));
        // The message expired in this sweep (older than max_age): from now on the queue holds
        // nothing, and its own max_age starts.
        assert!(st.clients[&queued].idle());
        assert_eq!((st.clients.len(), st.evicted, st.expired), (2, 1, 1));
    }

    #[test]
    fn at_the_client_limit_a_new_client_takes_the_place_of_the_one_idle_longest() {
        let s = Shared::new(PeerConfig {
            max_clients: 3,
            ..PeerConfig::default()
        });
        let min = s.config.evict_after_idle;
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let fp = |n: u8| [n; 32];
        register(&s, fp(1), at(0), Via::Http).unwrap();
        register(&s, fp(2), at(1), Via::Http).unwrap();
        register(&s, fp(3), at(2), Via::Http).unwrap();
        // Nobody idle long enough yet.
        assert_eq!(register(&s, fp(4), at(5), Via::Http), Err(7007));
        // Client 1 comes back (registers again): it is active now, so 2 is the oldest.
        register(&s, fp(1), at(3), Via::Http).unwrap();
        let later = min.as_secs() + 10;
        register(&s, fp(4), at(later), Via::Http).unwrap();
        assert!(!s.lock().clients.contains_key(&fp(2)));
        // Client 3 gets a message (a queue holds it); 1 is next, then nobody.
        let blob = Bytes::from_static(b"m");
        let p = s.deliver(Source::Client(fp(4)), fp(3), [1; 16], blob, at(later), None);
        assert_eq!(p, Packet::Stored { id: [1; 16] });
        register(&s, fp(5), at(later + 1), Via::Http).unwrap();
        assert!(!s.lock().clients.contains_key(&fp(1)));
        assert_eq!(register(&s, fp(6), at(later + 2), Via::Http), Err(7007));
        // A connected client is never idle, however long ago it registered.
        let (l, _rx) = live(9);
        register(&s, fp(4), at(later + 3), Via::Tcp(l)).unwrap();
        let much_later = later + 3 + 2 * min.as_secs();
        register(&s, fp(6), at(much_later), Via::Http).unwrap();
        let st = s.lock();
        let mut left: Vec<u8> = st.clients.keys().map(|k| k[0]).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            vec![3, 4, 6],
            "5 gave way; 3 (queued) and 4 (connected) stay"
        );
        assert_eq!(st.evicted, 3);
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_in_one_ipv6_64_share_the_per_source_limits() {
        let one = RateLimit {
            burst: 1,
            period: Duration::from_secs(60),
        };
        let s = Shared::new(PeerConfig {
            register_limit: one,
            deliver_limit: one,
            ..PeerConfig::default()
        });
        let now = Instant::now();
        // Registrations: the whole /64 is one source, and one limiter key.
        assert!(s.check_register_source(ip("2001:db8:1:2::1"), now).is_ok());
        for host in 2..100u16 {
            let a = ip(&format!("2001:db8:1:2:{host:x}:{host:x}::1"));
            assert!(s.check_register_source(a, now).is_err(), "{a}");
        }
        assert!(s.check_register_source(ip("2001:db8:1:3::1"), now).is_ok());
        assert!(s.check_register_source(ip("192.0.2.7"), now).is_ok());
        assert!(
            s.check_register_source(ip("::ffff:192.0.2.7"), now)
                .is_err()
        );
        assert_eq!(s.lock().reg_ip.len(), 3);
        // Deliveries (each to another recipient, so the per-recipient limit stays out of it):
        // the first passes the limit (and finds nobody), the next from the same /64 is refused.
        let deliver = |from: &str, to: u8| {
            let p = s.deliver(
                Source::Addr(ip(from)),
                [to; 32],
                [0; 16],
                Bytes::from_static(b"x"),
                now,
                None,
            );
            match p {
                Packet::Error { code, .. } => code,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(deliver("2001:db8:1:2::1", 1), 7003);
        assert_eq!(deliver("2001:db8:1:2:ffff::2", 2), 7005);
        assert_eq!(deliver("2001:db8:1:3::1", 3), 7003);
        assert_eq!(s.lock().del_src.len(), 2);
    }
}
