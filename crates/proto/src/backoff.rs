//! Exponential reconnect backoff with jitter (seed 001, section 6.1: initial delay 1 s, maximum
//! 30 s, factor 2, at most 10 attempts).
//!
//! The caller supplies the randomness for jitter as a `u64`, so the schedule is deterministic
//! under test. Jitter only ever shortens a delay (by up to `jitter` of it): agents that lost the
//! relay together spread out instead of reconnecting in lockstep, and no delay exceeds `max`.
//! Every computation saturates, so absurd configurations (huge factors, thousands of attempts,
//! NaN) still yield a delay between zero and `max`.

use std::time::Duration;

/// Parameters of a [`Backoff`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffConfig {
    /// Delay before the first retry (before jitter).
    pub initial: Duration,
    /// Upper bound of any delay.
    pub max: Duration,
    /// Growth per attempt; values below 1 (or NaN) are treated as 1.
    pub factor: f64,
    /// Delays handed out before giving up; 0 means never give up.
    pub max_attempts: u32,
    /// Fraction of each delay that jitter may remove, clamped to `0.0..=1.0` (NaN means 0).
    pub jitter: f64,
}

impl Default for BackoffConfig {
    /// Seed 001, section 6.1: 1 s, 30 s, factor 2, 10 attempts, plus 20 % jitter.
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
            factor: 2.0,
            max_attempts: 10,
            jitter: 0.2,
        }
    }
}

/// The retry schedule of one reconnect loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    cfg: BackoffConfig,
    attempts: u32,
}

impl Backoff {
    /// A schedule starting at attempt 0.
    pub fn new(cfg: BackoffConfig) -> Self {
        Self { cfg, attempts: 0 }
    }

    /// Delay before the next attempt, or None once `max_attempts` delays have been handed out
    /// (`max_attempts` 0 = unlimited).
    ///
    /// Base delay for attempt k (0-based) = min(max, initial * factor^k); jitter subtracts up to
    /// `jitter` of it: delay = base * (1 - jitter * r), r = random as f64 / u64::MAX as f64.
    /// Never negative, never above max, handles huge k without overflow/NaN.
    pub fn next_delay(&mut self, random: u64) -> Option<Duration> {
        if self.cfg.max_attempts != 0 && self.attempts >= self.cfg.max_attempts {
            return None;
        }
        let base = self.base_delay(self.attempts);
        self.attempts = self.attempts.saturating_add(1);
        Some(apply_jitter(base, self.cfg.jitter, random))
    }

    /// Starts over from the first delay (after a successful connection).
    pub fn reset(&mut self) {
        self.attempts = 0;
    }

    /// Delays handed out since creation or the last [`reset`](Self::reset).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// min(max, initial * factor^k), without jitter.
    fn base_delay(&self, k: u32) -> Duration {
        let max = self.cfg.max;
        let initial = self.cfg.initial.min(max);
        // `!(x >= 1.0)` also catches NaN.
        let factor = if self.cfg.factor >= 1.0 {
            self.cfg.factor
        } else {
            1.0
        };
        if k == 0 || factor == 1.0 {
            return initial;
        }
        let growth = factor.powf(f64::from(k));
        // Exact for integer factors while the result is small; the f64 path handles the rest.
        if growth <= f64::from(u32::MAX) && growth.fract() == 0.0 {
            // Both checks passed, so `growth` is a whole number in u32 range.
            let whole = growth as u32;
            return initial.checked_mul(whole).map_or(max, |d| d.min(max));
        }
        let secs = initial.as_secs_f64() * growth;
        // NaN and infinity fail this comparison and saturate at max.
        if secs < max.as_secs_f64() {
            // Rounding may not take a delay below `initial` (growth is at least 1).
            Duration::try_from_secs_f64(secs).map_or(max, |d| d.clamp(initial, max))
        } else {
            max
        }
    }
}

/// `base * (1 - jitter * r)` with `r = random / u64::MAX`, within `0..=base`.
fn apply_jitter(base: Duration, jitter: f64, random: u64) -> Duration {
    let jitter = if jitter > 0.0 { jitter.min(1.0) } else { 0.0 };
    let r = random as f64 / u64::MAX as f64;
    let keep = (1.0 - jitter * r).clamp(0.0, 1.0);
    if keep >= 1.0 {
        return base;
    }
    Duration::try_from_secs_f64(base.as_secs_f64() * keep).map_or(base, |d| d.min(base))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn no_jitter() -> BackoffConfig {
        BackoffConfig {
            jitter: 0.0,
            ..BackoffConfig::default()
        }
    }

    #[test]
    fn default_matches_the_seed() {
        let c = BackoffConfig::default();
        assert_eq!(c.initial, secs(1));
        assert_eq!(c.max, secs(30));
        assert_eq!(c.factor, 2.0);
        assert_eq!(c.max_attempts, 10);
        assert_eq!(c.jitter, 0.2);
    }

    #[test]
    fn sequence_without_jitter() {
        let mut b = Backoff::new(no_jitter());
        let got: Vec<u64> = std::iter::from_fn(|| b.next_delay(u64::MAX))
            .map(|d| d.as_secs())
            .collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 30, 30, 30, 30, 30]);
        assert_eq!(b.attempts(), 10);
        assert_eq!(b.next_delay(0), None);
        assert_eq!(b.attempts(), 10);
    }

    #[test]
    fn jitter_stays_within_a_fifth_of_the_base() {
        let bases = [1u64, 2, 4, 8, 16, 30, 30, 30, 30, 30];
        for random in [0, 1, u64::MAX / 3, u64::MAX / 2, u64::MAX - 1, u64::MAX] {
            let mut b = Backoff::new(BackoffConfig::default());
            for base in bases {
                let d = b.next_delay(random).unwrap();
                let base = secs(base);
                assert!(d <= base, "{d:?} above {base:?}");
                assert!(d >= base.mul_f64(0.8), "{d:?} below 0.8 * {base:?}");
            }
            assert_eq!(b.next_delay(random), None);
        }
        // The extremes of r hit the extremes of the range.
        let mut b = Backoff::new(BackoffConfig::default());
        assert_eq!(b.next_delay(0), Some(secs(1)));
        let d = b.next_delay(u64::MAX).unwrap();
        assert!(d.abs_diff(Duration::from_millis(1600)) < Duration::from_micros(1));
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(no_jitter());
        for _ in 0..4 {
            b.next_delay(0);
        }
        assert_eq!(b.next_delay(0), Some(secs(16)));
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert_eq!(b.next_delay(0), Some(secs(1)));
        assert_eq!(b.next_delay(0), Some(secs(2)));
    }

    #[test]
    fn unlimited_attempts_keep_returning_max() {
        let mut b = Backoff::new(BackoffConfig {
            max_attempts: 0,
            ..no_jitter()
        });
        for _ in 0..5 {
            b.next_delay(0);
        }
        for _ in 0..10_000 {
            assert_eq!(b.next_delay(0), Some(secs(30)));
        }
        // Even past u32::MAX attempts (the counter saturates).
        b.attempts = u32::MAX - 1;
        for _ in 0..3 {
            assert_eq!(b.next_delay(0), Some(secs(30)));
        }
        assert_eq!(b.attempts(), u32::MAX);
    }

    #[test]
    fn factor_one_stays_constant() {
        let mut b = Backoff::new(BackoffConfig {
            factor: 1.0,
            initial: Duration::from_millis(250),
            ..no_jitter()
        });
        for _ in 0..10 {
            assert_eq!(b.next_delay(0), Some(Duration::from_millis(250)));
        }
        assert_eq!(b.next_delay(0), None);
    }

    #[test]
    fn fractional_factor_grows() {
        let mut b = Backoff::new(BackoffConfig {
            factor: 1.5,
            ..no_jitter()
        });
        let got: Vec<Duration> = (0..4).filter_map(|_| b.next_delay(0)).collect();
        assert_eq!(
            got,
            [1000, 1500, 2250, 3375].map(Duration::from_millis).to_vec()
        );
    }

    #[test]
    fn extreme_configs_saturate_at_max() {
        let mut b = Backoff::new(BackoffConfig {
            factor: 1e9,
            max_attempts: 0,
            ..no_jitter()
        });
        assert_eq!(b.next_delay(0), Some(secs(1)));
        for _ in 0..100 {
            assert_eq!(b.next_delay(0), Some(secs(30)));
        }
        b.attempts = u32::MAX - 5;
        assert_eq!(b.next_delay(0), Some(secs(30)));
        // Duration::MAX as max, infinite factor, NaN everywhere: still sane.
        let weird = [
            BackoffConfig {
                initial: Duration::MAX,
                max: Duration::MAX,
                factor: f64::INFINITY,
                max_attempts: 0,
                jitter: 0.5,
            },
            BackoffConfig {
                initial: Duration::ZERO,
                max: secs(30),
                factor: f64::INFINITY,
                max_attempts: 0,
                jitter: f64::NAN,
            },
            BackoffConfig {
                initial: secs(1),
                max: secs(30),
                factor: f64::NAN,
                max_attempts: 0,
                jitter: -3.0,
            },
            BackoffConfig {
                initial: secs(60),
                max: secs(30),
                factor: -2.0,
                max_attempts: 0,
                jitter: 7.0,
            },
        ];
        for cfg in weird {
            let mut b = Backoff::new(cfg);
            for k in [0u32, 1, 2, 63, 64, 1000, u32::MAX - 1] {
                b.attempts = k;
                for random in [0, u64::MAX / 2, u64::MAX] {
                    let mut probe = b.clone();
                    let d = probe.next_delay(random).unwrap();
                    assert!(d <= cfg.max, "{cfg:?} k={k}: {d:?}");
                }
            }
        }
        // NaN factor behaves as 1, and an initial above max is capped.
        let mut b = Backoff::new(weird[2]);
        assert_eq!(b.next_delay(0), Some(secs(1)));
        assert_eq!(b.next_delay(0), Some(secs(1)));
        let mut b = Backoff::new(weird[3]);
        assert_eq!(b.next_delay(0), Some(secs(30)));
        // Jitter above 1 is clamped to 1: r = 1 gives zero, never a negative delay.
        assert_eq!(b.next_delay(u64::MAX), Some(Duration::ZERO));
    }

    proptest! {
        #[test]
        fn delays_stay_between_jittered_base_and_max(
            initial_ms in 0u64..100_000,
            max_ms in 0u64..1_000_000,
            factor in 0.0f64..1e12,
            jitter in 0.0f64..=1.0,
            k in any::<u32>(),
            random in any::<u64>(),
        ) {
            let cfg = BackoffConfig {
                initial: Duration::from_millis(initial_ms),
                max: Duration::from_millis(max_ms),
                factor,
                max_attempts: 0,
                jitter,
            };
            let mut b = Backoff::new(cfg);
            b.attempts = k;
            let base = b.base_delay(k);
            prop_assert!(base <= cfg.max);
            prop_assert!(base >= cfg.initial.min(cfg.max));
            let d = b.next_delay(random).unwrap();
            prop_assert!(d <= base);
            prop_assert!(d.as_secs_f64() >= base.as_secs_f64() * (1.0 - jitter) - 1e-9);
        }
    }
}
