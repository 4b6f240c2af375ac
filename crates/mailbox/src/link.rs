//! How a client reaches its own peer and receives: a [`Link`] is a TCP connection or a
//! session with a long-poll proxy (`via`), so registering, requests and the [`Inbox`] are
//! written once for both.
//!
//! Over HTTP every request is tagged (`X-Tube-Request`) and only the answer carrying its tag
//! counts; untagged packets are the peer's own (messages, a takeover notice). Over HTTP,
//! QUEUE_END answers FETCH and the backlog is counted; over TCP it follows the backlog.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::time::{Instant, timeout};
use tube_proto::mailbox::{self as codec, MailboxError, Packet, proof_message};

use crate::client::{ClientConfig, ClientError, PeerAddr, connect};
use crate::crypto::{self, Identity};
use crate::via::{Via, ViaConfig, ViaError};
use crate::wire::{self, Conn};

/// A lost or reset connection is the peer being unavailable; garbage is a protocol error.
fn wire_error(e: wire::WireError) -> ClientError {
    match e {
        wire::WireError::Io(e) => ClientError::Unavailable(e.to_string()),
        // 21 and 22 open TLS records (an alert, a handshake): a TLS peer reached in plain TCP.
        wire::WireError::Packet(codec::PacketError::UnknownType(21 | 22)) => ClientError::Protocol(
            "the peer speaks TLS: put its fingerprint in the address (host:port/sha256:<hex>)"
                .into(),
        ),
        wire::WireError::Packet(e) => ClientError::Protocol(e.to_string()),
    }
}

fn via_error(e: ViaError) -> ClientError {
    match e {
        ViaError::Unavailable(e) => ClientError::Unavailable(e),
        // The proxy or the peer forgot our token (idle, restarted): register again.
        ViaError::Unauthorized(_) => {
            ClientError::Unavailable("the proxy no longer accepts our token".into())
        }
        ViaError::Refused(s) => ClientError::Protocol(format!("the proxy refused with HTTP {s}")),
    }
}

/// How the client reaches a peer: a connection, or requests through a long-poll proxy.
pub(crate) enum Link {
    Tcp(Conn),
    Http(Box<Via>),
}

/// A packet received; over HTTP with the tag of the request it answers, if any.
pub(crate) struct Incoming {
    pub(crate) packet: Packet,
    pub(crate) tag: Option<String>,
}

impl Link {
    pub(crate) fn is_http(&self) -> bool {
        matches!(self, Link::Http(_))
    }

    /// Sends `p`; over HTTP the request comes back with a packet, or none.
    pub(crate) async fn send(
        &mut self,
        p: Packet,
        tag: &str,
    ) -> Result<Option<Incoming>, ClientError> {
        match self {
            Link::Tcp(conn) => {
                conn.send(p)
                    .await
                    .map_err(|e| ClientError::Unavailable(e.to_string()))?;
                Ok(None)
            }
            Link::Http(via) => {
                let answer = via
                    .exchange(Some((codec::to_bytes(&p), tag)))
                    .await
                    .map_err(via_error)?;
                answer.map(decode_answer).transpose()
            }
        }
    }

    /// The next packet from the peer: over TCP waits for one, over HTTP polls once (`None`
    /// when the proxy had nothing within its poll timeout). Cancel-safe on both.
    pub(crate) async fn recv(&mut self) -> Result<Option<Incoming>, ClientError> {
        match self {
            Link::Tcp(conn) => match conn.next().await {
                None => Err(ClientError::Unavailable("connection closed".into())),
                Some(Err(e)) => Err(wire_error(e)),
                Some(Ok(packet)) => Ok(Some(Incoming { packet, tag: None })),
            },
            Link::Http(via) => {
                let answer = via.exchange(None).await.map_err(via_error)?;
                answer.map(decode_answer).transpose()
            }
        }
    }
}

fn decode_answer(a: crate::via::Answer) -> Result<Incoming, ClientError> {
    let mut buf = bytes::BytesMut::from(&a.body[..]);
    match codec::decode(&mut buf) {
        Ok(Some(packet)) if buf.is_empty() => Ok(Incoming { packet, tag: a.tag }),
        _ => Err(ClientError::Protocol(
            "the proxy answered something that is not one packet".into(),
        )),
    }
}

/// A random tag for one HTTP request.
pub(crate) fn new_tag() -> String {
    let mut b = [0u8; 8];
    // Without randomness the tag is constant: stale answers are then merely not recognised.
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

/// Packets kept for [`Inbox::next`] while waiting for an answer, at most: far more than a
/// peer queues towards one connection (its outbox, `docs/protocols/mailbox.md` section 9: 1024,
/// or a whole queue's backlog when its queues hold more). A peer that sends more without
/// answering breaks the protocol (and would otherwise make us buffer without bound until the
/// timeout).
pub(crate) const MAX_STASH: usize = 65_536;

/// Message bytes kept for [`Inbox::next`] while waiting for an answer, at most: twice what a
/// peer queues for one recipient by default (8 MiB), and a bound however large the messages.
pub(crate) const MAX_STASH_BYTES: usize = 16 << 20;

/// A [`Link`] plus what arrived while waiting for something else.
pub(crate) struct Chan {
    pub(crate) link: Link,
    /// Received but not yet consumed by [`Inbox::next`] (messages, and over TCP the end of
    /// the backlog); at most [`MAX_STASH`] packets and [`MAX_STASH_BYTES`] message bytes.
    pub(crate) stash: VecDeque<Incoming>,
    /// Message bytes in `stash`.
    stashed: usize,
}

impl Chan {
    pub(crate) fn new(link: Link) -> Self {
        Self {
            link,
            stash: VecDeque::new(),
            stashed: 0,
        }
    }

    /// Sends `p` and waits up to `limit` for its answer. Messages arriving meanwhile are
    /// stashed for [`Inbox::next`] (more than [`MAX_STASH`] is a protocol error); an ERROR
    /// answer is a refusal.
    pub(crate) async fn request(
        &mut self,
        p: Packet,
        limit: Duration,
    ) -> Result<Packet, ClientError> {
        let kind = p.kind();
        let tag = new_tag();
        let wait = async {
            let mut got = self.link.send(p, &tag).await?;
            loop {
                if let Some(inc) = got.take()
                    && let Some(answer) = self.sort(inc, kind, &tag)?
                {
                    return match answer {
                        Packet::Error { code, message } => {
                            Err(ClientError::Refused { code, message })
                        }
                        p => Ok(p),
                    };
                }
                got = self.link.recv().await?;
            }
        };
        timeout(limit, wait)
            .await
            .map_err(|_| ClientError::Unavailable("no answer in time".into()))?
    }

    /// The answer to a request of type `kind` tagged `tag`, or `None` (stashed or dropped).
    fn sort(&mut self, inc: Incoming, kind: u8, tag: &str) -> Result<Option<Packet>, ClientError> {
        let http = self.link.is_http();
        Ok(match inc.packet {
            Packet::Message { .. } => {
                self.keep(inc)?;
                None
            }
            // Over HTTP only the answer with our tag is ours: others are stale or unsolicited.
            _ if http && inc.tag.as_deref() != Some(tag) => {
                tracing::debug!(
                    kind = inc.packet.kind(),
                    "stale packet from the proxy skipped"
                );
                None
            }
            Packet::Keepalive if kind != Packet::Keepalive.kind() => None,
            Packet::QueueEnd { .. } if kind != Packet::Fetch.kind() => {
                self.keep(inc)?;
                None
            }
            p => Some(p),
        })
    }

    /// Stashes `inc` for [`Inbox::next`], up to [`MAX_STASH`] packets and
    /// [`MAX_STASH_BYTES`].
    fn keep(&mut self, inc: Incoming) -> Result<(), ClientError> {
        let size = blob_len(&inc.packet);
        if self.stash.len() >= MAX_STASH || self.stashed + size > MAX_STASH_BYTES {
            return Err(ClientError::Protocol(format!(
                "the peer sent more than {MAX_STASH} messages or {} MiB without answering",
                MAX_STASH_BYTES >> 20
            )));
        }
        self.stashed += size;
        self.stash.push_back(inc);
        Ok(())
    }

    /// The oldest stashed packet, if any.
    pub(crate) fn unstash(&mut self) -> Option<Incoming> {
        let inc = self.stash.pop_front()?;
        self.stashed -= blob_len(&inc.packet);
        Some(inc)
    }
}

/// The message bytes `p` carries (what the stash counts).
fn blob_len(p: &Packet) -> usize {
    match p {
        Packet::Message { blob, .. } => blob.len(),
        _ => 0,
    }
}

/// One registration over TCP: `register`, sign the challenge, `OK`.
async fn register_once(
    peer: &PeerAddr,
    id: &Identity,
    limit: Duration,
) -> Result<Conn, ClientError> {
    let mut chan = Chan::new(Link::Tcp(connect(peer, limit).await?));
    let cert = Bytes::copy_from_slice(id.cert());
    let nonce = match chan.request(Packet::Register { cert }, limit).await? {
        Packet::Challenge { nonce } => nonce,
        other => return Err(unexpected("a challenge", &other)),
    };
    let signature = id.sign(&proof_message(&nonce, &id.fingerprint()));
    match chan.request(Packet::Proof { signature }, limit).await? {
        Packet::Ok => match chan.link {
            Link::Tcp(conn) => Ok(conn),
            Link::Http(_) => Err(ClientError::Protocol("not a connection".into())),
        },
        other => Err(unexpected("OK", &other)),
    }
}

/// One registration through the proxy at `url`: REGISTER and HTTP_PROOF in one request.
async fn register_once_http(
    url: &str,
    id: &Identity,
    cfg: &ClientConfig,
) -> Result<Via, ClientError> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut body = bytes::BytesMut::new();
    codec::encode(
        &Packet::Register {
            cert: Bytes::copy_from_slice(id.cert()),
        },
        &mut body,
    );
    codec::encode(
        &Packet::HttpProof {
            time_ms: now_ms,
            signature: crypto::sign_http_proof(id, now_ms),
        },
        &mut body,
    );
    let cfg = ViaConfig {
        attempts: 1,
        ..cfg.via_config()
    };
    Via::register(url, body.freeze(), &cfg)
        .await
        .map_err(|e| match e {
            ViaError::Unauthorized(status) => ClientError::Refused {
                code: MailboxError::BadProof as u16,
                message: format!(
                    "the peer refused the registration over HTTP ({status}): a bad proof, a \
                     clock more than 2 minutes off, or too many registrations"
                ),
            },
            e => via_error(e),
        })
}

pub(crate) fn unexpected(want: &str, got: &Packet) -> ClientError {
    ClientError::Protocol(format!("expected {want}, got type {}", got.kind()))
}

/// Registers over TCP, retrying when no answer comes in time (see [`crate::client::register`]).
pub(crate) async fn register_tcp(
    peer: &PeerAddr,
    id: &Identity,
    cfg: &ClientConfig,
) -> Result<Conn, ClientError> {
    retry_register(cfg, || register_once(peer, id, cfg.timeout)).await
}

/// Registers over TCP, or through [`ClientConfig::via`] when it is set.
pub(crate) async fn register_link(
    peer: &PeerAddr,
    id: &Identity,
    cfg: &ClientConfig,
) -> Result<Link, ClientError> {
    match &cfg.via {
        None => Ok(Link::Tcp(register_tcp(peer, id, cfg).await?)),
        Some(url) => {
            let once = || async {
                timeout(cfg.timeout, register_once_http(url, id, cfg))
                    .await
                    .map_err(|_| ClientError::Unavailable("no answer in time".into()))?
            };
            let via = retry_register(cfg, once).await?;
            Ok(Link::Http(Box::new(via)))
        }
    }
}

async fn retry_register<T, F, Fut>(cfg: &ClientConfig, mut once: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let mut last = String::new();
    for attempt in 1..=cfg.register_attempts.max(1) {
        match once().await {
            Ok(c) => return Ok(c),
            Err(ClientError::Unavailable(e)) => {
                tracing::warn!(attempt, error = %e, "registration got no answer");
                last = e;
            }
            Err(e) => return Err(e),
        }
    }
    Err(ClientError::Unavailable(last))
}

/// A registered connection to our own peer (over TCP, or through the proxy), receiving.
pub struct Inbox {
    chan: Chan,
    cfg: ClientConfig,
    /// When the next keepalive is due.
    keepalive_at: Instant,
    /// A keepalive was sent and its echo has not come yet.
    keepalive_pending: bool,
    /// HTTP: messages of the fetched backlog still to come (the count of QUEUE_END, which
    /// over HTTP answers FETCH instead of following the backlog).
    backlog: Option<u32>,
    /// HTTP: the highest message sequence number returned since the last fetch (a message
    /// may come twice when a fetch rewinds).
    last_seq: u64,
}

impl fmt::Debug for Inbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbox")
            .field("http", &self.chan.link.is_http())
            .finish_non_exhaustive()
    }
}

impl Inbox {
    /// Registers with `peer` (through [`ClientConfig::via`] when it is set).
    pub async fn open(
        peer: &PeerAddr,
        me: &Identity,
        cfg: ClientConfig,
    ) -> Result<Self, ClientError> {
        let link = register_link(peer, me, &cfg).await?;
        Ok(Self {
            chan: Chan::new(link),
            keepalive_at: Instant::now() + cfg.keepalive,
            keepalive_pending: false,
            backlog: None,
            last_seq: 0,
            cfg,
        })
    }

    /// Asks for the queue. Then [`Inbox::next`] yields the queued messages, `None` at the end
    /// of the backlog, then pushed ones. Over HTTP this also makes this client's HTTP side the
    /// one that receives (a TCP connection of the same client is closed).
    pub async fn fetch(&mut self) -> Result<(), ClientError> {
        if !self.chan.link.is_http() {
            self.chan.link.send(Packet::Fetch, "").await?;
            return Ok(());
        }
        match self.chan.request(Packet::Fetch, self.cfg.timeout).await? {
            Packet::QueueEnd { count } => {
                self.backlog = Some(count);
                self.last_seq = 0;
                Ok(())
            }
            other => Err(unexpected("queue end", &other)),
        }
    }

    /// The next message `(seq, received_ms, blob)`, or `None` for the end of the fetched
    /// backlog. Sends keepalives while waiting; an error when the peer goes away (or a
    /// keepalive goes unanswered until the next is due).
    pub async fn next(&mut self) -> Result<Option<(u64, u64, Bytes)>, ClientError> {
        loop {
            if self.backlog == Some(0) {
                self.backlog = None;
                return Ok(None);
            }
            if let Some(inc) = self.chan.unstash() {
                if let Some(out) = self.take(inc)? {
                    return Ok(out);
                }
                continue;
            }
            let got = tokio::select! {
                r = self.chan.link.recv() => r?,
                _ = tokio::time::sleep_until(self.keepalive_at) => {
                    if self.keepalive_pending {
                        return Err(ClientError::Unavailable("no keepalive answer".into()));
                    }
                    self.keepalive_pending = true;
                    self.keepalive_at = Instant::now() + self.cfg.keepalive;
                    self.chan.link.send(Packet::Keepalive, &new_tag()).await?
                }
            };
            if let Some(inc) = got
                && let Some(out) = self.take(inc)?
            {
                return Ok(out);
            }
        }
    }

    /// What a packet received while waiting means: `Some(answer of next)`, or `None` to keep
    /// waiting.
    #[allow(clippy::type_complexity)]
    fn take(&mut self, inc: Incoming) -> Result<Option<Option<(u64, u64, Bytes)>>, ClientError> {
        let http = self.chan.link.is_http();
        match inc.packet {
            Packet::Message {
                seq,
                received_ms,
                blob,
            } => {
                if http {
                    if seq <= self.last_seq {
                        return Ok(None);
                    }
                    self.last_seq = seq;
                    self.backlog = self.backlog.map(|n| n.saturating_sub(1));
                }
                Ok(Some(Some((seq, received_ms, blob))))
            }
            Packet::Keepalive => {
                self.keepalive_pending = false;
                Ok(None)
            }
            // Over HTTP the end of the backlog is counted (see `backlog`).
            Packet::QueueEnd { .. } if !http => Ok(Some(None)),
            Packet::Error { code, message } if !http || inc.tag.is_none() => {
                if http && code == MailboxError::NotRegistered as u16 {
                    // Unsolicited over HTTP: a newer connection of this client took over, as
                    // a closed connection says over TCP.
                    return Err(ClientError::Unavailable(message));
                }
                Err(ClientError::Refused { code, message })
            }
            // Over HTTP: late answers to earlier requests.
            _ if http => Ok(None),
            other => Err(ClientError::Protocol(format!(
                "unexpected packet type {}",
                other.kind()
            ))),
        }
    }

    /// Tells the peer every message up to `seq` is processed (over HTTP, waits for the
    /// peer's echo: the proxy holds a request until a packet answers it).
    pub async fn ack(&mut self, seq: u64) -> Result<(), ClientError> {
        if !self.chan.link.is_http() {
            self.chan.link.send(Packet::Ack { seq }, "").await?;
            return Ok(());
        }
        match self
            .chan
            .request(Packet::Ack { seq }, self.cfg.timeout)
            .await?
        {
            Packet::Ack { .. } => Ok(()),
            other => Err(unexpected("the acknowledgement's echo", &other)),
        }
    }

    /// Sends a keepalive and waits for the peer's echo.
    pub async fn ping(&mut self) -> Result<(), ClientError> {
        match self.chan.request(Packet::Keepalive, self.cfg.timeout).await {
            Ok(Packet::Keepalive) => Ok(()),
            Ok(other) => Err(unexpected("a keepalive", &other)),
            Err(ClientError::Unavailable(_)) => {
                Err(ClientError::Unavailable("no keepalive answer".into()))
            }
            Err(e) => Err(e),
        }
    }

    /// Closes the connection, flushing what was sent.
    pub async fn close(mut self) {
        if let Link::Tcp(conn) = &mut self.chan.link {
            let _ = timeout(self.cfg.timeout, conn.close()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    use crate::wire::Stream;

    /// A peer that reads one request, sends `messages` MESSAGEs of `size` bytes, then answers
    /// it with a KEEPALIVE if `answer`, and keeps the connection open until the client closes
    /// it.
    async fn scripted_peer(messages: u64, size: usize, answer: bool) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = wire::conn(Stream::Plain(tcp));
            let _request = conn.next().await;
            let blob = Bytes::from(vec![7u8; size]);
            for seq in 1..=messages {
                let m = Packet::Message {
                    seq,
                    received_ms: 0,
                    blob: blob.clone(),
                };
                if conn.feed(m).await.is_err() {
                    return;
                }
            }
            if answer {
                let _ = conn.feed(Packet::Keepalive).await;
            }
            let _ = conn.flush().await;
            while let Some(Ok(_)) = conn.next().await {}
        });
        addr
    }

    async fn ping(peer: std::net::SocketAddr) -> (Result<Packet, ClientError>, Chan) {
        let tcp = TcpStream::connect(peer).await.unwrap();
        let mut chan = Chan::new(Link::Tcp(wire::conn(Stream::Plain(tcp))));
        let limit = Duration::from_secs(10);
        let got = chan.request(Packet::Keepalive, limit).await;
        (got, chan)
    }

    #[tokio::test]
    async fn messages_before_an_answer_are_kept_up_to_the_limit() {
        let (got, chan) = ping(scripted_peer(MAX_STASH as u64, 6, true).await).await;
        assert_eq!(got.unwrap(), Packet::Keepalive);
        assert_eq!(chan.stash.len(), MAX_STASH);
        // Large messages: up to the byte limit.
        let size = 64 * 1024;
        let fit = (MAX_STASH_BYTES / size) as u64;
        let (got, mut chan) = ping(scripted_peer(fit, size, true).await).await;
        assert_eq!(got.unwrap(), Packet::Keepalive);
        assert_eq!(chan.stashed, MAX_STASH_BYTES);
        while chan.unstash().is_some() {}
        assert_eq!(chan.stashed, 0);
    }

    #[tokio::test]
    async fn a_peer_that_sends_more_messages_instead_of_answering_breaks_the_protocol() {
        let (got, chan) = ping(scripted_peer(MAX_STASH as u64 + 1, 6, false).await).await;
        assert!(matches!(got, Err(ClientError::Protocol(_))), "{got:?}");
        assert_eq!(chan.stash.len(), MAX_STASH);
        // One byte over the byte limit.
        let size = 64 * 1024;
        let over = (MAX_STASH_BYTES / size) as u64 + 1;
        let (got, chan) = ping(scripted_peer(over, size, false).await).await;
        assert!(matches!(got, Err(ClientError::Protocol(_))), "{got:?}");
        assert_eq!(chan.stashed, MAX_STASH_BYTES);
    }
}
