//! Keyed token-bucket rate limits (seed 001, section 5.2: `auth_attempts: 5 per minute`,
//! `tunnel_creation: 10 per hour`).
//!
//! Each key (an address, an account, a token id) owns a bucket of [`RateLimit::burst`] tokens
//! that refills continuously at `burst / period`. Accounting is exact integer arithmetic: one
//! token is worth `period` in nanoseconds and every elapsed nanosecond adds `burst` units, so
//! no rounding lets a caller gain a token early.
//!
//! Memory is bounded by `max_keys`. A key whose bucket is full carries no information and may be
//! dropped ([`KeyedLimiter::prune`]); when a new key arrives and every tracked key is still
//! throttled, the new key is **refused** rather than admitted by evicting someone. This fails
//! closed on purpose: under a flood of distinct keys an evicting limiter would either grow
//! without bound or forget exactly the abusers it is meant to hold back, handing them fresh
//! buckets. Refused new keys cost O(1) until the earliest instant some tracked bucket can have
//! refilled, so a flood cannot turn every request into a full scan.
//!
//! Time only moves forward here: an earlier `now` than one already seen grants nothing.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// What a limit per source counts an address as: an IPv4 address (IPv4-mapped IPv6
/// included), or the /64 of an IPv6 address, since one host can usually pick any address of
/// its /64. Used by every per-address limit and cap (relay, mailbox peer).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// A token-bucket limit: `burst` tokens, refilled continuously at `burst / period`.
///
/// With burst 5 and period 60 s the first 5 checks at one instant pass, the 6th is refused, and
/// one token returns every 12 s. A burst of 0 refuses everything; a period of zero never limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Bucket size: how many checks may pass back to back.
    pub burst: u32,
    /// Time to refill an empty bucket completely.
    pub period: Duration,
}

impl RateLimit {
    /// `n` per minute, all of them usable at once.
    pub fn per_minute(n: u32) -> Self {
        Self {
            burst: n,
            period: Duration::from_secs(60),
        }
    }

    /// `n` per hour, all of them usable at once.
    pub fn per_hour(n: u32) -> Self {
        Self {
            burst: n,
            period: Duration::from_secs(3600),
        }
    }

    /// Units one token is worth (the period in nanoseconds).
    fn cost(&self) -> u128 {
        self.period.as_nanos()
    }

    /// Units of a full bucket.
    fn capacity(&self) -> u128 {
        u128::from(self.burst).saturating_mul(self.cost())
    }
}

/// One key's bucket.
#[derive(Debug, Clone)]
struct Bucket {
    /// Units held, at most the capacity.
    credit: u128,
    /// Latest instant the credit was brought up to date; never moves backwards.
    last: Instant,
}

/// Earliest instant any tracked bucket can be full again, so a full map need not be scanned.
#[derive(Debug, Clone, Copy)]
enum PruneHint {
    /// Not known: scan.
    Unknown,
    /// No bucket is full before this instant.
    NotBefore(Instant),
    /// No bucket becomes full within representable time.
    Never,
}

impl PruneHint {
    /// The hint after a bucket that is full at `fill` (None: never) joins the map.
    fn with(self, fill: Option<Instant>) -> Self {
        match (self, fill) {
            (Self::Unknown, _) => Self::Unknown,
            (hint, None) => hint,
            (Self::Never, Some(f)) => Self::NotBefore(f),
            (Self::NotBefore(h), Some(f)) => Self::NotBefore(h.min(f)),
        }
    }

    /// Whether a prune at `now` certainly frees nothing.
    fn nothing_to_prune(self, now: Instant) -> bool {
        match self {
            Self::Unknown => false,
            Self::NotBefore(h) => now < h,
            Self::Never => true,
        }
    }
}

/// Token buckets for many keys under one [`RateLimit`], holding at most `max_keys` keys.
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    limit: RateLimit,
    max_keys: usize,
    buckets: HashMap<K, Bucket>,
    hint: PruneHint,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// A limiter applying `limit` to each key separately, tracking at most `max_keys` keys.
    pub fn new(limit: RateLimit, max_keys: usize) -> Self {
        Self {
            limit,
            max_keys,
            buckets: HashMap::new(),
            hint: PruneHint::Unknown,
        }
    }

    /// Takes a token for `key`; `Err(retry_after)` when none is left (nothing consumed).
    ///
    /// `retry_after` is the time until one token is available, rounded up to whole seconds and
    /// at least 1 s. A new key arriving while the limiter is full of throttled keys is refused
    /// with `period / burst` (rounded the same way).
    pub fn check(&mut self, key: &K, now: Instant) -> Result<(), Duration> {
        if self.limit.burst == 0 {
            return Err(round_up_secs(self.limit.cost()));
        }
        let limit = self.limit;
        if let Some(bucket) = self.buckets.get_mut(key) {
            refill(&limit, bucket, now);
            return if bucket.credit >= limit.cost() {
                bucket.credit -= limit.cost();
                Ok(())
            } else {
                Err(wait(&limit, bucket, now))
            };
        }
        if self.buckets.len() >= self.max_keys {
            if !self.hint.nothing_to_prune(now) {
                self.prune(now);
            }
            if self.buckets.len() >= self.max_keys {
                return Err(self.new_key_retry());
            }
        }
        let bucket = Bucket {
            credit: limit.capacity() - limit.cost(),
            last: now,
        };
        self.hint = self.hint.with(fill_instant(&limit, &bucket));
        self.buckets.insert(key.clone(), bucket);
        Ok(())
    }

    /// Like [`check`](Self::check) but consumes nothing.
    pub fn peek(&self, key: &K, now: Instant) -> Result<(), Duration> {
        if self.limit.burst == 0 {
            return Err(round_up_secs(self.limit.cost()));
        }
        if let Some(bucket) = self.buckets.get(key) {
            return if level(&self.limit, bucket, now) >= self.limit.cost() {
                Ok(())
            } else {
                Err(wait(&self.limit, bucket, now))
            };
        }
        if self.buckets.len() < self.max_keys {
            return Ok(());
        }
        let room = !self.hint.nothing_to_prune(now)
            && self
                .buckets
                .values()
                .any(|b| level(&self.limit, b, now) >= self.limit.capacity());
        if room {
            Ok(())
        } else {
            Err(self.new_key_retry())
        }
    }

    /// Drops keys whose bucket has refilled completely (they hold no information).
    pub fn prune(&mut self, now: Instant) {
        let limit = self.limit;
        self.buckets
            .retain(|_, b| level(&limit, b, now) < limit.capacity());
        self.hint = self.buckets.values().fold(PruneHint::Never, |hint, b| {
            hint.with(fill_instant(&limit, b))
        });
    }

    /// Number of keys currently tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The limit applied to each key.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Retry hint for a new key refused because the limiter is full: one token's refill time.
    fn new_key_retry(&self) -> Duration {
        let burst = u128::from(self.limit.burst.max(1));
        round_up_secs(self.limit.cost().div_ceil(burst))
    }
}

/// Units `bucket` holds at `now` (no refill for an earlier `now`).
fn level(limit: &RateLimit, bucket: &Bucket, now: Instant) -> u128 {
    match now.checked_duration_since(bucket.last) {
        Some(elapsed) => {
            let gained = elapsed.as_nanos().saturating_mul(u128::from(limit.burst));
            bucket.credit.saturating_add(gained).min(limit.capacity())
        }
        None => bucket.credit,
    }
}

/// Brings `bucket` up to `now`; an earlier `now` changes nothing.
fn refill(limit: &RateLimit, bucket: &mut Bucket, now: Instant) {
    if now > bucket.last {
        bucket.credit = level(limit, bucket, now);
        bucket.last = now;
    }
}

/// Time from `now` until `bucket` holds one token, rounded up to whole seconds (burst > 0).
fn wait(limit: &RateLimit, bucket: &Bucket, now: Instant) -> Duration {
    let have = level(limit, bucket, now);
    let missing = limit.cost().saturating_sub(have);
    let mut nanos = missing.div_ceil(u128::from(limit.burst.max(1)));
    if let Some(behind) = bucket.last.checked_duration_since(now) {
        // The clock went backwards: refill only starts again from `last`.
        nanos = nanos.saturating_add(behind.as_nanos());
    }
    round_up_secs(nanos)
}

/// The instant `bucket` is full again, or None if that is beyond representable time.
fn fill_instant(limit: &RateLimit, bucket: &Bucket) -> Option<Instant> {
    let missing = limit.capacity().saturating_sub(bucket.credit);
    let nanos = missing.div_ceil(u128::from(limit.burst.max(1)));
    bucket.last.checked_add(duration_from_nanos(nanos)?)
}

/// A duration of `nanos` nanoseconds, or None if it does not fit.
fn duration_from_nanos(nanos: u128) -> Option<Duration> {
    let secs = u64::try_from(nanos / NANOS_PER_SEC).ok()?;
    // The remainder is below 10^9, so it fits in u32.
    let sub = u32::try_from(nanos % NANOS_PER_SEC).ok()?;
    Some(Duration::new(secs, sub))
}

/// `nanos` rounded up to whole seconds, at least one second, saturating.
fn round_up_secs(nanos: u128) -> Duration {
    let secs = nanos.div_ceil(NANOS_PER_SEC).max(1);
    Duration::from_secs(u64::try_from(secs).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {

    #[test]
    fn sources_are_ipv4_addresses_or_ipv6_slash_64s() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(source_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source_key(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source_key(ip("2001:db8:1:2:bbbb::9")),
            source_key(ip("2001:db8:1:2:aaaa::1"))
        );
        assert_ne!(source_key(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
    }
    use super::*;
    use proptest::prelude::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn presets() {
        assert_eq!(
            RateLimit::per_minute(5),
            RateLimit {
                burst: 5,
                period: secs(60)
            }
        );
        assert_eq!(
            RateLimit::per_hour(10),
            RateLimit {
                burst: 10,
                period: secs(3600)
            }
        );
    }

    #[test]
    fn exactly_burst_checks_pass_at_one_instant() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(RateLimit::per_minute(5), 100);
        for i in 0..5 {
            assert_eq!(l.check(&"ip", t0), Ok(()), "check {i}");
        }
        assert_eq!(l.check(&"ip", t0), Err(secs(12)));
        // A refusal consumes nothing: still exactly one token after 12 s.
        assert_eq!(l.check(&"ip", t0), Err(secs(12)));
        assert_eq!(l.check(&"ip", t0 + secs(12)), Ok(()));
        assert_eq!(l.check(&"ip", t0 + secs(12)), Err(secs(12)));
    }

    #[test]
    fn retry_after_values() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(RateLimit::per_hour(10), 100);
        for _ in 0..10 {
            l.check(&1u32, t0).unwrap();
        }
        assert_eq!(l.check(&1, t0), Err(secs(360)));
        assert_eq!(l.peek(&1, t0), Err(secs(360)));
        // Part-way through: remaining time rounded up to whole seconds.
        assert_eq!(
            l.check(&1, t0 + Duration::from_millis(100_500)),
            Err(secs(260))
        );
        let mut l = KeyedLimiter::new(RateLimit::per_minute(5), 100);
        for _ in 0..5 {
            l.check(&1u32, t0).unwrap();
        }
        assert_eq!(
            l.check(&1, t0 + Duration::from_millis(11_500)),
            Err(secs(1))
        );
        assert_eq!(
            l.check(&1, t0 + Duration::from_millis(11_999)),
            Err(secs(1))
        );
        assert_eq!(l.check(&1, t0 + secs(12)), Ok(()));
    }

    #[test]
    fn refill_after_time_passes_caps_at_burst() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(RateLimit::per_minute(5), 100);
        for _ in 0..5 {
            l.check(&"k", t0).unwrap();
        }
        // 36 s: three tokens back.
        let t = t0 + secs(36);
        for _ in 0..3 {
            assert_eq!(l.check(&"k", t), Ok(()));
        }
        assert!(l.check(&"k", t).is_err());
        // A long idle period refills to burst and no further.
        let t = t0 + secs(3600);
        for _ in 0..5 {
            assert_eq!(l.check(&"k", t), Ok(()));
        }
        assert!(l.check(&"k", t).is_err());
    }

    #[test]
    fn keys_are_independent() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(RateLimit::per_minute(2), 100);
        l.check(&"a", t0).unwrap();
        l.check(&"a", t0).unwrap();
        assert!(l.check(&"a", t0).is_err());
        assert_eq!(l.check(&"b", t0), Ok(()));
        assert_eq!(l.check(&"b", t0), Ok(()));
        assert!(l.check(&"b", t0).is_err());
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn peek_consumes_nothing() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(RateLimit::per_minute(1), 100);
        assert_eq!(l.peek(&"a", t0), Ok(()));
        assert!(l.is_empty(), "peek does not create keys");
        assert_eq!(l.peek(&"a", t0), Ok(()));
        assert_eq!(l.check(&"a", t0), Ok(()));
        assert_eq!(l.peek(&"a", t0), Err(secs(60)));
        assert_eq!(l.peek(&"a", t0 + secs(60)), Ok(()));
        assert_eq!(l.check(&"a", t0 + secs(60)), Ok(()));
    }

    #[test]
    fn prune_removes_only_full_buckets() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(RateLimit::per_minute(5), 100);
        for _ in 0..5 {
            l.check(&"heavy", t0).unwrap();
        }
        l.check(&"light", t0).unwrap();
        l.prune(t0 + secs(11));
        assert_eq!(l.len(), 2, "light is one token short until 12 s");
        l.prune(t0 + secs(12));
        assert_eq!(l.len(), 1);
        // The heavy key was kept with its state: only one token is back.
        let t = t0 + secs(12);
        assert_eq!(l.check(&"heavy", t), Ok(()));
        assert!(l.check(&"heavy", t).is_err());
        l.prune(t0 + secs(1000));
        assert!(l.is_empty());
    }

    #[test]
    fn max_keys_bound_fails_closed() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(RateLimit::per_minute(5), 3);
        for k in 0..3u32 {
            l.check(&k, t0).unwrap();
        }
        assert_eq!(l.check(&99, t0), Err(secs(12)));
        assert_eq!(l.peek(&99, t0), Err(secs(12)));
        assert_eq!(l.len(), 3);
        // A flood of new keys neither grows the map nor evicts the tracked ones.
        for k in 100..10_000u32 {
            assert!(l.check(&k, t0 + secs(5)).is_err());
        }
        assert_eq!(l.len(), 3);
        for k in 0..3u32 {
            l.check(&k, t0 + secs(5)).unwrap();
            l.check(&k, t0 + secs(5)).unwrap();
            l.check(&k, t0 + secs(5)).unwrap();
            l.check(&k, t0 + secs(5)).unwrap();
            assert!(l.check(&k, t0 + secs(5)).is_err(), "key {k} not forgotten");
        }
        // Tracked keys still work while full, and once one refills a new key gets its slot.
        let mut l = KeyedLimiter::new(RateLimit::per_minute(5), 2);
        l.check(&1u32, t0).unwrap();
        l.check(&2u32, t0 + secs(6)).unwrap();
        assert!(l.check(&3, t0 + secs(11)).is_err());
        assert_eq!(l.peek(&3, t0 + secs(12)), Ok(()));
        assert_eq!(l.check(&3, t0 + secs(12)), Ok(()));
        assert_eq!(l.len(), 2);
        assert!(l.check(&4, t0 + secs(12)).is_err());
    }

    #[test]
    fn skipped_scans_never_refuse_a_key_that_has_room() {
        // The cached "nothing refills before" instant must account for keys inserted after it.
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(RateLimit::per_minute(5), 2);
        for _ in 0..5 {
            l.check(&1u32, t0).unwrap(); // full again at 60 s
        }
        l.check(&2u32, t0).unwrap(); // full again at 12 s
        assert!(l.check(&3, t0).is_err());
        assert_eq!(l.check(&3, t0 + secs(12)), Ok(())); // evicts 2, full again at 24 s
        assert!(l.check(&4, t0 + secs(23)).is_err());
        assert_eq!(l.check(&4, t0 + secs(24)), Ok(()));
        assert_eq!(l.check(&1, t0 + secs(24)), Ok(()), "key 1 kept its bucket");
    }

    #[test]
    fn zero_max_keys_refuses_every_key() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(RateLimit::per_minute(5), 0);
        assert_eq!(l.check(&1u32, t0), Err(secs(12)));
        assert!(l.is_empty());
    }

    #[test]
    fn zero_burst_refuses_everything() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(
            RateLimit {
                burst: 0,
                period: secs(60),
            },
            10,
        );
        assert_eq!(l.check(&1u32, t0), Err(secs(60)));
        assert_eq!(l.peek(&1u32, t0 + secs(1_000_000)), Err(secs(60)));
        assert!(l.is_empty());
    }

    #[test]
    fn time_going_backwards_grants_nothing() {
        let t0 = Instant::now();
        let later = t0 + secs(100);
        let mut l = KeyedLimiter::new(RateLimit::per_minute(5), 10);
        for _ in 0..5 {
            l.check(&"k", later).unwrap();
        }
        assert_eq!(l.check(&"k", t0), Err(secs(112)));
        assert_eq!(l.peek(&"k", t0), Err(secs(112)));
        l.prune(t0);
        assert_eq!(l.len(), 1);
        // Going back and forth does not double-count the elapsed time.
        assert!(l.check(&"k", later + secs(11)).is_err());
        assert_eq!(l.check(&"k", later + secs(12)), Ok(()));
        assert!(l.check(&"k", t0 + secs(50)).is_err());
        assert!(l.check(&"k", later + secs(12)).is_err());
    }

    #[test]
    fn extreme_limits_do_not_overflow() {
        let t0 = Instant::now();
        let huge = RateLimit {
            burst: u32::MAX,
            period: Duration::MAX,
        };
        let mut l = KeyedLimiter::new(huge, 1);
        assert_eq!(l.check(&1u32, t0), Ok(()));
        // period / burst is a little over 2^32 + 1 seconds.
        let retry = l.check(&2u32, t0).unwrap_err();
        assert!(retry >= secs(4_294_967_297) && retry <= secs(4_294_967_298));
        l.prune(t0 + secs(1));
        assert_eq!(l.len(), 1);
        let slow = RateLimit {
            burst: 1,
            period: Duration::MAX,
        };
        let mut l = KeyedLimiter::new(slow, 1);
        assert_eq!(l.check(&1u32, t0), Ok(()));
        assert_eq!(l.check(&1u32, t0 + secs(1)), Err(secs(u64::MAX)));
        assert!(l.check(&2u32, t0 + secs(1)).is_err());
        // Zero period never limits.
        let mut l = KeyedLimiter::new(
            RateLimit {
                burst: 3,
                period: Duration::ZERO,
            },
            1,
        );
        for _ in 0..100 {
            assert_eq!(l.check(&1u32, t0), Ok(()));
        }
    }

    proptest! {
        #[test]
        fn passes_never_exceed_the_limit(
            burst in 1u32..8,
            period_s in 1u64..120,
            max_keys in 1usize..5,
            ops in proptest::collection::vec((0u8..4, 0u64..30_000), 1..300),
        ) {
            let limit = RateLimit { burst, period: secs(period_s) };
            let mut l = KeyedLimiter::new(limit, max_keys);
            let t0 = Instant::now();
            let mut elapsed_ms = 0u64;
            let mut passes: [Vec<u64>; 4] = Default::default();
            for (key, advance) in ops {
                elapsed_ms += advance;
                let now = t0 + Duration::from_millis(elapsed_ms);
                if l.check(&key, now).is_ok() {
                    passes[usize::from(key)].push(elapsed_ms);
                }
                prop_assert!(l.len() <= max_keys);
            }
            let period_ms = u128::from(period_s) * 1000;
            for times in &passes {
                for i in 0..times.len() {
                    for j in i..times.len() {
                        let window = u128::from(times[j] - times[i]);
                        let allowed = u128::from(burst)
                            + (window * u128::from(burst)).div_ceil(period_ms);
                        prop_assert!((j - i + 1) as u128 <= allowed,
                            "{} passes in {} ms", j - i + 1, window);
                    }
                }
            }
        }
    }
}
