//! Where the limiter's state lives: the [`Backend`] trait, and [`InProcess`], the governor
//! backend for one process.
//!
//! The layer keeps the parts that belong to one process — the FIFO queue of waiting requests,
//! their wakers and timers — and asks the backend only two questions, both shaped for a remote
//! store (Redis) as much as for memory:
//!
//! - [`acquire`](Backend::acquire): may one request of this key go now? The answer is
//!   [`Decision::Admit`] (the request's cell is taken) or [`Decision::NotBefore`] (nothing is
//!   taken; ask again at that instant). Only the head of a key's queue asks, so a remote store
//!   sees one question per admitted request plus one per wake-up, never one per waiter. A
//!   head that has waited asks with [`acquire_waiting`](Backend::acquire_waiting), saying
//!   since when, so a store shared by several processes can serve their waiting requests in
//!   that order; when the last such request gives up, the layer says so
//!   ([`stop_waiting`](Backend::stop_waiting)).
//! - [`feedback`](Backend::feedback): what a response said (success, or a 1302 / a
//!   refusal's `Retry-After`), so the key's cooldown, its escalation streak and its adaptive
//!   rate — which every process sharing the account must see — live in the store too.
//!
//! Both return futures: the in-process backend's are [`std::future::Ready`], so the success path
//! costs one lock and no allocation; a remote backend returns its own (e.g. boxed) futures and
//! reports an unreachable store as a [`BackendError`]. Instants are tokio instants of the
//! calling process; a remote backend converts them to its store's clock (for Redis: wall-clock
//! milliseconds, `SystemTime::now() + (instant − Instant::now())`) and back.

mod memory;

use std::future::Future;
use std::time::Duration;

use kling_core::{AccountId, RequestKind};
use tokio::time::Instant;

pub use memory::InProcess;

use crate::error::BackendError;
use crate::policy::{Adaptive, Cooldown, later};
use crate::quota::Quota;

/// The key one quota is counted under: an account (or the shared key) and, for a separate
/// endpoint-class quota, the class.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BucketKey {
    account: Option<AccountId>,
    class: Option<RequestKind>,
}

impl BucketKey {
    /// The account-wide key (`None`: the one shared key of requests without an account).
    pub fn account(account: Option<AccountId>) -> Self {
        BucketKey {
            account,
            class: None,
        }
    }

    /// The key of one endpoint class of an account.
    pub fn class(account: Option<AccountId>, class: RequestKind) -> Self {
        BucketKey {
            account,
            class: Some(class),
        }
    }

    /// The account, if any.
    pub fn account_id(&self) -> Option<&AccountId> {
        self.account.as_ref()
    }

    /// The endpoint class, for a class quota's key.
    pub fn request_kind(&self) -> Option<RequestKind> {
        self.class
    }

    /// The account, taken out of the key.
    pub(crate) fn into_account(self) -> Option<AccountId> {
        self.account
    }
}

/// What the layer asks the backend to enforce for one key.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Policy {
    /// The configured quota (with adaptive mode: the ceiling).
    pub quota: Quota,
    /// The adaptive rule, if the key adapts.
    pub adaptive: Option<Adaptive>,
    /// The cooldown rule (account keys; class keys are never paused on their own).
    pub cooldown: Cooldown,
}

impl Policy {
    /// A policy with no adaptive rule.
    pub fn new(quota: Quota, cooldown: Cooldown) -> Self {
        Policy {
            quota,
            adaptive: None,
            cooldown,
        }
    }

    /// Adds an adaptive rule.
    pub fn with_adaptive(mut self, adaptive: Option<Adaptive>) -> Self {
        self.adaptive = adaptive;
        self
    }
}

/// A backend's answer to [`Backend::acquire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// The request may go now; its cell is taken.
    Admit,
    /// Nothing was taken; the key allows no request before `at`.
    NotBefore {
        /// The earliest instant to ask again.
        at: Instant,
        /// Whether the key is paused by a cooldown (rather than paced by its quota). A pause is
        /// never cut short (a quota change may shorten a pacing wait): the layer fails at once
        /// a request queued behind it whose wait limit comes before `at`.
        cooldown: bool,
    },
}

/// What a response said, for [`Backend::feedback`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Feedback {
    /// The request succeeded (code 0): on a 2xx whatever `Retry-After` its answer carried, on
    /// another status only without one.
    Success {
        /// When the request was admitted.
        sent_at: Instant,
    },
    /// The server asked the key to slow down: a 1302, and/or a `Retry-After` on an answer
    /// that refused the request (any but a success on a 2xx).
    Pause {
        /// When the request was admitted.
        sent_at: Instant,
        /// When the response arrived.
        received_at: Instant,
        /// The `Retry-After` instant, if the response had one.
        resume_at: Option<Instant>,
        /// Whether the code was 1302 (it counts towards the streak and the adaptive rate).
        throttled: bool,
    },
}

/// A backend's answer to [`Backend::feedback`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reported {
    /// The instant a cooldown now lasts until, if this feedback started or extended one.
    pub cooldown_until: Option<Instant>,
    /// The key's streak of 1302s after this feedback.
    pub streak: u32,
}

/// A snapshot of one key's state, for handles and tests.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct KeyState {
    /// The quota enforced now (the adaptive rate applied to the ceiling).
    pub effective: Quota,
    /// The end of the key's cooldown, if it is paused.
    pub cooldown_until: Option<Instant>,
    /// Consecutive 1302s.
    pub streak: u32,
    /// The adaptive rate, requests per second.
    pub adaptive_rate: Option<f64>,
}

/// The limiter's state: a GCRA decision per key, plus the cooldown and adaptive state shared by
/// every process that uses the same store. See the [module docs](self).
///
/// Implementations must be consistent under concurrent calls: two `acquire`s that both get
/// [`Decision::Admit`] must both fit the quota.
pub trait Backend: Send + Sync + 'static {
    /// The future of [`Backend::acquire`].
    type AcquireFuture: Future<Output = Result<Decision, BackendError>> + Send + Unpin + 'static;
    /// The future of [`Backend::feedback`].
    type FeedbackFuture: Future<Output = Result<Reported, BackendError>> + Send + Unpin + 'static;

    /// Takes one request's cell from `key` now, or says when to ask again: a request's first
    /// ask, in wait mode ([`Mode::Wait`](crate::Mode::Wait)). A request refused here goes on
    /// to wait, so a store several processes share may rank it in the fleet's order from now
    /// (as if it had asked with [`acquire_waiting`](Backend::acquire_waiting)): the layer
    /// tells [`stop_waiting`](Backend::stop_waiting) if it then does not wait after all —
    /// refused past its wait limit, failed, or dropped before the answer came — and no other
    /// request of the limiter waits for the key. (Reject mode asks with
    /// [`acquire_or_refuse`](Backend::acquire_or_refuse) instead.)
    fn acquire(&self, key: &BucketKey, policy: &Policy) -> Self::AcquireFuture;

    /// [`Backend::acquire_noting`] for a request that fails rather than waits when refused
    /// (reject mode, [`Mode::Reject`](crate::Mode::Reject)): a refusal must leave nothing
    /// behind, such as a place in a fleet's order, since no later ask or
    /// [`stop_waiting`](Backend::stop_waiting) follows it. The default is `acquire_noting`,
    /// right for a store that keeps no such places.
    fn acquire_or_refuse(
        &self,
        key: &BucketKey,
        policy: &Policy,
        decided_at: &mut Option<Instant>,
    ) -> Self::AcquireFuture {
        self.acquire_noting(key, policy, decided_at)
    }

    /// Reject mode's ask for a request of the class key `class` (a class quota of the account
    /// key `account`): takes a turn of both at one instant, or of neither. The answer is the
    /// class's refusal when the class has no turn (the account is not asked), else the
    /// account's refusal when it has none (the class's turn is given back, or never taken),
    /// else [`Decision::Admit`] with both turns taken. As
    /// [`acquire_or_refuse`](Backend::acquire_or_refuse), a refusal leaves nothing behind, and
    /// `decided_at` is noted for an answer decided at once.
    ///
    /// The default, `None`, says the backend cannot: the layer asks `acquire_or_refuse` for
    /// the class, then for the account, and a class turn is spent on a request the account
    /// then refuses (the class's next request may be refused for up to a class turn that sent
    /// nothing). [`InProcess`] decides both under its lock and gives the class turn back
    /// unless another decision of the class came meanwhile; a shared store decides both in
    /// one step (for Redis, one script).
    fn acquire_class_or_refuse(
        &self,
        class: &BucketKey,
        class_policy: &Policy,
        account: &BucketKey,
        account_policy: &Policy,
        decided_at: &mut Option<Instant>,
    ) -> Option<Self::AcquireFuture> {
        let _ = (class, class_policy, account, account_policy, decided_at);
        None
    }

    /// [`Backend::acquire`], noting in `decided_at` the instant (this process's tokio clock) it
    /// decided at, when it decides at once: the layer sends a request admitted then at that
    /// instant instead of reading the clock again. The default leaves `decided_at` alone (a
    /// remote store decides on its own clock, and the layer reads the clock when the answer
    /// arrives); the in-process backend notes the instant it read under its lock.
    fn acquire_noting(
        &self,
        key: &BucketKey,
        policy: &Policy,
        decided_at: &mut Option<Instant>,
    ) -> Self::AcquireFuture {
        let _ = decided_at;
        self.acquire(key, policy)
    }

    /// [`Backend::acquire`] for a request that has waited since `since` (this process's tokio
    /// clock): the head of a key's queue asking again. A store that several processes share
    /// may give a key's next cell to the request that has waited longest in any of them, so
    /// that no process starves another by asking first; the default ignores `since` (one
    /// process's FIFO queue already orders its own waiters).
    fn acquire_waiting(
        &self,
        key: &BucketKey,
        policy: &Policy,
        since: Instant,
    ) -> Self::AcquireFuture {
        let _ = since;
        self.acquire(key, policy)
    }

    /// This limiter no longer has a request waiting for `key`: the last one that waited gave
    /// up (its future was dropped, it failed, or its wait limit passed), whether or not it had
    /// asked with [`acquire_waiting`](Backend::acquire_waiting) yet, or a request whose first
    /// ask ([`acquire`](Backend::acquire)) was refused, failed or dropped did not go on to
    /// wait, and none other waits. A store several processes share can
    /// drop the process's place in the key's fleet queue at once, instead of holding the
    /// others back until the place ends. (A request admitted after asking with
    /// `acquire_waiting` is not reported: the store admitting it can drop the place then.)
    /// Called from `Drop`, so it must not block; the default does nothing (a process's own
    /// queue needs no telling).
    fn stop_waiting(&self, key: &BucketKey) {
        let _ = key;
    }

    /// Records what a response of `key` said: starts or extends the cooldown, moves the streak
    /// and the adaptive rate.
    ///
    /// A report still to come when first polled is awaited before the response is handed
    /// back; meanwhile the layer holds the key paused itself for the shortest pause a
    /// [`Feedback::Pause`] may set ([`pause_until`] at its shortest streak's step). If the
    /// caller drops the response future first, the layer runs the report to its end on the
    /// runtime, when there is one.
    fn feedback(
        &self,
        key: &BucketKey,
        policy: &Policy,
        feedback: Feedback,
    ) -> Self::FeedbackFuture;

    /// Whether the store holds a 1302 streak for the account-wide `key` that a success of it
    /// must reset, as far as this process last heard: a streak another process may have
    /// started. The layer then reports this process's successes of `key`
    /// ([`Feedback::Success`]) although it never received a pause itself, so a fleet's streak
    /// is reset by any process's success, as [`Cooldown`] says. Called for a successful
    /// response only, and only while the layer does not report successes anyway (adaptive
    /// mode, or after this process received a pause), so it must be cheap: a store of one
    /// process keeps the default, `false` (its layer starts reporting successes when it
    /// receives the pause that starts a streak); a shared store answers from what its last
    /// decision for `key` said (kling-redis's acquire reply).
    fn streak_running(&self, key: &BucketKey) -> bool {
        let _ = key;
        false
    }

    /// Whether a success of the account-wide `key` under the adaptive `policy` would change
    /// nothing the store holds, as far as this process can tell at once: the key's adaptive
    /// rate is at its ceiling (`policy.quota`), not
    /// [`lowered`](crate::AdaptiveState::lowered), with nothing else
    /// [`AdaptiveState::on_success`](crate::AdaptiveState::on_success) would move, and no 1302
    /// streak to reset. The layer then does not report the success: an adaptive key at its
    /// ceiling costs what a fixed quota does. Called for every successful response of an
    /// adaptive limiter, so it must be cheap and must not block. The default, `false`, has
    /// every success reported; [`InProcess`] answers from the key's limiter this thread
    /// remembers (a key it has not decided on lately is not at its ceiling for this answer).
    fn adaptive_at_ceiling(&self, key: &BucketKey, policy: &Policy) -> bool {
        let _ = (key, policy);
        false
    }

    /// The requests every process sharing this store was admitted under the account-wide
    /// `key` over the store's usage window, for a store a fleet shares (the Redis backend);
    /// `None`, the default, for a store of one process, whose requests its monitor counts
    /// itself.
    fn fleet_requests(&self, key: &BucketKey) -> Option<FleetRequests> {
        let _ = key;
        None
    }
}

/// The future of [`Backend::fleet_requests`].
pub type FleetRequests =
    std::pin::Pin<Box<dyn Future<Output = Result<u64, BackendError>> + Send + 'static>>;

/// The cooldown a pause feedback asks for, given the streak it makes: the `Retry-After`
/// instant, and for a 1302 the escalated pause from when it arrived.
pub fn pause_until(
    cooldown: &Cooldown,
    interval: Duration,
    streak: u32,
    received_at: Instant,
    resume_at: Option<Instant>,
    throttled: bool,
) -> Instant {
    let escalated = throttled.then(|| later(received_at, cooldown.pause(streak, interval)));
    match (resume_at, escalated) {
        (Some(a), Some(b)) => a.max(b),
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => received_at,
    }
}
