//! Errors the rate limiter adds to the inner service's.
//!
//! The service's error is a [`kling_core::BoxError`]; downcast it to these types.
//! Every refusal carries the instant the request could have been sent ([`tokio::time::Instant`]),
//! so a caller (or the retry layer above) knows how long to wait.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use kling_core::error::RefusedBeforeSending;
use kling_core::{AccountId, BoxError};
use tokio::time::Instant;

/// Reject mode: the request would have had to wait; it was not sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    resume_at: Instant,
    retry_after: Duration,
    cooldown: bool,
    account: Option<AccountId>,
}

impl RateLimited {
    pub(crate) fn new(
        resume_at: Instant,
        now: Instant,
        cooldown: bool,
        account: Option<AccountId>,
    ) -> Self {
        RateLimited {
            resume_at,
            retry_after: resume_at.saturating_duration_since(now),
            cooldown,
            account,
        }
    }

    /// The account refused (`None` for the shared key): a gateway rejecting for many
    /// accounts can tell which one is over its quota or paused.
    pub fn account(&self) -> Option<&AccountId> {
        self.account.as_ref()
    }

    /// How long to wait before trying again (from when the request was refused).
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The earliest instant the request may be sent.
    pub fn resume_at(&self) -> Instant {
        self.resume_at
    }

    /// Whether the key is paused after a 1302 or a `Retry-After` (rather than just paced).
    pub fn in_cooldown(&self) -> bool {
        self.cooldown
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = if self.cooldown {
            "paused after a throttling response"
        } else {
            "over its quota"
        };
        match &self.account {
            Some(account) => write!(f, "rate limited: account {}", account.as_str())?,
            None => write!(f, "rate limited: key")?,
        }
        write!(f, " {why}, retry after {:?}", self.retry_after)
    }
}

impl StdError for RateLimited {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&RefusedBeforeSending)
    }
}

/// Which bound a waiting request ran into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WaitLimit {
    /// The layer's configured maximum wait.
    MaxWait,
    /// The request's [`Deadline`](kling_core::signals::Deadline) extension.
    Deadline,
}

/// Wait mode: the request would have had to wait past its maximum wait or its deadline; it
/// was not sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitExceeded {
    resume_at: Instant,
    wait: Duration,
    limit: WaitLimit,
    queued: bool,
    cooldown: bool,
    account: Option<AccountId>,
}

impl WaitExceeded {
    /// Refused at `now`: the request's next turn was at `resume_at` (in a pause after a 429 if
    /// `cooldown`), past `limit`.
    pub(crate) fn new(
        resume_at: Instant,
        now: Instant,
        limit: WaitLimit,
        queued: bool,
        cooldown: bool,
        account: Option<AccountId>,
    ) -> Self {
        WaitExceeded {
            resume_at,
            wait: resume_at.saturating_duration_since(now),
            limit,
            queued,
            cooldown,
            account,
        }
    }

    /// The earliest instant the request could have been sent. When the request gave up while
    /// still queued behind others this is a lower bound (the head of the queue's next turn).
    pub fn resume_at(&self) -> Instant {
        self.resume_at
    }

    /// How long the request would have waited, from when it was refused.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// Which bound was reached.
    pub fn limit(&self) -> WaitLimit {
        self.limit
    }

    /// Whether the request gave up while queued behind other requests.
    pub fn was_queued(&self) -> bool {
        self.queued
    }

    /// Whether the wait was a pause of the whole key after a `1302` or a `Retry-After`, rather
    /// than pacing.
    pub fn in_cooldown(&self) -> bool {
        self.cooldown
    }

    /// The account whose limit it waited for (`None`: requests without an account).
    pub fn account(&self) -> Option<&AccountId> {
        self.account.as_ref()
    }
}

impl fmt::Display for WaitExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let limit = match self.limit {
            WaitLimit::MaxWait => "the maximum wait",
            WaitLimit::Deadline => "the request's deadline",
        };
        write!(f, "rate limit wait")?;
        if let Some(account) = &self.account {
            write!(f, " of account {}", account.as_str())?;
        }
        write!(f, " would pass {limit}: next turn in {:?}", self.wait)?;
        if self.cooldown {
            write!(f, " (the account is paused after a 1302 or a Retry-After)")?;
        }
        Ok(())
    }
}

impl StdError for WaitExceeded {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&RefusedBeforeSending)
    }
}

/// Wait mode: the key's queue already holds the configured maximum of waiting requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFull {
    account: Option<AccountId>,
    max: usize,
}

impl QueueFull {
    pub(crate) fn new(account: Option<AccountId>, max: usize) -> Self {
        QueueFull { account, max }
    }

    /// The account whose queue is full (`None` for the shared key).
    pub fn account(&self) -> Option<&AccountId> {
        self.account.as_ref()
    }

    /// The configured maximum queue length.
    pub fn max(&self) -> usize {
        self.max
    }
}

impl fmt::Display for QueueFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.account {
            Some(account) => write!(
                f,
                "rate limit queue of account {account} is full ({} waiting)",
                self.max
            ),
            None => write!(f, "rate limit queue is full ({} waiting)", self.max),
        }
    }
}

impl StdError for QueueFull {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&RefusedBeforeSending)
    }
}

/// What went wrong in a [`Backend`](crate::Backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// The shared store could not be reached (connection refused, timed out).
    Unreachable,
    /// The store answered with something the backend does not understand.
    Protocol,
    /// The store refused the credentials: not retried until they change (waiting or falling
    /// back would hide a configuration error).
    AuthRefused,
}

/// A [`Backend`](crate::Backend) could not decide: the request was not sent.
#[derive(Debug)]
pub struct BackendError {
    kind: BackendErrorKind,
    source: BoxError,
}

impl BackendError {
    /// The store could not be reached.
    pub fn unreachable(source: impl Into<BoxError>) -> Self {
        BackendError {
            kind: BackendErrorKind::Unreachable,
            source: source.into(),
        }
    }

    /// The store answered unexpectedly.
    pub fn protocol(source: impl Into<BoxError>) -> Self {
        BackendError {
            kind: BackendErrorKind::Protocol,
            source: source.into(),
        }
    }

    /// The store refused the credentials.
    pub fn auth_refused(source: impl Into<BoxError>) -> Self {
        BackendError {
            kind: BackendErrorKind::AuthRefused,
            source: source.into(),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> BackendErrorKind {
        self.kind
    }

    /// The store's error (a Redis backend's: `kling_redis::StoreError`).
    pub fn store_error(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.source
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            BackendErrorKind::Unreachable => {
                write!(f, "rate limit store unreachable: {}", self.source)
            }
            BackendErrorKind::Protocol => {
                write!(f, "rate limit store protocol error: {}", self.source)
            }
            BackendErrorKind::AuthRefused => {
                write!(
                    f,
                    "rate limit store refused the credentials: {}",
                    self.source
                )
            }
        }
    }
}

impl StdError for BackendError {
    /// [`RefusedBeforeSending`]: the request was not sent. The store's own error is
    /// [`BackendError::store_error`] (and in the message).
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&RefusedBeforeSending)
    }
}

/// Invalid configuration, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    owner: &'static str,
    field: &'static str,
    reason: &'static str,
}

impl ConfigError {
    pub(crate) fn new(owner: &'static str, field: &'static str, reason: &'static str) -> Self {
        ConfigError {
            owner,
            field,
            reason,
        }
    }

    /// The invalid field, as `quota.rate`, `cooldown.ceiling`, `adaptive.start`, …
    pub fn field(&self) -> String {
        format!("{}.{}", self.owner, self.field)
    }

    /// Why it is invalid.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid rate limit configuration: {}.{} {}",
            self.owner, self.field, self.reason
        )
    }
}

impl StdError for ConfigError {}

#[cfg(test)]
mod tests {
    use kling_core::SendState;

    use super::*;

    /// Every refusal here leaves the request unsent, and says so to the layers above (the task
    /// slots give the create's slot back).
    #[test]
    fn every_refusal_reads_as_never_sent() {
        let now = Instant::now();
        let later = now + Duration::from_secs(5);
        let refusals: [BoxError; 4] = [
            Box::new(RateLimited::new(later, now, false, None)),
            Box::new(WaitExceeded::new(
                later,
                now,
                WaitLimit::MaxWait,
                true,
                false,
                None,
            )),
            Box::new(QueueFull::new(None, 10)),
            Box::new(BackendError::unreachable("connection refused")),
        ];
        for refusal in refusals {
            assert_eq!(SendState::of(&*refusal), SendState::NotSent, "{refusal}");
        }
        let store = BackendError::protocol("unexpected reply");
        assert_eq!(store.store_error().to_string(), "unexpected reply");
    }
}
