//! The stream multiplexer: many byte streams over one framed connection.
//!
//! [`Mux::start`] takes a connection whose handshake is done and spawns two tasks on the given
//! tracker: a reader that decodes frames and dispatches them, and a writer that drains two
//! queues (urgent: WINDOW, RESET, PONG, errors; data: OPEN, DATA, FIN, CONTROL) into batched
//! writes. The reader never waits on the writer, so credit updates always flow. The connection
//! is split into the reader's half and the writers' half ([`Transport`]); tube's TLS splits
//! without a shared lock.
//!
//! A stream task with DATA (or OPEN, FIN, RESET) to send writes it into the transport itself
//! when the writer task is idle and no frame handed to the data queue is still unwritten (one
//! task hop less per chunk, per new stream and per close); otherwise it queues the frames for
//! the writer task. Either way a stream's frames go out in the order they were sent. A new
//! stream can take with its OPEN what its socket already holds ([`Mux::open_reading`]): a user
//! who speaks first costs one TLS record and one write for both.
//!
//! A stream whose consumer registered its socket ([`StreamRx::deliver_to`]) gets DATA written
//! by the reader itself, without waking the consumer, whenever nothing of that stream is queued
//! or in the consumer's hands and the socket takes the bytes at once (one task hop and one copy
//! less per chunk); the rest is queued as usual, so the order always holds. The reader parses
//! frames where the transport's plaintext lies ([`crate::source`]: over TLS, the record opened
//! in place), so a DATA payload written directly is never copied in user space.
//!
//! The connection closes (every stream reset, every stream's abort signal raised) on a
//! protocol error, an IO error, [`Mux::close`], or the cancellation of its token.
//!
//! Credit (WINDOW) for consumed bytes is written into the transport by the task that consumed
//! them (the reader after a direct write, or the consumer) when nobody else is writing, and
//! handed to the writer task otherwise: returning credit costs no wake-up of another thread.
//!
//! Bounds (see `docs/protocols/relay.md`):
//! - per stream, the receive buffer holds at most the stream's window (the peer's credit); a
//!   peer that sends more is a FLOW_CONTROL_ERROR and the connection closes. A window starts at
//!   `window` and doubles (up to `max_window`) when it held its stream back: credit came back
//!   within two round trips, timed by one PING at a time, at most one per 100 ms. Growth over
//!   all streams is at most `window_budget`;
//! - per connection: at most `max_streams` streams, at most `write_queue` frames (each at most
//!   32 KiB) waiting in the data queue, and at most `max_peer_urgent` answers owed to the peer
//!   (PONGs, refusals) before it is treated as a flood and disconnected.

use std::collections::{HashMap, VecDeque};
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tube_proto::control::{ControlMessage, ErrorCode};
use tube_proto::flow::{MAX_CREDIT, RecvWindow, tuned_window};
use tube_proto::frame::{self, Frame, FrameLimits, MAX_DATA_PAYLOAD};
use tube_proto::frame_parser::{FrameParser, Parsed};

use crate::codec::HandshakeConn;
use crate::source::{PlainRuns, Runs};

/// Tunables of one multiplexed connection.
#[derive(Debug, Clone)]
pub struct MuxConfig {
    /// Receive window per stream, in bytes (credit granted to the peer at open). Announced to
    /// the peer in the handshake.
    pub window: u32,
    /// The peer's announced receive window: our initial send credit per stream.
    pub peer_window: u32,
    /// Most streams open at once.
    pub max_streams: usize,
    /// Frames the data queue holds before senders wait.
    pub write_queue: usize,
    /// Answers owed to the peer (PONG, stream refusals) before the peer counts as flooding.
    pub max_peer_urgent: usize,
    /// Control messages from the peer waiting for the session before it counts as flooding.
    pub control_queue: usize,
    /// Frame size limits.
    pub limits: FrameLimits,
    /// Largest receive window a stream may grow to (see `tube_proto::flow::tuned_window`).
    pub max_window: u32,
    /// Most bytes of window growth over all streams of the connection at once: the receive
    /// buffers hold at most `max_streams × window + window_budget`.
    pub window_budget: usize,
}

impl Default for MuxConfig {
    fn default() -> Self {
        Self {
            window: DEFAULT_WINDOW,
            peer_window: DEFAULT_WINDOW,
            max_streams: 16 * 1024,
            write_queue: 64,
            max_peer_urgent: 1024,
            control_queue: 64,
            limits: FrameLimits::default(),
            max_window: DEFAULT_MAX_WINDOW,
            window_budget: DEFAULT_WINDOW_BUDGET,
        }
    }
}

/// The default per-stream receive window (256 KiB), assumed for a peer that announces none.
pub const DEFAULT_WINDOW: u32 = 256 * 1024;

/// The default largest window a stream grows to (4 MiB).
pub const DEFAULT_MAX_WINDOW: u32 = 4 * 1024 * 1024;

/// The default budget for window growth per connection (4 MiB: one stream at the largest).
pub const DEFAULT_WINDOW_BUDGET: usize = 4 * 1024 * 1024;

/// Least time between two round-trip probes (PING) while data flows.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Smallest window a peer may announce (one full DATA frame).
pub const MIN_WINDOW: u32 = MAX_DATA_PAYLOAD;

/// Most send credit one [`StreamTx::reserve`] takes: what one read from a socket may carry,
/// sent as several DATA frames.
pub const MAX_RESERVE: usize = 4 * MAX_DATA_PAYLOAD as usize;

/// Largest window a peer may announce.
pub const MAX_WINDOW: u32 = 1 << 30;

/// A window brought into [`MIN_WINDOW`]..=[`MAX_WINDOW`]: what is announced and what a peer's
/// announcement is taken as.
pub fn clamp_window(w: u32) -> u32 {
    w.clamp(MIN_WINDOW, MAX_WINDOW)
}

/// Which end of the connection this is: only the opener sends OPEN frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opens streams (the relay).
    Opener,
    /// Accepts streams (the agent).
    Acceptor,
}

/// Why a multiplexed connection ended or an operation on it failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MuxError {
    /// The connection is closed (by us, the peer, or a transport failure).
    #[error("connection closed")]
    Closed,
    /// The peer broke the protocol; the connection was closed with this code.
    #[error("{}: {message}", tube_proto::control::describe_code(*.code as u16))]
    Protocol {
        /// The error code sent to the peer.
        code: ErrorCode,
        /// What happened.
        message: String,
    },
    /// The transport failed.
    #[error("transport: {0}")]
    Io(String),
    /// No more streams may be opened.
    #[error("too many streams")]
    TooManyStreams,
}

/// What arrives on a stream.
#[derive(Debug)]
pub enum Inbound {
    /// Bytes.
    Data(Bytes),
    /// The peer will send no more.
    Fin,
    /// The peer aborted the stream with this code.
    Reset(u16),
}

/// A stream the peer opened (acceptor side).
#[derive(Debug)]
pub struct Incoming {
    /// The stream.
    pub stream: MuxStream,
    /// The tunnel the user connected to.
    pub tunnel: [u8; 16],
    /// The user's address as the relay saw it.
    pub peer: String,
}

/// Events a session receives from its connection.
#[derive(Debug)]
pub struct MuxEvents {
    /// Control messages from the peer, in order.
    pub control: mpsc::Receiver<ControlMessage>,
    /// Streams the peer opened (always empty for [`Role::Opener`]).
    pub incoming: mpsc::Receiver<Incoming>,
}

/// A connection the mux takes apart into the halves its reader and writer own.
pub trait Transport: AsyncRead + AsyncWrite + Send + 'static {
    /// The half the reader task owns.
    type Read: Runs;
    /// The half direct writes and the writer task share.
    type Write: AsyncWrite + Unpin + Send + 'static;
    /// Splits the connection.
    fn into_halves(self) -> (Self::Read, Self::Write);
}

/// TLS from [`crate::secure`]: halves that share no lock.
impl Transport for crate::secure::SecureStream<tokio::net::TcpStream> {
    type Read = crate::secure::SecureReader<tokio::net::tcp::OwnedReadHalf>;
    type Write = crate::secure::SecureWriter<tokio::net::tcp::OwnedWriteHalf>;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

/// Plain TCP (tests and benchmarks).
impl Transport for tokio::net::TcpStream {
    type Read = PlainRuns<tokio::net::tcp::OwnedReadHalf>;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        let (rd, wr) = self.into_split();
        (PlainRuns::new(rd), wr)
    }
}

/// An in-memory pipe (tests and benchmarks).
impl Transport for tokio::io::DuplexStream {
    type Read = PlainRuns<tokio::io::ReadHalf<tokio::io::DuplexStream>>;
    type Write = tokio::io::WriteHalf<tokio::io::DuplexStream>;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        let (rd, wr) = tokio::io::split(self);
        (PlainRuns::new(rd), wr)
    }
}

/// A handle to a running multiplexed connection. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Mux {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: MuxConfig,
    role: Role,
    data_tx: mpsc::Sender<Frame>,
    /// Frames handed to `data_tx` and not yet written: a stream task may write directly only
    /// when this is 0 (checked while holding `out`), so it never overtakes its own queued frames.
    unwritten: AtomicUsize,
    /// The transport's write half and the batch being written. The writer task takes it out
    /// while it writes (and puts it back); a stream task writes directly under the lock, never
    /// waiting for it. A plain lock: tokio's also locks its waiter list on every release, and
    /// this one is taken and released for every message written directly.
    out: Mutex<Option<Out>>,
    /// Wakes the writer task to finish what a direct write left (a partial write, a flush).
    writer_wake: Notify,
    urgent_tx: mpsc::UnboundedSender<(Frame, bool)>,
    peer_urgent: AtomicUsize,
    streams: Mutex<HashMap<u32, Arc<StreamShared>, IdHash>>,
    next_id: AtomicU32,
    closed: CancellationToken,
    /// Set by [`Inner::close`] before `closed` is cancelled: what the hot paths check (a
    /// token's state sits behind a mutex).
    closing: AtomicBool,
    /// Raised by [`Inner::close`]: the reader's cheap wait for the end (the token's
    /// cancellation from outside reaches it through a watcher task that closes the mux).
    reader_stop: Signal,
    reason: Mutex<Option<MuxError>>,
    /// Window growth in use over all streams (bytes beyond `cfg.window`), within
    /// `cfg.window_budget`; each stream gives its share back when it is dropped.
    grown: Arc<AtomicUsize>,
    /// The round trip as PING and PONG measure it, for window tuning.
    rtt: Mutex<Rtt>,
    /// The mux runs on a single-threaded runtime: bulk DATA goes to the writer task (see
    /// [`StreamTx::send_reserved`]).
    one_thread: bool,
}

/// Round-trip probing: one PING at a time, at most one per [`PROBE_EVERY`], sent only while
/// credit is being returned (data flows). The estimate is the latest sample: the round trip
/// credit sees depends on the load of the moment (a busy peer answers later), so a sample from
/// an idle moment must not hold back a window under load, nor the reverse.
#[derive(Debug, Default)]
struct Rtt {
    latest: Option<std::time::Duration>,
    /// The PING in flight: its payload and when it was sent.
    probe: Option<(u64, std::time::Instant)>,
    last_probe: Option<std::time::Instant>,
    next: u64,
}

impl Rtt {
    /// A PING to send now, if one is due.
    fn probe_due(&mut self, now: std::time::Instant) -> Option<Frame> {
        if self.probe.is_some()
            || self
                .last_probe
                .is_some_and(|t| now.duration_since(t) < PROBE_EVERY)
        {
            return None;
        }
        self.next = self.next.wrapping_add(1);
        self.probe = Some((self.next, now));
        self.last_probe = Some(now);
        Some(Frame::Ping(self.next))
    }

    /// Takes a PONG: a sample if it answers the PING in flight.
    fn on_pong(&mut self, v: u64, now: std::time::Instant) {
        let Some((sent_v, at)) = self.probe else {
            return;
        };
        if sent_v != v {
            return;
        }
        self.probe = None;
        self.latest = Some(now.duration_since(at));
    }
}

#[derive(Debug)]
struct StreamShared {
    id: u32,
    /// Send credit: one permit per byte the peer will accept.
    credit: Semaphore,
    /// Credit taken by [`StreamTx::reserve`] and not yet sent or given back: part of what the
    /// peer granted, so it counts against [`MAX_CREDIT`].
    reserved: AtomicUsize,
    inbound: mpsc::UnboundedSender<Inbound>,
    recv: Mutex<Recv>,
    direct: Mutex<Direct>,
    /// The connection's window growth in use (see [`Inner::grown`]).
    grown: Arc<AtomicUsize>,
    /// Raised when the stream is reset by the peer or the connection closes.
    aborted: Signal,
}

/// A one-way signal with one waiter (a stream's task, or the reader): a flag and a waker slot,
/// so waiting on it costs a couple of atomic operations per wake-up, not a lock.
#[derive(Debug, Default)]
struct Signal {
    set: AtomicBool,
    waker: futures_util::task::AtomicWaker,
}

impl Signal {
    fn raise(&self) {
        self.set.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn poll(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.set.load(Ordering::Acquire) {
            return std::task::Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // Raised between the check and the registration: its wake-up may have been missed.
        if self.set.load(Ordering::Acquire) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }
}

/// A stream's receive side: its window, and when credit was last returned.
#[derive(Debug)]
struct Recv {
    window: RecvWindow,
    /// Window growth this stream holds from the connection's budget.
    grown: usize,
    last_update: Option<std::time::Instant>,
    /// The peer sent FIN: DATA or another FIN after it is a protocol error (each would queue
    /// an item the consumer, done reading, never takes).
    fin: bool,
}

impl Drop for StreamShared {
    fn drop(&mut self) {
        let recv = self.recv.get_mut().unwrap_or_else(|e| e.into_inner());
        self.grown.fetch_sub(recv.grown, Ordering::Relaxed);
    }
}

/// Direct delivery of one stream (see the module docs). Every item sent on `inbound` is counted
/// in `queued` under this lock, and the consumer takes an item and marks itself busy under it
/// too, so the reader writes directly only when no earlier byte can still be on its way.
#[derive(Debug, Default)]
struct Direct {
    /// The consumer's socket and its byte counter, once registered.
    sink: Option<(Arc<tokio::net::tcp::OwnedWriteHalf>, Arc<AtomicU64>)>,
    /// Items sent on `inbound` and not yet taken by the consumer.
    queued: usize,
    /// DATA after every queued item, gathered into one buffer instead of an item per frame:
    /// a peer sending 1-byte frames to a consumer that does not read would otherwise hold a
    /// channel slot and an allocation (about 75 bytes) per byte of window. Sent on `inbound`
    /// once it holds [`COALESCE`] bytes, when the consumer has taken every item before it, or
    /// before a FIN or RESET. Never holds bytes while nothing is queued.
    tail: BytesMut,
    /// The consumer holds items it has not finished writing.
    busy: bool,
}

impl StreamShared {
    /// Ends the stream from the peer's side or the connection's: no more credit, the consumer
    /// reads a reset, and a task waiting on [`StreamTx::aborted`] wakes.
    fn abort(&self, code: u16) {
        self.credit.close();
        self.aborted.raise();
        self.push(Inbound::Reset(code));
    }

    /// Queues `item` for the consumer.
    fn push(&self, item: Inbound) {
        let mut d = lock(&self.direct);
        self.send_tail(&mut d);
        if self.inbound.send(item).is_ok() {
            d.queued += 1;
        }
    }

    /// Sends the gathered tail (if any) as one item.
    fn send_tail(&self, d: &mut Direct) {
        if d.tail.is_empty() {
            return;
        }
        let tail = std::mem::take(&mut d.tail).freeze();
        if self.inbound.send(Inbound::Data(tail)).is_ok() {
            d.queued += 1;
        }
    }

    /// Whether the reader may write this stream's DATA to the socket itself now: a socket is
    /// registered, nothing is queued and the consumer holds nothing.
    fn direct_ok(&self) -> bool {
        let d = lock(&self.direct);
        d.queued == 0 && !d.busy && d.sink.is_some()
    }

    /// Queues DATA for the consumer, copied out of the read buffer: a zero-copy slice would
    /// keep the whole buffer allocation alive while the consumer is slow, so memory held could
    /// exceed the window by far. One memcpy per queued frame buys a hard bound.
    /// Small DATA behind queued items goes into the tail (see [`Direct::tail`]).
    fn queue_data(&self, d: &mut Direct, data: &[u8]) {
        if !d.tail.is_empty() || (d.queued > 0 && data.len() < COALESCE) {
            d.tail.extend_from_slice(data);
            if d.tail.len() >= COALESCE {
                self.send_tail(d);
            }
            return;
        }
        if self
            .inbound
            .send(Inbound::Data(Bytes::copy_from_slice(data)))
            .is_ok()
        {
            d.queued += 1;
        }
    }

    /// Writes the `pieces` of `buf` (in order, with nothing of this stream queued before them,
    /// at most [`MAX_IOV`]) to the registered socket in one write; what it does not take is
    /// queued, copied into one buffer. Returns the bytes written, for which the caller returns
    /// credit.
    fn write_direct(&self, buf: &[u8], pieces: &[std::ops::Range<usize>]) -> usize {
        let mut d = lock(&self.direct);
        let mut written = 0;
        if let Some((sock, count)) = &d.sink {
            // An error is left for the consumer's own write to find.
            written =
                try_write_pieces(sock, pieces.len(), |i| &buf[pieces[i].clone()]).unwrap_or(0);
            count.fetch_add(written as u64, Ordering::Relaxed);
        }
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        if written < total {
            let mut rest = BytesMut::with_capacity(total - written);
            let mut skip = written;
            for p in pieces {
                let piece = &buf[p.clone()];
                let from = skip.min(piece.len());
                skip -= from;
                rest.extend_from_slice(&piece[from..]);
            }
            if self.inbound.send(Inbound::Data(rest.freeze())).is_ok() {
                d.queued += 1;
            }
        }
        written
    }
}

impl Mux {
    /// Starts the reader and writer tasks on `tracker` for a connection whose handshake is
    /// done. `cancel` closes the connection when cancelled; the mux cancels it when the
    /// connection ends for any reason, so sessions can select on it.
    pub fn start<T>(
        conn: HandshakeConn<T>,
        role: Role,
        cfg: MuxConfig,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> (Mux, MuxEvents)
    where
        T: Transport,
    {
        let mut cfg = cfg;
        cfg.window = clamp_window(cfg.window);
        cfg.peer_window = clamp_window(cfg.peer_window);
        cfg.max_window = cfg.max_window.min(MAX_WINDOW);
        let parts = conn.into_parts();
        let (rd, wr) = parts.io.into_halves();
        let (data_tx, data_rx) = mpsc::channel(cfg.write_queue.max(1));
        let pending_write = parts.write_buf;
        let out = Out {
            wr: Box::pin(wr),
            batch: Batch {
                len: pending_write.len(),
                head: pending_write,
                segs: VecDeque::new(),
            },
        };
        let (urgent_tx, urgent_rx) = mpsc::unbounded_channel();
        let (control_tx, control_rx) = mpsc::channel(cfg.control_queue.max(1));
        // At most `max_streams` streams wait to be accepted, reset or not: a peer pairing each
        // OPEN with a RESET cannot queue more.
        let (incoming_tx, incoming_rx) = mpsc::channel(cfg.max_streams.max(1));
        let inner = Arc::new(Inner {
            cfg,
            role,
            data_tx,
            unwritten: AtomicUsize::new(0),
            out: Mutex::new(Some(out)),
            writer_wake: Notify::new(),
            urgent_tx,
            peer_urgent: AtomicUsize::new(0),
            streams: Mutex::new(HashMap::with_hasher(IdHash::new())),
            next_id: AtomicU32::new(1),
            closed: cancel,
            closing: AtomicBool::new(false),
            reader_stop: Signal::default(),
            reason: Mutex::new(None),
            grown: Arc::new(AtomicUsize::new(0)),
            rtt: Mutex::new(Rtt::default()),
            one_thread: tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread),
        });
        tracker.spawn(write_loop(inner.clone(), data_rx, urgent_rx));
        // The token cancelled from outside closes the mux (every stream reset). Ends when the
        // mux closes for any reason, which cancels the token.
        let watched = inner.clone();
        tracker.spawn(async move {
            watched.closed.cancelled().await;
            watched.close(MuxError::Closed);
        });
        let outlets = Outlets {
            control: control_tx,
            incoming: incoming_tx,
        };
        tracker.spawn(read_loop(inner.clone(), rd, parts.read_buf, outlets));
        (
            Mux { inner },
            MuxEvents {
                control: control_rx,
                incoming: incoming_rx,
            },
        )
    }

    /// Opens a stream to the peer for a user of `tunnel` coming from `peer`.
    pub async fn open(&self, tunnel: [u8; 16], peer: String) -> Result<MuxStream, MuxError> {
        let stream = self.new_outgoing()?;
        let open = Frame::Open {
            stream: stream.id(),
            tunnel,
            peer,
        };
        if let Err(open) = self.inner.write_frame_direct(open)
            && self.inner.queue(open).await.is_err()
        {
            return Err(self.close_reason());
        }
        Ok(stream)
    }

    /// [`Mux::open`], sending with the OPEN what `rd` holds at this moment (at most `max`
    /// bytes, within the stream's first credit and one DATA frame) in the same write: a user
    /// who speaks first costs one TLS record and one system call for both, where the OPEN and
    /// the first read would take one each. Returns the stream and what the read gave: the
    /// bytes sent (0 when `rd` held nothing yet, had ended, or the transport was busy), or
    /// the read's error (the stream is open; the caller resets it).
    pub async fn open_reading<R: AsyncRead + Unpin>(
        &self,
        tunnel: [u8; 16],
        peer: String,
        rd: &mut R,
        max: usize,
    ) -> Result<(MuxStream, std::io::Result<usize>), MuxError> {
        let stream = self.new_outgoing()?;
        let id = stream.id();
        let credit = stream.tx.try_reserve(max.min(MAX_DATA_PAYLOAD as usize));
        let mut open = Some(Frame::Open {
            stream: id,
            tunnel,
            peer,
        });
        let read = self.inner.write_here(true, |batch| {
            if let Some(f) = open.take() {
                batch.push(f);
            }
            if credit == 0 {
                return std::task::Poll::Ready(Ok(0));
            }
            // Only a look: a read that would wait leaves the caller to wait for the socket.
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            batch.read_data(id, credit, rd, &mut cx)
        });
        let read = match read {
            Some(std::task::Poll::Ready(r)) => r,
            _ => Ok(0),
        };
        let sent = read.as_ref().map_or(0, |n| *n);
        stream.tx.shared.reserved.fetch_sub(sent, Ordering::Relaxed);
        stream.tx.give_back(credit - sent);
        // The transport was busy: the OPEN goes in order through the data queue, alone.
        if let Some(open) = open
            && self.inner.queue(open).await.is_err()
        {
            return Err(self.close_reason());
        }
        Ok((stream, read))
    }

    /// A new stream with a fresh id, not yet announced to the peer.
    fn new_outgoing(&self) -> Result<MuxStream, MuxError> {
        let inner = &self.inner;
        if inner.is_closing() {
            return Err(self.close_reason());
        }
        let mut streams = lock(&inner.streams);
        if streams.len() >= inner.cfg.max_streams {
            return Err(MuxError::TooManyStreams);
        }
        let mut id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        while id == 0 || streams.contains_key(&id) {
            id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        }
        Ok(new_stream(inner, id, &mut streams))
    }

    /// Queues a control message (after data already queued).
    pub async fn send_control(&self, msg: &ControlMessage) -> Result<(), MuxError> {
        self.inner
            .queue(Frame::Control(msg.to_bytes()))
            .await
            .map_err(|_| self.close_reason())
    }

    /// Sends `msg` ahead of queued data and closes the connection once it is written.
    pub fn close_with(&self, msg: &ControlMessage) {
        let _ = self
            .inner
            .urgent_tx
            .send((Frame::Control(msg.to_bytes()), false));
        self.inner.close(MuxError::Closed);
    }

    /// Closes the connection; every stream ends with a reset.
    pub fn close(&self) {
        self.inner.close(MuxError::Closed);
    }

    /// Resolves when the connection has ended.
    pub async fn closed(&self) {
        self.inner.closed.cancelled().await
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closing() || self.inner.closed.is_cancelled()
    }

    /// Why the connection ended (`Closed` while it is still open).
    pub fn close_reason(&self) -> MuxError {
        lock(&self.inner.reason).clone().unwrap_or(MuxError::Closed)
    }

    /// Number of open streams.
    pub fn stream_count(&self) -> usize {
        lock(&self.inner.streams).len()
    }

    /// The token that is cancelled when this connection ends.
    pub fn token(&self) -> &CancellationToken {
        &self.inner.closed
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data (maps, counters) that is
    // still consistent, so a poisoned lock is safe to keep using.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn new_stream(
    inner: &Arc<Inner>,
    id: u32,
    streams: &mut HashMap<u32, Arc<StreamShared>, IdHash>,
) -> MuxStream {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(StreamShared {
        id,
        credit: Semaphore::new(inner.cfg.peer_window as usize),
        reserved: AtomicUsize::new(0),
        inbound: tx,
        recv: Mutex::new(Recv {
            window: RecvWindow::new(inner.cfg.window),
            grown: 0,
            last_update: None,
            fin: false,
        }),
        direct: Mutex::new(Direct::default()),
        grown: inner.grown.clone(),
        aborted: Signal::default(),
    });
    if inner.is_closing() {
        // Made while the connection closes, after `Inner::close` emptied the map (it sets
        // `closing` before taking the map's lock, which the caller holds): ended at once.
        shared.abort(ErrorCode::StreamAborted as u16);
    } else {
        streams.insert(id, shared.clone());
    }
    MuxStream {
        tx: StreamTx {
            shared: shared.clone(),
            mux: inner.clone(),
            fin_sent: AtomicBool::new(false),
        },
        rx: StreamRx {
            shared,
            mux: inner.clone(),
            rx,
            fin_recv: false,
            reset_recv: false,
        },
    }
}

impl Inner {
    /// Whether the connection is closing (see [`Inner::closing`]).
    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    fn close(&self, reason: MuxError) {
        self.closing.store(true, Ordering::Release);
        {
            let mut r = lock(&self.reason);
            if r.is_none() {
                *r = Some(reason);
            }
        }
        self.closed.cancel();
        self.reader_stop.raise();
        let streams: Vec<_> = lock(&self.streams).drain().map(|(_, s)| s).collect();
        for s in streams {
            s.abort(ErrorCode::StreamAborted as u16);
        }
    }

    fn protocol_error(&self, code: ErrorCode, message: String) {
        tracing::warn!(code = code as u16, %message, "closing connection: protocol error");
        let msg = ControlMessage::error(code, message.clone(), Some("protocol"));
        let _ = self.urgent_tx.send((Frame::Control(msg.to_bytes()), false));
        self.close(MuxError::Protocol { code, message });
    }

    /// Sends `frame` behind the data already queued (so a RESET never overtakes its own OPEN
    /// or DATA), without waiting: written directly when it can be, else queued; if the queue is
    /// full, a task waits for room.
    fn send_ordered(&self, frame: Frame) {
        let Err(frame) = self.write_frame_direct(frame) else {
            return;
        };
        self.unwritten.fetch_add(1, Ordering::AcqRel);
        match self.data_tx.try_send(frame) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(frame)) => {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let tx = self.data_tx.clone();
                    // Ends as soon as the frame is queued or the connection closes.
                    rt.spawn(async move {
                        let _ = tx.send(frame).await;
                    });
                }
            }
        }
    }

    /// Hands `frame` to the writer task, waiting for room in the data queue. Counted in
    /// `unwritten` before it enters the queue.
    async fn queue(&self, frame: Frame) -> Result<(), MuxError> {
        self.unwritten.fetch_add(1, Ordering::AcqRel);
        self.data_tx.send(frame).await.map_err(|_| MuxError::Closed)
    }

    /// Writes DATA frames of `id` carrying `data` into the transport from the calling task,
    /// if the writer task is idle and nothing queued is unwritten; `false` (nothing taken)
    /// otherwise. What the transport does not take at once stays in the batch for the writer
    /// task, which is woken to finish it.
    fn write_direct(&self, id: u32, data: &mut Bytes) -> bool {
        self.write_here(true, |batch| {
            while !data.is_empty() {
                let chunk = data.split_to(data.len().min(MAX_DATA_PAYLOAD as usize));
                batch.push(Frame::Data {
                    stream: id,
                    data: chunk,
                });
            }
        })
        .is_some()
    }

    /// [`Inner::write_direct`] for bytes the caller lends: copied straight into the batch (no
    /// buffer of their own), or `false` with nothing taken.
    fn write_direct_slice(&self, id: u32, data: &[u8]) -> bool {
        self.write_here(true, |batch| {
            for chunk in data.chunks(MAX_DATA_PAYLOAD as usize) {
                batch.push_data_slice(id, chunk);
            }
        })
        .is_some()
    }

    /// Writes `frame` (OPEN, FIN, RESET) into the transport from the calling task under the
    /// same conditions as DATA (see [`Inner::write_direct`]): a new connection or a close costs
    /// no wake-up of the writer task. The frame is handed back when it must be queued.
    fn write_frame_direct(&self, frame: Frame) -> Result<(), Frame> {
        let mut slot = Some(frame);
        self.write_here(true, |batch| {
            if let Some(f) = slot.take() {
                batch.push(f);
            }
        });
        slot.map_or(Ok(()), Err)
    }

    /// Adds frames to the batch with `fill` and writes it from the calling task as far as the
    /// transport takes it without waiting (the writer task is woken to finish the rest; a write
    /// error closes the connection). Only while the writer task is idle and, `in_order`, nothing
    /// handed to the data queue is still unwritten, so nothing overtakes a queued frame; `None`,
    /// with `fill` not run, otherwise.
    fn write_here<T>(&self, in_order: bool, fill: impl FnOnce(&mut Batch) -> T) -> Option<T> {
        if self.is_closing() {
            return None;
        }
        let Ok(mut guard) = self.out.try_lock() else {
            return None;
        };
        // `None`: the writer task has it.
        let Out { wr, batch } = guard.as_mut()?;
        // A batch left by an earlier direct write that the transport did not take means the
        // transport is slow: queue, so the data queue's bound holds back every stream.
        if in_order && (self.unwritten.load(Ordering::Acquire) != 0 || !batch.is_empty()) {
            return None;
        }
        let filled = fill(batch);
        if batch.is_empty() {
            return Some(filled);
        }
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match batch.poll_write_to(wr, &mut cx) {
            std::task::Poll::Ready(Ok(())) => {}
            std::task::Poll::Ready(Err(e)) => {
                drop(guard);
                self.close(MuxError::Io(e.to_string()));
            }
            std::task::Poll::Pending => self.writer_wake.notify_one(),
        }
        Some(filled)
    }

    /// Sends WINDOW frames (and a probing PING): written into the transport by the calling
    /// task when nobody else is writing (no wake-up of the writer task, which often sleeps on
    /// the other thread), handed to the writer task otherwise. They may overtake queued frames.
    fn send_credit(&self, frames: impl IntoIterator<Item = Frame>) {
        let mut frames = Some(frames);
        self.write_here(false, |batch| {
            frames
                .take()
                .into_iter()
                .flatten()
                .for_each(|f| batch.push(f));
        });
        for f in frames.into_iter().flatten() {
            let _ = self.urgent_tx.send((f, false));
        }
    }

    /// Queues an answer the peer caused; false if the peer owes too many.
    fn owe_peer(&self, frame: Frame) -> bool {
        if self.peer_urgent.fetch_add(1, Ordering::Relaxed) >= self.cfg.max_peer_urgent {
            self.protocol_error(
                ErrorCode::ProtocolError,
                "too many unanswered requests".into(),
            );
            return false;
        }
        let _ = self.urgent_tx.send((frame, true));
        true
    }

    fn stream(&self, id: u32) -> Option<Arc<StreamShared>> {
        lock(&self.streams).get(&id).cloned()
    }
}

/// Hashes stream ids for the connection's stream table: two keyed multiplies per lookup
/// instead of SipHash's rounds (every DATA frame looks its stream up). The peer picks the ids
/// it opens, so the keys are secret and random per table: without them it cannot choose ids
/// that collide.
#[derive(Clone, Copy)]
struct IdHash {
    keys: [u64; 4],
}

impl IdHash {
    fn new() -> Self {
        use std::hash::BuildHasher;
        // Seeded by the standard library's per-process random keys, varied per table.
        let rs = std::hash::RandomState::new();
        Self {
            keys: [0u8, 1, 2, 3].map(|i| rs.hash_one(i) | u64::from(i % 2)),
        }
    }
}

impl std::hash::BuildHasher for IdHash {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher {
            keys: self.keys,
            hash: 0,
        }
    }
}

/// [`IdHash`]'s hasher. Each round xors in a key and folds together the halves of the 128-bit
/// product with an odd key (every input bit reaches every output bit); one round alone leaves
/// some keys spreading ids that differ only in their high bits over a tenth of a table.
struct IdHasher {
    keys: [u64; 4],
    hash: u64,
}

fn fold(x: u64, mul: u64) -> u64 {
    let m = u128::from(x) * u128::from(mul);
    (m as u64) ^ ((m >> 64) as u64)
}

impl std::hash::Hasher for IdHasher {
    fn write_u32(&mut self, id: u32) {
        let [a, b, c, d] = self.keys;
        self.hash = fold(fold(u64::from(id) ^ self.hash ^ a, b) ^ c, d);
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u32 keys are hashed here; anything else still hashes, byte by byte.
        for &b in bytes {
            self.write_u32(u32::from(b));
        }
    }
    fn finish(&self) -> u64 {
        self.hash
    }
}

/// The channels the reader hands control messages and new streams to.
struct Outlets {
    control: mpsc::Sender<ControlMessage>,
    incoming: mpsc::Sender<Incoming>,
}

/// The reader task: parses `leftover` (what the handshake read past its last frame), then
/// every run `src` brings, until the connection closes.
async fn read_loop<R: Runs>(inner: Arc<Inner>, mut src: R, leftover: BytesMut, out: Outlets) {
    let mut parser = FrameParser::new(inner.cfg.limits);
    let mut direct = DirectBatch::default();
    // Bytes received before the first run: their DATA is queued (nothing is held yet, so
    // order holds).
    for pre in [&leftover[..], &src.take_early()[..]] {
        if !parse_run(&inner, &mut parser, pre, 0..pre.len(), None, &out) {
            return;
        }
    }
    drop(leftover);
    loop {
        // Every run at hand is parsed, DATA for sockets held where it lies; it is written
        // when no more is at hand (one write carries as much as possible), before the next
        // fill lets the runs go.
        loop {
            let run = match src.next_run() {
                Ok(Some(run)) => run,
                Ok(None) => break,
                Err(e) => return inner.close(MuxError::Io(e.to_string())),
            };
            if !parse_run(
                &inner,
                &mut parser,
                src.buffer(),
                run,
                Some(&mut direct),
                &out,
            ) {
                return;
            }
        }
        direct.flush(&inner, src.buffer());
        let filled = std::future::poll_fn(|cx| {
            if inner.reader_stop.poll(cx).is_ready() {
                return std::task::Poll::Ready(None);
            }
            src.poll_fill(cx).map(Some)
        })
        .await;
        match filled {
            None => return,
            Some(Ok(true)) => {}
            Some(Ok(false)) if parser.mid_frame() => {
                return inner.close(MuxError::Io(
                    "connection closed in the middle of a frame".into(),
                ));
            }
            Some(Ok(false)) => return inner.close(MuxError::Closed),
            Some(Err(e)) => return inner.close(MuxError::Io(e.to_string())),
        }
    }
}

/// Parses the frames of `buf[run]` and handles them; DATA goes to `direct` for sockets that
/// take it directly (queued for their consumers when `direct` is `None`). False once the
/// connection is closed.
fn parse_run(
    inner: &Arc<Inner>,
    parser: &mut FrameParser,
    buf: &[u8],
    run: std::ops::Range<usize>,
    mut direct: Option<&mut DirectBatch>,
    out: &Outlets,
) -> bool {
    let bytes = &buf[..run.end];
    let mut pos = run.start;
    loop {
        match parser.next(bytes, &mut pos) {
            Ok(None) => return true,
            Err(e) => {
                inner.protocol_error(ErrorCode::ProtocolError, e.to_string());
                return false;
            }
            Ok(Some(Parsed::Data {
                stream, payload, ..
            })) => {
                if !on_data(inner, stream, bytes, payload, direct.as_deref_mut()) {
                    return false;
                }
            }
            Ok(Some(Parsed::Frame(frame))) => {
                if let Some(d) = direct.as_deref_mut()
                    && matches!(frame, Frame::Fin { .. } | Frame::Reset { .. })
                {
                    // FIN and RESET must not overtake the DATA held before them.
                    d.flush(inner, bytes);
                }
                if !dispatch(inner, frame, out) {
                    return false;
                }
            }
        }
        if let Some(d) = direct.as_deref_mut()
            && d.len >= DIRECT_BATCH
        {
            d.flush(inner, bytes);
        }
    }
}

/// Handles DATA for `stream` (a whole frame's payload or a piece of it): `buf[payload]`, held
/// in `direct` when its socket may take it directly, queued for the consumer otherwise. False
/// once the connection is closed.
fn on_data(
    inner: &Inner,
    stream: u32,
    buf: &[u8],
    payload: std::ops::Range<usize>,
    direct: Option<&mut DirectBatch>,
) -> bool {
    let Some(s) = inner.stream(stream) else {
        return true;
    };
    {
        let mut r = lock(&s.recv);
        if r.fin {
            drop(r);
            let why = format!("stream {stream}: DATA after FIN");
            inner.protocol_error(ErrorCode::ProtocolError, why);
            return false;
        }
        if let Err(e) = r.window.on_data(payload.len()) {
            drop(r);
            inner.protocol_error(ErrorCode::FlowControlError, format!("stream {stream}: {e}"));
            return false;
        }
    }
    match direct {
        Some(d) if d.holds(&s) || s.direct_ok() => d.add(inner, s, payload, buf),
        _ => {
            let mut d = lock(&s.direct);
            s.queue_data(&mut d, &buf[payload]);
        }
    }
    true
}

/// DATA the reader holds for direct delivery (see the module docs): per stream in arrival order,
/// ranges of the runs at hand, until it has no more frames at hand or holds [`DIRECT_BATCH`]
/// bytes.
#[derive(Default)]
struct DirectBatch {
    streams: Vec<(Arc<StreamShared>, Vec<std::ops::Range<usize>>)>,
    len: usize,
    /// WINDOW frames for the bytes written, sent by [`DirectBatch::flush`].
    windows: Vec<Frame>,
    /// Emptied piece lists kept for the next streams (at most [`SPARE_LISTS`]): no allocation
    /// per message.
    spare: Vec<Vec<std::ops::Range<usize>>>,
}

/// Emptied piece lists a [`DirectBatch`] keeps.
const SPARE_LISTS: usize = 8;

/// Most bytes the reader holds for direct delivery before writing them.
const DIRECT_BATCH: usize = 256 * 1024;

impl DirectBatch {
    fn holds(&self, s: &Arc<StreamShared>) -> bool {
        self.streams.iter().any(|(held, _)| Arc::ptr_eq(held, s))
    }

    fn add(
        &mut self,
        inner: &Inner,
        s: Arc<StreamShared>,
        piece: std::ops::Range<usize>,
        buf: &[u8],
    ) {
        self.len += piece.len();
        let Some(i) = self
            .streams
            .iter()
            .position(|(held, _)| Arc::ptr_eq(held, &s))
        else {
            let mut pieces = self.spare.pop().unwrap_or_default();
            pieces.push(piece);
            self.streams.push((s, pieces));
            return;
        };
        self.streams[i].1.push(piece);
        if self.streams[i].1.len() >= MAX_IOV {
            // Written now and let go: if the socket did not take it all, the rest is queued
            // and this stream's next DATA must queue behind it (`direct_ok` says so).
            let (s, pieces) = self.streams.swap_remove(i);
            let written = s.write_direct(buf, &pieces);
            self.credit(inner, &s, written);
            self.keep(pieces);
        }
    }

    /// Keeps an emptied piece list for reuse.
    fn keep(&mut self, mut pieces: Vec<std::ops::Range<usize>>) {
        if self.spare.len() < SPARE_LISTS && pieces.capacity() <= MAX_IOV {
            pieces.clear();
            self.spare.push(pieces);
        }
    }

    fn credit(&mut self, inner: &Inner, s: &StreamShared, written: usize) {
        if written > 0 {
            window_update(inner, s, written, &mut self.windows);
        }
    }

    /// Writes what is held (ranges of `buf`), then the credit it returns.
    fn flush(&mut self, inner: &Inner, buf: &[u8]) {
        if self.streams.is_empty() && self.windows.is_empty() {
            // Nothing held (the reader calls this whenever it runs out of frames).
            self.len = 0;
            return;
        }
        let mut streams = std::mem::take(&mut self.streams);
        for (s, pieces) in streams.drain(..) {
            let written = s.write_direct(buf, &pieces);
            self.credit(inner, &s, written);
            self.keep(pieces);
        }
        self.streams = streams;
        self.len = 0;
        if !self.windows.is_empty() {
            inner.send_credit(self.windows.drain(..));
        }
    }
}

/// Queued DATA is gathered into buffers of about this size (see [`Direct::tail`]).
const COALESCE: usize = 16 * 1024;

/// Most buffers handed to one vectored write.
pub(crate) const MAX_IOV: usize = 64;

/// The first [`MAX_IOV`] buffers of `bufs` as slices for one vectored write, and their count.
pub(crate) fn io_slices(bufs: &VecDeque<Bytes>) -> ([IoSlice<'_>; MAX_IOV], usize) {
    let mut iov = [IoSlice::new(&[]); MAX_IOV];
    let n = bufs.len().min(MAX_IOV);
    for (slot, b) in iov.iter_mut().zip(bufs.iter()) {
        *slot = IoSlice::new(b);
    }
    (iov, n)
}

/// Writes the front of `bufs` to `sock` without waiting (see [`try_write_pieces`]). Returns the
/// bytes written; `bufs` is left as it was.
pub(crate) fn try_write_bufs(
    sock: &tokio::net::tcp::OwnedWriteHalf,
    bufs: &VecDeque<Bytes>,
) -> std::io::Result<usize> {
    try_write_pieces(sock, bufs.len(), |i| &bufs[i])
}

/// Writes the first (at most [`MAX_IOV`]) of `count` pieces, `piece(i)` each, to `sock` without
/// waiting: one with a plain `send` (a small message, the common case, skips the kernel's iovec
/// handling), several with one vectored write. Returns the bytes written.
fn try_write_pieces<'a>(
    sock: &tokio::net::tcp::OwnedWriteHalf,
    count: usize,
    piece: impl Fn(usize) -> &'a [u8],
) -> std::io::Result<usize> {
    match count {
        0 => Ok(0),
        1 => sock.try_write(piece(0)),
        _ => {
            let n = count.min(MAX_IOV);
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            for (i, slot) in iov[..n].iter_mut().enumerate() {
                *slot = IoSlice::new(piece(i));
            }
            sock.try_write_vectored(&iov[..n])
        }
    }
}

/// Drops the first `n` bytes of `bufs` (what a vectored write took).
pub(crate) fn advance(bufs: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let Some(front) = bufs.front_mut() else {
            return;
        };
        if front.len() > n {
            front.advance(n);
            return;
        }
        n -= front.len();
        bufs.pop_front();
    }
}

/// Handles one frame; false once the connection is closed.
fn dispatch(inner: &Arc<Inner>, frame: Frame, out: &Outlets) -> bool {
    let (control_tx, incoming_tx) = (&out.control, &out.incoming);
    match frame {
        Frame::Control(bytes) => match ControlMessage::from_bytes(&bytes) {
            Ok(msg) => {
                if control_tx.try_send(msg).is_err() && !inner.is_closing() {
                    inner.protocol_error(ErrorCode::ProtocolError, "control queue full".into());
                    return false;
                }
            }
            Err(e) => {
                inner.protocol_error(ErrorCode::ProtocolError, e.to_string());
                return false;
            }
        },
        Frame::Ping(v) => return inner.owe_peer(Frame::Pong(v)),
        Frame::Pong(v) => lock(&inner.rtt).on_pong(v, std::time::Instant::now()),
        Frame::Open {
            stream,
            tunnel,
            peer,
        } => {
            if inner.role == Role::Opener {
                inner.protocol_error(ErrorCode::ProtocolError, "peer may not open streams".into());
                return false;
            }
            let mut streams = lock(&inner.streams);
            if streams.contains_key(&stream) {
                drop(streams);
                inner.protocol_error(ErrorCode::ProtocolError, format!("stream {stream} reused"));
                return false;
            }
            if streams.len() >= inner.cfg.max_streams {
                drop(streams);
                let code = ErrorCode::TooManyStreams as u16;
                return inner.owe_peer(Frame::Reset { stream, code });
            }
            let Ok(slot) = incoming_tx.try_reserve() else {
                drop(streams);
                let code = ErrorCode::TooManyStreams as u16;
                return inner.owe_peer(Frame::Reset { stream, code });
            };
            let s = new_stream(inner, stream, &mut streams);
            drop(streams);
            slot.send(Incoming {
                stream: s,
                tunnel,
                peer,
            });
        }
        // The parser hands DATA out as pieces (see `on_data`); a whole frame is queued.
        Frame::Data { stream, data } => return on_data(inner, stream, &data, 0..data.len(), None),
        Frame::Window { stream, increment } => {
            let Some(s) = inner.stream(stream) else {
                return true;
            };
            let granted = s.credit.available_permits() + s.reserved.load(Ordering::Relaxed);
            if granted as u64 + increment as u64 > MAX_CREDIT {
                inner.protocol_error(ErrorCode::FlowControlError, "window overflow".into());
                return false;
            }
            s.credit.add_permits(increment as usize);
        }
        Frame::Fin { stream } => {
            if let Some(s) = inner.stream(stream) {
                if std::mem::replace(&mut lock(&s.recv).fin, true) {
                    let why = format!("stream {stream}: a second FIN");
                    inner.protocol_error(ErrorCode::ProtocolError, why);
                    return false;
                }
                s.push(Inbound::Fin);
            }
        }
        Frame::Reset { stream, code } => {
            let s = lock(&inner.streams).remove(&stream);
            if let Some(s) = s {
                s.abort(code);
            }
        }
    }
    true
}

/// Bytes gathered before one write to the transport: a batch stops growing once it holds this
/// much, and with the DATA frame that took it there it is still at most what the TLS layer
/// seals in one write ([`crate::secure::WRITE_BATCH`]). A batch over that left its last bytes
/// for a second write: a tiny record, one more system call and one more wake-up of the peer
/// per batch (eight 32 KiB frames with their headers are 72 bytes over 256 KiB).
const WRITE_BATCH: usize =
    crate::secure::WRITE_BATCH - frame::HEADER_LEN - MAX_DATA_PAYLOAD as usize;

/// DATA payloads at least this long are written from where they lie instead of being copied
/// into the batch.
const GATHER_FROM: usize = 2048;

/// Frames gathered for one vectored write. Small frames and DATA headers are encoded into
/// `head`; large DATA payloads join `segs` as they are, so sending a byte copies it only once
/// (into the TLS record).
#[derive(Default)]
struct Batch {
    head: BytesMut,
    segs: VecDeque<Bytes>,
    len: usize,
}

impl Batch {
    /// Reads one DATA frame's payload for `stream`, at most `max` bytes, from `rd` into the
    /// batch where it is written from. `Ready(Ok(n))` with `n > 0` keeps the frame; the end of
    /// the stream (`Ok(0)`), an error or `Pending` (the task's waker is registered with `rd`)
    /// leave the batch as it was.
    fn read_data<R: AsyncRead + Unpin>(
        &mut self,
        stream: u32,
        max: usize,
        rd: &mut R,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        use bytes::BufMut;
        let start = self.head.len();
        self.head.reserve(frame::HEADER_LEN + max);
        self.head.put_bytes(0, frame::HEADER_LEN);
        let mut room = (&mut self.head).limit(max);
        let r = tokio_util::io::poll_read_buf(std::pin::Pin::new(rd), cx, &mut room);
        match r {
            std::task::Poll::Ready(Ok(n)) if n > 0 => {
                self.head[start..start + frame::HEADER_LEN]
                    .copy_from_slice(&frame::data_header(stream, n));
                self.len += frame::HEADER_LEN + n;
            }
            _ => self.head.truncate(start),
        }
        r
    }

    /// Adds a DATA frame of `stream` carrying a copy of `data` (at most one frame's payload).
    fn push_data_slice(&mut self, stream: u32, data: &[u8]) {
        self.head.reserve(frame::HEADER_LEN + data.len());
        frame::encode_data_header(stream, data.len(), &mut self.head);
        self.head.extend_from_slice(data);
        self.len += frame::HEADER_LEN + data.len();
    }

    fn push(&mut self, f: Frame) {
        match f {
            Frame::Data { stream, data } if data.len() >= GATHER_FROM => {
                frame::encode_data_header(stream, data.len(), &mut self.head);
                self.len += frame::HEADER_LEN + data.len();
                self.segs.push_back(self.head.split().freeze());
                self.segs.push_back(data);
            }
            f => {
                let before = self.head.len();
                frame::encode(&f, &mut self.head);
                self.len += self.head.len() - before;
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes everything gathered, then flushes.
    async fn write_to<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> std::io::Result<()> {
        std::future::poll_fn(|cx| self.poll_write_to(wr, cx)).await
    }

    /// [`Batch::write_to`] as a poll: what was written stays written when it is pending.
    fn poll_write_to<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::{Poll, ready};
        if self.segs.is_empty() {
            // Small frames only (the common case for messages): written from `head` as it
            // is, which keeps its allocation for the next batch.
            while !self.head.is_empty() {
                let written = ready!(std::pin::Pin::new(&mut *wr).poll_write(cx, &self.head))?;
                if written == 0 {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                self.head.advance(written);
            }
        } else {
            if !self.head.is_empty() {
                self.segs.push_back(self.head.split().freeze());
            }
            while !self.segs.is_empty() {
                let written = {
                    let (iov, n) = io_slices(&self.segs);
                    ready!(std::pin::Pin::new(&mut *wr).poll_write_vectored(cx, &iov[..n]))?
                };
                if written == 0 {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                self.advance(written);
            }
        }
        self.len = 0;
        std::pin::Pin::new(wr).poll_flush(cx)
    }

    fn advance(&mut self, n: usize) {
        advance(&mut self.segs, n);
    }
}

/// The transport's write half and the batch being written (see [`Inner::out`]).
struct Out {
    wr: std::pin::Pin<Box<dyn AsyncWrite + Send>>,
    batch: Batch,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Out")
            .field("batched", &self.batch.len)
            .finish_non_exhaustive()
    }
}

/// The writer task: writes what is queued until the connection closes, then lets go of the
/// transport's write half, so the connection closes once the reader has let go too (even while
/// `Mux` handles live on).
async fn write_loop(
    inner: Arc<Inner>,
    data_rx: mpsc::Receiver<Frame>,
    urgent_rx: mpsc::UnboundedReceiver<(Frame, bool)>,
) {
    write_until_closed(&inner, data_rx, urgent_rx).await;
    drop(lock(&inner.out).take());
}

async fn write_until_closed(
    inner: &Arc<Inner>,
    mut data_rx: mpsc::Receiver<Frame>,
    mut urgent_rx: mpsc::UnboundedReceiver<(Frame, bool)>,
) {
    let push = |inner: &Inner, batch: &mut Batch, f: Frame, owed: bool| {
        batch.push(f);
        if owed {
            inner.peer_urgent.fetch_sub(1, Ordering::Relaxed);
        }
    };
    // The first wait is skipped: the handshake may have left bytes to write.
    let mut first = true;
    loop {
        // Wait for work without holding `out`, so stream tasks can write directly meanwhile.
        let mut got: Option<(Frame, bool, bool)> = None;
        if !first {
            tokio::select! {
                biased;
                Some((f, owed)) = urgent_rx.recv() => got = Some((f, owed, false)),
                Some(f) = data_rx.recv() => got = Some((f, false, true)),
                _ = inner.writer_wake.notified() => {}
                _ = inner.closed.cancelled() => break,
            }
        }
        first = false;
        // Only this task takes `out` away, so it is there (a stream task may hold the lock for
        // the length of one non-blocking write).
        let Some(mut out) = lock(&inner.out).take() else {
            return;
        };
        let Out { wr, batch } = &mut out;
        // Data frames taken from the queue: no longer unwritten once this write is done.
        let mut taken = 0;
        if let Some((f, owed, data)) = got {
            push(inner, batch, f, owed);
            taken += usize::from(data);
        }
        while batch.len < WRITE_BATCH {
            if let Ok((f, owed)) = urgent_rx.try_recv() {
                push(inner, batch, f, owed);
            } else if let Ok(f) = data_rx.try_recv() {
                push(inner, batch, f, false);
                taken += 1;
            } else {
                break;
            }
        }
        // On close, a batch already being written may finish within a short grace (it may
        // carry the closing error); one cut short leaves a partial frame on the wire, after
        // which nothing more may be written.
        let (res, closing) = {
            let write = batch.write_to(wr);
            tokio::pin!(write);
            tokio::select! {
                r = &mut write => (r, false),
                _ = inner.closed.cancelled() => {
                    match crate::timer::timeout(std::time::Duration::from_secs(1), &mut write).await {
                        Ok(r) => (r, true),
                        Err(_) => return,
                    }
                }
            }
        };
        inner.unwritten.fetch_sub(taken, Ordering::AcqRel);
        *lock(&inner.out) = Some(out);
        if let Err(e) = res {
            inner.close(MuxError::Io(e.to_string()));
            return;
        }
        if closing {
            break;
        }
    }
    // Closing: flush what is urgent (an error message for the peer) within a short grace,
    // then end TLS cleanly so the peer reads the message before the close.
    let mut last = Batch::default();
    while let Ok((f, _)) = urgent_rx.try_recv() {
        if matches!(f, Frame::Control(_)) {
            last.push(f);
        }
    }
    let Some(mut out) = lock(&inner.out).take() else {
        return;
    };
    let _ = crate::timer::timeout(std::time::Duration::from_secs(1), async {
        if !last.is_empty() {
            last.write_to(&mut out.wr).await?;
        }
        out.wr.shutdown().await
    })
    .await;
}

/// One multiplexed stream. Dropping it before both directions have finished resets it.
#[derive(Debug)]
pub struct MuxStream {
    /// The sending half (usable through `&`).
    pub tx: StreamTx,
    /// The receiving half.
    pub rx: StreamRx,
}

/// Sending side of a stream.
#[derive(Debug)]
pub struct StreamTx {
    shared: Arc<StreamShared>,
    mux: Arc<Inner>,
    fin_sent: AtomicBool,
}

/// Receiving side of a stream.
#[derive(Debug)]
pub struct StreamRx {
    shared: Arc<StreamShared>,
    mux: Arc<Inner>,
    rx: mpsc::UnboundedReceiver<Inbound>,
    fin_recv: bool,
    reset_recv: bool,
}

impl MuxStream {
    /// The stream id.
    pub fn id(&self) -> u32 {
        self.tx.shared.id
    }
}

impl StreamTx {
    /// Waits until the peer grants credit, and takes up to `max` bytes of it (at least 1, at
    /// most [`MAX_RESERVE`]). Unused credit must be handed back with [`StreamTx::give_back`].
    ///
    /// Fails once the stream is reset or the connection closes (both close the credit).
    pub async fn reserve(&self, max: usize) -> Result<usize, MuxError> {
        let max = max.clamp(1, MAX_RESERVE);
        let at_hand = self.try_reserve(max);
        if at_hand > 0 {
            return Ok(at_hand);
        }
        // None at hand (or the credit is closed): wait for one byte's worth, then take what
        // came with it.
        self.shared
            .credit
            .acquire()
            .await
            .map_err(|_| MuxError::Closed)?
            .forget();
        self.shared.reserved.fetch_add(1, Ordering::Relaxed);
        Ok(1 + self.try_reserve(max - 1))
    }

    /// Takes up to `max` bytes of the credit at hand without waiting (at most
    /// [`MAX_RESERVE`]); 0 when there is none. Unused credit must be handed back with
    /// [`StreamTx::give_back`].
    pub fn try_reserve(&self, max: usize) -> usize {
        let credit = &self.shared.credit;
        let n = credit.available_permits().min(max.min(MAX_RESERVE));
        match credit.try_acquire_many(n as u32) {
            Ok(p) if n > 0 => {
                p.forget();
                self.shared.reserved.fetch_add(n, Ordering::Relaxed);
                n
            }
            _ => 0,
        }
    }

    /// Resolves once the stream is reset by the peer or the connection closes (for whatever
    /// reason, its token's cancellation included). Cheap to poll on every wake-up.
    pub fn aborted(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| self.shared.aborted.poll(cx))
    }

    /// Returns reserved credit that was not used.
    pub fn give_back(&self, n: usize) {
        if n > 0 {
            self.shared.reserved.fetch_sub(n, Ordering::Relaxed);
            if !self.shared.credit.is_closed() {
                self.shared.credit.add_permits(n);
            }
        }
    }

    /// Sends bytes for which credit was reserved, as DATA frames of at most
    /// [`MAX_DATA_PAYLOAD`] bytes each (cut without copying).
    ///
    /// On a single-threaded runtime (the one the mux was started on) they always go to the
    /// writer task: it runs after the tasks woken in the same turn as this one, so what the
    /// connection's other streams send meanwhile is sealed and written with them in one
    /// batch, where writing directly would cost every stream a TLS write of its own. (Short
    /// messages take [`StreamTx::send_reserved_slice`], which writes directly.) On several
    /// threads the streams' tasks write concurrently, and the writer task gathers whatever
    /// finds the transport busy.
    pub async fn send_reserved(&self, mut data: Bytes) -> Result<(), MuxError> {
        self.shared
            .reserved
            .fetch_sub(data.len(), Ordering::Relaxed);
        if !self.mux.one_thread && self.mux.write_direct(self.shared.id, &mut data) {
            return Ok(());
        }
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_DATA_PAYLOAD as usize));
            let frame = Frame::Data {
                stream: self.shared.id,
                data: chunk,
            };
            self.mux.queue(frame).await?;
        }
        Ok(())
    }

    /// Reads at most `max` bytes of reserved credit's worth (and at most one DATA frame's) from
    /// `rd` straight into the connection's next TLS write, and writes them: no buffer of the
    /// stream's own, one copy fewer than reading first and sending with
    /// [`StreamTx::send_reserved_slice`]. Only when the stream may write directly (as there);
    /// `None`, with nothing read, when it may not. `Some(Ready(Ok(0)))` is the end of `rd`
    /// (nothing sent); `Some(Pending)`, that `rd` had nothing (the task's waker is registered).
    pub fn read_direct<R: AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        max: usize,
        cx: &mut std::task::Context<'_>,
    ) -> Option<std::task::Poll<std::io::Result<usize>>> {
        let max = max.min(MAX_DATA_PAYLOAD as usize);
        let id = self.shared.id;
        let r = self
            .mux
            .write_here(true, |batch| batch.read_data(id, max, rd, cx))?;
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.shared.reserved.fetch_sub(n, Ordering::Relaxed);
        }
        Some(r)
    }

    /// [`StreamTx::send_reserved`] for bytes the caller lends (a short read from a socket):
    /// written from the slice when the transport is free, copied into frames and queued
    /// otherwise.
    pub async fn send_reserved_slice(&self, data: &[u8]) -> Result<(), MuxError> {
        if self.mux.write_direct_slice(self.shared.id, data) {
            self.shared
                .reserved
                .fetch_sub(data.len(), Ordering::Relaxed);
            return Ok(());
        }
        self.send_reserved(Bytes::copy_from_slice(data)).await
    }

    /// Sends all of `data`, waiting for credit as needed.
    pub async fn send(&self, mut data: Bytes) -> Result<(), MuxError> {
        while !data.is_empty() {
            let n = self.reserve(data.len()).await?;
            self.send_reserved(data.split_to(n)).await?;
        }
        Ok(())
    }

    /// Half-closes: the peer reads end-of-stream after the data already sent.
    pub async fn finish(&self) -> Result<(), MuxError> {
        if self.fin_sent.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        let fin = Frame::Fin {
            stream: self.shared.id,
        };
        match self.mux.write_frame_direct(fin) {
            Ok(()) => Ok(()),
            Err(fin) => self.mux.queue(fin).await,
        }
    }
}

impl StreamRx {
    /// The next bytes, end of stream, or reset. `None` once the stream or connection is gone.
    pub async fn recv(&mut self) -> Option<Inbound> {
        if self.fin_recv || self.reset_recv {
            return None;
        }
        let item = self.rx.recv().await;
        if item.is_some() {
            self.taken();
        }
        match &item {
            Some(Inbound::Fin) => self.fin_recv = true,
            Some(Inbound::Reset(_)) | None => self.reset_recv = true,
            Some(Inbound::Data(_)) => {}
        }
        item
    }

    /// What is already queued on the stream, without waiting: `None` when nothing is (and once
    /// the stream is over, when the next [`StreamRx::recv`] says so).
    pub fn try_recv(&mut self) -> Option<Inbound> {
        if self.fin_recv || self.reset_recv {
            return None;
        }
        let item = self.rx.try_recv().ok()?;
        self.taken();
        match &item {
            Inbound::Fin => self.fin_recv = true,
            Inbound::Reset(_) => self.reset_recv = true,
            Inbound::Data(_) => {}
        }
        Some(item)
    }

    /// The stream's receive window now (it grows while a fast stream runs).
    pub fn window(&self) -> u32 {
        lock(&self.shared.recv).window.window()
    }

    /// Reports `n` bytes delivered to the application, returning credit to the peer.
    pub fn consumed(&self, n: usize) {
        return_credit(&self.mux, &self.shared, n);
    }

    /// Lets the reader task write this stream's DATA to `sock` itself while this consumer is
    /// idle (see the module docs), counting those bytes in `count`. The consumer must call
    /// [`StreamRx::idle`] whenever it has written everything it took, and
    /// [`StreamRx::release_sock`] before it closes `sock`.
    pub fn deliver_to(&self, sock: Arc<tokio::net::tcp::OwnedWriteHalf>, count: Arc<AtomicU64>) {
        lock(&self.shared.direct).sink = Some((sock, count));
    }

    /// The consumer has written everything it took from the queue.
    pub fn idle(&self) {
        lock(&self.shared.direct).busy = false;
    }

    /// Ends direct delivery: the reader drops its handle on the socket.
    pub fn release_sock(&self) {
        lock(&self.shared.direct).sink = None;
    }

    /// For tests: items queued and not yet taken.
    #[cfg(test)]
    pub(crate) fn queued_items(&self) -> usize {
        lock(&self.shared.direct).queued
    }

    /// For tests: whether the consumer holds every queued item taken and not yet written.
    #[cfg(test)]
    pub(crate) fn consumer_holds_all(&self) -> impl Fn() -> bool + Send + 'static {
        let shared = self.shared.clone();
        move || {
            let d = lock(&shared.direct);
            d.busy && d.queued == 0
        }
    }

    /// Counts an item taken from the queue: the consumer holds it until [`StreamRx::idle`].
    /// The last queued item taken, the gathered tail becomes the next one.
    fn taken(&self) {
        let mut d = lock(&self.shared.direct);
        d.queued = d.queued.saturating_sub(1);
        d.busy = true;
        if d.queued == 0 {
            self.shared.send_tail(&mut d);
        }
    }
}

/// `n` bytes of `s` left the receive buffer: return credit to the peer once enough has.
fn return_credit(inner: &Inner, s: &StreamShared, n: usize) {
    let mut frames = Vec::new();
    window_update(inner, s, n, &mut frames);
    if !frames.is_empty() {
        inner.send_credit(frames);
    }
}

/// Adds the WINDOW frame owed for `n` bytes of `s` consumed to `out`, if the window calls for
/// one now, with the window grown when it held the stream back (and the connection's budget
/// allows), and a PING if a round-trip probe is due.
fn window_update(inner: &Inner, s: &StreamShared, n: usize, out: &mut Vec<Frame>) {
    let mut r = lock(&s.recv);
    let Some(mut increment) = r.window.on_consumed(n) else {
        return;
    };
    let now = std::time::Instant::now();
    let (rtt, probe) = {
        let mut rtt = lock(&inner.rtt);
        (rtt.latest, rtt.probe_due(now))
    };
    if let (Some(last), Some(rtt)) = (r.last_update, rtt) {
        let current = r.window.window();
        let want = tuned_window(current, now.duration_since(last), rtt, inner.cfg.max_window);
        let more = (want - current) as usize;
        if more > 0 && take_budget(&inner.grown, more, inner.cfg.window_budget) {
            r.grown += more;
            increment = increment.saturating_add(r.window.grow(want));
        }
    }
    r.last_update = Some(now);
    out.push(Frame::Window {
        stream: s.id,
        increment,
    });
    out.extend(probe);
}

/// Takes `n` bytes of window growth from a connection's budget of `budget`; false (nothing
/// taken) if it does not hold that much.
fn take_budget(grown: &AtomicUsize, n: usize, budget: usize) -> bool {
    grown
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |g| {
            g.checked_add(n).filter(|&t| t <= budget)
        })
        .is_ok()
}

impl MuxStream {
    /// Aborts the stream with `code`.
    pub fn reset(mut self, code: ErrorCode) {
        self.abort(code as u16);
    }

    fn abort(&mut self, code: u16) {
        let removed = lock(&self.tx.mux.streams).remove(&self.tx.shared.id);
        self.tx.shared.credit.close();
        if removed.is_some() && !self.rx.reset_recv {
            let frame = Frame::Reset {
                stream: self.tx.shared.id,
                code,
            };
            self.tx.mux.send_ordered(frame);
        }
        self.rx.reset_recv = true;
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        let clean = self.tx.fin_sent.load(Ordering::Relaxed) && self.rx.fin_recv;
        if clean {
            lock(&self.tx.mux.streams).remove(&self.tx.shared.id);
        } else if !self.rx.reset_recv {
            self.abort(ErrorCode::StreamAborted as u16);
        } else {
            lock(&self.tx.mux.streams).remove(&self.tx.shared.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::handshake_conn;
    use futures_util::{SinkExt, StreamExt};
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    #[test]
    fn a_read_into_the_batch_is_one_data_frame_or_nothing() {
        use std::task::{Context, Poll, Waker};
        let mut cx = Context::from_waker(Waker::noop());
        let frames = |fs: &[Frame]| {
            let mut b = BytesMut::new();
            fs.iter().for_each(|f| frame::encode(f, &mut b));
            b
        };
        let data = |stream, d: &'static [u8]| Frame::Data {
            stream,
            data: Bytes::from_static(d),
        };
        let mut batch = Batch::default();
        batch.push_data_slice(1, b"ab");
        // At most `max` bytes, framed behind what the batch held.
        let mut rd: &[u8] = b"hello world";
        let r = batch.read_data(2, 5, &mut rd, &mut cx);
        assert!(matches!(r, Poll::Ready(Ok(5))));
        assert_eq!(rd, b" world");
        let want = frames(&[data(1, b"ab"), data(2, b"hello")]);
        assert_eq!(&batch.head[..], &want[..]);
        assert_eq!(batch.len, want.len());
        // The end of the reader, or nothing to read yet: the batch as it was.
        let mut empty: &[u8] = b"";
        assert!(matches!(
            batch.read_data(3, 5, &mut empty, &mut cx),
            Poll::Ready(Ok(0))
        ));
        let (_w, mut quiet) = tokio::io::duplex(64);
        assert!(batch.read_data(3, 5, &mut quiet, &mut cx).is_pending());
        assert_eq!(&batch.head[..], &want[..]);
        assert_eq!(batch.len, want.len());
    }

    #[test]
    fn stream_ids_hash_apart_and_differently_per_table() {
        use std::collections::HashSet;
        use std::hash::BuildHasher;
        // Ids a peer might pick: consecutive, and apart only in their high bits. The low 10
        // bits of their hashes (a table's bucket of 1,024) spread as random ones would (about
        // 647 distinct of 1,024 expected, 550 is 11 standard deviations below) under each of
        // 200 tables' keys: a weak key (one round of xor and multiply has them, down to 93)
        // would show.
        for _ in 0..200 {
            let a = IdHash::new();
            for ids in [
                (0..1024u32).collect::<Vec<_>>(),
                (0..1024u32).map(|i| i << 22).collect(),
            ] {
                let buckets: HashSet<u64> = ids.iter().map(|&i| a.hash_one(i) & 1023).collect();
                assert!(buckets.len() > 550, "{} buckets", buckets.len());
            }
        }
        let (a, b) = (IdHash::new(), IdHash::new());
        // Another table, other keys: a collision found against one says nothing of the next.
        let same = (0..1024u32)
            .filter(|&i| a.hash_one(i) == b.hash_one(i))
            .count();
        assert_eq!(same, 0);
    }

    /// A mux on one end of an in-memory pipe, raw frames on the other.
    fn pair(
        role: Role,
        cfg: MuxConfig,
    ) -> (
        Mux,
        MuxEvents,
        HandshakeConn<tokio::io::DuplexStream>,
        TaskTracker,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let tracker = TaskTracker::new();
        let (mux, ev) = Mux::start(
            handshake_conn(a),
            role,
            cfg,
            CancellationToken::new(),
            &tracker,
        );
        (mux, ev, handshake_conn(b), tracker)
    }

    async fn next_error(raw: &mut HandshakeConn<tokio::io::DuplexStream>) -> Option<u16> {
        while let Some(Ok(f)) = raw.next().await {
            if let Frame::Control(b) = f
                && let Ok(ControlMessage::Error { code, .. }) = ControlMessage::from_bytes(&b)
            {
                return Some(code);
            }
        }
        None
    }

    #[tokio::test]
    async fn tiny_frames_for_a_consumer_that_does_not_read_are_gathered_not_queued_one_by_one() {
        let (mux, _ev, mut raw, _t) = pair(Role::Opener, MuxConfig::default());
        let mut stream = mux.open([1; 16], "u".into()).await.unwrap();
        let id = match raw.next().await {
            Some(Ok(Frame::Open { stream, .. })) => stream,
            other => panic!("expected OPEN, got {other:?}"),
        };
        const N: usize = 40_000;
        for i in 0..N {
            let data = Bytes::copy_from_slice(&[(i % 251) as u8]);
            raw.feed(Frame::Data { stream: id, data }).await.unwrap();
        }
        // The answer to a PING comes after every frame before it was handled.
        raw.send(Frame::Ping(77)).await.unwrap();
        loop {
            match crate::timer::timeout(Duration::from_secs(10), raw.next()).await {
                Ok(Some(Ok(Frame::Pong(77)))) => break,
                Ok(Some(Ok(_))) => {}
                other => panic!("no PONG: {other:?}"),
            }
        }
        // One item for the first frame, then buffers of COALESCE bytes; the rest in the tail.
        let items = stream.rx.queued_items();
        assert!(
            items <= 1 + N / COALESCE,
            "{items} items queued for {N} bytes"
        );
        raw.send(Frame::Fin { stream: id }).await.unwrap();
        let mut got = Vec::new();
        loop {
            match crate::timer::timeout(Duration::from_secs(10), stream.rx.recv()).await {
                Ok(Some(Inbound::Data(d))) => got.extend_from_slice(&d),
                Ok(Some(Inbound::Fin)) => break,
                other => panic!("expected data or FIN, got {other:?}"),
            }
        }
        let want: Vec<u8> = (0..N).map(|i| (i % 251) as u8).collect();
        assert!(
            got == want,
            "{} bytes, in order: {}",
            got.len(),
            got == want
        );
    }

    #[tokio::test]
    async fn open_reading_sends_what_the_socket_holds_right_after_the_open() {
        use tokio::io::AsyncWriteExt;
        let cfg = MuxConfig::default();
        let window = cfg.peer_window as usize;
        let (mux, _ev, mut raw, _t) = pair(Role::Opener, cfg);
        // A user who spoke first: 100 bytes wait in its socket.
        let (mut user, mut user_end) = tokio::io::duplex(1 << 16);
        user_end.write_all(&[7; 100]).await.unwrap();
        let (stream, first) = mux
            .open_reading([1; 16], "u".into(), &mut user, 4096)
            .await
            .unwrap();
        assert_eq!(first.unwrap(), 100);
        let id = match raw.next().await {
            Some(Ok(Frame::Open { stream, .. })) => stream,
            other => panic!("expected OPEN, got {other:?}"),
        };
        assert_eq!(id, stream.id());
        match raw.next().await {
            Some(Ok(Frame::Data { stream, data })) => {
                assert_eq!(stream, id);
                assert_eq!(&data[..], &[7; 100]);
            }
            other => panic!("expected DATA, got {other:?}"),
        }
        // The bytes sent took their credit; nothing else is held back.
        assert_eq!(stream.tx.shared.credit.available_permits(), window - 100);
        assert_eq!(stream.tx.shared.reserved.load(Ordering::Relaxed), 0);

        // A user who has not spoken: the OPEN goes alone, the credit stays whole.
        let (mut quiet, _quiet_end) = tokio::io::duplex(1 << 16);
        let (s2, first) = mux
            .open_reading([1; 16], "u".into(), &mut quiet, 4096)
            .await
            .unwrap();
        assert_eq!(first.unwrap(), 0);
        match raw.next().await {
            Some(Ok(Frame::Open { stream, .. })) => assert_eq!(stream, s2.id()),
            other => panic!("expected OPEN, got {other:?}"),
        }
        assert_eq!(s2.tx.shared.credit.available_permits(), window);
        // Nothing followed: the next frame is the peer's answer to a PING.
        raw.send(Frame::Ping(5)).await.unwrap();
        match raw.next().await {
            Some(Ok(Frame::Pong(5))) => {}
            other => panic!("expected PONG, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn data_or_a_second_fin_after_fin_is_a_protocol_error() {
        for after in [
            Frame::Fin { stream: 0 },
            Frame::Data {
                stream: 0,
                data: Bytes::from_static(b"late"),
            },
        ] {
            let (mux, _ev, mut raw, _t) = pair(Role::Opener, MuxConfig::default());
            let stream = mux.open([1; 16], "u".into()).await.unwrap();
            let id = match raw.next().await {
                Some(Ok(Frame::Open { stream, .. })) => stream,
                other => panic!("expected OPEN, got {other:?}"),
            };
            let after = match after {
                Frame::Fin { .. } => Frame::Fin { stream: id },
                Frame::Data { data, .. } => Frame::Data { stream: id, data },
                _ => unreachable!(),
            };
            // The stream's consumer keeps it open (it has not sent its own FIN), so the id is
            // live: every repeat would queue one more item nobody reads.
            raw.send(Frame::Fin { stream: id }).await.unwrap();
            raw.send(after).await.unwrap();
            let error = crate::timer::timeout(Duration::from_secs(10), next_error(&mut raw)).await;
            assert_eq!(error.ok(), Some(Some(ErrorCode::ProtocolError as u16)));
            mux.closed().await;
            drop(stream);
        }
    }

    #[tokio::test]
    async fn credit_reserved_but_not_yet_sent_counts_toward_the_credit_limit() {
        let cfg = MuxConfig {
            peer_window: 64 * 1024,
            ..MuxConfig::default()
        };
        let (mux, _ev, mut raw, _t) = pair(Role::Opener, cfg);
        let stream = mux.open([1; 16], "u".into()).await.unwrap();
        let id = match raw.next().await {
            Some(Ok(Frame::Open { stream, .. })) => stream,
            other => panic!("expected OPEN, got {other:?}"),
        };
        // Everything granted is reserved (a proxy waiting for its socket), none of it sent.
        let reserved = stream.tx.reserve(usize::MAX).await.unwrap();
        assert_eq!(reserved, 64 * 1024);
        // Granted so far: 64 KiB. One byte more than MAX_CREDIT in total is an overflow.
        let increment = (MAX_CREDIT - 64 * 1024 + 1) as u32;
        raw.send(Frame::Window {
            stream: id,
            increment,
        })
        .await
        .unwrap();
        let error = crate::timer::timeout(Duration::from_secs(10), next_error(&mut raw)).await;
        assert_eq!(error.ok(), Some(Some(ErrorCode::FlowControlError as u16)));
        mux.closed().await;
    }

    #[tokio::test]
    async fn data_beyond_the_window_closes_the_connection_with_4002() {
        let cfg = MuxConfig {
            window: 64 * 1024,
            ..MuxConfig::default()
        };
        let (mux, _ev, mut raw, _t) = pair(Role::Opener, cfg);
        // The application never reads this stream, so no credit is ever returned.
        let stream = mux.open([1; 16], "u".into()).await.unwrap();
        let id = match raw.next().await {
            Some(Ok(Frame::Open { stream, .. })) => stream,
            other => panic!("expected OPEN, got {other:?}"),
        };
        let chunk = Bytes::from(vec![0u8; 32 * 1024]);
        for _ in 0..2 {
            raw.send(Frame::Data {
                stream: id,
                data: chunk.clone(),
            })
            .await
            .unwrap();
        }
        raw.send(Frame::Data {
            stream: id,
            data: Bytes::from_static(b"x"),
        })
        .await
        .unwrap();
        assert_eq!(
            next_error(&mut raw).await,
            Some(ErrorCode::FlowControlError as u16)
        );
        mux.closed().await;
        assert!(matches!(
            mux.close_reason(),
            MuxError::Protocol {
                code: ErrorCode::FlowControlError,
                ..
            }
        ));
        drop(stream);
    }

    #[tokio::test]
    async fn credit_returns_once_half_the_window_is_consumed() {
        let cfg = MuxConfig {
            window: 64 * 1024,
            ..MuxConfig::default()
        };
        let (mux, _ev, mut raw, _t) = pair(Role::Opener, cfg);
        let mut stream = mux.open([1; 16], "u".into()).await.unwrap();
        let Some(Ok(Frame::Open { stream: id, .. })) = raw.next().await else {
            panic!("no OPEN")
        };
        let increments = round(&mut raw, &mut [&mut stream], &[id], &mut None).await;
        assert_eq!(increments, [32 * 1024]);
    }

    /// Sends half a window of DATA on each stream of `ids`, has the application consume it,
    /// and returns each WINDOW increment in order, noting a PING's payload in `ping`.
    async fn round(
        raw: &mut HandshakeConn<tokio::io::DuplexStream>,
        streams: &mut [&mut MuxStream],
        ids: &[u32],
        ping: &mut Option<u64>,
    ) -> Vec<u32> {
        let mut increments = Vec::new();
        for (s, &id) in streams.iter_mut().zip(ids) {
            raw.send(Frame::Data {
                stream: id,
                data: Bytes::from(vec![1u8; 32 * 1024]),
            })
            .await
            .unwrap();
            let Some(Inbound::Data(d)) = s.rx.recv().await else {
                panic!("no data")
            };
            s.rx.consumed(d.len());
            loop {
                match crate::timer::timeout(Duration::from_secs(5), raw.next()).await {
                    Ok(Some(Ok(Frame::Window { stream, increment }))) => {
                        assert_eq!(stream, id);
                        increments.push(increment);
                        break;
                    }
                    Ok(Some(Ok(Frame::Ping(v)))) => *ping = Some(v),
                    other => panic!("expected WINDOW or PING, got {other:?}"),
                }
            }
        }
        increments
    }

    #[tokio::test]
    async fn a_window_that_holds_its_stream_back_doubles_within_the_budget() {
        // Windows of 64 KiB return credit every 32 KiB. The raw peer answers the mux's PING
        // only after 200 more updates per stream, so the measured round trip spans them all;
        // the next update, as quick as the others, comes within two round trips: the window
        // held the stream back and doubles, if the connection's budget (one doubling here)
        // allows. A stream gives its growth back when it ends.
        let cfg = MuxConfig {
            window: 64 * 1024,
            window_budget: 64 * 1024,
            ..MuxConfig::default()
        };
        let (mux, _ev, mut raw, _t) = pair(Role::Opener, cfg);
        let mut a = mux.open([1; 16], "u".into()).await.unwrap();
        let mut b = mux.open([1; 16], "u".into()).await.unwrap();
        let mut ids = Vec::new();
        for _ in 0..2 {
            let Some(Ok(Frame::Open { stream, .. })) = raw.next().await else {
                panic!("no OPEN")
            };
            ids.push(stream);
        }
        let mut ping = None;
        for _ in 0..200 {
            let inc = round(&mut raw, &mut [&mut a, &mut b], &ids, &mut ping).await;
            assert_eq!(
                inc,
                [32 * 1024, 32 * 1024],
                "no growth without a round trip"
            );
        }
        let v = ping
            .take()
            .expect("the mux probes the round trip while credit flows");
        raw.send(Frame::Pong(v)).await.unwrap();
        let inc = round(&mut raw, &mut [&mut a, &mut b], &ids, &mut ping).await;
        // a: 32 KiB consumed plus the 64 KiB its window grew; b: the budget is spent.
        assert_eq!(inc, [96 * 1024, 32 * 1024]);
        assert_eq!((a.rx.window(), b.rx.window()), (128 * 1024, 64 * 1024));
        // a is gone: its growth goes back to the budget and b may take it.
        a.reset(ErrorCode::StreamAborted);
        let Some(Ok(Frame::Reset { .. })) = raw.next().await else {
            panic!("no RESET")
        };
        let inc = round(&mut raw, &mut [&mut b], &ids[1..], &mut ping).await;
        assert_eq!(inc, [96 * 1024]);
        assert_eq!(b.rx.window(), 128 * 1024);
    }

    #[test]
    fn the_round_trip_is_probed_one_ping_at_a_time_and_the_latest_sample_counts() {
        let t0 = std::time::Instant::now();
        let ms = Duration::from_millis;
        let mut rtt = Rtt::default();
        let Some(Frame::Ping(first)) = rtt.probe_due(t0) else {
            panic!("the first update probes")
        };
        assert!(rtt.probe_due(t0 + ms(500)).is_none(), "one PING in flight");
        rtt.on_pong(first + 1, t0 + ms(3));
        assert_eq!(
            rtt.latest, None,
            "a PONG that answers nothing of ours is no sample"
        );
        rtt.on_pong(first, t0 + ms(4));
        assert_eq!(rtt.latest, Some(ms(4)));
        assert!(
            rtt.probe_due(t0 + ms(50)).is_none(),
            "at most one per PROBE_EVERY"
        );
        let Some(Frame::Ping(second)) = rtt.probe_due(t0 + PROBE_EVERY) else {
            panic!("due again")
        };
        rtt.on_pong(second, t0 + PROBE_EVERY + ms(1));
        assert_eq!(rtt.latest, Some(ms(1)), "the latest sample, not an average");
        rtt.on_pong(second, t0 + PROBE_EVERY + ms(9));
        assert_eq!(rtt.latest, Some(ms(1)), "a PONG counts once");
    }

    #[tokio::test]
    async fn a_reset_never_overtakes_its_open() {
        let (mux, _ev, mut raw, _t) = pair(Role::Opener, MuxConfig::default());
        for _ in 0..50 {
            let s = mux.open([2; 16], "u".into()).await.unwrap();
            s.reset(ErrorCode::StreamAborted);
        }
        let mut opened = std::collections::HashSet::new();
        for _ in 0..100 {
            match raw.next().await {
                Some(Ok(Frame::Open { stream, .. })) => assert!(opened.insert(stream)),
                Some(Ok(Frame::Reset { stream, .. })) => {
                    assert!(opened.contains(&stream), "RESET {stream} before its OPEN")
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_fin_never_overtakes_its_data_queued_for_the_writer_task() {
        // On one thread, bulk DATA goes to the writer task (see `StreamTx::send_reserved`).
        fin_after_all_data().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fin_never_overtakes_its_data_written_directly_or_queued() {
        // On several threads the first DATA goes out directly, the rest queues behind the
        // full pipe.
        fin_after_all_data().await;
    }

    /// Sends 512 KiB and FIN on a stream over a small pipe the raw end does not read at first;
    /// FIN must come after all of the data.
    async fn fin_after_all_data() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let tracker = TaskTracker::new();
        let cfg = MuxConfig {
            peer_window: 1 << 20,
            ..MuxConfig::default()
        };
        let (mux, _ev) = Mux::start(
            handshake_conn(a),
            Role::Opener,
            cfg,
            CancellationToken::new(),
            &tracker,
        );
        let total = 512 * 1024;
        let sender = tokio::spawn({
            let mux = mux.clone();
            async move {
                let s = mux.open([3; 16], "u".into()).await.unwrap();
                s.tx.send(Bytes::from(vec![1u8; total])).await.unwrap();
                s.tx.finish().await.unwrap();
                s
            }
        });
        let mut raw = handshake_conn(b);
        let mut got = 0;
        loop {
            match crate::timer::timeout(Duration::from_secs(10), raw.next()).await {
                Ok(Some(Ok(Frame::Open { .. }))) => {}
                Ok(Some(Ok(Frame::Data { data, .. }))) => got += data.len(),
                Ok(Some(Ok(Frame::Fin { .. }))) => break,
                other => panic!("expected OPEN, DATA or FIN, got {other:?}"),
            }
        }
        assert_eq!(got, total, "FIN after {got} of {total} bytes");
        drop(sender.await.unwrap());
        mux.close();
    }

    #[tokio::test]
    async fn frames_the_handshake_read_past_its_last_message_reach_the_mux() {
        // The peer's last handshake message, an OPEN, DATA and FIN arrive in one write: the
        // handshake's read takes them all, and the mux must start from what it left.
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut raw = handshake_conn(a);
        raw.feed(Frame::Control(Bytes::from_static(b"{}")))
            .await
            .unwrap();
        raw.feed(Frame::Open {
            stream: 1,
            tunnel: [5; 16],
            peer: "u".into(),
        })
        .await
        .unwrap();
        raw.feed(Frame::Data {
            stream: 1,
            data: Bytes::from_static(b"early bytes"),
        })
        .await
        .unwrap();
        raw.feed(Frame::Fin { stream: 1 }).await.unwrap();
        raw.flush().await.unwrap();
        let mut conn = handshake_conn(b);
        assert!(matches!(conn.next().await, Some(Ok(Frame::Control(_)))));
        assert!(
            !conn.read_buffer().is_empty(),
            "the handshake read past its message"
        );
        let tracker = TaskTracker::new();
        let (_mux, mut ev) = Mux::start(
            conn,
            Role::Acceptor,
            MuxConfig::default(),
            CancellationToken::new(),
            &tracker,
        );
        let mut inc = crate::timer::timeout(Duration::from_secs(10), ev.incoming.recv())
            .await
            .expect("the stream arrives within 10 s")
            .expect("the stream arrives");
        assert_eq!(inc.tunnel, [5; 16]);
        match inc.stream.rx.recv().await {
            Some(Inbound::Data(d)) => assert_eq!(&d[..], b"early bytes"),
            other => panic!("expected DATA, got {other:?}"),
        }
        assert!(matches!(inc.stream.rx.recv().await, Some(Inbound::Fin)));
    }

    #[tokio::test]
    async fn messages_a_tiny_pipe_takes_a_few_bytes_at_a_time_arrive_whole_and_in_order() {
        // A pipe that holds 5 bytes, read empty before each message: every message is written
        // directly into it, which takes 5 bytes of its frame's header, and the rest must follow
        // from the batch (finished by the writer task) before anything else.
        let (a, b) = tokio::io::duplex(5);
        let tracker = TaskTracker::new();
        let (mux, _ev) = Mux::start(
            handshake_conn(a),
            Role::Opener,
            MuxConfig::default(),
            CancellationToken::new(),
            &tracker,
        );
        let mut raw = handshake_conn(b);
        let s = mux.open([4; 16], "u".into()).await.unwrap();
        async fn next(raw: &mut HandshakeConn<tokio::io::DuplexStream>) -> Frame {
            match crate::timer::timeout(Duration::from_secs(10), raw.next()).await {
                Ok(Some(Ok(f))) => f,
                other => panic!("expected a frame, got {other:?}"),
            }
        }
        assert!(matches!(next(&mut raw).await, Frame::Open { .. }));
        for i in 0..50u32 {
            let m: Vec<u8> = (0..1 + i * 7 % 97).map(|k| (i * 31 + k) as u8).collect();
            let n = s.tx.reserve(m.len()).await.unwrap();
            assert_eq!(n, m.len(), "credit for a whole message");
            s.tx.send_reserved_slice(&m).await.unwrap();
            match next(&mut raw).await {
                Frame::Data { data, .. } => assert!(data[..] == m[..], "message {i} differs"),
                other => panic!("expected DATA, got {other:?}"),
            }
        }
        mux.close();
    }

    #[tokio::test]
    async fn data_arriving_while_earlier_data_is_queued_queues_behind_it_even_if_the_socket_has_room()
     {
        let (_mux, mut ev, mut raw, _t) = pair(Role::Acceptor, MuxConfig::default());
        let (mut client, server) = crate::test_util::tight_tcp_pair(true).await;
        raw.send(Frame::Open {
            stream: 1,
            tunnel: [0; 16],
            peer: "p".into(),
        })
        .await
        .unwrap();
        let mut s = ev.incoming.recv().await.unwrap().stream;
        let count = Arc::new(AtomicU64::new(0));
        let (_server_rd, server_wr) = server.into_split();
        s.rx.deliver_to(Arc::new(server_wr), count.clone());
        let pattern: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        let first = 32 * 1024;
        // Frame 1: the socket (small buffers, nobody reading) takes part of it at once; the
        // rest is queued for the consumer, who is not looking.
        raw.send(Frame::Data {
            stream: 1,
            data: Bytes::copy_from_slice(&pattern[..first]),
        })
        .await
        .unwrap();
        // Wait (bounded) for the direct part to be in the socket, then drain the socket.
        let direct = crate::timer::timeout(Duration::from_secs(10), async {
            loop {
                let n = count.load(Ordering::Relaxed) as usize;
                if n > 0 {
                    return n;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("a direct write");
        assert!(
            direct < first,
            "the socket took all {first} bytes: no queue to test"
        );
        let mut got = vec![0u8; direct];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, &pattern[..direct]);
        // Frame 2 arrives while the rest of frame 1 is still queued and the socket has room:
        // it must queue behind it. A PING after it tells when the reader has handled it.
        raw.send(Frame::Data {
            stream: 1,
            data: Bytes::copy_from_slice(&pattern[first..]),
        })
        .await
        .unwrap();
        raw.send(Frame::Ping(7)).await.unwrap();
        loop {
            match raw.next().await {
                Some(Ok(Frame::Pong(7))) => break,
                Some(Ok(_)) => continue,
                other => panic!("expected PONG, got {other:?}"),
            }
        }
        let mut queued = Vec::new();
        while let Some(Inbound::Data(d)) = s.rx.try_recv() {
            queued.extend_from_slice(&d);
        }
        assert!(
            queued == pattern[direct..],
            "the rest of frame 1, then frame 2, in order: {} bytes queued, {} expected",
            queued.len(),
            pattern.len() - direct
        );
        assert_eq!(count.load(Ordering::Relaxed) as usize, direct);
        s.rx.release_sock();
    }

    #[tokio::test]
    async fn streams_writing_into_a_stalled_transport_are_held_back_by_the_data_queue() {
        // The raw end never reads: the pipe fills, and with it whatever a direct write left.
        let cfg = MuxConfig {
            write_queue: 8,
            ..MuxConfig::default()
        };
        let (mux, _ev, _raw, _t) = pair(Role::Opener, cfg);
        // Every stream is opened first: an OPEN waits in the same queue once it is full.
        let mut streams = Vec::new();
        for _ in 0..16 {
            streams.push(mux.open([0; 16], "p".into()).await.unwrap());
        }
        let mut senders = Vec::new();
        for s in streams {
            senders.push(tokio::spawn(async move {
                // Up to the whole window (256 KiB), as one stream task would send it.
                let _ = s.tx.send(Bytes::from(vec![7u8; 256 * 1024])).await;
                s
            }));
        }
        // Wait (bounded) until the data queue is full: every sender is then held back.
        crate::timer::timeout(Duration::from_secs(10), async {
            while mux.inner.data_tx.capacity() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the data queue fills");
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        // What the mux took: the pipe (1 MiB), one direct write left in the batch (at most
        // 128 KiB) and the queue (8 frames of at most 32 KiB). Senders of 256 KiB that got
        // everything in are at most that many; without the bound all 16 would be done.
        let done = senders.iter().filter(|h| h.is_finished()).count();
        let bound = ((1 << 20) + MAX_RESERVE + 8 * MAX_DATA_PAYLOAD as usize) / (256 * 1024) + 1;
        assert!(
            done <= bound,
            "{done} of 16 senders got 256 KiB into a stalled transport"
        );
        for s in senders {
            s.abort();
        }
    }

    #[tokio::test]
    async fn the_acceptor_refuses_opens_beyond_max_streams() {
        let cfg = MuxConfig {
            max_streams: 2,
            ..MuxConfig::default()
        };
        let (_mux, mut ev, mut raw, _t) = pair(Role::Acceptor, cfg);
        for id in 1..=3 {
            raw.send(Frame::Open {
                stream: id,
                tunnel: [0; 16],
                peer: "p".into(),
            })
            .await
            .unwrap();
        }
        let a = ev.incoming.recv().await.unwrap();
        let b = ev.incoming.recv().await.unwrap();
        match raw.next().await {
            Some(Ok(Frame::Reset { stream: 3, code })) => {
                assert_eq!(code, ErrorCode::TooManyStreams as u16)
            }
            other => panic!("expected RESET of stream 3, got {other:?}"),
        }
        drop((a, b));
    }

    /// A transport that records how many bytes each write offers.
    struct Recording {
        io: tokio::io::DuplexStream,
        offers: Arc<Mutex<Vec<usize>>>,
    }

    impl AsyncRead for Recording {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Recording {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            lock(&self.offers).push(bufs.iter().map(|b| b.len()).sum());
            std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    impl Transport for Recording {
        type Read = PlainRuns<tokio::io::ReadHalf<Recording>>;
        type Write = tokio::io::WriteHalf<Recording>;
        fn into_halves(self) -> (Self::Read, Self::Write) {
            let (rd, wr) = tokio::io::split(self);
            (PlainRuns::new(rd), wr)
        }
    }

    /// Sizes of the writes a [`Recording`] transport was offered, in order.
    type Offers = Arc<Mutex<Vec<usize>>>;

    /// An opener mux (4 MiB of peer credit per stream) over a pipe of `pipe` bytes whose
    /// transport records the size of every write it is offered. Returns the mux, the raw
    /// peer end, the recorded sizes, and what must stay alive while it runs.
    fn recording_opener(
        pipe: usize,
    ) -> (
        Mux,
        tokio::io::DuplexStream,
        Offers,
        (MuxEvents, TaskTracker),
    ) {
        let (a, b) = tokio::io::duplex(pipe);
        let offers = Arc::new(Mutex::new(Vec::new()));
        let tracker = TaskTracker::new();
        let cfg = MuxConfig {
            peer_window: 4 * 1024 * 1024,
            ..MuxConfig::default()
        };
        let io = Recording {
            io: a,
            offers: offers.clone(),
        };
        let (mux, ev) = Mux::start(
            handshake_conn(io),
            Role::Opener,
            cfg,
            CancellationToken::new(),
            &tracker,
        );
        (mux, b, offers, (ev, tracker))
    }

    #[tokio::test]
    async fn on_one_thread_bulk_chunks_that_streams_send_in_one_turn_go_out_in_one_write() {
        let (mux, b, offers, _keep) = recording_opener(4 * 1024 * 1024);
        let mut streams = Vec::new();
        for i in 0..3u8 {
            streams.push(mux.open([i; 16], "u".into()).await.unwrap());
        }
        let opened = lock(&offers).len();
        // Three streams' tasks, woken in the same turn, each send one bulk chunk.
        let chunk = 64 * 1024;
        let senders: Vec<_> = streams
            .into_iter()
            .map(|s| {
                tokio::spawn(async move {
                    s.tx.send(Bytes::from(vec![5u8; chunk])).await.unwrap();
                    s
                })
            })
            .collect();
        let mut raw = handshake_conn(b);
        let mut got = 0;
        while got < 3 * chunk {
            match crate::timer::timeout(Duration::from_secs(10), raw.next()).await {
                Ok(Some(Ok(Frame::Data { data, .. }))) => got += data.len(),
                Ok(Some(Ok(_))) => {}
                other => panic!("expected frames, got {other:?}"),
            }
        }
        let mut kept = Vec::new();
        for s in senders {
            kept.push(s.await.unwrap());
        }
        // Taken before the streams are dropped (each drop writes a RESET).
        let writes = lock(&offers)[opened..].to_vec();
        assert_eq!(
            writes,
            // Each chunk is two DATA frames of MAX_DATA_PAYLOAD.
            [3 * (2 * frame::HEADER_LEN + chunk)],
            "one write for the three chunks"
        );
        drop(kept);
        mux.close();
    }

    #[tokio::test]
    async fn queued_data_goes_out_in_batches_the_tls_layer_seals_in_one_write() {
        // The peer reads nothing at first, so frames queue up behind a full pipe and the
        // writer task gathers them into full batches once it reads.
        let (mux, b, offers, _keep) = recording_opener(64 * 1024);
        let stream = mux.open([1; 16], "u".into()).await.unwrap();
        let total = 2 * 1024 * 1024;
        let sender = tokio::spawn(async move {
            let chunk = Bytes::from(vec![7u8; MAX_DATA_PAYLOAD as usize]);
            for _ in 0..total / chunk.len() {
                stream.tx.send(chunk.clone()).await.unwrap();
            }
            stream
        });
        let mut raw = handshake_conn(b);
        let mut got = 0;
        while got < total {
            match crate::timer::timeout(Duration::from_secs(10), raw.next()).await {
                Ok(Some(Ok(Frame::Data { data, .. }))) => got += data.len(),
                Ok(Some(Ok(_))) => {}
                other => panic!("expected frames, got {other:?}"),
            }
        }
        let _stream = sender.await.unwrap();
        let offers = lock(&offers).clone();
        // Batches did fill (the queue held more than one batch's worth) ...
        let biggest = offers.iter().copied().max().unwrap_or(0);
        assert!(biggest >= WRITE_BATCH, "biggest write {biggest}");
        // ... and none went past what one TLS write takes, which would leave a tiny record
        // and a second system call for its tail.
        assert!(
            biggest <= crate::secure::WRITE_BATCH,
            "a write of {biggest} bytes"
        );
        mux.close();
    }
}
