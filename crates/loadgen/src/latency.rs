//! What the message clients (`mailbox`, `longpoll`) share: delivery latencies summarised by
//! nearest rank, time stamps that travel inside a message (nanoseconds since a base instant of
//! this process, so sender and receiver read one clock), a payload pattern that makes every
//! message checkable at arrival, and pacing at a fixed offered rate.

use std::time::{Duration, Instant};

use crate::client::nearest_rank;

/// Latency percentiles of one run, in microseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct Latency {
    /// Median (nearest rank).
    pub(crate) p50_us: f64,
    /// 99th percentile (nearest rank).
    pub(crate) p99_us: f64,
    /// Arithmetic mean.
    pub(crate) mean_us: f64,
    /// The slowest one.
    pub(crate) max_us: f64,
}

impl Latency {
    /// Summarises `samples`; all zero when there are none.
    pub(crate) fn of(mut samples: Vec<Duration>) -> Latency {
        samples.sort_unstable();
        let us = |d: &Duration| d.as_secs_f64() * 1e6;
        let mean = if samples.is_empty() {
            0.0
        } else {
            samples.iter().map(us).sum::<f64>() / samples.len() as f64
        };
        Latency {
            p50_us: nearest_rank(&samples, 0.50).unwrap_or(0.0),
            p99_us: nearest_rank(&samples, 0.99).unwrap_or(0.0),
            mean_us: mean,
            max_us: samples.last().map_or(0.0, us),
        }
    }
}

/// Nanoseconds from `base` to now (saturating; a run lasts far less than 584 years).
pub(crate) fn stamp(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The time from the stamp `sent` to now, or `None` if the stamp lies in the future (it was
/// not one of ours).
pub(crate) fn since(base: Instant, sent: u64) -> Option<Duration> {
    stamp(base).checked_sub(sent).map(Duration::from_nanos)
}

/// With a `rate` (messages per second over the whole run, 0 for none), waits until message
/// `index`'s turn: `index / rate` seconds after `base`. Runs that are behind send at once.
pub(crate) async fn pace(base: Instant, index: u64, rate: u32) {
    if rate > 0 {
        let due = base + Duration::from_secs_f64(index as f64 / f64::from(rate));
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
    }
}

/// Message `index`'s body: `[index u64][sent stamp u64][tag u64][pattern]`, `size` bytes in
/// all (at least 24). `tag` says who it is for (recipient, client) so a misrouted message is
/// caught; the pattern depends on index and tag, so a corrupted one is too.
pub(crate) fn body(index: u64, sent: u64, tag: u64, size: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(size.max(HEADER));
    b.extend_from_slice(&index.to_be_bytes());
    b.extend_from_slice(&sent.to_be_bytes());
    b.extend_from_slice(&tag.to_be_bytes());
    let seed = index.wrapping_mul(31).wrapping_add(tag);
    b.extend((HEADER..size).map(|j| (seed.wrapping_add(j as u64) % 251) as u8));
    b
}

/// Bytes of [`body`]'s header; the smallest message size.
pub(crate) const HEADER: usize = 24;

/// Reads a body made by [`body`]: `(index, sent stamp, tag)` if its length is `size` and its
/// pattern is intact, else `None`.
pub(crate) fn parse(b: &[u8], size: usize) -> Option<(u64, u64, u64)> {
    if b.len() != size.max(HEADER) {
        return None;
    }
    let word = |i: usize| {
        b.get(i * 8..i * 8 + 8)
            .and_then(|w| w.try_into().ok())
            .map(u64::from_be_bytes)
    };
    let (index, sent, tag) = (word(0)?, word(1)?, word(2)?);
    let seed = index.wrapping_mul(31).wrapping_add(tag);
    let intact = b[HEADER..]
        .iter()
        .enumerate()
        .all(|(k, &v)| v == (seed.wrapping_add((HEADER + k) as u64) % 251) as u8);
    intact.then_some((index, sent, tag))
}

/// A well-mixed 64-bit hash (splitmix64's finaliser): deterministic "random" choices that the
/// receiving side can recompute.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_parses_back_and_a_flipped_byte_does_not() {
        let b = body(7, 1234, 42, 256);
        assert_eq!(b.len(), 256);
        assert_eq!(parse(&b, 256), Some((7, 1234, 42)));
        let mut bad = b.clone();
        bad[200] ^= 1;
        assert_eq!(parse(&bad, 256), None);
        assert_eq!(parse(&b[..255], 256), None);
        // Another tag changes the pattern: a header rewritten to another recipient fails.
        let mut other = b;
        other[16..24].copy_from_slice(&43u64.to_be_bytes());
        assert_eq!(parse(&other, 256), None);
    }

    #[test]
    fn the_smallest_body_is_its_header() {
        let b = body(1, 2, 3, 0);
        assert_eq!(b.len(), HEADER);
        assert_eq!(parse(&b, 0), Some((1, 2, 3)));
    }

    #[test]
    fn latency_percentiles_by_nearest_rank() {
        let l = Latency::of((1..=100).rev().map(Duration::from_micros).collect());
        assert_eq!((l.p50_us, l.p99_us, l.max_us), (50.0, 99.0, 100.0));
        assert!((l.mean_us - 50.5).abs() < 1e-9);
        let none = Latency::of(Vec::new());
        assert_eq!((none.p50_us, none.mean_us), (0.0, 0.0));
    }
}
