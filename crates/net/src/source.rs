//! Where the mux's reader gets its bytes: runs of plaintext that stay where they lie until the
//! next fill, so the DATA payloads in them can be written to users' sockets from there (see
//! [`tube_proto::frame_parser`]). Over TLS a run is one record, opened in place in the receive
//! buffer ([`crate::secure::SecureReader`]); over a plain transport (tests, benchmarks) it is
//! what one read brought ([`PlainRuns`]).

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// A transport's receiving half as runs of plaintext.
pub trait Runs: Send + Unpin + 'static {
    /// Plaintext received before the first run (with a TLS handshake).
    fn take_early(&mut self) -> Vec<u8> {
        Vec::new()
    }

    /// The next run already received, as a range of [`Runs::buffer`]; the one before is let
    /// go. `None`: nothing more until [`Runs::poll_fill`].
    fn next_run(&mut self) -> io::Result<Option<Range<usize>>>;

    /// What the ranges refer to. Every run handed out since the last fill is still there.
    fn buffer(&self) -> &[u8];

    /// Receives more, which may overwrite or move every run handed out. `Ok(false)`: the peer
    /// ended the stream cleanly.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>>;
}

impl<R: AsyncRead + Unpin + Send + 'static> Runs for crate::secure::SecureReader<R> {
    fn take_early(&mut self) -> Vec<u8> {
        crate::secure::SecureReader::take_early(self)
    }

    fn next_run(&mut self) -> io::Result<Option<Range<usize>>> {
        crate::secure::SecureReader::next_run(self)
    }

    fn buffer(&self) -> &[u8] {
        crate::secure::SecureReader::buffer(self)
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        crate::secure::SecureReader::poll_fill(self, cx)
    }
}

/// A plain transport's reads as runs, through a buffer of [`PLAIN_BUF`] bytes taken at the
/// first read.
pub struct PlainRuns<R> {
    io: R,
    buf: Vec<u8>,
    /// Bytes the last read brought, and whether they were handed out.
    filled: usize,
    handed: bool,
}

/// The buffer of a [`PlainRuns`].
pub const PLAIN_BUF: usize = 64 * 1024;

impl<R> PlainRuns<R> {
    /// Reads from `io`.
    pub fn new(io: R) -> Self {
        Self {
            io,
            buf: Vec::new(),
            filled: 0,
            handed: false,
        }
    }
}

impl<R: AsyncRead + Unpin + Send + 'static> Runs for PlainRuns<R> {
    fn next_run(&mut self) -> io::Result<Option<Range<usize>>> {
        if self.handed || self.filled == 0 {
            return Ok(None);
        }
        self.handed = true;
        Ok(Some(0..self.filled))
    }

    fn buffer(&self) -> &[u8] {
        &self.buf
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.filled > 0 && !self.handed {
            return Poll::Ready(Ok(true));
        }
        if self.buf.is_empty() {
            self.buf = vec![0; PLAIN_BUF];
        }
        self.filled = 0;
        self.handed = false;
        let mut rb = ReadBuf::new(&mut self.buf);
        std::task::ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        self.filled = rb.filled().len();
        Poll::Ready(Ok(self.filled > 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn fill<R: Runs>(r: &mut R) -> io::Result<bool> {
        std::future::poll_fn(|cx| r.poll_fill(cx)).await
    }

    #[tokio::test]
    async fn plain_runs_hand_out_each_read_once_and_end_with_the_stream() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut runs = PlainRuns::new(b);
        assert!(runs.next_run().unwrap().is_none(), "a run before any read");
        a.write_all(b"abc").await.unwrap();
        assert!(fill(&mut runs).await.unwrap());
        let run = runs.next_run().unwrap().unwrap();
        assert_eq!(&runs.buffer()[run], b"abc");
        assert!(runs.next_run().unwrap().is_none(), "the same run twice");
        a.write_all(b"de").await.unwrap();
        drop(a);
        assert!(fill(&mut runs).await.unwrap());
        let run = runs.next_run().unwrap().unwrap();
        assert_eq!(&runs.buffer()[run], b"de");
        assert!(!fill(&mut runs).await.unwrap(), "the end of the stream");
    }
}
