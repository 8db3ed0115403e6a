//! The names of every metric the stack records, in one place, so layers and dashboards agree.
//!
//! Names follow OpenTelemetry's HTTP-client conventions in their Prometheus-safe form
//! (`http_client_request_duration_seconds` for `http.client.request.duration`). Labels use the
//! `LABEL_*` names. Nothing here records anything: each layer records through the `metrics`
//! facade with these names, and `kling-metrics` documents them in one table.

/// Histogram, seconds: one logical request, including waits and retries.
/// Labels: `kind`, `pool`, `status`, `code`.
pub const REQUEST_DURATION: &str = "http_client_request_duration_seconds";
/// Counter: responses by Kling code. Labels: `kind`, `code`.
pub const RESPONSES: &str = "kling_responses_total";
/// Counter: retries by reason. Labels: `kind`, `reason`.
pub const RETRIES: &str = "kling_retries_total";
/// Counter: retries refused because the retry budget was spent. Labels: `kind`.
pub const RETRY_BUDGET_EXHAUSTED: &str = "kling_retry_budget_exhausted_total";
/// Counter: key-wide pauses started after a 1302 or a `Retry-After`. Labels: `account`.
pub const COOLDOWNS: &str = "kling_ratelimit_cooldowns_total";
/// Histogram, seconds: time spent waiting for the rate limiter. Labels: `kind`.
pub const RATELIMIT_WAIT: &str = "kling_ratelimit_wait_seconds";
/// Gauge: requests queued at the rate limiter. Labels: `account`.
pub const RATELIMIT_QUEUE_DEPTH: &str = "kling_ratelimit_queue_depth";
/// Histogram, seconds: time a create waited for task slots. Labels: `pool`.
pub const SLOTS_WAIT: &str = "kling_slots_wait_seconds";
/// Gauge: slots held by running tasks. Labels: `account`, `pool`.
pub const SLOTS_IN_USE: &str = "kling_slots_in_use";
/// Gauge: the slots a pool is believed to have now. Labels: `account`, `pool`.
pub const SLOTS_CAPACITY: &str = "kling_slots_capacity";
/// Gauge: creates waiting for slots. Labels: `account`, `pool`.
pub const SLOTS_WAITERS: &str = "kling_slots_waiters";
/// Histogram, seconds: a task's life from create to its terminal status. Labels: `pool`, `status`.
pub const TASK_LIFETIME: &str = "kling_task_lifetime_seconds";
/// Counter: tasks that reached a terminal status. Labels: `pool`, `status`.
pub const TASKS_FINISHED: &str = "kling_tasks_finished_total";

/// Label: request kind (`create`, `query`, `list`, `account`, `other`).
pub const LABEL_KIND: &str = "kind";
/// Label: pool name (`video`, `image:kling-v2`, …; empty for non-creates).
pub const LABEL_POOL: &str = "pool";
/// Label: HTTP status code.
pub const LABEL_STATUS: &str = "status";
/// Label: Kling business code.
pub const LABEL_CODE: &str = "code";
/// Label: retry reason.
pub const LABEL_REASON: &str = "reason";
/// Label: account id (never a key or token).
pub const LABEL_ACCOUNT: &str = "account";
