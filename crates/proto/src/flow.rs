//! Credit-based flow control for one direction of one multiplexed stream.
//!
//! The receiver grants the sender a window of bytes; the sender never has more than that in
//! flight. The receiver hands credit back (a WINDOW frame) only after the bytes have left its
//! buffer, so a reader that stops reading stops its own stream and nothing else, and the
//! receiver's buffer for the stream never exceeds the window.

/// A stream sent more than its window: a protocol violation that ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("peer sent {got} bytes with only {allowed} bytes of credit")]
pub struct FlowError {
    /// Bytes that arrived.
    pub got: usize,
    /// Credit the peer had.
    pub allowed: u32,
}

/// The receiving side's accounting for one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvWindow {
    window: u32,
    /// Credit the peer still has (bytes it may send before the next update).
    peer_credit: u32,
    /// Bytes consumed by the application but not yet returned as credit.
    pending_update: u32,
}

impl RecvWindow {
    /// A window of `window` bytes, all of it granted to the peer at stream start.
    pub fn new(window: u32) -> Self {
        Self {
            window,
            peer_credit: window,
            pending_update: 0,
        }
    }

    /// Accounts for `len` bytes of DATA arriving; an error if the peer had no credit for them.
    pub fn on_data(&mut self, len: usize) -> Result<(), FlowError> {
        match u32::try_from(len) {
            Ok(n) if n <= self.peer_credit => {
                self.peer_credit -= n;
                Ok(())
            }
            _ => Err(FlowError {
                got: len,
                allowed: self.peer_credit,
            }),
        }
    }

    /// Accounts for `len` bytes leaving the buffer. Returns the increment to send in a WINDOW
    /// frame once at least half the window is waiting to be returned (fewer, larger updates).
    pub fn on_consumed(&mut self, len: usize) -> Option<u32> {
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        self.pending_update = self.pending_update.saturating_add(len);
        if self.pending_update >= self.window / 2 {
            let inc = self.pending_update;
            self.pending_update = 0;
            self.peer_credit = self.peer_credit.saturating_add(inc);
            Some(inc)
        } else {
            None
        }
    }

    /// Bytes the peer may still send right now.
    pub fn peer_credit(&self) -> u32 {
        self.peer_credit
    }
}

/// Largest credit a sender may hold; a WINDOW frame that would go past it is a protocol error.
pub const MAX_CREDIT: u64 = (1 << 31) - 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_within_window_is_accepted_and_excess_refused() {
        let mut w = RecvWindow::new(100);
        assert!(w.on_data(60).is_ok());
        assert!(w.on_data(40).is_ok());
        assert_eq!(w.on_data(1), Err(FlowError { got: 1, allowed: 0 }));
    }

    #[test]
    fn credit_returns_in_halves() {
        let mut w = RecvWindow::new(100);
        w.on_data(100).unwrap();
        assert_eq!(w.on_consumed(30), None);
        assert_eq!(w.on_consumed(20), Some(50));
        assert_eq!(w.peer_credit(), 50);
        assert!(w.on_data(50).is_ok());
        assert!(w.on_data(1).is_err());
    }

    #[test]
    fn buffered_bytes_never_exceed_the_window() {
        // Whatever order data and consumption come in, bytes held = received - consumed
        // stays within the window as long as on_data succeeds.
        let mut w = RecvWindow::new(64);
        let (mut held, mut step) = (0usize, 0u32);
        for i in 0..10_000u32 {
            step = step.wrapping_mul(1_103_515_245).wrapping_add(12_345 + i);
            if step % 3 == 0 && held > 0 {
                let n = (step as usize % held) + 1;
                held -= n;
                w.on_consumed(n);
            } else {
                let n = (step as usize % 40) + 1;
                if w.on_data(n).is_ok() {
                    held += n;
                }
            }
            assert!(held <= 64);
        }
    }
}
