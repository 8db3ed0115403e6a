//! Explicit histogram buckets for the stack's histograms, in seconds.
//!
//! The `metrics` facade records raw samples; buckets belong to the exporter. The `prometheus`
//! module's helper (feature `prometheus`) applies these; users of another exporter can apply
//! them the same way.

/// Buckets of [`REQUEST_DURATION`](kling_core::metrics::REQUEST_DURATION): OpenTelemetry's
/// advice for `http.client.request.duration` (5 ms to 10 s), extended to four hours because a
/// logical call includes rate-limit and slot waits, and a create queued behind a batch on a
/// one-slot account waits for hours.
pub const REQUEST_DURATION: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0,
];

/// Buckets of the wait histograms ([`RATELIMIT_WAIT`](kling_core::metrics::RATELIMIT_WAIT),
/// [`SLOTS_WAIT`](kling_core::metrics::SLOTS_WAIT)): from a millisecond (pacing) to four hours
/// (a create queued behind a batch on an account with few slots).
pub const WAIT: &[f64] = &[
    0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0, 7200.0, 14400.0,
];

/// Buckets of [`TASK_LIFETIME`](kling_core::metrics::TASK_LIFETIME): Kling tasks take one to
/// more than ten minutes.
pub const TASK_LIFETIME: &[f64] = &[
    5.0, 15.0, 30.0, 60.0, 120.0, 180.0, 300.0, 450.0, 600.0, 900.0, 1200.0, 1800.0, 3600.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// A bucket bound as the README writes it: `5 ms`, `10 s`, `10 min`, `4 h`.
    fn spoken(seconds: f64) -> String {
        match seconds {
            s if s < 1.0 => format!("{} ms", s * 1000.0),
            s if s < 60.0 => format!("{s} s"),
            s if s < 3600.0 => format!("{} min", s / 60.0),
            s => format!("{} h", s / 3600.0),
        }
    }

    /// The README's Prometheus section says how far each list of buckets goes: it said 10 min
    /// for calls and waits after they went on to 4 h.
    #[test]
    fn the_readme_gives_the_range_of_every_bucket_list() {
        let readme = include_str!("../README.md").replace('\n', " ");
        let range = |buckets: &[f64]| {
            let (first, last) = (buckets[0], buckets[buckets.len() - 1]);
            format!("{}–{}", spoken(first), spoken(last))
        };
        let calls = format!(
            "OpenTelemetry's {}–10 s advice extended to {}",
            spoken(REQUEST_DURATION[0]),
            spoken(REQUEST_DURATION[REQUEST_DURATION.len() - 1])
        );
        for said in [
            calls,
            format!("{} for waits", range(WAIT)),
            format!("{} for task lifetimes", range(TASK_LIFETIME)),
        ] {
            assert!(readme.contains(&said), "the README does not say {said:?}");
        }
    }
}
