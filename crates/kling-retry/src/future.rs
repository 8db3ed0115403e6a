//! The [`Retry`](crate::Retry) response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use kling_core::error::{ApiError, BodyTooLarge, BoxError, MalformedResponse};
use kling_core::metrics::{LABEL_KIND, LABEL_REASON, RETRIES, RETRY_BUDGET_EXHAUSTED};
use kling_core::signals::{Attempt, SendWatch};
use kling_core::{ApiGeneration, Code, Disposition, Outcome, PeekBody, Recognized, RequestKind};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::timeout::error::Elapsed;
use tower_service::Service;

use crate::backoff::{DelayKind, TIMER_GRAIN};
use crate::body::ReplayBody;
use crate::error::{DeadlineExceeded, Failed, Last, StopReason, Tally};
use crate::layer::Shared;
use crate::lookup::{self, Lookup, Recovered, Spliced};
use crate::policy::{Attempted, CreateState, Policy, Verdict};
use crate::service::Handle;
use crate::service::clone_request;
use crate::template::Template;
use kling_core::lanes::Lane;

/// The response future of [`Retry`](crate::Retry): sends attempts, waits between them, and
/// looks creates up by external id.
///
/// The attempt in flight, the request kept to send again and the call's state share one
/// allocation (the one the copy of the request needs anyway): the inner future is copied there
/// from the inner service's `call` and stays put, and this future, which every layer above
/// moves, is one pointer.
pub struct ResponseFuture<S, B, P>
where
    S: Service<Request<B>>,
{
    inner: Pin<Box<Inner<S, B, P>>>,
}

pin_project! {
    struct Inner<S, B, P>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future>,
        call: Call<S, B, P>,
    }
    impl<S, B, P> PinnedDrop for Inner<S, B, P>
    where
        S: Service<Request<B>>,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.call.give_back_unsent();
            let resending = match this.state.as_ref().get_ref() {
                State::Done => return,
                State::Calling { .. } => this.call.sending == Sending::Original,
                State::Sleeping | State::Readying => false,
            };
            this.call.warn_if_dropped_unresolved(resending);
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Calling { #[pin] future: F },
        Sleeping,
        Readying,
        Done,
    }
}

/// What an attempt sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sending {
    /// The caller's request.
    Original,
    /// A lookup of the create by its external id.
    Lookup,
}

/// Everything a call carries between attempts (not pinned).
struct Call<S, B, P> {
    /// The configuration and the spare service retries clone.
    handle: Arc<Lane<Handle<S, P>>>,
    /// The request to send again, the call's start and its deadline.
    template: Template<B>,
    attempts: u32,
    /// What the attempt in flight sent.
    sending: Sending,
    /// Whether a refused token (1003/1004) was already retried: at most once per call.
    resigned: bool,
    /// Made at the first retry. Boxed: the success path needs none of it, and every layer above
    /// moves this future.
    retry: Option<Box<Retrying<S, B>>>,
}

/// A lookup of a create by its external id, queued or in flight: while there is one, the
/// create's fate is unresolved.
struct Pending<B> {
    request: Request<B>,
    external_id: String,
    /// The new-style batch query (`GET /tasks?external_task_ids=…`), not a legacy one.
    new_style: bool,
    /// Set when the lookup checks a final refusal of a re-sent create (say `1201` "duplicate
    /// external task id"): what the call returns if the lookup finds no task.
    final_answer: Option<ApiError>,
    /// Why the call ends with [`final_answer`](Self::final_answer) if the lookup finds no task:
    /// [`StopReason::NotRetryable`] (the refusal stands, it made nothing), unless the refusal
    /// may be the server's answer to the duplicate external id of a task an earlier attempt of
    /// the call may have made: then a "not found" does not rule that task out (the server may
    /// not find it by its id yet), and the create stays unresolved
    /// ([`StopReason::CreateUnresolved`]).
    if_not_found: StopReason,
    /// Why the call ends if the lookup cannot be sent (the attempt limit, the budget, the
    /// deadline) or settle the create: [`StopReason::CreateUnresolved`] unless it checks a
    /// first answer that made nothing for sure unless the task existed before (a `1201`:
    /// [`StopReason::NotRetryable`], the refusal stands).
    if_unsent: StopReason,
    /// Whether this lookup went out already. Its first sending draws nothing from the retry
    /// budget: it resends nothing, and a create left unresolved because a bad hour spent the
    /// budget is what the budget exists to prevent. One per open create (each resend of the
    /// create that opens another drew from the budget), so it stays bounded; a lookup sent
    /// again (after a `1302` on it, say) draws like any retry. A lookup whose connection was
    /// never made did not go out: this is unset again, and its next try is still the free one.
    sent: bool,
}

/// Whether a request may make a task, and how to look it up if so.
enum Plan<B> {
    /// Not a create: safe to send again.
    Repeatable,
    /// A create (or an unrecognised non-idempotent request that may be one) that cannot be
    /// looked up; the external id, if it has one.
    Unlookable(Option<String>),
    /// A create with an external id, and its lookup (boxed: it holds a whole request).
    Lookup(Box<Pending<B>>),
}

/// What a call keeps once it retries.
struct Retrying<S, B> {
    /// The service retries go through (a clone of the spare), made at the first retry.
    service: Option<S>,
    /// While a create's outcome is unknown: the lookup.
    lookup: Option<Pending<B>>,
    /// The create's external id, once an attempt of it may have made a task: named in every
    /// error the call ends with from then on.
    external_id: Option<String>,
    /// What the next attempt sends.
    next: Sending,
    waited: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    sleep_from: Instant,
    /// Armed while a retry or a lookup is out and the call has a deadline: an attempt still
    /// unanswered at the deadline is given up (the first attempt is left to a timeout below,
    /// so an answered call arms no timer).
    deadline_sleep: Option<Pin<Box<Sleep>>>,
    last: Option<Last>,
    /// The budget bucket of a retry withdrawn and not sent yet: given back if it never is
    /// (the call dropped during the backoff, or ended by the deadline before sending it).
    withdrawn: Option<u32>,
    /// The `reason` label of a retry scheduled and not sent yet: [`RETRIES`] counts it when it
    /// is handed to the service below, and never if the call ends first (dropped during the
    /// backoff, or ended by the deadline before sending it).
    unsent_reason: Option<&'static str>,
    /// Slot-gated retries so far: outside the attempt limit (see `attempt_limit`).
    slot_gated: u32,
    /// Throttled retries (`1302`, a 429 page) so far of a call with a deadline: outside the
    /// attempt limit too (see `attempt_limit`).
    throttled: u32,
}

impl<S, B> Retrying<S, B> {
    /// Notes the reason of the retry just scheduled, to count it once it is sent.
    fn schedule_count(&mut self, reason: &'static str) {
        let unsent = self.unsent_reason.replace(reason);
        debug_assert!(
            unsent.is_none(),
            "a retry is sent before the next is scheduled"
        );
    }

    fn new(now: Instant) -> Self {
        Retrying {
            service: None,
            lookup: None,
            external_id: None,
            next: Sending::Original,
            slot_gated: 0,
            throttled: 0,
            waited: Duration::ZERO,
            sleep: None,
            sleep_from: now,
            deadline_sleep: None,
            last: None,
            withdrawn: None,
            unsent_reason: None,
        }
    }
}

/// What to do after an attempt that did not answer the call (see [`Call::after_response`]).
enum Step {
    /// The call ends with this error.
    Fail(BoxError),
    Sleep,
    Send,
}

impl<S, B, P> ResponseFuture<S, B, P>
where
    S: Service<Request<B>>,
{
    /// The allocation of a call, holding `request`'s copy (written in place, not built aside
    /// and copied in) and no attempt yet: [`send`](Self::send) adds it. Two steps, so
    /// `Retry::call` sends its own `request` (moving it into a function would copy it).
    #[inline(always)]
    pub(crate) fn prepare(
        handle: Arc<Lane<Handle<S, P>>>,
        request: &Request<B>,
        started: Instant,
        deadline: Option<Instant>,
        spliced: Option<(B, Spliced)>,
    ) -> Prepared<S, B, P>
    where
        B: ReplayBody,
    {
        let mut boxed = Box::write(
            Box::new_uninit(),
            Inner {
                call: Call {
                    handle,
                    template: Template::new(request, started, deadline, spliced),
                    attempts: 1,
                    sending: Sending::Original,
                    resigned: false,
                    retry: None,
                },
                // Last: listed first, the state (as large as the attempt's future, not there
                // yet) was built aside and copied in through a second temporary, every call.
                state: State::Done,
            },
        );
        boxed.call.template.copy_in_place(request);
        Prepared(boxed)
    }

    /// The future of the call `prepared` holds, its first attempt `future`.
    #[inline(always)]
    pub(crate) fn send(prepared: Prepared<S, B, P>, future: S::Future) -> Self {
        let Prepared(mut boxed) = prepared;
        boxed.state = State::Calling { future };
        ResponseFuture {
            inner: Box::into_pin(boxed),
        }
    }
}

/// A call's allocation before its first attempt is sent: see [`ResponseFuture::prepare`].
pub(crate) struct Prepared<S, B, P>(Box<Inner<S, B, P>>)
where
    S: Service<Request<B>>;

impl<S, B, P> fmt::Debug for ResponseFuture<S, B, P>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("attempts", &self.inner.call.attempts)
            .field("waited", &self.inner.call.waited())
            .field("deadline", &self.inner.call.template.deadline)
            .field("looking_up", &self.inner.call.looking_up())
            .finish_non_exhaustive()
    }
}

impl<S, B, P> Future for ResponseFuture<S, B, P>
where
    S: Service<Request<B>, Response = Response<Full<Bytes>>> + Clone,
    S::Error: Into<BoxError>,
    B: ReplayBody,
    P: Policy,
{
    type Output = Result<Response<Full<Bytes>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.get_mut().inner.as_mut().project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { future } => {
                    let step = match future.poll(cx) {
                        // Judged in place and handed up with one move: nearly every call
                        // ends here, with its first answer.
                        Poll::Ready(Ok(mut response)) => {
                            match this.call.after_response(&mut response) {
                                None => {
                                    // A call that took more than one request says how many on
                                    // its answer: a metrics layer above counts every request
                                    // sent against the account's rate, not one per call.
                                    if this.call.attempts > 1 {
                                        response
                                            .extensions_mut()
                                            .insert(Attempt(this.call.attempts));
                                    }
                                    this.state.set(State::Done);
                                    return Poll::Ready(Ok(response));
                                }
                                Some(step) => step,
                            }
                        }
                        Poll::Ready(Err(error)) => this.call.after_error(error.into()),
                        // A retry or lookup still out at the call's deadline is given up as a
                        // timed-out attempt (it may have made a task): the next step finds the
                        // deadline passed and ends the call with what is known.
                        Poll::Pending if this.call.past_deadline_in_flight(cx) => {
                            this.call.after_error(Box::new(Elapsed::new()))
                        }
                        Poll::Pending => return Poll::Pending,
                    };
                    match step {
                        Step::Fail(error) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error));
                        }
                        Step::Sleep => this.state.set(State::Sleeping),
                        Step::Send => this.state.set(State::Readying),
                    }
                }
                StateProj::Sleeping => {
                    if let Some(retry) = this.call.retry.as_deref_mut() {
                        if let Some(sleep) = retry.sleep.as_mut() {
                            ready!(sleep.as_mut().poll(cx));
                        }
                        let now = Instant::now();
                        retry.waited += now.saturating_duration_since(retry.sleep_from);
                    }
                    this.state.set(State::Readying);
                }
                StateProj::Readying => {
                    let ready = match this.call.service().poll_ready(cx) {
                        Poll::Ready(ready) => ready,
                        // A service below that is still not ready at the deadline does not
                        // hold the call past it: it ends there, as a retry about to start
                        // after the deadline does, naming what is known.
                        Poll::Pending if this.call.past_deadline_in_flight(cx) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(this.call.not_ready_by_deadline()));
                        }
                        Poll::Pending => return Poll::Pending,
                    };
                    if let Err(error) = ready {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(this.call.pass_through(error.into())));
                    }
                    // Ready only at the deadline (or woken past it: timers fire on whole
                    // milliseconds): a request sent now would be given up at once as out at
                    // the deadline, so it is not sent.
                    if this.call.deadline_reached() {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(this.call.not_ready_by_deadline()));
                    }
                    let request = this.call.next_request();
                    let future = this.call.service().call(request);
                    this.state.set(State::Calling { future });
                }
                StateProj::Done => panic!("kling-retry ResponseFuture polled after completion"),
            }
        }
    }
}

/// Whether a request the router reads as no create may still have made a task: a
/// non-idempotent one (a `POST`) on an endpoint it does not know, which may be a create
/// endpoint newer than this crate (a new-style product, or a legacy endpoint under
/// `/v1/videos` or `/v1/images`, grouped as `avatar/image2video` is: the router knows its
/// generation, not what it does). One the router knows as Kling's and no create
/// ([`Recognized::answers_at_once`]: the router keeps the one list of them) made none, when
/// its path is written plainly.
fn unknown_post<B>(recognized: &Recognized, request: &Request<B>) -> bool {
    recognized.kind == RequestKind::Other
        && !request.method().is_idempotent()
        && !(recognized.answers_at_once && kling_core::Route::written_plainly(request.uri().path()))
}

/// Whether a final refusal with `code` may be how the server answers a create whose external id
/// it has seen (`1200`/`1201`: what Kling answers a duplicate `external_task_id` with is
/// unconfirmed, and kling-mock answers `1201`).
fn may_answer_a_duplicate(code: Code) -> bool {
    matches!(code, Code::InvalidRequest | Code::InvalidParameter)
}

/// Far enough ahead to never arrive, near enough to never overflow.
fn far_future(now: Instant) -> Instant {
    now + Duration::from_secs(86_400 * 365 * 30)
}

impl<S, B, P> Call<S, B, P> {
    fn shared(&self) -> &Shared<P> {
        &self.handle.shared
    }

    fn waited(&self) -> Duration {
        self.retry
            .as_ref()
            .map_or(Duration::ZERO, |retry| retry.waited)
    }

    fn looking_up(&self) -> Option<&str> {
        let retry = self.retry.as_deref()?;
        retry
            .lookup
            .as_ref()
            .map(|pending| pending.external_id.as_str())
    }

    /// Warns, naming the create's external id, when the caller drops the call while its create
    /// may have made a task that no answer or lookup has confirmed: a lookup is queued or out
    /// (dropped during a retry's backoff or the lookup), or the create is out again
    /// (`resending`) after an earlier attempt may have made one. The task may run and be
    /// billed, and the id (perhaps one the layer generated, which the caller never saw) is the
    /// only way to find it. (The task slots below keep its slot for the lease.) A create out
    /// with an id this layer generated is warned of whichever attempt it is, the first
    /// included: the caller never saw that id. A first attempt dropped in flight with the
    /// caller's own id (or none) is the caller's to account for, as without this layer.
    #[cold]
    fn warn_if_dropped_unresolved(&self, resending: bool) {
        let retry = self.retry.as_deref();
        if !resending && retry.is_none_or(|retry| retry.lookup.is_none()) {
            return;
        }
        // A layer below that still holds the attempt back unsent says it made nothing.
        let unsent = self
            .template
            .send_watch()
            .is_some_and(SendWatch::never_sent);
        let external_id = retry
            .and_then(|retry| retry.external_id.clone())
            .or_else(|| {
                (resending && !unsent)
                    .then(|| self.template.generated_external_id())
                    .flatten()
            });
        if let Some(external_id) = external_id {
            tracing::warn!(
                external_id = external_id.as_str(),
                attempts = self.attempts,
                "call dropped before its create's outcome was known: it may have made a task; \
                 look it up by its external id"
            );
        }
    }

    /// The create's external id, once an attempt of it may have made a task.
    fn created_as(&self) -> Option<String> {
        self.retry.as_deref()?.external_id.clone()
    }

    /// Whether the call's deadline has come (a retry is about to be sent: never on the success
    /// path).
    fn deadline_reached(&self) -> bool {
        self.template
            .deadline
            .is_some_and(|deadline| Instant::now() >= deadline)
    }

    /// Whether a retry or lookup in flight has met the call's deadline; arms the deadline's
    /// timer the first time it is asked (on retries only: a call answered at its first attempt
    /// never asks).
    fn past_deadline_in_flight(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(deadline) = self.template.deadline else {
            return false;
        };
        let Some(retry) = self.retry.as_deref_mut() else {
            return false;
        };
        if Instant::now() >= deadline {
            return true;
        }
        retry
            .deadline_sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)))
            .as_mut()
            .poll(cx)
            .is_ready()
    }

    /// Whether the next attempt is the first sending of a create's lookup, which draws nothing
    /// from the retry budget (see [`Pending::sent`]).
    fn unsent_lookup_next(&self) -> bool {
        self.retry.as_deref().is_some_and(|retry| {
            retry.next == Sending::Lookup
                && retry.lookup.as_ref().is_some_and(|pending| !pending.sent)
        })
    }

    /// Takes the next retry from the budget, keeping its bucket to give it back should the
    /// retry never be sent; `false` when the budget is spent.
    fn withdraw(&mut self) -> bool {
        let Some(epoch) = self.shared().budget.withdraw() else {
            return false;
        };
        let unsent = self.retrying().withdrawn.replace(epoch);
        debug_assert!(
            unsent.is_none(),
            "a retry is sent before the next is withdrawn"
        );
        true
    }

    /// Gives back the budget of a retry withdrawn and never sent (see [`Retrying::withdrawn`]).
    fn give_back_unsent(&mut self) {
        let Some(epoch) = self
            .retry
            .as_deref_mut()
            .and_then(|retry| retry.withdrawn.take())
        else {
            return;
        };
        self.shared().budget.refund(epoch);
    }

    /// The retry state, made at the first retry.
    fn retrying(&mut self) -> &mut Retrying<S, B> {
        let started = self.template.started;
        self.retry
            .get_or_insert_with(|| Box::new(Retrying::new(started)))
    }
}

impl<S: Clone, B, P> Call<S, B, P> {
    /// The service a retry goes through.
    fn service(&mut self) -> &mut S {
        let handle = &self.handle;
        let retry = self
            .retry
            .get_or_insert_with(|| Box::new(Retrying::new(self.template.started)));
        retry.service.get_or_insert_with(|| handle.service())
    }
}

impl<S, B, P> Call<S, B, P>
where
    B: ReplayBody,
    P: Policy,
{
    /// What an attempt's response comes to: `None` when it is the call's answer (a success, or
    /// a lookup's task with [`Recovered`] added), else the next step. Read in place, so the
    /// caller moves the answer once, into its return value.
    fn after_response(&mut self, response: &mut Response<Full<Bytes>>) -> Option<Step> {
        // One extension lookup when the classify step below attached the outcome (the stack's
        // case); parsed here otherwise.
        let outcome = match Outcome::of(response) {
            Some(outcome) => outcome,
            None => {
                if let Err(malformed) = Outcome::ensure(response) {
                    return Some(self.after_error(Box::new(malformed)));
                }
                let Some(outcome) = Outcome::of(response) else {
                    unreachable!("the outcome was attached above")
                };
                outcome
            }
        };
        if self.sending == Sending::Lookup {
            let read = match self.retry.as_deref().and_then(|r| r.lookup.as_ref()) {
                Some(pending) => lookup::read(
                    &response.body().peek_bytes(),
                    outcome,
                    &pending.external_id,
                    pending.new_style,
                ),
                None => Lookup::Inconclusive,
            };
            match read {
                Lookup::Found(task_id) => {
                    let external_id = self
                        .retry
                        .as_mut()
                        .and_then(|retry| retry.lookup.take())
                        .map(|pending| pending.external_id)
                        .unwrap_or_default();
                    response.extensions_mut().insert(Recovered {
                        external_id,
                        task_id,
                    });
                    return None;
                }
                Lookup::NotFound => {
                    let pending = self.retry.as_mut().and_then(|retry| retry.lookup.take());
                    if let Some(pending) = pending
                        && let Some(answer) = pending.final_answer
                    {
                        // The refusal stands (no task was made), or, when it may be the answer
                        // to a duplicate id of an earlier attempt's task, the create stays
                        // unresolved: see `Pending::if_not_found`.
                        return Some(self.fail(pending.if_not_found, Last::Api(answer)));
                    }
                    return Some(self.resend_after_lookup());
                }
                Lookup::Inconclusive => {}
            }
        }
        let step = match self
            .shared()
            .policy
            .judge(Attempted::Response(response, outcome))
        {
            Verdict::Return if self.sending == Sending::Lookup => {
                // The lookup answered for good without settling the create (refused, or a
                // success naming no task this layer can read): its fate stays open. A success
                // is not an error to report, so the create's own last failure is.
                let last = if outcome.is_success() {
                    self.retry
                        .as_mut()
                        .and_then(|retry| retry.last.take())
                        .unwrap_or_else(|| {
                            Last::Error("the lookup by external id named no task".into())
                        })
                } else {
                    Last::Api(ApiError::from_outcome(outcome))
                };
                self.fail(StopReason::CreateUnresolved, last)
            }
            Verdict::Return if outcome.is_success() => return None,
            Verdict::Return => self.refused(ApiError::from_outcome(outcome)),
            Verdict::Retry { delay, create } => {
                let resign = outcome.disposition() == Disposition::Resign;
                if resign {
                    if self.resigned {
                        return Some(self.refused(ApiError::from_outcome(outcome)));
                    }
                    self.resigned = true;
                }
                let last = Last::Api(ApiError::from_outcome(outcome));
                let hint = outcome.retry_after().map(|h| (outcome.received_at(), h));
                self.schedule(delay, create, hint, last, resign)
            }
        };
        Some(step)
    }

    /// Whether `error` is a create's answer of 2xx whose body could not be read (not JSON, a
    /// task field of an odd type, over the body limit).
    fn unreadable_success(&mut self, error: &BoxError) -> bool {
        let status = error
            .downcast_ref::<MalformedResponse>()
            .map(MalformedResponse::status)
            .or_else(|| {
                error
                    .downcast_ref::<BodyTooLarge>()
                    .map(BodyTooLarge::status)
            });
        status.is_some_and(|status| status.is_success())
            && Recognized::cached(self.template.request()).is_some_and(Recognized::is_create)
    }

    /// The attempt limit, plus the one retry of a refused token (outside the limit, as the
    /// auth layer's own resend was), the slot-gated retries (a `1303` the task-slots layer
    /// below holds until one of this account's tasks ends is waiting, not hammering the API,
    /// and on an account whose slot count is set too high it may meet several in a row; the
    /// deadline bounds those) and, in a call with a deadline, the throttled retries: a `1302`
    /// refused the request before any work because the account as a whole went too fast, so
    /// which call it lands on is the luck of the draw among the account's requests (behind a
    /// task-slots layer, a refused create also gives its slot to the next create waiting and
    /// queues again, its attempts hours apart); the backoff, the budget and the deadline bound
    /// those.
    fn attempt_limit(&self) -> u32 {
        let (gated, throttled) = self
            .retry
            .as_deref()
            .map_or((0, 0), |retry| (retry.slot_gated, retry.throttled));
        self.shared()
            .max_attempts
            .saturating_add(u32::from(self.resigned))
            .saturating_add(gated)
            .saturating_add(throttled)
    }

    fn after_error(&mut self, error: BoxError) -> Step {
        match self.shared().policy.judge(Attempted::Error(&error)) {
            Verdict::Return
                if self.sending == Sending::Original && self.unreadable_success(&error) =>
            {
                // The server took the create (a 2xx) in an answer nobody can read: its task
                // is there, and the caller needs the id to find it (one this layer wrote
                // in leaves it by no other way). Not sent again, not looked up: a lookup that
                // ran before the server recorded the task would say to send it twice.
                let id = Recognized::cached(self.template.request())
                    .and_then(|recognized| recognized.external_id.clone());
                let failed = Failed::new(
                    StopReason::CreateMayHaveHappened,
                    self.tally(),
                    Last::Error(error),
                )
                .with_external_id(id);
                Step::Fail(Box::new(failed))
            }
            Verdict::Return
                if self.sending == Sending::Original && self.create_fate_unknown(&error) =>
            {
                // An error the policy does not retry, yet one the create may have reached the
                // server with (no marker says it never left): passed up bare, or as a
                // `NotRetryable` naming no id, it hid a task that may exist, and with it the
                // id (perhaps one this layer generated) to find it by. Not sent again, not
                // looked up: the policy judged the error final.
                let id = Recognized::cached(self.template.request())
                    .and_then(|recognized| recognized.external_id.clone());
                let reason = if id.is_some() {
                    StopReason::CreateUnresolved
                } else {
                    StopReason::CreateMayHaveHappened
                };
                self.retrying().external_id = id;
                self.fail(reason, Last::Error(error))
            }
            Verdict::Return => Step::Fail(self.pass_through(error)),
            Verdict::Retry { delay, create } => {
                // A lookup that never left was not the create's one free lookup: its next try
                // still draws nothing from the budget (it puts no load on the API, and a spent
                // budget must not leave unresolved a create the lookup would settle).
                if self.sending == Sending::Lookup
                    && kling_core::SendState::of(&*error) == kling_core::SendState::NotSent
                    && let Some(pending) = self
                        .retry
                        .as_deref_mut()
                        .and_then(|retry| retry.lookup.as_mut())
                {
                    pending.sent = false;
                }
                // A response without a Kling envelope (a proxy's page, read or too long to
                // read) may still say when to come back: its `Retry-After` is honoured like
                // Kling's own.
                let hint = if let Some(malformed) = error.downcast_ref::<MalformedResponse>() {
                    malformed.received_at().zip(malformed.retry_after())
                } else if let Some(large) = error.downcast_ref::<BodyTooLarge>() {
                    large.received_at().zip(large.retry_after())
                } else {
                    None
                };
                self.schedule(delay, create, hint, Last::Error(error), false)
            }
        }
    }

    /// Whether a create's attempt (or a `POST` the router does not know: [`may_create`](Self::may_create))
    /// ended in `error` that may have left it made, as
    /// [`kling_core::error::may_have_created`] reads it: no marker says the request never left,
    /// and it is no refusal that made nothing (a documented Kling refusal, or a proxy's 4xx page
    /// such as a 413). Only where the caller could not tell by itself: after a retry (the layer
    /// sent the create again), or for a create given a generated id (the caller never saw it);
    /// a first attempt's error otherwise passes through unchanged, as without this layer.
    fn create_fate_unknown(&mut self, error: &BoxError) -> bool {
        (self.retry.is_some() || self.template.generated_id())
            && kling_core::error::may_have_created(&**error)
            && self.may_create()
    }

    /// Whether the caller's request may make a task: a recognised create, or a `POST` on a
    /// path the router does not know ([`unknown_post`], as [`plan`](Self::plan) reads it).
    fn may_create(&mut self) -> bool {
        let template = self.template.request();
        Recognized::of(template);
        Recognized::cached(template)
            .is_some_and(|recognized| recognized.is_create() || unknown_post(recognized, template))
    }

    fn tally(&self) -> Tally {
        Tally {
            attempts: self.attempts,
            elapsed: Instant::now().saturating_duration_since(self.template.started),
            waited: self.waited(),
        }
    }

    /// Whether a create may have made a task that no lookup has settled yet (a lookup is
    /// queued or in flight).
    fn unresolved(&self) -> bool {
        let pending = self
            .retry
            .as_deref()
            .and_then(|retry| retry.lookup.as_ref());
        pending.is_some_and(|pending| pending.if_unsent != StopReason::NotRetryable)
    }

    /// Stops the call. While the create's fate is unresolved, whatever stopped it, the reason
    /// is [`StopReason::CreateUnresolved`]: the caller must look the create up, not send it again.
    /// A refusal whose lookup could not settle it stands (see [`Call::standing_refusal`]): it
    /// is what the call ends with, not the lookup's own failure.
    fn fail(&mut self, reason: StopReason, last: Last) -> Step {
        self.fail_with(reason, last, None)
    }

    /// [`fail`](Self::fail), with the `Retry-After` asked for and the longest this layer waits
    /// when the call stops as [`StopReason::RetryAfterTooLong`].
    fn fail_with(
        &mut self,
        reason: StopReason,
        last: Last,
        too_long: Option<(Duration, Duration)>,
    ) -> Step {
        let pending = self
            .retry
            .as_deref()
            .and_then(|retry| retry.lookup.as_ref());
        let reason = match pending {
            Some(pending) if reason != StopReason::CreateMayHaveHappened => pending.if_unsent,
            _ => reason,
        };
        let last = match self.standing_refusal() {
            Some(answer) => Last::Api(answer),
            None => last,
        };
        let too_long = too_long.filter(|_| reason == StopReason::RetryAfterTooLong);
        let failed = Failed::new(reason, self.tally(), last)
            .with_external_id(self.created_as())
            .with_too_long(too_long);
        Step::Fail(Box::new(failed))
    }

    /// The final refusal a pending lookup was to check, when it stands should the lookup not
    /// settle it (a first create's `1200`/`1201`: it made nothing unless a task existed before,
    /// [`Pending::if_unsent`] is [`StopReason::NotRetryable`]).
    fn standing_refusal(&self) -> Option<ApiError> {
        let pending = self.retry.as_deref()?.lookup.as_ref()?;
        if pending.if_unsent != StopReason::NotRetryable {
            return None;
        }
        pending.final_answer.clone()
    }

    /// Stops the call because the next attempt would start at `at`, after `deadline`. A
    /// refusal that stands ends the call as [`StopReason::NotRetryable`] instead: the next
    /// attempt was only a lookup, and the refused request is not to be sent again later.
    fn past_deadline(&mut self, at: Instant, deadline: Instant, now: Instant, last: Last) -> Step {
        self.past_deadline_asked(at, deadline, now, last, None)
    }

    /// [`past_deadline`](Self::past_deadline), where the server's `Retry-After` asked for the
    /// wait (`asked`): the error names it beside the time left.
    fn past_deadline_asked(
        &mut self,
        at: Instant,
        deadline: Instant,
        now: Instant,
        last: Last,
        asked: Option<Duration>,
    ) -> Step {
        if self.standing_refusal().is_some() {
            return self.fail(StopReason::NotRetryable, last);
        }
        let error = DeadlineExceeded::new(
            (at, deadline, now),
            self.tally(),
            last,
            self.created_as(),
            self.unresolved(),
        )
        .with_asked(asked);
        Step::Fail(Box::new(error))
    }

    /// Ends a call whose next attempt the service below was still not ready to take before the
    /// deadline: [`DeadlineExceeded`], with the last attempt's failure and, for a create that may
    /// have made a task, its external id.
    fn not_ready_by_deadline(&mut self) -> BoxError {
        let now = Instant::now();
        let deadline = self.template.deadline.unwrap_or(now);
        let last = self
            .retry
            .as_deref_mut()
            .and_then(|retry| retry.last.take())
            .unwrap_or_else(|| Last::Error("the service below was not ready".into()));
        match self.past_deadline(now, deadline, now, last) {
            Step::Fail(error) => error,
            Step::Sleep | Step::Send => unreachable!("`past_deadline` finishes the call"),
        }
    }

    /// An error from below that this layer does not retry: passed through unchanged when it
    /// ends the call's only request. After a retry it is the last failure of a [`Failed`]
    /// that counts the requests sent and names the create's external id (a lookup found
    /// nothing, so the create goes again only with that id); while a create's fate is
    /// unresolved (it failed a lookup, or the service below refused to take one), the reason is
    /// [`StopReason::CreateUnresolved`].
    fn pass_through(&mut self, error: BoxError) -> BoxError {
        if self.retry.is_none() {
            return error;
        }
        match self.fail(StopReason::NotRetryable, Last::Error(error)) {
            Step::Fail(error) => error,
            Step::Sleep | Step::Send => unreachable!("`fail` finishes the call"),
        }
    }

    /// A final refusal (a code the policy does not retry, or a second refused token). An
    /// answer to the caller's request is returned as [`StopReason::NotRetryable`], except when
    /// the create may exist already: an earlier attempt of this create may have made a task,
    /// and the refusal of the re-sent create may be because of it (`1201` "duplicate external
    /// task id" when the first create landed after all); or a first attempt is refused as a bad
    /// request (`1200`/`1201`: how Kling answers a duplicate external id is unconfirmed, and a
    /// caller sending again a create whose earlier call ended unresolved meets just that). The
    /// create is looked up by its external id first (a create without one is returned as is).
    fn refused(&mut self, answer: ApiError) -> Step {
        let may_have_created = self
            .retry
            .as_deref()
            .is_some_and(|retry| retry.external_id.is_some());
        // (An id this layer generated for the call is fresh: no earlier call used it.)
        let maybe_duplicate =
            may_answer_a_duplicate(answer.code()) && !self.template.generated_id();
        // A final answer that may still have made a task (a code Kling does not document,
        // under HTTP 200): looked up too, and without an id reported as a create that may have
        // happened, as the task slots and a spend guard read it.
        if self.sending == Sending::Original
            && (may_have_created || maybe_duplicate || answer.may_have_created())
        {
            return self.confirm(answer);
        }
        self.fail(StopReason::NotRetryable, Last::Api(answer))
    }

    /// Whether the caller's request may make a task, and its lookup if so.
    fn plan(&mut self) -> Plan<B> {
        let template = self.template.request();
        Recognized::of(template);
        let Some(recognized) = Recognized::cached(template) else {
            unreachable!("recognised above")
        };
        if !recognized.is_create() {
            return if unknown_post(recognized, template) {
                Plan::Unlookable(None)
            } else {
                Plan::Repeatable
            };
        }
        let Some(external_id) = recognized.external_id.clone() else {
            return Plan::Unlookable(None);
        };
        let new_style = recognized
            .generation
            .is_some_and(|generation| generation != ApiGeneration::Legacy);
        match lookup::request(template, recognized, &external_id) {
            Some(request) => Plan::Lookup(Box::new(Pending {
                request,
                external_id,
                new_style,
                final_answer: None,
                if_not_found: StopReason::NotRetryable,
                if_unsent: StopReason::CreateUnresolved,
                sent: false,
            })),
            None => Plan::Unlookable(Some(external_id)),
        }
    }

    /// Looks the create up again after a final refusal of its re-sent attempt: found, the
    /// caller gets the task ([`Recovered`]); not found, `answer`. It goes at once, or after the
    /// settle time when `answer` itself may have made the task, or may be the answer to a
    /// duplicate id of a task an earlier attempt may have made (then, not found, the create is
    /// left unresolved, not refused: the task may exist yet not be found by its id). It counts
    /// as an attempt; stopped by the attempt limit, the deadline or the budget, the call ends
    /// with the create unresolved.
    fn confirm(&mut self, answer: ApiError) -> Step {
        let last = Last::Api(answer.clone());
        let earlier = self
            .retry
            .as_deref()
            .is_some_and(|retry| retry.external_id.is_some());
        // A create that may have made a task and has an id to look it up by is unresolved
        // until the lookup settles it, whichever attempt may have made it.
        let made = answer.may_have_created();
        // An earlier attempt may have made the task under this id, and the refusal may be the
        // server's answer to that duplicate id (a `1201`; the id the layer generated included:
        // the earlier attempt used it). A lookup at once that finds nothing proves nothing
        // (the task may be queued, or not yet found by its id): it waits the settle time, and
        // "not found" leaves the create unresolved, never a refusal that made nothing (a
        // caller who fixes the job and sends it again would bill the task twice).
        let duplicate = earlier && may_answer_a_duplicate(answer.code());
        let if_unsent = if earlier || made {
            StopReason::CreateUnresolved
        } else {
            StopReason::NotRetryable
        };
        let mut pending = match self.plan() {
            Plan::Lookup(pending) => *pending,
            Plan::Unlookable(external_id) if made => {
                if external_id.is_some() {
                    self.retrying().external_id = external_id;
                }
                return self.fail(StopReason::CreateMayHaveHappened, last);
            }
            Plan::Repeatable | Plan::Unlookable(_) => {
                return self.fail(StopReason::NotRetryable, last);
            }
        };
        pending.final_answer = Some(answer);
        if duplicate {
            pending.if_not_found = StopReason::CreateUnresolved;
        }
        pending.if_unsent = if_unsent;
        let retry = self.retrying();
        if made {
            // This answer may have made the task: every error from here on names its id, and
            // a caller that drops the call is told it.
            retry.external_id = Some(pending.external_id.clone());
        }
        retry.lookup = Some(pending);
        retry.next = Sending::Lookup;
        // An answer that may itself have made the task, or may be the duplicate answer of one
        // an earlier attempt made, is looked up once the server had time to record it, as
        // after a 5000 (see `Backoff::lookup_settle`): a "not found" read at once would return
        // the answer as a refusal that made nothing.
        let settle = if made || duplicate {
            self.shared().backoff.settle()
        } else {
            Duration::ZERO
        };
        let at = Instant::now()
            .checked_add(settle)
            .unwrap_or_else(|| far_future(Instant::now()));
        self.send_at("lookup", last, at)
    }

    fn kind(&mut self) -> &'static str {
        Recognized::of(self.template.request()).kind.as_str()
    }

    /// Decides whether and when the next attempt goes, after a retryable failure.
    fn schedule(
        &mut self,
        delay: DelayKind,
        create: CreateState,
        hint: Option<(Instant, Duration)>,
        last: Last,
        resign: bool,
    ) -> Step {
        if self.sending == Sending::Original {
            // Tells a layer above that reserved something for the create (a spend guard)
            // whether this attempt may have made a task: if not, a later attempt the slots
            // hold back counts as unsent again.
            SendWatch::answered(self.template.request(), create == CreateState::MaybeCreated);
            // Until the next attempt goes, this layer holds it back: a caller that drops the
            // call during the backoff drops a create that surely made nothing.
            SendWatch::held(self.template.request());
            let mut pending = None;
            if create == CreateState::MaybeCreated {
                match self.plan() {
                    Plan::Repeatable => {}
                    Plan::Unlookable(external_id) => {
                        if external_id.is_some() {
                            self.retrying().external_id = external_id;
                        }
                        return self.fail(StopReason::CreateMayHaveHappened, last);
                    }
                    Plan::Lookup(lookup) => {
                        self.retrying().external_id = Some(lookup.external_id.clone());
                        pending = Some(*lookup);
                    }
                }
            }
            let retry = self.retrying();
            retry.next = match pending {
                Some(_) => Sending::Lookup,
                None => Sending::Original,
            };
            retry.lookup = pending;
        }
        if delay == DelayKind::Immediate && !resign {
            self.retrying().slot_gated += 1;
        }
        // A throttled retry of a call with a deadline is outside the attempt limit (see
        // `attempt_limit`); under `max_attempts(1)` it counts (only a slot-gated retry and a
        // token's resend pass that limit).
        if delay == DelayKind::Throttled
            && create == CreateState::NotCreated
            && self.template.deadline.is_some()
            && self.shared().max_attempts > 1
        {
            self.retrying().throttled += 1;
        }
        if self.attempts >= self.attempt_limit() {
            return self.fail(StopReason::AttemptsExhausted, last);
        }
        let now = Instant::now();
        // A create's first lookup also waits the settle time (below): the jitter is drawn from
        // what fits before the deadline once it is counted. (Not again after a lookup that never
        // left: the time since the create's attempt is already past the settle time.)
        let settle = if self.sending == Sending::Original && self.unsent_lookup_next() {
            self.shared().backoff.settle()
        } else {
            Duration::ZERO
        };
        let shared = self.shared();
        let at = match hint {
            Some((received, hint)) => {
                // No sooner than the kind's own floor (1 s after a 1302 or an ungated 1303, the
                // maintenance wait after a 5001): a `Retry-After: 0`, or a date already past,
                // would otherwise send the retries in a burst against a throttled API.
                // The hint is raised to the floor before the jitter is drawn over it, so
                // retries after `Retry-After: 0` still spread.
                let floor = shared.backoff.bounds(delay, 1).0;
                let earliest = received.checked_add(hint.max(floor));
                // Never sooner than the server asked: a wait it asked for that ends at or past
                // the deadline ends the call now, naming both (not a retry at the deadline,
                // nor one sent early because the wait was clamped).
                if let Some(deadline) = self.template.deadline
                    && earliest.is_none_or(|earliest| earliest >= deadline)
                {
                    let earliest = earliest.unwrap_or_else(|| far_future(now));
                    let asked = (hint >= floor).then_some(hint);
                    return self.past_deadline_asked(earliest, deadline, now, last, asked);
                }
                // Nor longer than this layer waits: the call ends, saying what was asked. A
                // hint at kling-core's ceiling is a longer one read as the ceiling, a lower
                // bound: waited out, the retry could come days early.
                let limit = shared.backoff.retry_after_limit();
                if hint > limit || hint >= kling_core::MAX_RETRY_AFTER {
                    return self.fail_with(
                        StopReason::RetryAfterTooLong,
                        last,
                        Some((hint, limit)),
                    );
                }
                // `hinted` clamps to `max_retry_after`: a floor above it is added back, so the
                // draw stays over the floor (the hint itself is at most the limit here).
                let wait = shared
                    .backoff
                    .hinted(hint.max(floor), &*shared.rng)
                    .saturating_add(floor.saturating_sub(limit));
                // The upward jitter spreads callers; it is not worth giving the call up for:
                // a wait the server's hint fits before the deadline goes without it when the
                // jitter would carry it to the deadline.
                // (Within a timer's grain of the deadline counts: it would wake at it.)
                match (received.checked_add(wait), self.template.deadline) {
                    (Some(at), Some(deadline))
                        if at
                            .checked_add(settle)
                            .and_then(|at| at.checked_add(TIMER_GRAIN))
                            .is_none_or(|at| at > deadline) =>
                    {
                        earliest
                    }
                    (at, _) => at,
                }
            }
            None => {
                // Counted as the attempt limit counts: slot-gated retries (which waited in the
                // slots layer, not on the API) and the resend of a refused token do not double
                // the backoff, or a 5000 after a run of 1303s would wait the maximum at once.
                let gated = self.retry.as_deref().map_or(0, |retry| retry.slot_gated);
                let retry = self
                    .attempts
                    .saturating_sub(gated)
                    .saturating_sub(u32::from(self.resigned));
                // Drawn from what fits before the deadline when the floor does: a draw past
                // it would give the call up for the jitter alone.
                let left = self.template.deadline.map(|deadline| {
                    deadline
                        .saturating_duration_since(now)
                        .saturating_sub(settle)
                });
                let wait = shared
                    .backoff
                    .delay_within(delay, retry, left, &*shared.rng);
                now.checked_add(wait)
            }
        }
        .unwrap_or_else(|| far_future(now));
        // A create's first lookup also waits for the server to record a task it may still be
        // making (queued behind a timeout, a 5002's backlog) or has made but not yet indexed
        // by its id: a "not found" read at once would send the create twice.
        let at = at.checked_add(settle).unwrap_or_else(|| far_future(now));
        // A retry that could start only at the deadline itself is not sent either: a request
        // out at the deadline is given up there ([`Call::past_deadline_in_flight`]), so it
        // would go out only to be abandoned (a create so abandoned "may have made a task").
        if let Some(deadline) = self.template.deadline
            && at >= deadline
        {
            return self.past_deadline(at, deadline, now, last);
        }
        // Slot-gated retries wait for a slot in the layer below, not on the API: they spend no
        // budget (the attempt limit and the deadline still bound them).
        if delay != DelayKind::Immediate && !self.unsent_lookup_next() && !self.withdraw() {
            let kind = self.kind();
            metrics::counter!(RETRY_BUDGET_EXHAUSTED, LABEL_KIND => kind).increment(1);
            return self.fail(StopReason::BudgetExhausted, last);
        }
        let retry = self.retrying();
        let reason = match retry.next {
            _ if resign => "resign",
            Sending::Lookup => "lookup",
            Sending::Original => delay.as_str(),
        };
        retry.schedule_count(reason);
        retry.last = Some(last);
        if at <= now {
            return Step::Send;
        }
        match retry.sleep.as_mut() {
            Some(sleep) => sleep.as_mut().reset(at),
            None => retry.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        retry.sleep_from = now;
        Step::Sleep
    }

    /// The lookup found no task: the create did not happen, send it again now.
    fn resend_after_lookup(&mut self) -> Step {
        let retry = self.retrying();
        retry.lookup = None;
        retry.next = Sending::Original;
        let last = retry
            .last
            .take()
            .unwrap_or_else(|| Last::Error("create outcome unknown".into()));
        self.send_now("not_found", last)
    }

    /// Sends the next attempt (already chosen) at once, if the attempt limit, the deadline and
    /// the budget allow.
    fn send_now(&mut self, reason: &'static str, last: Last) -> Step {
        self.send_at(reason, last, Instant::now())
    }

    /// Sends the next attempt (already chosen) at `at`, if the attempt limit, the deadline and
    /// the budget allow.
    fn send_at(&mut self, reason: &'static str, last: Last, at: Instant) -> Step {
        if self.attempts >= self.attempt_limit() {
            return self.fail(StopReason::AttemptsExhausted, last);
        }
        let now = Instant::now();
        let at = at.max(now);
        if let Some(deadline) = self.template.deadline
            && at >= deadline
        {
            return self.past_deadline(at, deadline, now, last);
        }
        if !self.unsent_lookup_next() && !self.withdraw() {
            let kind = self.kind();
            metrics::counter!(RETRY_BUDGET_EXHAUSTED, LABEL_KIND => kind).increment(1);
            return self.fail(StopReason::BudgetExhausted, last);
        }
        let retry = self.retrying();
        retry.schedule_count(reason);
        retry.last = Some(last);
        if at <= now {
            return Step::Send;
        }
        match retry.sleep.as_mut() {
            Some(sleep) => sleep.as_mut().reset(at),
            None => retry.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        retry.sleep_from = now;
        Step::Sleep
    }

    fn next_request(&mut self) -> Request<B> {
        self.attempts += 1;
        // Sent: the retry keeps what it drew from the budget, and is counted.
        let reason = self.retry.as_deref_mut().and_then(|retry| {
            retry.withdrawn = None;
            retry.unsent_reason.take()
        });
        if let Some(reason) = reason {
            let kind = self.kind();
            metrics::counter!(RETRIES, LABEL_KIND => kind, LABEL_REASON => reason).increment(1);
        }
        let lookup = self
            .retry
            .as_deref_mut()
            .filter(|retry| retry.next == Sending::Lookup)
            .and_then(|retry| retry.lookup.as_mut());
        let (source, sending) = match lookup {
            Some(pending) => {
                pending.sent = true;
                (&pending.request, Sending::Lookup)
            }
            None => (&*self.template.request(), Sending::Original),
        };
        self.sending = sending;
        let mut request = clone_request(source);
        Attempt::set_with_deadline(&mut request, self.attempts, self.template.deadline);
        if sending == Sending::Original {
            SendWatch::handed(&request);
        }
        request
    }
}
