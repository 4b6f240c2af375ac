//! The peer (`tube peer`, seed 003): clients register with it by certificate (and prove they
//! hold its key), anyone delivers sealed messages for its registered clients, and it keeps
//! them in RAM until the recipient fetches and acknowledges them, pushing each new one over the
//! recipient's live connection.
//!
//! Nothing about clients or messages is ever written to disk: a restart forgets every queue
//! and registration (seed). Every queue is bounded (count, bytes, age per recipient, and bytes
//! overall); a full queue refuses the delivery with 7004, nothing is dropped silently.
//!
//! This file is the TCP side (accept loop, one task per connection); the state and the
//! operations it shares with the HTTP backend (`http`) are in `registry`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tube_net::tokio_rustls::TlsAcceptor;
use tube_proto::mailbox::{Fingerprint, MailboxError, Packet, proof_message};
use tube_proto::ratelimit::RateLimit;

use crate::crypto;
use crate::registry::{Fetched, Fetcher, Live, Shared, Source, Via};
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
    /// Registered clients at most. At the limit, a new client takes the place of the
    /// registration idle longest (no connection, HTTP session or queued message), once that one
    /// has been idle `evict_after_idle`; registrations idle for `max_age` are forgotten anyway.
    pub max_clients: usize,
    /// See `max_clients`.
    pub evict_after_idle: Duration,
    /// Open connections at most; more are closed at once.
    pub max_connections: usize,
    /// A connection that sends nothing this long is closed (clients keep alive every 2 min).
    pub idle_timeout: Duration,
    /// Time from accept to a completed TLS handshake.
    pub handshake_timeout: Duration,
    /// Registrations per source (IPv4 address or IPv6 /64) and per fingerprint.
    pub register_limit: RateLimit,
    /// Deliveries per source (IPv4 address or IPv6 /64) and per recipient (over HTTP: per
    /// sending client, as every request comes from the proxy's address).
    pub deliver_limit: RateLimit,
    /// How long the HTTP backend holds an empty fetch open waiting for a message; keep it
    /// under the proxy's backend timeout (60 s by default).
    pub http_hold: Duration,
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
            evict_after_idle: crate::registry::EVICT_MIN_IDLE,
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(300),
            handshake_timeout: Duration::from_secs(10),
            register_limit: RateLimit::per_minute(30),
            deliver_limit: RateLimit::per_minute(600),
            http_hold: Duration::from_secs(20),
        }
    }
}

/// Packets queued towards one connection before it counts as too slow (it is then closed; its
/// messages stay queued until acknowledged); more when a queue may hold more messages, so a
/// full queue's backlog always fits (else its FETCH would close the connection every time).
const OUTBOX: usize = 1024;

/// The outbox of one connection: room for a whole queue's backlog and the answers around it.
fn outbox(config: &PeerConfig) -> usize {
    OUTBOX.max(config.max_queue_messages.saturating_add(64))
}

/// Once a connection's session has ended, how long its writer may take to send what is still
/// queued (the closing ERROR included) and close; then it is stopped and the socket dropped,
/// so a client that does not read cannot keep a socket (or its outbox) after its session.
const FLUSH: Duration = Duration::from_secs(2);

/// Counters of a running peer (tests and the admin view).
#[derive(Clone)]
pub struct PeerState(pub(crate) Arc<Shared>);

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

    /// Registrations forgotten because nothing held them: no connection, no HTTP session and
    /// no queued message for `max_age`, or idle longest when a new client came at the limit.
    pub fn forgotten(&self) -> u64 {
        self.0.lock().evicted
    }

    /// Open TCP connections: accepted and not yet closed (a connection stops counting only
    /// once its socket is released).
    pub fn connections(&self) -> usize {
        usize::try_from(self.0.connections.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
    }

    /// HTTP fetches held open right now (the HTTP backend's long polls).
    pub fn http_held(&self) -> usize {
        self.0
            .config
            .max_connections
            .saturating_sub(self.0.held.available_permits())
    }

    /// Live HTTP tokens of all clients.
    pub fn http_tokens(&self) -> usize {
        self.0.lock().tokens
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
        Self {
            shared: Arc::new(Shared::new(config)),
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
                // `serve` returns only once both halves of the socket are dropped.
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

/// Sweeps once a minute (expired messages are also dropped whenever a queue is touched).
async fn sweeper(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        shared.sweep(Instant::now());
    }
}

/// Per-connection state.
struct Session {
    id: u64,
    /// The client's address (the rate limits count its source, see `tube_proto::ratelimit::source_key`).
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
    let (tx, mut rx) = mpsc::channel::<Packet>(outbox(&shared.config));
    let kill = shutdown.child_token();
    let writer_kill = kill.clone();
    // The writer may block on a client that does not read for as long as the session lives
    // (the full outbox then ends the session); after that `serve` gives it `FLUSH` at most.
    let mut writer = AbortOnDropHandle::new(tokio::spawn(async move {
        // An ERROR alone does not end the connection (7003 to 7007 leave it open): the
        // writer stops once the session has ended.
        loop {
            let p = tokio::select! {
                biased;
                p = rx.recv() => p,
                _ = writer_kill.cancelled() => None,
            };
            let Some(p) = p else { break };
            if sink.send(p).await.is_err() {
                // A failed write ends the session too.
                writer_kill.cancel();
                return;
            }
        }
        // Send what is still queued (the closing ERROR included), then close.
        while let Ok(p) = rx.try_recv() {
            if sink.feed(p).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
        writer_kill.cancel();
    }));
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
        // Queued last: the writer sends it, then closes when the senders below are gone.
        let _ = s.tx.try_send(Packet::error(code, why));
    }
    if let Some(fp) = s.registered {
        shared.release(&fp, s.id, Instant::now());
    }
    // The writer sends what is queued, then closes. A client that does not read gets
    // `FLUSH`, then the writer is stopped; awaiting it makes sure its half of the socket is
    // dropped before we return (and the connection stops counting).
    drop(s);
    kill.cancel();
    if timeout(FLUSH, &mut writer).await.is_err() {
        tracing::debug!(%addr, "the client does not read, dropping the connection");
        writer.abort();
        let _ = writer.await;
    }
}

fn send(s: &Session, p: Packet) -> Next {
    if s.tx.try_send(p).is_err() {
        // The client does not read: close it (its queue keeps everything unacknowledged).
        s.kill.cancel();
    }
    Next::Go
}

fn handle(shared: &Shared, s: &mut Session, packet: Packet) -> Next {
    let now = Instant::now();
    match packet {
        Packet::Register { cert } => {
            if let Err(wait) = shared.check_register_source(s.addr, now) {
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
            let live = Live {
                conn: s.id,
                tx: s.tx.clone(),
                kill: s.kill.clone(),
                listening: false,
            };
            match shared.register(fp, cert, now, Via::Tcp(live)) {
                Ok(()) => {
                    // A connection receives for one client: registering another lets the
                    // first one go.
                    if let Some(old) = s.registered.replace(fp)
                        && old != fp
                    {
                        shared.release(&old, s.id, now);
                    }
                    send(s, Packet::Ok)
                }
                Err(refusal) => send(s, refusal),
            }
        }
        Packet::Deliver { to, id, blob } => {
            let answer = shared.deliver(Source::Addr(s.addr), to, id, blob, now, None);
            send(s, answer)
        }
        Packet::Fetch => {
            let Some(fp) = s.registered else {
                return send(
                    s,
                    Packet::error(MailboxError::NotRegistered, "register first"),
                );
            };
            let who = Fetcher::Tcp {
                conn: s.id,
                tx: &s.tx,
            };
            match shared.fetch(&fp, now, who) {
                Fetched::Backlog(count) => send(s, Packet::QueueEnd { count }),
                Fetched::Overflow => {
                    s.kill.cancel();
                    Next::Go
                }
                Fetched::Unknown => {
                    Next::Close(MailboxError::NotRegistered, "registration lost".into())
                }
            }
        }
        Packet::Ack { seq } => {
            let Some(fp) = s.registered else {
                return send(
                    s,
                    Packet::error(MailboxError::NotRegistered, "register first"),
                );
            };
            shared.ack(&fp, seq);
            Next::Go
        }
        Packet::Keepalive => send(s, Packet::Keepalive),
        Packet::CertRequest { fingerprint } => send(s, shared.cert(&fingerprint)),
        other => Next::Close(
            MailboxError::Protocol,
            format!("packet type {} is not sent by clients", other.kind()),
        ),
    }
}
