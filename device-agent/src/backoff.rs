//! Exponential backoff with full jitter: the n-th wait is anywhere between
//! zero and `min(max, base * 2^(n-1))`. Full jitter spreads a fleet's retries
//! out, so ten thousand devices do not hit a registry that came back in the
//! same millisecond.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
        }
    }

    /// The upper bound of the wait after the `attempt`-th failure (1-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(32);
        self.base
            .saturating_mul(1u32 << shift.min(31))
            .min(self.max)
    }

    /// `fraction` in [0, 1] picks the point below the ceiling; a pure
    /// function so the bounds are testable without randomness.
    pub fn delay_at(&self, attempt: u32, fraction: f64) -> Duration {
        self.ceiling(attempt).mul_f64(fraction.clamp(0.0, 1.0))
    }

    /// A random wait after the `attempt`-th failure.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_at(attempt, rand::rng().random_range(0.0..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> Backoff {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(60))
    }

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let c: Vec<u64> = (1..=8).map(|a| b().ceiling(a).as_secs()).collect();
        assert_eq!(c, vec![1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b().ceiling(0), Duration::from_secs(1));
        assert_eq!(
            b().ceiling(u32::MAX),
            Duration::from_secs(60),
            "no overflow on huge attempt counts"
        );
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        assert_eq!(b().delay_at(3, 0.0), Duration::ZERO);
        assert_eq!(b().delay_at(3, 1.0), Duration::from_secs(4));
        assert_eq!(b().delay_at(3, 0.5), Duration::from_secs(2));
        assert_eq!(
            b().delay_at(3, 7.0),
            Duration::from_secs(4),
            "fraction is clamped"
        );
        for a in 1..20 {
            let d = b().delay(a);
            assert!(d <= b().ceiling(a), "attempt {a}: {d:?}");
        }
    }

    #[test]
    fn a_cap_below_the_base_is_raised_to_the_base() {
        let b = Backoff::new(Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(b.ceiling(4), Duration::from_secs(5));
    }
}
