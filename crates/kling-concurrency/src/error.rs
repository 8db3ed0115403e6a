//! The errors this crate adds; each is a small struct that stays distinguishable after boxing
//! (downcast a [`BoxError`](kling_core::error::BoxError) to it).

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use kling_core::error::{ApiError, RefusedBeforeSending};
use kling_core::{AccountId, Code, Pool};

/// Creates for this account are refused locally: the server answered `1102` (resource pack
/// exhausted; also `1100`/`1101`), so no further create can succeed until a person acts and
/// calls [`SlotsHandle::reset_halt`](crate::SlotsHandle::reset_halt).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Halted {
    account: AccountId,
    cause: ApiError,
}

impl Halted {
    /// A halt of `account` caused by the server's `cause`.
    pub fn new(account: AccountId, cause: ApiError) -> Self {
        Halted { account, cause }
    }

    /// The halted account.
    pub fn account(&self) -> &AccountId {
        &self.account
    }

    /// The Kling code that caused the halt.
    pub fn code(&self) -> Code {
        self.cause.code()
    }

    /// The server's message of the response that caused the halt.
    pub fn message(&self) -> &str {
        self.cause.message()
    }

    /// The server's request id of the response that caused the halt.
    pub fn request_id(&self) -> Option<&str> {
        self.cause.request_id()
    }

    /// The error response that caused the halt.
    pub fn cause(&self) -> &ApiError {
        &self.cause
    }
}

impl fmt::Display for Halted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "creates for account {} are halted locally after {}",
            self.account, self.cause
        )
    }
}

impl StdError for Halted {
    /// The marker of a refusal before sending, not the response that caused the halt (that
    /// is [`Halted::cause`]): the create being refused was never sent.
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&RefusedBeforeSending)
    }
}

/// A create gave up waiting for task slots, or, its slots granted, for the service below to
/// take it ([`slots_granted`](DeadlineExceeded::slots_granted): the slots were given back),
/// because the request's [`Deadline`](kling_core::signals::Deadline) would have passed. It was
/// not sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadlineExceeded {
    pool: Pool,
    weight: u32,
    waited: Duration,
    granted: bool,
}

impl DeadlineExceeded {
    pub(crate) fn new(pool: Pool, weight: u32, waited: Duration) -> Self {
        DeadlineExceeded {
            pool,
            weight,
            waited,
            granted: false,
        }
    }

    /// The slots were granted and the create waited for the service below (not ready to take
    /// it) when the deadline came.
    pub(crate) fn after_grant(mut self) -> Self {
        self.granted = true;
        self
    }

    /// Whether the slots were granted, and the create gave up waiting for the service below
    /// to be ready (an in-flight bound, a connection pool) to take it. Its slots were given
    /// back.
    pub fn slots_granted(&self) -> bool {
        self.granted
    }

    /// The pool the create waited in.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The slots the create needed.
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// How long it waited before giving up (for its slots and then, once they were granted,
    /// for the service below).
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.granted {
            return write!(
                f,
                "deadline reached after waiting {:?}: {} slot(s) in pool {} were granted, but \
                 the service below was not ready to take the create (slots given back)",
                self.waited, self.weight, self.pool
            );
        }
        write!(
            f,
            "deadline reached after waiting {:?} for {} slot(s) in pool {}",
            self.waited, self.weight, self.pool
        )
    }
}

impl StdError for DeadlineExceeded {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&RefusedBeforeSending)
    }
}

/// A create needs more slots than its pool has at all, so it could never be admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverCapacity {
    pool: Pool,
    weight: u32,
    capacity: u32,
    account: Option<AccountId>,
}

impl OverCapacity {
    /// A create of `weight` slots refused by a pool of `capacity` slots.
    pub fn new(pool: Pool, weight: u32, capacity: u32) -> Self {
        OverCapacity {
            pool,
            weight,
            capacity,
            account: None,
        }
    }

    /// Names the account whose pool refused the create: capacities may be set per account,
    /// so the pool alone does not say which setting to raise.
    pub fn in_account(self, account: AccountId) -> Self {
        OverCapacity {
            account: Some(account),
            ..self
        }
    }

    /// The account whose pool refused the create, when the backend named it.
    pub fn account(&self) -> Option<&AccountId> {
        self.account.as_ref()
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The slots the create needs.
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// The pool's configured capacity.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }
}

impl fmt::Display for OverCapacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "create needs {} slot(s) but pool {}",
            self.weight, self.pool
        )?;
        if let Some(account) = &self.account {
            write!(f, " of account {account}")?;
        }
        write!(f, " has only {}", self.capacity)
    }
}

impl StdError for OverCapacity {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&RefusedBeforeSending)
    }
}

/// A create found its pool's queue full ([`SlotsConfig::max_queue`](crate::SlotsConfig::max_queue))
/// and was refused without waiting; it was not sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueFull {
    account: AccountId,
    pool: Pool,
    max: usize,
}

impl QueueFull {
    /// A create refused by `pool` of `account`, whose queue holds at most `max` waiters.
    pub fn new(account: AccountId, pool: Pool, max: usize) -> Self {
        QueueFull { account, pool, max }
    }

    /// The account.
    pub fn account(&self) -> &AccountId {
        &self.account
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The most creates that may wait for the pool (0: none may wait).
    pub fn max(&self) -> usize {
        self.max
    }
}

impl fmt::Display for QueueFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.max == 0 {
            write!(
                f,
                "no free slot in pool {} of account {} and creates may not wait",
                self.pool, self.account
            )
        } else {
            write!(
                f,
                "the queue of pool {} of account {} is full ({} waiting)",
                self.pool, self.account, self.max
            )
        }
    }
}

impl StdError for QueueFull {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&RefusedBeforeSending)
    }
}

/// The slot store could not be reached or answered nonsense (a remote backend's failure).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendError {
    message: String,
    /// Returned to a create that was refused for it (see [`AcquireError::into_box`]).
    refused: bool,
}

impl BackendError {
    /// A backend failure described by `message`.
    pub fn new(message: impl Into<String>) -> Self {
        BackendError {
            message: message.into(),
            refused: false,
        }
    }

    /// What went wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "task slot store unavailable: {}", self.message)
    }
}

impl StdError for BackendError {
    /// [`RefusedBeforeSending`] when a create was refused for it (the store decides whether it
    /// may be sent).
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.refused.then_some(&RefusedBeforeSending as _)
    }
}

/// Why a backend did not grant slots.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AcquireError {
    /// The account is halted after `1102`.
    Halted(Halted),
    /// The create can never fit its pool.
    OverCapacity(OverCapacity),
    /// The pool's queue is full (see [`SlotsConfig::max_queue`](crate::SlotsConfig::max_queue)).
    QueueFull(QueueFull),
    /// The store is unreachable.
    Backend(BackendError),
}

impl fmt::Display for AcquireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcquireError::Halted(e) => e.fmt(f),
            AcquireError::OverCapacity(e) => e.fmt(f),
            AcquireError::QueueFull(e) => e.fmt(f),
            AcquireError::Backend(e) => e.fmt(f),
        }
    }
}

impl StdError for AcquireError {}

impl AcquireError {
    /// The concrete error, boxed (so callers can downcast to [`Halted`] and friends), as the
    /// refused create's error: each names [`RefusedBeforeSending`] as its source.
    pub fn into_box(self) -> kling_core::error::BoxError {
        match self {
            AcquireError::Halted(e) => Box::new(e),
            AcquireError::OverCapacity(e) => Box::new(e),
            AcquireError::QueueFull(e) => Box::new(e),
            AcquireError::Backend(e) => Box::new(BackendError { refused: true, ..e }),
        }
    }
}

/// A [`SlotsHandle::reconcile`](crate::SlotsHandle::reconcile) stopped at a list request that
/// failed. It names the listing and the page, and what was found until then: those tasks stay
/// adopted, so the failure is partial, not a reconcile that did nothing. The cause is its
/// [`source`](StdError::source) (an `ApiError` for a Kling refusal, the transport's error, the
/// store's).
#[derive(Debug)]
pub struct ReconcileFailed {
    listing: String,
    page: Option<usize>,
    so_far: crate::Reconciled,
    source: kling_core::error::BoxError,
}

impl ReconcileFailed {
    pub(crate) fn new(
        listing: String,
        page: Option<usize>,
        so_far: crate::Reconciled,
        source: kling_core::error::BoxError,
    ) -> Self {
        ReconcileFailed {
            listing,
            page,
            so_far,
            source,
        }
    }

    /// The listing that failed: `legacy list /v1/videos/text2video`, or `new-style list of
    /// text-to-video tasks submitted`.
    pub fn listing(&self) -> &str {
        &self.listing
    }

    /// The page whose request failed (from 1); `None` when its request could not be built.
    pub fn page(&self) -> Option<usize> {
        self.page
    }

    /// What the reconcile found and adopted before it stopped (kept).
    pub fn so_far(&self) -> crate::Reconciled {
        self.so_far
    }
}

impl fmt::Display for ReconcileFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.page {
            Some(page) => write!(
                f,
                "reconcile stopped at page {page} of the {}",
                self.listing
            )?,
            None => write!(f, "reconcile stopped before the {}", self.listing)?,
        }
        write!(
            f,
            " ({} unfinished task(s) listed, {} task(s) adopted so far, kept): {}",
            self.so_far.unfinished, self.so_far.adopted, self.source
        )
    }
}

impl StdError for ReconcileFailed {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// Invalid configuration; the message names the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    field: String,
    reason: &'static str,
}

impl ConfigError {
    pub(crate) fn new(field: impl Into<String>, reason: &'static str) -> Self {
        ConfigError {
            field: field.into(),
            reason,
        }
    }

    /// The offending field.
    pub fn field(&self) -> &str {
        &self.field
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid task slots configuration: {} {}",
            self.field, self.reason
        )
    }
}

impl StdError for ConfigError {}

/// A callback payload that holds no task object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadCallback {
    reason: String,
}

impl BadCallback {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        BadCallback {
            reason: reason.into(),
        }
    }

    /// Why the payload was not understood.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for BadCallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "callback payload holds no task: {}", self.reason)
    }
}

impl StdError for BadCallback {}

#[cfg(test)]
mod tests {
    use kling_core::{Outcome, Product, SendState};

    use super::*;

    /// Every refusal a create meets here leaves it unsent, and says so to the layers above.
    #[test]
    fn every_refusal_of_a_create_reads_as_never_sent() {
        let refused = Outcome::parse(
            http::StatusCode::TOO_MANY_REQUESTS,
            &http::HeaderMap::new(),
            br#"{"code":1102,"message":"no balance","request_id":"r"}"#,
            tokio::time::Instant::now(),
        )
        .unwrap();
        let account = AccountId::new("a");
        let pool = Pool::new(Product::Video);
        let refusals = [
            AcquireError::Halted(Halted::new(
                account.clone(),
                ApiError::from_outcome(&refused),
            )),
            AcquireError::OverCapacity(OverCapacity::new(pool.clone(), 3, 2)),
            AcquireError::QueueFull(QueueFull::new(account, pool.clone(), 0)),
            AcquireError::Backend(BackendError::new("connection refused")),
        ];
        for refusal in refusals {
            let error = refusal.into_box();
            assert_eq!(SendState::of(&*error), SendState::NotSent, "{error}");
        }
        let late = DeadlineExceeded::new(pool, 1, Duration::from_secs(1));
        assert_eq!(SendState::of(&late), SendState::NotSent);
        // A store failure outside a create's way (a handle's call) says nothing of the sort.
        assert!(BackendError::new("timed out").source().is_none());
    }
}
