//! The mailbox client (`tube msg`): registering with one's own peer (with proof of
//! possession, retried, then "peer unavailable"), sending sealed messages to a correspondent's
//! peer, and receiving (fetch, or listen with keepalives and pushes) with replay detection.
//!
//! An address is `<client fingerprint hex>@<peer host:port>`, with `/<peer certificate
//! fingerprint hex>` appended when the peer speaks TLS.
//!
//! With [`ClientConfig::via`] the client reaches its own peer through a long-poll proxy
//! (`via`, `docs/protocols/longpoll.md` section 7) instead of TCP; the private `link` module
//! hides which (and holds the [`Inbox`]), so registering, sending and receiving are written
//! once.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};
use futures_util::SinkExt;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tube_net::tls;
use tube_net::tokio_rustls::TlsConnector;
use tube_proto::mailbox::{Fingerprint, MAX_BLOB, MailboxError, MessageId, Packet};

use crate::contacts::{CodeFields, Contacts, ContactsError};
use crate::crypto::{self, Identity};
pub use crate::link::Inbox;
use crate::link::{self, Chan, Link, register_link};
use crate::via::ViaConfig;
use crate::wire::{self, Conn, Stream};

/// Where a peer is and, for TLS, which certificate it must present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    /// `host:port`.
    pub host: String,
    /// The peer's TLS certificate fingerprint; `None` for plain TCP.
    pub tls: Option<tube_net::Fingerprint>,
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tls {
            None => write!(f, "{}", self.host),
            Some(fp) => write!(f, "{}/{}", self.host, hex::encode(fp.as_bytes())),
        }
    }
}

impl FromStr for PeerAddr {
    type Err = ClientError;

    /// `host:port`, or `host:port/<64 hex>` (also `sha256:<64 hex>`) for TLS.
    fn from_str(s: &str) -> Result<Self, ClientError> {
        let bad =
            || ClientError::BadAddress(format!("{s:?} is not host:port[/<peer fingerprint>]"));
        let (host, tls) = match s.split_once('/') {
            None => (s, None),
            Some((h, fp)) => (
                h,
                Some(fp.parse::<tube_net::Fingerprint>().map_err(|_| bad())?),
            ),
        };
        if host.is_empty() || !host.contains(':') {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_owned(),
            tls,
        })
    }
}

/// A client's address: who (certificate fingerprint) and where (its serving peer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// SHA-256 of the client's certificate.
    pub client: Fingerprint,
    /// The peer that serves it.
    pub peer: PeerAddr,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", hex::encode(self.client), self.peer)
    }
}

impl FromStr for Address {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, ClientError> {
        let bad = || ClientError::BadAddress(format!("{s:?} is not <64 hex>@host:port"));
        let (fp, peer) = s.split_once('@').ok_or_else(bad)?;
        let client: Fingerprint = hex::decode(fp)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(bad)?;
        Ok(Self {
            client,
            peer: peer.parse()?,
        })
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Deadline for connecting and for each answer.
    pub timeout: Duration,
    /// Registration attempts before "peer unavailable".
    pub register_attempts: u32,
    /// How often `listen` sends a keepalive (seed: every couple of minutes). A keepalive still
    /// unanswered when the next is due means the peer is unavailable.
    pub keepalive: Duration,
    /// Reach our own peer through this long-poll proxy (`http://host:port`) instead of TCP.
    /// Deliveries to clients of other peers still go over TCP to their peer.
    pub via: Option<String>,
    /// Limit of one HTTP request to the proxy, held ones included (above its 25 s poll).
    pub via_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            register_attempts: 3,
            keepalive: Duration::from_secs(120),
            via: None,
            via_timeout: Duration::from_secs(30),
        }
    }
}

impl ClientConfig {
    pub(crate) fn via_config(&self) -> ViaConfig {
        ViaConfig {
            request_timeout: self.via_timeout,
            connect_timeout: self.timeout,
            attempts: self.register_attempts,
        }
    }
}

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer, or no connection, after the retries.
    #[error("peer unavailable: {0}")]
    Unavailable(String),
    /// The peer refused with a code.
    #[error("error {code} {}: {message}", MailboxError::name(*.code))]
    Refused {
        /// The code (7001...).
        code: u16,
        /// The peer's text.
        message: String,
    },
    /// The peer broke the protocol, or a certificate did not match its fingerprint.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// An address could not be parsed.
    #[error("bad address: {0}")]
    BadAddress(String),
    /// The message is too long.
    #[error("message too long ({0} bytes sealed; at most {MAX_BLOB})")]
    TooLong(usize),
    /// Sealing failed.
    #[error("encryption: {0}")]
    Crypto(String),
    /// The contacts file.
    #[error(transparent)]
    Contacts(#[from] ContactsError),
}

/// Connects to `peer` (TCP, then TLS with the pinned certificate when it has one).
pub async fn connect(peer: &PeerAddr, limit: Duration) -> Result<Conn, ClientError> {
    let unavailable = |e: String| ClientError::Unavailable(format!("{}: {e}", peer.host));
    let tcp = timeout(limit, TcpStream::connect(&peer.host))
        .await
        .map_err(|_| unavailable("connect timed out".into()))?
        .map_err(|e| unavailable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let stream = match peer.tls {
        None => Stream::Plain(tcp),
        Some(fp) => {
            let cfg = tls::pinned_client_config(fp).map_err(|e| unavailable(e.to_string()))?;
            let tls = timeout(
                limit,
                TlsConnector::from(cfg).connect(tls::server_name(), tcp),
            )
            .await
            .map_err(|_| unavailable("tls handshake timed out".into()))?
            .map_err(|e| unavailable(format!("tls: {e}")))?;
            Stream::Client(Box::new(tls))
        }
    };
    Ok(wire::conn(stream))
}

/// Registers with our own peer over TCP, retrying when no answer comes in time; after
/// `register_attempts` failures, [`ClientError::Unavailable`]. Refusals are not retried.
pub async fn register(
    peer: &PeerAddr,
    id: &Identity,
    cfg: &ClientConfig,
) -> Result<Conn, ClientError> {
    link::register_tcp(peer, id, cfg).await
}

/// The sealed part of a message.
#[derive(Debug, Serialize, Deserialize)]
struct Inner {
    /// The sender's address, for replies.
    from: String,
    sent_ms: u64,
    text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nonce: Option<String>,
}

fn aad(id: &MessageId, to: &Fingerprint) -> Vec<u8> {
    let mut a = b"tube-mailbox message v1\0".to_vec();
    a.extend_from_slice(id);
    a.extend_from_slice(to);
    a
}

/// Sends `text` to `to`: fetches its certificate from its peer (checked against the
/// fingerprint), seals it to that certificate from us, delivers it, and returns once the
/// peer has stored it. With [`ClientConfig::via`] and `to` on our own peer, all of it goes
/// through the proxy (registered first: HTTP packets need a token); otherwise over TCP.
pub async fn send(
    me: &Identity,
    my_address: &Address,
    contacts: &mut Contacts,
    to: &Address,
    text: &str,
    cfg: &ClientConfig,
) -> Result<(), ClientError> {
    let link = match &cfg.via {
        Some(_) if to.peer == my_address.peer => register_link(&my_address.peer, me, cfg).await?,
        _ => Link::Tcp(connect(&to.peer, cfg.timeout).await?),
    };
    let mut chan = Chan::new(link);
    let cert = match contacts
        .get(&to.client)
        .and_then(|c| hex::decode(&c.cert).ok())
    {
        Some(c) => c,
        None => {
            let req = Packet::CertRequest {
                fingerprint: to.client,
            };
            match chan.request(req, cfg.timeout).await? {
                Packet::Cert { cert } if crypto::fingerprint(&cert) == to.client => cert.to_vec(),
                Packet::Cert { .. } => {
                    return Err(ClientError::Protocol(
                        "the peer sent a certificate that does not match the address".into(),
                    ));
                }
                other => {
                    return Err(ClientError::Protocol(format!(
                        "expected a certificate, got type {}",
                        other.kind()
                    )));
                }
            }
        }
    };
    contacts.upsert(&cert, &to.to_string())?;
    let CodeFields { commit, nonce } = contacts.outgoing(&to.client)?;
    let inner = Inner {
        from: my_address.to_string(),
        sent_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        text: text.to_owned(),
        commit,
        nonce,
    };
    let plain = serde_json::to_vec(&inner).map_err(|e| ClientError::Crypto(e.to_string()))?;
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| ClientError::Crypto(e.to_string()))?;
    let sealed = crypto::seal(me, &cert, &aad(&id, &to.client), &plain)
        .map_err(|e| ClientError::Crypto(e.to_string()))?;
    let mut blob = BytesMut::with_capacity(18 + me.cert().len() + sealed.len());
    blob.put_slice(&id);
    blob.put_u16(u16::try_from(me.cert().len()).unwrap_or(u16::MAX));
    blob.put_slice(me.cert());
    blob.put_slice(&sealed);
    if blob.len() > MAX_BLOB {
        return Err(ClientError::TooLong(blob.len()));
    }
    let deliver = Packet::Deliver {
        to: to.client,
        id,
        blob: blob.freeze(),
    };
    let stored = chan.request(deliver, cfg.timeout).await;
    if let Link::Tcp(conn) = &mut chan.link {
        let _ = timeout(cfg.timeout, conn.close()).await;
    }
    match stored? {
        Packet::Stored { id: got } if got == id => Ok(()),
        other => Err(ClientError::Protocol(format!(
            "expected stored, got type {}",
            other.kind()
        ))),
    }
}

/// A message received and opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Received {
    /// The sender's address (its fingerprint is checked against its certificate).
    pub from: String,
    /// The text.
    pub text: String,
    /// When the sender sent it (its clock), Unix ms.
    pub sent_ms: u64,
    /// When our peer stored it, Unix ms.
    pub received_ms: u64,
}

/// A new message that opened and verified, not yet recorded as seen: show it to the user,
/// then [`Incoming::record`] it, then acknowledge it to the peer. Recording only after showing
/// means a crash or a closed stdout in between shows the message again on the next fetch
/// instead of dropping it as a replay.
#[derive(Debug)]
pub struct Incoming {
    /// The message.
    pub message: Received,
    from: [u8; 32],
    id: [u8; 16],
    fields: CodeFields,
}

impl Incoming {
    /// Records the message as seen (replays of it are dropped from now on) and takes the
    /// sender's verification-code fields from it.
    pub fn record(&self, contacts: &mut Contacts) -> Result<(), ClientError> {
        contacts.incoming(&self.from, &self.id, &self.fields)?;
        Ok(())
    }
}

/// What became of one queued message.
#[derive(Debug)]
pub enum Opened {
    /// A new message, to be shown and then recorded.
    New(Incoming),
    /// Already received once (a replay): dropped.
    Replay,
    /// It failed to open or verify (tampered, forged, malformed): dropped.
    Invalid(String),
}

/// Opens one message blob addressed to `me` and records its sender as a contact; a new
/// message is recorded as seen only by [`Incoming::record`].
pub fn open(
    me: &Identity,
    contacts: &mut Contacts,
    received_ms: u64,
    blob: &[u8],
) -> Result<Opened, ClientError> {
    let invalid = |why: &str| Ok(Opened::Invalid(why.to_owned()));
    let Some((id, rest)) = blob.split_first_chunk::<16>() else {
        return invalid("too short");
    };
    let Some((len, rest)) = rest.split_first_chunk::<2>() else {
        return invalid("too short");
    };
    let len = u16::from_be_bytes(*len) as usize;
    if rest.len() < len {
        return invalid("truncated certificate");
    }
    let (cert, sealed) = rest.split_at(len);
    let plain = match crypto::open(me, cert, &aad(id, &me.fingerprint()), sealed) {
        Ok(p) => p,
        Err(_) => {
            return invalid("does not open (tampered, or not from the certificate it carries)");
        }
    };
    let Ok(inner) = serde_json::from_slice::<Inner>(&plain) else {
        return invalid("malformed content");
    };
    let from_fp = crypto::fingerprint(cert);
    match inner.from.parse::<Address>() {
        Ok(a) if a.client == from_fp => {}
        _ => return invalid("sender address does not match its certificate"),
    }
    match contacts.upsert(cert, &inner.from) {
        Ok(()) => {}
        // A full contact list must not wedge the queue: drop the stranger's message.
        Err(ContactsError::Full) => return invalid("contact list full"),
        Err(e) => return Err(e.into()),
    }
    let fields = CodeFields {
        commit: inner.commit,
        nonce: inner.nonce,
    };
    if contacts.seen(&from_fp, id) {
        return Ok(Opened::Replay);
    }
    Ok(Opened::New(Incoming {
        message: Received {
            from: inner.from,
            text: inner.text,
            sent_ms: inner.sent_ms,
            received_ms,
        },
        from: from_fp,
        id: *id,
        fields,
    }))
}
