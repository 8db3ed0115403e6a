//! [`Quota`]: a rate and a burst, the GCRA parameters of one key.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::ConfigError;

/// The shortest emission interval a quota may have (a billion requests per second).
const MIN_PERIOD: Duration = Duration::from_nanos(1);
/// The longest emission interval a quota may have (about 78 hours, 48 bits of nanoseconds).
const MAX_PERIOD_NANOS: u64 = (1 << 48) - 1;
/// The largest burst a quota may have.
const MAX_BURST: u32 = u16::MAX as u32;
/// The longest burst window (interval × burst) a quota may have, 2^62 ns (about 146 years):
/// governor's theoretical arrival time, in `u64` nanoseconds since the key's limiter started,
/// runs up to that window past the key's age, so the rest of the range is the age a key may
/// reach (about 438 years) before it overflows.
const MAX_BURST_WINDOW_NANOS: u64 = 1 << 62;

/// A GCRA quota: one request per `period` on average, up to `burst` back to back.
///
/// Built from a rate ([`Quota::per_minute`], [`Quota::per_second`]) or an emission interval
/// ([`Quota::with_period`]); fractional rates are exact to the nanosecond, so a 5% headroom
/// under 60 per minute is simply `Quota::per_minute(60.0).with_headroom(0.05)`. The
/// constructors never panic: an invalid value (a rate that is zero, negative or not finite, a
/// burst of zero or one whose window, interval × burst, passes 146 years, a headroom outside
/// `0..1`) is kept and reported, naming the field, when the layer is built.
///
/// ```
/// use std::time::Duration;
/// use kling_ratelimit::Quota;
///
/// let pro = Quota::per_minute(60.0).with_headroom(0.05);
/// assert_eq!(pro.period(), Duration::from_nanos(1_052_631_579));
/// assert_eq!(pro.burst(), 1);
/// // A mock running 60 times faster than real time needs a quota 60 times faster.
/// assert_eq!(Quota::per_minute(60.0).scaled(60.0).period(), Duration::from_nanos(16_666_667));
/// assert!(Quota::per_second(0.0).validate().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    period: Duration,
    burst: u32,
    invalid: Option<(&'static str, &'static str)>,
}

impl Quota {
    /// `rate` requests per second, burst 1.
    pub fn per_second(rate: f64) -> Quota {
        Quota::from_rate(rate, 1.0)
    }

    /// `rate` requests per minute, burst 1.
    pub fn per_minute(rate: f64) -> Quota {
        Quota::from_rate(rate, 60.0)
    }

    /// One request per `period`, burst 1.
    pub fn with_period(period: Duration) -> Quota {
        let mut quota = Quota {
            period,
            burst: 1,
            invalid: None,
        };
        if period < MIN_PERIOD || period.as_nanos() > u128::from(MAX_PERIOD_NANOS) {
            quota.invalid = Some((
                "rate",
                "the interval between requests must lie between 1 ns and 78 hours",
            ));
        }
        quota
    }

    fn from_rate(rate: f64, per_secs: f64) -> Quota {
        if !(rate.is_finite() && rate > 0.0) {
            return Quota {
                period: Duration::ZERO,
                burst: 1,
                invalid: Some(("rate", "must be a positive, finite number")),
            };
        }
        let nanos = (per_secs * 1e9 / rate).round();
        if nanos > MAX_PERIOD_NANOS as f64 {
            return Quota::with_period(Duration::MAX);
        }
        Quota::with_period(Duration::from_nanos(nanos as u64))
    }

    /// Allows `burst` requests back to back (1 means perfectly even spacing).
    pub fn with_burst(mut self, burst: u32) -> Quota {
        self.burst = burst;
        if (burst == 0 || burst > MAX_BURST) && self.invalid.is_none() {
            self.invalid = Some(("burst", "must lie between 1 and 65535"));
        }
        if self.period.as_nanos() * u128::from(burst) > u128::from(MAX_BURST_WINDOW_NANOS)
            && self.invalid.is_none()
        {
            self.invalid = Some(("burst", "times the interval must be at most 146 years"));
        }
        self
    }

    /// Lowers the rate by `fraction` (0.05 = 5% under the nominal rate), so network jitter does
    /// not turn into refusals from a server that enforces the nominal rate exactly.
    pub fn with_headroom(self, fraction: f64) -> Quota {
        if !(0.0..1.0).contains(&fraction) {
            let mut quota = self;
            quota
                .invalid
                .get_or_insert(("headroom", "must lie in 0..1"));
            return quota;
        }
        self.map_period(1.0 / (1.0 - fraction))
    }

    /// Multiplies the rate by `speed` (and keeps the burst): the shared speed factor of the
    /// mock server and the socket tests.
    pub fn scaled(self, speed: f64) -> Quota {
        if !(speed.is_finite() && speed > 0.0) {
            let mut quota = self;
            quota
                .invalid
                .get_or_insert(("speed", "must be a positive, finite number"));
            return quota;
        }
        self.map_period(1.0 / speed)
    }

    fn map_period(self, factor: f64) -> Quota {
        if self.invalid.is_some() {
            return self;
        }
        let nanos = (self.period.as_nanos() as f64 * factor).round();
        let period = if nanos > MAX_PERIOD_NANOS as f64 {
            Duration::MAX
        } else {
            Duration::from_nanos(nanos as u64)
        };
        Quota::with_period(period).with_burst(self.burst)
    }

    /// The emission interval: the average time between two requests.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// How many requests may go back to back.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// The rate in requests per second.
    pub fn rate_per_second(&self) -> f64 {
        1.0 / self.period.as_secs_f64()
    }

    /// One of `processes` processes' share: the rate divided among them, the burst kept, and
    /// never slower than the slowest quota a limiter keeps (an interval of hours shared by
    /// many processes would otherwise leave the bounds [`scaled`](Self::scaled) checks, and
    /// be invalid). A valid quota's share is valid.
    pub fn share(self, processes: u32) -> Quota {
        if processes <= 1 {
            return self;
        }
        self.at_most(self.rate_per_second() / f64::from(processes))
    }

    /// Checks the quota, naming the invalid field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_as("quota")
    }

    pub(crate) fn validate_as(&self, owner: &'static str) -> Result<(), ConfigError> {
        match self.invalid {
            Some((field, reason)) => Err(ConfigError::new(owner, field, reason)),
            None => Ok(()),
        }
    }

    /// The governor quota with the same parameters. An invalid quota (a [`Policy`] is public,
    /// so one may reach a backend unchecked) is brought within the bounds a valid one keeps,
    /// rather than panic in governor (an interval past 584 years) or overflow its arithmetic.
    ///
    /// [`Policy`]: crate::Policy
    pub(crate) fn to_governor(self) -> governor::Quota {
        let period = self
            .period
            .clamp(MIN_PERIOD, Duration::from_nanos(MAX_PERIOD_NANOS));
        let widest = MAX_BURST_WINDOW_NANOS / period.as_nanos() as u64;
        let burst = u64::from(self.burst).clamp(1, u64::from(MAX_BURST).min(widest));
        let burst = std::num::NonZeroU32::new(burst as u32).expect("at least 1");
        governor::Quota::with_period(period)
            .expect("non-zero period")
            .allow_burst(burst)
    }

    /// The quota with the rate lowered to `rate` per second when that is slower (the adaptive
    /// rate never raises the configured ceiling), within the bounds a valid quota keeps.
    pub(crate) fn at_most(self, rate: f64) -> Quota {
        let nanos = (1e9 / rate).round();
        if nanos.is_finite() && nanos > self.period.as_nanos() as f64 {
            let longest =
                MAX_PERIOD_NANOS.min(MAX_BURST_WINDOW_NANOS / u64::from(self.burst.max(1)));
            let nanos = nanos.min(longest as f64).max(self.period.as_nanos() as f64) as u64;
            Quota {
                period: Duration::from_nanos(nanos),
                burst: self.burst,
                invalid: None,
            }
        } else {
            self
        }
    }

    fn pack(self) -> u64 {
        (u64::from(self.burst) << 48) | (self.period.as_nanos() as u64 & MAX_PERIOD_NANOS)
    }

    fn unpack(bits: u64) -> Quota {
        Quota {
            period: Duration::from_nanos(bits & MAX_PERIOD_NANOS),
            burst: (bits >> 48) as u32,
            invalid: None,
        }
    }
}

/// A valid quota that can be read and replaced at run time without a lock.
#[derive(Debug)]
pub(crate) struct QuotaCell(AtomicU64);

impl QuotaCell {
    pub(crate) fn new(quota: Quota) -> Self {
        QuotaCell(AtomicU64::new(quota.pack()))
    }

    #[inline]
    pub(crate) fn get(&self) -> Quota {
        Quota::unpack(self.0.load(Ordering::Acquire))
    }

    pub(crate) fn set(&self, quota: Quota) {
        self.0.store(quota.pack(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_become_periods() {
        assert_eq!(Quota::per_second(2.0).period(), Duration::from_millis(500));
        assert_eq!(Quota::per_minute(60.0).period(), Duration::from_secs(1));
        assert_eq!(Quota::per_minute(30.0).with_burst(3).burst(), 3);
        assert!((Quota::per_minute(120.0).rate_per_second() - 2.0).abs() < 1e-9);
    }

    #[test]
    fn a_share_divides_the_rate_and_stays_valid_however_many_processes() {
        let quota = Quota::per_minute(60.0).with_burst(4);
        assert_eq!(quota.share(1), quota);
        assert_eq!(quota.share(0), quota);
        let quarter = quota.share(4);
        assert_eq!(
            (quarter.period(), quarter.burst()),
            (Duration::from_secs(4), 4)
        );
        // Ten hours between requests, over 100 processes: 1,000 hours each is past the
        // longest interval; the share is the slowest valid quota instead.
        for burst in [1, 65_535] {
            let slow = Quota::with_period(Duration::from_secs(10 * 3600)).with_burst(burst);
            let share = slow.share(100);
            assert!(share.validate().is_ok(), "{share:?}");
            assert!(share.period() > slow.period());
            assert_eq!(share.burst(), burst);
        }
    }

    #[test]
    fn invalid_values_name_their_field() {
        let err = Quota::per_minute(f64::NAN).validate().unwrap_err();
        assert_eq!(err.field(), "quota.rate");
        let err = Quota::per_minute(1.0).with_burst(0).validate().unwrap_err();
        assert_eq!(err.field(), "quota.burst");
        let err = Quota::per_minute(1.0)
            .with_headroom(1.0)
            .validate()
            .unwrap_err();
        assert_eq!(err.field(), "quota.headroom");
        assert!(Quota::per_second(3e9).validate().is_err());
        assert!(Quota::per_minute(1.0).scaled(-1.0).validate().is_err());
    }

    /// A burst window (interval × burst) past 2^62 ns, about 146 years, is refused: governor's
    /// theoretical arrival time, nanoseconds since the key's limiter started, reaches that
    /// window past the key's age, and a 78-hour interval with a burst of 65535 (2^64 ns)
    /// overflowed it once the key was 78 hours old (a panic, or in release every request
    /// admitted from then on).
    #[test]
    fn a_burst_window_past_146_years_is_refused() {
        let longest = Duration::from_nanos(MAX_PERIOD_NANOS);
        let err = Quota::with_period(longest)
            .with_burst(MAX_BURST)
            .validate()
            .unwrap_err();
        assert_eq!(err.field(), "quota.burst");
        // Also when a headroom or a speed takes the interval there.
        let near = Quota::with_period(longest / 4).with_burst(MAX_BURST);
        assert!(near.validate().is_ok());
        assert_eq!(
            near.scaled(0.5).validate().unwrap_err().field(),
            "quota.burst"
        );
        let edge = MAX_BURST_WINDOW_NANOS / u64::from(MAX_BURST);
        assert!(
            Quota::with_period(Duration::from_nanos(edge))
                .with_burst(MAX_BURST)
                .validate()
                .is_ok()
        );
        assert!(
            Quota::with_period(Duration::from_nanos(edge + 1))
                .with_burst(MAX_BURST)
                .validate()
                .is_err()
        );
    }

    #[test]
    fn cells_round_trip() {
        let quota = Quota::per_minute(57.0).with_burst(7);
        let cell = QuotaCell::new(quota);
        assert_eq!(cell.get(), quota);
        let slower = Quota::with_period(Duration::from_secs(3600));
        cell.set(slower);
        assert_eq!(cell.get(), slower);
    }

    /// The clamp that holds an unchecked quota within bounds leaves a valid one as it was:
    /// over valid quotas (the edges of the interval, the burst and the burst window included),
    /// the governor quota is the one built from the quota's own interval and burst.
    #[test]
    fn a_valid_quota_reaches_governor_unchanged() {
        use proptest::prelude::*;

        let config = proptest::test_runner::Config {
            cases: 2048,
            failure_persistence: None,
            ..Default::default()
        };
        let mut runner = proptest::test_runner::TestRunner::new(config);
        let period = prop_oneof![
            Just(1u64),
            Just(MAX_PERIOD_NANOS),
            Just(MAX_BURST_WINDOW_NANOS / u64::from(MAX_BURST)),
            1u64..=MAX_PERIOD_NANOS,
            1u64..=10_000_000_000,
        ];
        let burst = prop_oneof![Just(1u32), Just(MAX_BURST), 1u32..=MAX_BURST, 1u32..=10];
        let valid = std::cell::Cell::new(0u32);
        runner
            .run(&(period, burst), |(nanos, burst)| {
                let quota = Quota::with_period(Duration::from_nanos(nanos)).with_burst(burst);
                if quota.validate().is_err() {
                    return Ok(());
                }
                valid.set(valid.get() + 1);
                let own = governor::Quota::with_period(Duration::from_nanos(nanos))
                    .unwrap()
                    .allow_burst(std::num::NonZeroU32::new(burst).unwrap());
                prop_assert_eq!(quota.to_governor(), own);
                Ok(())
            })
            .unwrap();
        assert!(valid.get() > 1000, "{} valid quotas", valid.get());
    }

    #[test]
    fn at_most_only_slows_down() {
        let quota = Quota::per_second(10.0);
        assert_eq!(quota.at_most(20.0), quota);
        assert_eq!(quota.at_most(5.0).period(), Duration::from_millis(200));
        // Nor past the longest burst window (its burst kept), nor faster for a quota handed
        // in unchecked (a `Policy` is public), nor with a panic for a burst of zero.
        let window = MAX_BURST_WINDOW_NANOS / u64::from(MAX_BURST);
        let wide = Quota::per_second(1.0).with_burst(MAX_BURST);
        assert_eq!(wide.at_most(1e-9).period(), Duration::from_nanos(window));
        let unchecked = Quota::with_period(Duration::from_nanos(MAX_PERIOD_NANOS / 2));
        let unchecked = unchecked.with_burst(MAX_BURST);
        assert_eq!(unchecked.at_most(1e-9).period(), unchecked.period());
        let zero = Quota::per_second(1.0).with_burst(0);
        assert!(zero.at_most(1e-9).period() >= zero.period());
    }
}
