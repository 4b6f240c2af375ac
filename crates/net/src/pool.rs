//! Read buffers shared by every stream of the process.
//!
//! A read that cannot go straight into the connection's TLS batch (another writer holds it, or
//! frames are queued ahead: `crate::proxy`) reads its socket into a buffer of [`BUF_LEN`]
//! bytes, and a long one travels on as the payload of its DATA frames ([`Bytes`] without a
//! copy) until the mux has sealed the last byte of it. Allocated per read, such buffers go
//! back to glibc, which returns the pages to the kernel between reads (its heap trim), and the
//! next read faults them in again page by page: 7 % of the relay's and agent's CPU time with
//! 8 streams (measured when every bulk read took a buffer). Here a buffer comes back to a free
//! list when the last [`Bytes`] made of it is dropped, and the next read takes it, pages
//! already in place. Idle streams hold none; the list keeps at most [`KEEP`] free buffers, so
//! the process holds at most `KEEP x BUF_LEN` (4 MiB) it is not using: with 8 bulk streams 8
//! kept buffers left 21,000 page faults per 2 GiB carried, 16 left 4,000 and 32 left 250
//! (71,000 with no pool).

use std::sync::Mutex;

use bytes::Bytes;

/// Bytes of one buffer: the most one read may take (the mux's reservation limit).
pub const BUF_LEN: usize = crate::mux::MAX_RESERVE;
/// Most free buffers kept.
pub const KEEP: usize = 32;

/// A free list of buffers.
struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

/// The process's pool, which [`ReadBuffer::take`] uses.
static POOL: Pool = Pool::new(KEEP);

impl Pool {
    const fn new(keep: usize) -> Self {
        Self {
            free: Mutex::new(Vec::new()),
            keep,
        }
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // The list holds plain buffers; a panic while it was locked cannot leave it
        // inconsistent.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&'static self) -> ReadBuffer {
        let buf = self.free().pop().unwrap_or_else(|| vec![0; BUF_LEN]);
        ReadBuffer { buf, pool: self }
    }
}

/// A buffer of [`BUF_LEN`] bytes from the free list (or new), returned to it when dropped
/// or, after [`ReadBuffer::freeze`], when the last [`Bytes`] of it is.
pub struct ReadBuffer {
    buf: Vec<u8>,
    pool: &'static Pool,
}

impl ReadBuffer {
    /// A buffer from the process's pool.
    pub fn take() -> Self {
        POOL.take()
    }

    /// The whole buffer, to read into.
    pub fn space(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// The first `len` bytes as [`Bytes`] that share this buffer.
    pub fn freeze(self, len: usize) -> Bytes {
        let len = len.min(BUF_LEN);
        Bytes::from_owner(Filled(self, len))
    }
}

impl Drop for ReadBuffer {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut free = self.pool.free();
        if free.len() < self.pool.keep {
            free.push(buf);
        }
    }
}

/// The bytes of a buffer a read filled, as the owner behind [`Bytes`].
struct Filled(ReadBuffer, usize);

impl AsRef<[u8]> for Filled {
    fn as_ref(&self) -> &[u8] {
        &self.0.buf[..self.1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_returns_when_its_last_bytes_are_dropped_and_the_list_stays_bounded() {
        static POOL: Pool = Pool::new(3);
        let mut b = POOL.take();
        b.space()[..5].copy_from_slice(b"hello");
        let ptr = b.space().as_ptr();
        let whole = b.freeze(5);
        let mut part = whole.slice(1..);
        assert_eq!(&whole[..], b"hello");
        drop(whole);
        assert_eq!(POOL.free().len(), 0, "a slice still holds the buffer");
        assert_eq!(&part.split_to(2)[..], b"el");
        drop(part);
        assert_eq!(POOL.free().len(), 1, "back once the last slice went");
        let mut again = POOL.take();
        assert_eq!(again.space().as_ptr(), ptr, "the next read reuses it");
        assert_eq!(again.space().len(), BUF_LEN);
        drop(again);
        let many: Vec<ReadBuffer> = (0..5).map(|_| POOL.take()).collect();
        drop(many);
        assert_eq!(POOL.free().len(), 3, "at most `keep` free buffers are kept");
    }
}
