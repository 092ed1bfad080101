//! Backoff between delivery attempts, as a pure function of the attempt number.
//!
//! edgeHub's store-and-forward policy: exponential, from 1 s up to 60 s, with no limit on the
//! number of retries (a message is retried until its TTL passes). There is no jitter: each
//! endpoint has one worker, so there is no herd to spread, and tests get exact delays.

use std::time::Duration;

/// Exponential backoff: `min + delta × (2^(failures−1) − 1)`, capped at `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay after the first failure.
    pub min: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Growth unit.
    pub delta: Duration,
}

impl Default for RetryPolicy {
    /// edgeHub's store-and-forward values (`RoutingModule` `EndpointExecutorConfig`).
    fn default() -> Self {
        RetryPolicy {
            min: Duration::from_secs(1),
            max: Duration::from_secs(60),
            delta: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// How long to wait after `failures` consecutive failed attempts (`failures ≥ 1`; 0 gives no
    /// wait). Never exceeds `max`, never overflows.
    pub fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let growth = 1u32
            .checked_shl(failures - 1)
            .map_or(u32::MAX, |g| g.saturating_sub(1));
        let extra = self.delta.saturating_mul(growth);
        self.min.saturating_add(extra).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_doubles_from_one_second_up_to_a_minute() {
        let p = RetryPolicy::default();
        let secs: Vec<u64> = (1..=8).map(|n| p.delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn no_failure_means_no_wait() {
        assert_eq!(RetryPolicy::default().delay(0), Duration::ZERO);
    }

    #[test]
    fn huge_attempt_numbers_stay_at_the_cap() {
        let p = RetryPolicy::default();
        for n in [31, 32, 33, 1000, u32::MAX] {
            assert_eq!(p.delay(n), p.max, "attempt {n}");
        }
    }

    #[test]
    fn delays_never_decrease() {
        let p = RetryPolicy {
            min: Duration::from_millis(10),
            max: Duration::from_secs(5),
            delta: Duration::from_millis(7),
        };
        let delays: Vec<Duration> = (1..100).map(|n| p.delay(n)).collect();
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
    }
}
