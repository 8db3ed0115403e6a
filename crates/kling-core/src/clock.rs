//! A [`governor`] clock that reads tokio's time.
//!
//! governor's own clocks read the system's monotonic clock, which `tokio::time::pause()` cannot
//! stop; with [`TokioClock`] every GCRA decision follows tokio's clock, so paused-time tests are
//! exact and an hour of traffic runs in milliseconds.

use std::ops::Add;
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::nanos::Nanos;

/// A governor [`Clock`] backed by [`tokio::time::Instant`].
///
/// Outside a tokio runtime with paused time it reads the same monotonic clock as
/// [`std::time::Instant`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokioClock;

/// A measurement of [`TokioClock`]: a [`tokio::time::Instant`] that governor can do arithmetic on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokioInstant(tokio::time::Instant);

impl TokioInstant {
    /// Wraps a tokio instant.
    pub fn new(instant: tokio::time::Instant) -> Self {
        TokioInstant(instant)
    }

    /// The tokio instant, to sleep until.
    pub fn into_inner(self) -> tokio::time::Instant {
        self.0
    }
}

impl From<tokio::time::Instant> for TokioInstant {
    fn from(instant: tokio::time::Instant) -> Self {
        TokioInstant(instant)
    }
}

impl Add<Nanos> for TokioInstant {
    type Output = TokioInstant;

    fn add(self, other: Nanos) -> TokioInstant {
        TokioInstant(self.0 + Duration::from(other))
    }
}

impl Reference for TokioInstant {
    fn duration_since(&self, earlier: Self) -> Nanos {
        Nanos::from(self.0.saturating_duration_since(earlier.0))
    }

    fn saturating_sub(&self, duration: Nanos) -> Self {
        self.0
            .checked_sub(Duration::from(duration))
            .map_or(*self, TokioInstant)
    }
}

impl Clock for TokioClock {
    type Instant = TokioInstant;

    fn now(&self) -> TokioInstant {
        TokioInstant(tokio::time::Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use governor::{Quota, RateLimiter};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn governor_decisions_follow_paused_tokio_time() {
        let clock = TokioClock;
        let quota = Quota::per_second(NonZeroU32::new(2).unwrap());
        let limiter = RateLimiter::direct_with_clock(quota, clock);
        assert!(limiter.check().is_ok());
        assert!(limiter.check().is_ok());
        let not_until = limiter.check().unwrap_err();
        let wait = not_until.wait_time_from(clock.now());
        assert_eq!(wait, Duration::from_millis(500));
        tokio::time::advance(wait).await;
        assert!(limiter.check().is_ok());
    }

    #[test]
    fn arithmetic_saturates() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let a = TokioClock.now();
            let b = a + Nanos::from(Duration::from_secs(1));
            assert_eq!(b.duration_since(a), Nanos::from(Duration::from_secs(1)));
            assert_eq!(a.duration_since(b), Nanos::from(0));
            assert_eq!(b.saturating_sub(Nanos::from(Duration::from_secs(1))), a);
        });
    }
}
