//! Credit-based flow control for one direction of one multiplexed stream.
//!
//! The receiver grants the sender a window of bytes; the sender never has more than that in
//! flight. The receiver hands credit back (a WINDOW frame) only after the bytes have left its
//! buffer, so a reader that stops reading stops its own stream and nothing else, and the
//! receiver's buffer for the stream never exceeds the window.
//!
//! The window may grow while a stream runs ([`RecvWindow::grow`], [`tuned_window`]): a stream
//! that hands back half its window in less than two round trips is held back by the window
//! rather than by its reader, so its window doubles, up to a maximum the caller sets.

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

    /// The window: most bytes this stream may hold.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Grows the window to `to` and grants the peer the difference at once (returned: the
    /// caller adds it to the WINDOW frame it sends now). A smaller `to` changes nothing.
    pub fn grow(&mut self, to: u32) -> u32 {
        let extra = to.saturating_sub(self.window);
        self.window += extra;
        self.peer_credit = self.peer_credit.saturating_add(extra);
        extra
    }
}

/// The window a stream should have: double `window` (at most `max`) when half of it was handed
/// back in less than two round trips (`since_last_update` < 2 × `rtt`), since then the sender
/// ran out of credit before an update could reach it; `window` otherwise.
pub fn tuned_window(
    window: u32,
    since_last_update: std::time::Duration,
    rtt: std::time::Duration,
    max: u32,
) -> u32 {
    if since_last_update < rtt.saturating_mul(2) {
        window.saturating_mul(2).min(max).max(window)
    } else {
        window
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
    fn a_grown_window_grants_the_difference_and_accepts_that_much_more() {
        let mut w = RecvWindow::new(100);
        w.on_data(100).unwrap();
        assert_eq!(w.on_consumed(50), Some(50));
        assert_eq!(w.grow(200), 100);
        assert_eq!(w.window(), 200);
        assert_eq!(w.peer_credit(), 150);
        assert!(w.on_data(150).is_ok());
        assert!(w.on_data(1).is_err());
        // Updates now come at half the grown window.
        assert_eq!(w.on_consumed(99), None);
        assert_eq!(w.on_consumed(1), Some(100));
        // Shrinking is not growing.
        assert_eq!(w.grow(50), 0);
        assert_eq!(w.window(), 200);
    }

    #[test]
    fn a_window_doubles_only_when_half_of_it_came_back_within_two_round_trips() {
        use std::time::Duration;
        let ms = Duration::from_millis;
        assert_eq!(tuned_window(100, ms(19), ms(10), 1000), 200);
        assert_eq!(tuned_window(100, ms(20), ms(10), 1000), 100);
        assert_eq!(tuned_window(600, ms(1), ms(10), 1000), 1000);
        assert_eq!(tuned_window(1000, ms(1), ms(10), 1000), 1000);
        // A maximum below the window never shrinks it.
        assert_eq!(tuned_window(1000, ms(1), ms(10), 500), 1000);
        assert_eq!(tuned_window(u32::MAX, ms(1), ms(10), u32::MAX), u32::MAX);
    }

    #[test]
    fn buffered_bytes_never_exceed_the_window() {
        // Whatever order data, consumption and growth come in, bytes held = received -
        // consumed stays within the window as long as on_data succeeds.
        let mut w = RecvWindow::new(64);
        let (mut held, mut step) = (0usize, 0u32);
        for i in 0..10_000u32 {
            step = step.wrapping_mul(1_103_515_245).wrapping_add(12_345 + i);
            if step % 997 == 0 && w.window() < 4096 {
                let before = w.window();
                assert_eq!(w.grow(before * 2), before);
            } else if step % 3 == 0 && held > 0 {
                let n = (step as usize % held) + 1;
                held -= n;
                w.on_consumed(n);
            } else {
                let n = (step as usize % 40) + 1;
                if w.on_data(n).is_ok() {
                    held += n;
                }
            }
            assert!(held <= w.window() as usize);
        }
        assert!(w.window() > 64, "the run grew the window");
    }
}
