//! Reconnect backoff (`tube_proto::backoff`). Not peer input, but the module promises that any
//! configuration, however absurd (huge or NaN factors and jitter, zero or huge durations),
//! yields sane delays; the input is a configuration and the caller's random numbers.
//!
//! - Nothing panics.
//! - Exactly `max_attempts` delays are handed out (unlimited for 0), then `None`;
//!   `attempts()` counts them and `reset()` starts over.
//! - Without jitter, delays start at min(initial, max), never decrease and never pass `max`.
//! - With jitter, each delay is at most the jitter-free one and at least
//!   (1 - jitter) of it (jitter clamped to 0..=1), up to float rounding.

#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tube_proto::backoff::{Backoff, BackoffConfig};

#[derive(Debug, Arbitrary)]
struct Input {
    initial: (u64, u32),
    max: (u64, u32),
    factor: f64,
    max_attempts: u8,
    jitter: f64,
    randoms: Vec<u64>,
    reset_at: u8,
}

/// Steps taken when attempts are unlimited.
const UNLIMITED_STEPS: usize = 300;

fuzz_target!(|input: Input| {
    let cfg = BackoffConfig {
        initial: Duration::new(input.initial.0, input.initial.1 % 1_000_000_000),
        max: Duration::new(input.max.0, input.max.1 % 1_000_000_000),
        factor: input.factor,
        max_attempts: u32::from(input.max_attempts),
        jitter: input.jitter,
    };
    let plain_cfg = BackoffConfig { jitter: 0.0, ..cfg };
    let mut jittered = Backoff::new(cfg);
    let mut plain = Backoff::new(plain_cfg);
    let jitter = if cfg.jitter > 0.0 {
        cfg.jitter.min(1.0)
    } else {
        0.0
    };

    let steps = if cfg.max_attempts == 0 {
        UNLIMITED_STEPS
    } else {
        cfg.max_attempts as usize + 2
    };
    let mut previous: Option<Duration> = None;
    let mut handed = 0u32;
    for step in 0..steps {
        let random = input
            .randoms
            .get(step % input.randoms.len().max(1))
            .copied()
            .unwrap_or(u64::MAX);
        let (d, base) = (jittered.next_delay(random), plain.next_delay(random));
        assert_eq!(d.is_some(), base.is_some());
        let (Some(d), Some(base)) = (d, base) else {
            assert!(
                cfg.max_attempts != 0 && handed == cfg.max_attempts,
                "gave up early"
            );
            assert_eq!(jittered.attempts(), cfg.max_attempts);
            continue;
        };
        handed += 1;
        assert_eq!(jittered.attempts(), handed);
        assert!(
            cfg.max_attempts == 0 || handed <= cfg.max_attempts,
            "too many delays"
        );

        assert!(base <= cfg.max, "{base:?} over max {:?}", cfg.max);
        match previous {
            None => assert_eq!(base, cfg.initial.min(cfg.max), "first delay"),
            Some(p) => assert!(base >= p, "delays shrank: {p:?} then {base:?}"),
        }
        previous = Some(base);

        assert!(d <= base, "jitter lengthened {base:?} to {d:?}");
        let floor = base.as_secs_f64() * (1.0 - jitter);
        assert!(
            d.as_secs_f64() >= floor * (1.0 - 1e-9) - 1e-9,
            "jitter {jitter} took {base:?} down to {d:?}"
        );

        if step == usize::from(input.reset_at) {
            jittered.reset();
            plain.reset();
            assert_eq!(jittered.attempts(), 0);
            handed = 0;
            previous = None;
        }
    }
});
