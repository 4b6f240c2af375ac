//! The peer's HTTP backend (`tube peer --http ADDR`): the backend contract of the long-poll
//! proxy (`docs/protocols/longpoll.md` sections 2 and 4) for the mailbox protocol, as section 7
//! there says, so that a client limited to HTTP can use a peer through `tube longpoll`.
//!
//! One `POST` handler on any path. `Type: Register`/`Auth` checks REGISTER + HTTP_PROOF (a
//! signed time instead of a challenge; a bounded replay cache) and opens a *session*: a random
//! token, and the client id `<fingerprint hex>.<session hex>`, one per registration, so that
//! two processes of one client (`listen` and `send`) have their own buffers at the proxy.
//! `Type: Packet` with `From` and that token carries one mailbox packet, answered with one, or
//! with an empty body fetches the next message (held open up to `http_hold`) for the session
//! that sent the last FETCH. The operations themselves are `registry`'s, shared with TCP, so
//! limits and checks are the same.
//!
//! A malformed packet body is answered 200 with ERROR 7001 (so the client learns why: the proxy
//! drops a 4xx answer to a packet). Bodies over [`MAX_BODY`] get 413.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{CONTENT_TYPE, HeaderName};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tube_net::http::HttpLimits;
use tube_proto::longpoll::{self as lp, RequestType};
use tube_proto::mailbox::{self, Fingerprint, MailboxError, MessageId, Packet};

use crate::crypto;
use crate::peer::PeerState;
use crate::registry::{Fetched, Fetcher, Inner, Shared, Source, Via, expire, now_ms};

/// Largest request body (a packet is at most 128 KiB and 5 bytes).
pub const MAX_BODY: usize = 256 * 1024;
/// Live sessions (tokens) per client at most; a new one drops the least recently used.
pub const TOKENS_PER_CLIENT: usize = 8;
/// `Idempotency-Key`s remembered per client.
pub const REMEMBERED_KEYS: usize = 64;
/// Registration signatures remembered at most; when full, registrations get 503.
pub const REPLAY_ENTRIES: usize = 100_000;
/// How far the time of an HTTP_PROOF may be from the peer's clock.
pub const PROOF_WINDOW: Duration = Duration::from_secs(120);
/// Header a client may put on a packet; the peer echoes it on the answer, so the client can
/// tell the answer to its request from a stale one left at the proxy (an `X-` header: the
/// proxy passes it both ways).
pub const REQUEST_TAG: &str = "x-tube-request";

/// Time to receive a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// A signature is remembered this long: past it, its time is out of the window anyway.
const REPLAY_KEEP: Duration = Duration::from_secs(2 * PROOF_WINDOW.as_secs());

/// One HTTP registration of a client; with its fingerprint, the client id at the proxy.
pub(crate) type Session = [u8; 8];

/// The HTTP side of one client, kept with its queue.
#[derive(Default)]
pub(crate) struct HttpSide {
    /// Live sessions, oldest first.
    tokens: VecDeque<Token>,
    /// The session that sent the last FETCH (and no TCP registration since): its empty
    /// fetches get the messages.
    receiver: Option<Session>,
    /// A session whose receiving was taken over: its next fetch is told so (7006).
    taken_over: Option<Session>,
    /// The last message sequence number handed out to the receiver.
    cursor: u64,
    /// Hashed `Idempotency-Key`s of stored deliveries, with the message id, oldest first.
    keys: VecDeque<([u8; 32], MessageId)>,
}

struct Token {
    secret: [u8; 32],
    session: Session,
    last_used: Instant,
}

impl HttpSide {
    /// Live sessions (tokens).
    pub(crate) fn sessions(&self) -> usize {
        self.tokens.len()
    }

    /// A TCP registration takes receiving over; `true` if an HTTP session was receiving.
    pub(crate) fn end_receiving(&mut self) -> bool {
        match self.receiver.take() {
            Some(s) => {
                self.taken_over = Some(s);
                true
            }
            None => false,
        }
    }

    /// `session` receives from now on, from the oldest unacknowledged message; another
    /// receiving session is told it was taken over.
    pub(crate) fn start_receiving(&mut self, session: Session) {
        match self.receiver.replace(session) {
            Some(old) if old != session => self.taken_over = Some(old),
            _ => {
                if self.taken_over == Some(session) {
                    self.taken_over = None;
                }
            }
        }
        self.cursor = 0;
    }

    /// Forgets receiver and takeover notices of sessions that are gone.
    fn forget_gone(&mut self) {
        let tokens = &self.tokens;
        let live = |s: Option<Session>| s.filter(|s| tokens.iter().any(|t| t.session == *s));
        self.receiver = live(self.receiver);
        self.taken_over = live(self.taken_over);
    }

    /// The id stored under idempotency key `k`, if it is remembered.
    pub(crate) fn stored(&self, k: &[u8; 32]) -> Option<MessageId> {
        self.keys
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, id)| *id)
    }

    /// Remembers a stored delivery's key (the oldest beyond [`REMEMBERED_KEYS`] is forgotten).
    pub(crate) fn remember(&mut self, k: [u8; 32], id: MessageId) {
        if self.keys.len() >= REMEMBERED_KEYS {
            self.keys.pop_front();
        }
        self.keys.push_back((k, id));
    }

    /// Drops sessions unused for `idle`; returns how many.
    fn purge(&mut self, now: Instant, idle: Duration) -> usize {
        let before = self.tokens.len();
        self.tokens
            .retain(|t| now.saturating_duration_since(t.last_used) <= idle);
        self.forget_gone();
        before - self.tokens.len()
    }
}

/// Drops every idle token (the sweeper, and registrations when at the token limit).
pub(crate) fn purge_tokens(st: &mut Inner, now: Instant, idle: Duration) {
    let mut dropped = 0;
    for c in st.clients.values_mut() {
        dropped += c.http.purge(now, idle);
    }
    st.tokens -= dropped;
}

/// Why a registration signature is refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Replay {
    Seen,
    Full,
}

/// Signatures of recent registrations, bounded, forgotten after [`REPLAY_KEEP`].
#[derive(Default)]
pub(crate) struct ReplayCache {
    seen: HashMap<[u8; 64], Instant>,
    order: VecDeque<([u8; 64], Instant)>,
}

impl ReplayCache {
    /// Records `sig` at `now`, unless it was seen or the cache is full.
    pub(crate) fn insert(&mut self, sig: [u8; 64], now: Instant) -> Result<(), Replay> {
        while let Some((old, at)) = self.order.front()
            && now.saturating_duration_since(*at) > REPLAY_KEEP
        {
            self.seen.remove(old);
            self.order.pop_front();
        }
        if self.seen.contains_key(&sig) {
            return Err(Replay::Seen);
        }
        if self.order.len() >= REPLAY_ENTRIES {
            return Err(Replay::Full);
        }
        self.seen.insert(sig, now);
        self.order.push_back((sig, now));
        Ok(())
    }
}

/// What the handler needs.
#[derive(Clone)]
struct Backend {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

/// The backend's routes over `state`; held fetches end early at `shutdown`.
pub fn router(state: PeerState, shutdown: CancellationToken) -> Router {
    Router::new().fallback(handle).with_state(Backend {
        shared: state.0,
        shutdown,
    })
}

/// Serves the HTTP backend on `listener` until `shutdown`, with a header timeout, an idle
/// timeout and a cap on connections (see `limits`).
pub async fn serve(
    listener: TcpListener,
    state: PeerState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = limits(&state.0.config);
    let app = router(state, shutdown.clone());
    tube_net::http::serve(listener, app, limits, shutdown).await;
    Ok(())
}

/// The HTTP backend's listener limits: the defaults (their idle timeout outlasts the proxy's
/// unused pooled connections, 90 s), with twice `max_connections` open connections, as the
/// proxy keeps up to one held fetch (at most `max_connections` of them, see `Shared::held`)
/// and one send per online client.
fn limits(config: &crate::peer::PeerConfig) -> HttpLimits {
    HttpLimits {
        max_connections: config.max_connections.saturating_mul(2),
        ..HttpLimits::default()
    }
}

async fn handle(State(b): State<Backend>, req: Request) -> Response {
    if req.method() != Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let (parts, body) = req.into_parts();
    let body = match tube_net::http::read_body(&parts.headers, body, MAX_BODY, BODY_TIMEOUT).await {
        Ok(body) => body,
        Err(e) => return e.status().into_response(),
    };
    let kind = parts
        .headers
        .get(lp::TYPE)
        .and_then(|v| RequestType::parse(v.as_bytes()));
    match kind {
        None => StatusCode::BAD_REQUEST.into_response(),
        Some(RequestType::Auth | RequestType::Register) => register(&b, &parts.headers, body),
        Some(RequestType::Packet) => packet(&b, &parts.headers, body).await,
    }
}

/// `Type: Register` or `Auth`: REGISTER + HTTP_PROOF -> 200 with `Client-Id` and a token.
fn register(b: &Backend, headers: &HeaderMap, body: Bytes) -> Response {
    if headers
        .get(lp::PERMISSIONS)
        .is_some_and(|v| !v.as_bytes().trim_ascii().is_empty())
    {
        return StatusCode::FORBIDDEN.into_response();
    }
    let unauthorized = |why: &str| {
        tracing::warn!(reason = why, "http registration refused");
        StatusCode::UNAUTHORIZED.into_response()
    };
    let mut buf = BytesMut::from(&body[..]);
    let first = mailbox::decode(&mut buf);
    let second = mailbox::decode(&mut buf);
    let (cert, time_ms, signature) = match (first, second) {
        (
            Ok(Some(Packet::Register { cert })),
            Ok(Some(Packet::HttpProof { time_ms, signature })),
        ) if buf.is_empty() => (cert, time_ms, signature),
        _ => return unauthorized("not REGISTER then HTTP_PROOF"),
    };
    if now_ms().abs_diff(time_ms) > PROOF_WINDOW.as_millis() as u64 {
        return unauthorized("proof time out of the window");
    }
    if crypto::verify_http_proof(&cert, time_ms, &signature).is_err() {
        return unauthorized("the proof does not verify");
    }
    let now = Instant::now();
    let seen = b
        .shared
        .replay
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(signature, now);
    match seen {
        Ok(()) => {}
        Err(Replay::Seen) => return unauthorized("replayed proof"),
        Err(Replay::Full) => return busy(),
    }
    let fp = crypto::fingerprint(&cert);
    if let Err(refusal) = b.shared.register(fp, cert, now, Via::Http) {
        // A client's own limit is an answer (401); the peer's limit sends the proxy elsewhere.
        return match refusal {
            Packet::Error { code, .. } if code == MailboxError::Busy as u16 => busy(),
            _ => unauthorized("registration limit"),
        };
    }
    let Some((token, session)) = issue_token(&b.shared, &fp, now) else {
        return busy();
    };
    let mut r = Response::new(Body::from(hex::encode(token)));
    set(&mut r, lp::CLIENT_ID, &client_id(&fp, &session));
    r
}

/// The client id of a session at the proxy: `<fingerprint hex>.<session hex>`.
fn client_id(fp: &Fingerprint, session: &Session) -> String {
    format!("{}.{}", hex::encode(fp), hex::encode(session))
}

/// Parses a client id made by [`client_id`].
fn parse_client_id(value: &[u8]) -> Option<(Fingerprint, Session)> {
    let value = value.trim_ascii();
    let dot = value.iter().position(|b| *b == b'.')?;
    let fp = hex32(&value[..dot])?;
    let mut session = [0u8; 8];
    hex::decode_to_slice(&value[dot + 1..], &mut session).ok()?;
    Some((fp, session))
}

/// 503 with `Retry-After`: the peer as a whole is at a limit.
fn busy() -> Response {
    let mut r = StatusCode::SERVICE_UNAVAILABLE.into_response();
    set(&mut r, lp::RETRY_AFTER, "5");
    r
}

fn set(r: &mut Response, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(HeaderName::from_static(name), v);
    }
}

/// A new session for `fp`: its token and id, or `None` at the overall token limit (or
/// without randomness).
fn issue_token(shared: &Shared, fp: &Fingerprint, now: Instant) -> Option<([u8; 32], Session)> {
    let idle = shared.config.idle_timeout;
    let mut guard = shared.lock();
    let st = &mut *guard;
    let c = st.clients.get_mut(fp)?;
    st.tokens -= c.http.purge(now, idle);
    if c.http.tokens.len() >= TOKENS_PER_CLIENT {
        // The least recently used: a listening session polls all the time and stays.
        let lru = c
            .http
            .tokens
            .iter()
            .enumerate()
            .min_by_key(|(_, t)| t.last_used)
            .map(|(i, _)| i);
        if let Some(i) = lru {
            c.http.tokens.remove(i);
            c.http.forget_gone();
            st.tokens -= 1;
        }
    }
    if st.tokens >= shared.config.max_clients {
        purge_tokens(st, now, idle);
        if st.tokens >= shared.config.max_clients {
            return None;
        }
    }
    let mut secret = [0u8; 32];
    let mut session = [0u8; 8];
    getrandom::fill(&mut secret).ok()?;
    getrandom::fill(&mut session).ok()?;
    st.clients.get_mut(fp)?.http.tokens.push_back(Token {
        secret,
        session,
        last_used: now,
    });
    st.tokens += 1;
    Some((secret, session))
}

/// Whether `token` is the live token of session `session` of `fp`; a match counts as a use.
fn check_token(
    shared: &Shared,
    fp: &Fingerprint,
    session: &Session,
    token: &[u8; 32],
    now: Instant,
) -> bool {
    let mut guard = shared.lock();
    let st = &mut *guard;
    let Some(c) = st.clients.get_mut(fp) else {
        return false;
    };
    st.tokens -= c.http.purge(now, shared.config.idle_timeout);
    let mut found = false;
    for t in c.http.tokens.iter_mut() {
        if bool::from(t.secret.ct_eq(token)) && t.session == *session {
            t.last_used = now;
            found = true;
        }
    }
    found
}

/// Parses 64 hex digits.
fn hex32(value: &[u8]) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(value.trim_ascii(), &mut out).ok()?;
    Some(out)
}

/// `Type: Packet`: authenticate `From` with the bearer token, then one packet or a fetch.
async fn packet(b: &Backend, headers: &HeaderMap, body: Bytes) -> Response {
    let from = headers
        .get(lp::FROM)
        .and_then(|v| parse_client_id(v.as_bytes()));
    let token = headers
        .get(lp::AUTHORIZATION)
        .and_then(|v| lp::parse_bearer(v.as_bytes()).ok())
        .and_then(|t| hex32(t.as_bytes()));
    let now = Instant::now();
    let (Some((fp, session)), Some(token)) = (from, token) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let to = client_id(&fp, &session);
    if !check_token(&b.shared, &fp, &session, &token, now) {
        tracing::debug!(client_fp = %hex::encode(&fp[..8]), "http packet with a bad or expired token");
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let tag = headers
        .get(REQUEST_TAG)
        .filter(|v| lp::parse_id(REQUEST_TAG, v.as_bytes()).is_ok() && v.len() <= 64);
    if body.is_empty() {
        let Ok(_permit) = b.shared.held.try_acquire() else {
            return busy();
        };
        return match wait_message(b, &fp, &session).await {
            Some(p) => answer(&to, &p, None),
            None => StatusCode::OK.into_response(),
        };
    }
    let mut buf = BytesMut::from(&body[..]);
    let p = match mailbox::decode(&mut buf) {
        Ok(Some(p)) if buf.is_empty() => p,
        _ => {
            tracing::warn!(client_fp = %hex::encode(&fp[..8]), "malformed http packet");
            let e = Packet::error(MailboxError::Protocol, "the body is not one packet");
            return answer(&to, &e, tag);
        }
    };
    let reply = match p {
        Packet::Deliver { to, id, blob } => {
            let key = headers
                .get(lp::IDEMPOTENCY_KEY)
                .map(|k| (fp, Sha256::digest(k.as_bytes()).into()));
            b.shared.deliver(Source::Client(fp), to, id, blob, now, key)
        }
        Packet::CertRequest { fingerprint } => b.shared.cert(&fingerprint),
        Packet::Fetch => match b.shared.fetch(&fp, now, Fetcher::Http(session)) {
            Fetched::Backlog(count) => Packet::QueueEnd { count },
            Fetched::Overflow | Fetched::Unknown => {
                Packet::error(MailboxError::NotRegistered, "register first")
            }
        },
        Packet::Ack { seq } => {
            b.shared.ack(&fp, seq);
            // Echoed: an empty answer would leave the client's request waiting for a packet.
            Packet::Ack { seq }
        }
        Packet::Keepalive => Packet::Keepalive,
        other => Packet::error(
            MailboxError::Protocol,
            format!("packet type {} is not sent by clients", other.kind()),
        ),
    };
    answer(&to, &reply, tag)
}

/// 200 carrying `p` for the client id `to`, with the request's tag echoed.
fn answer(to: &str, p: &Packet, tag: Option<&HeaderValue>) -> Response {
    let mut r = Response::new(Body::from(mailbox::to_bytes(p)));
    set(&mut r, lp::TO, to);
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(t) = tag {
        r.headers_mut()
            .insert(HeaderName::from_static(REQUEST_TAG), t.clone());
    }
    r
}

/// The next message for session `session` of `fp`, waiting up to `http_hold` for one.
async fn wait_message(b: &Backend, fp: &Fingerprint, session: &Session) -> Option<Packet> {
    let deadline = tokio::time::Instant::now() + b.shared.config.http_hold;
    loop {
        let wake = b.shared.lock().clients.get(fp)?.wake.clone();
        let notified = wake.notified();
        tokio::pin!(notified);
        // Registered before looking, so a message stored after the look wakes us.
        notified.as_mut().enable();
        if let Some(p) = next_message(&b.shared, fp, session) {
            return Some(p);
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => return None,
            _ = b.shutdown.cancelled() => return None,
        }
    }
}

/// For the receiving session, the message after the cursor (which moves past it); for a
/// session that was taken over, the notice.
fn next_message(shared: &Shared, fp: &Fingerprint, session: &Session) -> Option<Packet> {
    let mut st = shared.lock();
    expire(&mut st, fp, Instant::now(), shared.config.max_age);
    let c = st.clients.get_mut(fp)?;
    if c.http.taken_over == Some(*session) {
        c.http.taken_over = None;
        return Some(Packet::error(
            MailboxError::NotRegistered,
            "another connection of this client took over",
        ));
    }
    if c.http.receiver != Some(*session) {
        return None;
    }
    let cursor = c.http.cursor;
    let m = c.queue.iter().find(|m| m.seq > cursor)?;
    c.http.cursor = m.seq;
    Some(Packet::Message {
        seq: m.seq,
        received_ms: m.received_ms,
        blob: m.blob.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replay_cache_refuses_repeats_forgets_old_ones_and_is_bounded() {
        let mut c = ReplayCache::default();
        let t0 = Instant::now();
        c.insert([1; 64], t0).unwrap();
        assert_eq!(c.insert([1; 64], t0), Err(Replay::Seen));
        let later = t0 + REPLAY_KEEP + Duration::from_secs(1);
        c.insert([1; 64], later).unwrap();
        for i in 1..REPLAY_ENTRIES {
            let mut sig = [0u8; 64];
            sig[..8].copy_from_slice(&(i as u64).to_be_bytes());
            c.insert(sig, later).unwrap();
        }
        assert_eq!(c.insert([2; 64], later), Err(Replay::Full));
        assert_eq!(c.order.len(), REPLAY_ENTRIES);
    }

    #[test]
    fn idle_tokens_are_purged_and_keys_are_bounded() {
        let mut h = HttpSide::default();
        let t0 = Instant::now();
        h.tokens.push_back(Token {
            secret: [1; 32],
            session: [1; 8],
            last_used: t0,
        });
        h.start_receiving([1; 8]);
        assert_eq!(
            h.purge(t0 + Duration::from_secs(10), Duration::from_secs(10)),
            0
        );
        assert_eq!(h.receiver, Some([1; 8]));
        assert_eq!(
            h.purge(t0 + Duration::from_secs(11), Duration::from_secs(10)),
            1
        );
        assert_eq!(h.receiver, None, "a gone session receives nothing");
        for i in 0..=REMEMBERED_KEYS {
            h.remember([i as u8; 32], [i as u8; 16]);
        }
        assert_eq!(h.keys.len(), REMEMBERED_KEYS);
        assert_eq!(h.stored(&[0; 32]), None);
        assert_eq!(h.stored(&[1; 32]), Some([1; 16]));
    }

    #[test]
    fn a_newer_receiver_takes_over_and_the_older_is_told() {
        let mut h = HttpSide::default();
        h.start_receiving([1; 8]);
        h.start_receiving([1; 8]);
        assert_eq!((h.receiver, h.taken_over), (Some([1; 8]), None));
        h.start_receiving([2; 8]);
        assert_eq!((h.receiver, h.taken_over), (Some([2; 8]), Some([1; 8])));
        assert!(h.end_receiving());
        assert_eq!((h.receiver, h.taken_over), (None, Some([2; 8])));
        assert!(!h.end_receiving());
    }

    #[test]
    fn client_ids_round_trip_and_parse_strictly() {
        let id = client_id(&[0xab; 32], &[0xcd; 8]);
        assert_eq!(id.len(), 64 + 1 + 16);
        assert_eq!(
            parse_client_id(id.as_bytes()),
            Some(([0xab; 32], [0xcd; 8]))
        );
        assert_eq!(parse_client_id(&id.as_bytes()[..64]), None);
        assert_eq!(parse_client_id(&id.as_bytes()[..80]), None);
        assert_eq!(parse_client_id(b"."), None);
        assert_eq!(parse_client_id(b""), None);
    }

    #[test]
    fn hex_fingerprints_parse_strictly() {
        assert_eq!(hex32(&[b'a'; 64]), Some([0xaa; 32]));
        assert_eq!(hex32(&[b'a'; 63]), None);
        assert_eq!(hex32(&[b'g'; 64]), None);
        assert_eq!(hex32(b""), None);
    }
}
