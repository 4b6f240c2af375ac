//! Moves bytes between a TCP socket and a mux stream, in both directions at once.
//!
//! Reading from the socket waits for send credit first, so a stream whose peer stops reading
//! stops reading its socket (TCP backpressure) instead of buffering. Idle streams hold no
//! buffer: one is allocated only when the socket is readable, and handed to the writer as the
//! frame payload. A FIN in either direction becomes a half-close on the other side; a reset or
//! socket error aborts both sides (the TCP peer sees RST, the mux peer a RESET frame).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tube_proto::control::ErrorCode;

use crate::mux::{Inbound, MuxStream, StreamRx, StreamTx};

/// How a proxied connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyEnd {
    /// Both directions finished with an orderly close.
    Clean,
    /// The TCP side failed (reset, error); the stream was reset.
    SocketError,
    /// The mux side reset the stream or the connection closed; the socket was reset.
    StreamReset,
    /// `cancel` fired; both sides were aborted.
    Cancelled,
}

/// Byte counters, updated live while data flows (shared by all connections of a tunnel).
#[derive(Debug, Default)]
pub struct Traffic {
    /// Bytes read from sockets and sent on streams.
    pub socket_to_stream: AtomicU64,
    /// Bytes received on streams and written to sockets.
    pub stream_to_socket: AtomicU64,
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

/// Proxies until both directions end, either side fails, or `cancel` fires, counting bytes
/// into `traffic` as they pass.
pub async fn proxy(
    tcp: TcpStream,
    mut stream: MuxStream,
    cancel: &CancellationToken,
    traffic: &Traffic,
) -> ProxyEnd {
    let result = {
        let up = socket_to_stream(&tcp, &stream.tx, &traffic.socket_to_stream);
        let down = stream_to_socket(&tcp, &mut stream.rx, &traffic.stream_to_socket);
        tokio::select! {
            r = async { tokio::try_join!(up, down) } => Some(r),
            _ = cancel.cancelled() => None,
        }
    };
    let end = match result {
        Some(Ok(_)) => ProxyEnd::Clean,
        Some(Err(Failure::Socket)) => ProxyEnd::SocketError,
        Some(Err(Failure::Stream)) => ProxyEnd::StreamReset,
        None => ProxyEnd::Cancelled,
    };
    if end != ProxyEnd::Clean {
        stream.reset(ErrorCode::StreamAborted);
        crate::abort_tcp(tcp);
    }
    end
}

async fn socket_to_stream(
    tcp: &TcpStream,
    tx: &StreamTx,
    count: &AtomicU64,
) -> Result<(), Failure> {
    loop {
        let credit = tx.reserve(usize::MAX).await.map_err(|_| Failure::Stream)?;
        if tcp.readable().await.is_err() {
            tx.give_back(credit);
            return Err(Failure::Socket);
        }
        let mut buf = BytesMut::with_capacity(credit);
        match tcp.try_read_buf(&mut buf) {
            Ok(0) => {
                tx.give_back(credit);
                tx.finish().await.map_err(|_| Failure::Stream)?;
                return Ok(());
            }
            Ok(n) => {
                tx.give_back(credit - n);
                count.fetch_add(n as u64, Ordering::Relaxed);
                // A short read gets a buffer of its own size, so queued data never pins much
                // more memory than it carries.
                let data = if n < credit / 4 {
                    Bytes::copy_from_slice(&buf)
                } else {
                    buf.freeze()
                };
                tx.send_reserved(data).await.map_err(|_| Failure::Stream)?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => tx.give_back(credit),
            Err(_) => {
                tx.give_back(credit);
                return Err(Failure::Socket);
            }
        }
    }
}

async fn stream_to_socket(
    tcp: &TcpStream,
    rx: &mut StreamRx,
    count: &AtomicU64,
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
        match end {
            None => {}
            Some(Some(Inbound::Fin)) => {
                let _ = socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write);
                return Ok(());
            }
            Some(_) => return Err(Failure::Stream),
        }
    }
}

/// Bytes gathered from a stream's queue for one write to its socket.
const GATHER: usize = 256 * 1024;

/// Most buffers handed to one vectored write.
const MAX_IOV: usize = 64;

/// Writes all of `bufs` to `tcp`, emptying it.
async fn write_all(tcp: &TcpStream, bufs: &mut VecDeque<Bytes>) -> Result<(), Failure> {
    while !bufs.is_empty() {
        tcp.writable().await.map_err(|_| Failure::Socket)?;
        let written = {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let n = bufs.len().min(MAX_IOV);
            for (slot, b) in iov.iter_mut().zip(bufs.iter()) {
                *slot = IoSlice::new(b);
            }
            tcp.try_write_vectored(&iov[..n])
        };
        let mut n = match written {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(Failure::Socket),
        };
        while n > 0 {
            let Some(front) = bufs.front_mut() else {
                break;
            };
            if front.len() > n {
                front.advance(n);
                break;
            }
            n -= front.len();
            bufs.pop_front();
        }
    }
    Ok(())
}
