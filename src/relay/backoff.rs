//! Exponential backoff with full jitter: after the n-th failed attempt a row
//! waits a uniformly random time between zero and `base * 2^(n-1)`, capped.
//! Spreading retries over the whole window keeps a recovering queue from
//! being hit by the whole backlog at the same instant.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    pub const BASE: Duration = Duration::from_secs(1);

    pub fn new(cap: Duration) -> Self {
        Self { base: Self::BASE, cap: cap.max(Duration::from_millis(1)) }
    }

    /// The upper bound of the wait after `attempts` failed attempts (1-based).
    pub fn ceiling(&self, attempts: u32) -> Duration {
        let exponent = attempts.saturating_sub(1).min(32);
        self.base.saturating_mul(1u32 << exponent.min(31)).min(self.cap)
    }

    pub fn delay(&self, attempts: u32, rng: &mut fastrand::Rng) -> Duration {
        let ceiling = u64::try_from(self.ceiling(attempts).as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rng.u64(0..=ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_from_one_second_up_to_the_cap() {
        let backoff = Backoff::new(Duration::from_secs(300));
        let ceilings: Vec<u64> = (1..=11).map(|n| backoff.ceiling(n).as_secs()).collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff.ceiling(1000), Duration::from_secs(300));
        assert_eq!(backoff.ceiling(0), Duration::from_secs(1));
    }

    #[test]
    fn delays_are_fully_jittered_within_the_ceiling_and_reproducible_with_a_seed() {
        let backoff = Backoff::new(Duration::from_secs(60));
        let schedule = |seed| {
            let mut rng = fastrand::Rng::with_seed(seed);
            (1..=8).map(|n| backoff.delay(n, &mut rng)).collect::<Vec<_>>()
        };
        let first = schedule(42);
        assert_eq!(first, schedule(42), "same seed, same schedule");
        assert_ne!(first, schedule(43));
        for (n, delay) in (1..=8).zip(&first) {
            assert!(*delay <= backoff.ceiling(n), "attempt {n}: {delay:?}");
        }
        // Full jitter: over many draws both halves of the window are used.
        let mut rng = fastrand::Rng::with_seed(7);
        let draws: Vec<Duration> = (0..1000).map(|_| backoff.delay(6, &mut rng)).collect();
        assert!(draws.iter().any(|d| *d < Duration::from_secs(8)));
        assert!(draws.iter().any(|d| *d > Duration::from_secs(24)));
        assert!(draws.iter().all(|d| *d <= Duration::from_secs(32)));
    }

    #[test]
    fn cap_below_base_wins() {
        let backoff = Backoff::new(Duration::from_millis(300));
        assert_eq!(backoff.ceiling(1), Duration::from_millis(300));
    }
}
