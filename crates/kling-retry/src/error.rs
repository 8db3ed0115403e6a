//! The errors the retry layer adds.
//!
//! Each is returned boxed ([`BoxError`]); downcast to read its data. Errors from the layers below
//! that this layer does not retry (a limiter's "the deadline would be passed", a configuration
//! error of the client) pass through unchanged when they end the call's only request; these
//! types describe only what this layer decided.
//!
//! The [`source`](StdError::source) of [`Failed`] and [`DeadlineExceeded`] is a
//! [`kling_core::error::Attempts`] (how many requests were sent, whether a create among them may
//! have made a task), whose own source is the last failure: the layers above read it without
//! naming these types, and [`kling_core::SendState::of`] does not report a create that may
//! exist as never sent because its last request was.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use http::StatusCode;
use kling_core::Code;
use kling_core::error::{ApiError, Attempts, BodyTooLarge, BoxError, MalformedResponse};
use tokio::time::Instant;

/// Why the layer stopped retrying and returned [`Failed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StopReason {
    /// The policy said the result is final (e.g. `1102`, `1201`, a `1004` the auth layer could
    /// not fix).
    NotRetryable,
    /// Every allowed attempt was used.
    AttemptsExhausted,
    /// The retry budget shared by the service's clones is spent: retries are at their allowed
    /// share of recent requests.
    BudgetExhausted,
    /// A create may have made a billed task (a 5xx, a timeout, a reset after sending) and carries
    /// no `external_task_id` by which to look it up (or its URI cannot carry a lookup), so
    /// re-sending it could make a second task. A `POST` the layer does not recognise (a create
    /// endpoint newer than this crate, say) is treated as a possible create and stops here too.
    ///
    /// Never send it again blindly: list the account's tasks to see whether it was made.
    /// [`Failed::external_id`] is the create's id when it has one the layer could not look up by.
    CreateMayHaveHappened,
    /// A create that carries an external id (the caller's, or a generated `kr-…` one) may have
    /// made a billed task (a 5xx, a timeout, a reset after sending, or a final refusal of a
    /// re-sent create such as `1201` "duplicate external task id"), and the call stopped before a
    /// lookup by that id settled it: the attempts or the retry budget ran out, or the lookup
    /// itself was refused for good, answered without a task it could read, or failed below; or
    /// a re-sent create was refused `1200`/`1201` (perhaps the answer to the duplicate id of
    /// the task an earlier attempt made) and the lookup after the settle time found no task yet.
    ///
    /// The task may exist and be billed. Look it up by [`Failed::external_id`]
    /// (`GET {create path}/{id}`, or `GET /tasks?external_task_ids={id}`) before doing anything
    /// else; if you send the create again, send it with that same id, never without it.
    CreateUnresolved,
    /// The last answer's `Retry-After` asked for a longer wait than
    /// [`Backoff::max_retry_after`](crate::Backoff::max_retry_after) allows: the layer neither
    /// waits that long nor sends the request sooner than the server asked. Send it again no
    /// sooner than [`Failed::retry_after`]. A wait of [`kling_core::MAX_RETRY_AFTER`] (a day)
    /// ends the call whatever the limit: kling-core reads any longer one as that, so it is a
    /// lower bound (the `Retry-After` header itself says how long).
    RetryAfterTooLong,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopReason::NotRetryable => "not retryable",
            StopReason::AttemptsExhausted => "attempts exhausted",
            StopReason::BudgetExhausted => "retry budget exhausted",
            StopReason::CreateMayHaveHappened => {
                "create may have made a task and has no external_task_id to look it up by"
            }
            StopReason::CreateUnresolved => {
                "create may have made a task that no lookup by its external id has ruled out"
            }
            StopReason::RetryAfterTooLong => {
                "the server asked to wait longer than this layer waits"
            }
        })
    }
}

/// The last failure a call saw: a Kling error response or an error from below.
#[derive(Debug)]
pub(crate) enum Last {
    Api(ApiError),
    Error(BoxError),
}

impl Last {
    fn into_box(self) -> BoxError {
        match self {
            Last::Api(api) => Box::new(api),
            Last::Error(error) => error,
        }
    }
}

/// The last failure of `attempts`, when it is a Kling error response.
fn api_of(attempts: &Attempts) -> Option<&ApiError> {
    attempts.last().downcast_ref::<ApiError>()
}

/// What a call had done when it stopped: attempts and time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tally {
    pub(crate) attempts: u32,
    pub(crate) elapsed: Duration,
    pub(crate) waited: Duration,
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = if self.attempts == 1 { "" } else { "s" };
        write!(
            f,
            "after {} attempt{plural} in {:?} ({:?} backing off)",
            self.attempts, self.elapsed, self.waited
        )
    }
}

macro_rules! last_accessors {
    () => {
        /// How many requests were sent (creates, queries and lookups by external id).
        pub fn attempts(&self) -> u32 {
            self.attempts.sent()
        }

        /// Time from the call to this error, including waits in the layers below.
        pub fn elapsed(&self) -> Duration {
            self.tally.elapsed
        }

        /// Time this layer spent backing off between attempts.
        pub fn waited(&self) -> Duration {
            self.tally.waited
        }

        /// The last Kling error response, if the last failure was one.
        pub fn api_error(&self) -> Option<&ApiError> {
            api_of(&self.attempts)
        }

        /// The Kling code of the last error response.
        pub fn code(&self) -> Option<Code> {
            self.api_error().map(ApiError::code)
        }

        /// The server's message of the last error response.
        pub fn message(&self) -> Option<&str> {
            self.api_error().map(ApiError::message)
        }

        /// The server's request id of the last error response, to quote to Kling support.
        pub fn request_id(&self) -> Option<&str> {
            self.api_error().and_then(ApiError::request_id)
        }

        /// The HTTP status of the last error response.
        pub fn status(&self) -> Option<StatusCode> {
            self.api_error().map(ApiError::status)
        }

        /// The last failure: a Kling error response ([`ApiError`]) or the error from below.
        pub fn last(&self) -> &(dyn StdError + Send + Sync + 'static) {
            self.attempts.last()
        }
    };
}

/// The call failed for good: the last failure, why the layer stopped, attempts and time.
///
/// Its [`source`](StdError::source) is a [`kling_core::error::Attempts`] (see the module docs)
/// whose source is the last failure ([`last`](Self::last)): a
/// [`kling_core::error::ApiError`] for a Kling error response, or the error from below.
///
/// # A create that may have made a task
///
/// When [`may_have_created`](Self::may_have_created) is true ([`StopReason::CreateUnresolved`]
/// or [`StopReason::CreateMayHaveHappened`]), a billed task may exist although this call
/// reports none. Never send the create again without finding out: look it up by
/// [`external_id`](Self::external_id) when there is one, and if you send it again, send it
/// with that same id.
#[derive(Debug)]
pub struct Failed {
    reason: StopReason,
    tally: Tally,
    attempts: Attempts,
    external_id: Option<String>,
    /// With [`StopReason::RetryAfterTooLong`]: the wait asked for and the longest allowed.
    too_long: Option<(Duration, Duration)>,
}

impl Failed {
    pub(crate) fn new(reason: StopReason, tally: Tally, last: Last) -> Self {
        let unresolved = matches!(
            reason,
            StopReason::CreateUnresolved | StopReason::CreateMayHaveHappened
        );
        Failed {
            reason,
            tally,
            attempts: Attempts::new(tally.attempts, unresolved, last.into_box()),
            external_id: None,
            too_long: None,
        }
    }

    /// The same error, naming the wait asked for and the longest allowed.
    pub(crate) fn with_too_long(mut self, too_long: Option<(Duration, Duration)>) -> Self {
        self.too_long = too_long;
        self
    }

    /// The same error, naming the create's external id.
    pub(crate) fn with_external_id(mut self, external_id: Option<String>) -> Self {
        self.external_id = external_id;
        self
    }

    /// Why the layer stopped.
    pub fn reason(&self) -> StopReason {
        self.reason
    }

    /// Whether a billed task may exist that this call does not report: the reason is
    /// [`StopReason::CreateUnresolved`] or [`StopReason::CreateMayHaveHappened`]. Look the
    /// create up (by [`external_id`](Self::external_id) when there is one) before creating
    /// again.
    pub fn may_have_created(&self) -> bool {
        self.attempts.may_have_created()
    }

    /// The create's external id (the caller's `external_task_id` / `external_id`, or the
    /// `kr-…` one [`generate_external_ids`](crate::RetryLayerBuilder::generate_external_ids)
    /// wrote), when an attempt of this create may have made a task; `None` for every other
    /// call.
    ///
    /// With [`may_have_created`](Self::may_have_created), it is the id to look the task up by
    /// before doing anything else. Without (a lookup found nothing, then the create stopped for
    /// another reason), it is the id to send the create again with, so that the server's
    /// duplicate check still guards it; never send it again without it.
    pub fn external_id(&self) -> Option<&str> {
        self.external_id.as_deref()
    }

    /// The wait the last answer's `Retry-After` asked for, if it had one: send the request
    /// again no sooner (the layer stopped before waiting it out). A Kling answer's, or a page
    /// without a Kling envelope's, read or too long to read (a proxy's 429 or 503, which the
    /// layer retries by its `Retry-After` as it does Kling's own). A day
    /// ([`kling_core::MAX_RETRY_AFTER`]) means a day or more: read the header itself.
    pub fn retry_after(&self) -> Option<Duration> {
        if let Some(api) = self.api_error() {
            return api.retry_after();
        }
        let last = self.last();
        match last.downcast_ref::<MalformedResponse>() {
            Some(page) => page.retry_after(),
            None => last
                .downcast_ref::<BodyTooLarge>()
                .and_then(BodyTooLarge::retry_after),
        }
    }

    last_accessors!();
}

/// `" (external id …)"` after the reason, when there is one.
struct ExternalId<'a>(Option<&'a str>);

impl fmt::Display for ExternalId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(id) => write!(f, " (external id {id})"),
            None => Ok(()),
        }
    }
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.reason, &self.external_id) {
            // It has an id, one the layer did not look it up by (its URI cannot carry the
            // lookup, or the server took the create in an answer nobody could read).
            (StopReason::CreateMayHaveHappened, Some(_)) => {
                f.write_str("create may have made a task, not looked up by its external id")?;
            }
            (reason, _) => write!(f, "{reason}")?,
        }
        match self.too_long {
            // kling-core reads a longer wait as its ceiling: the server asked for this or more
            // (exactly this, maybe: not "longer").
            Some((asked, limit)) if asked >= kling_core::MAX_RETRY_AFTER => write!(
                f,
                " (Retry-After {asked:?} or more, the longest kling-core reads; \
                 max_retry_after {limit:?})"
            )?,
            Some((asked, limit)) => write!(
                f,
                " (Retry-After {asked:?}, longer than max_retry_after {limit:?})"
            )?,
            None => {}
        }
        write!(
            f,
            "{} {}: {}",
            ExternalId(self.external_id()),
            self.tally,
            self.attempts.last()
        )
    }
}

impl StdError for Failed {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.attempts)
    }
}

/// The next retry would start after the call's deadline, so the layer returned at once instead
/// of sleeping; [`resume_at`](Self::resume_at) says when the server (or the backoff) allows the
/// next try.
///
/// A caller with more time may send the request again at that instant, **unless
/// [`may_have_created`](Self::may_have_created) is true**: then the next step was a lookup of a
/// create that may have made a billed task. Look it up by [`external_id`](Self::external_id)
/// (`GET {create path}/{id}`, or `GET /tasks?external_task_ids={id}`) instead, and if you send
/// the create again, send it with that same id, never without it.
#[derive(Debug)]
pub struct DeadlineExceeded {
    resume_at: Instant,
    deadline: Instant,
    retry_after: Duration,
    /// Time left before the deadline when the call ended.
    left: Duration,
    /// The server's `Retry-After`, when it asked for the wait that passed the deadline.
    asked: Option<Duration>,
    tally: Tally,
    attempts: Attempts,
    external_id: Option<String>,
}

impl DeadlineExceeded {
    /// `external_id` names the create when it has one to be looked up or sent again with;
    /// `unresolved` says its fate is still open.
    pub(crate) fn new(
        (resume_at, deadline, now): (Instant, Instant, Instant),
        tally: Tally,
        last: Last,
        external_id: Option<String>,
        unresolved: bool,
    ) -> Self {
        DeadlineExceeded {
            resume_at,
            deadline,
            retry_after: resume_at.saturating_duration_since(now),
            left: deadline.saturating_duration_since(now),
            asked: None,
            tally,
            attempts: Attempts::new(tally.attempts, unresolved, last.into_box()),
            external_id,
        }
    }

    /// The same error, naming the server's `Retry-After` that asked for the wait.
    pub(crate) fn with_asked(mut self, asked: Option<Duration>) -> Self {
        self.asked = asked;
        self
    }

    /// The wait the last answer's `Retry-After` asked for, when that wait (not this layer's
    /// backoff) is what would have passed the deadline. [`kling_core::MAX_RETRY_AFTER`] (a
    /// day) means that or more, and [`resume_at`](Self::resume_at) is then a lower bound.
    pub fn asked(&self) -> Option<Duration> {
        self.asked
    }

    /// Whether a create carrying [`external_id`](Self::external_id) may have made a billed
    /// task that no lookup has ruled out yet: the next attempt would have looked it up. Look it
    /// up before creating again.
    pub fn may_have_created(&self) -> bool {
        self.attempts.may_have_created()
    }

    /// The create's external id (the caller's, or a generated `kr-…` one), when an attempt of
    /// this create may have made a task; `None` for every other call. See
    /// [`Failed::external_id`].
    pub fn external_id(&self) -> Option<&str> {
        self.external_id.as_deref()
    }

    /// When the next attempt may be sent (tokio time).
    pub fn resume_at(&self) -> Instant {
        self.resume_at
    }

    /// How long after this error the next attempt may be sent.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The call's deadline, which `resume_at` is after.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    last_accessors!();
}

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(asked) = self.asked {
            // kling-core reads a longer wait as its ceiling: the server asked for this or more.
            let more = if asked >= kling_core::MAX_RETRY_AFTER {
                " or more"
            } else {
                ""
            };
            write!(
                f,
                "the server asked to wait {asked:?}{more} (Retry-After), and only {:?} \
                 are left before the deadline",
                self.left
            )?;
        } else if self.retry_after.is_zero() {
            // Ended at the deadline itself: an attempt still out there, or one the service
            // below was not ready to take.
            f.write_str("deadline reached before the call could end")?;
        } else {
            write!(
                f,
                "next retry in {:?} would pass the deadline",
                self.retry_after
            )?;
        }
        if self.may_have_created() {
            write!(f, "; {}", StopReason::CreateUnresolved)?;
        }
        write!(
            f,
            "{} {}: {}",
            ExternalId(self.external_id()),
            self.tally,
            self.attempts.last()
        )
    }
}

impl StdError for DeadlineExceeded {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.attempts)
    }
}

/// An invalid configuration value, naming the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    field: &'static str,
    reason: &'static str,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, reason: &'static str) -> Self {
        ConfigError { field, reason }
    }

    /// The configuration field that is invalid (e.g. `max_attempts`, `budget.ratio`).
    pub fn field(&self) -> &'static str {
        self.field
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid retry configuration: `{}` {}",
            self.field, self.reason
        )
    }
}

impl StdError for ConfigError {}
