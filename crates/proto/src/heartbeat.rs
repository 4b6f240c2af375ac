//! Heartbeat scheduling and peer liveness (seed 001, section 3.2).
//!
//! [`Liveness`] answers two questions for one connection: is a heartbeat due, and has the peer
//! been silent long enough to be declared dead. It reads no clock; the caller passes `now` and
//! sleeps until [`Liveness::poll_timeout`]. Anything heard from the peer (a heartbeat, a PONG,
//! data) counts as a sign of life. Instants that would overflow saturate to the far future
//! instead of panicking, and an earlier `now` never moves a deadline backwards.

use std::time::{Duration, Instant};

/// Shortest interval; a zero interval would make every poll due and the caller spin.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// Heartbeat timer and dead-peer deadline of one connection.
#[derive(Debug, Clone)]
pub struct Liveness {
    interval: Duration,
    misses: u32,
    last_heard: Instant,
    next_send: Instant,
}

impl Liveness {
    /// interval: how often we send; misses: how many intervals of silence from the peer mean it
    /// is dead.
    ///
    /// The first heartbeat is due one interval after `now`, and the peer counts as heard at
    /// `now`. `misses` 0 is treated as 1; an interval below 1 ms is raised to 1 ms.
    pub fn new(interval: Duration, misses: u32, now: Instant) -> Self {
        let interval = interval.max(MIN_INTERVAL);
        Self {
            interval,
            misses: misses.max(1),
            last_heard: now,
            next_send: saturating_add(now, interval),
        }
    }

    /// Anything heard from the peer resets its deadline.
    pub fn handle_heard(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
    }

    /// True if a heartbeat is due at `now`; marks it sent (next due one interval later).
    ///
    /// The next one is scheduled from `now`, so a caller that woke late sends one heartbeat,
    /// not a burst of overdue ones.
    pub fn poll_send(&mut self, now: Instant) -> bool {
        if now < self.next_send {
            return false;
        }
        self.next_send = saturating_add(now, self.interval);
        true
    }

    /// When the peer is declared dead if nothing is heard: last_heard + interval * misses.
    pub fn deadline(&self) -> Instant {
        saturating_add(self.last_heard, self.interval.saturating_mul(self.misses))
    }

    /// Whether the peer has been silent up to its deadline (`now >= deadline`).
    pub fn is_dead(&self, now: Instant) -> bool {
        now >= self.deadline()
    }

    /// The next instant the caller must wake up: min(next send, deadline).
    pub fn poll_timeout(&self) -> Instant {
        self.next_send.min(self.deadline())
    }

    /// How often heartbeats are sent.
    pub fn interval(&self) -> Duration {
        self.interval
    }
}

/// `t + d`, or the latest representable instant on the way there if that overflows.
fn saturating_add(t: Instant, d: Duration) -> Instant {
    if let Some(sum) = t.checked_add(d) {
        return sum;
    }
    // Greedy descent: each step size is added while it fits, then halved. Bounded by the
    // number of bits in a Duration (about 2 successes per halving).
    let mut out = t;
    let mut step = d;
    while !step.is_zero() {
        match out.checked_add(step) {
            Some(next) => out = next,
            None => step /= 2,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn heartbeats_are_due_every_interval() {
        let t0 = Instant::now();
        let mut l = Liveness::new(secs(30), 3, t0);
        assert_eq!(l.interval(), secs(30));
        assert!(!l.poll_send(t0));
        assert!(!l.poll_send(t0 + Duration::from_millis(29_999)));
        assert!(l.poll_send(t0 + secs(30)));
        assert!(!l.poll_send(t0 + secs(30)), "marked sent");
        assert!(!l.poll_send(t0 + secs(59)));
        assert!(l.poll_send(t0 + secs(60)));
        // Woke up late: one heartbeat now, the next a full interval later.
        assert!(l.poll_send(t0 + secs(200)));
        assert!(!l.poll_send(t0 + secs(229)));
        assert!(l.poll_send(t0 + secs(230)));
    }

    #[test]
    fn dead_exactly_at_the_deadline() {
        let t0 = Instant::now();
        let l = Liveness::new(secs(10), 3, t0);
        assert_eq!(l.deadline(), t0 + secs(30));
        assert!(!l.is_dead(t0));
        assert!(!l.is_dead(t0 + secs(30) - Duration::from_nanos(1)));
        assert!(l.is_dead(t0 + secs(30)));
        assert!(l.is_dead(t0 + secs(31)));
    }

    #[test]
    fn sending_does_not_keep_the_peer_alive() {
        let t0 = Instant::now();
        let mut l = Liveness::new(secs(10), 2, t0);
        assert!(l.poll_send(t0 + secs(10)));
        assert!(l.poll_send(t0 + secs(20)));
        assert!(l.is_dead(t0 + secs(20)));
    }

    #[test]
    fn heard_resets_the_deadline() {
        let t0 = Instant::now();
        let mut l = Liveness::new(secs(10), 3, t0);
        l.handle_heard(t0 + secs(25));
        assert_eq!(l.deadline(), t0 + secs(55));
        assert!(!l.is_dead(t0 + secs(54)));
        assert!(l.is_dead(t0 + secs(55)));
        // An earlier instant does not pull the deadline back.
        l.handle_heard(t0 + secs(5));
        assert_eq!(l.deadline(), t0 + secs(55));
    }

    #[test]
    fn poll_timeout_is_the_earlier_of_send_and_deadline() {
        let t0 = Instant::now();
        let mut l = Liveness::new(secs(10), 3, t0);
        assert_eq!(l.poll_timeout(), t0 + secs(10));
        assert!(l.poll_send(t0 + secs(10)));
        assert_eq!(l.poll_timeout(), t0 + secs(20));
        assert!(l.poll_send(t0 + secs(25)));
        // Next send at 35, deadline at 30.
        assert_eq!(l.poll_timeout(), t0 + secs(30));
        l.handle_heard(t0 + secs(26));
        assert_eq!(l.poll_timeout(), t0 + secs(35));
    }

    #[test]
    fn zero_misses_means_one() {
        let t0 = Instant::now();
        let l = Liveness::new(secs(10), 0, t0);
        assert_eq!(l.deadline(), t0 + secs(10));
        assert!(!l.is_dead(t0 + secs(9)));
        assert!(l.is_dead(t0 + secs(10)));
        assert_eq!(l.poll_timeout(), t0 + secs(10));
    }

    #[test]
    fn zero_interval_does_not_spin() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Duration::ZERO, 1, t0);
        assert_eq!(l.interval(), MIN_INTERVAL);
        assert!(l.poll_send(t0 + MIN_INTERVAL));
        assert!(!l.poll_send(t0 + MIN_INTERVAL));
    }

    #[test]
    fn huge_durations_saturate() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Duration::MAX, u32::MAX, t0);
        let far = l.deadline();
        assert!(far > t0 + secs(1_000_000_000));
        assert!(!l.is_dead(t0 + secs(1_000_000_000)));
        assert!(!l.poll_send(t0 + secs(1_000_000_000)));
        assert!(l.poll_timeout() > t0 + secs(1_000_000_000));
        // Saturation lands on (about) the last representable instant.
        assert!(far.checked_add(secs(1)).is_none());
        l.handle_heard(t0 + secs(1));
        assert!(l.deadline() >= far);
        assert_eq!(saturating_add(t0, secs(5)), t0 + secs(5));
    }
}
