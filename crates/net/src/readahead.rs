//! A read-ahead buffer beneath TLS.
//!
//! rustls asks its transport for at most 4 KiB per read, so a 16 KiB record costs four or more
//! `read` system calls. [`ReadAhead`] reads up to [`READ_AHEAD`] bytes per call instead and
//! hands them out from memory. The buffer exists only while it holds bytes of a burst: when it
//! drains after a short read (the peer is not streaming), or a read finds nothing to read, it
//! is released, so idle and pre-authentication connections hold none. It is never zeroed:
//! the socket reads into its spare capacity. Writes pass straight through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;

/// Bytes asked of the socket per read.
pub const READ_AHEAD: usize = 64 * 1024;

/// A transport whose reads are buffered [`READ_AHEAD`] bytes at a time.
#[derive(Debug)]
pub struct ReadAhead<T> {
    io: T,
    /// The unread bytes of the last read; no allocation while released.
    buf: BytesMut,
    /// Whether the last read from `io` filled at least a quarter of the buffer.
    streaming: bool,
}

impl<T> ReadAhead<T> {
    /// Wraps `io`; no buffer is allocated until the first read.
    pub fn new(io: T) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            streaming: false,
        }
    }

    /// The transport.
    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            if dst.remaining() >= READ_AHEAD {
                return Pin::new(&mut this.io).poll_read(cx, dst);
            }
            // Reuses the drained allocation while streaming (nothing else holds it).
            this.buf.reserve(READ_AHEAD);
            let n = match poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
                Poll::Ready(Ok(n)) => n,
                other => {
                    this.buf = BytesMut::new();
                    return other.map_ok(|_| ());
                }
            };
            this.streaming = n >= READ_AHEAD / 4;
        }
        let n = this.buf.len().min(dst.remaining());
        dst.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        if this.buf.is_empty() && !this.streaming {
            this.buf = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_see_every_byte_in_order_and_writes_pass_through() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut r = ReadAhead::new(a);
        let mut w = b;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                w.write_all(&data).await.expect("write");
                let mut back = [0u8; 5];
                w.read_exact(&mut back).await.expect("read back");
                back
            })
        };
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while got.len() < data.len() {
            let n = r.read(&mut chunk).await.expect("read");
            assert!(n > 0, "early end of stream");
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
        r.write_all(b"hello").await.expect("write through");
        assert_eq!(&writer.await.expect("join"), b"hello");
    }

    #[tokio::test]
    async fn a_drained_buffer_after_a_short_read_is_released() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut r = ReadAhead::new(a);
        b.write_all(b"tiny").await.expect("write");
        let mut chunk = [0u8; 4];
        r.read_exact(&mut chunk).await.expect("read");
        assert_eq!(&chunk, b"tiny");
        assert_eq!(r.buf.capacity(), 0, "an idle connection keeps no buffer");
        drop(b);
        assert_eq!(r.read(&mut chunk).await.expect("eof"), 0);
    }

    #[tokio::test]
    async fn a_read_that_finds_nothing_keeps_no_buffer_while_it_waits() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut r = ReadAhead::new(a);
        let mut chunk = [0u8; 4];
        let pending = std::future::poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut chunk);
            Poll::Ready(Pin::new(&mut r).poll_read(cx, &mut rb).is_pending())
        })
        .await;
        assert!(pending, "nothing was written, so the read must wait");
        assert_eq!(r.buf.capacity(), 0, "a waiting read holds no buffer");
        b.write_all(b"late").await.expect("write");
        r.read_exact(&mut chunk).await.expect("read");
        assert_eq!(&chunk, b"late");
    }
}
