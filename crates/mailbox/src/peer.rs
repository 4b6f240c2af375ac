//! The peer (`tube peer`, seed 003): clients register with it by certificate (and prove they
//! hold its key), anyone delivers sealed messages for its registered clients, and it keeps
//! them in RAM until the recipient fetches and acknowledges them, pushing each new one over the
//! recipient's live connection.
//!
//! Nothing about clients or messages is ever written to disk: a restart forgets every queue
//! and registration (seed). Every queue is bounded (count, bytes, age per recipient, and bytes
//! overall); a full queue refuses the delivery with 7004, nothing is dropped silently.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tube_net::tokio_rustls::TlsAcceptor;
use tube_proto::mailbox::{Fingerprint, MailboxError, Packet, proof_message};
use tube_proto::ratelimit::{KeyedLimiter, RateLimit};

use crate::crypto;
use crate::wire::{self, Stream};

/// What a peer takes. [`PeerConfig::default`] gives the documented defaults.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Serve TLS 1.3 with this certificate instead of plain TCP.
    pub tls: Option<tube_net::Identity>,
    /// Messages queued for one recipient at most.
    pub max_queue_messages: usize,
    /// Bytes queued for one recipient at most.
    pub max_queue_bytes: usize,
    /// Age after which an unfetched message is dropped (and counted as expired).
    pub max_age: Duration,
    /// Bytes queued for all recipients together at most.
    pub max_total_bytes: usize,
    /// Registered clients at most.
    pub max_clients: usize,
    /// Open connections at most; more are closed at once.
    pub max_connections: usize,
    /// A connection that sends nothing this long is closed (clients keep alive every 2 min).
    pub idle_timeout: Duration,
    /// Time from accept to a completed TLS handshake.
    pub handshake_timeout: Duration,
    /// Registrations per source address and per fingerprint.
    pub register_limit: RateLimit,
    /// Deliveries per source address and per recipient.
    pub deliver_limit: RateLimit,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            tls: None,
            max_queue_messages: 1000,
            max_queue_bytes: 8 << 20,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_total_bytes: 256 << 20,
            max_clients: 100_000,
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(300),
            handshake_timeout: Duration::from_secs(10),
            register_limit: RateLimit::per_minute(30),
            deliver_limit: RateLimit::per_minute(600),
        }
    }
}

/// Packets queued towards one connection before it counts as too slow (it is then closed; its
/// messages stay queued until acknowledged).
const OUTBOX: usize = 1024;

/// Keys the rate limiters track at most, each.
const LIMITER_KEYS: usize = 65_536;

struct Queued {
    seq: u64,
    received_ms: u64,
    at: Instant,
    blob: Bytes,
}

struct Client {
    cert: Bytes,
    queue: VecDeque<Queued>,
    bytes: usize,
    next_seq: u64,
    /// The registered connection that receives pushes once it has fetched.
    live: Option<Live>,
}

struct Live {
    conn: u64,
    tx: mpsc::Sender<Packet>,
    kill: CancellationToken,
    listening: bool,
}

struct Inner {
    clients: HashMap<Fingerprint, Client>,
    total_bytes: usize,
    reg_ip: KeyedLimiter<IpAddr>,
    reg_fp: KeyedLimiter<Fingerprint>,
    del_ip: KeyedLimiter<IpAddr>,
    del_fp: KeyedLimiter<Fingerprint>,
    expired: u64,
    delivered: u64,
    refused_full: u64,
}

struct Shared {
    config: PeerConfig,
    inner: Mutex<Inner>,
    connections: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the maps consistent; keep serving after a panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counters of a running peer (tests and the admin view).
#[derive(Clone)]
pub struct PeerState(Arc<Shared>);

impl std::fmt::Debug for PeerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerState").finish_non_exhaustive()
    }
}

impl PeerState {
    /// Registered clients.
    pub fn clients(&self) -> usize {
        self.0.lock().clients.len()
    }

    /// Messages queued for all recipients, and their bytes.
    pub fn queued(&self) -> (usize, usize) {
        let st = self.0.lock();
        (
            st.clients.values().map(|c| c.queue.len()).sum(),
            st.total_bytes,
        )
    }

    /// Messages stored since start, refused because a queue was full, and expired.
    pub fn counters(&self) -> (u64, u64, u64) {
        let st = self.0.lock();
        (st.delivered, st.refused_full, st.expired)
    }
}

/// A peer built from its config.
pub struct Peer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer").finish_non_exhaustive()
    }
}

/// Errors that stop a peer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] tube_net::TlsError),
}

impl Peer {
    /// A peer with `config`, not yet serving.
    pub fn new(config: PeerConfig) -> Self {
        let inner = Inner {
            clients: HashMap::new(),
            total_bytes: 0,
            reg_ip: KeyedLimiter::new(config.register_limit, LIMITER_KEYS),
            reg_fp: KeyedLimiter::new(config.register_limit, LIMITER_KEYS),
            del_ip: KeyedLimiter::new(config.deliver_limit, LIMITER_KEYS),
            del_fp: KeyedLimiter::new(config.deliver_limit, LIMITER_KEYS),
            expired: 0,
            delivered: 0,
            refused_full: 0,
        };
        Self {
            shared: Arc::new(Shared {
                config,
                inner: Mutex::new(inner),
                connections: AtomicU64::new(0),
            }),
        }
    }

    /// A view of the live state.
    pub fn state(&self) -> PeerState {
        PeerState(self.shared.clone())
    }

    /// Serves `listener` until `shutdown`; then tells every connection 7008 and closes it.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), PeerError> {
        let shared = self.shared;
        let acceptor = match &shared.config.tls {
            Some(id) => Some(TlsAcceptor::from(id.server_config()?)),
            None => None,
        };
        let tracker = TaskTracker::new();
        tracker.spawn(sweeper(shared.clone(), shutdown.clone()));
        let mut next_conn = 0u64;
        while let Some((tcp, addr)) = tube_net::accept(&listener, &shutdown, "peer").await {
            let open = shared.connections.load(Ordering::Relaxed);
            if open >= shared.config.max_connections as u64 {
                tracing::warn!(%addr, "connection limit reached, closing");
                continue;
            }
            shared.connections.fetch_add(1, Ordering::Relaxed);
            next_conn += 1;
            let (s, a, stop) = (shared.clone(), acceptor.clone(), shutdown.clone());
            let id = next_conn;
            tracker.spawn(async move {
                serve(&s, tcp, addr, a, id, stop).await;
                s.connections.fetch_sub(1, Ordering::Relaxed);
            });
        }
        drop(listener);
        tracker.close();
        let _ = timeout(Duration::from_secs(5), tracker.wait()).await;
        Ok(())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Drops expired messages once a minute (they are also dropped whenever a queue is touched).
async fn sweeper(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        let now = Instant::now();
        let mut st = shared.lock();
        let fps: Vec<Fingerprint> = st.clients.keys().copied().collect();
        for fp in fps {
            expire(&mut st, &fp, now, shared.config.max_age);
        }
        st.reg_ip.prune(now);
        st.reg_fp.prune(now);
        st.del_ip.prune(now);
        st.del_fp.prune(now);
    }
}

fn expire(st: &mut Inner, fp: &Fingerprint, now: Instant, max_age: Duration) {
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

/// Per-connection state.
struct Session {
    id: u64,
    addr: IpAddr,
    tx: mpsc::Sender<Packet>,
    kill: CancellationToken,
    /// A `register` waiting for its proof: the certificate and the challenge.
    pending: Option<(Bytes, [u8; 32])>,
    /// The fingerprint this connection registered.
    registered: Option<Fingerprint>,
}

/// How handling one packet ends.
enum Next {
    Go,
    /// Send this error, then close.
    Close(MailboxError, String),
}

async fn serve(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    addr: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    id: u64,
    shutdown: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let stream = match acceptor {
        None => Stream::Plain(tcp),
        Some(a) => match timeout(shared.config.handshake_timeout, a.accept(tcp)).await {
            Ok(Ok(tls)) => Stream::Server(Box::new(tls)),
            Ok(Err(e)) => {
                tracing::debug!(%addr, error = %e, "tls handshake failed");
                return;
            }
            Err(_) => return,
        },
    };
    let (mut sink, mut stream) = wire::conn(stream).split();
    let (tx, mut rx) = mpsc::channel::<Packet>(OUTBOX);
    let kill = shutdown.child_token();
    let writer_kill = kill.clone();
    let writer = tokio::spawn(async move {
        loop {
            let p = tokio::select! {
                p = rx.recv() => p,
                _ = writer_kill.cancelled() => None,
            };
            let Some(p) = p else { break };
            let close = matches!(p, Packet::Error { .. });
            if sink.send(p).await.is_err() {
                break;
            }
            if close {
                break;
            }
        }
        // Flush what is still queued when asked to stop, bounded.
        while let Ok(p) = rx.try_recv() {
            if timeout(Duration::from_secs(1), sink.send(p)).await.is_err() {
                break;
            }
        }
        let _ = timeout(Duration::from_secs(1), sink.close()).await;
        writer_kill.cancel();
    });
    let mut s = Session {
        id,
        addr: addr.ip(),
        tx,
        kill: kill.clone(),
        pending: None,
        registered: None,
    };
    let end = loop {
        let next = tokio::select! {
            _ = kill.cancelled() => {
                if shutdown.is_cancelled() {
                    break Some((MailboxError::ShuttingDown, "the peer is shutting down".into()));
                }
                break None;
            }
            p = timeout(shared.config.idle_timeout, stream.next()) => p,
        };
        let packet = match next {
            Err(_) => break None,
            Ok(None) => break None,
            Ok(Some(Err(e))) => break Some((MailboxError::Protocol, e.to_string())),
            Ok(Some(Ok(p))) => p,
        };
        match handle(shared, &mut s, packet) {
            Next::Go => {}
            Next::Close(code, why) => break Some((code, why)),
        }
    };
    if let Some((code, why)) = end {
        tracing::debug!(%addr, code = code as u16, reason = %why, "closing connection");
        // The writer closes after an error packet.
        let _ = s.tx.try_send(Packet::error(code, why));
    }
    if let Some(fp) = s.registered {
        let mut st = shared.lock();
        if let Some(c) = st.clients.get_mut(&fp)
            && c.live.as_ref().is_some_and(|l| l.conn == s.id)
        {
            c.live = None;
        }
    }
    drop(s);
    let _ = timeout(Duration::from_secs(2), writer).await;
    kill.cancel();
}

fn send(s: &Session, p: Packet) -> Next {
    if s.tx.try_send(p).is_err() {
        // The client does not read: close it (its queue keeps everything unacknowledged).
        s.kill.cancel();
    }
    Next::Go
}

fn handle(shared: &Shared, s: &mut Session, packet: Packet) -> Next {
    let config = &shared.config;
    let now = Instant::now();
    match packet {
        Packet::Register { cert } => {
            if let Err(wait) = shared.lock().reg_ip.check(&s.addr, now) {
                let why = format!("too many registrations, retry in {}s", wait.as_secs() + 1);
                return send(s, Packet::error(MailboxError::RateLimited, why));
            }
            let mut nonce = [0u8; 32];
            if getrandom::fill(&mut nonce).is_err() {
                return Next::Close(MailboxError::Busy, "no randomness".into());
            }
            s.pending = Some((cert, nonce));
            send(s, Packet::Challenge { nonce })
        }
        Packet::Proof { signature } => {
            let Some((cert, nonce)) = s.pending.take() else {
                return Next::Close(MailboxError::Protocol, "proof without register".into());
            };
            let fp = crypto::fingerprint(&cert);
            if crypto::verify(&cert, &proof_message(&nonce, &fp), &signature).is_err() {
                return Next::Close(MailboxError::BadProof, "the proof does not verify".into());
            }
            let mut st = shared.lock();
            if let Err(wait) = st.reg_fp.check(&fp, now) {
                let why = format!("too many registrations, retry in {}s", wait.as_secs() + 1);
                drop(st);
                return send(s, Packet::error(MailboxError::RateLimited, why));
            }
            if !st.clients.contains_key(&fp) && st.clients.len() >= config.max_clients {
                drop(st);
                return send(s, Packet::error(MailboxError::Busy, "client limit reached"));
            }
            let c = st.clients.entry(fp).or_insert_with(|| Client {
                cert: cert.clone(),
                queue: VecDeque::new(),
                bytes: 0,
                next_seq: 1,
                live: None,
            });
            // The newest connection of a client wins; an older one is closed.
            if let Some(old) = c.live.replace(Live {
                conn: s.id,
                tx: s.tx.clone(),
                kill: s.kill.clone(),
                listening: false,
            }) && old.conn != s.id
            {
                old.kill.cancel();
            }
            drop(st);
            s.registered = Some(fp);
            tracing::debug!(client = %hex::encode(&fp[..8]), "registered");
            send(s, Packet::Ok)
        }
        Packet::Deliver { to, id, blob } => {
            let mut st = shared.lock();
            let limited = st
                .del_ip
                .check(&s.addr, now)
                .and_then(|()| st.del_fp.check(&to, now));
            if let Err(wait) = limited {
                drop(st);
                let why = format!("too many deliveries, retry in {}s", wait.as_secs() + 1);
                return send(s, Packet::error(MailboxError::RateLimited, why));
            }
            expire(&mut st, &to, now, config.max_age);
            let total = st.total_bytes;
            let Some(c) = st.clients.get_mut(&to) else {
                drop(st);
                return send(
                    s,
                    Packet::error(MailboxError::UnknownRecipient, "no such recipient here"),
                );
            };
            let full = c.queue.len() >= config.max_queue_messages
                || c.bytes + blob.len() > config.max_queue_bytes
                || total + blob.len() > config.max_total_bytes;
            if full {
                st.refused_full += 1;
                drop(st);
                return send(
                    s,
                    Packet::error(MailboxError::QueueFull, "the recipient's queue is full"),
                );
            }
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
            st.total_bytes += size;
            st.delivered += 1;
            drop(st);
            send(s, Packet::Stored { id })
        }
        Packet::Fetch => {
            let Some(fp) = s.registered else {
                return send(
                    s,
                    Packet::error(MailboxError::NotRegistered, "register first"),
                );
            };
            let mut st = shared.lock();
            expire(&mut st, &fp, now, config.max_age);
            let Some(c) = st.clients.get_mut(&fp) else {
                return Next::Close(MailboxError::NotRegistered, "registration lost".into());
            };
            // Under the lock, so no push can come between the backlog and the live stream.
            let mut count = 0u32;
            for m in &c.queue {
                let p = Packet::Message {
                    seq: m.seq,
                    received_ms: m.received_ms,
                    blob: m.blob.clone(),
                };
                if s.tx.try_send(p).is_err() {
                    s.kill.cancel();
                    return Next::Go;
                }
                count += 1;
            }
            if let Some(l) = &mut c.live
                && l.conn == s.id
            {
                l.listening = true;
            }
            drop(st);
            send(s, Packet::QueueEnd { count })
        }
        Packet::Ack { seq } => {
            let Some(fp) = s.registered else {
                return send(
                    s,
                    Packet::error(MailboxError::NotRegistered, "register first"),
                );
            };
            let mut st = shared.lock();
            let mut freed = 0;
            if let Some(c) = st.clients.get_mut(&fp) {
                while let Some(m) = c.queue.front()
                    && m.seq <= seq
                {
                    freed += m.blob.len();
                    c.queue.pop_front();
                }
                c.bytes -= freed;
            }
            st.total_bytes -= freed;
            Next::Go
        }
        Packet::Keepalive => send(s, Packet::Keepalive),
        Packet::CertRequest { fingerprint } => {
            let cert = shared
                .lock()
                .clients
                .get(&fingerprint)
                .map(|c| c.cert.clone());
            match cert {
                Some(cert) => send(s, Packet::Cert { cert }),
                None => send(
                    s,
                    Packet::error(MailboxError::UnknownRecipient, "no such recipient here"),
                ),
            }
        }
        other => Next::Close(
            MailboxError::Protocol,
            format!("packet type {} is not sent by clients", other.kind()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inner(config: &PeerConfig) -> Inner {
        Inner {
            clients: HashMap::new(),
            total_bytes: 0,
            reg_ip: KeyedLimiter::new(config.register_limit, 8),
            reg_fp: KeyedLimiter::new(config.register_limit, 8),
            del_ip: KeyedLimiter::new(config.deliver_limit, 8),
            del_fp: KeyedLimiter::new(config.deliver_limit, 8),
            expired: 0,
            delivered: 0,
            refused_full: 0,
        }
    }

    #[test]
    fn messages_older_than_max_age_are_dropped_and_counted() {
        let config = PeerConfig::default();
        let mut st = inner(&config);
        let t0 = Instant::now();
        let fp = [1u8; 32];
        let mut queue = VecDeque::new();
        for (i, age_days) in [(1u64, 8u64), (2, 7), (3, 1)] {
            queue.push_back(Queued {
                seq: i,
                received_ms: 0,
                at: t0 + Duration::from_secs((8 - age_days) * 24 * 3600),
                blob: Bytes::from(vec![0u8; 10]),
            });
        }
        st.clients.insert(
            fp,
            Client {
                cert: Bytes::new(),
                queue,
                bytes: 30,
                next_seq: 4,
                live: None,
            },
        );
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
}
