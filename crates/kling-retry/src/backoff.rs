//! How long to wait before a retry: the server's hint when it gave one, else exponential backoff
//! with full jitter.

use std::time::Duration;

use crate::error::ConfigError;
use crate::rng::RandomSource;

/// Why a retry waits, which picks the backoff base.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DelayKind {
    /// No wait: a task-slots layer below holds the retried create until a slot frees (a `1303`
    /// that carries [`kling_core::signals::SlotGated`]).
    Immediate,
    /// A transient fault (`5000`, `5002`, a 5xx without an envelope, a connection error, a
    /// timeout): full jitter over the transient base.
    Transient,
    /// Throttled (`1302`): at least the throttle base (1 s, as Kling advises), plus jitter.
    Throttled,
    /// Maintenance (`5001`): at least the maintenance base, plus jitter.
    Maintenance,
    /// No task slot free (`1303`) and no slots layer below: like [`DelayKind::Throttled`].
    SlotFull,
}

impl DelayKind {
    /// The kind's name in the `reason` label of [`kling_core::metrics::RETRIES`].
    pub fn as_str(self) -> &'static str {
        match self {
            DelayKind::Immediate => "slot_gated",
            DelayKind::Transient => "transient",
            DelayKind::Throttled => "throttled",
            DelayKind::Maintenance => "maintenance",
            DelayKind::SlotFull => "slot_full",
        }
    }
}

/// The delay rules, with their documented bounds.
///
/// For retry number `r` (1 for the first retry) without a server hint, the delay is drawn
/// uniformly from `[floor, floor + min(max_backoff, base × 2^(r−1))]`:
///
/// | kind | base | floor |
/// |---|---|---|
/// | [`Immediate`](DelayKind::Immediate) | — | 0 (no wait at all) |
/// | [`Transient`](DelayKind::Transient) | `transient_base` (200 ms) | 0 (full jitter) |
/// | [`Throttled`](DelayKind::Throttled), [`SlotFull`](DelayKind::SlotFull) | `throttle_base` (1 s) | `throttle_base` |
/// | [`Maintenance`](DelayKind::Maintenance) | `maintenance_base` (5 s) | `maintenance_base` |
///
/// The retry layer draws it from the part of that range before the call's deadline when the
/// floor is before it (the jitter spreads callers, and is not worth giving a call up for); a
/// floor at or past the deadline ends the call ([`DeadlineExceeded`], resuming at the floor).
///
/// With a `Retry-After` hint `h` (either form), the delay counts from the response's arrival
/// and is drawn from `[min(h, max_retry_after), min(h, max_retry_after) + retry_after_jitter]`:
/// jitter only upward, so a retry is never early. The retry layer never sends sooner than `h`:
/// a hint over `max_retry_after` (which caps what a proxy can make a client wait; the default
/// is 2 minutes) ends the call ([`StopReason::RetryAfterTooLong`]), as does one that ends at or
/// past the call's deadline ([`DeadlineExceeded`]); jitter that would carry a retry to the
/// deadline is dropped. It raises `h` to the kind's floor first ([`RetryLayer`]: a
/// `Retry-After: 0` on a `1302` still waits a second, plus the jitter, also when
/// `max_retry_after` is set below the floor).
///
/// [`StopReason::RetryAfterTooLong`]: crate::error::StopReason::RetryAfterTooLong
/// [`DeadlineExceeded`]: crate::error::DeadlineExceeded
/// [`RetryLayer`]: crate::RetryLayer
///
/// A create that may have made a task (a `5000`, a timeout) is first looked up by its external
/// id, and a lookup's "no such task" sends it again. That lookup waits
/// [`lookup_settle`](Self::lookup_settle) (2 s) on top of the delay above (whose jitter is
/// then drawn from what fits before the deadline with it), counted from the failed attempt's
/// end: a task the server is still making (a create queued behind a timeout, a
/// `5002`'s backlog), or has made but not yet indexed by its external id, is not found by a
/// lookup sent at once, and that "not found" would send the create again: a second billed
/// task.
///
/// Every duration must be positive but `retry_after_jitter` and `lookup_settle`, which may be
/// zero; `retry_after_jitter` at most the longest wait it is added to (`max_retry_after`, or
/// the throttle or maintenance base when larger: the floor a hint is raised to). The waits
/// (the three bases, the jitter, the settle) are at most a day
/// ([`kling_core::MAX_RETRY_AFTER`], the longest wait a server can ask for here): longer, they
/// are waits no server asked for ([`validate`](Self::validate) refuses them). The caps
/// (`max_backoff`, `max_retry_after`) have no ceiling: a larger cap waits no longer. `max_backoff`
/// (30 s) caps the exponential part only: a throttle or maintenance base above it still waits
/// at least the base, and a transient base above it draws from `[0, max_backoff]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    throttle_base: Duration,
    transient_base: Duration,
    maintenance_base: Duration,
    max_backoff: Duration,
    max_retry_after: Duration,
    retry_after_jitter: Duration,
    lookup_settle: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            throttle_base: Duration::from_secs(1),
            transient_base: Duration::from_millis(200),
            maintenance_base: Duration::from_secs(5),
            max_backoff: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(120),
            retry_after_jitter: Duration::from_millis(500),
            lookup_settle: Duration::from_secs(2),
        }
    }
}

impl Backoff {
    /// Kling's defaults (see the table above).
    pub fn new() -> Self {
        Backoff::default()
    }

    /// Sets the base and floor of throttled and slot-full waits (Kling advises 1 s or more; go
    /// lower only against a sped-up mock). At most a day.
    pub fn throttle_base(mut self, base: Duration) -> Self {
        self.throttle_base = base;
        self
    }

    /// Sets the base of transient-fault waits (at most a day).
    pub fn transient_base(mut self, base: Duration) -> Self {
        self.transient_base = base;
        self
    }

    /// Sets the base and floor of maintenance (`5001`) waits (at most a day).
    pub fn maintenance_base(mut self, base: Duration) -> Self {
        self.maintenance_base = base;
        self
    }

    /// Sets the cap on the exponential part of a backoff.
    pub fn max_backoff(mut self, max: Duration) -> Self {
        self.max_backoff = max;
        self
    }

    /// Sets the longest `Retry-After` the retry layer waits out; a longer one ends the call with
    /// [`StopReason::RetryAfterTooLong`](crate::error::StopReason::RetryAfterTooLong) instead
    /// of a retry sooner than the server asked. ([`hint_bounds`](Self::hint_bounds) clamps.)
    /// Above a day it ends the call all the same: kling-core reads a longer wait as
    /// [`kling_core::MAX_RETRY_AFTER`], which says only "a day or more".
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// Sets the most jitter added above a `Retry-After` hint (zero for none; at most a day,
    /// and at most `max_retry_after` or the throttle or maintenance base, whichever is
    /// largest: the longest wait it is added to).
    pub fn retry_after_jitter(mut self, jitter: Duration) -> Self {
        self.retry_after_jitter = jitter;
        self
    }

    /// Sets how long after an attempt that may have made a task its create's lookup waits at
    /// least (on top of the backoff), so that its "no such task", which sends the create again,
    /// is not read before the server has recorded a task it is still making. Zero looks up
    /// after the backoff alone: only against a server that records a create before it answers
    /// and whose lookups read what it recorded. At most a day. Not checked against the
    /// deadline: a settle that does not fit before a call's ends that call without a lookup
    /// ([`DeadlineExceeded`](crate::error::DeadlineExceeded), naming the external id), which
    /// a caller that chose a short deadline may mean.
    pub fn lookup_settle(mut self, settle: Duration) -> Self {
        self.lookup_settle = settle;
        self
    }

    /// Checks every field; the error names the first invalid one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("backoff.throttle_base", self.throttle_base),
            ("backoff.transient_base", self.transient_base),
            ("backoff.maintenance_base", self.maintenance_base),
            ("backoff.max_backoff", self.max_backoff),
            ("backoff.max_retry_after", self.max_retry_after),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(field, "must be positive"));
            }
        }
        // Jitter spreads callers over a wait the server asked for; longer than the longest
        // such wait the layer takes, it is a wait of its own that no server asked for. That
        // wait is the hint raised to its kind's floor: a `max_retry_after` below a floor (as
        // documented) still waits the floor, and the jitter over it.
        if self.retry_after_jitter > self.longest_hinted_wait() {
            return Err(ConfigError::new(
                "backoff.retry_after_jitter",
                "must be at most the longest wait it is added to: `backoff.max_retry_after` \
                 (the longest `Retry-After` waited out), or the throttle or maintenance base \
                 when larger (the floor a `Retry-After` is raised to)",
            ));
        }
        // The waits taken as they are set (a base is the least wait of its kind), not the
        // caps: a `max_backoff` or `max_retry_after` above a day waits no longer (the latter
        // ends the call at a day all the same), and a speed of a thousandth takes the default
        // two minutes of `max_retry_after` past a day.
        for (field, value) in [
            ("backoff.throttle_base", self.throttle_base),
            ("backoff.transient_base", self.transient_base),
            ("backoff.maintenance_base", self.maintenance_base),
            ("backoff.retry_after_jitter", self.retry_after_jitter),
            ("backoff.lookup_settle", self.lookup_settle),
        ] {
            if value > kling_core::MAX_RETRY_AFTER {
                return Err(ConfigError::new(
                    field,
                    "must be at most a day (86400 s, the longest `Retry-After` kling-core reads)",
                ));
            }
        }
        Ok(())
    }

    /// The longest wait a `Retry-After` can be waited out as, before its jitter: the hint
    /// up to `max_retry_after`, raised to its kind's floor.
    fn longest_hinted_wait(&self) -> Duration {
        self.max_retry_after
            .max(self.throttle_base)
            .max(self.maintenance_base)
    }

    /// Scales every duration by `1 / speed`, for a mock that runs `speed` times faster than
    /// Kling (the shared speed factor of socket tests and demos). A non-positive or non-finite
    /// speed leaves the rules unchanged; a duration scaled past [`Duration::MAX`] saturates.
    pub fn sped_up(self, speed: f64) -> Self {
        if !(speed.is_finite() && speed > 0.0) {
            return self;
        }
        // Not `from_secs_f64`, which panics when a tiny speed takes the quotient past the
        // range: such a duration saturates.
        let scale = |d: Duration| {
            Duration::try_from_secs_f64(d.as_secs_f64() / speed)
                .unwrap_or(Duration::MAX)
                .max(Duration::from_nanos(1))
        };
        Backoff {
            throttle_base: scale(self.throttle_base),
            transient_base: scale(self.transient_base),
            maintenance_base: scale(self.maintenance_base),
            max_backoff: scale(self.max_backoff),
            max_retry_after: scale(self.max_retry_after),
            retry_after_jitter: if self.retry_after_jitter.is_zero() {
                Duration::ZERO
            } else {
                scale(self.retry_after_jitter)
            },
            lookup_settle: if self.lookup_settle.is_zero() {
                Duration::ZERO
            } else {
                scale(self.lookup_settle)
            },
        }
    }

    /// The inclusive range a delay of `kind` for retry number `retry` (1-based) is drawn from.
    pub fn bounds(&self, kind: DelayKind, retry: u32) -> (Duration, Duration) {
        let (base, floor) = match kind {
            DelayKind::Immediate => return (Duration::ZERO, Duration::ZERO),
            DelayKind::Transient => (self.transient_base, Duration::ZERO),
            DelayKind::Throttled | DelayKind::SlotFull => (self.throttle_base, self.throttle_base),
            DelayKind::Maintenance => (self.maintenance_base, self.maintenance_base),
        };
        let doublings = retry.saturating_sub(1).min(31);
        let exponential = base.saturating_mul(1u32 << doublings).min(self.max_backoff);
        (floor, floor.saturating_add(exponential))
    }

    /// A delay of `kind` for retry number `retry`, drawn uniformly within [`Backoff::bounds`].
    pub fn delay(&self, kind: DelayKind, retry: u32, rng: &dyn RandomSource) -> Duration {
        let (low, high) = self.bounds(kind, retry);
        pick(low, high, rng)
    }

    /// [`delay`](Self::delay) for a call `left` away from its deadline: drawn from the part of
    /// the bounds shorter than `left` by a millisecond (a timer's grain) when the floor is (the
    /// jitter above the floor spreads callers, and is not worth giving the call up for), else
    /// the floor itself (the earliest the backoff allows, past the deadline: the call ends).
    /// The same draw as `delay` where the whole range fits.
    pub(crate) fn delay_within(
        &self,
        kind: DelayKind,
        retry: u32,
        left: Option<Duration>,
        rng: &dyn RandomSource,
    ) -> Duration {
        let (low, high) = self.bounds(kind, retry);
        match left {
            Some(left) if low >= left => low,
            // Not within the last millisecond: it would wake at the deadline (see
            // [`TIMER_GRAIN`]) and not be sent.
            Some(left) => pick(
                low,
                high.min(left.saturating_sub(TIMER_GRAIN).max(low)),
                rng,
            ),
            None => pick(low, high, rng),
        }
    }

    /// The longest `Retry-After` the retry layer waits out.
    pub(crate) fn retry_after_limit(&self) -> Duration {
        self.max_retry_after
    }

    /// The least wait, on top of the backoff, before a create's first lookup.
    pub(crate) fn settle(&self) -> Duration {
        self.lookup_settle
    }

    /// The inclusive range a delay after a `Retry-After` of `hint` is drawn from.
    pub fn hint_bounds(&self, hint: Duration) -> (Duration, Duration) {
        let low = hint.min(self.max_retry_after);
        (low, low.saturating_add(self.retry_after_jitter))
    }

    /// A delay after a `Retry-After` of `hint`, drawn uniformly within [`Backoff::hint_bounds`].
    pub fn hinted(&self, hint: Duration, rng: &dyn RandomSource) -> Duration {
        let (low, high) = self.hint_bounds(hint);
        pick(low, high, rng)
    }
}

// `Backoff::validate`'s messages spell kling-core's ceiling out (a `ConfigError` holds text
// fixed at compile time): they must change with it.
const _: () = assert!(kling_core::MAX_RETRY_AFTER.as_secs() == 86_400);

/// How finely tokio's timers fire: a sleep ends on the first whole millisecond of the timer's
/// clock at or after its instant, so one drawn to end less than this before a deadline may
/// wake at the deadline itself, when a retry is no longer sent.
pub(crate) const TIMER_GRAIN: Duration = Duration::from_millis(1);

/// A uniform draw from `[low, high]` (to the nanosecond; `high` itself is never drawn unless
/// equal to `low`).
fn pick(low: Duration, high: Duration, rng: &dyn RandomSource) -> Duration {
    let span = high.saturating_sub(low).as_nanos();
    if span == 0 {
        return low;
    }
    let x = u128::from(rng.next_u64());
    // `span < 2^94` (a Duration's range), so splitting it keeps every product below 2^128.
    let offset = ((span >> 64) * x) + (((span & u128::from(u64::MAX)) * x) >> 64);
    let secs = u64::try_from(offset / 1_000_000_000).unwrap_or(u64::MAX);
    let nanos = (offset % 1_000_000_000) as u32;
    low.saturating_add(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `reason` label of the retries counter: dashboards and alerts match these names.
    #[test]
    fn each_kind_has_its_own_metric_label() {
        let labels = [
            (DelayKind::Immediate, "slot_gated"),
            (DelayKind::Transient, "transient"),
            (DelayKind::Throttled, "throttled"),
            (DelayKind::Maintenance, "maintenance"),
            (DelayKind::SlotFull, "slot_full"),
        ];
        for (kind, label) in labels {
            assert_eq!(kind.as_str(), label, "{kind:?}");
        }
    }

    /// A year of jitter above every `Retry-After`, or a create's lookup a year after its
    /// attempt, was taken silently: waits no one meant. The jitter stays within the longest
    /// wait the layer takes from a server, the settle within the longest kling-core reads;
    /// zero stays allowed for both.
    #[test]
    fn jitter_and_settle_past_their_bounds_are_refused() {
        let day = kling_core::MAX_RETRY_AFTER;
        let year = 365 * day;
        let nano = Duration::from_nanos(1);
        let refused = |backoff: Backoff| backoff.validate().unwrap_err().to_string();
        for accepted in [
            Backoff::new().retry_after_jitter(Duration::ZERO),
            Backoff::new().retry_after_jitter(Duration::from_secs(120)),
            Backoff::new()
                .max_retry_after(3 * day)
                .retry_after_jitter(day),
            Backoff::new().lookup_settle(Duration::ZERO),
            Backoff::new().lookup_settle(day),
        ] {
            assert_eq!(accepted.validate(), Ok(()), "{accepted:?}");
        }
        let over_limit = "invalid retry configuration: `backoff.retry_after_jitter` must be at \
                          most the longest wait it is added to: `backoff.max_retry_after` (the \
                          longest `Retry-After` waited out), or the throttle or maintenance base \
                          when larger (the floor a `Retry-After` is raised to)";
        for jitter in [Duration::from_secs(120) + nano, year] {
            assert_eq!(
                refused(Backoff::new().retry_after_jitter(jitter)),
                over_limit
            );
        }
        assert_eq!(
            refused(
                Backoff::new()
                    .throttle_base(nano)
                    .maintenance_base(nano)
                    .max_retry_after(nano)
                    .retry_after_jitter(2 * nano)
            ),
            over_limit
        );
        assert_eq!(
            refused(
                Backoff::new()
                    .max_retry_after(3 * day)
                    .retry_after_jitter(day + nano)
            ),
            "invalid retry configuration: `backoff.retry_after_jitter` must be at most a day \
             (86400 s, the longest `Retry-After` kling-core reads)"
        );
        for settle in [day + nano, year, Duration::MAX] {
            assert_eq!(
                refused(Backoff::new().lookup_settle(settle)),
                "invalid retry configuration: `backoff.lookup_settle` must be at most a day \
                 (86400 s, the longest `Retry-After` kling-core reads)"
            );
        }
    }

    /// A base of a year (a throttled, transient or maintenance retry a year later, or, under a
    /// deadline, every such call ended at its first refusal) was taken silently, where the
    /// jitter and the settle are refused past a day: every wait set is now held to a day. The
    /// caps are not: a larger one waits no longer, and "no cap" (`Duration::MAX`) stays valid.
    #[test]
    fn a_base_past_a_day_is_refused_and_a_cap_is_not() {
        let day = kling_core::MAX_RETRY_AFTER;
        let nano = Duration::from_nanos(1);
        type Setter = fn(Backoff, Duration) -> Backoff;
        let bases: [(&str, Setter); 3] = [
            ("backoff.throttle_base", Backoff::throttle_base),
            ("backoff.transient_base", Backoff::transient_base),
            ("backoff.maintenance_base", Backoff::maintenance_base),
        ];
        for (field, set) in bases {
            let uncapped = Backoff::new().max_backoff(Duration::MAX);
            assert_eq!(set(uncapped, day).validate(), Ok(()), "{field}");
            for past in [day + nano, 365 * day, Duration::MAX] {
                let error = set(uncapped, past).validate().unwrap_err();
                assert_eq!(error.field(), field);
                assert_eq!(
                    error.to_string(),
                    format!(
                        "invalid retry configuration: `{field}` must be at most a day (86400 s, \
                         the longest `Retry-After` kling-core reads)"
                    )
                );
            }
        }
        for cap in [
            Backoff::new().max_backoff(Duration::MAX),
            Backoff::new().max_retry_after(Duration::MAX),
            Backoff::new()
                .max_backoff(Duration::MAX)
                .max_retry_after(Duration::MAX),
        ] {
            assert_eq!(cap.validate(), Ok(()), "{cap:?}");
        }
    }

    /// A `max_retry_after` below the default jitter (half a second), which the docs allow
    /// below the floors, was refused unless the jitter was lowered too: the jitter is added
    /// over the hint raised to its kind's floor (a `1302`'s `Retry-After: 0` waits 1 s plus the
    /// jitter whatever the limit), so it is bounded by the longest of those waits, not by the
    /// limit alone. Past them it is still refused.
    #[test]
    fn a_jitter_within_the_floors_is_accepted_under_a_lower_max_retry_after() {
        let nano = Duration::from_nanos(1);
        let low_limit = Backoff::new().max_retry_after(Duration::from_millis(100));
        assert_eq!(low_limit.validate(), Ok(()));
        // The maintenance base (5 s) is the longest floor by default, then the throttle base.
        let five = Duration::from_secs(5);
        assert_eq!(low_limit.retry_after_jitter(five).validate(), Ok(()));
        let three = Duration::from_secs(3);
        let throttle_longest = low_limit
            .throttle_base(three)
            .maintenance_base(Duration::from_secs(1));
        assert_eq!(
            throttle_longest.retry_after_jitter(three).validate(),
            Ok(())
        );
        for refused in [
            low_limit.retry_after_jitter(five + nano),
            throttle_longest.retry_after_jitter(three + nano),
        ] {
            assert_eq!(
                refused.validate().map_err(|e| e.field()),
                Err("backoff.retry_after_jitter"),
                "{refused:?}"
            );
        }
        // Slowed down, they scale alike: still accepted.
        assert_eq!(low_limit.sped_up(1e-3).validate(), Ok(()));
    }

    /// Sped up (a speed of 1 or more), rules `validate` accepted stay accepted: every duration
    /// shrinks alike, and none to zero that was not. Slowed down, the jitter stays within
    /// `max_retry_after` (both scale alike); only the day ceilings can be passed, and then the
    /// rules do ask for waits that long.
    #[test]
    fn sped_up_rules_that_were_valid_stay_valid() {
        let day = kling_core::MAX_RETRY_AFTER;
        let nano = Duration::from_nanos(1);
        let valid = [
            Backoff::new(),
            Backoff::new().retry_after_jitter(Duration::from_secs(120)),
            Backoff::new()
                .retry_after_jitter(Duration::ZERO)
                .lookup_settle(Duration::ZERO),
            Backoff::new()
                .max_retry_after(3 * day)
                .retry_after_jitter(day),
            Backoff::new().lookup_settle(day),
            Backoff::new()
                .throttle_base(nano)
                .transient_base(nano)
                .maintenance_base(nano)
                .max_backoff(nano)
                .max_retry_after(nano)
                .retry_after_jitter(nano)
                .lookup_settle(nano),
        ];
        for backoff in valid {
            assert_eq!(backoff.validate(), Ok(()), "{backoff:?}");
            for speed in [1.0, 1.000_001, 1.5, 60.0, 1_000.0, 1e6, 1e300] {
                let fast = backoff.sped_up(speed);
                assert_eq!(fast.validate(), Ok(()), "{backoff:?} at speed {speed}");
            }
            for speed in [0.999, 0.5, 1e-3, 1e-300] {
                let slow = backoff.sped_up(speed);
                assert!(
                    slow.retry_after_jitter <= slow.max_retry_after,
                    "{backoff:?} at speed {speed}"
                );
            }
        }
        // A thousandth of real time, kling-tower's slowest speed: the defaults still pass.
        assert_eq!(Backoff::new().sped_up(1e-3).validate(), Ok(()));
    }

    /// A speed that is zero, negative or not finite leaves the rules as they are: dividing by
    /// it would make every wait infinite (a panic), negative or zero. A positive one too small
    /// saturates every wait at `Duration::MAX` (it panicked).
    #[test]
    fn a_speed_that_is_no_positive_number_changes_nothing() {
        let normal = Backoff::new();
        for speed in [0.0, -0.0, -2.0, f64::INFINITY, f64::NEG_INFINITY, f64::NAN] {
            assert_eq!(normal.sped_up(speed), normal, "{speed}");
        }
        // A tiny speed saturates the durations rather than panicking.
        let slow = normal.sped_up(1e-300);
        assert_eq!(slow.retry_after_limit(), Duration::MAX);
        assert_eq!(slow.bounds(DelayKind::Throttled, 1).0, Duration::MAX);
        let fast = normal.sped_up(1000.0);
        assert_eq!(
            fast.bounds(DelayKind::Throttled, 1),
            (Duration::from_millis(1), Duration::from_millis(2))
        );
        // `max_retry_after` is 120 ms now, and the jitter above a hint half a millisecond.
        assert_eq!(
            fast.hint_bounds(Duration::from_secs(1)),
            (Duration::from_millis(120), Duration::from_micros(120_500))
        );
    }
}
