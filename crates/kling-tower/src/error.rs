//! The errors this crate adds to the stack's [`BoxError`](kling_core::BoxError).
//!
//! Each is a small struct with the data a caller needs; downcast a boxed error to read it.
//! Errors of the layers below (a [`kling_core::error::Transport`], an
//! [`ApiError`]) pass through unchanged.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

pub use crate::auth::ApiKeyRequired;
pub use crate::base_url::OtherOrigin;
use kling_core::AccountId;
use kling_core::error::{ApiError, RefusedBeforeSending};

/// An invalid configuration value, naming the field (or the environment variable) it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    field: Cow<'static, str>,
    reason: Cow<'static, str>,
}

impl ConfigError {
    pub(crate) fn new(
        field: impl Into<Cow<'static, str>>,
        reason: impl Into<Cow<'static, str>>,
    ) -> Self {
        ConfigError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The offending field: a configuration key (`burst`, `pool_slots.video`), an environment
    /// variable (`KLING_BURST`) or `toml` for a document that does not parse.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// Why the value was refused.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    pub(crate) fn renamed(mut self, field: impl Into<Cow<'static, str>>) -> Self {
        self.field = field.into();
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid kling-tower configuration: `{}` {}",
            self.field, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

/// A JWT could not be signed (the signing backend refused the key).
#[derive(Debug)]
pub struct SigningError {
    source: jsonwebtoken::errors::Error,
}

impl SigningError {
    pub(crate) fn new(source: jsonwebtoken::errors::Error) -> Self {
        SigningError { source }
    }
}

impl fmt::Display for SigningError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "could not sign the kling jwt: {}", self.source)
    }
}

impl std::error::Error for SigningError {
    /// [`RefusedBeforeSending`]: the request was not sent. The signer's error is in the
    /// message.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&RefusedBeforeSending)
    }
}

/// A create refused before it reached the server: its estimated cost would pass the credit
/// budget left for the current period.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetExceeded {
    pub(crate) account: Option<AccountId>,
    pub(crate) budget: f64,
    pub(crate) committed: f64,
    pub(crate) estimate: f64,
    pub(crate) resets_in: Duration,
}

impl BudgetExceeded {
    /// The account the budget belongs to (`None` for requests without an [`AccountId`]).
    pub fn account(&self) -> Option<&AccountId> {
        self.account.as_ref()
    }

    /// The credit budget of one period.
    pub fn budget(&self) -> f64 {
        self.budget
    }

    /// Credits spent or reserved in this period (reported costs in credits, plus estimates of
    /// tasks whose cost is not known yet, or was reported in another currency).
    pub fn committed(&self) -> f64 {
        self.committed
    }

    /// What is left of the budget.
    pub fn remaining(&self) -> f64 {
        (self.budget - self.committed).max(0.0)
    }

    /// The estimated cost of the refused create.
    pub fn estimate(&self) -> f64 {
        self.estimate
    }

    /// How long until the budget period starts again.
    pub fn resets_in(&self) -> Duration {
        self.resets_in
    }

    /// Whether the create costs more than the whole budget of a period: it is refused in every
    /// period, so waiting for [`resets_in`](Self::resets_in) does not help.
    pub fn never_fits(&self) -> bool {
        self.estimate > self.budget + crate::spend::EPSILON
    }
}

impl fmt::Display for BudgetExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.never_fits() {
            return write!(
                f,
                "create refused locally: estimated cost {} credits is more than the whole {}-credit budget of a period: it never fits, in any period",
                self.estimate, self.budget
            );
        }
        write!(
            f,
            "create refused locally: estimated cost {} credits exceeds the {} left of the {}-credit budget (resets in {}s)",
            self.estimate,
            self.remaining(),
            self.budget,
            self.resets_in.as_secs()
        )
    }
}

impl std::error::Error for BudgetExceeded {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&RefusedBeforeSending)
    }
}

/// Why a signed callback was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WebhookErrorKind {
    /// `webhook-id`, `webhook-timestamp` or `webhook-signature` is missing or not text.
    MissingHeader,
    /// `webhook-timestamp` is not a number of seconds.
    BadTimestamp,
    /// The timestamp is further than the tolerance from now (a stale or future message).
    Stale,
    /// No `v1,` signature matches any configured secret.
    BadSignature,
    /// A message with this `webhook-id` was already accepted.
    Replayed,
    /// The verified body reports several tasks, and
    /// [`WebhookVerifier::verify_task`](crate::WebhookVerifier::verify_task) reads one: read
    /// it with [`verify_tasks`](crate::WebhookVerifier::verify_tasks). Its id was not
    /// remembered.
    SeveralTasks,
}

/// A callback whose Standard-Webhooks signature was refused, or (by
/// [`WebhookVerifier::verify_task`](crate::WebhookVerifier::verify_task)) whose several tasks
/// a single-task read would have lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookError {
    pub(crate) kind: WebhookErrorKind,
    pub(crate) detail: Cow<'static, str>,
}

impl WebhookError {
    pub(crate) fn new(kind: WebhookErrorKind, detail: impl Into<Cow<'static, str>>) -> Self {
        WebhookError {
            kind,
            detail: detail.into(),
        }
    }

    /// Why it was refused.
    pub fn kind(&self) -> WebhookErrorKind {
        self.kind
    }
}

impl fmt::Display for WebhookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "webhook refused: {}", self.detail)
    }
}

impl std::error::Error for WebhookError {}

/// Why following a task stopped before the task ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum FollowError {
    /// The task did not end within its deadline.
    DeadlineExceeded {
        /// The task id.
        task_id: String,
        /// The deadline that passed.
        deadline: Duration,
        /// The last status a query reported, if any.
        last_status: Option<String>,
    },
    /// The task reference cannot be queried (e.g. an id with characters a URL cannot carry).
    InvalidTask {
        /// The task id.
        task_id: String,
        /// Why.
        reason: &'static str,
    },
    /// A query got an answer that no retry can change (e.g. `1203` not found, `1000` auth,
    /// `1101` arrears): as a response, or as a retry layer's
    /// [`Failed`](kling_retry::error::Failed) with
    /// [`StopReason::NotRetryable`](kling_retry::error::StopReason::NotRetryable) (the stack's
    /// case). Following stops at that query, not at the deadline.
    Api {
        /// The task id.
        task_id: String,
        /// The error, with code, message and request id.
        error: ApiError,
    },
    /// The service refused a query before sending it, for a reason no retry changes: a
    /// [`Gateway`](crate::gateway::Gateway) that knows no account the query names
    /// ([`UnknownAccount`]: give the follower its account with
    /// [`with_account`](crate::follow::Follower::with_account), as
    /// [`KlingLayer::follower`](crate::KlingLayer::follower) does), a query at another origin
    /// than the base URL's ([`OtherOrigin`]), a client that refuses it for good (a relative
    /// URI with no [`BaseUrlLayer`](crate::base_url::BaseUrlLayer) in the stack:
    /// [`kling_core::error::will_recur`]), or a task path no URI holds. Following stops at
    /// that query, not at the deadline.
    Unsendable {
        /// The task id.
        task_id: String,
        /// The refusal, as its error displays it (no credentials, no query string).
        reason: String,
    },
}

impl FollowError {
    /// The task this error is about.
    pub fn task_id(&self) -> &str {
        match self {
            FollowError::DeadlineExceeded { task_id, .. }
            | FollowError::InvalidTask { task_id, .. }
            | FollowError::Api { task_id, .. }
            | FollowError::Unsendable { task_id, .. } => task_id,
        }
    }
}

impl fmt::Display for FollowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FollowError::DeadlineExceeded {
                task_id,
                deadline,
                last_status,
            } => write!(
                f,
                "task {task_id} did not end within {}s (last status {})",
                deadline.as_secs_f64(),
                last_status.as_deref().unwrap_or("unknown")
            ),
            FollowError::InvalidTask { task_id, reason } => {
                write!(f, "cannot follow task {task_id:?}: {reason}")
            }
            FollowError::Api { task_id, error } => {
                write!(f, "following task {task_id} failed: {error}")
            }
            FollowError::Unsendable { task_id, reason } => {
                write!(f, "cannot query task {task_id}: {reason}")
            }
        }
    }
}

impl std::error::Error for FollowError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FollowError::Api { error, .. } => Some(error),
            FollowError::DeadlineExceeded { .. }
            | FollowError::InvalidTask { .. }
            | FollowError::Unsendable { .. } => None,
        }
    }
}

/// A create refused because the stack is draining ([`DrainHandle::drain`]); it was never sent.
///
/// [`DrainHandle::drain`]: crate::drain::DrainHandle::drain
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draining {
    path: String,
}

impl Draining {
    pub(crate) fn new(path: &str) -> Self {
        Draining {
            path: path.to_owned(),
        }
    }

    /// The path of the refused create.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl fmt::Display for Draining {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "create to {} refused: the stack is draining and admits no new tasks",
            self.path
        )
    }
}

impl std::error::Error for Draining {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&RefusedBeforeSending)
    }
}

/// A gateway request for an account the gateway has no stack for (or with no [`AccountId`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownAccount {
    account: Option<AccountId>,
}

impl UnknownAccount {
    pub(crate) fn new(account: Option<AccountId>) -> Self {
        UnknownAccount { account }
    }

    /// The account the request named, if any.
    pub fn account(&self) -> Option<&AccountId> {
        self.account.as_ref()
    }
}

impl fmt::Display for UnknownAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.account {
            Some(account) => write!(f, "no kling stack is configured for account {account}"),
            None => f.write_str("the request names no account (set an AccountId extension)"),
        }
    }
}

impl std::error::Error for UnknownAccount {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&RefusedBeforeSending)
    }
}
