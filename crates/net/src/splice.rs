//! Forwarding between two TCP sockets, both ways with half-close, for hops that carry bytes
//! they do not read (chain nodes, `tube chain listen` / `accept`). On Linux the bytes go
//! through a kernel pipe with splice(2): socket to pipe, pipe to socket, never copied into
//! user space. Elsewhere, or when no pipe can be made (out of descriptors), through one
//! buffer per direction.
//!
//! Each direction moves what its source holds, then writes all of it before reading again, so
//! at most one pipe (64 KiB) or one buffer ([`BUF`]) per direction is in flight. An end of
//! stream read on one side becomes a write shutdown on the other once everything before it is
//! written; the copy ends when both directions have ended, or at the first error (the caller
//! decides how to close: a reset, usually).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per read when buffering (no pipe).
pub const BUF: usize = 64 * 1024;

/// What a copy reports while it runs.
#[derive(Debug, Clone, Copy)]
pub struct Counters<'a> {
    /// Bytes read from `a` (and written to `b`), added as they are read.
    pub a_to_b: &'a AtomicU64,
    /// Bytes read from `b` (and written to `a`).
    pub b_to_a: &'a AtomicU64,
    /// Set once an end of stream has been read on either side.
    pub eof: &'a AtomicBool,
}

/// Copies both ways between `a` and `b` until both directions have ended (see the module
/// docs); the first error ends both.
pub async fn copy_bidirectional(
    a: &TcpStream,
    b: &TcpStream,
    counters: Counters<'_>,
) -> io::Result<()> {
    copy_with(a, b, counters, Stage::new).await
}

async fn copy_with(
    a: &TcpStream,
    b: &TcpStream,
    counters: Counters<'_>,
    stage: fn() -> Stage,
) -> io::Result<()> {
    let ab = one_way(a, b, counters.a_to_b, counters.eof, stage());
    let ba = one_way(b, a, counters.b_to_a, counters.eof, stage());
    tokio::try_join!(ab, ba)?;
    Ok(())
}

/// Where one direction's bytes wait between their read and their write.
enum Stage {
    /// A pipe (read end, write end) and the bytes in it.
    #[cfg(target_os = "linux")]
    Pipe(std::os::fd::OwnedFd, std::os::fd::OwnedFd, usize),
    /// A buffer and the range of it not yet written.
    Buf(Vec<u8>, usize, usize),
}

impl Stage {
    #[cfg(target_os = "linux")]
    fn new() -> Stage {
        use rustix::pipe::{PipeFlags, pipe_with};
        match pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK) {
            Ok((r, w)) => Stage::Pipe(r, w, 0),
            Err(_) => Stage::buffered(),
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn new() -> Stage {
        Stage::buffered()
    }

    fn buffered() -> Stage {
        Stage::Buf(Vec::new(), 0, 0)
    }

    fn is_empty(&self) -> bool {
        match self {
            #[cfg(target_os = "linux")]
            Stage::Pipe(_, _, n) => *n == 0,
            Stage::Buf(_, start, end) => start == end,
        }
    }

    /// Moves what `src` holds into the stage (which is empty): the count, 0 at end of stream,
    /// `WouldBlock` if `src` holds nothing.
    fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        match self {
            #[cfg(target_os = "linux")]
            Stage::Pipe(_, w, n) => {
                use rustix::pipe::{SpliceFlags, splice};
                // The pipe is empty, so WouldBlock can only mean the socket is.
                let moved = splice(
                    src,
                    None,
                    &*w,
                    None,
                    PIPE,
                    SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
                )?;
                *n = moved;
                Ok(moved)
            }
            Stage::Buf(buf, start, end) => {
                if buf.is_empty() {
                    buf.resize(BUF, 0);
                }
                let moved = src.try_read(buf)?;
                (*start, *end) = (0, moved);
                Ok(moved)
            }
        }
    }

    /// Writes what the stage holds into `dst`, as much as it takes now: `WouldBlock` if it
    /// takes nothing.
    fn drain(&mut self, dst: &TcpStream) -> io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            Stage::Pipe(r, _, n) => {
                use rustix::pipe::{SpliceFlags, splice};
                let moved = splice(
                    &*r,
                    None,
                    dst,
                    None,
                    *n,
                    SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
                )?;
                if moved == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                *n -= moved;
                Ok(())
            }
            Stage::Buf(buf, start, end) => {
                let moved = dst.try_write(&buf[*start..*end])?;
                if moved == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                *start += moved;
                Ok(())
            }
        }
    }
}

/// Most bytes one splice moves into the pipe: its default capacity.
#[cfg(target_os = "linux")]
const PIPE: usize = 64 * 1024;

async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    count: &AtomicU64,
    eof: &AtomicBool,
    mut stage: Stage,
) -> io::Result<()> {
    loop {
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || stage.fill(src)) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            eof.store(true, Ordering::SeqCst);
            return socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write);
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        while !stage.is_empty() {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || stage.drain(dst)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Two connected sockets: (the one we keep, the one handed to the copy).
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ seed)
            .collect::<Vec<u8>>()
    }

    /// Sends `up` from the a end and `down` from the b end at once through a copy (through
    /// pipes, or `buffered`), half-closing each after its bytes; returns what each end read,
    /// the counts and the end-of-stream flag.
    async fn run(up: &[u8], down: &[u8], buffered: bool) -> (Vec<u8>, Vec<u8>, u64, u64, bool) {
        let (mut user, a) = tcp_pair().await;
        let (mut service, b) = tcp_pair().await;
        let (ab, ba, eof) = (AtomicU64::new(0), AtomicU64::new(0), AtomicBool::new(false));
        let counters = Counters {
            a_to_b: &ab,
            b_to_a: &ba,
            eof: &eof,
        };
        let stage = if buffered {
            Stage::buffered
        } else {
            Stage::new
        };
        let copy = copy_with(&a, &b, counters, stage);
        let (mut ur, mut uw) = user.split();
        let (mut sr, mut sw) = service.split();
        let ends = async {
            let mut got_user = Vec::new();
            let mut got_service = Vec::new();
            tokio::try_join!(
                async {
                    uw.write_all(up).await?;
                    uw.shutdown().await
                },
                async {
                    sw.write_all(down).await?;
                    sw.shutdown().await
                },
                ur.read_to_end(&mut got_user),
                sr.read_to_end(&mut got_service),
            )?;
            io::Result::Ok((got_user, got_service))
        };
        let (copied, ended) = tokio::join!(copy, ends);
        copied.unwrap();
        let (got_user, got_service) = ended.unwrap();
        (
            got_user,
            got_service,
            ab.load(Ordering::Relaxed),
            ba.load(Ordering::Relaxed),
            eof.load(Ordering::Relaxed),
        )
    }

    #[tokio::test]
    async fn both_directions_arrive_whole_and_counted_with_half_close() {
        #[cfg(target_os = "linux")]
        assert!(matches!(Stage::new(), Stage::Pipe(..)), "Linux splices");
        for buffered in [false, true] {
            let up = pattern(3 * 1024 * 1024 + 17, 1);
            let down = pattern(1024 * 1024 + 5, 2);
            let (at_user, at_service, ab, ba, eof) = run(&up, &down, buffered).await;
            assert!(at_service == up, "buffered {buffered}: a to b differs");
            assert!(at_user == down, "buffered {buffered}: b to a differs");
            assert_eq!((ab, ba), (up.len() as u64, down.len() as u64));
            assert!(eof);
        }
    }

    #[tokio::test]
    async fn one_direction_keeps_flowing_after_the_other_ended() {
        for buffered in [false, true] {
            let down = pattern(2 * 1024 * 1024, 3);
            let (at_user, at_service, ab, ba, _) = run(&[], &down, buffered).await;
            assert!(at_service.is_empty());
            assert!(at_user == down, "buffered {buffered}");
            assert_eq!((ab, ba), (0, down.len() as u64));
        }
    }

    #[tokio::test]
    async fn a_reset_on_one_side_is_an_error() {
        let (user, a) = tcp_pair().await;
        let (_service, b) = tcp_pair().await;
        let (ab, ba, eof) = (AtomicU64::new(0), AtomicU64::new(0), AtomicBool::new(false));
        let counters = Counters {
            a_to_b: &ab,
            b_to_a: &ba,
            eof: &eof,
        };
        crate::abort_tcp(user);
        assert!(copy_bidirectional(&a, &b, counters).await.is_err());
    }
}
