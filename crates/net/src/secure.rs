//! TLS 1.3 streams whose records tube seals and opens itself, for the relay's agent
//! connections, which carry every tunnelled byte.
//!
//! rustls runs the whole handshake (its unbuffered API, the same configs, certificate pinning
//! and key exchange as everywhere else), then hands over the traffic secrets and a
//! [`KernelConnection`] that derives the next keys on a KeyUpdate: the path rustls offers for
//! kernel TLS. [`SecureStream`] then seals and opens records with [`crate::record`] in its own
//! buffers: a received byte is read from the socket into one buffer, decrypted there and
//! copied once to the reader, where rustls's buffered connection copies it three times; a sent
//! byte is copied once into the record it is sealed in, with no allocation per record.
//! [`SecureStream::into_split`] gives a reading and a writing half that share no lock (only
//! the key schedule, taken for a KeyUpdate, and a flag for a KeyUpdate the peer asked for).
//!
//! Bounds: the receive buffer is [`SMALL_BUF`] bytes, or [`BIG_BUF`] while the peer streams
//! (a read fills it), and shrinks back when a read finds nothing after several short ones; the send
//! buffer holds at most [`WRITE_BATCH`] bytes of plaintext sealed, a write waits until the
//! socket took the previous batch, and a small batch gives a grown buffer back. The sending
//! keys are replaced (KeyUpdate) long before the cipher suite's confidentiality limit; a
//! KeyUpdate the peer asks for is answered before the next record of data.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::record::{self, ContentType, Opener, PostHandshake, RecordError, Sealer};

/// The receive buffer of a connection that exchanges small messages.
pub const SMALL_BUF: usize = 4 * 1024;
/// Most plaintext one write seals (in records of at most 16 KiB) before it goes out.
pub const WRITE_BATCH: usize = 256 * 1024;
/// The receive buffer while the peer streams: up to this much per read, one whole batch of
/// [`WRITE_BATCH`] as sealed (records' overhead included), so a batch is read in one go and
/// leaves no partial record to move to the front.
pub const BIG_BUF: usize =
    WRITE_BATCH + (WRITE_BATCH / record::MAX_PLAINTEXT + 1) * record::OVERHEAD;
/// Most bytes of one handshake flight, and of application data that arrives with it.
const MAX_HANDSHAKE: usize = 64 * 1024;
/// Most records in a row that carry no data (empty ones, KeyUpdates, tickets): they cost work
/// (a KeyUpdate a key derivation) and carry nothing.
const MAX_RECORDS_WITHOUT_DATA: u32 = 32;

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Runs the server side of a handshake on `io`.
pub async fn accept<T>(io: T, config: Arc<rustls::ServerConfig>) -> io::Result<SecureStream<T>>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
    handshake(io, conn).await
}

/// Runs the client side of a handshake on `io`, offering `name`.
pub async fn connect<T>(
    io: T,
    config: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
) -> io::Result<SecureStream<T>>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let conn = UnbufferedClientConnection::new(config, name).map_err(invalid)?;
    handshake(io, conn).await
}

/// The two sides of rustls's unbuffered connection, as the handshake driver needs them.
trait Unbuffered {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error>;
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
        let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Kernel::Client(kernel)))
    }
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
        let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Kernel::Server(kernel)))
    }
}

/// What rustls keeps after the handshake: the key schedule, for KeyUpdates and tickets.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }

    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }

    fn ticket(&mut self, body: &[u8]) -> io::Result<()> {
        match self {
            Kernel::Client(k) => k.handle_new_session_ticket(body).map_err(invalid),
            Kernel::Server(_) => Err(invalid(RecordError::Handshake(4))),
        }
    }

    /// Records the sending keys may seal before they are replaced: half the suite's
    /// confidentiality limit (2^23 records for AES-GCM).
    fn key_update_after(&self) -> u64 {
        let suite = match self {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        };
        suite
            .tls13()
            .map_or(1 << 23, |s| s.common.confidentiality_limit / 2)
    }
}

/// Drives rustls's unbuffered handshake over `io` until application data may flow, then
/// takes its secrets.
async fn handshake<T, C>(mut io: T, mut conn: C) -> io::Result<SecureStream<T>>
where
    T: AsyncRead + AsyncWrite + Unpin,
    C: Unbuffered,
{
    let mut inbuf = vec![0; 4 * 1024];
    let mut used = 0;
    let mut out = Vec::new();
    let mut out_len = 0;
    // Application data that came with the last handshake flight.
    let mut early = Vec::new();
    loop {
        let status = conn.process(&mut inbuf[..used]);
        let discard = status.discard;
        let mut read = false;
        let mut done = false;
        let state = match status.state {
            Ok(state) => state,
            Err(e) => {
                send_alert(&mut io, &mut conn).await;
                return Err(invalid(e));
            }
        };
        match state {
            ConnectionState::EncodeTlsData(mut s) => loop {
                match s.encode(&mut out[out_len..]) {
                    Ok(n) => {
                        out_len += n;
                        break;
                    }
                    Err(EncodeError::InsufficientSize(e))
                        if out_len + e.required_size <= MAX_HANDSHAKE =>
                    {
                        out.resize(out_len + e.required_size, 0);
                    }
                    Err(e) => return Err(invalid(e)),
                }
            },
            ConnectionState::TransmitTlsData(s) => {
                io.write_all(&out[..out_len]).await?;
                io.flush().await?;
                out_len = 0;
                s.done();
            }
            ConnectionState::BlockedHandshake => read = true,
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(rec) = r.next_record() {
                    let rec = rec.map_err(invalid)?;
                    if early.len() + rec.payload.len() > MAX_HANDSHAKE {
                        return Err(invalid("too much data during the tls handshake"));
                    }
                    early.extend_from_slice(rec.payload);
                }
            }
            ConnectionState::WriteTraffic(_) => done = true,
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed during the tls handshake",
                ));
            }
            other => return Err(invalid(format!("unexpected tls handshake state {other:?}"))),
        }
        inbuf.copy_within(discard..used, 0);
        used -= discard;
        if done {
            break;
        }
        if read {
            if used == inbuf.len() {
                let cap = MAX_HANDSHAKE + record::HEADER_LEN + record::MAX_CIPHERTEXT;
                if inbuf.len() >= cap {
                    return Err(invalid("tls handshake message too large"));
                }
                inbuf.resize((inbuf.len() * 2).min(cap), 0);
            }
            let n = io.read(&mut inbuf[used..]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed during the tls handshake",
                ));
            }
            used += n;
        }
    }
    let (secrets, kernel) = conn.into_kernel().map_err(invalid)?;
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    let tx_limit = kernel.key_update_after();
    let keys = Arc::new(Keys {
        kernel: std::sync::Mutex::new(kernel),
        answer_key_update: AtomicBool::new(false),
    });
    Ok(SecureStream {
        io,
        recv: RecvState {
            keys: keys.clone(),
            rx: Opener::new(&rx, rx_seq).map_err(invalid)?,
            rbuf: RecvBuf::holding(&inbuf[..used]),
            plain: 0..0,
            record_end: 0,
            early,
            records_without_data: 0,
            peer_closed: false,
            handed: 0,
        },
        send: SendState {
            keys,
            tx: Sealer::new(&tx, tx_seq).map_err(invalid)?,
            tx_limit,
            wbuf: Vec::new(),
            wpos: 0,
            close_sent: false,
        },
    })
}

/// Sends the alert rustls queued on a failed handshake, if any, within a short grace.
async fn send_alert<T, C>(io: &mut T, conn: &mut C)
where
    T: AsyncWrite + Unpin,
    C: Unbuffered,
{
    let mut buf = [0u8; 64];
    let n = match conn.process(&mut []).state {
        Ok(ConnectionState::EncodeTlsData(mut s)) => s.encode(&mut buf).unwrap_or(0),
        _ => 0,
    };
    if n > 0 {
        let grace = std::time::Duration::from_millis(500);
        let _ = crate::timer::timeout(grace, io.write_all(&buf[..n])).await;
    }
}

/// What both halves of a connection share: the key schedule (taken for a KeyUpdate or a
/// ticket, rare) and a KeyUpdate the peer asked for, which the sending half answers.
struct Keys {
    kernel: std::sync::Mutex<Kernel>,
    answer_key_update: AtomicBool,
}

impl Keys {
    fn kernel(&self) -> std::sync::MutexGuard<'_, Kernel> {
        // A panic while holding it leaves the key schedule as it was: still usable.
        self.kernel.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A TLS 1.3 connection after its handshake: reads and writes application data.
pub struct SecureStream<T> {
    io: T,
    recv: RecvState,
    send: SendState,
}

/// The receiving half of a [`SecureStream`] split with [`SecureStream::into_split`]: reads
/// application data, with no lock shared with the sending half.
pub struct SecureReader<R> {
    io: R,
    recv: RecvState,
}

/// The sending half of a [`SecureStream`] split with [`SecureStream::into_split`].
pub struct SecureWriter<W> {
    io: W,
    send: SendState,
}

/// The receiving side's state.
struct RecvState {
    keys: Arc<Keys>,
    rx: Opener,
    /// Bytes read from the socket: the opened record at the front (while `plain` is not
    /// empty), then records not yet opened.
    rbuf: RecvBuf,
    /// The part of the opened record's plaintext not yet read, as a range of `rbuf.data()`.
    plain: std::ops::Range<usize>,
    /// The opened record's length.
    record_end: usize,
    /// Application data that came with the handshake, read before any record.
    early: Vec<u8>,
    /// Records in a row that carried no data.
    records_without_data: u32,
    /// The peer sent close_notify: reads return end of stream.
    peer_closed: bool,
    /// The length of the record whose plaintext [`SecureReader::next_run`] handed out: let go
    /// (consumed) on the next call or fill.
    handed: usize,
}

/// The sending side's state.
struct SendState {
    keys: Arc<Keys>,
    tx: Sealer,
    /// Records `tx` may seal before its keys are replaced.
    tx_limit: u64,
    /// Sealed records not yet written, from `wpos` on.
    wbuf: Vec<u8>,
    wpos: usize,
    close_sent: bool,
}

impl<T> std::fmt::Debug for SecureStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureStream")
            .field("buffered_in", &self.recv.rbuf.data().len())
            .field("buffered_out", &(self.send.wbuf.len() - self.send.wpos))
            .finish_non_exhaustive()
    }
}

impl<T> SecureStream<T> {
    /// The transport beneath.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Replaces the sending keys after `records` more records (tests of KeyUpdate).
    #[cfg(test)]
    fn update_keys_after(&mut self, records: u64) {
        self.send.tx_limit = self.send.tx.seq() + records;
    }
}

impl SecureStream<tokio::net::TcpStream> {
    /// Splits the connection into a reading and a writing half that share no lock (unlike
    /// `tokio::io::split`): each may live in its own task. A KeyUpdate the peer asks for is
    /// still answered by the writing half before its next record of data.
    pub fn into_split(
        self,
    ) -> (
        SecureReader<tokio::net::tcp::OwnedReadHalf>,
        SecureWriter<tokio::net::tcp::OwnedWriteHalf>,
    ) {
        let (rd, wr) = self.io.into_split();
        (
            SecureReader {
                io: rd,
                recv: self.recv,
            },
            SecureWriter {
                io: wr,
                send: self.send,
            },
        )
    }
}

impl SendState {
    /// Seals a KeyUpdate with the current keys and moves to the next ones, when they are
    /// worn out or the peer asked for it.
    fn maybe_update_keys(&mut self) -> io::Result<()> {
        // Taken before the KeyUpdate goes out: a request that arrives after it is answered
        // with one more (harmless), never lost.
        let answer = &self.keys.answer_key_update;
        let asked = answer.load(Ordering::Acquire) && answer.swap(false, Ordering::AcqRel);
        if self.tx.seq() < self.tx_limit && !asked {
            return Ok(());
        }
        self.tx
            .seal(
                ContentType::Handshake,
                &record::key_update(false),
                &mut self.wbuf,
            )
            .map_err(invalid)?;
        let mut kernel = self.keys.kernel();
        let (seq, next) = kernel.next_tx().map_err(invalid)?;
        self.tx = Sealer::new(&next, seq).map_err(invalid)?;
        self.tx_limit = kernel.key_update_after();
        Ok(())
    }

    /// Writes the sealed records not yet written.
    fn poll_drain<W>(&mut self, io: &mut W, cx: &mut Context<'_>) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin,
    {
        while self.wpos < self.wbuf.len() {
            let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        if self.wbuf.len() < SMALL_BUF && self.wbuf.capacity() > 4 * SMALL_BUF {
            // A small batch after a bulk one: give the grown buffer back.
            self.wbuf = Vec::new();
        }
        self.wbuf.clear();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_write_vectored<W>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>>
    where
        W: AsyncWrite + Unpin,
    {
        ready!(self.poll_drain(io, cx))?;
        if self.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        // Room for the whole batch at once (a KeyUpdate included), so it never grows by copying.
        let batch = total.min(WRITE_BATCH);
        let records = batch.div_ceil(record::MAX_PLAINTEXT) + 1;
        self.wbuf
            .reserve_exact(batch + records * record::OVERHEAD + 5);
        let (mut idx, mut off, mut taken) = (0, 0, 0);
        while taken < batch {
            self.maybe_update_keys()?;
            let start = Sealer::begin(&mut self.wbuf);
            let mut room = record::MAX_PLAINTEXT.min(batch - taken);
            while room > 0 && idx < bufs.len() {
                let b = &bufs[idx][off..];
                let n = room.min(b.len());
                self.wbuf.extend_from_slice(&b[..n]);
                room -= n;
                off += n;
                taken += n;
                if off == bufs[idx].len() {
                    idx += 1;
                    off = 0;
                }
            }
            self.tx
                .finish(&mut self.wbuf, start, ContentType::ApplicationData)
                .map_err(invalid)?;
        }
        // What the socket does not take now goes out on the next write or flush.
        if let Poll::Ready(Err(e)) = self.poll_drain(io, cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn poll_flush<W>(&mut self, io: &mut W, cx: &mut Context<'_>) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin,
    {
        ready!(self.poll_drain(io, cx))?;
        Pin::new(io).poll_flush(cx)
    }

    fn poll_shutdown<W>(&mut self, io: &mut W, cx: &mut Context<'_>) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin,
    {
        if !self.close_sent {
            ready!(self.poll_drain(io, cx))?;
            self.tx
                .seal(ContentType::Alert, &record::CLOSE_NOTIFY, &mut self.wbuf)
                .map_err(invalid)?;
            self.close_sent = true;
        }
        ready!(self.poll_drain(io, cx))?;
        Pin::new(io).poll_shutdown(cx)
    }
}

impl RecvState {
    /// Consumes the record [`RecvState::next_run`] handed out.
    fn let_go(&mut self) {
        if self.handed > 0 {
            self.rbuf.consume(self.handed);
            self.handed = 0;
        }
    }

    /// See [`SecureReader::next_run`].
    fn next_run(&mut self) -> io::Result<Option<std::ops::Range<usize>>> {
        self.let_go();
        loop {
            if !self.plain.is_empty() {
                let start = self.rbuf.start;
                let run = start + self.plain.start..start + self.plain.end;
                self.plain = 0..0;
                self.handed = self.record_end;
                return Ok(Some(run));
            }
            if self.peer_closed || self.open_front()?.is_some() {
                return Ok(None);
            }
        }
    }

    /// Opens the whole record at the front of the buffer and handles it: `None`. With no whole
    /// record there: the bytes the next one needs, its header included.
    #[inline]
    fn open_front(&mut self) -> io::Result<Option<usize>> {
        match record::record_len(self.rbuf.data()).map_err(invalid)? {
            Some(total) if self.rbuf.data().len() >= total => {
                let (typ, len) = self
                    .rx
                    .open(&mut self.rbuf.data_mut()[..total])
                    .map_err(invalid)?;
                self.opened(typ, len, total)?;
                Ok(None)
            }
            Some(total) => Ok(Some(total)),
            None => Ok(Some(record::HEADER_LEN)),
        }
    }

    /// See [`SecureReader::poll_fill`].
    fn poll_fill<R>(&mut self, io: &mut R, cx: &mut Context<'_>) -> Poll<io::Result<bool>>
    where
        R: AsyncRead + Unpin,
    {
        self.let_go();
        if self.peer_closed {
            return Poll::Ready(Ok(false));
        }
        // A whole record waiting is opened, for the next run: nothing to read.
        let Some(need) = self.open_front()? else {
            return Poll::Ready(Ok(true));
        };
        self.poll_read_more(io, cx, need).map_ok(|()| true)
    }

    /// Reads from the socket into the receive buffer, with room for a record of `need` bytes
    /// (header included) at its front. The socket's end is an error: a peer ends with
    /// close_notify, and an end without it looks the same as a truncation attack.
    #[inline]
    fn poll_read_more<R>(
        &mut self,
        io: &mut R,
        cx: &mut Context<'_>,
        need: usize,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
    {
        let mut rb = ReadBuf::new(self.rbuf.room(need));
        match Pin::new(io).poll_read(cx, &mut rb) {
            Poll::Pending => {
                self.rbuf.idle();
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) if rb.filled().is_empty() => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed without tls close_notify",
            ))),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                self.rbuf.filled(n);
                Poll::Ready(Ok(()))
            }
        }
    }

    /// Handles the record just opened at the front of `rbuf` (`len` bytes of plaintext of
    /// type `typ`, the record `total` bytes long).
    fn opened(&mut self, typ: ContentType, len: usize, total: usize) -> io::Result<()> {
        let body = record::HEADER_LEN..record::HEADER_LEN + len;
        if typ == ContentType::ApplicationData && len > 0 {
            self.records_without_data = 0;
        } else {
            self.records_without_data += 1;
            if self.records_without_data > MAX_RECORDS_WITHOUT_DATA {
                return Err(invalid("too many tls records without data in a row"));
            }
        }
        match typ {
            ContentType::ApplicationData if len == 0 => self.rbuf.consume(total),
            ContentType::ApplicationData => {
                self.plain = body;
                self.record_end = total;
            }
            ContentType::Handshake => {
                for msg in record::post_handshake(&self.rbuf.data()[body]).map_err(invalid)? {
                    match msg {
                        PostHandshake::KeyUpdate { requested } => {
                            let (seq, next) = self.keys.kernel().next_rx().map_err(invalid)?;
                            self.rx = Opener::new(&next, seq).map_err(invalid)?;
                            if requested {
                                self.keys.answer_key_update.store(true, Ordering::Release);
                            }
                        }
                        PostHandshake::NewSessionTicket(body) => self.keys.kernel().ticket(body)?,
                    }
                }
                self.rbuf.consume(total);
            }
            ContentType::Alert => {
                match &self.rbuf.data()[body] {
                    [_, 0] => self.peer_closed = true,
                    // user_canceled: a close_notify follows.
                    [_, 90] => {}
                    [_, d] => return Err(invalid(format!("tls alert {d} from the peer"))),
                    _ => return Err(invalid("malformed tls alert")),
                }
                self.rbuf.consume(total);
            }
        }
        Ok(())
    }

    fn poll_read<R>(
        &mut self,
        io: &mut R,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
    {
        self.let_go();
        let mut copied = false;
        if !self.early.is_empty() {
            let n = buf.remaining().min(self.early.len());
            buf.put_slice(&self.early[..n]);
            self.early.drain(..n);
            if self.early.is_empty() {
                self.early = Vec::new();
            }
            return Poll::Ready(Ok(()));
        }
        loop {
            if !self.plain.is_empty() {
                let n = buf.remaining().min(self.plain.len());
                buf.put_slice(&self.rbuf.data()[self.plain.start..self.plain.start + n]);
                self.plain.start += n;
                copied |= n > 0;
                if !self.plain.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                self.rbuf.consume(self.record_end);
            }
            if buf.remaining() == 0 || self.peer_closed {
                return Poll::Ready(Ok(()));
            }
            let Some(need) = self.open_front()? else {
                continue;
            };
            if copied {
                return Poll::Ready(Ok(()));
            }
            ready!(self.poll_read_more(io, cx, need))?;
        }
    }
}

/// The receive buffer: bytes read from the socket, consumed from the front. Bytes are moved
/// only to make room for a record that would not fit (at most one partial record per read).
struct RecvBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The peer streams: a read filled what it was given or brought at least [`SMALL_BUF`],
    /// and fewer than [`QUIET_READS`] short reads came since.
    streaming: bool,
    short_reads: u32,
}

/// Short reads in a row after which a stream counts as over.
const QUIET_READS: u32 = 8;

impl RecvBuf {
    fn holding(bytes: &[u8]) -> Self {
        Self {
            buf: bytes.to_vec(),
            start: 0,
            end: bytes.len(),
            streaming: false,
            short_reads: 0,
        }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Space to read into, for a record of `need` bytes (header included) at the front.
    fn room(&mut self, need: usize) -> &mut [u8] {
        let len = self.end - self.start;
        let want = if self.streaming { BIG_BUF } else { SMALL_BUF }.max(need);
        if self.buf.len() < want {
            let mut bigger = vec![0; want];
            bigger[..len].copy_from_slice(self.data());
            self.buf = bigger;
            self.start = 0;
            self.end = len;
        } else if self.start > 0
            && self.buf.len() - self.end < (need - len.min(need)).max(self.buf.len() / 2)
        {
            self.buf.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = len;
        }
        &mut self.buf[self.end..]
    }

    fn filled(&mut self, n: usize) {
        let room = self.buf.len() - self.end;
        self.end += n;
        if n == room || n >= SMALL_BUF {
            self.streaming = true;
            self.short_reads = 0;
        } else {
            self.short_reads += 1;
            self.streaming &= self.short_reads < QUIET_READS;
        }
    }

    /// A read found nothing: a buffer grown for a stream that has ended (several short reads
    /// in a row) is given back.
    fn idle(&mut self) {
        if self.start == self.end && !self.streaming && self.buf.len() > SMALL_BUF {
            self.buf = Vec::new();
            self.start = 0;
            self.end = 0;
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SecureStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.recv.poll_read(&mut this.io, cx, buf)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for SecureReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.recv.poll_read(&mut this.io, cx, buf)
    }
}

impl<R: AsyncRead + Unpin> SecureReader<R> {
    /// Application data that came with the handshake: read it before the first run.
    pub fn take_early(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.recv.early)
    }

    /// The next run of application data already received, as a range of [`Self::buffer`]: a
    /// record opened where it lies, its plaintext not copied. The run handed out before is let
    /// go. `None`: no complete record is buffered (or the peer closed); [`Self::poll_fill`]
    /// reads more. Runs stay where they are until the next fill, so several can be used
    /// together (written out in one vectored write).
    pub fn next_run(&mut self) -> io::Result<Option<std::ops::Range<usize>>> {
        self.recv.next_run()
    }

    /// What the ranges [`Self::next_run`] hands out refer to.
    pub fn buffer(&self) -> &[u8] {
        &self.recv.rbuf.buf
    }

    /// Reads more from the socket, which may move what is buffered (every run handed out is
    /// let go). `Ok(false)`: the peer closed with close_notify. An end without close_notify
    /// is an error (a truncation attack looks the same).
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        self.recv.poll_fill(&mut self.io, cx)
    }
}

/// `AsyncWrite` for a type that holds its transport in `io` and its [`SendState`] in `send`.
macro_rules! secure_write {
    ($ty:ident, $t:ident) => {
        impl<$t: AsyncWrite + Unpin> AsyncWrite for $ty<$t> {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                let this = self.get_mut();
                this.send.poll_write_vectored(&mut this.io, cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                true
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                let this = self.get_mut();
                this.send.poll_flush(&mut this.io, cx)
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                let this = self.get_mut();
                this.send.poll_shutdown(&mut this.io, cx)
            }
        }
    };
}

secure_write!(SecureStream, T);
secure_write!(SecureWriter, W);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{self, Identity};
    use std::io::Write;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// A secure client connected to a rustls server (tokio-rustls) over loopback TCP.
    async fn with_rustls_server() -> (
        SecureStream<TcpStream>,
        tokio_rustls::server::TlsStream<TcpStream>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (id, _) = Identity::load_or_create(dir.path(), "relay").unwrap();
        let (c, s) = tcp_pair().await;
        let acceptor = TlsAcceptor::from(id.server_config().unwrap());
        let cfg = tls::pinned_client_config(id.fingerprint()).unwrap();
        let (client, server) =
            tokio::join!(connect(c, cfg, tls::server_name()), acceptor.accept(s));
        (client.unwrap(), server.unwrap())
    }

    async fn send_and_check<W, R>(w: &mut W, r: &mut R, data: &[u8])
    where
        W: AsyncWrite + Unpin,
        R: AsyncRead + Unpin,
    {
        let mut got = vec![0; data.len()];
        let (wrote, read) = tokio::join!(
            async {
                w.write_all(data).await?;
                w.flush().await
            },
            r.read_exact(&mut got)
        );
        wrote.unwrap();
        read.unwrap();
        assert!(got == data, "bytes differ");
    }

    /// Reads `bytes` into `b` as the socket would, in one read of at most the room offered.
    fn read_into(b: &mut RecvBuf, need: usize, bytes: &[u8]) -> usize {
        let room = b.room(need);
        let n = room.len().min(bytes.len());
        room[..n].copy_from_slice(&bytes[..n]);
        b.filled(n);
        n
    }

    #[test]
    fn the_receive_buffer_grows_for_a_stream_and_is_given_back_when_it_ends() {
        let mut b = RecvBuf::holding(&[]);
        // Small messages: a small buffer, kept while idle.
        assert_eq!(read_into(&mut b, record::HEADER_LEN, &[7; 100]), 100);
        assert_eq!(b.buf.len(), SMALL_BUF);
        b.consume(100);
        b.idle();
        assert_eq!(b.buf.len(), SMALL_BUF);
        // A read that fills the buffer: the peer streams, the next read gets the big one, and
        // unread bytes move along.
        let data = pattern(3 * BIG_BUF, 9);
        let n = read_into(&mut b, record::HEADER_LEN, &data);
        assert_eq!(n, SMALL_BUF);
        b.consume(10);
        let m = read_into(&mut b, record::HEADER_LEN, &data[n..]);
        assert_eq!(b.buf.len(), BIG_BUF);
        assert!(b.data() == &data[10..n + m]);
        // Idle while streaming: kept. Short reads in a row end the stream; then it goes.
        b.consume(b.data().len());
        b.idle();
        assert_eq!(b.buf.len(), BIG_BUF);
        for i in 0..QUIET_READS {
            read_into(&mut b, record::HEADER_LEN, &[1; 10]);
            b.consume(10);
            b.idle();
            let expect = if i + 1 < QUIET_READS { BIG_BUF } else { 0 };
            assert_eq!(b.buf.len(), expect, "after {} short reads", i + 1);
        }
    }

    #[test]
    fn a_partial_record_moves_to_the_front_only_when_the_rest_would_not_fit() {
        let mut b = RecvBuf::holding(&[]);
        b.streaming = true;
        let data = pattern(BIG_BUF, 3);
        read_into(&mut b, record::HEADER_LEN, &data);
        // Whole records consumed, 1000 bytes of the next one left at the end: its total is
        // 5000, which does not fit behind it, so they move to the front.
        b.consume(BIG_BUF - 1000);
        let room = b.room(5000).len();
        assert_eq!((b.start, b.end, room), (0, 1000, BIG_BUF - 1000));
        assert!(b.data() == &data[BIG_BUF - 1000..]);
        // With room enough behind the unread bytes, nothing moves.
        b.consume(500);
        let room = b.room(600).len();
        assert_eq!((b.start, room), (500, BIG_BUF - 1000));
    }

    #[tokio::test]
    async fn a_secure_client_and_a_rustls_server_agree_across_key_updates_both_ways() {
        let (mut client, mut server) = with_rustls_server().await;
        // Bulk both ways: many full records, and a size that leaves a partial one.
        let up = pattern(1 << 20 | 123, 1);
        send_and_check(&mut client, &mut server, &up).await;
        let down = pattern(3 << 19 | 7, 2);
        send_and_check(&mut server, &mut client, &down).await;
        // Our sending keys wear out after two more records: the rustls server must follow.
        client.update_keys_after(2);
        send_and_check(&mut client, &mut server, &pattern(100_000, 3)).await;
        assert!(client.send.tx.seq() < 10, "keys were not replaced");
        // rustls replaces its keys and asks for ours to change too (update_requested).
        server.get_mut().1.refresh_traffic_keys().unwrap();
        send_and_check(&mut server, &mut client, b"after the server's update").await;
        assert!(client.send.keys.answer_key_update.load(Ordering::Relaxed));
        send_and_check(&mut client, &mut server, b"answered").await;
        assert!(!client.send.keys.answer_key_update.load(Ordering::Relaxed));
        // close_notify ends the stream cleanly each way.
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        server.shutdown().await.unwrap();
        assert_eq!(client.read(&mut [0; 16]).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn split_halves_carry_data_and_the_writer_answers_a_key_update_the_reader_saw() {
        let (client, mut server) = with_rustls_server().await;
        let (mut rd, mut wr) = client.into_split();
        send_and_check(&mut wr, &mut server, &pattern(300_000, 6)).await;
        send_and_check(&mut server, &mut rd, &pattern(200_000, 7)).await;
        // rustls replaces its keys and asks for ours: the reading half sees the request, the
        // writing half answers before its next data, with keys the server follows.
        server.get_mut().1.refresh_traffic_keys().unwrap();
        send_and_check(&mut server, &mut rd, b"after the server's update").await;
        assert!(wr.send.keys.answer_key_update.load(Ordering::Relaxed));
        let seq = wr.send.tx.seq();
        send_and_check(&mut wr, &mut server, b"answered").await;
        assert!(!wr.send.keys.answer_key_update.load(Ordering::Relaxed));
        assert!(
            wr.send.tx.seq() < seq,
            "the writer's keys were not replaced"
        );
        send_and_check(&mut wr, &mut server, &pattern(100_000, 8)).await;
        // Shutting the writing half down ends the stream for the server; the reading half
        // still reads what the server sends afterwards, then its close.
        wr.shutdown().await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        send_and_check(&mut server, &mut rd, b"after the client's close").await;
        server.shutdown().await.unwrap();
        assert_eq!(rd.read(&mut [0; 16]).await.unwrap(), 0);
    }

    /// Reads at least `want` bytes from `rd` as runs, checking before each fill that every run
    /// handed out since the last one is still where it was (opening the next record in place
    /// must not touch it).
    async fn read_runs(
        rd: &mut SecureReader<tokio::net::tcp::OwnedReadHalf>,
        want: usize,
    ) -> Vec<u8> {
        let mut got = Vec::new();
        loop {
            let mut held = Vec::new();
            while let Some(run) = rd.next_run().unwrap() {
                held.push((run.clone(), rd.buffer()[run].to_vec()));
            }
            for (run, copy) in held {
                assert!(
                    rd.buffer()[run] == copy[..],
                    "a run changed before the fill"
                );
                got.extend_from_slice(&copy);
            }
            if got.len() >= want {
                return got;
            }
            let more = std::future::poll_fn(|cx| rd.poll_fill(cx)).await.unwrap();
            assert!(more, "the stream ended after {} bytes", got.len());
        }
    }

    #[tokio::test]
    async fn runs_are_records_opened_in_place_and_stay_until_the_next_fill() {
        let (client, mut server) = with_rustls_server().await;
        let (mut rd, _wr) = client.into_split();
        // Bulk (many records per read, and records split across reads), then a KeyUpdate
        // between two small messages, then close_notify.
        let bulk = pattern(1 << 20 | 123, 9);
        let send = async {
            server.write_all(&bulk).await?;
            server.flush().await
        };
        let (sent, got) = tokio::join!(send, read_runs(&mut rd, bulk.len()));
        sent.unwrap();
        assert!(got == bulk, "bytes differ");
        server.write_all(b"before").await.unwrap();
        server.flush().await.unwrap();
        assert_eq!(read_runs(&mut rd, 6).await, b"before");
        server.get_mut().1.refresh_traffic_keys().unwrap();
        server.write_all(b"after the update").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(read_runs(&mut rd, 16).await, b"after the update");
        let end = std::future::poll_fn(|cx| rd.poll_fill(cx)).await.unwrap();
        assert!(!end, "close_notify must end the runs cleanly");
        assert!(rd.next_run().unwrap().is_none());
    }

    #[tokio::test]
    async fn a_secure_server_reads_what_a_rustls_client_sends_at_once_and_keys_update_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let (id, _) = Identity::load_or_create(dir.path(), "relay").unwrap();
        let (c, s) = tcp_pair().await;
        let connector = TlsConnector::from(tls::pinned_client_config(id.fingerprint()).unwrap());
        let first = pattern(40_000, 4);
        let client = async {
            let mut tls = connector.connect(tls::server_name(), c).await?;
            // Written at once, so it travels with (or right behind) the Finished.
            tls.write_all(&first).await?;
            tls.flush().await?;
            Ok::<_, io::Error>(tls)
        };
        let (client, server) = tokio::join!(client, accept(s, id.server_config().unwrap()));
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        let mut got = vec![0; first.len()];
        server.read_exact(&mut got).await.unwrap();
        assert!(got == first);
        send_and_check(&mut server, &mut client, &pattern(200_000, 5)).await;
        server.update_keys_after(0);
        send_and_check(&mut server, &mut client, b"new keys").await;
        send_and_check(&mut client, &mut server, b"still fine").await;
    }

    #[tokio::test]
    async fn a_run_of_key_updates_without_data_closes_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let (id, _) = Identity::load_or_create(dir.path(), "relay").unwrap();
        let (c, s) = tcp_pair().await;
        let cfg = tls::pinned_client_config(id.fingerprint()).unwrap();
        let (client, server) = tokio::join!(
            connect(c, cfg, tls::server_name()),
            accept(s, id.server_config().unwrap())
        );
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        // As many KeyUpdates in a row as allowed, then data: accepted (each costs the receiver
        // a key derivation, data resets the count).
        for _ in 0..MAX_RECORDS_WITHOUT_DATA {
            client.update_keys_after(0);
            client.send.maybe_update_keys().unwrap();
        }
        send_and_check(&mut client, &mut server, b"data resets the count").await;
        // One more than allowed: the connection is refused, not kept busy.
        for _ in 0..=MAX_RECORDS_WITHOUT_DATA {
            client.update_keys_after(0);
            client.send.maybe_update_keys().unwrap();
        }
        client.write_all(b"late").await.unwrap();
        client.flush().await.unwrap();
        let err = server.read(&mut [0; 16]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("without data"), "{err}");
    }

    #[tokio::test]
    async fn a_wrong_pin_fails_the_handshake_with_the_pin_error() {
        let dir = tempfile::tempdir().unwrap();
        let (id, _) = Identity::load_or_create(dir.path(), "relay").unwrap();
        let (other, _) = Identity::load_or_create(dir.path(), "other").unwrap();
        let (c, s) = tcp_pair().await;
        let cfg = tls::pinned_client_config(other.fingerprint()).unwrap();
        let (client, server) = tokio::join!(
            connect(c, cfg, tls::server_name()),
            accept(s, id.server_config().unwrap())
        );
        let err = client.unwrap_err().to_string();
        assert!(err.contains(tls::PIN_MISMATCH), "{err}");
        // The server hears why: the client's alert.
        let err = server.unwrap_err().to_string();
        assert!(
            err.contains("BadCertificate") || err.contains("alert"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_tampered_record_is_an_error_and_not_data() {
        let (mut client, server) = with_rustls_server().await;
        // A record as the server would seal it, with one bit flipped, written raw.
        let (mut tcp, mut conn) = server.into_inner();
        conn.writer().write_all(b"hello").unwrap();
        let mut wire = Vec::new();
        conn.write_tls(&mut wire).unwrap();
        let last = wire.len() - 1;
        wire[last] ^= 1;
        tcp.write_all(&wire).await.unwrap();
        let err = client.read(&mut [0; 16]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("authentication"), "{err}");
    }
}
