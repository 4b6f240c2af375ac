//! Keyed token buckets (`tube_proto::ratelimit::KeyedLimiter`), driven by peers: the input is
//! a limit (burst, period), a key capacity and a sequence of checks, peeks and prunes for up to
//! 8 keys (peer addresses) as time moves forward.
//!
//! - Nothing panics, whatever the limit (burst 0, period 0, huge periods).
//! - Never more than `max_keys` keys are tracked.
//! - `peek` predicts `check` exactly (taken at the same instant).
//! - The token-bucket bound holds per key: successes since its first one are at most
//!   `burst + elapsed * burst / period` (rounded down: no token early). A burst of 0 refuses
//!   everything; a period of 0 never limits once the key is tracked.
//! - A refusal's `retry_after` is whole seconds, at least 1 s; when every key fits in the
//!   limiter, waiting that long is enough for the refused key.

#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tube_proto::ratelimit::{KeyedLimiter, RateLimit};

const KEYS: u8 = 8;

#[derive(Debug, Arbitrary)]
enum Op {
    Check { key: u8, advance_ms: u16 },
    Peek { key: u8, advance_ms: u16 },
    Prune { advance_ms: u16 },
    Jump { secs: u32 },
}

#[derive(Debug, Arbitrary)]
struct Input {
    burst: u8,
    period_ms: u32,
    max_keys: u8,
    ops: Vec<Op>,
}

/// One start instant for the whole process, so a finding replays the same way.
fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    /// Offset of the key's first success.
    first: Option<Duration>,
    successes: u128,
}

fuzz_target!(|input: Input| {
    let limit = RateLimit {
        burst: u32::from(input.burst),
        period: Duration::from_millis(u64::from(input.period_ms)),
    };
    let max_keys = usize::from(input.max_keys % 11);
    let mut l = KeyedLimiter::new(limit, max_keys);
    assert_eq!(l.limit(), limit);
    let mut seen = [Seen::default(); KEYS as usize];
    let mut offset = Duration::ZERO;

    for op in input.ops {
        let advance = match op {
            Op::Check { advance_ms, .. }
            | Op::Peek { advance_ms, .. }
            | Op::Prune { advance_ms } => Duration::from_millis(u64::from(advance_ms)),
            Op::Jump { secs } => Duration::from_secs(u64::from(secs)),
        };
        offset += advance;
        let now = start() + offset;
        match op {
            Op::Check { key, .. } => {
                let k = key % KEYS;
                let predicted = l.peek(&k, now);
                let got = l.check(&k, now);
                assert_eq!(predicted.is_ok(), got.is_ok(), "peek disagrees with check");
                match got {
                    Ok(()) => {
                        let s = &mut seen[usize::from(k)];
                        let first = *s.first.get_or_insert(offset);
                        s.successes += 1;
                        assert!(limit.burst > 0, "a burst of 0 let a check pass");
                        if !limit.period.is_zero() {
                            let elapsed = (offset - first).as_nanos();
                            let refilled =
                                elapsed * u128::from(limit.burst) / limit.period.as_nanos();
                            let bound = u128::from(limit.burst) + refilled;
                            assert!(
                                s.successes <= bound,
                                "key {k}: {} successes in {elapsed} ns, bound {bound}",
                                s.successes
                            );
                        }
                    }
                    Err(retry) => {
                        check_retry(retry);
                        let all_fit = max_keys >= usize::from(KEYS);
                        if all_fit && limit.burst > 0 {
                            assert!(!limit.period.is_zero(), "a period of 0 limited");
                            if let Some(later) = now.checked_add(retry) {
                                assert_eq!(l.peek(&k, later), Ok(()), "retry_after too short");
                            }
                        }
                    }
                }
            }
            Op::Peek { key, .. } => {
                if let Err(retry) = l.peek(&(key % KEYS), now) {
                    check_retry(retry);
                }
            }
            Op::Prune { .. } => l.prune(now),
            Op::Jump { .. } => {}
        }
        assert!(
            l.len() <= max_keys,
            "{} keys tracked, max {max_keys}",
            l.len()
        );
    }
});

fn check_retry(retry: Duration) {
    assert!(retry >= Duration::from_secs(1), "retry_after {retry:?}");
    assert_eq!(
        retry.subsec_nanos(),
        0,
        "retry_after {retry:?} not whole seconds"
    );
}
