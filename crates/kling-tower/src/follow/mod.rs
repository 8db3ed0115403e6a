//! [`Follower`]: waits for tasks to end, querying through whatever stack it is given.
//!
//! Each task is queried at an interval that grows with its age (young tasks are looked at
//! often, old ones seldom), gives up at a per-task deadline, and backs off when queries fail.
//! A task whose next query would fall after its deadline is asked about once more a shortest
//! interval before the deadline, time for the answer (a task that ended after its last query
//! was reported as not ended), unless an answer came within a shortest interval before that:
//! queries stay that far apart. A retry after a failed query is not brought forward so: the
//! backoff spares a failing server. That last query is due like any other, so the last queries
//! of many tasks due together share batch queries too, and like any task due within a
//! shortest interval it rides in a batch query sent anyway that long before it (its answer
//! then stands for it: the last answer may come two shortest intervals before the deadline).
//! With a [`last_query_slack`](FollowPolicy::last_query_slack) (off by default), a batch query
//! sent anyway up to that long before it takes it along, a shortest interval after the task's
//! last answer at the soonest: tasks created apart have their deadlines apart, and their last
//! queries go one each. Any answer within that slack before the last query then stands for
//! it.
//! Many new-style tasks are asked about in one `GET /tasks?task_ids=a,b,c`, across calls: the
//! [`follow`](Follower::follow) and [`follow_many`](Follower::follow_many) calls of a follower
//! and its clones share batch queries. A call whose task is due asks about its own due tasks,
//! other calls' due tasks, and tasks due within the shortest interval (one answered a moment
//! before too: riding in a query sent anyway costs the account no request, and its next query
//! is then an interval after this answer), up to the batch size;
//! the calls whose tasks it asks about, and calls that start following one of them meanwhile,
//! wait for its answer rather than ask again, for at most four times the longest interval (so
//! a query that hangs holds them up no longer than that), and the sending call stops waiting
//! for its own only when its tasks have ended or another call's answer has made one due
//! again. A task id a batch answer leaves out is then asked about alone
//! until an answer reports it, so an unknown id still meets its `1203`; so is every task of a
//! batch refused with a code one id may cause (`1203`, `1200`, `1201`, or one Kling has not
//! documented), rather than failing the other calls' tasks with it. Not a task that only rode
//! along, not due yet: it keeps its time (asked about alone at once, riding cost a request
//! after all, and at a page limit a burst of them), and is asked about alone if left out then.
//! Tasks due together go into a batch in the order they were followed, and calls are woken in
//! that order: a run in paused time repeats query for query.
//! A new-style task known by its external id alone (a create whose answer was lost:
//! [`TaskRef::new_style_external`]) is asked about the same way in
//! `GET /tasks?external_task_ids=x,y`, never in a query by task ids (Kling takes no mix): a call
//! whose due tasks are of both kinds sends one query of each. Its answer's report is matched on its
//! `external_id`, and names the task id the follow ends with. An external id no answer lists, even
//! asked about alone (`1203`), is asked about again until the deadline rather than declared gone:
//! the create may not be listed yet. It stays in batches: one asked about alone (left out of a
//! batch answer, or its batch refused) goes back into batches at its `1203`, or at a successful
//! answer listing no task (a server may answer so); and once an id left out of a successful answer
//! has met either alone (the server leaves out what it does not list), an external id left out says
//! what a lone `1203` says, and a `1203` to a batch of them means none is listed: none is asked
//! about alone (asked about alone, they ate the rate creates need). Until then one left out is
//! asked about alone, as a task id is: a page limit or an id echoed in another case leaves out a
//! listed one. A task id and an external id that read the same are different tasks. Legacy tasks
//! are queried one by one at `{create path}/{task_id}`. When callbacks are configured
//! ([`FollowPolicy::callbacks_first`]) a task delivered through [`Follower::deliver`] ends at once
//! and queries only run as a slow safety net: every safety interval, and the last query before the
//! deadline (also when the deadline comes before the first safety interval).
//!
//! A task's end, delivered or answered to a query, ends at once every call of the follower and
//! its clones already following that task by its task id (legacy or new-style, whichever
//! clone's query or callback reported it), and stays known to them for the policy's wait
//! before a first query (the safety interval with `callbacks_first`; at least the shortest
//! interval) once a call has taken it: a call that starts following the task meanwhile, also
//! at the moment the report is handed out, ends with it at once and sends no query. A call
//! that follows a legacy task by its external id finds a delivered end, not
//! an answered one, and only one delivered to a follower of its own account (the same
//! [`with_account`](Follower::with_account), or none for both): external ids are unique per
//! account at most, and clones may query others. As they may be unique per create path only
//! (the mock's rule: a legacy task is looked up at `{create path}/{external id}`) and a
//! callback names no path, such a delivered end makes the call ask its own path at once (once
//! per report) rather than end with it; once an answer has named the call's task id, a
//! delivered end of that task ends the call at once. A call following a new-style task by its
//! external id ends at once with a new-style report delivered with that external id to a
//! follower of its account (new-style external ids name one task in an account: there is one
//! `/tasks` to ask), before any answer has named its task id, and also with one delivered by
//! its task id once an answer has named it.
//!
//! The queries are ordinary requests through the service given, so they are paced by the rate
//! limiter and a query that reports a task ended frees its slots, like any other.
//!
//! A query answered with a code no retry can change (`1203` not found, `1000`–`1002` auth,
//! `1100`/`1101` account, …) ends following at once with [`FollowError::Api`], whether the
//! answer arrives as a response (a service without a retry layer) or as the error a retry
//! layer makes of it ([`kling_retry::error::Failed`] with
//! [`StopReason::NotRetryable`], as through [`KlingLayer`](crate::KlingLayer)). Transport
//! errors, unreadable answers and retryable codes — also when a retry layer gave up on them
//! (attempts, budget or deadline spent) — back off and query again until the task's deadline.
//! A query the service refuses before sending it, as it will refuse every other (a
//! [`Gateway`](crate::gateway::Gateway) that knows no account of the follower's: give it one
//! with [`with_account`](Follower::with_account); a client given a relative URI, with no
//! base URL layer), ends following at once with [`FollowError::Unsendable`].
//!
//! Request URIs are relative (`/tasks?task_ids=…`): put a
//! [`BaseUrlLayer`](crate::base_url::BaseUrlLayer) in the stack for a real client.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use kling_core::{ClassifyLayer, TaskStatus};
//! use kling_mock::{MockConfig, MockKling, Preset};
//! use kling_tower::follow::{FollowPolicy, Follower, TaskRef};
//! use tower::{Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let mock = MockKling::new(MockConfig::preset(Preset::Pro).no_rate_limit())?;
//! let service = ClassifyLayer::new().layer(mock);
//! let create = http::Request::post("/text-to-video/kling-3.0")
//!     .header("authorization", "Bearer key")
//!     .body(http_body_util::Full::new(bytes::Bytes::from(r#"{"prompt":"a cat"}"#)))?;
//! let created = service.clone().oneshot(create).await?;
//! let task = kling_core::Outcome::of(&created).and_then(|o| o.task()).cloned().unwrap();
//!
//! let follower = Follower::new(service, FollowPolicy::new())?;
//! # let follower = follower.with_header("authorization", "Bearer key")?;
//! let done = follower.follow(TaskRef::from_report("/text-to-video/kling-3.0", &task)).await?;
//! assert_eq!(done.status, TaskStatus::Succeeded);
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body_util::Full;
use kling_core::error::ApiError;
use kling_core::{AccountId, ApiGeneration, BoxError, Code, Disposition, Outcome, TaskReport};
use kling_retry::error::StopReason;
use tokio::sync::Notify;
use tokio::time::Instant;
use tower_service::Service;

use self::batches::{Batches, Registered, is_due, next_wake, wake_each};
use crate::drain::DrainHandle;
use crate::error::{ConfigError, FollowError, OtherOrigin, UnknownAccount};
use crate::preset::MAX_DURATION;

mod batches;

/// The most task ids a batch query (`GET /tasks?task_ids=…`) takes.
pub const MAX_BATCH_SIZE: usize = 500;

/// When and how long to query a task. Durations are API time, whether set before or after
/// [`FollowPolicy::speed`], which divides them all when they are used (not cumulative).
#[derive(Clone, Debug, PartialEq)]
pub struct FollowPolicy {
    speed: f64,
    first_query: Duration,
    min_interval: Duration,
    max_interval: Duration,
    age_factor: f64,
    deadline: Duration,
    error_backoff: Duration,
    max_error_backoff: Duration,
    batch_size: usize,
    callbacks_first: bool,
    callback_interval: Duration,
    last_query_slack: Duration,
}

impl Default for FollowPolicy {
    fn default() -> Self {
        FollowPolicy::new()
    }
}

impl FollowPolicy {
    /// First query 5 s after following starts, then every age × 0.2 (between 2 s and 30 s),
    /// a 30-minute deadline per task, error backoff from 1 s doubling to 60 s, batches of 50,
    /// each last query before the deadline sent at its time (no
    /// [`last_query_slack`](Self::last_query_slack)).
    pub fn new() -> Self {
        FollowPolicy {
            speed: 1.0,
            first_query: Duration::from_secs(5),
            min_interval: Duration::from_secs(2),
            max_interval: Duration::from_secs(30),
            age_factor: 0.2,
            deadline: Duration::from_secs(30 * 60),
            error_backoff: Duration::from_secs(1),
            max_error_backoff: Duration::from_secs(60),
            batch_size: 50,
            callbacks_first: false,
            callback_interval: Duration::from_secs(120),
            last_query_slack: Duration::ZERO,
        }
    }

    /// Sets the wait before a task's first query.
    pub fn first_query(mut self, wait: Duration) -> Self {
        self.first_query = wait;
        self
    }

    /// Sets the bounds of the query interval. Four times `max` is also how long a call waits
    /// for the answer to another call's batch query that asks about its task before asking
    /// again; tasks due within `min` join a batch query that is sent anyway.
    pub fn interval_bounds(mut self, min: Duration, max: Duration) -> Self {
        self.min_interval = min;
        self.max_interval = max;
        self
    }

    /// Sets the interval as a share of the task's age (0.2: a 60 s old task waits 12 s).
    pub fn age_factor(mut self, factor: f64) -> Self {
        self.age_factor = factor;
        self
    }

    /// Sets how long a task may run before following it fails. A task is asked about once
    /// more a shortest interval before it (see the [module docs](self)); one already past it
    /// when following starts is still asked about, at once (see [`TaskRef::created_at`]). It
    /// must be above the shortest interval (`min_interval`), or that last query would be sent
    /// as the task starts.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Sets the backoff after a failed query: `base`, doubling up to `max`.
    pub fn error_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.error_backoff = base;
        self.max_error_backoff = max;
        self
    }

    /// Sets how many task ids one batch query carries (1 to [`MAX_BATCH_SIZE`]).
    pub fn batch_size(mut self, size: usize) -> Self {
        self.batch_size = size;
        self
    }

    /// Sets how far ahead of its time a task's last query before its deadline (see the
    /// [module docs](self)) rides in a batch query sent anyway, rather than go alone: the
    /// deadlines of tasks created apart are apart too, and so were their last queries, one
    /// query each (60 tasks created a second apart, 300 s deadline: 152 queries with 10 s,
    /// 164 without). An answer within `slack` before the last query stands for it, so a task
    /// ending within `slack` (at least the shortest interval) and the shortest interval
    /// before its deadline may end `DeadlineExceeded` though it ended in time: the trade is
    /// fewer queries (request rate for other work) against that blind window. Zero, the
    /// default, sends each last query at its time, or in a batch sent within a shortest
    /// interval before it, as any task due that soon (a blind window of two shortest
    /// intervals). It must be below the longest a task's last answer can come before its last
    /// query: the safety interval with [`callbacks_first`](Self::callbacks_first), else the
    /// interval at the age whose next query falls at the last query
    /// (`age_factor × (deadline − min_interval) / (1 + age_factor)` within the interval bounds:
    /// `max_interval` unless the deadline is short or the age factor small; 9.67 s for a 60 s
    /// deadline by default). Every last answer comes within that before the last query, so a
    /// slack that long drops every last query, and one just below it almost every.
    pub fn last_query_slack(mut self, slack: Duration) -> Self {
        self.last_query_slack = slack;
        self
    }

    /// Relies on callbacks ([`Follower::deliver`]): queries only every `safety_interval`, and
    /// once just before the deadline (a lost callback must not end a finished task as
    /// `DeadlineExceeded`, see the [module docs](self)). The safety interval must be at least
    /// the shortest interval (`min_interval`): a safety net polls less often than polling.
    pub fn callbacks_first(mut self, safety_interval: Duration) -> Self {
        self.callbacks_first = true;
        self.callback_interval = safety_interval;
        self
    }

    /// Sets the speed factor (the mock's `--speed`): every duration, set before or after, is
    /// divided by `speed` (not cumulative: the last call counts). A speed that is not a finite
    /// number above 0 is ignored.
    pub fn speed(mut self, speed: f64) -> Self {
        if speed.is_finite() && speed > 0.0 {
            self.speed = speed;
        }
        self
    }

    /// An API-time duration at this policy's speed.
    fn scaled(&self, duration: Duration) -> Duration {
        Duration::try_from_secs_f64(duration.as_secs_f64() / self.speed).unwrap_or(duration)
    }

    /// The per-task deadline at this speed.
    fn deadline_duration(&self) -> Duration {
        self.scaled(self.deadline)
    }

    /// The wait before a task's first query at this speed (the safety interval with
    /// [`callbacks_first`](Self::callbacks_first)).
    fn first_wait(&self) -> Duration {
        if self.callbacks_first {
            self.scaled(self.callback_interval)
        } else {
            self.scaled(self.first_query)
        }
    }

    /// The shortest query interval at this speed.
    fn min_interval_duration(&self) -> Duration {
        self.scaled(self.min_interval)
    }

    /// Checks the numbers, naming the first impossible one.
    ///
    /// Every duration must be at most a year ([`MAX_DURATION`], as in
    /// [`StackConfig::validate`](crate::StackConfig::validate)), after the
    /// [speed factor](Self::speed): "no deadline" or "never poll" is a year, not
    /// `Duration::MAX`, whose sum with an instant does not exist.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field: &'static str, reason: &'static str| Err(ConfigError::new(field, reason));
        let durations = [
            ("follow.first_query", self.first_query),
            ("follow.min_interval", self.min_interval),
            ("follow.max_interval", self.max_interval),
            ("follow.deadline", self.deadline),
            ("follow.error_backoff", self.error_backoff),
            ("follow.max_error_backoff", self.max_error_backoff),
            ("follow.callback_interval", self.callback_interval),
            ("follow.last_query_slack", self.last_query_slack),
        ];
        for (field, duration) in durations {
            if self.scaled(duration) > MAX_DURATION {
                return err(field, "must be at most a year");
            }
        }
        if self.scaled(self.min_interval).is_zero() {
            return err("follow.min_interval", "must be above 0");
        }
        if self.max_interval < self.min_interval {
            return err("follow.max_interval", "must be at least min_interval");
        }
        if !(self.age_factor.is_finite() && self.age_factor >= 0.0) {
            return err("follow.age_factor", "must be a finite number, 0 or more");
        }
        if self.scaled(self.deadline).is_zero() {
            return err("follow.deadline", "must be above 0");
        }
        // The last query goes a shortest interval before the deadline: for a deadline that
        // short, as the task starts, and no query could report it ended. Judged as it runs
        // too, divided by the speed: there a margin of a few nanoseconds rounds away (2 s and
        // 2 s + 1 ns are both 666.666667 ms at speed 3), and `<=` does not survive rounding.
        let rounds_away = self.scaled(self.deadline) <= self.scaled(self.min_interval);
        if self.deadline <= self.min_interval || rounds_away {
            return Err(ConfigError::new(
                "follow.deadline",
                format!(
                    "must be above min_interval ({:?}){}: the last query goes that long before \
                     the deadline, which would send it as the task starts",
                    self.min_interval,
                    if self.deadline > self.min_interval {
                        " once both are divided by the speed"
                    } else {
                        ""
                    }
                ),
            ));
        }
        if self.scaled(self.error_backoff).is_zero() || self.max_error_backoff < self.error_backoff
        {
            return err(
                "follow.error_backoff",
                "must be above 0 and at most max_error_backoff",
            );
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            return err(
                "follow.batch_size",
                "must be from 1 to 500 (the ids a batch query takes)",
            );
        }
        if self.callbacks_first && self.scaled(self.callback_interval).is_zero() {
            return err("follow.callback_interval", "must be above 0");
        }
        // A safety net polling more often than polling itself may is none, and the shortest
        // interval is what keeps a task's queries apart.
        if self.callbacks_first && self.callback_interval < self.min_interval {
            return Err(ConfigError::new(
                "follow.callback_interval",
                format!(
                    "must be at least min_interval ({:?}) with callbacks_first",
                    self.min_interval
                ),
            ));
        }
        // An answer within the slack before the last query stands for it, and the last answer
        // before it always comes within this bound: a slack that long drops every last query.
        let (bound, which) = self.interval_before_last_query();
        if self.last_query_slack >= bound {
            return Err(ConfigError::new(
                "follow.last_query_slack",
                format!(
                    "must be below {bound:?}, the longest a last answer comes before the last \
                     query ({which})"
                ),
            ));
        }
        Ok(())
    }

    /// The longest a task's last answer before its last call (a shortest interval before the
    /// deadline) can come ahead of it, in API time, and what sets it: the safety interval with
    /// [`callbacks_first`](Self::callbacks_first); else the interval at the age whose next
    /// query falls at the last call (`age × (1 + age_factor)` = `deadline − min_interval`), as
    /// [`interval`](Self::interval) computes it. A later answer's interval reaches past the last
    /// call too, from nearer it; an earlier one's falls before it. Shorter than `max_interval`
    /// when the deadline is short or the age factor small.
    fn interval_before_last_query(&self) -> (Duration, &'static str) {
        if self.callbacks_first {
            return (
                self.callback_interval,
                "callback_interval with callbacks_first",
            );
        }
        let last_call_age = self.deadline.saturating_sub(self.min_interval);
        let age =
            Duration::try_from_secs_f64(last_call_age.as_secs_f64() / (1.0 + self.age_factor))
                .unwrap_or(last_call_age);
        let interval = interval_at(age, self.age_factor, self.min_interval, self.max_interval);
        let which = if interval == self.max_interval {
            "max_interval"
        } else if interval == self.min_interval {
            "min_interval"
        } else {
            "age_factor × (deadline − min_interval) / (1 + age_factor), the interval at the age \
             whose next query falls at the last query"
        };
        (interval, which)
    }

    /// The wait before the next query of a task of this age (real time, at this speed: the
    /// age as measured, the bounds divided by the speed).
    pub fn interval(&self, age: Duration) -> Duration {
        if self.callbacks_first {
            return self.scaled(self.callback_interval);
        }
        interval_at(
            age,
            self.age_factor,
            self.scaled(self.min_interval),
            self.scaled(self.max_interval),
        )
    }

    /// How far ahead of its time a last query rides in a batch, at this speed.
    fn last_query_slack_duration(&self) -> Duration {
        self.scaled(self.last_query_slack)
    }

    /// How long a call waits for another call's batch query that asks about its task before
    /// asking again: four times the longest interval, as a query may wait its turn at a busy
    /// rate limiter that long without being hung.
    fn takeover(&self) -> Duration {
        self.scaled(self.max_interval)
            .saturating_mul(4)
            .min(MAX_DURATION)
    }

    /// The backoff after `errors` failed queries in a row (1 for the first), at this speed.
    pub fn backoff(&self, errors: u32) -> Duration {
        let factor = 2u32.saturating_pow(errors.saturating_sub(1).min(20));
        let max = self.scaled(self.max_error_backoff);
        self.scaled(self.error_backoff)
            .checked_mul(factor)
            .unwrap_or(max)
            .min(max)
    }
}

/// A task to follow: its id and how to query it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskRef {
    id: String,
    legacy_path: Option<String>,
    /// A new-style task known by the `external_id` its create carried, not its task id.
    external: bool,
    created_at: Option<Instant>,
}

impl TaskRef {
    /// A new-style task, queried with `GET /tasks?task_ids=…`.
    pub fn new_style(id: impl Into<String>) -> Self {
        TaskRef {
            id: id.into(),
            legacy_path: None,
            external: false,
            created_at: None,
        }
    }

    /// A new-style task known by the `external_id` its create carried alone (a create whose
    /// answer was lost), queried with `GET /tasks?external_task_ids=…`: batched apart from
    /// task-id queries (Kling takes no mix), the answer's report matched on its `external_id`.
    /// The follow ends with that report, which names the task id. An external id no answer
    /// lists yet (`1203`, or left out) is asked about again until the deadline, not given up
    /// (the create may not be listed yet), in batches. Errors name the external id as their
    /// `task_id`.
    pub fn new_style_external(external_id: impl Into<String>) -> Self {
        TaskRef {
            external: true,
            ..TaskRef::new_style(external_id)
        }
    }

    /// A legacy task, queried at `{create_path}/{id}` (e.g. `/v1/videos/text2video`). `id` is
    /// the task id or the `external_task_id` its create carried (a create whose answer was
    /// lost is known by that alone): the answer's report is matched on either. A delivered
    /// callback's is matched on the task id (or on the one its path's answer named); one
    /// carrying the external id alone (under its `task_info`) may be another create path's
    /// task, and makes the follow ask its path at once (see the [module docs](self)).
    pub fn legacy(create_path: impl Into<String>, id: impl Into<String>) -> Self {
        let path: String = create_path.into();
        TaskRef {
            id: id.into(),
            legacy_path: Some(path.trim_end_matches('/').to_owned()),
            external: false,
            created_at: None,
        }
    }

    /// The task a create at `create_path` reported, in the generation the report used.
    pub fn from_report(create_path: &str, report: &TaskReport) -> Self {
        match report.generation {
            ApiGeneration::Legacy => TaskRef::legacy(create_path, report.id.clone()),
            _ => TaskRef::new_style(report.id.clone()),
        }
    }

    /// When the task was created (its age sets the query interval and the deadline; by
    /// default, when following starts). A task created longer than the deadline ago is asked
    /// about at once, and the follow gives up if no answer within the longest query interval
    /// reports its end.
    pub fn created_at(mut self, at: Instant) -> Self {
        self.created_at = Some(at);
        self
    }

    /// The id it is followed by: the task id, or the external id it was given as.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether `report` is this task's, in an answer to its own query: by its `external_id`
    /// for a task followed by that ([`new_style_external`](Self::new_style_external)), else by
    /// its task id.
    fn reported_by(&self, report: &TaskReport) -> bool {
        if self.external {
            report.external_id.as_deref() == Some(self.id.as_str())
        } else {
            report.id == self.id
        }
    }

    fn valid_id(&self) -> bool {
        !self.id.is_empty()
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
    }
}

/// Terminal reports delivered by callbacks or answered to queries, for the calls that follow
/// their tasks.
#[derive(Debug, Default)]
struct Board {
    reports: Mutex<Reports>,
    notify: Notify,
    /// The batches of every follower that shares this board (a clone given a header or an
    /// account of its own has batches of its own): a report delivered to any of them ends the
    /// calls of each that follow its task.
    followers: Mutex<Vec<Weak<Batches>>>,
    /// How long a report stays once handed to a call (or answered to a query): the policy's
    /// wait before a call's first query, at least its shortest interval. A call that starts
    /// following its task meanwhile (as it is handed out, or just after) ends with it rather
    /// than waiting for that query.
    keep: Duration,
}

/// The board's reports by task id, each with the number it was put there under and, once
/// handed out, when it goes; the delivered reports not handed out yet in the order they came
/// (with those numbers, so an id delivered again is not evicted by its first delivery's place in
/// the order), and how many there are; the reports handed out in the order they go; and the
/// task id of each delivered legacy report by the account of the follower it was delivered to
/// and its external id, for a legacy task followed by the external id its create carried.
///
/// Reports not handed out and reports handed out are bounded apart, [`BOARD_CAPACITY`] each:
/// a query's answer (handed out as it is put) never pushes out a delivered report nobody has
/// taken yet, and deliveries nobody takes never push out the reports just handed out.
#[derive(Debug, Default)]
struct Reports {
    by_id: HashMap<String, Kept>,
    /// The delivered reports not handed out, oldest first; also places whose report has been
    /// handed out or gone since (skipped, and dropped when they outnumber the others).
    waiting: VecDeque<(String, u64)>,
    /// How many reports are not handed out.
    untaken: usize,
    going: VecDeque<(String, u64, Instant)>,
    next: u64,
    by_external_id: HashMap<ExternalKey, String>,
}

/// An external id in an account (`None`: a follower given none) and whether its report is
/// legacy: external ids are unique per account at most (the mock's legacy ones, per create
/// path), and a legacy follow and a new-style one never take each other's report.
type ExternalKey = (Option<AccountId>, bool, String);

/// How a call looks a report up on the board by the id it follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lookup {
    /// By task id only.
    TaskId,
    /// By task id, else a delivered legacy report carrying it as its external id (the task
    /// id it names: [`Found::External`]).
    LegacyExternal,
    /// A new-style external id: a delivered new-style report carrying it, handed out (the
    /// id is no task id).
    NewStyleExternal,
}

/// Where a report put on the board comes from.
#[derive(Clone, Copy, Debug)]
enum Source<'a> {
    /// A query's answer: found by its task id only.
    Answered,
    /// A callback delivered to a follower of this account (`None`: one given none): found by
    /// its task id, or by its external id by a follower of the same account.
    Delivered(Option<&'a AccountId>),
}

/// A report on the board.
#[derive(Debug)]
struct Kept {
    number: u64,
    report: TaskReport,
    /// When it goes, once handed out; until then it waits for a call to follow its task.
    until: Option<Instant>,
    /// The key it is found under by its external id, if it was delivered with one.
    external: Option<ExternalKey>,
}

/// What a call finds on the board for the id it follows.
#[derive(Debug, PartialEq)]
enum Found {
    /// The report of the task with that id, handed out.
    Task(TaskReport),
    /// A delivered legacy report carrying that id as its external id, in the call's account:
    /// the task id it names. It may be another create path's task (external ids may be unique
    /// per path only, and a callback names no path), so it is not handed out: the call asks
    /// its own path.
    External(String),
}

/// How many reports the board keeps of each kind: delivered for tasks nobody follows yet, and
/// handed out recently.
const BOARD_CAPACITY: usize = 10_000;

impl Reports {
    /// Forgets the report put under `number` for task `id`, if it is still there.
    fn forget(&mut self, id: &str, number: u64) {
        if self.by_id.get(id).is_some_and(|kept| kept.number == number)
            && let Some(gone) = self.by_id.remove(id)
        {
            if gone.until.is_none() {
                self.untaken -= 1;
            }
            if let Some(key) = gone.external {
                self.unindex(&key, id);
            }
        }
    }

    /// Forgets that task `id`'s report is found under `key`, if it still is.
    fn unindex(&mut self, key: &ExternalKey, id: &str) {
        if self.by_external_id.get(key).map(String::as_str) == Some(id) {
            self.by_external_id.remove(key);
        }
    }

    /// Forgets the reports handed out that are due to go at `now`.
    fn prune(&mut self, now: Instant) {
        while let Some((_, _, until)) = self.going.front()
            && *until <= now
        {
            if let Some((id, number, _)) = self.going.pop_front() {
                self.forget(&id, number);
            }
        }
    }

    /// Starts the countdown of task `id`'s report, if it has none yet.
    fn hand_out(&mut self, id: &str, until: Instant) {
        if let Some(kept) = self.by_id.get_mut(id)
            && kept.until.is_none()
        {
            kept.until = Some(until);
            self.untaken -= 1;
            self.going.push_back((id.to_owned(), kept.number, until));
        }
    }

    /// Keeps each kind of report within [`BOARD_CAPACITY`], the oldest going first, and the
    /// places of reports not handed out within twice that.
    fn bound(&mut self) {
        while self.untaken > BOARD_CAPACITY {
            let Some((old, number)) = self.waiting.pop_front() else {
                break;
            };
            if self
                .by_id
                .get(&old)
                .is_some_and(|kept| kept.number == number && kept.until.is_none())
            {
                self.forget(&old, number);
            }
        }
        while self.going.len() > BOARD_CAPACITY {
            if let Some((old, number, _)) = self.going.pop_front() {
                self.forget(&old, number);
            }
        }
        if self.waiting.len() > 2 * BOARD_CAPACITY {
            let Reports { by_id, waiting, .. } = self;
            waiting.retain(|(id, number)| {
                by_id
                    .get(id)
                    .is_some_and(|kept| kept.number == *number && kept.until.is_none())
            });
        }
    }
}

impl Board {
    fn new(keep: Duration) -> Board {
        Board {
            keep,
            ..Board::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Reports> {
        self.reports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a follower's batches to those a delivered report reaches (and forgets the batches
    /// of followers that are gone).
    fn register(&self, batches: &Arc<Batches>) {
        let mut followers = self.followers.lock().unwrap_or_else(|e| e.into_inner());
        followers.retain(|b| b.strong_count() > 0);
        followers.push(Arc::downgrade(batches));
    }

    /// The batches of the followers that share this board.
    fn followers(&self) -> Vec<Arc<Batches>> {
        let followers = self.followers.lock().unwrap_or_else(|e| e.into_inner());
        followers.iter().filter_map(Weak::upgrade).collect()
    }

    /// What the board holds for the task `id` names: its report, by task id, handed out (it
    /// stays for [`keep`](Board::keep) more for the other calls that follow its task, or start
    /// to: a call that looks at the board as another takes the report must find it too); else,
    /// by [`Lookup::LegacyExternal`], the task id of a legacy report delivered in `account`
    /// with `id` as its external id, left on the board (see [`Found::External`]). By
    /// [`Lookup::NewStyleExternal`], `id` is an external id: the new-style report delivered in
    /// `account` with it, handed out as by its task id.
    fn hand(
        &self,
        id: &str,
        lookup: Lookup,
        account: Option<&AccountId>,
        now: Instant,
    ) -> Option<Found> {
        let mut board = self.lock();
        board.prune(now);
        let task_id = match lookup {
            Lookup::NewStyleExternal => board
                .by_external_id
                .get(&(account.cloned(), false, id.to_owned()))?
                .clone(),
            _ => id.to_owned(),
        };
        if board.by_id.contains_key(&task_id) {
            board.hand_out(&task_id, later(now, self.keep));
            return board
                .by_id
                .get(&task_id)
                .map(|kept| Found::Task(kept.report.clone()));
        }
        if lookup != Lookup::LegacyExternal {
            return None;
        }
        board
            .by_external_id
            .get(&(account.cloned(), true, id.to_owned()))
            .map(|task_id| Found::External(task_id.clone()))
    }

    /// Keeps `report`, the oldest report of its kind going when the board holds too many (see
    /// [`Reports`]); a query's answer starts its countdown now, and is found by its task id
    /// only: an external id is unique per account (and perhaps per create path) only, and the
    /// board serves every clone of the follower, whatever account or header it has, and every
    /// path. A delivered report is found by its external id in the account of the follower
    /// it was delivered to only (a legacy one as [`Found::External`]).
    fn put(&self, report: TaskReport, source: Source<'_>, now: Instant) {
        let mut board = self.lock();
        board.prune(now);
        let id = report.id.clone();
        let key = match (source, &report.external_id) {
            (Source::Delivered(account), Some(external_id)) => Some((
                account.cloned(),
                report.generation == ApiGeneration::Legacy,
                external_id.clone(),
            )),
            _ => None,
        };
        let Reports {
            by_id,
            waiting,
            untaken,
            next,
            ..
        } = &mut *board;
        let replaced = match by_id.get_mut(&id) {
            // Delivered again before it went: the newer report, in the same place.
            Some(kept) => {
                kept.report = report;
                match &key {
                    Some(key) if kept.external.as_ref() != Some(key) => {
                        kept.external.replace(key.clone())
                    }
                    _ => None,
                }
            }
            None => {
                *next += 1;
                // An answer is handed out below: it waits for no call.
                if matches!(source, Source::Delivered(_)) {
                    waiting.push_back((id.clone(), *next));
                }
                *untaken += 1;
                by_id.insert(
                    id.clone(),
                    Kept {
                        number: *next,
                        report,
                        until: None,
                        external: key.clone(),
                    },
                );
                None
            }
        };
        if let Some(old) = replaced {
            board.unindex(&old, &id);
        }
        if let Some(key) = key {
            board.by_external_id.insert(key, id.clone());
        }
        if matches!(source, Source::Answered) {
            board.hand_out(&id, later(now, self.keep));
        }
        board.bound();
    }

    /// Starts the countdown of task `id`'s report (handed to the calls that follow it).
    fn handed(&self, id: &str, now: Instant) {
        self.lock().hand_out(id, later(now, self.keep));
    }
}

/// Follows tasks until they end. See the [module docs](self).
///
/// # Clone
///
/// Clones share the service (cloned per query), the board of delivered callbacks and the batch
/// queries of new-style tasks. A clone given its own header or account
/// ([`with_header`](Follower::with_header), [`with_account`](Follower::with_account)) sends
/// its batch queries apart, as they carry what it adds; a report [delivered](Follower::deliver)
/// to any clone still ends the calls of every clone that follow its task by its task id (by its
/// external id: those of the same account only, after asking their path).
#[derive(Clone)]
pub struct Follower<S> {
    service: S,
    policy: FollowPolicy,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The account every query is sent as, when set ([`with_account`](Follower::with_account)).
    account: Option<AccountId>,
    board: Arc<Board>,
    batches: Arc<Batches>,
    drain: Option<DrainHandle>,
}

impl<S> fmt::Debug for Follower<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Follower")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// One task being followed.
#[derive(Debug)]
struct Tracked {
    task: TaskRef,
    started: Instant,
    /// When the follow gives up: `started` plus the policy's deadline (for a task already
    /// past it, the longest interval after following started: time for one answer).
    deadline_at: Instant,
    next_at: Instant,
    /// When its last query is due: a shortest interval before its deadline (time for the
    /// answer), or when following starts for a task already past it (its one query).
    last_call: Instant,
    /// When it was last answered (or left out of a batch answer): a batch takes its last query
    /// along within the slack no sooner than a shortest interval after it (within a shortest
    /// interval of its time, it rides as any task due that soon).
    answered_at: Option<Instant>,
    errors: u32,
    last_status: Option<String>,
    result: Option<Result<TaskReport, FollowError>>,
    /// In a batch query on its way: the claim's number, and when it was sent.
    asked: Option<(u64, Instant)>,
    /// A batch answer left this task out (an external id: while the server is not known to
    /// leave out only what it does not list), or refused a batch of several with a code one id
    /// may cause: it is asked about alone (an unknown id then meets its `1203`). An external
    /// id goes back into batches at its lone `1203` or lone answer listing no task.
    alone: bool,
    /// An external id a successful batch answer left out, asked about alone since (before
    /// [`BatchState::lists_found_only`](batches::BatchState::lists_found_only) is known): its
    /// lone `1203`, or lone answer listing no task, shows the server leaves out what it does
    /// not list.
    left_out: bool,
    /// Its result is a report just found on the board, not yet given to the other calls that
    /// follow the same task.
    from_board: bool,
    /// Batch answers applied to it so far (a sending call tells by it that another call's
    /// answer came in while its own query is out).
    answers: u32,
    /// A legacy task followed by its external id: the task id an answer to its own path's
    /// query named, by which a delivered report is then found.
    known_id: Option<String>,
    /// A legacy task followed by its external id: the task id of the last report delivered
    /// with that external id that made it due at once (once per report: it may be another
    /// create path's task, see [`Found::External`]).
    probed: Option<String>,
    /// Its call's: woken by what may end or move its tasks (a batch answer or given-up query
    /// that asked about them, a report delivered for one of them).
    wake: Arc<Notify>,
}

impl Tracked {
    /// Its task id, by which a delivered report or another query's answer ends it: a new-style
    /// task followed by its external id has one once an answer has named it.
    fn task_id(&self) -> Option<&str> {
        if self.task.external {
            self.known_id.as_deref()
        } else {
            Some(&self.task.id)
        }
    }
}

impl<S> Follower<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>> + Clone,
    S::Error: Into<BoxError>,
{
    /// A follower that queries through `service`.
    pub fn new(service: S, policy: FollowPolicy) -> Result<Self, ConfigError> {
        policy.validate()?;
        let keep = policy.first_wait().max(policy.min_interval_duration());
        let board = Arc::new(Board::new(keep));
        let batches = Arc::new(Batches::default());
        board.register(&batches);
        Ok(Follower {
            service,
            policy,
            headers: Vec::new(),
            account: None,
            board,
            batches,
            drain: None,
        })
    }

    /// Batch queries of this follower's own, apart from its clones' (they carry what it adds),
    /// still reached by the reports delivered to any of them.
    fn own_batches(&mut self) {
        self.batches = Arc::new(Batches::default());
        self.board.register(&self.batches);
    }

    /// Adds a header to every query (e.g. `authorization` when the service has no auth layer).
    pub fn with_header(mut self, name: &str, value: &str) -> Result<Self, ConfigError> {
        let name = HeaderName::try_from(name)
            .map_err(|_| ConfigError::new("follow.header", "is not a header name"))?;
        let mut value = HeaderValue::try_from(value)
            .map_err(|_| ConfigError::new("follow.header", "is not a header value"))?;
        value.set_sensitive(true);
        self.headers.push((name, value));
        self.own_batches();
        Ok(self)
    }

    /// Holds `drain` open while following: a [`DrainHandle::drain`] waits until every task
    /// being followed has ended (its queries still pass the gate).
    pub fn with_drain(mut self, drain: DrainHandle) -> Self {
        self.drain = Some(drain);
        self
    }

    /// Sends every query as `account` (its [`AccountId`] extension): a service that routes by
    /// account (the [`Gateway`](crate::gateway::Gateway)) refuses a request without one, and
    /// the slots a query frees are that account's.
    /// [`KlingLayer::follower`](crate::KlingLayer::follower) sets the stack's own.
    pub fn with_account(mut self, account: AccountId) -> Self {
        self.account = Some(account);
        self.own_batches();
        self
    }

    /// Hands over a task report from a callback: every call of this follower and of its
    /// clones (also those given a header or an account of their own) waiting for that task
    /// ends with it at once; a call that starts following it later finds it (non-terminal
    /// reports are ignored). A call following a legacy task by its external id finds it only
    /// if its follower has this one's account (external ids are unique per account at most),
    /// and then asks its own create path at once before it ends (a callback names no path):
    /// deliver a callback to a follower of the account whose task it reports (a stack's
    /// callbacks to its [`KlingLayer::follower`](crate::KlingLayer::follower)). A report no
    /// call has taken stays until 10,000 newer such reports push it out (the answers to queries
    /// do not); once taken, for the policy's wait before a first query (see the
    /// [module docs](self)). Free the task's slots first
    /// ([`KlingLayer::on_task`](crate::KlingLayer::on_task) or
    /// [`on_callback`](crate::KlingLayer::on_callback), awaited), so whoever sees the follow
    /// end finds them free.
    pub fn deliver(&self, report: TaskReport) {
        if !report.status.is_terminal() {
            return;
        }
        // On the board first: a call that starts following the task while the report is
        // handed out below finds it there, as does a later one (for a while once handed out).
        let now = Instant::now();
        let handed = report.clone();
        self.board
            .put(report, Source::Delivered(self.account.as_ref()), now);
        // The calls following it with batch queries, in every clone's batches, end with it and
        // are woken by their own wakes; those following legacy tasks (kept by their calls
        // alone) all look.
        let mut wakes: Vec<Arc<Notify>> = Vec::new();
        for batches in self.board.followers() {
            let mut state = batches.lock();
            for t in state.tracked.values_mut() {
                if t.result.is_none() && t.task_id() == Some(handed.id.as_str()) {
                    t.result = Some(Ok(handed.clone()));
                    wakes.push(t.wake.clone());
                }
            }
        }
        // Handed to the calls that follow it: it stays a while for calls that start following
        // it now (the board keeps reports for tasks nobody follows yet until a call looks).
        if !wakes.is_empty() {
            self.board.handed(&handed.id, now);
        }
        wake_each(wakes);
        self.board.notify.notify_waiters();
    }

    /// Follows one task until it ends (succeeded or failed), its deadline passes, or a query
    /// gets an answer no retry can change ([`FollowError::Api`], see the
    /// [module docs](self)).
    pub async fn follow(&self, task: TaskRef) -> Result<TaskReport, FollowError> {
        self.follow_many(vec![task])
            .await
            .pop()
            .unwrap_or_else(|| unreachable!("one result per task"))
    }

    /// Follows many tasks at once, new-style ones in batch queries (shared with every other
    /// call of this follower and its clones, see the [module docs](self)); results are in the
    /// order given.
    pub async fn follow_many(&self, tasks: Vec<TaskRef>) -> Vec<Result<TaskReport, FollowError>> {
        let _in_flight = self.drain.as_ref().map(DrainHandle::track);
        let now = Instant::now();
        let wake = Arc::new(Notify::new());
        // Legacy tasks (and ids refused at once) stay with this call; new-style ones join the
        // shared batches.
        let mut local: Vec<Tracked> = Vec::new();
        let mut registered = Registered {
            batches: &self.batches,
            keys: Vec::new(),
        };
        // Calls following by a new-style external id look at the board on each delivery, as
        // legacy calls do: a delivered report is found by that id in the call's account only,
        // so `deliver` cannot end them itself.
        let follows_external_ids = tasks.iter().any(|task| task.external);
        let places: Vec<Place> = {
            let mut state = self.batches.lock();
            tasks
                .into_iter()
                .map(|task| {
                    let tracked = self.track(task, now, &wake);
                    if tracked.task.legacy_path.is_none() && tracked.result.is_none() {
                        let key = state.insert(tracked);
                        registered.keys.push(key);
                        Place::Shared(key)
                    } else {
                        local.push(tracked);
                        Place::Local(local.len() - 1)
                    }
                })
                .collect()
        };

        let watches_board = !local.is_empty() || follows_external_ids;
        loop {
            let delivered = self.board.notify.notified();
            let woken = wake.notified();
            tokio::pin!(delivered, woken);
            delivered.as_mut().enable();
            woken.as_mut().enable();

            let now = Instant::now();
            for t in local.iter_mut() {
                self.check(t, now);
            }
            let takeover = self.policy.takeover();
            let shared_due = {
                let mut state = self.batches.lock();
                self.check_shared(&mut state, &registered.keys, now);
                registered
                    .keys
                    .iter()
                    .filter_map(|key| state.tracked.get(key))
                    .any(|t| is_due(t, now, takeover))
            };

            // Legacy tasks that are due, one query each.
            let legacy: Vec<(usize, String)> = local
                .iter()
                .enumerate()
                .filter(|(_, t)| t.result.is_none() && t.next_at <= now)
                .filter_map(|(i, t)| {
                    let path = t.task.legacy_path.as_ref()?;
                    Some((i, format!("{path}/{}", t.task.id)))
                })
                .collect();
            for (i, uri) in legacy {
                let until = local[i].deadline_at;
                let answer = judge(self.query(uri, until).await);
                self.keep_ended(&answer, |_| true);
                self.settle(&mut local[i], &answer, Instant::now());
            }
            // New-style tasks: when one of ours is due, one batch query with as many other
            // calls' tasks as it carries.
            if shared_due {
                self.send_batch(&registered.keys, &wake, Instant::now())
                    .await;
            }

            // Until the next task of ours is due (or its deadline), a report is delivered, or a
            // batch is answered. A task another call is asking about waits for that answer (up
            // to the takeover time).
            let local_wake = local
                .iter()
                .filter(|t| t.result.is_none())
                .map(|t| t.next_at.min(t.deadline_at))
                .min();
            let shared_wake = {
                let state = self.batches.lock();
                registered
                    .keys
                    .iter()
                    .filter_map(|key| state.tracked.get(key))
                    .filter(|t| t.result.is_none())
                    .map(|t| next_wake(t, takeover))
                    .min()
            };
            let Some(next) = local_wake.into_iter().chain(shared_wake).min() else {
                break;
            };
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = &mut delivered, if watches_board => {}
                () = &mut woken => {}
            }
        }

        let mut shared: HashMap<u64, Tracked> = {
            let mut state = self.batches.lock();
            std::mem::take(&mut registered.keys)
                .into_iter()
                .filter_map(|key| state.tracked.remove(&key).map(|t| (key, t)))
                .collect()
        };
        let mut local = local.into_iter().map(Some).collect::<Vec<_>>();
        places
            .into_iter()
            .map(|place| {
                let tracked = match place {
                    Place::Local(i) => local.get_mut(i).and_then(Option::take),
                    Place::Shared(key) => shared.remove(&key),
                };
                let Some(t) = tracked else {
                    unreachable!("each task is tracked once, until its result is taken")
                };
                match t.result {
                    Some(result) => result,
                    None => Err(FollowError::DeadlineExceeded {
                        task_id: t.task.id,
                        deadline: self.policy.deadline_duration(),
                        last_status: t.last_status,
                    }),
                }
            })
            .collect()
    }

    /// A task as following starts: first query after the policy's wait from its creation, or
    /// at its last call if that comes first (a deadline shorter than the safety interval).
    /// A task already past its deadline (created that long ago) is asked about at once, with
    /// the longest interval for an answer: it may well have ended in time, and giving up
    /// unasked reported a finished task as not ended.
    fn track(&self, task: TaskRef, now: Instant, wake: &Arc<Notify>) -> Tracked {
        let started = task.created_at.unwrap_or(now);
        let first = self.policy.first_wait();
        let deadline_at = later(started, self.policy.deadline_duration());
        let past = deadline_at <= now;
        let deadline_at = if past {
            later(now, self.policy.scaled(self.policy.max_interval))
        } else {
            deadline_at
        };
        // A shortest interval before the deadline, for the answer to come in time; at once
        // when that has passed (or, past the deadline, for its one query).
        let last_call = if past {
            now
        } else {
            deadline_at
                .checked_sub(self.policy.min_interval_duration())
                .unwrap_or(started)
                .max(now)
        };
        let invalid = (!task.valid_id()).then(|| {
            Err(FollowError::InvalidTask {
                task_id: task.id.clone(),
                reason: "task ids are letters, digits, `-`, `_`, `.` and `~`",
            })
        });
        Tracked {
            // At the last call at the latest: a first wait from creation (the safety interval
            // with `callbacks_first`) may fall after the deadline, or the time left for an
            // answer when past it.
            next_at: now.max(later(started, first)).min(last_call),
            deadline_at,
            last_call,
            answered_at: None,
            started,
            task,
            errors: 0,
            last_status: None,
            result: invalid,
            asked: None,
            alone: false,
            left_out: false,
            from_board: false,
            answers: 0,
            known_id: None,
            probed: None,
            wake: wake.clone(),
        }
    }

    /// Ends a task delivered by a callback, or past its deadline. A legacy task followed by
    /// its external id ends with a delivered report found by the task id its own path's
    /// answer named; one found by the external id alone may be another path's task, and makes
    /// it due at once instead (its path's answer ends it).
    fn check(&self, t: &mut Tracked, now: Instant) {
        if t.result.is_some() {
            return;
        }
        // The report stays on the board a while for the other calls following the task, and
        // those that start to; a new-style one is also handed on at once (`check_shared`).
        let account = self.account.as_ref();
        let lookup = if t.task.external {
            Lookup::NewStyleExternal
        } else if t.task.legacy_path.is_some() && t.known_id.is_none() {
            Lookup::LegacyExternal
        } else {
            Lookup::TaskId
        };
        let found = self
            .board
            .hand(&t.task.id, lookup, account, now)
            .or_else(|| {
                let known = t.known_id.as_deref()?;
                self.board.hand(known, Lookup::TaskId, account, now)
            });
        match found {
            Some(Found::Task(report)) => {
                t.result = Some(Ok(report));
                t.from_board = true;
                return;
            }
            Some(Found::External(task_id)) if t.probed.as_ref() != Some(&task_id) => {
                t.probed = Some(task_id);
                t.next_at = t.next_at.min(now);
            }
            _ => {}
        }
        if now >= t.deadline_at {
            t.result = Some(Err(FollowError::DeadlineExceeded {
                task_id: t.task.id.clone(),
                deadline: self.policy.deadline_duration(),
                last_status: t.last_status.clone(),
            }));
        }
    }

    /// [`check`](Self::check)s a call's shared tasks (`keys`); a report found on the board for
    /// one ends every call's task with its id at once.
    fn check_shared(&self, state: &mut batches::BatchState, keys: &[u64], now: Instant) {
        for key in keys {
            let Some(t) = state.tracked.get_mut(key) else {
                continue;
            };
            self.check(t, now);
            let Some(Ok(report)) = &t.result else {
                continue;
            };
            if !t.from_board {
                continue;
            }
            t.from_board = false;
            let report = report.clone();
            for other in state.tracked.values_mut() {
                if other.result.is_none() && other.task_id() == Some(report.id.as_str()) {
                    other.result = Some(Ok(report.clone()));
                }
            }
        }
    }

    /// Sends the next batch query of the call whose tasks are `mine` (see
    /// [`Batches::claim`]) and applies its answer to every call's tasks it names. A query still
    /// unanswered when it is given up settles nothing: the tasks it asked about are due again,
    /// and the calls past their deadline end with it.
    async fn send_batch(&self, mine: &[u64], wake: &Notify, now: Instant) {
        let Some(claimed) = self.batches.claim(
            mine,
            now,
            self.policy.batch_size,
            self.policy.takeover(),
            self.policy.min_interval_duration(),
            self.policy.last_query_slack_duration(),
        ) else {
            return;
        };
        let by = if claimed.external {
            "external_task_ids"
        } else {
            "task_ids"
        };
        let uri = format!("/tasks?{by}={}", claimed.ids.join(","));
        // Biased: an answer that came in is applied, whatever else is ready, rather than one
        // drawn at random (paused-time runs must repeat).
        let answer = tokio::select! {
            biased;
            answer = tokio::time::timeout_at(claimed.until, self.query_now(uri)) => match answer {
                Ok(answer) => judge(answer),
                Err(_) => return,
            },
            // Another call's answer (or a callback) ended our tasks, or made one due again,
            // while ours is still out: ask anew rather than wait on a query that may hang.
            () = self.settled_elsewhere(mine, &claimed, wake) => return,
        };
        // Ended tasks on the board before the answer is applied: a call that starts following
        // one as the answer comes in finds it there.
        if matches!(answer, Answer::Reports(_)) {
            let asked: HashSet<&str> = claimed.ids.iter().map(String::as_str).collect();
            self.keep_ended(&answer, |r| {
                let named = if claimed.external {
                    r.external_id.as_deref()
                } else {
                    Some(r.id.as_str())
                };
                named.is_some_and(|id| asked.contains(id))
            });
        }
        let now = Instant::now();
        let several = claimed.ids.len() > 1;
        let lists_found_only = self.batches.lock().lists_found_only;
        // A lone `1203` to an external id a successful batch answer left out: that server
        // leaves out the ids it does not list (rather than refuse their batch).
        let mut confirmed = false;
        self.batches.answer(&claimed, |t| match &answer {
            // A server known to leave external ids it does not list out of a batch answer
            // refuses a batch of them only when it lists none: each is not listed yet.
            Answer::Final(error)
                if claimed.external && lists_found_only && error.code() == Code::NotFound =>
            {
                self.settle(t, &answer, now);
            }
            // A task that only rode along (not due yet) and that this answer tells nothing
            // about keeps its time: asked about alone at once, riding cost a request after all
            // (a burst of them at a page limit), and its answer came early (for a last query, a
            // longer blind window). Once due, it is asked about alone if left out again.
            Answer::Final(error)
                if several && one_id_may_cause(error.code()) && t.next_at > claimed.at => {}
            Answer::Reports(outcome)
                if several
                    && t.next_at > claimed.at
                    && !(t.task.external && lists_found_only)
                    && !outcome.tasks().iter().any(|r| t.task.reported_by(r)) => {}
            // Kling may refuse a whole batch for one unknown id (or, by its code, for something
            // one id may cause): ask about each alone.
            Answer::Final(error) if several && one_id_may_cause(error.code()) => {
                t.alone = true;
                t.next_at = now;
            }
            // A batch answer that leaves a task out: ask about it alone, where an unknown id
            // meets its `1203`. An external id stays in batches once the server is known to
            // leave out only what it does not list: left out, it is not listed yet (`settle`).
            // Until then it may have been left out for another reason (a page limit, an id
            // echoed in another case), and taking that for "not listed" starved real tasks.
            Answer::Reports(outcome)
                if several && !outcome.tasks().iter().any(|r| t.task.reported_by(r)) =>
            {
                if t.task.external && lists_found_only {
                    self.settle(t, &answer, now);
                } else {
                    t.alone = true;
                    t.left_out = t.task.external;
                    t.next_at = now;
                    // Left out is its answer: what it is scheduled from if put back unasked.
                    t.answered_at = Some(now);
                }
            }
            Answer::Final(error) if !several && t.left_out && error.code() == Code::NotFound => {
                confirmed = true;
                self.settle(t, &answer, now);
            }
            // A successful lone answer listing no task says the same (`settle`).
            Answer::Reports(outcome) if !several && t.left_out && outcome.tasks().is_empty() => {
                confirmed = true;
                self.settle(t, &answer, now);
            }
            _ => self.settle(t, &answer, now),
        });
        if confirmed {
            // The other ids left out are not listed yet either: back into batches.
            let mut state = self.batches.lock();
            state.lists_found_only = true;
            for t in state.tracked.values_mut() {
                if t.result.is_none() && t.left_out && t.asked.is_none() {
                    t.left_out = false;
                    t.alone = false;
                    // Backing off from a failed lone query: its retry is not brought forward.
                    if t.errors > 0 {
                        continue;
                    }
                    // Unasked since the answer that left it out: that answer, not this one,
                    // is what may stand for its last query.
                    let left_out_at = t.answered_at.unwrap_or(now);
                    self.schedule_after(t, left_out_at, now, self.policy.interval(now - t.started));
                }
            }
        }
    }

    /// Completes when every task of `mine` has ended (answered by another call's query, or
    /// delivered by a callback), or one that `claimed` asks about has had another call's
    /// answer since and is due again (another call took it over and answered first). Nothing
    /// else stops the wait: dropping a query that waits its turn at a rate limiter would send
    /// it to the back of the queue.
    async fn settled_elsewhere(&self, mine: &[u64], claimed: &batches::Claimed<'_>, wake: &Notify) {
        let takeover = self.policy.takeover();
        // Answers each task of ours that `claimed` asks about had when it was sent.
        let before: HashMap<u64, u32> = {
            let state = self.batches.lock();
            mine.iter()
                .filter_map(|key| state.tracked.get(key).map(|t| (*key, t)))
                .filter(|(_, t)| {
                    t.task.external == claimed.external && claimed.ids.contains(&t.task.id)
                })
                .map(|(key, t)| (key, t.answers))
                .collect()
        };
        loop {
            let woken = wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let next = {
                let now = Instant::now();
                let mut state = self.batches.lock();
                self.check_shared(&mut state, mine, now);
                let mut pending = false;
                let mut soonest: Option<Instant> = None;
                for key in mine {
                    let Some(t) = state.tracked.get(key) else {
                        continue;
                    };
                    if t.result.is_some() {
                        continue;
                    }
                    pending = true;
                    let answered_elsewhere = before.get(key).is_some_and(|&n| n != t.answers);
                    if !answered_elsewhere {
                        continue;
                    }
                    if is_due(t, now, takeover) {
                        return;
                    }
                    let at = next_wake(t, takeover);
                    soonest = Some(soonest.map_or(at, |w| w.min(at)));
                }
                if !pending {
                    return;
                }
                soonest
            };
            let sleep = tokio::time::sleep_until(next.unwrap_or_else(far_future));
            tokio::select! {
                () = &mut woken => {}
                () = sleep => {}
            }
        }
    }

    /// One query, given up at `until` (the deadline of the tasks it asks about): a query the
    /// layers below hold (a rate wait, a retry's backoff) must not keep a follow past its
    /// deadline. A query is safe to drop.
    async fn query(&self, uri: String, until: Instant) -> Result<Response<Full<Bytes>>, BoxError> {
        match tokio::time::timeout_at(until, self.query_now(uri)).await {
            Ok(answer) => answer,
            Err(_) => Err("the query was still unanswered at the follow's deadline".into()),
        }
    }

    async fn query_now(&self, uri: String) -> Result<Response<Full<Bytes>>, BoxError> {
        let mut service = self.service.clone();
        poll_fn(|cx| service.poll_ready(cx))
            .await
            .map_err(Into::into)?;
        let mut request = Request::get(uri).body(Full::new(Bytes::new()))?;
        for (name, value) in &self.headers {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        if let Some(account) = &self.account {
            AccountId::set_if_absent(&mut request, account);
        }
        service.call(request).await.map_err(Into::into)
    }

    /// Puts the ended tasks a query's answer reports (those `asked` about) on the board, handed
    /// out: a call that starts following one as the answer comes in, or a while after, ends
    /// with it rather than asking again. The calls already following one end with it now, as
    /// with a delivered report: those of the clones with batches of their own (this
    /// follower's batches get the answer itself), and those following legacy tasks, which look
    /// at the board. Left asleep, they ended only at their next query, and sent it.
    fn keep_ended(&self, answer: &Answer, asked: impl Fn(&TaskReport) -> bool) {
        let Answer::Reports(outcome) = answer else {
            return;
        };
        let now = Instant::now();
        let mut ended: HashMap<&str, &TaskReport> = HashMap::new();
        for report in outcome.tasks() {
            if report.status.is_terminal() && asked(report) {
                self.board.put(report.clone(), Source::Answered, now);
                ended.insert(report.id.as_str(), report);
            }
        }
        if ended.is_empty() {
            return;
        }
        let mut wakes: Vec<Arc<Notify>> = Vec::new();
        for batches in self.board.followers() {
            if Arc::ptr_eq(&batches, &self.batches) {
                continue;
            }
            let mut state = batches.lock();
            for t in state.tracked.values_mut() {
                if t.result.is_none()
                    && let Some(report) = t.task_id().and_then(|id| ended.get(id))
                {
                    t.result = Some(Ok((*report).clone()));
                    wakes.push(t.wake.clone());
                }
            }
        }
        wake_each(wakes);
        self.board.notify.notify_waiters();
    }

    /// Applies a query's answer to one task it asked about.
    fn settle(&self, t: &mut Tracked, answer: &Answer, now: Instant) {
        match answer {
            // An external id no task has yet: its create may not be listed yet (or was lost
            // on its way and may still arrive). Asked about again, until the deadline.
            Answer::Final(error) if t.task.external && error.code() == Code::NotFound => {
                t.errors = 0;
                // Back into batches: asked alone, it would stay alone until listed.
                t.alone = false;
                t.left_out = false;
                self.schedule(t, now, self.policy.interval(now - t.started));
            }
            Answer::Final(error) => {
                t.result = Some(Err(FollowError::Api {
                    task_id: t.task.id.clone(),
                    error: error.clone(),
                }));
            }
            Answer::Unsendable(reason) => {
                t.result = Some(Err(FollowError::Unsendable {
                    task_id: t.task.id.clone(),
                    reason: reason.clone(),
                }));
            }
            Answer::BackOff => {
                t.errors += 1;
                // Never brought forward to the last call: the backoff spares a failing server,
                // and the last calls of many tasks, each its own, hammered it near deadlines.
                t.next_at = later(now, self.policy.backoff(t.errors));
            }
            Answer::Reports(outcome) => {
                t.errors = 0;
                // A legacy task may be followed by its external id (`{path}/{external id}`
                // answers the task, whose report names it under `external_task_id`).
                let by_external = |r: &&TaskReport| {
                    t.task.legacy_path.is_some() && r.external_id.as_deref() == Some(&t.task.id)
                };
                let report = outcome
                    .tasks()
                    .iter()
                    .find(|r| t.task.reported_by(r))
                    .or_else(|| {
                        let report = outcome.tasks().iter().find(by_external)?;
                        // Its path's task: a report delivered by this task id is its own.
                        t.known_id = Some(report.id.clone());
                        Some(report)
                    });
                if t.task.external
                    && let Some(report) = report
                {
                    // Its task id, by which a delivered report or another answer ends it.
                    t.known_id = Some(report.id.clone());
                }
                match report {
                    Some(report) if report.status.is_terminal() => {
                        t.result = Some(Ok(report.clone()));
                    }
                    Some(report) => {
                        t.last_status = Some(report.status.as_str().to_owned());
                        self.schedule(t, now, self.policy.interval(now - t.started));
                        // Reported: it can ride in batches again.
                        t.alone = false;
                        t.left_out = false;
                    }
                    None => {
                        // An external id a lone query finds no task for (a successful answer
                        // listing none, where another server answers `1203`) is not listed
                        // yet: back into batches, as at a lone `1203`.
                        if t.task.external && outcome.tasks().is_empty() {
                            t.alone = false;
                            t.left_out = false;
                        }
                        self.schedule(t, now, self.policy.interval(now - t.started));
                    }
                }
            }
        }
    }

    /// Sets `t`'s next query `wait` after an answer at `now`, or at its last call (a shortest
    /// interval before its deadline) if that comes first: a task that ended after its last
    /// query was reported as not ended. Not when the answer came within a shortest interval
    /// before the last call, or after it: queries stay that far apart at least; nor within the
    /// last query slack, the time a batch may take the last query along ahead of it anyway
    /// (this answer is that query). Last calls due together share batch queries, as other due
    /// tasks do.
    fn schedule(&self, t: &mut Tracked, now: Instant, wait: Duration) {
        self.schedule_after(t, now, now, wait);
    }

    /// [`schedule`](Self::schedule)s `t` at `now` from its last answer, which came at
    /// `answered` (before `now` for a task put back into batches unasked): only an answer
    /// within the slack stands for the last query.
    fn schedule_after(&self, t: &mut Tracked, answered: Instant, now: Instant, wait: Duration) {
        t.answered_at = Some(answered);
        let next = later(now, wait);
        let lead = self.policy.min_interval_duration();
        let slack = self.policy.last_query_slack_duration();
        t.next_at = if next > t.last_call
            && later(now, lead) <= t.last_call
            && later(answered, slack) <= t.last_call
        {
            t.last_call
        } else {
            next
        };
    }
}

/// Where a call keeps one of its tasks.
enum Place {
    /// In the call (legacy tasks, ids refused at once): at this index.
    Local(usize),
    /// In the shared [`Batches`], under this key.
    Shared(u64),
}

/// What a query's answer means for the tasks it asked about.
enum Answer {
    /// A Kling error no retry can change: following them ends with it.
    Final(ApiError),
    /// A query the service refused before sending it, as it will refuse every other
    /// ([`unsendable`]): following them ends with why.
    Unsendable(String),
    /// A transport error, an unreadable body, a retryable code, or a retry layer that gave up
    /// on one (attempts, budget or deadline spent): back off and ask again.
    BackOff,
    /// A successful answer, with the reports it carries.
    Reports(Outcome),
}

/// Whether a final answer to a batch query may be down to one of its ids rather than the
/// account, the key or the path: an unknown id (`1203`), an invalid request or parameter
/// (`1200`, `1201`), or a code Kling has not documented. Each task is then asked about alone.
fn one_id_may_cause(code: Code) -> bool {
    matches!(
        code,
        Code::NotFound | Code::InvalidRequest | Code::InvalidParameter | Code::Unknown(_)
    )
}

fn judge(answer: Result<Response<Full<Bytes>>, BoxError>) -> Answer {
    let outcome = match answer {
        Ok(mut response) => Outcome::ensure(&mut response).ok(),
        // A stack with a retry layer answers a final Kling error as an error, not a response:
        // it ends the follow as the response would have.
        Err(error) => {
            if let Some(reason) = unsendable(&*error) {
                return Answer::Unsendable(reason);
            }
            match final_api_error(&*error) {
                Some(api) => return Answer::Final(api.clone()),
                None => None,
            }
        }
    };
    match outcome {
        Some(outcome) if outcome.is_success() => Answer::Reports(outcome),
        Some(outcome) if outcome.disposition() == Disposition::Fatal => {
            Answer::Final(ApiError::from_outcome(&outcome))
        }
        _ => Answer::BackOff,
    }
}

/// Why a failed query can never be sent, when it cannot: the service refused it before
/// sending for a reason that holds for every query of the follow (a gateway that knows no
/// account of the follower's, a query at another origin than the base URL's, a client that
/// refuses it for good: a relative URI with no base URL layer, [`will_recur`]) or its URI is
/// no URI. Backed off from, such a refusal held every follow silently until its deadline.
///
/// [`will_recur`]: kling_core::error::will_recur
fn unsendable(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(error);
    while let Some(link) = current {
        if link.is::<UnknownAccount>() || link.is::<OtherOrigin>() || link.is::<http::Error>() {
            return Some(link.to_string());
        }
        current = link.source();
    }
    // The client's own refusals (kling-core reads them through wrappers `source` skips).
    kling_core::error::will_recur(error).then(|| error.to_string())
}

/// The query interval at `age`: `age × factor` within `min` and `max` (not `clamp`, which
/// panics on bounds the other way round, as in a policy not validated). One formula for the
/// interval a follow waits and the one [`FollowPolicy::validate`] bounds the slack by.
fn interval_at(age: Duration, factor: f64, min: Duration, max: Duration) -> Duration {
    let scaled = Duration::try_from_secs_f64(age.as_secs_f64() * factor).unwrap_or(max);
    scaled.max(min).min(max)
}

/// An instant no wait reaches: a year from now, the longest duration a policy holds.
fn far_future() -> Instant {
    later(Instant::now(), MAX_DURATION)
}

/// `at + by`, never panicking: tokio's `Instant + Duration` panics where the sum does not
/// exist. [`FollowPolicy::validate`] keeps every `by` within a year, so the sum overflows only
/// when `at` (a [`TaskRef::created_at`]) is itself within a year of the last representable
/// instant, which is as far in the future as `at + by` would be: then `at` stands for it.
fn later(at: Instant, by: Duration) -> Instant {
    at.checked_add(by).unwrap_or(at)
}

/// The Kling error in a failed query that no retry can change: a retry layer's
/// [`Failed`](kling_retry::error::Failed) that stopped because the answer is final
/// ([`StopReason::NotRetryable`]: `1203`, `1000`, `1101`, …), or a bare [`ApiError`] whose code
/// is fatal. `None` for transport errors and for a retry layer that gave up on a retryable
/// answer (attempts, budget or deadline spent), which the follower backs off from.
fn final_api_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a ApiError> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(failed) = error.downcast_ref::<kling_retry::error::Failed>() {
            return match failed.reason() {
                StopReason::NotRetryable => failed.api_error(),
                _ => None,
            };
        }
        if error.is::<kling_retry::error::DeadlineExceeded>() {
            return None;
        }
        if let Some(api) = error.downcast_ref::<ApiError>() {
            return (api.code().disposition(api.status()) == Disposition::Fatal).then_some(api);
        }
        current = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(id: &str) -> TaskReport {
        let body = format!(r#"{{"code":0,"data":{{"task_id":"{id}","task_status":"succeed"}}}}"#);
        kling_core::Envelope::parse(body.as_bytes())
            .unwrap()
            .tasks
            .remove(0)
    }

    fn ended_new_style(id: &str, external_id: &str) -> TaskReport {
        let body = format!(
            r#"{{"code":0,"data":{{"id":"{id}","status":"succeeded","external_id":"{external_id}"}}}}"#
        );
        kling_core::Envelope::parse(body.as_bytes())
            .unwrap()
            .tasks
            .remove(0)
    }

    /// A legacy task followed by its external id finds a delivered legacy report's task id by
    /// it (not a delivered new-style report's, which a new-style follow finds), without taking the
    /// report: it may be another create path's task. The index goes with the report (gone
    /// after its countdown, or pushed out when the board is full).
    #[test]
    fn a_report_is_found_by_its_external_id_and_the_index_goes_with_it() {
        let keep = Duration::from_secs(5);
        let board = Board::new(keep);
        let now = Instant::now();
        let mut report = ended("t-1");
        report.external_id = Some("job-7".to_owned());
        board.put(report, Source::Delivered(None), now);
        board.put(
            ended_new_style("n-1", "job-8"),
            Source::Delivered(None),
            now,
        );
        assert!(board.hand("job-7", Lookup::TaskId, None, now).is_none());
        assert!(
            board
                .hand("job-8", Lookup::LegacyExternal, None, now)
                .is_none(),
            "new-style"
        );
        let hour = now + Duration::from_secs(3600);
        assert_eq!(
            board.hand("job-7", Lookup::LegacyExternal, None, hour),
            Some(Found::External("t-1".to_owned()))
        );
        assert!(
            board.lock().by_id.get("t-1").unwrap().until.is_none(),
            "not taken"
        );
        let later = hour + keep - Duration::from_millis(1);
        assert!(matches!(
            board.hand("t-1", Lookup::TaskId, None, hour),
            Some(Found::Task(r)) if r.id == "t-1"
        ));
        assert!(matches!(
            board.hand("t-1", Lookup::TaskId, None, later),
            Some(Found::Task(r)) if r.id == "t-1"
        ));
        assert!(
            board
                .hand("t-1", Lookup::TaskId, None, hour + keep)
                .is_none(),
            "gone after its countdown"
        );
        assert!(
            board
                .hand("job-7", Lookup::LegacyExternal, None, hour + keep)
                .is_none()
        );
        assert_eq!(
            board.lock().by_external_id.keys().collect::<Vec<_>>(),
            [&(None, false, "job-8".to_owned())],
            "the new-style report's, not taken"
        );
        for i in 0..=BOARD_CAPACITY {
            let mut report = ended(&format!("t-{i}"));
            report.external_id = Some(format!("job-{i}"));
            board.put(report, Source::Delivered(None), now);
        }
        let reports = board.lock();
        assert_eq!(reports.by_external_id.len(), BOARD_CAPACITY);
        assert!(
            !reports
                .by_external_id
                .contains_key(&(None, true, "job-0".to_owned()))
        );
    }

    /// A new-style external id finds the new-style report delivered with it in its account,
    /// handed out as by its task id; never a legacy one, never one answered to a query (found
    /// by its task id only), never another account's.
    #[test]
    fn a_new_style_report_is_found_by_its_external_id_in_its_account() {
        let keep = Duration::from_secs(5);
        let board = Board::new(keep);
        let now = Instant::now();
        let a = AccountId::new("team-a");
        let mut legacy = ended("t-1");
        legacy.external_id = Some("job-7".to_owned());
        board.put(legacy, Source::Delivered(Some(&a)), now);
        board.put(ended_new_style("n-9", "job-9"), Source::Answered, now);
        board.put(
            ended_new_style("n-8", "job-8"),
            Source::Delivered(Some(&a)),
            now,
        );
        let new_style = |id: &str, account: Option<&AccountId>| {
            board.hand(id, Lookup::NewStyleExternal, account, now)
        };
        assert!(new_style("job-7", Some(&a)).is_none(), "a legacy report");
        assert!(new_style("job-9", Some(&a)).is_none(), "an answer");
        assert!(new_style("job-8", None).is_none(), "another account");
        assert!(new_style("n-8", Some(&a)).is_none(), "a task id");
        assert!(matches!(
            new_style("job-8", Some(&a)),
            Some(Found::Task(r)) if r.id == "n-8"
        ));
        assert!(
            board.lock().by_id.get("n-8").unwrap().until.is_some(),
            "taken: its countdown started"
        );
        assert!(
            board
                .hand("job-8", Lookup::NewStyleExternal, Some(&a), now + keep)
                .is_none(),
            "gone with its report"
        );
    }

    /// A delivered report is found by its external id in the account of the follower it was
    /// delivered to only (by its task id, in any); delivered again through another account's
    /// follower, in that account only, and its index goes with it.
    #[test]
    fn a_delivered_report_is_found_by_its_external_id_in_its_account_only() {
        let keep = Duration::from_secs(5);
        let board = Board::new(keep);
        let now = Instant::now();
        let (a, b) = (AccountId::new("team-a"), AccountId::new("team-b"));
        let mut report = ended("t-1");
        report.external_id = Some("job-7".to_owned());
        board.put(report.clone(), Source::Delivered(Some(&a)), now);
        assert!(
            board
                .hand("job-7", Lookup::LegacyExternal, Some(&b), now)
                .is_none()
        );
        assert!(
            board
                .hand("job-7", Lookup::LegacyExternal, None, now)
                .is_none()
        );
        assert_eq!(
            board.hand("job-7", Lookup::LegacyExternal, Some(&a), now),
            Some(Found::External("t-1".to_owned()))
        );
        board.put(report, Source::Delivered(Some(&b)), now);
        assert!(
            board
                .hand("job-7", Lookup::LegacyExternal, Some(&a), now)
                .is_none()
        );
        assert_eq!(
            board.hand("job-7", Lookup::LegacyExternal, Some(&b), now),
            Some(Found::External("t-1".to_owned()))
        );
        assert!(board.hand("t-1", Lookup::TaskId, Some(&a), now).is_some());
        assert!(
            board
                .hand("t-1", Lookup::TaskId, None, now + keep)
                .is_none()
        );
        assert!(board.lock().by_external_id.is_empty());
    }

    /// Query answers, however many, do not push out a delivered report nobody has taken yet
    /// (they pushed out any report 10,000 places older, though most were gone): each kind is
    /// bounded apart, the oldest of its kind going first.
    #[test]
    fn answers_do_not_push_out_a_delivered_report_nobody_took() {
        let board = Board::new(Duration::from_secs(5));
        let now = Instant::now();
        let kept = |id: &str| board.lock().by_id.contains_key(id);
        board.put(ended("delivered"), Source::Delivered(None), now);
        for i in 0..=BOARD_CAPACITY {
            board.put(ended(&format!("answered-{i}")), Source::Answered, now);
        }
        assert!(kept("delivered"));
        assert!(!kept("answered-0") && kept("answered-1"));
        assert_eq!(board.lock().by_id.len(), BOARD_CAPACITY + 1);
        // Answers gone at the end of their countdown take no place from deliveries either.
        let later = now + Duration::from_secs(60);
        for i in 0..BOARD_CAPACITY - 1 {
            board.put(ended(&format!("late-{i}")), Source::Delivered(None), later);
        }
        assert!(kept("delivered"));
        board.put(ended("one-more"), Source::Delivered(None), later);
        assert!(!kept("delivered") && kept("late-0"));
        let reports = board.lock();
        assert_eq!(
            (reports.by_id.len(), reports.untaken),
            (BOARD_CAPACITY, BOARD_CAPACITY)
        );
        assert!(reports.going.is_empty());
    }

    /// The places of delivered reports that were taken since stay bounded, however many are
    /// delivered and taken.
    #[test]
    fn the_places_of_taken_reports_stay_bounded() {
        let board = Board::new(Duration::ZERO);
        let now = Instant::now();
        for i in 0..3 * BOARD_CAPACITY {
            let id = format!("t-{i}");
            board.put(ended(&id), Source::Delivered(None), now);
            assert!(board.hand(&id, Lookup::TaskId, None, now).is_some());
        }
        let reports = board.lock();
        assert!(reports.waiting.len() <= 2 * BOARD_CAPACITY);
        assert!(reports.by_id.len() <= 1 && reports.going.len() <= 1);
        assert_eq!(reports.untaken, 0);
    }

    /// A report nobody has looked at stays until the board is full; once handed out, for the
    /// board's keep time from then, whether a call took it or a query's answer put it there.
    #[test]
    fn a_report_stays_until_handed_out_and_then_for_the_keep_time() {
        let keep = Duration::from_secs(5);
        let board = Board::new(keep);
        let now = Instant::now();
        let kept = |id: &str| board.lock().by_id.contains_key(id);
        board.put(ended("waiting"), Source::Delivered(None), now);
        board.put(ended("answered"), Source::Answered, now);
        board.put(ended("x"), Source::Delivered(None), now);
        let hour = now + Duration::from_secs(3600);
        assert!(board.hand("x", Lookup::TaskId, None, now + keep).is_some());
        // Handed out again later: the first countdown holds.
        assert!(
            board
                .hand(
                    "x",
                    Lookup::TaskId,
                    None,
                    now + keep * 2 - Duration::from_millis(1)
                )
                .is_some()
        );
        board.put(ended("other"), Source::Delivered(None), now + keep * 2);
        assert!(!kept("x") && !kept("answered"));
        assert!(kept("waiting") && kept("other"));
        assert!(board.hand("waiting", Lookup::TaskId, None, hour).is_some());
        assert!(
            board
                .hand("waiting", Lookup::TaskId, None, hour + keep)
                .is_none()
        );
    }

    /// A report delivered again after it went is not evicted when its first delivery's place
    /// in the order comes up: the board keeps the newest `BOARD_CAPACITY` deliveries.
    #[test]
    fn a_report_delivered_again_after_it_went_keeps_its_new_place() {
        let board = Board::new(Duration::ZERO);
        let now = Instant::now();
        board.put(ended("x"), Source::Delivered(None), now);
        assert!(board.hand("x", Lookup::TaskId, None, now).is_some());
        assert!(
            board.hand("x", Lookup::TaskId, None, now).is_none(),
            "gone at once"
        );
        board.put(ended("x"), Source::Delivered(None), now);
        for i in 0..BOARD_CAPACITY - 1 {
            board.put(ended(&format!("other-{i}")), Source::Delivered(None), now);
        }
        let kept = |id: &str| board.lock().by_id.contains_key(id);
        assert!(kept("x"), "the second delivery is kept");
        assert!(kept("other-0"));
        // Two more: the first pushes out `x`'s place, the second the oldest other report.
        board.put(ended("last"), Source::Delivered(None), now);
        assert!(!kept("x") && kept("other-0"));
        board.put(ended("last-but-one"), Source::Delivered(None), now);
        assert!(!kept("other-0") && kept("other-1"));
    }
}
