//! Moves bytes between a TCP socket and a mux stream, in both directions at once.
//!
//! Reading from the socket waits for send credit first, so a stream whose peer stops reading
//! stops reading its socket (TCP backpressure) instead of buffering. Idle streams hold no
//! buffer: a read of up to one frame goes straight into the connection's TLS batch when the
//! stream may write directly ([`StreamTx::read_direct`]); otherwise a buffer is taken from
//! [`crate::pool`] only when the socket is readable, and handed to the writer as the frame
//! payload. A FIN in either direction becomes a half-close on the other side; a reset or socket
//! error aborts both sides (the TCP peer sees RST, the mux peer a RESET frame). The mux's reader
//! may write DATA to the socket itself while this side is idle ([`StreamRx::deliver_to`]). The
//! stream's abort signal (a reset from the peer, or the connection closing) ends the proxy
//! whatever it waits on.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;

use bytes::Bytes;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tube_proto::control::ErrorCode;

use crate::mux::{Inbound, Mux, MuxError, MuxStream, StreamRx, StreamTx};
use crate::pool::{self, ReadBuffer};

/// How a proxied connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyEnd {
    /// Both directions finished with an orderly close.
    Clean,
    /// The TCP side failed (reset, error); the stream was reset.
    SocketError,
    /// The mux side reset the stream or the connection closed (its token cancelled
    /// included); the socket was reset.
    StreamReset,
}

/// Byte counters, updated live while data flows (shared by all connections of a tunnel).
#[derive(Debug, Default)]
pub struct Traffic {
    /// Bytes read from sockets and sent on streams.
    pub socket_to_stream: AtomicU64,
    /// Bytes received on streams and written to sockets (shared with the mux's reader, which
    /// may write some of them itself).
    pub stream_to_socket: Arc<AtomicU64>,
}

impl Traffic {
    /// (socket_to_stream, stream_to_socket) right now.
    pub fn get(&self) -> (u64, u64) {
        (
            self.socket_to_stream.load(Ordering::Relaxed),
            self.stream_to_socket.load(Ordering::Relaxed),
        )
    }
}

enum Failure {
    Socket,
    Stream,
}

/// Opens a stream for `tunnel` on `mux` and runs [`proxy`] between it and `tcp`; what `tcp`
/// already holds goes out with the OPEN ([`Mux::open_reading`]). `Err` when no stream could be
/// opened (the caller resets `tcp`).
pub async fn open_and_proxy(
    mux: &Mux,
    tunnel: [u8; 16],
    peer: String,
    mut tcp: TcpStream,
    traffic: &Traffic,
) -> Result<ProxyEnd, (MuxError, TcpStream)> {
    let (stream, first) = match mux.open_reading(tunnel, peer, &mut tcp, FIRST_READ).await {
        Ok(x) => x,
        Err(e) => return Err((e, tcp)),
    };
    match first {
        Ok(n) => {
            traffic
                .socket_to_stream
                .fetch_add(n as u64, Ordering::Relaxed);
            Ok(proxy(tcp, stream, traffic).await)
        }
        Err(_) => {
            stream.reset(ErrorCode::StreamAborted);
            crate::abort_tcp(tcp);
            Ok(ProxyEnd::SocketError)
        }
    }
}

/// Proxies until both directions end or either side fails, counting bytes into `traffic` as
/// they pass. The stream's reset, or the close of its connection (for whatever reason, the
/// cancellation of the mux's token included), ends it whatever it is waiting on.
pub async fn proxy(tcp: TcpStream, mut stream: MuxStream, traffic: &Traffic) -> ProxyEnd {
    // The read half is this task's alone, so reads go through `poll_read`, which takes a short
    // read as proof that the socket is drained (no extra `read` to learn it would block). The
    // write half is shared with the mux's reader for direct delivery.
    let (mut rd, wr) = tcp.into_split();
    let wr = Arc::new(wr);
    // Set once the socket's read side has ended (its peer's FIN): a FIN from the stream then
    // needs no `shutdown`, as the close right after sends the socket's FIN.
    let read_ended = AtomicBool::new(false);
    stream
        .rx
        .deliver_to(wr.clone(), traffic.stream_to_socket.clone());
    // Both directions are made inside the joining block: futures made outside and moved in
    // would take their room in the task twice (once captured, once joined), about 900 bytes
    // per connection. Both can wait on their sockets at once (a user who neither sends nor
    // reads), where a reset queued for the stream would go unseen: the abort signal ends them.
    let result = tokio::select! {
        // In order: no random pick on every wake-up.
        biased;
        r = async {
            tokio::try_join!(
                socket_to_stream(&mut rd, &stream.tx, &traffic.socket_to_stream, &read_ended),
                stream_to_socket(&wr, &mut stream.rx, &traffic.stream_to_socket, &read_ended),
            )
        } => r,
        () = stream.tx.aborted() => Err(Failure::Stream),
    };
    stream.rx.release_sock();
    let end = match result {
        Ok(_) => ProxyEnd::Clean,
        Err(Failure::Socket) => ProxyEnd::SocketError,
        Err(Failure::Stream) => ProxyEnd::StreamReset,
    };
    // The reader let go of its handle above, so this is the last one. Put back together, the
    // socket closes without the write half's shutdown-on-drop: a reset must not be preceded by
    // a FIN the peer could take for an orderly end.
    let tcp = Arc::try_unwrap(wr).ok().and_then(|wr| rd.reunite(wr).ok());
    if end != ProxyEnd::Clean {
        stream.reset(ErrorCode::StreamAborted);
        if let Some(tcp) = &tcp {
            // Closing with a zero linger resets.
            let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
        }
    }
    drop(tcp);
    end
}

/// Reads what `rd` holds into `buf` without waiting: `WouldBlock` when there is nothing. A
/// read that comes up short of `buf` tells tokio the socket is drained.
async fn read_now(rd: &mut OwnedReadHalf, buf: &mut [u8]) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut rb = ReadBuf::new(&mut *buf);
        match std::pin::Pin::new(&mut *rd).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Ready(Err(io::ErrorKind::WouldBlock.into())),
            Poll::Ready(r) => Poll::Ready(r.map(|()| rb.filled().len())),
        }
    })
    .await
}

async fn socket_to_stream(
    rd: &mut OwnedReadHalf,
    tx: &StreamTx,
    count: &AtomicU64,
    ended: &AtomicBool,
) -> Result<(), Failure> {
    let mut want = FIRST_READ;
    // Credit reserved and not yet used: kept from one read to the next (topped up to `want`
    // without waiting), so a message costs no release and new acquisition of credit.
    let mut credit = 0;
    loop {
        if credit < want {
            credit += tx.try_reserve(want - credit);
        }
        if credit == 0 {
            credit = tx.reserve(want).await.map_err(|_| Failure::Stream)?;
        }
        // The socket's own readiness slot, not `readable()`'s waiter list (a lock per wait).
        if std::future::poll_fn(|cx| rd.as_ref().poll_read_ready(cx))
            .await
            .is_err()
        {
            tx.give_back(credit);
            return Err(Failure::Socket);
        }
        // At most the credit reserved: the buffer may be larger.
        let room = credit.min(pool::BUF_LEN);
        // While the stream may write directly, up to one frame's worth goes straight from the
        // socket into the connection's next TLS write: no buffer, no copy, nothing to send
        // after. A bulk flow too: a read of a frame at a time into the batch costs less than
        // a read four times as large copied into it (the relay's thread is what limits eight
        // streams; docs/performance.md). Otherwise the read goes into a pool buffer, as large
        // as the credit allows.
        let direct_room = room.min(SHORT);
        let direct =
            std::future::poll_fn(|cx| Poll::Ready(tx.read_direct(rd, direct_room, cx))).await;
        let mut buf = None;
        let (asked, read) = match direct {
            Some(Poll::Ready(r)) => (direct_room, r),
            Some(Poll::Pending) => (direct_room, Err(io::ErrorKind::WouldBlock.into())),
            None => {
                let b = buf.insert(ReadBuffer::take());
                (room, read_now(rd, &mut b.space()[..room]).await)
            }
        };
        match read {
            Ok(0) => {
                ended.store(true, Ordering::Relaxed);
                tx.give_back(credit);
                tx.finish().await.map_err(|_| Failure::Stream)?;
                return Ok(());
            }
            Ok(n) => {
                credit -= n;
                count.fetch_add(n as u64, Ordering::Relaxed);
                // A read that filled its room may have left more behind: the next asks for
                // four times as much (the mux caps it); a short one sizes the next to fit.
                want = if n == asked {
                    room.saturating_mul(4).min(crate::mux::MAX_RESERVE)
                } else {
                    (n * 2).max(FIRST_READ)
                };
                // Read into a buffer: a short read is copied out (into the TLS batch when it
                // is written at once) and the buffer goes straight back, so queued data never
                // pins much more memory than it carries.
                if let Some(mut buf) = buf {
                    let sent = if n < SHORT {
                        tx.send_reserved_slice(&buf.space()[..n]).await
                    } else {
                        tx.send_reserved(buf.freeze(n)).await
                    };
                    sent.map_err(|_| Failure::Stream)?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => {
                tx.give_back(credit);
                return Err(Failure::Socket);
            }
        }
    }
}

async fn stream_to_socket(
    tcp: &OwnedWriteHalf,
    rx: &mut StreamRx,
    count: &AtomicU64,
    read_ended: &AtomicBool,
) -> Result<(), Failure> {
    let mut batch: VecDeque<Bytes> = VecDeque::new();
    loop {
        // Everything already queued (up to GATHER bytes) goes out in one vectored write.
        let mut end = None;
        let mut item = rx.recv().await;
        let mut total = 0;
        loop {
            match item {
                Some(Inbound::Data(data)) => {
                    total += data.len();
                    batch.push_back(data);
                }
                other => {
                    end = Some(other);
                    break;
                }
            }
            if total >= GATHER {
                break;
            }
            match rx.try_recv() {
                Some(next) => item = Some(next),
                None => break,
            }
        }
        write_all(tcp, &mut batch).await?;
        if total > 0 {
            count.fetch_add(total as u64, Ordering::Relaxed);
            rx.consumed(total);
        }
        if end.is_none() {
            rx.idle();
        }
        match end {
            None => {}
            Some(Some(Inbound::Fin)) => {
                // With the read side ended, both directions are done and the proxy closes the
                // socket next: its close sends the FIN (nothing unread is left to turn it into
                // a reset), one system call fewer per connection.
                if !read_ended.load(Ordering::Relaxed) {
                    let _ =
                        socket2::SockRef::from(tcp.as_ref()).shutdown(std::net::Shutdown::Write);
                }
                return Ok(());
            }
            Some(_) => return Err(Failure::Stream),
        }
    }
}

/// Bytes asked of a socket by the first read, and after a read that came up short of half of
/// this: small messages cost a small allocation, while a bulk flow grows its reads fourfold per
/// full read up to the mux's reservation limit.
const FIRST_READ: usize = 4 * 1024;

/// One DATA frame's payload: the most a read puts straight into the connection's TLS batch,
/// and the longest buffered read that is copied out of its buffer (a longer one is sent in
/// it).
const SHORT: usize = tube_proto::frame::MAX_DATA_PAYLOAD as usize;

// A copied-out read leaves at most a quarter of its pool buffer unused while it waits: queued
// data never pins much more memory than it carries.
const _: () = assert!(SHORT * 4 <= pool::BUF_LEN);

/// Bytes gathered from a stream's queue for one write to its socket.
const GATHER: usize = 256 * 1024;

/// Writes all of `bufs` to `tcp`, emptying it.
async fn write_all(tcp: &OwnedWriteHalf, bufs: &mut VecDeque<Bytes>) -> Result<(), Failure> {
    while !bufs.is_empty() {
        std::future::poll_fn(|cx| tcp.as_ref().poll_write_ready(cx))
            .await
            .map_err(|_| Failure::Socket)?;
        let written = crate::mux::try_write_bufs(tcp, bufs);
        match written {
            Ok(n) => crate::mux::advance(bufs, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(Failure::Socket),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::handshake_conn;
    use crate::mux::{Mux, MuxConfig, MuxEvents, Role};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    /// Byte `i` of the test pattern (position-dependent, so a reorder or a loss shows).
    fn byte(i: usize) -> u8 {
        ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
    }

    /// Two muxes over an in-memory pipe (the acceptor's closing when `acceptor_token` is
    /// cancelled), and a stream opened across them: the opener's end and the acceptor's.
    async fn stream_pair(
        acceptor_token: CancellationToken,
    ) -> (MuxStream, MuxStream, (Mux, Mux, TaskTracker)) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let tracker = TaskTracker::new();
        let cfg = MuxConfig::default();
        let (opener, _) = Mux::start(
            handshake_conn(a),
            Role::Opener,
            cfg.clone(),
            CancellationToken::new(),
            &tracker,
        );
        let (acceptor, MuxEvents { mut incoming, .. }) = Mux::start(
            handshake_conn(b),
            Role::Acceptor,
            cfg,
            acceptor_token,
            &tracker,
        );
        let stream = opener.open([0; 16], "test".into()).await.unwrap();
        let inc = incoming.recv().await.expect("the stream arrives");
        (stream, inc.stream, (opener, acceptor, tracker))
    }

    /// A stream across two muxes whose acceptor's end is proxied to a real TCP connection
    /// whose server side has a small send buffer (so writes to it come up short). Returns the
    /// opener's stream, the client socket, the proxy task and the proxy's counters.
    async fn proxied() -> (
        MuxStream,
        TcpStream,
        tokio::task::JoinHandle<ProxyEnd>,
        Arc<Traffic>,
        (Mux, Mux, TaskTracker),
    ) {
        let (stream, accepted, keep) = stream_pair(CancellationToken::new()).await;
        let (client, server) = crate::test_util::tight_tcp_pair(false).await;
        let traffic = Arc::new(Traffic::default());
        let t = traffic.clone();
        let task = tokio::spawn(async move { proxy(server, accepted, &t).await });
        (stream, client, task, traffic, keep)
    }

    /// Sends `total` pattern bytes from `start` on `stream` in chunks of varying size.
    async fn send_pattern(stream: &MuxStream, start: usize, total: usize) {
        let mut off = start;
        while off < start + total {
            let n = (start + total - off).min(1 + (off * 7919) % 70_000);
            let chunk: Vec<u8> = (off..off + n).map(byte).collect();
            stream.tx.send(Bytes::from(chunk)).await.unwrap();
            off += n;
        }
    }

    /// Reads `total` bytes from `sock` and checks each against the pattern from `start`,
    /// yielding after every read so the reader stays slower than the sender.
    async fn expect_pattern(sock: &mut TcpStream, start: usize, total: usize) {
        let mut buf = vec![0u8; 3000];
        let mut at = start;
        while at < start + total {
            let want = (start + total - at).min(buf.len());
            let n = sock.read(&mut buf[..want]).await.unwrap();
            assert!(n > 0, "end of stream at byte {at}");
            for (k, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, byte(at + k), "byte {} differs", at + k);
            }
            at += n;
            tokio::task::yield_now().await;
        }
    }

    /// How the next read from `sock` ends (bounded by 10 s): `Ok(0)` for an orderly end.
    async fn socket_end(sock: &mut TcpStream) -> Result<usize, io::ErrorKind> {
        let mut buf = [0u8; 16];
        crate::timer::timeout(std::time::Duration::from_secs(10), sock.read(&mut buf))
            .await
            .expect("the socket ends within 10 s")
            .map_err(|e| e.kind())
    }

    #[tokio::test]
    async fn small_messages_and_a_bulk_flow_to_a_slow_socket_arrive_in_order_and_counted() {
        let (mut stream, mut client, task, traffic, _keep) = proxied().await;
        // Small messages, each read before the next is sent: the reader's direct path.
        let mut at = 0;
        for n in [1usize, 64, 700, 64, 5000, 3, 32 * 1024, 64] {
            send_pattern(&stream, at, n).await;
            expect_pattern(&mut client, at, n).await;
            at += n;
        }
        // A bulk flow to a reader slower than the sender: the socket fills, direct writes
        // come up short and the rest queues behind them.
        let bulk = 8 << 20;
        let sender = async {
            send_pattern(&stream, at, bulk).await;
            stream.tx.finish().await.unwrap();
        };
        tokio::join!(sender, expect_pattern(&mut client, at, bulk));
        at += bulk;
        let mut rest = Vec::new();
        client.shutdown().await.unwrap();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{} bytes after the end", rest.len());
        assert!(matches!(stream.rx.recv().await, Some(Inbound::Fin)));
        assert_eq!(task.await.unwrap(), ProxyEnd::Clean);
        let (_, to_socket) = traffic.get();
        assert_eq!(to_socket, at as u64, "every byte counted once");
    }

    #[tokio::test]
    async fn a_fin_after_the_users_own_end_still_reaches_the_user_as_an_orderly_end() {
        let (mut stream, mut client, task, _traffic, _keep) = proxied().await;
        // The user ends its side first; the stream reads its end before anything comes back.
        client.shutdown().await.unwrap();
        assert!(matches!(stream.rx.recv().await, Some(Inbound::Fin)));
        // Then the other side's reply and end: every byte, then end of stream, no reset.
        send_pattern(&stream, 0, 5000).await;
        stream.tx.finish().await.unwrap();
        expect_pattern(&mut client, 0, 5000).await;
        assert_eq!(
            socket_end(&mut client).await,
            Ok(0),
            "an orderly end, not a reset"
        );
        assert_eq!(task.await.unwrap(), ProxyEnd::Clean);
    }

    #[tokio::test]
    async fn a_reset_stream_resets_the_socket_rather_than_ending_it() {
        let (stream, mut client, task, _traffic, _keep) = proxied().await;
        send_pattern(&stream, 0, 100).await;
        expect_pattern(&mut client, 0, 100).await;
        stream.reset(ErrorCode::StreamAborted);
        assert_eq!(task.await.unwrap(), ProxyEnd::StreamReset);
        assert_eq!(
            socket_end(&mut client).await,
            Err(io::ErrorKind::ConnectionReset),
            "the client must see a reset, not an orderly end"
        );
    }

    #[tokio::test]
    async fn the_connection_closing_ends_a_proxy_whose_user_neither_reads_nor_sends() {
        let acceptor_token = CancellationToken::new();
        let (stream, accepted, _keep) = stream_pair(acceptor_token.clone()).await;
        let (_client, server) = crate::test_util::tight_tcp_pair(true).await;
        // The user reads nothing: fill the socket until the kernel takes no more, so the
        // proxy's writes to it wait, while its reads wait on a user who sends nothing.
        server.writable().await.unwrap();
        let filler = [0u8; 16 * 1024];
        loop {
            match server.try_write(&filler) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("filling the socket: {e}"),
            }
        }
        let traffic = Arc::new(Traffic::default());
        let t = traffic.clone();
        let holds = accepted.rx.consumer_holds_all();
        let task = tokio::spawn(async move { proxy(server, accepted, &t).await });
        send_pattern(&stream, 0, 1000).await;
        // The test runs on one thread: once the proxy holds the bytes, it has yielded, which it
        // does only in its socket waits (the write to the full socket, the read).
        crate::timer::timeout(std::time::Duration::from_secs(10), async {
            while !holds() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the proxy takes the bytes within 10 s");
        // The acceptor's token is cancelled: its mux closes and the proxy must end, though
        // neither of its sockets' waits will ever be woken.
        acceptor_token.cancel();
        let end = crate::timer::timeout(std::time::Duration::from_secs(10), task)
            .await
            .expect("the proxy ends within 10 s")
            .unwrap();
        assert_eq!(end, ProxyEnd::StreamReset);
    }
}
