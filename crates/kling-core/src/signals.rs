//! Extensions that carry signals between layers, so no layer needs to know another's type.
//!
//! DESIGN.md's order puts `RetryLayer` above `TaskSlotsLayer` above `GcraLayer`; these markers
//! are how they cooperate: the retry layer tells the layers below how long the whole call may
//! still wait, and the slots layer tells the retry layer that a 1303 needs no backoff because
//! it will hold the retried create until a slot frees.

use tokio::time::Instant;

/// Request extension: the instant after which the whole logical call (all attempts, all waits)
/// is late. Set by the retry layer; layers that wait (rate limiter, task slots) give up with
/// their typed error instead of waiting past it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// The deadline a request carries, if any.
    pub fn of<B>(request: &http::Request<B>) -> Option<Instant> {
        request.extensions().get::<Deadline>().map(|d| d.0)
    }
}

/// Request extension: which attempt of a logical call this is (1 for the first). Set by the
/// retry layer, read by metrics and tracing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt(pub u32);

/// Response extension: a task-slots layer saw this 1303, gave the slots back and lowered its
/// believed capacity; a retried create will wait in that layer until a slot frees, so the retry
/// layer may retry without its own backoff.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotGated;

/// Response extension: how long the request waited inside a limiting layer before it was sent
/// (rate limiter and task slots add theirs up), for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Waited {
    /// Time spent waiting for the rate limiter.
    pub rate_limit: std::time::Duration,
    /// Time spent waiting for task slots.
    pub slots: std::time::Duration,
}
