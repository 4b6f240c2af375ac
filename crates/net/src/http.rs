//! Serving an axum [`Router`] on a TCP listener with the limits every tube HTTP listener needs
//! (the long-poll proxy, the mailbox peer's HTTP backend, the admin listeners): [`serve`].
//!
//! `axum::serve` sets no timer and no cap, so a client that sends half a request header holds
//! its connection (and a file descriptor) for ever. Here each connection is served by hyper's
//! HTTP/1 server under a watch that closes it when
//!
//! - a request header is not complete [`HttpLimits::header_timeout`] after the connection was
//!   accepted or after the first byte of a later request arrived;
//! - a kept-alive connection waits longer than [`HttpLimits::idle_timeout`] for its next
//!   request, counted from when hyper took the last frame of the previous response. A request
//!   in progress (a long poll held open, a response body still streaming) is never cut by
//!   either timeout;
//! - a write to the client has made no progress for [`HttpLimits::write_timeout`] (the client
//!   stopped reading a response, whatever its phase);
//!
//! and at most [`HttpLimits::max_connections`] connections are open at once: one more is
//! closed as soon as it is accepted. Request bodies are the handlers' business: a route reads
//! one with [`read_body`], bounded in size and time.
//!
//! hyper's own `header_read_timeout` is not used: it also runs while a kept-alive connection
//! waits for its next request, so it cannot tell a slow header from an idle connection.

use std::convert::Infallible;
use std::io;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use hyper::Request;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::{Service as _, service_fn};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

/// Why a request body could not be read ([`read_body`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Longer than allowed (claimed by `Content-Length`, or found while reading).
    TooLarge,
    /// Not all there in time.
    TimedOut,
    /// The body broke off (the connection ended or was malformed).
    Broken,
}

impl BodyError {
    /// The answer: 413, 408 or 400.
    pub fn status(self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            BodyError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::TimedOut => StatusCode::REQUEST_TIMEOUT,
            BodyError::Broken => StatusCode::BAD_REQUEST,
        }
    }
}

/// Reads a request body of at most `max` bytes within `limit`. A `Content-Length` claiming
/// more than `max` is refused at once, without waiting for a body that may never come.
pub async fn read_body(
    headers: &axum::http::HeaderMap,
    body: Body,
    max: usize,
    limit: Duration,
) -> Result<Bytes, BodyError> {
    let claimed = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if claimed.is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLarge);
    }
    let read = http_body_util::BodyExt::collect(http_body_util::Limited::new(body, max));
    match crate::timer::timeout(limit, read).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Ok(Err(_)) => Err(BodyError::Broken),
        Err(_) => Err(BodyError::TimedOut),
    }
}

/// Open connections at most on an admin listener (metrics, health, state for operators).
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// The limits of one HTTP listener. [`HttpLimits::default`] suits a public listener,
/// [`HttpLimits::admin`] an admin one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Time to receive a whole request header, counted from the accept for the first request
    /// of a connection and from the first byte of the request for later ones; past it the
    /// connection is closed without an answer.
    pub header_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request before it is closed.
    /// Keep it longer than clients keep unused pooled connections (90 s in reqwest, hyper and
    /// Go), so that the client closes an idle connection first and never sends a request on
    /// one the server is closing.
    pub idle_timeout: Duration,
    /// How long a write to the client may make no progress (the client stopped reading);
    /// past it the connection is closed. A client that reads slowly but reads is not cut.
    pub write_timeout: Duration,
    /// Connections open at once at most; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// After shutdown, how long requests in progress get to finish (idle connections close at
    /// once); connections still open then are closed.
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    /// 10 s for a header, 120 s idle between requests, 30 s for a stalled write, 10 000
    /// connections, 5 s of grace.
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            write_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl HttpLimits {
    /// The defaults with [`ADMIN_MAX_CONNECTIONS`] connections.
    pub fn admin() -> Self {
        HttpLimits {
            max_connections: ADMIN_MAX_CONNECTIONS,
            ..HttpLimits::default()
        }
    }
}

/// Serves `router` on `listener` under `limits` until `shutdown` is cancelled. Then it stops
/// accepting, closes idle connections, lets requests in progress finish for up to
/// [`HttpLimits::shutdown_grace`], closes what is left and returns.
///
/// Accept errors (running out of file descriptors) are retried, see [`crate::accept`].
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    let what = match listener.local_addr() {
        Ok(a) => format!("http {a}"),
        Err(_) => "http".to_string(),
    };
    let service = TowerToHyperService::new(router);
    // More permits than a semaphore holds cannot be open anyway (file descriptors run out).
    let slots = Arc::new(Semaphore::new(
        limits.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let tracker = TaskTracker::new();
    // Cancelled when the grace period is over: the connections still open close.
    let force = CancellationToken::new();
    let mut refused = 0u64;
    while let Some((stream, peer_addr)) = crate::accept(&listener, &shutdown, &what).await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            tracing::debug!(
                %peer_addr,
                listener = %what,
                refused,
                "connection limit reached, closing"
            );
            drop(stream);
            continue;
        };
        let conn = Connection {
            stream,
            service: service.clone(),
            limits,
            stop: shutdown.clone(),
            force: force.clone(),
            _slot: slot,
        };
        let span = tracing::debug_span!("http", %peer_addr);
        tracker.spawn(conn.run().instrument(span));
    }
    drop(listener);
    tracker.close();
    if crate::timer::timeout(limits.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::debug!(
            listener = %what,
            open = tracker.len(),
            "connections still open after the shutdown grace period, closing them"
        );
        force.cancel();
        tracker.wait().await;
    }
}

/// One accepted connection and what serving it needs (it runs in a span with `peer_addr`).
struct Connection {
    stream: TcpStream,
    service: TowerToHyperService<Router>,
    limits: HttpLimits,
    /// The listener's shutdown: finish the request in progress, then close.
    stop: CancellationToken,
    /// The end of the shutdown grace period: close now.
    force: CancellationToken,
    /// Held while the connection is open (the cap on connections).
    _slot: OwnedSemaphorePermit,
}

/// Why a connection ended.
enum End {
    Served(Result<(), hyper::Error>),
    TimedOut(Wait),
    Forced,
}

impl Connection {
    async fn run(self) {
        let Connection {
            stream,
            service,
            limits,
            stop,
            force,
            _slot,
        } = self;
        let track = Arc::new(Track::new(limits));
        let io = TokioIo::new(Watched {
            io: stream,
            track: track.clone(),
        });
        let on_request = {
            let track = track.clone();
            service_fn(move |req: Request<Incoming>| {
                let busy = Busy::enter(track.clone());
                let call = service.call(req.map(Body::new));
                async move {
                    let response = call.await?;
                    Ok::<_, Infallible>(response.map(|body| Tracked { body, _busy: busy }))
                }
            })
        };
        let mut conn = pin!(
            http1::Builder::new()
                .keep_alive(true)
                .header_read_timeout(None)
                .serve_connection(io, on_request)
        );
        let mut stopping = pin!(stop.cancelled_owned());
        let mut forced = pin!(force.cancelled_owned());
        let mut stopped = false;
        let mut timer = pin!(crate::timer::sleep(limits.header_timeout));
        let end = std::future::poll_fn(|cx| {
            if forced.as_mut().poll(cx).is_ready() {
                return Poll::Ready(End::Forced);
            }
            if !stopped && stopping.as_mut().poll(cx).is_ready() {
                // Closes the connection now if it is idle, else after the response.
                stopped = true;
                conn.as_mut().graceful_shutdown();
            }
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                return Poll::Ready(End::Served(r));
            }
            // The watch changes only while `conn` is polled (reads, requests and responses all
            // happen inside it), so what it says now holds until the next poll.
            let Some((until, wait)) = track.deadline() else {
                return Poll::Pending;
            };
            if timer.deadline() != until {
                timer.as_mut().reset(until);
            }
            match timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(End::TimedOut(wait)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match end {
            End::Served(Ok(())) => {}
            End::Served(Err(e)) => {
                tracing::debug!(error = %e, "http connection failed")
            }
            End::TimedOut(Wait::Header) => {
                tracing::debug!("request header not received in time, closing");
            }
            End::TimedOut(Wait::Idle) => tracing::debug!("idle connection closed"),
            End::TimedOut(Wait::Write) => {
                tracing::debug!("the client stopped reading the response, closing");
            }
            End::Forced => tracing::debug!("connection closed at shutdown"),
        }
    }
}

/// What a waiting connection waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// The rest of a request header (or the first request of a new connection).
    Header,
    /// The first byte of the next request.
    Idle,
    /// The client to read what is being written to it.
    Write,
}

/// Where a connection is, for its timeouts.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// No request in progress; the connection closes at `until`.
    Waiting { until: Instant, wait: Wait },
    /// This many requests are being answered (their responses not yet fully handed to hyper):
    /// no timeout.
    Busy(usize),
}

/// The phase of one connection, moved on by its reads, requests and responses, and whether a
/// write to it is stuck.
struct Track {
    limits: HttpLimits,
    phase: Mutex<Phase>,
    /// While a write waits for the client to read: when the connection closes unless the
    /// write moves on.
    stalled: Mutex<Option<Instant>>,
}

impl Track {
    fn new(limits: HttpLimits) -> Self {
        Track {
            limits,
            phase: Mutex::new(Phase::Waiting {
                until: after(limits.header_timeout),
                wait: Wait::Header,
            }),
            stalled: Mutex::new(None),
        }
    }

    /// A write could not take a byte: its time starts (if it had not).
    fn write_blocked(&self) {
        let mut s = self.stalled.lock().unwrap_or_else(PoisonError::into_inner);
        if s.is_none() {
            *s = Some(after(self.limits.write_timeout));
        }
    }

    /// A write took bytes: no write is stuck.
    fn wrote(&self) {
        *self.stalled.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    fn with<R>(&self, f: impl FnOnce(&mut Phase) -> R) -> R {
        // A poisoned lock still holds a valid phase (every write is one assignment).
        f(&mut self.phase.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Bytes arrived: on an idle connection they start a request header.
    fn read(&self) {
        self.with(|p| {
            if let Phase::Waiting {
                wait: Wait::Idle, ..
            } = p
            {
                *p = Phase::Waiting {
                    until: after(self.limits.header_timeout),
                    wait: Wait::Header,
                };
            }
        });
    }

    /// A request header was complete: its request is in progress.
    fn enter(&self) {
        self.with(|p| {
            *p = match *p {
                Phase::Waiting { .. } => Phase::Busy(1),
                Phase::Busy(n) => Phase::Busy(n + 1),
            }
        });
    }

    /// A request is over (its response handed to hyper, or dropped).
    fn leave(&self) {
        self.with(|p| {
            *p = match *p {
                Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
                _ => Phase::Waiting {
                    until: after(self.limits.idle_timeout),
                    wait: Wait::Idle,
                },
            }
        });
    }

    /// When the connection closes unless something happens, and what it waits for.
    fn deadline(&self) -> Option<(Instant, Wait)> {
        let phase = self.with(|p| match *p {
            Phase::Waiting { until, wait } => Some((until, wait)),
            Phase::Busy(_) => None,
        });
        let stalled = self
            .stalled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|until| (until, Wait::Write));
        match (phase, stalled) {
            (Some(p), Some(w)) => Some(if w.0 < p.0 { w } else { p }),
            (p, w) => p.or(w),
        }
    }
}

/// `now + d`, or about 30 years from now for a `d` too long to add.
fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 24 * 3600))
}

/// A request in progress, from its complete header until its response body is dropped.
struct Busy(Arc<Track>);

impl Busy {
    fn enter(track: Arc<Track>) -> Self {
        track.enter();
        Busy(track)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// A response body that keeps its request in progress until hyper drops it (after its last
/// frame, or when the connection ends).
struct Tracked {
    body: Body,
    _busy: Busy,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The TCP stream, telling the watch when bytes arrive and whether writes move.
struct Watched {
    io: TcpStream,
    track: Arc<Track>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.track.read();
        }
        r
    }
}

impl Watched {
    fn watch_write(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Pending => self.track.write_blocked(),
            Poll::Ready(Ok(n)) if *n > 0 => self.track.wrote(),
            Poll::Ready(_) => {}
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch_write(&r);
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch_write(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HttpLimits {
        HttpLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            ..HttpLimits::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_watch_times_headers_and_idle_waits_but_no_request_in_progress() {
        let secs = Duration::from_secs;
        let t0 = Instant::now();
        let t = Track::new(limits());
        assert_eq!(t.deadline(), Some((t0 + secs(10), Wait::Header)));
        tokio::time::advance(secs(5)).await;
        t.read();
        assert_eq!(
            t.deadline(),
            Some((t0 + secs(10), Wait::Header)),
            "bytes of a header do not extend its time"
        );
        t.enter();
        assert_eq!(t.deadline(), None);
        tokio::time::advance(secs(100)).await;
        t.read();
        assert_eq!(t.deadline(), None, "body bytes do not start a header");
        t.leave();
        let idle = Instant::now();
        assert_eq!(t.deadline(), Some((idle + secs(60), Wait::Idle)));
        tokio::time::advance(secs(30)).await;
        t.read();
        assert_eq!(
            t.deadline(),
            Some((idle + secs(40), Wait::Header)),
            "the first byte of the next request starts its header time"
        );
        t.enter();
        t.enter();
        t.leave();
        assert_eq!(
            t.deadline(),
            None,
            "a pipelined request is still in progress"
        );
        t.leave();
        assert_eq!(t.deadline().map(|(_, w)| w), Some(Wait::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_write_has_its_own_deadline_in_any_phase() {
        let secs = Duration::from_secs;
        let t0 = Instant::now();
        let t = Track::new(HttpLimits {
            write_timeout: secs(30),
            ..limits()
        });
        t.enter();
        assert_eq!(t.deadline(), None);
        t.write_blocked();
        assert_eq!(t.deadline(), Some((t0 + secs(30), Wait::Write)));
        tokio::time::advance(secs(10)).await;
        t.write_blocked();
        assert_eq!(
            t.deadline(),
            Some((t0 + secs(30), Wait::Write)),
            "a write still stuck keeps its first time"
        );
        t.wrote();
        assert_eq!(t.deadline(), None, "a write that moves clears it");
        t.leave();
        let idle = Instant::now();
        t.write_blocked();
        assert_eq!(
            t.deadline(),
            Some((idle + secs(30), Wait::Write)),
            "the earlier of the idle time (60 s) and the write's"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_too_long_to_add_saturates() {
        let far = after(Duration::MAX);
        assert!(far > Instant::now() + Duration::from_secs(365 * 24 * 3600));
        let t = Track::new(HttpLimits {
            header_timeout: Duration::MAX,
            idle_timeout: Duration::MAX,
            ..HttpLimits::default()
        });
        t.enter();
        t.leave();
        assert!(t.deadline().is_some());
    }
}
