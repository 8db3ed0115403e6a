//! What a key does after a throttling response: the cooldown and its escalation, and the
//! adaptive rate.

use std::time::Duration;

use crate::error::ConfigError;
use crate::quota::Quota;

/// The longest duration a [`Cooldown`] field may have: a year (kling-tower's `MAX_DURATION`).
/// Longer ones are refused when the layer is built; an instant that far ahead is kept in range.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// `at + duration`, or as far ahead as the clock goes (a duration past its range, e.g.
/// [`Duration::MAX`], is saturated rather than added, which would panic).
pub(crate) fn later(at: tokio::time::Instant, duration: Duration) -> tokio::time::Instant {
    at.checked_add(duration)
        .or_else(|| at.checked_add(MAX_DURATION))
        .unwrap_or(at)
}

/// How long a key pauses after a 1302 or a `Retry-After`, and how the pause escalates.
///
/// When a response says 1302 (requests too fast), or refuses the request with a `Retry-After`
/// (any answer but a success on a 2xx: such a success's `Retry-After` pauses nothing, and the
/// success resets the streak as any does; code 0 on a 429 or a 503 pauses), the whole key
/// pauses — every queued and every new request of it — until:
///
/// - the `Retry-After` instant, when the response has one, and at least
/// - for the *n*-th 1302 in a row (each within [`window`](Cooldown::window) of the end of the
///   pause the one before set; reset by a success): `max(first · 2ⁿ⁻¹, one emission
///   interval)` while `n` is below [`escalate_after`](Cooldown::escalate_after), then the
///   published guide's burst rule,
///   `backoff · 2ⁿ⁻ᵉˢᶜᵃˡᵃᵗᵉ_ᵃᶠᵗᵉʳ`; never more than [`ceiling`](Cooldown::ceiling).
///
/// A page without a Kling envelope (a proxy's, which the classify step turns into a
/// [`MalformedResponse`](kling_core::error::MalformedResponse) error) counts the same way: its
/// `Retry-After` pauses the key, and a 429 page is a 1302 for the streak and the adaptive rate;
/// a 503 page (maintenance) pauses only for its `Retry-After`.
///
/// A pause ends with the key's burst spent ([`InProcess`](crate::InProcess)): the requests
/// queued behind it go one interval apart, and the burst builds up again from its end.
///
/// Only a 1302 for a request sent after the previous pause began counts towards the streak:
/// the other requests that were already in flight when the first 1302 came back are refused
/// for the same reason and do not escalate it.
///
/// Defaults: `first` 1 s, `escalate_after` 3, `backoff` 30 s, `ceiling` 60 s, `window` 60 s
/// ("burst detection: back off 30–60 s"). Every duration must be at most a year: a longer
/// one is refused when the layer is built, naming the field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Cooldown {
    /// The pause after a first 1302 without `Retry-After` (at least one emission interval).
    pub first: Duration,
    /// The streak length at which the burst backoff starts.
    pub escalate_after: u32,
    /// The burst backoff: the pause at the `escalate_after`-th 1302 in a row.
    pub backoff: Duration,
    /// The longest pause an escalation reaches (a `Retry-After` may ask for more).
    pub ceiling: Duration,
    /// A 1302 that comes later than this after the end of the pause the previous one set
    /// starts a new streak (the pause itself does not count, so a pause as long as the window
    /// does not end the streak).
    pub window: Duration,
}

impl Default for Cooldown {
    fn default() -> Self {
        Cooldown {
            first: Duration::from_secs(1),
            escalate_after: 3,
            backoff: Duration::from_secs(30),
            ceiling: Duration::from_secs(60),
            window: Duration::from_secs(60),
        }
    }
}

impl Cooldown {
    /// The defaults.
    pub fn new() -> Self {
        Cooldown::default()
    }

    /// Sets [`first`](Cooldown::first).
    pub fn first(mut self, first: Duration) -> Self {
        self.first = first;
        self
    }

    /// Sets [`escalate_after`](Cooldown::escalate_after).
    pub fn escalate_after(mut self, streak: u32) -> Self {
        self.escalate_after = streak;
        self
    }

    /// Sets [`backoff`](Cooldown::backoff).
    pub fn backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets [`ceiling`](Cooldown::ceiling).
    pub fn ceiling(mut self, ceiling: Duration) -> Self {
        self.ceiling = ceiling;
        self
    }

    /// Sets [`window`](Cooldown::window).
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Divides every duration by `speed`: the shared speed factor of the mock and socket tests.
    /// A duration the division takes past [`Duration::MAX`] (a tiny `speed`) saturates, and
    /// the layer's build then refuses it, naming the field.
    pub fn scaled(self, speed: f64) -> Self {
        let scale = |d: Duration| {
            if speed.is_finite() && speed > 0.0 {
                // Not `div_f64`, which panics when the quotient is past the range.
                Duration::try_from_secs_f64(d.as_secs_f64() / speed).unwrap_or(Duration::MAX)
            } else {
                d
            }
        };
        Cooldown {
            first: scale(self.first),
            escalate_after: self.escalate_after,
            backoff: scale(self.backoff),
            ceiling: scale(self.ceiling),
            window: scale(self.window),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, reason| Err(ConfigError::new("cooldown", field, reason));
        if self.escalate_after == 0 {
            return err("escalate_after", "must be at least 1");
        }
        if self.ceiling.is_zero() {
            return err("ceiling", "must be positive");
        }
        if self.ceiling > MAX_DURATION {
            return err("ceiling", "must be at most a year");
        }
        if self.first > self.ceiling {
            return err("first", "must not exceed the ceiling");
        }
        if self.backoff > self.ceiling {
            return err("backoff", "must not exceed the ceiling");
        }
        if self.window.is_zero() {
            return err("window", "must be positive");
        }
        if self.window > MAX_DURATION {
            return err("window", "must be at most a year");
        }
        Ok(())
    }

    /// The pause for the `streak`-th 1302 in a row (`streak` ≥ 1) of a key whose emission
    /// interval is `interval`.
    pub fn pause(&self, streak: u32, interval: Duration) -> Duration {
        let streak = streak.max(1);
        let doubled = |base: Duration, exp: u32| base.saturating_mul(1u32 << exp.min(20));
        let pause = if streak < self.escalate_after {
            doubled(self.first, streak - 1).max(interval)
        } else {
            doubled(self.backoff, streak - self.escalate_after)
        };
        pause.min(self.ceiling)
    }
}

/// Opt-in adaptive rate: finds the server's real limit from its 1302s.
///
/// The configured quota is the ceiling; the key's allowed rate `r` moves under it, with these
/// rules (an AIMD rule with a remembered limit, like CUBIC's `W_max`):
///
/// | event | rule |
/// |---|---|
/// | start | `r = start`, or `ceiling / 4` when no start is given (conservative) |
/// | success, no 1302 seen yet | `r ← min(ceiling, r · (1 + growth))` (slow start) |
/// | 1302, the *n*-th of its streak, *n* ≤ `escalate_after` | `limit ← r`, `r ← r · decrease`, `k ← cost` |
/// | 1302, the *n*-th of its streak, *n* > `escalate_after` | nothing (the pause escalates) |
/// | success, `r` below `target · limit` | `r ← r + max((target · limit − r) / 4, probe · limit / k)` |
/// | success, `r` at or above `target · limit` | `r ← r + probe · limit / k` |
/// | success that takes `r` to `limit` or past it | `k ← 1` |
///
/// The streak and `escalate_after` are the [`Cooldown`]'s ([`Cooldown::escalate_after`], 3 by
/// default). The defaults: `growth` = 5%, `decrease` = 0.85, `target` = 97%, `probe` = 0.1%,
/// `max_caution` = 10.
///
/// `k`, the caution, is what the refusal cost in intervals of the refused rate `limit`:
/// `cost = clamp((retry_after − 2 s) · limit, 1, max_caution)`, 1 without a `Retry-After`.
/// A server that locks the account out after a 1302 (every request refused until the
/// `Retry-After` it names) makes each refusal cost that many intervals of sending rather than
/// about one, so the probe near the limit, where the next 1302 comes, goes `k` times slower
/// and the refusals come further apart, while the climb back to `target · limit`, a quarter of
/// the way left per success, stays nearly as fast (its last steps are the probe's). Lowering
/// the rate or the target further instead would cost throughput for the whole climb, not only
/// near the limit. The 2 s are a `Retry-After`'s resolution (whole seconds rounded up,
/// and an HTTP-date read against a `Date` that is whole seconds too): a one-interval answer
/// reads at most its interval plus that, so it leaves `k` at 1 and the rule exactly as it was
/// without the caution. Only the server's `Retry-After` counts, not the cooldown's own pause:
/// that one grows with the streak, which the rule already answers by lowering the rate at
/// each 1302 of it. The caution is bounded twice: by `max_caution`, and by the remembered
/// limit (the first success that takes `r` to it or past it ends the caution, so a raised
/// limit is probed for at the usual pace). After one 1302 at 1/s the rate is back at 97% of the
/// limit and at the limit after 16 and 46 successes with a short `Retry-After` or none, 21 and
/// 141 with `Retry-After: 6` (`k` = 4), and 24 and 324 with `Retry-After: 60` (`k` = 10, not
/// 58); from there it probes by 0.1% of the limit per success as before, at 110% of it 100
/// successes later. Against kling-mock's 6 s lockout (kling-bench goodput, Pro, "Retry-After
/// seconds") this met 42 1302s instead of 116, at 98.8% efficiency instead of 97.9%.
/// Only a 1302 or a success of a request sent after the last 1302's pause began counts: one sent
/// before it says nothing about the rate since.
///
/// `r` never goes above the ceiling nor below `ceiling / 1000`, a given start included (it is
/// clamped, not refused: [`GcraHandle::set_quota`](crate::GcraHandle::set_quota) changes the
/// ceiling after the build). After a 1302 the rate falls to 85% of where it was refused,
/// climbs back to 97% of it within about ten successes, and then probes upward by 0.1% of the
/// limit per success — about forty successes per refusal, so a steady load sees roughly one
/// 1302 in forty requests at 90–100% of the real limit, and notices a limit that was raised.
/// (The cooldown after each 1302 still applies.)
///
/// The first [`escalate_after`](Cooldown::escalate_after) 1302s of a run with no success between
/// (its streak, [`Cooldown`]) each lower the rate and remember the rate they came at: a server
/// that extends its window on early requests (a penalty window) refuses each request after a
/// pause while the pace is still too fast, and lowering once per run met four times the 1302s
/// there (kling-bench goodput, Free, "penalty window": 4.5% against 1.0%). A 1302 later in the
/// streak answers the first request after a burst-backoff pause (30–60 s by default, far longer
/// than any pace window): the server refuses whatever the pace (an outage, a lockout), so it
/// changes neither the rate nor the limit. Nor does any 1302 after `escalate_after` lowerings
/// with no success since, whatever streaks they came in: a 1302 more than the cooldown's
/// [`window`](Cooldown::window) after the end of the last pause starts a new streak, and a
/// client that asks less often than that meets each refusal of an outage as a first (with
/// each lowering the rate, 30 such 1302s took a 4/s key to 0.03/s). The refusals between two
/// successes therefore lower the rate to at most `decrease ^ escalate_after` of where they
/// began (61% by default), however long the server refuses and however often the client asks.
/// With every 1302 lowering it, 30 minutes of refusals (30 1302s) took it to 0.8% of
/// where it began (the floor, `ceiling / 1000`, after 43), and probing by 0.1% of that limit
/// per success left it under 2% after 1,000 successes. From 61%, recovery reaches 90% of the
/// rate the run began at within 300 successes.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Adaptive {
    /// The starting rate in requests per second (`None`: a quarter of the ceiling), clamped
    /// to `ceiling / 1000..=ceiling` for each key.
    pub start: Option<f64>,
    /// Slow-start growth per success before the first 1302.
    pub growth: f64,
    /// The multiplicative decrease on a 1302.
    pub decrease: f64,
    /// The fraction of the remembered limit that recovery climbs back to quickly.
    pub target: f64,
    /// The probe step per success, as a fraction of the remembered limit.
    pub probe: f64,
    /// The most a 1302's `Retry-After` divides the probe step by (at least 1; 1 turns the
    /// caution off): a longer one costs more intervals of sending but slows the probe no more.
    pub max_caution: f64,
}

impl Default for Adaptive {
    fn default() -> Self {
        Adaptive {
            start: None,
            growth: 0.05,
            decrease: 0.85,
            target: 0.97,
            probe: 0.001,
            max_caution: 10.0,
        }
    }
}

impl Adaptive {
    /// The defaults (start at a quarter of the ceiling).
    pub fn new() -> Self {
        Adaptive::default()
    }

    /// Starts from `start` instead of a quarter of the ceiling.
    pub fn start(mut self, start: Quota) -> Self {
        self.start = Some(start.rate_per_second());
        self
    }

    /// Sets the multiplicative decrease on a 1302 (in `0..1`).
    pub fn decrease(mut self, decrease: f64) -> Self {
        self.decrease = decrease;
        self
    }

    /// Sets [`max_caution`](Adaptive::max_caution) (at least 1; 1: a long `Retry-After` slows
    /// the probe no more than a short one).
    pub fn max_caution(mut self, max_caution: f64) -> Self {
        self.max_caution = max_caution;
        self
    }

    /// What a 1302 at `refused_at` requests per second with a `Retry-After` of `retry_after`
    /// cost, in intervals of that rate past the header's resolution: the caution `k` (see
    /// [`Adaptive`]), 1 without a header or for one of about an interval.
    pub fn caution(&self, refused_at: f64, retry_after: Option<Duration>) -> f64 {
        let Some(wait) = retry_after else {
            return 1.0;
        };
        let cost = (wait.as_secs_f64() - RETRY_AFTER_RESOLUTION.as_secs_f64()) * refused_at;
        // `max` first: a NaN (a bad ceiling, `refused_at` NaN) reads as no caution.
        cost.max(1.0).min(self.max_caution.max(1.0))
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, reason| Err(ConfigError::new("adaptive", field, reason));
        if let Some(start) = self.start
            && !(start.is_finite() && start > 0.0)
        {
            return err("start", "must be a positive rate");
        }
        let in_unit = |v: f64| v > 0.0 && v < 1.0;
        if !(self.growth > 0.0 && self.growth.is_finite()) {
            return err("growth", "must be positive");
        }
        if !in_unit(self.decrease) {
            return err("decrease", "must lie in 0..1");
        }
        if !(in_unit(self.target) || self.target == 1.0) {
            return err("target", "must lie in 0..=1");
        }
        if !in_unit(self.probe) {
            return err("probe", "must lie in 0..1");
        }
        if !(self.max_caution >= 1.0 && self.max_caution.is_finite()) {
            return err("max_caution", "must be a finite number at least 1");
        }
        Ok(())
    }
}

/// How much longer than its interval a `Retry-After` that asks for one interval may read: it
/// names whole seconds, rounded up, and an HTTP-date is read against a `Date` header that is
/// whole seconds too.
pub const RETRY_AFTER_RESOLUTION: Duration = Duration::from_secs(2);

/// `rate` within `ceiling / 1000..=ceiling`: `f64::clamp` without its panic on a NaN or
/// negative ceiling (these methods are public).
fn within(rate: f64, ceiling: f64) -> f64 {
    rate.max(ceiling / 1000.0).min(ceiling)
}

/// The adaptive state of one key: its current rate and remembered limit, requests per second,
/// whether a 1302 lowered the rate since the last success, and how cautiously it probes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaptiveState {
    rate: f64,
    limit: Option<f64>,
    /// How many 1302s lowered the rate since the last success.
    lowerings: u32,
    /// What the last lowering's refusal cost in intervals: the probe step's divisor until the
    /// rate is back at the limit (1: none).
    caution: f64,
}

impl AdaptiveState {
    /// The state of a key seen for the first time under `ceiling` requests per second, its
    /// start clamped into the rule's range (see [`Adaptive`]).
    pub fn new(config: &Adaptive, ceiling: f64) -> Self {
        AdaptiveState {
            rate: within(config.start.unwrap_or(ceiling / 4.0), ceiling),
            limit: None,
            lowerings: 0,
            caution: 1.0,
        }
    }

    /// Rebuilds a state from its parts (e.g. read from a shared store), with no 1302 since the
    /// last success and no caution.
    pub fn from_parts(rate: f64, limit: Option<f64>) -> Self {
        AdaptiveState {
            rate,
            limit,
            lowerings: 0,
            caution: 1.0,
        }
    }

    /// The allowed rate, requests per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The rate at which the last run of 1302s began, if it is still remembered.
    pub fn limit(&self) -> Option<f64> {
        self.limit
    }

    /// Whether a 1302 lowered the rate since the last success.
    pub fn lowered(&self) -> bool {
        self.lowerings > 0
    }

    /// What the probe step is divided by until the rate is back at the limit: the cost of the
    /// last 1302 that lowered it, in intervals (1: probing as usual; see [`Adaptive`]).
    pub fn caution(&self) -> f64 {
        self.caution
    }

    /// Caps the rate at `ceiling`, lowered since (`GcraHandle::set_quota`), so the state never
    /// reads above the rate enforced.
    pub(crate) fn cap(&mut self, ceiling: f64) {
        if self.rate > ceiling {
            self.rate = within(self.rate, ceiling);
        }
    }

    /// A response succeeded.
    pub fn on_success(&mut self, config: &Adaptive, ceiling: f64) {
        self.lowerings = 0;
        let rate = match self.limit {
            None => self.rate * (1.0 + config.growth),
            Some(limit) => {
                let target = config.target * limit;
                let probe = config.probe * limit / self.caution;
                let rate = self.rate + ((target - self.rate) / 4.0).max(probe);
                if rate >= limit {
                    // Past where the costly refusal came: a raised limit is found at the usual
                    // pace.
                    self.caution = 1.0;
                }
                rate
            }
        };
        self.rate = within(rate, ceiling);
    }

    /// A 1302 came back for a request sent after the previous pause began, the `streak`-th in a
    /// row of the key's 1302 streak under `cooldown` (1 for the first). One past the cooldown's
    /// [`escalate_after`](Cooldown::escalate_after) changes nothing: it came after a
    /// burst-backoff pause, far longer than any pace window (see [`Adaptive`]). Nor does one
    /// after `escalate_after` lowerings with no success since, in whatever streaks they came:
    /// a client that asks less often than the streak's window lasts starts a new streak with
    /// each 1302 of an outage, and each would lower the rate again.
    ///
    /// A 1302 without a `Retry-After`: [`on_throttle_retry_after`](Self::on_throttle_retry_after)
    /// with `None`.
    pub fn on_throttle(
        &mut self,
        config: &Adaptive,
        ceiling: f64,
        streak: u32,
        cooldown: &Cooldown,
    ) {
        self.on_throttle_retry_after(config, ceiling, streak, cooldown, None);
    }

    /// [`on_throttle`](Self::on_throttle) for a 1302 whose `Retry-After` asked for
    /// `retry_after` from its arrival: one that lowers the rate sets the caution to what the
    /// wait cost ([`Adaptive::caution`]), so the probe goes that much slower up to the limit.
    pub fn on_throttle_retry_after(
        &mut self,
        config: &Adaptive,
        ceiling: f64,
        streak: u32,
        cooldown: &Cooldown,
        retry_after: Option<Duration>,
    ) {
        if streak > cooldown.escalate_after || self.lowerings >= cooldown.escalate_after {
            return;
        }
        self.lowerings += 1;
        // Refused at the rate enforced, which a ceiling lowered since (`set_quota`) caps: the
        // state's own rate may still be above it until a success clamps it.
        let refused_at = within(self.rate, ceiling);
        self.limit = Some(refused_at);
        self.rate = within(refused_at * config.decrease, ceiling);
        self.caution = config.caution(refused_at, retry_after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_escalate_to_the_ceiling() {
        let c = Cooldown::default();
        let second = Duration::from_secs(1);
        assert_eq!(c.pause(1, Duration::from_millis(100)), second);
        assert_eq!(c.pause(1, Duration::from_secs(5)), Duration::from_secs(5));
        assert_eq!(c.pause(2, Duration::ZERO), 2 * second);
        assert_eq!(c.pause(3, Duration::ZERO), 30 * second);
        assert_eq!(c.pause(4, Duration::ZERO), 60 * second);
        assert_eq!(c.pause(400, Duration::ZERO), 60 * second);
        let fast = c.scaled(60.0);
        assert_eq!(fast.pause(3, Duration::ZERO), Duration::from_millis(500));
    }

    #[test]
    fn invalid_cooldowns_name_their_field() {
        let err = Cooldown::new()
            .backoff(Duration::from_secs(90))
            .validate()
            .unwrap_err();
        assert_eq!(err.field(), "cooldown.backoff");
        let err = Cooldown::new().escalate_after(0).validate().unwrap_err();
        assert_eq!(err.field(), "cooldown.escalate_after");
        for (cooldown, field) in [
            (Cooldown::new().window(Duration::MAX), "cooldown.window"),
            (
                Cooldown::new()
                    .ceiling(Duration::MAX)
                    .backoff(Duration::MAX),
                "cooldown.ceiling",
            ),
            (
                Cooldown::new().window(MAX_DURATION + Duration::from_secs(1)),
                "cooldown.window",
            ),
        ] {
            assert_eq!(cooldown.validate().unwrap_err().field(), field);
        }
        assert!(
            Cooldown::new()
                .window(MAX_DURATION)
                .ceiling(MAX_DURATION)
                .validate()
                .is_ok()
        );
        let err = Adaptive::new().decrease(1.5).validate().unwrap_err();
        assert_eq!(err.field(), "adaptive.decrease");
    }

    /// A speed so small that the durations leave `Duration`'s range saturates them instead of
    /// panicking, and the layer's build refuses the result, naming the field.
    #[test]
    fn a_tiny_speed_saturates_rather_than_panics() {
        let slow = Cooldown::new().scaled(1e-20);
        assert_eq!(slow.ceiling, Duration::MAX);
        assert_eq!(slow.window, Duration::MAX);
        assert_eq!(slow.first, Duration::MAX);
        assert_eq!(slow.validate().unwrap_err().field(), "cooldown.ceiling");
        let subnormal = Cooldown::new().scaled(f64::from_bits(1));
        assert_eq!(subnormal.backoff, Duration::MAX);
        // Still exact within the range.
        assert_eq!(
            Cooldown::new().scaled(0.5).ceiling,
            Duration::from_secs(120)
        );
    }

    /// Every 1302 of a run up to the cooldown's `escalate_after`-th lowers the rate and
    /// remembers where it came (a penalty window refuses each request after a pause while the
    /// pace is too fast); a success clears `lowered`.
    #[test]
    fn every_1302_of_a_run_lowers_the_rate_until_the_burst_backoff() {
        let cfg = Adaptive::default();
        let cooldown = Cooldown::default();
        let mut s = AdaptiveState::from_parts(5.0, None);
        s.on_throttle(&cfg, 10.0, 1, &cooldown);
        assert_eq!((s.rate(), s.limit(), s.lowered()), (4.25, Some(5.0), true));
        s.on_throttle(&cfg, 10.0, 2, &cooldown);
        assert_eq!((s.rate(), s.limit()), (4.25 * 0.85, Some(4.25)));
        s.on_throttle(&cfg, 10.0, 3, &cooldown);
        assert_eq!(
            (s.rate(), s.limit()),
            (4.25 * 0.85 * 0.85, Some(4.25 * 0.85))
        );
        s.on_success(&cfg, 10.0);
        assert!(!s.lowered());
        // A streak that began again (a success between) lowers again.
        let before = s.rate();
        s.on_throttle(&cfg, 10.0, 1, &cooldown);
        assert_eq!((s.rate(), s.limit()), (before * 0.85, Some(before)));
        // Escalating later: a cooldown that backs off at the fifth lowers five times.
        let mut s = AdaptiveState::from_parts(5.0, None);
        for streak in 1..=6 {
            s.on_throttle(&cfg, 10.0, streak, &cooldown.escalate_after(5));
        }
        let lowered = (0..5).fold(5.0, |rate, _| rate * 0.85);
        assert_eq!(s.rate(), lowered);
    }

    /// A long run of 1302s — the server refusing every request for half an hour, each 1302
    /// answering the first request after the pause the one before set — lowers the rate three
    /// times (the cooldown's `escalate_after`: 1 s and 2 s pauses, then the 30 s backoff), not
    /// thirty: the rate that began at the ceiling is back at 90% of it within 300 successes and
    /// at the ceiling within 450. (Lowered by each, it sat at 0.8% of the ceiling, and 1,000
    /// successes took it to 1.8%.)
    #[test]
    fn a_long_run_of_1302s_lowers_the_rate_three_times_and_recovers() {
        let cfg = Adaptive::default();
        let cooldown = Cooldown::default();
        let ceiling = 4.0;
        let mut s = AdaptiveState::new(&cfg.start(Quota::per_second(ceiling)), ceiling);
        assert_eq!(s.rate(), ceiling);
        for streak in 1..=30 {
            s.on_throttle(&cfg, ceiling, streak, &cooldown);
        }
        assert_eq!(s.rate(), ceiling * 0.85 * 0.85 * 0.85);
        assert_eq!(s.limit(), Some(ceiling * 0.85 * 0.85));
        let mut to_90 = None;
        for successes in 1..=1000 {
            s.on_success(&cfg, ceiling);
            if to_90.is_none() && s.rate() >= 0.9 * ceiling {
                to_90 = Some(successes);
            }
            if s.rate() >= ceiling {
                assert_eq!((to_90, successes), (Some(292), 430));
                return;
            }
        }
        panic!(
            "1,000 successes left the rate at {}, 90% after {to_90:?}",
            s.rate()
        );
    }

    /// A client that asks less often than a streak's window meets each 1302 of an outage as
    /// the first of a new streak: the refusals between two successes still lower the rate at
    /// most `escalate_after` times (thirty lowerings took a 4/s key to 0.03/s), and a success
    /// lets the next run lower it again.
    #[test]
    fn sparse_1302s_with_no_success_between_lower_the_rate_three_times() {
        let cfg = Adaptive::default();
        let cooldown = Cooldown::default();
        let ceiling = 4.0;
        let mut s = AdaptiveState::new(&cfg.start(Quota::per_second(ceiling)), ceiling);
        for _ in 0..30 {
            s.on_throttle(&cfg, ceiling, 1, &cooldown);
        }
        assert_eq!(s.rate(), ceiling * 0.85 * 0.85 * 0.85);
        assert_eq!(s.limit(), Some(ceiling * 0.85 * 0.85));
        s.on_success(&cfg, ceiling);
        let before = s.rate();
        s.on_throttle(&cfg, ceiling, 1, &cooldown);
        assert_eq!(s.rate(), before * 0.85, "a success between: lowered again");
    }

    /// A start is clamped into `ceiling / 1000..=ceiling`, as every later rate is.
    #[test]
    fn a_start_outside_the_range_is_clamped() {
        let at = |start: f64| {
            AdaptiveState::new(&Adaptive::new().start(Quota::per_second(start)), 10.0).rate()
        };
        assert_eq!(at(0.001), 0.01);
        assert_eq!(at(50.0), 10.0);
        assert_eq!(at(2.0), 2.0);
    }

    /// The rule's public methods take any ceiling without panicking (`f64::clamp` panics on
    /// a NaN or negative one, whose floor lies above it).
    #[test]
    fn a_bad_ceiling_does_not_panic() {
        let cfg = Adaptive::default();
        for ceiling in [f64::NAN, -1.0, f64::NEG_INFINITY] {
            let mut s = AdaptiveState::new(&cfg, ceiling);
            s.on_success(&cfg, ceiling);
            s.on_throttle(&cfg, ceiling, 1, &Cooldown::default());
        }
    }

    #[test]
    fn adaptive_rate_recovers_below_its_limit_then_probes() {
        let cfg = Adaptive::default();
        let mut s = AdaptiveState::new(&cfg, 10.0);
        assert_eq!(s.rate(), 2.5);
        for _ in 0..200 {
            s.on_success(&cfg, 10.0);
        }
        assert_eq!(s.rate(), 10.0, "slow start stops at the ceiling");
        s.on_throttle(&cfg, 10.0, 1, &Cooldown::default());
        assert_eq!((s.rate(), s.limit()), (8.5, Some(10.0)));
        for _ in 0..12 {
            s.on_success(&cfg, 10.0);
        }
        assert!(s.rate() > 9.6 && s.rate() < 9.75, "{}", s.rate());
        for _ in 0..40 {
            s.on_success(&cfg, 10.0);
        }
        assert!(
            s.rate() > 10.0 * 0.99,
            "probing goes past the limit again: {}",
            s.rate()
        );
    }

    /// The successes after `state`'s last 1302 until its rate is at `share` of its limit.
    fn successes_to(mut state: AdaptiveState, cfg: &Adaptive, ceiling: f64, share: f64) -> usize {
        let limit = state.limit().unwrap();
        (1..=5000)
            .find(|_| {
                state.on_success(cfg, ceiling);
                state.rate() >= share * limit
            })
            .unwrap()
    }

    /// A `Retry-After` of about one interval — up to the interval plus the header's
    /// resolution — leaves the rule exactly as it was: the same states, success for success.
    #[test]
    fn a_short_retry_after_changes_nothing() {
        let cfg = Adaptive::default();
        let cooldown = Cooldown::default();
        // 1/s: an interval is 1 s, so up to 3 s is about one.
        for wait in [0.0, 1.0, 2.5, 3.0] {
            let mut bare = AdaptiveState::from_parts(1.0, None);
            let mut short = bare;
            bare.on_throttle(&cfg, 4.0, 1, &cooldown);
            let retry_after = Some(Duration::from_secs_f64(wait));
            short.on_throttle_retry_after(&cfg, 4.0, 1, &cooldown, retry_after);
            assert_eq!(short.caution(), 1.0);
            for _ in 0..100 {
                assert_eq!(short, bare);
                bare.on_success(&cfg, 4.0);
                short.on_success(&cfg, 4.0);
            }
        }
    }

    /// The caution is what the wait cost in intervals past the header's resolution, at most
    /// `max_caution`; a NaN rate (a bad ceiling) reads as none.
    #[test]
    fn the_caution_is_the_cost_in_intervals_bounded() {
        let cfg = Adaptive::default();
        let secs = |s: u64| Some(Duration::from_secs(s));
        assert_eq!(cfg.caution(1.0, None), 1.0);
        assert_eq!(cfg.caution(1.0, secs(6)), 4.0);
        assert_eq!(cfg.caution(0.5, secs(6)), 2.0);
        assert_eq!(cfg.caution(1.0 / 6.0, secs(7)), 1.0);
        assert_eq!(cfg.caution(1.0, secs(60)), 10.0);
        assert_eq!(cfg.max_caution(30.0).caution(1.0, secs(60)), 30.0);
        assert_eq!(cfg.max_caution(1.0).caution(1.0, secs(60)), 1.0);
        assert_eq!(cfg.caution(f64::NAN, secs(60)), 1.0);
        for bad in [0.5, f64::NAN, f64::INFINITY] {
            let err = cfg.max_caution(bad).validate().unwrap_err();
            assert_eq!(err.field(), "adaptive.max_caution");
        }
    }

    /// After a 1302 at 1/s whose `Retry-After` asked for 6 s (four intervals past the
    /// resolution) the rate probes four times slower up to the limit, after a 60 s one ten
    /// times (`max_caution`); the first success that reaches the limit ends the caution, so
    /// above it the probe is 0.1% of the limit again.
    #[test]
    fn a_long_retry_after_slows_the_probe_up_to_the_limit() {
        let cfg = Adaptive::default();
        let cooldown = Cooldown::default();
        let after = |wait: Option<u64>| {
            let mut s = AdaptiveState::from_parts(1.0, None);
            let retry_after = wait.map(Duration::from_secs);
            s.on_throttle_retry_after(&cfg, 4.0, 1, &cooldown, retry_after);
            s
        };
        let counts = |s| {
            (
                successes_to(s, &cfg, 4.0, 0.97),
                successes_to(s, &cfg, 4.0, 1.0),
            )
        };
        assert_eq!(counts(after(None)), (16, 46));
        assert_eq!(after(Some(6)).caution(), 4.0);
        assert_eq!(counts(after(Some(6))), (21, 141));
        assert_eq!(after(Some(60)).caution(), 10.0);
        assert_eq!(counts(after(Some(60))), (24, 324));
        // Past the limit, the usual probe: a limit raised 10% is found 100 successes later.
        assert_eq!(successes_to(after(Some(60)), &cfg, 4.0, 1.1), 424);
        let mut s = after(Some(60));
        for _ in 0..324 {
            s.on_success(&cfg, 4.0);
        }
        assert_eq!(s.caution(), 1.0);
        let before = s.rate();
        s.on_success(&cfg, 4.0);
        assert!((s.rate() - before - 0.001).abs() < 1e-12);
    }

    /// A 1302 under a ceiling lowered below the state's rate (`set_quota`) lowers the rate
    /// from the ceiling, where the request was refused: clamped back to it, it stayed there.
    #[test]
    fn a_1302_under_a_lowered_ceiling_lowers_the_rate_from_it() {
        let cfg = Adaptive::default();
        let mut s = AdaptiveState::from_parts(4.0, None);
        s.on_throttle(&cfg, 1.0, 1, &Cooldown::default());
        assert_eq!((s.rate(), s.limit()), (0.85, Some(1.0)));
    }
}
