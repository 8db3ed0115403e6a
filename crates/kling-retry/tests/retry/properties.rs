//! Every computed delay lies within its documented bounds, and the bounds are the documented
//! formula.

use std::time::Duration;

use kling_retry::{Backoff, DelayKind, RandomSource, SplitMix};
use proptest::prelude::*;

/// The raw settings, to compute the documented bounds independently of the crate.
#[derive(Clone, Copy, Debug)]
struct Settings {
    throttle: Duration,
    transient: Duration,
    maintenance: Duration,
    max_backoff: Duration,
    max_hint: Duration,
    jitter: Duration,
}

impl Settings {
    fn backoff(self) -> Backoff {
        Backoff::new()
            .throttle_base(self.throttle)
            .transient_base(self.transient)
            .maintenance_base(self.maintenance)
            .max_backoff(self.max_backoff)
            .max_retry_after(self.max_hint)
            .retry_after_jitter(self.jitter)
    }

    /// `[floor, floor + min(max_backoff, base × 2^(retry−1))]`, per the `Backoff` docs.
    fn documented(self, kind: DelayKind, retry: u32) -> (Duration, Duration) {
        let exp = |base: Duration| {
            base.saturating_mul(1u32 << (retry - 1).min(31))
                .min(self.max_backoff)
        };
        match kind {
            DelayKind::Immediate => (Duration::ZERO, Duration::ZERO),
            DelayKind::Transient => (Duration::ZERO, exp(self.transient)),
            DelayKind::Throttled | DelayKind::SlotFull => {
                (self.throttle, self.throttle + exp(self.throttle))
            }
            DelayKind::Maintenance => (self.maintenance, self.maintenance + exp(self.maintenance)),
            _ => unreachable!("every kind is listed"),
        }
    }
}

fn duration(max_ms: u64) -> impl Strategy<Value = Duration> {
    (1..=max_ms * 1_000).prop_map(Duration::from_micros)
}

fn settings() -> impl Strategy<Value = Settings> {
    (
        duration(5_000),
        duration(5_000),
        duration(20_000),
        duration(120_000),
        duration(600_000),
        (0..=2_000u64).prop_map(Duration::from_millis),
    )
        .prop_map(
            |(throttle, transient, maintenance, max_backoff, max_hint, jitter)| Settings {
                throttle,
                transient,
                maintenance,
                max_backoff,
                max_hint,
                jitter,
            },
        )
}

fn kind() -> impl Strategy<Value = DelayKind> {
    prop_oneof![
        Just(DelayKind::Immediate),
        Just(DelayKind::Transient),
        Just(DelayKind::Throttled),
        Just(DelayKind::Maintenance),
        Just(DelayKind::SlotFull),
    ]
}

/// A source that returns one fixed value: drives the draw to its extremes.
#[derive(Debug)]
struct Fixed(u64);

impl RandomSource for Fixed {
    fn next_u64(&self) -> u64 {
        self.0
    }
}

proptest! {
    #[test]
    fn a_backoff_lies_within_its_documented_bounds(
        settings in settings(),
        kind in kind(),
        retry in 1..64u32,
        seed in any::<u64>(),
    ) {
        let backoff = settings.backoff();
        let (low, high) = backoff.bounds(kind, retry);
        prop_assert_eq!((low, high), settings.documented(kind, retry));
        let delay = backoff.delay(kind, retry, &SplitMix::seeded(seed));
        prop_assert!(low <= delay && delay <= high, "{delay:?} not in {low:?}..={high:?}");
        for extreme in [0, 1, u64::MAX / 2, u64::MAX] {
            let delay = backoff.delay(kind, retry, &Fixed(extreme));
            prop_assert!(low <= delay && delay <= high, "{delay:?} not in {low:?}..={high:?}");
        }
        prop_assert_eq!(backoff.delay(kind, retry, &Fixed(0)), low);
    }

    #[test]
    fn throttled_waits_never_go_below_a_second_by_default(retry in 1..64u32, seed in any::<u64>()) {
        let rng = SplitMix::seeded(seed);
        for kind in [DelayKind::Throttled, DelayKind::SlotFull] {
            let delay = Backoff::new().delay(kind, retry, &rng);
            prop_assert!(delay >= Duration::from_secs(1));
            prop_assert!(delay <= Duration::from_secs(31));
        }
    }

    #[test]
    fn a_hinted_delay_is_never_early_and_at_most_the_jitter_late(
        settings in settings(),
        hint_ms in 0..1_000_000u64,
        seed in any::<u64>(),
    ) {
        let backoff = settings.backoff();
        let hint = Duration::from_millis(hint_ms);
        let (low, high) = backoff.hint_bounds(hint);
        prop_assert_eq!(low, hint.min(settings.max_hint));
        prop_assert_eq!(high, low + settings.jitter);
        let delay = backoff.hinted(hint, &SplitMix::seeded(seed));
        prop_assert!(low <= delay && delay <= high, "{delay:?} not in {low:?}..={high:?}");
        if hint <= settings.max_hint {
            prop_assert!(delay >= hint, "early: {delay:?} < {hint:?}");
        }
    }

    #[test]
    fn sped_up_rules_divide_their_bounds_by_the_speed(speed in 1.0..500.0f64, retry in 1..10u32) {
        let normal = Backoff::new();
        let fast = normal.sped_up(speed);
        for kind in [DelayKind::Transient, DelayKind::Throttled, DelayKind::Maintenance] {
            let (low, high) = normal.bounds(kind, retry);
            let (fast_low, fast_high) = fast.bounds(kind, retry);
            let close = |a: Duration, b: Duration| (a.as_secs_f64() / speed - b.as_secs_f64()).abs() < 1e-6;
            prop_assert!(close(low, fast_low) && close(high, fast_high));
        }
    }
}
