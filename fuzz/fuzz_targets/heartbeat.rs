//! Heartbeat scheduling and liveness (`tube_proto::heartbeat::Liveness`), driven by a peer: the
//! input is an interval, a miss count and a sequence of events at arbitrary instants (even
//! going backwards, even near the end of representable time): something heard from the peer,
//! or a timer wake-up.
//!
//! - Nothing panics, whatever the durations (instants saturate).
//! - The interval is at least 1 ms; the deadline never moves backwards; once heard at `now`,
//!   the deadline is exactly the latest instant heard plus interval * misses (when
//!   representable), so the peer is not dead right after it was heard.
//! - `is_dead(now)` is `now >= deadline()`; `poll_timeout()` is never after the deadline, and
//!   no heartbeat is due before it.
//! - A heartbeat due at `now` is due once: polling again at the same instant sends nothing.

#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tube_proto::heartbeat::Liveness;

#[derive(Debug, Arbitrary)]
enum Op {
    /// Something arrived from the peer.
    Heard(At),
    /// The timer fired: send a heartbeat if one is due, check for death.
    Wake(At),
}

/// An instant relative to the start.
#[derive(Debug, Arbitrary)]
enum At {
    /// Milliseconds after the start (the common case).
    Millis(u32),
    /// Any duration after the start, if representable.
    Far(u64, u32),
}

#[derive(Debug, Arbitrary)]
struct Input {
    interval: (u64, u32),
    misses: u32,
    ops: Vec<Op>,
}

/// One start instant for the whole process, so a finding replays the same way.
fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn instant(at: &At) -> Option<Instant> {
    match *at {
        At::Millis(ms) => start().checked_add(Duration::from_millis(u64::from(ms))),
        At::Far(secs, nanos) => start().checked_add(Duration::new(secs, nanos % 1_000_000_000)),
    }
}

fuzz_target!(|input: Input| {
    let t0 = start();
    let interval = Duration::new(input.interval.0, input.interval.1 % 1_000_000_000);
    let mut l = Liveness::new(interval, input.misses, t0);
    let interval = interval.max(Duration::from_millis(1));
    let misses = input.misses.max(1);
    assert_eq!(l.interval(), interval);
    let mut heard = t0;
    check_deadline(&l, heard, interval, misses);

    for op in &input.ops {
        let (Op::Heard(at) | Op::Wake(at)) = op;
        let Some(now) = instant(at) else {
            continue;
        };
        let before = l.deadline();
        match op {
            Op::Heard(_) => {
                l.handle_heard(now);
                heard = heard.max(now);
                check_deadline(&l, heard, interval, misses);
                if now.checked_add(interval.saturating_mul(misses)).is_some() {
                    assert!(!l.is_dead(now), "dead right after being heard");
                }
            }
            Op::Wake(_) => {
                let timeout = l.poll_timeout();
                let sent = l.poll_send(now);
                if now < timeout {
                    assert!(!sent, "heartbeat sent before poll_timeout");
                }
                if sent && now.checked_add(interval).is_some() {
                    assert!(!l.poll_send(now), "two heartbeats at one instant");
                }
                assert_eq!(l.is_dead(now), now >= l.deadline());
            }
        }
        assert!(l.deadline() >= before, "deadline moved backwards");
        assert!(l.poll_timeout() <= l.deadline());
    }
});

fn check_deadline(l: &Liveness, heard: Instant, interval: Duration, misses: u32) {
    if let Some(want) = heard.checked_add(interval.saturating_mul(misses)) {
        assert_eq!(l.deadline(), want);
    }
}
