//! Tests of the runner.
//!
//! - `smoke`: every section runs with tiny sizes, and what it measures holds the properties the
//!   published tables rely on. (Timings are not asserted: this is a test, not a benchmark.)
//! - `targets`: the targets of BENCHMARKS.md that do not depend on the machine's speed
//!   (goodput in paused time, bytes per queued waiter), checked at the published sizes, so a
//!   change that breaks one fails here rather than at the next rerun; and the allocations per
//!   request of the success path, which the overhead targets hinge on.

use std::sync::{Mutex, MutexGuard};

mod smoke;
mod targets;

/// The bench counts allocations process-wide, so its sections must not run side by side (as
/// `cargo test` would run these tests): each test holds this while it runs.
fn alone() -> MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether the tests run on CI, where a missing tool is a failure rather than a skip: `CI` set
/// to `true` or `1`. A copy of `kling_redis::testing::on_ci` (kling-bench does not depend on
/// kling-redis): change both together.
fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}
