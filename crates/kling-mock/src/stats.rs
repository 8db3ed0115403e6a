//! What the mock observed, as one serializable snapshot.
//!
//! Tests and benches judge a client by the server's truth: how many requests it needed, whether a
//! pool was ever over capacity, how many task-seconds it bought (the efficiency bound).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How many pools [`Stats::max_concurrent`] names one by one: past it, a model's pool neither
/// configured (`pool_slots`, `known_models`) nor named already is counted under
/// `{pack}:*` (`video:*`, `image:*`), in every map keyed by pool. A model name is the client's
/// input: a mock without `known_models` fed random names kept an entry for each, for good.
pub const MAX_STATS_POOLS: usize = 256;

/// A snapshot of the mock's counters, served as JSON by `GET /__mock/stats`.
///
/// Pools are keyed by their names (`video`, `image`, `try-on`, `video:{model}`,
/// `image:{model}`; past [`MAX_STATS_POOLS`], `video:*` and `image:*` for the models after).
/// `max_concurrent` is the highest number of slots one account held in a pool at any moment
/// (the limit is per account); `in_use` sums all accounts now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Stats {
    /// Requests received (control endpoints under `/__mock/` excluded).
    pub requests_total: u64,
    /// Responses sent, by Kling `code` as a string (`"0"`, `"1303"`, ...). A slow answer is
    /// counted when it is sent (not at all if its client went away first); lost and garbled
    /// answers are counted in [`Stats::answers_lost`] and [`Stats::malformed_responses`]
    /// instead.
    pub responses_by_code: BTreeMap<String, u64>,
    /// Tasks created (ghost creates included).
    pub tasks_created: u64,
    /// Tasks that have reached a terminal state.
    pub tasks_finished: u64,
    /// Pool → highest slots in use by one account at any moment.
    pub max_concurrent: BTreeMap<String, u32>,
    /// Pool → slots in use now (all accounts).
    pub in_use: BTreeMap<String, u32>,
    /// Creates received more than 100 ms of API time (divided by speed), and at least 20 ms of
    /// real time, after the first 1102 of the account's credit period that the client could
    /// read: creates sent before it was seen are not counted. An 1102 is seen when it is sent
    /// as built, or, slow, when it goes out; never when its answer is lost or garbled, nor when
    /// the client of a slow one has gone away first. The account is refused 1102 from the first
    /// one built all the same.
    pub creates_after_1102: u64,
    /// Creates refused because their external id was already used.
    pub duplicate_external_ids: u64,
    /// Pool → sum of the durations of created tasks, in real (sped-up) seconds.
    pub task_seconds: BTreeMap<String, f64>,
    /// Callbacks delivered with a 2xx answer.
    pub callbacks_sent: u64,
    /// Callbacks that failed (connection error, timeout, non-2xx).
    pub callbacks_failed: u64,
    /// Connections dropped by the fault injector before the request was carried out.
    pub connections_dropped: u64,
    /// Requests carried out whose answer the fault injector then dropped (the connection closed
    /// without a response): a create among them made its task.
    pub answers_lost: u64,
    /// Responses whose body the fault injector garbled (not JSON), the request carried out: a
    /// create among them answered HTTP 200 made its task.
    pub malformed_responses: u64,
}

impl Stats {
    /// Responses sent with Kling `code` (`"1303"`, say): its entry in
    /// [`Stats::responses_by_code`], or 0 when the mock never sent it.
    pub fn responses(&self, code: &str) -> u64 {
        self.responses_by_code.get(code).copied().unwrap_or(0)
    }
}
