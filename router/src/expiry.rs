//! TTL decisions, given an injected "now", and a clock that follows tokio's (pausable) time.
//!
//! Time is a [`store::Clock`], shared with the store so that both agree on what has expired.
//! Production uses [`store::SystemClock`]; tests use [`TokioClock`] and move it with
//! `tokio::time::advance`.

use store::{Clock, UnixMillis};

use crate::route::Ttl;

/// When a message enqueued at `now` with `ttl` expires (`None`: never).
pub fn expiry_at(now: UnixMillis, ttl: Ttl) -> Option<UnixMillis> {
    match ttl {
        Ttl::Infinite => None,
        Ttl::Seconds(s) => Some(now.plus_millis(s.saturating_mul(1000))),
    }
}

/// Whether a message with `expiry` has expired at `now` (expired at the instant itself, as the
/// store decides).
pub fn is_expired(expiry: Option<UnixMillis>, now: UnixMillis) -> bool {
    expiry.is_some_and(|e| e <= now)
}

/// The expiry that outlasts all of `expiries` (`None`, never, if any is `None`).
pub fn latest(expiries: impl IntoIterator<Item = Option<UnixMillis>>) -> Option<UnixMillis> {
    let mut latest = Some(UnixMillis(0));
    for e in expiries {
        latest = match (latest, e) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
    latest
}

/// A wall clock anchored when created, that advances with `tokio::time::Instant`: under paused
/// tokio time it moves only with `advance` (and tokio's auto-advance), so tests control TTLs.
#[derive(Debug, Clone)]
pub struct TokioClock {
    start_wall: UnixMillis,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock reading `start_wall` now.
    pub fn new(start_wall: UnixMillis) -> Self {
        TokioClock {
            start_wall,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> UnixMillis {
        let elapsed = self.start.elapsed().as_millis();
        self.start_wall
            .plus_millis(u64::try_from(elapsed).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ttl_counts_from_enqueue() {
        assert_eq!(
            expiry_at(UnixMillis(1_000), Ttl::Seconds(2)),
            Some(UnixMillis(3_000))
        );
        assert_eq!(expiry_at(UnixMillis(1_000), Ttl::Infinite), None);
        assert_eq!(
            expiry_at(UnixMillis(1), Ttl::Seconds(u64::MAX)),
            Some(UnixMillis(u64::MAX))
        );
    }

    #[test]
    fn a_message_expires_at_its_expiry_instant() {
        assert!(!is_expired(Some(UnixMillis(10)), UnixMillis(9)));
        assert!(is_expired(Some(UnixMillis(10)), UnixMillis(10)));
        assert!(!is_expired(None, UnixMillis(u64::MAX)));
    }

    #[test]
    fn never_outlasts_every_instant() {
        let a = Some(UnixMillis(5));
        let b = Some(UnixMillis(9));
        assert_eq!(latest([a, b]), b);
        assert_eq!(latest([a, None, b]), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_moves_with_paused_time() {
        let clock = TokioClock::new(UnixMillis(1_000));
        assert_eq!(clock.now(), UnixMillis(1_000));
        tokio::time::advance(std::time::Duration::from_secs(3)).await;
        assert_eq!(clock.now(), UnixMillis(4_000));
    }
}
