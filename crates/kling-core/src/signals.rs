//! Extensions that carry signals between layers, so no layer needs to know another's type.
//!
//! DESIGN.md's order puts `RetryLayer` above `TaskSlotsLayer` above `GcraLayer`; these markers
//! are how they cooperate: the retry layer tells the layers below how long the whole call may
//! still wait, and the slots layer tells the retry layer that a 1303 needs no backoff because
//! it will hold the retried create until a slot frees.
//!
//! The request-side signals ([`Deadline`], [`Attempt`], the [`AccountId`] and the cached
//! [`Recognized`]) share one extension, reached through their `of`/`set` functions; inserting
//! the standalone types still works (they are read when no layer set the signal).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use http::Request;
use tokio::time::Instant;

use crate::account::AccountId;
use crate::error::BoxError;
use crate::lanes::Lane;
use crate::request::Recognized;

/// Everything the stack's layers tell each other about one request, kept in ONE request
/// extension: `http::Extensions` allocates a box per type (and its table grows past three), and
/// the retry layer copies them all for every call, so one extension instead of four saves about
/// ten allocations per request. Read and written only through the accessors on [`Deadline`],
/// [`Attempt`], [`AccountId`] and [`Recognized`], which also honour the standalone extensions of
/// those types when a caller inserted them.
#[derive(Clone, Debug, Default)]
pub(crate) struct CallContext {
    pub(crate) account: Option<AccountId>,
    /// Shared, so the retry layer's copy of a request does not copy the recognized strings.
    pub(crate) recognized: Option<Arc<Recognized>>,
    pub(crate) deadline: Option<Instant>,
    pub(crate) attempt: Option<u32>,
    /// Shared with the layer that watches (and every retry copy of the request).
    pub(crate) send_watch: Option<SendWatch>,
    /// Where the classify step counts the request once it left (see [`SendCounter`]).
    pub(crate) send_counter: Option<SendCounter>,
    /// Whether the create's account was halted since its slots were granted (see
    /// [`HaltGate`]), read by the classify step before it sends.
    pub(crate) halt_gate: Option<HaltGate>,
}

impl CallContext {
    pub(crate) fn of<B>(request: &Request<B>) -> Option<&CallContext> {
        request.extensions().get::<CallContext>()
    }

    pub(crate) fn of_mut<B>(request: &mut Request<B>) -> &mut CallContext {
        request
            .extensions_mut()
            .get_or_insert_default::<CallContext>()
    }

    /// The combined extension, and whether the map holds anything else (so a standalone signal
    /// may be there): in the stack the map holds only this one, and a signal it lacks is then
    /// known absent without a second lookup.
    pub(crate) fn with_others<B>(request: &Request<B>) -> (Option<&CallContext>, bool) {
        let extensions = request.extensions();
        if extensions.is_empty() {
            return (None, false);
        }
        let call = extensions.get::<CallContext>();
        (call, extensions.len() > usize::from(call.is_some()))
    }

    /// A standalone extension of type `T`, looked for only when `others` (see
    /// [`CallContext::with_others`]) says the map may hold one.
    pub(crate) fn standalone<B, T: Send + Sync + 'static>(
        request: &Request<B>,
        others: bool,
    ) -> Option<&T> {
        if others {
            request.extensions().get::<T>()
        } else {
            None
        }
    }
}

/// A request's per-call signals on their own, for a layer that keeps a copy of the request to
/// send again (the retry layer): when the signals are all the request's extensions hold — the
/// stack's usual case — the copy keeps just them (no allocation) and each later attempt gets a
/// fresh extension map holding them, instead of every call deep-copying the map.
#[derive(Clone, Debug, Default)]
pub struct CallSignals(Option<CallContext>);

impl CallSignals {
    /// The signals of `extensions` when nothing else is in them (`None`: copy the extensions
    /// whole).
    pub fn if_alone(extensions: &http::Extensions) -> Option<CallSignals> {
        match extensions.len() {
            0 => Some(CallSignals(None)),
            1 => extensions
                .get::<CallContext>()
                .map(|call| CallSignals(Some(call.clone()))),
            _ => None,
        }
    }

    /// Puts the signals into a request (which then carries them as the original did).
    pub fn restore<B>(&self, request: &mut Request<B>) {
        if let Some(call) = &self.0 {
            request.extensions_mut().insert(call.clone());
        }
    }
}

/// A request's extensions kept to send it again (a retry layer's template, an auth layer's
/// resend): its signals alone when they are all the extensions hold — no allocation, the
/// stack's usual case — else the extensions copied whole.
#[derive(Clone, Debug)]
pub struct ExtensionsCopy(Result<CallSignals, http::Extensions>);

impl ExtensionsCopy {
    /// A copy of `extensions`.
    pub fn of(extensions: &http::Extensions) -> ExtensionsCopy {
        ExtensionsCopy(match CallSignals::if_alone(extensions) {
            Some(signals) => Ok(signals),
            None => Err(extensions.clone()),
        })
    }

    /// Whether the copy holds the signals alone (the extensions were not copied).
    pub fn signals_only(&self) -> bool {
        self.0.is_ok()
    }

    /// The [`SendWatch`] the copied request carried, if any: a layer that kept the copy reads
    /// it without rebuilding the request (a dropped call: was its attempt held back unsent?).
    pub fn send_watch(&self) -> Option<&SendWatch> {
        let call = match &self.0 {
            Ok(signals) => signals.0.as_ref(),
            Err(extensions) => extensions.get::<CallContext>(),
        };
        call.and_then(|call| call.send_watch.as_ref())
    }

    /// Puts the copy into `request`, in place of its extensions.
    pub fn restore<B>(&self, request: &mut Request<B>) {
        match &self.0 {
            Ok(signals) => signals.restore(request),
            Err(extensions) => *request.extensions_mut() = extensions.clone(),
        }
    }

    /// [`restore`](Self::restore), moving the copy (no second copy of whole extensions).
    pub fn restore_into<B>(self, request: &mut Request<B>) {
        match self.0 {
            Ok(signals) => signals.restore(request),
            Err(extensions) => *request.extensions_mut() = extensions,
        }
    }
}

/// Request extension: the instant after which the whole logical call (all attempts, all waits)
/// is late. Set by the retry layer; layers that wait (rate limiter, task slots) give up with
/// their typed error instead of waiting past it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// The deadline a request carries, if any: the one a layer set with [`Deadline::set`], else
    /// a `Deadline` extension the caller inserted.
    pub fn of<B>(request: &Request<B>) -> Option<Instant> {
        let (call, others) = CallContext::with_others(request);
        call.and_then(|call| call.deadline)
            .or_else(|| CallContext::standalone::<B, Deadline>(request, others).map(|d| d.0))
    }

    /// Sets the deadline the layers below will read (in the request's one combined signal
    /// extension, see the module docs).
    pub fn set<B>(request: &mut Request<B>, deadline: Instant) {
        CallContext::of_mut(request).deadline = Some(deadline);
    }
}

/// Request extension: which attempt of a logical call this is (1 for the first). Set by the
/// retry layer, read by metrics and tracing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt(pub u32);

impl Attempt {
    /// Which attempt a request is, if a retry layer said ([`Attempt::set`]) or the caller
    /// inserted an `Attempt` extension.
    pub fn of<B>(request: &Request<B>) -> Option<u32> {
        let (call, others) = CallContext::with_others(request);
        call.and_then(|call| call.attempt)
            .or_else(|| CallContext::standalone::<B, Attempt>(request, others).map(|a| a.0))
    }

    /// Marks which attempt a request is.
    pub fn set<B>(request: &mut Request<B>, attempt: u32) {
        CallContext::of_mut(request).attempt = Some(attempt);
    }

    /// Marks which attempt a request is and, when given, its deadline: what
    /// [`Attempt::set`] and [`Deadline::set`] do, with one lookup of the combined extension
    /// instead of two (the retry layer does both for every attempt).
    pub fn set_with_deadline<B>(request: &mut Request<B>, attempt: u32, deadline: Option<Instant>) {
        let call = CallContext::of_mut(request);
        call.attempt = Some(attempt);
        if let Some(deadline) = deadline {
            call.deadline = Some(deadline);
        }
    }

    /// Starts a call's attempt: the request's deadline ([`Deadline::of`]) brought forward to
    /// `limit` when that is sooner, set with the attempt ([`Attempt::set_with_deadline`]);
    /// returns that deadline. One lookup of the combined extension where the request already
    /// carries it alone (the stack's case), instead of three.
    pub fn begin<B>(
        request: &mut Request<B>,
        attempt: u32,
        limit: Option<Instant>,
    ) -> Option<Instant> {
        let alone = request.extensions().len() == 1;
        if let Some(call) = request.extensions_mut().get_mut::<CallContext>() {
            // A standalone deadline is read only when the combined extension has none.
            if alone || call.deadline.is_some() {
                let deadline = earlier(call.deadline, limit);
                call.attempt = Some(attempt);
                call.deadline = deadline;
                return deadline;
            }
        }
        let deadline = earlier(Deadline::of(request), limit);
        Attempt::set_with_deadline(request, attempt, deadline);
        deadline
    }
}

/// The sooner of two optional instants (either, when only one is set).
fn earlier(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Request signal: whether a create that a caller may cancel while it waits could have made a
/// task yet, so a layer above that reserved something for it (the spend guard's credit
/// estimate) knows, when the caller drops the request, whether to give it back.
///
/// A layer that holds a request back unsent (the task slots, for a slot; the rate limiter, for
/// a turn; the retry layer, between attempts) says so with [`SendWatch::held`], and
/// [`SendWatch::handed`] when it passes the request on. A layer that
/// sends a call again (the retry layer) says how each attempt ended with
/// [`SendWatch::answered`]: an attempt that surely made nothing (a `1303`, a request that never
/// left) is forgotten, so a later attempt held back counts as unsent again; one that may have
/// made a task is final. So [`SendWatch::never_sent`] is true only for a create that a layer
/// below holds back now and of which no attempt may have made a task. A request no layer
/// reported on (a stack without such a layer, or a create granted at once and sent) is not
/// known unsent, and keeps what was reserved for it. A layer that holds something of its own
/// for a create it passed on (the task slots, its slots) may read the same watch
/// ([`SendWatch::shared`]) when the create is dropped: held below, it never left.
///
/// Kept in the request's combined signal extension, like the other signals.
#[derive(Clone, Debug, Default)]
pub struct SendWatch(Arc<AtomicU8>);

/// No layer reported on the request, or its attempts so far surely made nothing.
const UNREPORTED: u8 = 0;
/// A layer holds an attempt back, unsent, and no earlier one may have made a task.
const HELD: u8 = 1;
/// A layer passed an attempt on; its answer has not been judged.
const HANDED: u8 = 2;
/// An attempt may have made a task (final).
const MAYBE_MADE: u8 = 3;

impl SendWatch {
    /// Starts watching a request: a fresh watch, in its signals, that the caller keeps.
    pub fn watch<B>(request: &mut Request<B>) -> SendWatch {
        let watch = SendWatch::default();
        CallContext::of_mut(request).send_watch = Some(watch.clone());
        watch
    }

    /// The watch a request carries, if a layer above watches it.
    fn of<B>(request: &Request<B>) -> Option<&SendWatch> {
        CallContext::of(request).and_then(|call| call.send_watch.as_ref())
    }

    /// A layer holds `request` back, unsent (it waits for a slot, a rate-limit turn, or the
    /// retry layer's backoff before the next attempt).
    ///
    /// Also after a layer above [`handed`](SendWatch::handed) it on: the attempt has not
    /// left while a layer below still holds it (attempts go one at a time, each
    /// [`answered`](SendWatch::answered) before the next, so nothing is in flight then). Never
    /// after an attempt that may have made a task: that stays final.
    pub fn held<B>(request: &Request<B>) {
        if let Some(watch) = SendWatch::of(request) {
            let _ = watch
                .0
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                    (state == UNREPORTED || state == HANDED).then_some(HELD)
                });
        }
    }

    /// The watch a request carries, or a new one put in its signals (for a layer that holds
    /// something for the request itself: the task slots, for a create's slots).
    pub fn shared<B>(request: &mut Request<B>) -> SendWatch {
        let call = CallContext::of_mut(request);
        call.send_watch
            .get_or_insert_with(SendWatch::default)
            .clone()
    }

    /// Puts a new watch in the request's signals unless it carries one: for a layer that
    /// reads the watch later from a copy of the signals it kept ([`ExtensionsCopy::send_watch`])
    /// rather than through a handle of its own.
    pub fn ensure<B>(request: &mut Request<B>) {
        CallContext::of_mut(request)
            .send_watch
            .get_or_insert_with(SendWatch::default);
    }

    /// A layer that held `request` passes it on toward the server.
    pub fn handed<B>(request: &Request<B>) {
        if let Some(watch) = SendWatch::of(request) {
            let _ = watch
                .0
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                    (state != MAYBE_MADE).then_some(HANDED)
                });
        }
    }

    /// An attempt of `request` ended and another may follow: it `may_have_made` a task (final:
    /// a later attempt held back is not known unsent), or surely made none (forgotten).
    pub fn answered<B>(request: &Request<B>, may_have_made: bool) {
        if let Some(watch) = SendWatch::of(request) {
            if may_have_made {
                watch.0.store(MAYBE_MADE, Ordering::Release);
            } else {
                let _ = watch
                    .0
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                        (state != MAYBE_MADE).then_some(UNREPORTED)
                    });
            }
        }
    }

    /// Whether the request is held back unsent now and no attempt of it may have made a task:
    /// a create dropped in that state surely made no task.
    pub fn never_sent(&self) -> bool {
        self.0.load(Ordering::Acquire) == HELD
    }

    /// Whether an attempt of the request may have made a task ([`SendWatch::answered`]): the
    /// watch is final, so a later attempt held back unsent can no longer say so in it.
    pub fn may_have_made(&self) -> bool {
        self.0.load(Ordering::Acquire) == MAYBE_MADE
    }
}

/// What counts the requests a stack sends toward Kling, each at the instant it was sent: a
/// metrics layer's rate window (kling-metrics' `Monitor`). Reached through a request's
/// [`SendCounter`].
pub trait CountSent: Send + Sync + 'static {
    /// A classify step took the counter out of a request it is about to send, and will count
    /// that request itself: from then on the layer that put the counter in may leave counting
    /// to the classify step.
    fn attached(&self);

    /// A request sent at `at` reached Kling, or may have: answered, failed after it may have
    /// left, or dropped in flight. Called once the classify step knows, with the instant it
    /// was sent (so up to one attempt's duration late).
    fn sent(&self, at: Instant);
}

impl<T: CountSent> CountSent for crate::lanes::Lane<T> {
    #[inline]
    fn attached(&self) {
        (**self).attached();
    }

    #[inline]
    fn sent(&self, at: Instant) {
        (**self).sent(at);
    }
}

/// Request signal: where the classify step ([`ClassifyLayer`](crate::ClassifyLayer)) counts
/// each request it passes to the client, at the instant it was sent. The classify step is the
/// innermost one that sees every attempt go to the wire — a retry layer's, an auth layer's own
/// resend — so a metrics layer above that puts its counter in ([`SendCounter::set`]) sees each
/// in its rate window at its own time, a call dropped in flight included, instead of counting
/// what a call's answer reports.
///
/// The classify step takes the counter out of the request it sends ([`CountSent::attached`])
/// and counts the request once ([`CountSent::sent`]): when its answer arrives, when it fails
/// unless the request surely never left ([`SendState::NotSent`](crate::SendState)), or when the
/// step's future is dropped after it was polled (a timeout, a caller that gave up). A future
/// never polled sent nothing. A layer that sends a copy of a request without its extensions
/// (an auth layer's resend) carries the counter over ([`SendCounter::of`], then `set`), or
/// that copy is not counted.
///
/// Kept in the request's combined signal extension, like the other signals: no allocation.
#[derive(Clone)]
pub struct SendCounter(Arc<dyn CountSent>);

impl fmt::Debug for SendCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendCounter").finish_non_exhaustive()
    }
}

impl SendCounter {
    /// A counter reporting to `counter`.
    pub fn new(counter: Arc<dyn CountSent>) -> SendCounter {
        SendCounter(counter)
    }

    /// Puts `counter` in the request's signals, in place of one a layer above put there.
    pub fn set<B>(request: &mut Request<B>, counter: SendCounter) {
        CallContext::of_mut(request).send_counter = Some(counter);
    }

    /// Puts the counter `counter` makes in the request's signals when it carries them already,
    /// in place of one a layer above put there; returns whether it did. A request without them
    /// is left as it is: putting the signals extension in costs a request allocations.
    #[inline]
    pub fn set_in_signals<B>(
        request: &mut Request<B>,
        counter: impl FnOnce() -> SendCounter,
    ) -> bool {
        match request.extensions_mut().get_mut::<CallContext>() {
            Some(call) => {
                call.send_counter = Some(counter());
                true
            }
            None => false,
        }
    }

    /// Puts `counter` in the request's signals and returns the request's [`SendWatch`] (one
    /// made and put there when it has none): what [`SendCounter::set`] and
    /// [`SendWatch::shared`] do, with one lookup of the signals instead of two (a metrics layer
    /// does both for every create).
    #[inline]
    pub fn set_with_watch<B>(request: &mut Request<B>, counter: SendCounter) -> SendWatch {
        let call = CallContext::of_mut(request);
        call.send_counter = Some(counter);
        call.send_watch
            .get_or_insert_with(SendWatch::default)
            .clone()
    }

    /// The counter a request carries, if a layer above put one there: for a layer that sends a
    /// copy of the request without its extensions, to [`set`](SendCounter::set) in the copy.
    pub fn of<B>(request: &Request<B>) -> Option<SendCounter> {
        CallContext::of(request).and_then(|call| call.send_counter.clone())
    }

    /// Takes the counter out of a request the classify step is about to send, telling it so
    /// ([`CountSent::attached`]); a second classify step below finds none, and so the request
    /// counts once.
    #[cfg(test)]
    pub(crate) fn take<B>(request: &mut Request<B>) -> Option<SendCounter> {
        SendCounter::take_unless_halted(request).unwrap_or(None)
    }

    /// What the classify step reads of a request it is about to send, with one lookup of the
    /// signals: `Err` with the refusal when its create's account was halted since its slots
    /// were granted ([`HaltGate`]; the counter is then left in, the request is not sent), else
    /// the counter taken out, telling it so ([`CountSent::attached`]): a second classify step
    /// below finds none, and so the request counts once.
    #[inline]
    pub(crate) fn take_unless_halted<B>(
        request: &mut Request<B>,
    ) -> Result<Option<SendCounter>, BoxError> {
        let extensions = request.extensions_mut();
        if extensions.is_empty() {
            return Ok(None);
        }
        let Some(call) = extensions.get_mut::<CallContext>() else {
            return Ok(None);
        };
        if let Some(refusal) = call.halt_gate.as_ref().and_then(HaltGate::refusal) {
            return Err(refusal);
        }
        let Some(counter) = call.send_counter.take() else {
            return Ok(None);
        };
        counter.0.attached();
        Ok(Some(counter))
    }

    /// Counts the request sent at `at`.
    #[inline]
    pub(crate) fn sent(&self, at: Instant) {
        self.0.sent(at);
    }
}

/// Which accounts' creates a task-slots layer refuses now (halted after a `1102`), for the
/// classify step to ask about a create granted before a halt ([`HaltGate`]).
pub trait HaltedAccounts: Send + Sync + 'static {
    /// The refusal of a create of `account` when its creates are halted now (an error whose
    /// source chain names [`RefusedBeforeSending`](crate::error::RefusedBeforeSending), so it
    /// reads as never sent), else `None`.
    fn refusal(&self, account: &AccountId) -> Option<BoxError>;
}

/// A task-slots layer's count of the halts it has applied (any account's), and where to ask
/// which accounts are halted ([`HaltedAccounts`]): what a [`HaltGate`] compares against.
pub struct CreateHalts {
    halts: AtomicU64,
    accounts: Box<dyn HaltedAccounts>,
}

impl fmt::Debug for CreateHalts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateHalts")
            .field("halts", &self.halts.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl CreateHalts {
    /// No halt yet; `accounts` says which accounts are halted.
    pub fn new(accounts: impl HaltedAccounts) -> CreateHalts {
        CreateHalts {
            halts: AtomicU64::new(0),
            accounts: Box::new(accounts),
        }
    }

    /// An account was halted: creates granted before now ask [`HaltedAccounts`] before they
    /// are sent. Call it once the halt is in place (after `accounts` refuses the account).
    pub fn halted(&self) {
        self.halts.fetch_add(1, Ordering::AcqRel);
    }

    /// How many halts there were: read before a create's slots are granted.
    pub fn stamp(&self) -> u64 {
        self.halts.load(Ordering::Acquire)
    }
}

/// Request signal: a create's slots were granted after `granted` halts of its task-slots layer
/// ([`CreateHalts`]); the classify step ([`ClassifyLayer`](crate::ClassifyLayer)) reads it
/// right before it sends the create, and when a halt came since (a `1102` answered another
/// create of the account while this one waited below the slots, in a rate limiter), and the
/// account is still halted, refuses the create there, unsent, with the layer's refusal
/// ([`HaltedAccounts::refusal`]). Creates granted after a halt was lifted pass.
///
/// One load of the halt count per create; the account is asked only after a halt. Kept in the
/// request's combined signal extension ([`HaltGate::set_with_watch`]), like the other signals:
/// no allocation.
#[derive(Clone)]
pub struct HaltGate {
    halts: Arc<Lane<Arc<CreateHalts>>>,
    granted: u64,
    account: AccountId,
}

impl fmt::Debug for HaltGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HaltGate")
            .field("granted", &self.granted)
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl HaltGate {
    /// A gate for a create of `account`, stamped now: make it before the create's slots are
    /// granted (a halt between the stamp and the grant refuses the grant itself).
    #[inline]
    pub fn new(halts: Arc<Lane<Arc<CreateHalts>>>, account: AccountId) -> HaltGate {
        let granted = halts.stamp();
        HaltGate {
            halts,
            granted,
            account,
        }
    }

    /// The refusal of the create when its account was halted since the gate was made and is
    /// halted still.
    #[inline]
    pub fn refusal(&self) -> Option<BoxError> {
        if self.halts.halts.load(Ordering::Acquire) == self.granted {
            return None;
        }
        self.halts.accounts.refusal(&self.account)
    }

    /// Puts `gate` in the request's signals (in place of one an earlier attempt left there):
    /// for a create that waits for its slots, whose gate then waits in its request rather
    /// than beside it (a waiter's bookkeeping stays small).
    #[inline]
    pub fn set<B>(request: &mut Request<B>, gate: HaltGate) {
        CallContext::of_mut(request).halt_gate = Some(gate);
    }

    /// Puts `gate` in the request's signals (in place of one an earlier attempt left there)
    /// and returns the request's [`SendWatch`] (one made and put there when it has none):
    /// [`SendWatch::shared`] and the gate with one lookup of the signals.
    #[inline]
    pub fn set_with_watch<B>(request: &mut Request<B>, gate: Option<HaltGate>) -> SendWatch {
        let call = CallContext::of_mut(request);
        if gate.is_some() {
            call.halt_gate = gate;
        }
        call.send_watch
            .get_or_insert_with(SendWatch::default)
            .clone()
    }

    /// The gate a request carries, if a task-slots layer put one there.
    pub fn of<B>(request: &Request<B>) -> Option<&HaltGate> {
        CallContext::of(request).and_then(|call| call.halt_gate.as_ref())
    }
}

/// Response extension: a task-slots layer saw this 1303, gave the slots back and lowered its
/// believed capacity; a retried create will wait in that layer until a slot frees, so the retry
/// layer may retry without its own backoff.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotGated;

/// Response extension: an auth layer below saw this 1003/1004 (token not yet valid, expired),
/// dropped the token the server refused and did not resend, so the next attempt carries a
/// freshly signed one. kling-retry's `KlingPolicy` retries such a response at once, at most once
/// per call and outside the attempt limit (as the auth layer's own resend was).
///
/// kling-tower's `AuthLayer::resend_on_refusal(false)` sets it; a 1003/1004 without it (no auth
/// layer, or one that already re-signed and resent) is final.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TokenDropped;

/// Response extension: how long the request waited inside a limiting layer before it was sent
/// (rate limiter and task slots add theirs up), for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Waited {
    /// Time spent waiting for the rate limiter.
    pub rate_limit: std::time::Duration,
    /// Time spent waiting for task slots.
    pub slots: std::time::Duration,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn request() -> Request<&'static str> {
        Request::post("/v1/videos/text2video")
            .body(r#"{"prompt":"a cat"}"#)
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn every_signal_shares_one_extension() {
        let mut req = request();
        let deadline = Instant::now() + Duration::from_secs(5);
        Deadline::set(&mut req, deadline);
        Attempt::set(&mut req, 2);
        AccountId::set_if_absent(&mut req, &AccountId::new("acct"));
        assert!(Recognized::of(&mut req).is_create());
        assert_eq!(req.extensions().len(), 1);
        assert_eq!(Deadline::of(&req), Some(deadline));
        assert_eq!(Attempt::of(&req), Some(2));
        assert_eq!(AccountId::of(&req).map(AccountId::as_str), Some("acct"));
        assert!(Recognized::cached(&req).is_some());
    }

    /// A create is known unsent only while it is held back and no attempt of it may have made
    /// a task: passed on, it is not; answered "made nothing", it may be held back again;
    /// answered "may have made one", never again.
    #[test]
    fn a_send_watch_knows_a_create_unsent_only_while_it_is_held_and_made_nothing() {
        let mut req = request();
        SendWatch::held(&req);
        let watch = SendWatch::watch(&mut req);
        assert!(!watch.never_sent(), "nothing reported yet");
        assert_eq!(req.extensions().len(), 1, "in the combined extension");
        SendWatch::held(&req);
        assert!(watch.never_sent());
        SendWatch::handed(&req);
        assert!(!watch.never_sent());
        // Held again by a layer further down (a rate limiter under the slots): still unsent.
        SendWatch::held(&req);
        assert!(watch.never_sent(), "held below the layer that handed it on");
        SendWatch::handed(&req);
        assert!(!watch.never_sent());
        // Its answer made nothing (a 1303): the next attempt held back is unsent.
        SendWatch::answered(&req, false);
        SendWatch::held(&req);
        assert!(watch.never_sent());
        // An attempt that may have made a task: final.
        SendWatch::handed(&req);
        SendWatch::answered(&req, true);
        SendWatch::answered(&req, false);
        SendWatch::held(&req);
        assert!(!watch.never_sent());
        SendWatch::handed(&req);
        assert!(!watch.never_sent());

        // A retry layer's copy of the request (its signals restored) shares the watch.
        let mut original = request();
        let watch = SendWatch::watch(&mut original);
        let signals = CallSignals::if_alone(original.extensions()).expect("alone");
        let mut copy = request();
        signals.restore(&mut copy);
        SendWatch::held(&copy);
        assert!(watch.never_sent(), "seen through the original's watch");
    }

    /// Counts what it is told.
    #[derive(Default)]
    struct Counted(std::sync::atomic::AtomicU32);

    impl CountSent for Counted {
        fn attached(&self) {}

        fn sent(&self, _at: Instant) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A counter is put in only a request that carries the signals already (a create's watch
    /// puts them in), rides in the one combined extension and in a retry layer's copy, is
    /// carried over by hand, and is taken once.
    #[test]
    fn a_send_counter_rides_in_the_signals_and_is_taken_once() {
        let counted = Arc::new(Counted::default());
        let counter = || SendCounter::new(counted.clone());

        let mut bare = request();
        assert!(!SendCounter::set_in_signals(&mut bare, counter));
        assert!(bare.extensions().is_empty(), "no extension put in");
        assert!(SendCounter::take(&mut bare).is_none());

        let mut create = request();
        let watch = SendCounter::set_with_watch(&mut create, counter());
        SendWatch::held(&create);
        assert!(watch.never_sent(), "the request's own watch");
        assert_eq!(create.extensions().len(), 1, "in the combined extension");
        assert!(SendCounter::set_in_signals(&mut create, counter));

        // A retry layer's copy, and a copy made by hand without the extensions.
        let signals = CallSignals::if_alone(create.extensions()).expect("alone");
        let mut retried = request();
        signals.restore(&mut retried);
        let mut resent = request();
        SendCounter::set(&mut resent, SendCounter::of(&create).expect("carried"));

        for mut sent in [create, retried, resent] {
            let taken = SendCounter::take(&mut sent).expect("a counter");
            taken.sent(Instant::now());
            assert!(SendCounter::take(&mut sent).is_none(), "taken once");
        }
        assert_eq!(counted.0.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn standalone_extensions_are_still_read() {
        let mut req = request();
        assert_eq!((Deadline::of(&req), Attempt::of(&req)), (None, None));
        let deadline = Instant::now() + Duration::from_secs(5);
        req.extensions_mut().insert(Deadline(deadline));
        req.extensions_mut().insert(Attempt(3));
        req.extensions_mut().insert(AccountId::new("routed"));
        assert_eq!(Deadline::of(&req), Some(deadline));
        assert_eq!(Attempt::of(&req), Some(3));
        // A caller's account wins over the stack's default.
        AccountId::set_if_absent(&mut req, &AccountId::new("default"));
        assert_eq!(AccountId::of(&req).map(AccountId::as_str), Some("routed"));
        // A layer's deadline and attempt win over the standalone ones.
        Deadline::set(&mut req, deadline - Duration::from_secs(1));
        Attempt::set(&mut req, 4);
        assert_eq!(Deadline::of(&req), Some(deadline - Duration::from_secs(1)));
        assert_eq!(Attempt::of(&req), Some(4));
    }

    #[tokio::test(start_paused = true)]
    async fn signals_alone_are_kept_without_the_map_and_restored_whole() {
        let mut req = request();
        assert!(CallSignals::if_alone(req.extensions()).is_some());
        Attempt::set(&mut req, 2);
        Deadline::set(&mut req, Instant::now());
        Recognized::of(&mut req);
        let kept = CallSignals::if_alone(req.extensions()).expect("only the signals");
        let mut again = Request::new(*req.body());
        kept.restore(&mut again);
        assert_eq!(Attempt::of(&again), Some(2));
        assert_eq!(Deadline::of(&again), Deadline::of(&req));
        assert!(Recognized::cached(&again).is_some());
        // Anything else in the map: the caller must copy the map.
        req.extensions_mut().insert(7_u8);
        assert!(CallSignals::if_alone(req.extensions()).is_none());
    }

    #[test]
    fn a_copy_shares_the_recognition_until_one_changes_it() {
        let mut req = request();
        Recognized::of(&mut req);
        let mut copy = Request::new(*req.body());
        *copy.uri_mut() = req.uri().clone();
        *copy.method_mut() = req.method().clone();
        *copy.extensions_mut() = req.extensions().clone();
        Recognized::of_mut(&mut copy).external_id = Some("mine".into());
        assert_eq!(
            Recognized::cached(&copy).unwrap().external_id.as_deref(),
            Some("mine")
        );
        assert_eq!(Recognized::cached(&req).unwrap().external_id, None);
    }

    /// One way a request's extensions can be: which fields the combined extension has (bit 0:
    /// present at all), which standalone signals a caller inserted, and whether anything else
    /// is in the map.
    fn shaped(shape: u16, now: Instant) -> Request<&'static str> {
        let mut req = request();
        let bit = |n: u16| shape & (1 << n) != 0;
        if bit(0) {
            let created = Recognized::from_request(&req);
            req.extensions_mut().insert(CallContext {
                account: bit(1).then(|| AccountId::new("layer")),
                recognized: bit(2).then(|| Arc::new(created)),
                deadline: bit(3).then(|| now + Duration::from_secs(1)),
                attempt: bit(4).then_some(2),
                send_watch: None,
                send_counter: None,
                halt_gate: None,
            });
        }
        if bit(5) {
            req.extensions_mut().insert(AccountId::new("caller"));
        }
        if bit(6) {
            // Told apart from the request's own recognition by its kind.
            let query = Recognized::from_parts(
                &http::Method::GET,
                &http::Uri::from_static("/v1/videos/text2video/t1"),
                b"",
            );
            req.extensions_mut().insert(query);
        }
        if bit(7) {
            req.extensions_mut()
                .insert(Deadline(now + Duration::from_secs(2)));
        }
        if bit(8) {
            req.extensions_mut().insert(Attempt(3));
        }
        if bit(9) {
            req.extensions_mut().insert(7_u8);
        }
        req
    }

    /// Every signal a request carries: deadline, attempt, account, recognition.
    type Reads = (
        Option<Instant>,
        Option<u32>,
        Option<String>,
        Option<Recognized>,
    );

    /// Every signal as read with two plain lookups, as the accessors did before they skipped
    /// the standalone lookup when nothing else is in the map.
    fn slow_reads(req: &Request<&'static str>) -> Reads {
        let call = req.extensions().get::<CallContext>();
        let extensions = req.extensions();
        (
            call.and_then(|c| c.deadline)
                .or_else(|| extensions.get::<Deadline>().map(|d| d.0)),
            call.and_then(|c| c.attempt)
                .or_else(|| extensions.get::<Attempt>().map(|a| a.0)),
            call.and_then(|c| c.account.as_ref())
                .or_else(|| extensions.get::<AccountId>())
                .map(|a| a.as_str().to_owned()),
            call.and_then(|c| c.recognized.as_deref())
                .or_else(|| extensions.get::<Recognized>())
                .cloned(),
        )
    }

    fn reads(req: &Request<&'static str>) -> Reads {
        (
            Deadline::of(req),
            Attempt::of(req),
            AccountId::of(req).map(|a| a.as_str().to_owned()),
            Recognized::cached(req).cloned(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn one_lookup_reads_agree_with_two_lookups_for_every_shape() {
        let now = Instant::now();
        for shape in 0..1 << 10 {
            let req = shaped(shape, now);
            assert_eq!(reads(&req), slow_reads(&req), "shape {shape:#b}");
            let (recognized, account) = Recognized::cached_with_account(&req);
            assert_eq!(recognized, Recognized::cached(&req), "shape {shape:#b}");
            assert_eq!(account, AccountId::of(&req), "shape {shape:#b}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn combined_writes_agree_with_the_single_ones_for_every_shape() {
        let now = Instant::now();
        let account = AccountId::new("stack");
        let later = now + Duration::from_secs(9);
        for shape in 0..1 << 10 {
            // The stack's entry: account and recognition together.
            let (mut one, mut two) = (shaped(shape, now), shaped(shape, now));
            let got = Recognized::of_with_account(&mut one, &account).clone();
            AccountId::set_if_absent(&mut two, &account);
            assert_eq!(got, *Recognized::of(&mut two), "shape {shape:#b}");
            assert_eq!(reads(&one), reads(&two), "shape {shape:#b}");
            assert_eq!(one.extensions().len(), two.extensions().len());

            // The retry layer's attempt, with and without a deadline.
            for deadline in [None, Some(later)] {
                let (mut one, mut two) = (shaped(shape, now), shaped(shape, now));
                Attempt::set_with_deadline(&mut one, 5, deadline);
                if let Some(deadline) = deadline {
                    Deadline::set(&mut two, deadline);
                }
                Attempt::set(&mut two, 5);
                assert_eq!(reads(&one), reads(&two), "shape {shape:#b}");
                assert_eq!(Attempt::of(&one), Some(5));
            }

            // The retry layer's first attempt: the deadline brought forward to its own limit.
            for limit in [None, Some(now), Some(later)] {
                let (mut one, mut two) = (shaped(shape, now), shaped(shape, now));
                let got = Attempt::begin(&mut one, 1, limit);
                let want = match (Deadline::of(&two), limit) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if let Some(deadline) = want {
                    Deadline::set(&mut two, deadline);
                }
                Attempt::set(&mut two, 1);
                assert_eq!(got, want, "shape {shape:#b} limit {limit:?}");
                assert_eq!(reads(&one), reads(&two), "shape {shape:#b} limit {limit:?}");
            }

            // A generated external id.
            let (mut one, mut two) = (shaped(shape, now), shaped(shape, now));
            Recognized::set_external_id(&mut one, Some("gen".into()));
            let written = Recognized::of_mut(&mut two);
            written.external_id = Some("gen".into());
            written.names_own_id = true;
            assert_eq!(reads(&one), reads(&two), "shape {shape:#b}");
            assert_eq!(
                Recognized::cached(&one).unwrap().external_id.as_deref(),
                Some("gen"),
                "shape {shape:#b}"
            );
        }
    }

    #[test]
    fn an_external_id_set_on_a_copy_leaves_the_original_alone() {
        let mut req = request();
        Recognized::of(&mut req);
        let mut copy = Request::new(*req.body());
        *copy.extensions_mut() = req.extensions().clone();
        Recognized::set_external_id(&mut copy, Some("mine".into()));
        assert_eq!(
            Recognized::cached(&copy).unwrap().external_id.as_deref(),
            Some("mine")
        );
        assert_eq!(Recognized::cached(&req).unwrap().external_id, None);
    }
}
