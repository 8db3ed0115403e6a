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
