//! [`ResponseFuture`]: waits for the key's turn, calls the inner service, reports the outcome.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use kling_core::error::{BodyTooLarge, MalformedResponse};
use kling_core::metrics::{COOLDOWNS, LABEL_ACCOUNT, LABEL_KIND, RATELIMIT_WAIT};
use kling_core::signals::{Deadline, SendWatch, Waited};
use kling_core::{AccountId, BoxError, Code, Outcome, PeekBody, Recognized};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::backend::{Backend, BucketKey, Decision, Feedback, Policy};
use crate::error::{QueueFull, RateLimited, WaitExceeded, WaitLimit};
use crate::layer::{Lane, Mode, Shared, shared_of};
use crate::pause::least_pause_until;
use crate::queue::{ClassTurn, Joins, Place, Queues, Ticket};

/// Where a request stands at one gate (its class quota, then its account quota).
enum Step<A> {
    /// Not asked yet.
    Start,
    /// Asking the backend.
    Acquiring(A),
    /// Queued behind other requests.
    Queued,
    /// At the head, sleeping until the backend's "not before".
    Sleeping,
}

/// The waiting part of a response future.
///
/// The layer's shared state and the account key are the future's, passed in: a waiting request
/// boxes only what is its own.
struct Gate<Bk: Backend> {
    class_key: Option<BucketKey>,
    step: Step<Bk::AcquireFuture>,
    place: Option<Place>,
    sleep: Option<Pin<Box<Sleep>>>,
    epoch: u64,
    /// When the request first had to wait.
    waited_since: Option<Instant>,
    /// The instant it must not wait past (set when it first waits), and why: `why`. Apart
    /// rather than a pair, so that `back` takes no more room.
    limit: Option<Instant>,
    why: WaitLimit,
    /// It passed its class gate and went back there from its account's ([`Gate::back_to_class`]):
    /// it was waiting already, and no `max_queue` refuses it again.
    back: bool,
    /// Its ask is on its way (a remote store's round trip) and it holds a place meanwhile
    /// ([`Gate::ask_in_flight`]). (In the padding after `back`: it takes no room.)
    in_flight: bool,
    /// It has waited its turn at this gate (queued, or refused): its asks are a waiting
    /// request's, which count toward `max_queue` and hold those behind it, not a first ask's
    /// ([`Gate::ask_in_flight`]). (In the padding after `back`: it takes no room.)
    waited: bool,
    /// The number of its first pass through its class gate ([`Queues::next_pass`]): where it
    /// stands among the requests that come back there ([`Gate::back_to_class`]). (In the
    /// padding after `back`: it takes no room.)
    pass: u32,
}

impl<Bk: Backend> Gate<Bk> {
    /// The instant it must not wait past, and why, if it has one.
    fn limit(&self) -> Option<(Instant, WaitLimit)> {
        self.limit.map(|at| (at, self.why))
    }

    fn key<'k>(&'k self, account_key: &'k BucketKey) -> &'k BucketKey {
        self.class_key.as_ref().unwrap_or(account_key)
    }

    /// Asks the backend; a request that has waited says since when
    /// ([`Backend::acquire_waiting`]). A request that goes through the gate (a class quota,
    /// others queued, or a wait) reads the clock again when admitted: the instant a backend
    /// notes is kept only on the direct path in [`ResponseFuture::direct`], so a waiter's boxed
    /// state stays small.
    fn acquire(&self, shared: &Shared<Bk>, account_key: &BucketKey) -> Bk::AcquireFuture {
        let key = self.key(account_key);
        let policy = shared.policy_for(key);
        match self.waited_since {
            Some(since) => shared.backend.acquire_waiting(key, &policy, since),
            None if shared.mode == Mode::Reject => {
                shared.backend.acquire_or_refuse(key, &policy, &mut None)
            }
            None => shared.backend.acquire(key, &policy),
        }
    }

    /// [`acquire`](Self::acquire), noting the quota's epoch first: a quota change while the
    /// answer is on its way (a remote store's round trip) is then seen by the sleep that
    /// follows it, which asks again at once rather than sleeping until the old quota's
    /// instant.
    fn ask(&mut self, shared: &Shared<Bk>, account_key: &BucketKey) -> Bk::AcquireFuture {
        self.epoch = shared.epoch.load(Ordering::Acquire);
        self.acquire(shared, account_key)
    }

    /// Gives its place in the queue up (dropped, failed, or past its limit). When no other
    /// request of this limiter waits for the key, the backend is told, so a store the fleet
    /// shares gives the process's place up now rather than when the place ends. (The request
    /// may not have asked as a waiting request yet: telling costs a remote store one command,
    /// only when a queue empties by giving up, and a flag to tell the cases apart would cost
    /// each of 100,000 queued requests 8 bytes.)
    ///
    /// A request that holds no place yet but has asked in wait mode (its first ask, which a
    /// shared store may have ranked in the fleet's order: [`Backend::acquire`]) tells the
    /// backend the same way when it stops there — refused past its limit, failed, or dropped
    /// before the answer — and nothing of this limiter waits for the key.
    fn give_up(&mut self, shared: &Shared<Bk>, account_key: &BucketKey) {
        match self.place.take() {
            Some(place) => {
                let key = place.key.clone();
                if place.leave() {
                    shared.backend.stop_waiting(&key);
                }
            }
            None => {
                if shared.mode == Mode::Wait && matches!(self.step, Step::Acquiring(_)) {
                    let key = self.key(account_key);
                    if shared.queues.asking(key) == 0 {
                        shared.backend.stop_waiting(key);
                    }
                }
            }
        }
    }

    fn start_waiting<B>(&mut self, shared: &Shared<Bk>, request: &Request<B>, now: Instant) {
        if self.waited_since.is_some() {
            return;
        }
        self.waited_since = Some(now);
        // A maximum wait past the clock's range (`Duration::MAX`) is no limit: saturated, not
        // added (which would panic).
        let max_wait = shared
            .max_wait
            .and_then(|max| now.checked_add(max))
            .map(|at| (at, WaitLimit::MaxWait));
        let deadline = Deadline::of(request).map(|d| (d, WaitLimit::Deadline));
        let limit = match (max_wait, deadline) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        };
        if let Some((at, why)) = limit {
            self.limit = Some(at);
            self.why = why;
        }
    }

    fn sleep_until(&mut self, at: Instant) {
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// Takes the place `ticket` gives in `key`'s queue; true when it is the head.
    fn take_place(&mut self, queues: &Arc<Queues>, key: BucketKey, ticket: Ticket) -> bool {
        self.place = Some(Place {
            queues: Arc::clone(queues),
            key,
            id: ticket.id,
        });
        ticket.is_head
    }

    /// The step of a request that just took its place: `head`'s at the head of its queue,
    /// else waiting for its turn.
    fn head_or_queued(
        &mut self,
        is_head: bool,
        head: impl FnOnce(&mut Self) -> Result<(), BoxError>,
    ) -> Result<(), BoxError> {
        if is_head {
            head(self)
        } else {
            self.step = Step::Queued;
            Ok(())
        }
    }

    /// Joins the key's queue, to ask or refused already (`how`); `Ok(true)` when it is at the
    /// head at once.
    fn join(
        &mut self,
        cx: &Context<'_>,
        shared: &Shared<Bk>,
        account_key: &BucketKey,
        how: Joins,
    ) -> Result<bool, BoxError> {
        let key = self.key(account_key).clone();
        let queues = &shared.queues;
        // One back from its account's gate joins it again as it was waiting already.
        let max = shared
            .max_queue
            .filter(|_| !(self.back && self.class_key.is_none()));
        match queues.enqueue(&key, cx.waker(), max, how) {
            Ok(ticket) => Ok(self.take_place(queues, key, ticket)),
            Err(()) => Err(queue_full(shared, account_key)),
        }
    }

    /// Passed one gate: on to the account gate, or done. (The backend that admitted it gave
    /// up its process's place itself.)
    fn passed(&mut self) -> bool {
        self.place = None;
        self.in_flight = false;
        self.waited = false;
        self.step = Step::Start;
        self.class_key.take().is_none()
    }

    /// The class key of a request that has passed its class gate (so it is at the account's),
    /// when it has one: read again from the request rather than kept, so that a waiter's
    /// bookkeeping stays as small as it was.
    fn passed_class<B>(
        &self,
        shared: &Shared<Bk>,
        request: &Request<B>,
        account_key: &BucketKey,
    ) -> Option<BucketKey> {
        if self.class_key.is_some() || shared.classes.is_empty() {
            return None;
        }
        let kind = Recognized::cached(request)?.kind;
        shared
            .classes
            .iter()
            .any(|(k, _)| *k == kind)
            .then(|| BucketKey::class(account_key.account_id().cloned(), kind))
    }

    /// [`Gate::back_to_class`] for a request that passed its class gate, when `paused_until`
    /// (asked only then) gives the end of its account's pause; whether it went back.
    fn went_back_to_class<B>(
        &mut self,
        cx: &Context<'_>,
        shared: &Shared<Bk>,
        request: &Request<B>,
        account_key: &BucketKey,
        paused_until: impl FnOnce() -> Option<Instant>,
    ) -> Result<bool, BoxError> {
        let Some(class_key) = self.passed_class(shared, request, account_key) else {
            return Ok(false);
        };
        let Some(at) = paused_until() else {
            return Ok(false);
        };
        self.back_to_class(cx, shared, request, account_key, class_key, at)?;
        Ok(true)
    }

    /// A request that passed its class gate and then found its account paused until `at`:
    /// it leaves the account's gate and goes back to its class's, whose heads ask no sooner
    /// than `at`. Sent as the account admitted it, requests that passed their class gate
    /// during a pause would all go out together when it ends; going back through the gate
    /// spaces them by the class quota again, at the cost of a turn of the class quota each.
    /// It goes back ahead of the class requests that came after it passed the gate, and among
    /// the ones back there before it in the order they passed it
    /// ([`Queues::enqueue_returned`](crate::queue::Queues::enqueue_returned)), so they keep
    /// their order.
    fn back_to_class<B>(
        &mut self,
        cx: &Context<'_>,
        shared: &Shared<Bk>,
        request: &Request<B>,
        account_key: &BucketKey,
        class_key: BucketKey,
        at: Instant,
    ) -> Result<(), BoxError> {
        self.give_up(shared, account_key);
        self.back = true;
        // Ahead of the class requests that came after it passed the gate: it keeps its turn.
        let queues = &shared.queues;
        let ticket = queues.enqueue_returned(&class_key, cx.waker(), self.pass);
        queues.note_account_pause(&class_key, at);
        let is_head = self.take_place(queues, class_key.clone(), ticket);
        self.class_key = Some(class_key);
        self.head_or_queued(is_head, |gate| {
            gate.at_head(cx, shared, request, account_key)
        })
    }

    /// The step of a request at the head of its queue: it asks the gate
    /// ([`Gate::ask_step`]), unless it waits at its class gate while its account is paused
    /// ([`Gate::back_to_class`]), when it sleeps until the pause ends (or fails at once if
    /// that is past its limit), or leads its class's held requests ([`Gate::held_at_head`]).
    fn at_head<B>(
        &mut self,
        cx: &Context<'_>,
        shared: &Shared<Bk>,
        request: &Request<B>,
        account_key: &BucketKey,
    ) -> Result<(), BoxError> {
        // Held: past its class gate (no class key) and queued at a class key.
        if self.class_key.is_none()
            && let Some(place) = &self.place
            && place.key.request_kind().is_some()
        {
            return self.held_at_head(cx, shared, request, account_key);
        }
        // (The clock is read only when a pause is noted: none is for an account's queue.)
        let paused = self
            .class_key
            .as_ref()
            .and_then(|key| shared.queues.account_paused_until(key))
            .map(|at| (at, Instant::now()))
            .filter(|(at, now)| at > now);
        let Some((at, now)) = paused else {
            return self.ask_step(cx, shared, request, account_key);
        };
        self.start_waiting(shared, request, now);
        if let Some((limit, why)) = self.limit()
            && at > limit
        {
            return Err(Box::new(WaitExceeded::new(
                at,
                now,
                why,
                false,
                true,
                account_key.account_id().cloned(),
            )));
        }
        // One that joined to ask at once, with only first asks on their way ahead of it
        // (`Queues::enqueue`), waits instead: it leaves room for them, as one refused would.
        if !self.waited
            && let Some(place) = &self.place
        {
            let max = shared.max_queue.filter(|_| !self.back);
            if shared.queues.settle(&place.key, place.id, max).is_err() {
                return Err(queue_full(shared, account_key));
            }
        }
        if !self.lead(shared, at, true) {
            self.step = Step::Queued;
            return Ok(());
        }
        self.sleep_until(at);
        // Slept out unless the quota changes meanwhile (see `Step::Sleeping`).
        self.epoch = shared.epoch.load(Ordering::Acquire);
        self.step = Step::Sleeping;
        Ok(())
    }

    /// Asks the gate now: the backend, unless this is a class request at its account's gate
    /// whose class sent a request through the gate less than its quota allows before now
    /// ([`Queues::class_send_at`](crate::queue::Queues::class_send_at)), or whose class holds
    /// requests that came there before it
    /// ([`Queues::class_turn`](crate::queue::Queues::class_turn)):
    /// the class quota holds at the send, for requests that waited unequally at the account
    /// gate after passing the class gate a turn apart. It is then held ([`Gate::hold`]), out
    /// of the way of the account's other requests. (Wait mode only: see [`Gate::note_sent`].)
    ///
    /// A class request about to ask its class gate fails with [`QueueFull`] if its account's
    /// queue is full (and its head waits out no pause, which would send it back to its class
    /// gate instead): having passed its class gate, it would be refused there, and the class
    /// turn it took would be spent for nothing. One back from its account's gate is not: it
    /// was waiting already, and joins the account's queue whatever its bound.
    fn ask_step<B>(
        &mut self,
        cx: &Context<'_>,
        shared: &Shared<Bk>,
        request: &Request<B>,
        account_key: &BucketKey,
    ) -> Result<(), BoxError> {
        if self.class_key.is_some()
            && !self.back
            && shared.mode == Mode::Wait
            && let Some(max) = shared.max_queue
            && !shared.queues.is_idle()
            && shared.queues.turns_away(account_key, max, Instant::now())
        {
            return Err(queue_full(shared, account_key));
        }
        // Held requests are waiting ones: with none waiting, only the record may bind. (Reject
        // mode keeps no record: a class request is sent as soon as it passes its class gate.)
        let held_may_wait = shared.mode == Mode::Wait && !shared.queues.is_idle();
        if (held_may_wait || shared.queues.keeps_class_sends())
            && let Some(class_key) = self.passed_class(shared, request, account_key)
        {
            let ticket = self.place.as_ref().map(|place| place.id);
            let turn = if held_may_wait {
                shared.queues.class_turn(&class_key, ticket)
            } else {
                ClassTurn::Free
            };
            if turn == ClassTurn::Behind {
                return self.hold(cx, shared, request, account_key, class_key, false);
            }
            let quota = shared.policy_for(&class_key).quota;
            if shared
                .queues
                .class_send_at(&class_key, quota, Instant::now())
                .is_some()
            {
                // The one out at the account's queue, held again (its class quota changed
                // while it waited there): ahead of the others, which came after it.
                let again = turn == ClassTurn::Out;
                return self.hold(cx, shared, request, account_key, class_key, again);
            }
        }
        // Held paused here while the report of a pause is on its way (`LocalPauses`): as if
        // the backend said so.
        if self.class_key.is_none()
            && let Some((at, now)) = shared.pauses.held_until(account_key, Instant::now)
        {
            return self.not_before(cx, shared, request, account_key, now, at, true);
        }
        self.step = Step::Acquiring(self.ask(shared, account_key));
        Ok(())
    }

    /// A class request at the head of its account's queue that its class's record of sends
    /// does not let go yet, or whose class holds requests that came before it: it leaves the
    /// account's queue (the next request there asks at once: the account's other requests do
    /// not wait for its class) and joins its class's held requests, which go back to the front
    /// of the account's queue one at a time, in order, each when the record lets it
    /// ([`Gate::held_at_head`]). The one out there (`again`: its class quota changed while it
    /// waited there) goes back ahead of them ([`Queues::hold`](crate::queue::Queues::hold)).
    #[allow(clippy::too_many_arguments)]
    fn hold<B>(
        &mut self,
        cx: &Context<'_>,
        shared: &Shared<Bk>,
        request: &Request<B>,
        account_key: &BucketKey,
        class_key: BucketKey,
        again: bool,
    ) -> Result<(), BoxError> {
        self.start_waiting(shared, request, Instant::now());
        let queues = &shared.queues;
        let is_head = if again {
            // Joins before it leaves the account's queue, which lets the held ones go.
            let ticket = queues.hold(&class_key, cx.waker(), true);
            self.give_up(shared, account_key);
            self.take_place(queues, class_key.clone(), ticket);
            queues.poll_head(&class_key, ticket.id, cx.waker()) == Ok(true)
        } else {
            self.give_up(shared, account_key);
            let ticket = queues.hold(&class_key, cx.waker(), false);
            self.take_place(queues, class_key, ticket)
        };
        self.head_or_queued(is_head, |gate| {
            gate.held_at_head(cx, shared, request, account_key)
        })
    }

    /// The head of its class's held requests ([`Gate::hold`]): it sleeps until the class's
    /// record of sends lets it go (or fails at once if that is past its limit), then goes back
    /// to the front of its account's queue
    /// ([`Queues::release_held`](crate::queue::Queues::release_held)) and asks there.
    fn held_at_head<B>(
        &mut self,
        cx: &Context<'_>,
        shared: &Shared<Bk>,
        request: &Request<B>,
        account_key: &BucketKey,
    ) -> Result<(), BoxError> {
        let place = self.place.take().expect("a held request holds a place");
        let quota = shared.policy_for(&place.key).quota;
        let now = Instant::now();
        if let Some(at) = shared.queues.class_send_at(&place.key, quota, now) {
            self.place = Some(place);
            if let Some((limit, why)) = self.limit()
                && at > limit
            {
                return Err(Box::new(WaitExceeded::new(
                    at,
                    now,
                    why,
                    false,
                    false,
                    account_key.account_id().cloned(),
                )));
            }
            self.sleep_until(at);
            // A quota change wakes it to look again (see `Step::Sleeping`).
            self.epoch = shared.epoch.load(Ordering::Acquire);
            self.step = Step::Sleeping;
            return Ok(());
        }
        let queues = &shared.queues;
        let ticket = queues.release_held(&place.key, place.id, account_key, cx.waker());
        place.moved();
        let is_head = self.take_place(queues, account_key.clone(), ticket);
        self.head_or_queued(is_head, |gate| {
            gate.ask_step(cx, shared, request, account_key)
        })
    }

    /// A class request sent after passing its class gate: the class's send is noted for
    /// [`Gate::ask_step`].
    /// Only in wait mode: in reject mode nothing waits between a class request's class gate
    /// and its send but its account's answer, and a record of sends would refuse a request
    /// its class gate admitted (and took a turn from) when that answer came back late.
    fn note_sent<B>(&self, shared: &Shared<Bk>, request: &Request<B>, account_key: &BucketKey) {
        if shared.mode == Mode::Wait
            && let Some(class_key) = self.passed_class(shared, request, account_key)
        {
            let quota = shared.policy_for(&class_key).quota;
            shared
                .queues
                .note_class_sent(&class_key, quota, Instant::now());
        }
    }

    /// The key allows no request before `at` (a pause when `cooldown`), as the backend or the
    /// class's record of sends ([`Gate::ask_step`]) said at `now`: the request fails (reject
    /// mode, or past its limit), goes back to its class gate (a class request at a paused
    /// account with nobody queued behind it there), or waits in the key's queue, sleeping until
    /// `at` when it leads it.
    #[allow(clippy::too_many_arguments)]
    fn not_before<B>(
        &mut self,
        cx: &Context<'_>,
        shared: &Shared<Bk>,
        request: &Request<B>,
        account_key: &BucketKey,
        now: Instant,
        at: Instant,
        cooldown: bool,
    ) -> Result<(), BoxError> {
        if shared.mode == Mode::Reject {
            return Err(Box::new(RateLimited::new(
                at,
                now,
                cooldown,
                account_key.account_id().cloned(),
            )));
        }
        self.in_flight = false;
        let first = !std::mem::replace(&mut self.waited, true);
        self.start_waiting(shared, request, now);
        if let Some((limit, why)) = self.limit()
            && at > limit
        {
            return Err(Box::new(WaitExceeded::new(
                at,
                now,
                why,
                false,
                cooldown,
                account_key.account_id().cloned(),
            )));
        }
        // Back to its class gate only with nobody behind it at its account's: it would join
        // the queue again behind them (class requests that passed the gate after it among
        // them), as one queued there when the pause began does not go back either.
        let alone = |gate: &Self| {
            let own = gate.place.as_ref().is_some_and(|p| p.key == *account_key);
            shared.queues.asking(account_key) <= usize::from(own)
        };
        let paused = cooldown && alone(self);
        if self.went_back_to_class(cx, shared, request, account_key, || paused.then_some(at))? {
            return Ok(());
        }
        // Refused at its first ask with a place (its ask went on its way, `Gate::ask_in_flight`,
        // or others waited when it came): it waits from now, within the queue's bound, leaving
        // room for the first asks on their way that came before it, as one refused with no
        // place would join it.
        if first && let Some(place) = &self.place {
            let max = shared.max_queue.filter(|_| !self.back);
            if shared.queues.settle(&place.key, place.id, max).is_err() {
                return Err(queue_full(shared, account_key));
            }
        }
        if self.place.is_none() && !self.join(cx, shared, account_key, Joins::Refused)? {
            // Others queued meanwhile: wait for our turn behind them.
            self.step = Step::Queued;
            return Ok(());
        }
        if !self.lead(shared, at, cooldown) {
            self.step = Step::Queued;
            return Ok(());
        }
        self.sleep_until(at);
        self.step = Step::Sleeping;
        Ok(())
    }

    /// A request whose ask is still to come (a remote store's round trip) holds a place in the
    /// key's queue meanwhile (wait mode), taking one now if it asked with none (nothing
    /// waiting: directly, or at its first look), and marked as asking
    /// ([`Queues::ask_in_flight`](crate::queue::Queues::ask_in_flight)): refused, it keeps
    /// its place ahead of the requests that came during the round trip; but those ask too
    /// rather than wait for its answer, and it is not counted as waiting (`max_queue`,
    /// [`GcraHandle::waiting`](crate::GcraHandle::waiting), the depth gauge) until refused
    /// ([`Gate::not_before`]), when it waits within the bound, ahead of the later requests
    /// whatever order the answers come back in. Its ask is sent already: no bound refuses it
    /// its place while it is on its way.
    ///
    /// A request that waited its turn already (`waited`: a head asking again after a refusal,
    /// or one that queued behind others) is not marked: it counted toward `max_queue` while it
    /// waited, and one refused again must not meet `QueueFull` for its own place.
    #[cold]
    fn ask_in_flight(&mut self, cx: &Context<'_>, shared: &Shared<Bk>, account_key: &BucketKey) {
        if self.in_flight || self.waited || shared.mode != Mode::Wait {
            return;
        }
        self.in_flight = true;
        match &self.place {
            Some(place) => shared.queues.ask_in_flight(&place.key, place.id),
            None => {
                let key = self.key(account_key).clone();
                let queues = &shared.queues;
                // (No bound: never refused.)
                if let Ok(ticket) = queues.enqueue(&key, cx.waker(), None, Joins::Asking) {
                    self.take_place(queues, key, ticket);
                }
            }
        }
    }

    /// Notes the head's "not before" for those behind it (a pause past the limit of one of
    /// them wakes them: [`Queues::poll_behind`](crate::queue::Queues::poll_behind)); false
    /// when this request no longer leads its queue (one came back from the account gate ahead
    /// of it: [`Gate::back_to_class`]) and must wait for its turn again.
    fn lead(&self, shared: &Shared<Bk>, at: Instant, cooldown: bool) -> bool {
        let place = self.place.as_ref().expect("a head holds a place");
        shared
            .queues
            .set_head_not_before(&place.key, place.id, at, cooldown)
    }

    /// Waits for the gates; a request that fails here gives up what it holds
    /// ([`Gate::give_up`]).
    fn poll<B>(
        &mut self,
        cx: &mut Context<'_>,
        request: &Request<B>,
        shared: &Shared<Bk>,
        account_key: &BucketKey,
    ) -> Poll<Result<(), BoxError>> {
        let result = ready!(self.poll_steps(cx, request, shared, account_key));
        if result.is_err() {
            self.give_up(shared, account_key);
        }
        Poll::Ready(result)
    }

    fn poll_steps<B>(
        &mut self,
        cx: &mut Context<'_>,
        request: &Request<B>,
        shared: &Shared<Bk>,
        account_key: &BucketKey,
    ) -> Poll<Result<(), BoxError>> {
        loop {
            match &mut self.step {
                Step::Start => {
                    if shared.mode == Mode::Reject || shared.queues.is_idle() {
                        self.ask_step(cx, shared, request, account_key)?;
                    } else {
                        let now = Instant::now();
                        self.start_waiting(shared, request, now);
                        // At the account's gate behind a head that waits out a pause: back to
                        // the class gate, as if this request had met the pause itself.
                        let head_paused = || {
                            let at = shared.queues.head_paused_until(account_key);
                            at.filter(|at| *at > now)
                        };
                        if self.went_back_to_class(cx, shared, request, account_key, head_paused)? {
                            continue;
                        }
                        let is_head = self.join(cx, shared, account_key, Joins::ToAsk)?;
                        self.head_or_queued(is_head, |gate| {
                            gate.at_head(cx, shared, request, account_key)
                        })?;
                    }
                }
                Step::Acquiring(future) => match Pin::new(future).poll(cx) {
                    Poll::Pending => {
                        self.ask_in_flight(cx, shared, account_key);
                        return Poll::Pending;
                    }
                    Poll::Ready(answer) => match answer? {
                        Decision::Admit => {
                            // Numbered at its first pass: one that passes again keeps its turn.
                            if self.class_key.is_some() && !self.back {
                                self.pass = shared.queues.next_pass();
                            }
                            // Noted before it leaves the account's queue, which lets its class's
                            // next held request go.
                            self.note_sent(shared, request, account_key);
                            if self.passed() {
                                return Poll::Ready(Ok(()));
                            }
                        }
                        Decision::NotBefore { at, cooldown } => {
                            let now = Instant::now();
                            self.not_before(cx, shared, request, account_key, now, at, cooldown)?;
                        }
                    },
                },
                Step::Queued => {
                    self.waited = true;
                    let place = self.place.as_ref().expect("a queued request holds a place");
                    let queues = &shared.queues;
                    match queues.poll_behind(&place.key, place.id, cx.waker(), self.limit) {
                        Ok(_) => self.at_head(cx, shared, request, account_key)?,
                        Err(hint) => {
                            let Some((limit, why)) = self.limit() else {
                                return Poll::Pending;
                            };
                            let now = Instant::now();
                            // Behind a head waiting out a pause that ends past the limit, this
                            // request cannot go in time (a pause is never shortened): it fails
                            // now rather than at its limit (on joining, or woken by a head that
                            // met the pause meanwhile). A pacing hint may still shrink (a quota
                            // change), so it waits for that one.
                            let paused_past_limit = matches!(hint, Some((at, true)) if at > limit);
                            if now >= limit || paused_past_limit {
                                // Behind a head waiting out a pause, this request waited for
                                // the pause too: its error says so.
                                let (resume_at, cooldown) = hint
                                    .map_or((now, false), |(at, cooldown)| (at.max(now), cooldown));
                                return Poll::Ready(Err(Box::new(WaitExceeded::new(
                                    resume_at,
                                    now,
                                    why,
                                    true,
                                    cooldown,
                                    account_key.account_id().cloned(),
                                ))));
                            }
                            self.sleep_until(limit);
                            let sleep = self.sleep.as_mut().expect("just set");
                            ready!(sleep.as_mut().poll(cx));
                        }
                    }
                }
                Step::Sleeping => {
                    // The queue wakes its head on a quota change: give it this poll's waker
                    // (an earlier poll may have had another, e.g. the waker-less first look).
                    // A request that came back from the account gate may lead now instead.
                    if let Some(place) = &self.place
                        && shared
                            .queues
                            .poll_head(&place.key, place.id, cx.waker())
                            .is_err()
                    {
                        self.step = Step::Queued;
                        continue;
                    }
                    if shared.epoch.load(Ordering::Acquire) == self.epoch {
                        let sleep = self.sleep.as_mut().expect("a sleeping head has a timer");
                        ready!(sleep.as_mut().poll(cx));
                    }
                    // Through `at_head`: a quota change does not end a class head's wait for
                    // its account's pause.
                    self.at_head(cx, shared, request, account_key)?;
                }
            }
        }
    }
}

/// The error of a request its key's queue has no room for (`max_queue`), wherever it meets it:
/// joining, refused at its first ask ([`Gate::not_before`]), or before its class gate
/// ([`Gate::ask_step`]).
#[cold]
fn queue_full<Bk: Backend>(shared: &Shared<Bk>, account_key: &BucketKey) -> BoxError {
    // (Only a bound refuses: never 0.)
    let max = shared.max_queue.unwrap_or(0);
    Box::new(QueueFull::new(account_key.account_id().cloned(), max))
}

/// The direct path's answer (see [`ResponseFuture::direct`]).
pub(crate) enum Direct<A> {
    /// Admitted at that instant.
    Admitted(Instant),
    /// The backend failed.
    Failed(BoxError),
    /// Through the gate, with the backend's answer if it is still to come.
    Gate(Option<A>),
}

/// What a request that must wait carries while it waits: boxed, so the future of a request
/// admitted at once (the success path) is small and cheap to move.
struct Waiting<S, B, Bk: Backend> {
    gate: Gate<Bk>,
    inner: Option<S>,
    request: Option<Request<B>>,
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, F, R, Bk>
    where
        Bk: Backend,
    {
        Gating { waiting: Box<Waiting<S, B, Bk>> },
        // The gate refused the request when `call` first asked it.
        Failed { error: Option<BoxError> },
        Calling { #[pin] future: F },
        // Boxed: only a backend whose report is still to come waits here, and the inner
        // future's variant then stays the largest. It holds the report (until a drop hands it
        // to the runtime: [`finish_report`]) and the answer, or the inner error a proxy's page
        // became ([`feedback_of_error`]).
        Reporting { reporting: Box<(Option<R>, Option<Result<Response<Full<Bytes>>, BoxError>>)> },
        Done,
    }
}

pin_project! {
    /// The response future of [`Gcra`](crate::Gcra): waits for the key's turn, calls the inner
    /// service, and reports a 1302, a `Retry-After` or (when needed) a success to the backend.
    ///
    /// Dropping it while it waits gives its place in the queue up; dropping it while its
    /// report is on its way lets the report run to its end.
    pub struct ResponseFuture<S, B, Bk>
    where
        S: Service<Request<B>>,
        Bk: Backend,
    {
        #[pin]
        state: State<S, B, S::Future, Bk::FeedbackFuture, Bk>,
        // The calling thread's lane: the reference count it writes is that thread's.
        lane: Arc<Lane<Bk>>,
        // The account alone and the wait in nanoseconds rather than a `BucketKey` and a
        // `Duration`: 16 bytes fewer keep the future within 256 bytes around a 192-byte inner
        // future, which every move of it costs less for.
        account: Option<AccountId>,
        sent_at: Option<Instant>,
        waited_nanos: u64,
    }

    impl<S, B, Bk> PinnedDrop for ResponseFuture<S, B, Bk>
    where
        S: Service<Request<B>>,
        Bk: Backend,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            match this.state.project() {
                StateProj::Gating { waiting } => {
                    let account_key = BucketKey::account(this.account.clone());
                    waiting.gate.give_up(shared_of(this.lane), &account_key);
                }
                StateProj::Reporting { reporting } => {
                    if let Some(report) = reporting.0.take() {
                        finish_report(report, this.account.clone());
                    }
                }
                _ => {}
            }
        }
    }
}

impl<S, B, Bk> ResponseFuture<S, B, Bk>
where
    S: Service<Request<B>>,
    Bk: Backend,
{
    /// The usual case, asked directly from `call` before anything else is built: nothing
    /// queues, the gate of `key` (a class's, then the account's) admits at once; the request
    /// is sent at the instant the backend decided at for the account. Any other answer goes
    /// through the gate ([`ResponseFuture::gated`]), which asks again (a refusal took nothing)
    /// or polls the pending answer.
    #[inline(always)]
    pub(crate) fn direct(
        shared: &Shared<Bk>,
        key: &BucketKey,
        policy: &Policy,
    ) -> Direct<Bk::AcquireFuture> {
        // Held paused here (a report on its way): through the gate, which says until when.
        if key.request_kind().is_none() && shared.pauses.held_until(key, Instant::now).is_some() {
            return Direct::Gate(None);
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut decided_at = None;
        let mut acquire = if shared.mode == Mode::Reject {
            shared
                .backend
                .acquire_or_refuse(key, policy, &mut decided_at)
        } else {
            shared.backend.acquire_noting(key, policy, &mut decided_at)
        };
        match Pin::new(&mut acquire).poll(&mut cx) {
            Poll::Ready(Ok(Decision::Admit)) => {
                Direct::Admitted(decided_at.unwrap_or_else(Instant::now))
            }
            Poll::Ready(Err(error)) => {
                // A first ask that failed does not wait: a shared store told as when the gate
                // fails ([`Gate::give_up`]).
                if shared.mode == Mode::Wait && shared.queues.asking(key) == 0 {
                    shared.backend.stop_waiting(key);
                }
                Direct::Failed(error.into())
            }
            Poll::Ready(Ok(_)) => Direct::Gate(None),
            Poll::Pending => Direct::Gate(Some(acquire)),
        }
    }

    /// Reject mode's ask for a class request, from `call`: the turns of its class key and its
    /// account's at once, or neither ([`Backend::acquire_class_or_refuse`]), so a request its
    /// account refuses spends no class turn. A refusal fails the request with
    /// [`RateLimited`]; an answer still to come goes through the gate as the account's. `None`
    /// when the backend cannot: the class's gate is asked, then the account's.
    #[inline(never)]
    pub(crate) fn direct_class_and_account(
        shared: &Shared<Bk>,
        class_key: &BucketKey,
        account_key: &BucketKey,
    ) -> Option<Direct<Bk::AcquireFuture>> {
        // Held paused here (a report on its way): refused before the class turn is taken.
        if let Some((at, now)) = shared.pauses.held_until(account_key, Instant::now) {
            let account = account_key.account_id().cloned();
            return Some(Direct::Failed(Box::new(RateLimited::new(
                at, now, true, account,
            ))));
        }
        let mut decided_at = None;
        let mut acquire = shared.backend.acquire_class_or_refuse(
            class_key,
            &shared.policy_for(class_key),
            account_key,
            &shared.account_policy(),
            &mut decided_at,
        )?;
        let mut cx = Context::from_waker(Waker::noop());
        Some(match Pin::new(&mut acquire).poll(&mut cx) {
            Poll::Ready(Ok(Decision::Admit)) => {
                Direct::Admitted(decided_at.unwrap_or_else(Instant::now))
            }
            Poll::Ready(Ok(Decision::NotBefore { at, cooldown })) => {
                let now = decided_at.unwrap_or_else(Instant::now);
                let account = account_key.account_id().cloned();
                Direct::Failed(Box::new(RateLimited::new(at, now, cooldown, account)))
            }
            Poll::Ready(Err(error)) => Direct::Failed(error.into()),
            Poll::Pending => Direct::Gate(Some(acquire)),
        })
    }

    /// A request admitted directly, sent at `sent_at`: `future` is the inner service's, built
    /// by the caller (calling the service in `call`'s own frame rather than in here saves a
    /// copy of the request on the way).
    #[inline(always)]
    pub(crate) fn calling(
        lane: Arc<Lane<Bk>>,
        account_key: BucketKey,
        sent_at: Instant,
        future: S::Future,
    ) -> Self {
        ResponseFuture {
            state: State::Calling { future },
            lane,
            account: account_key.into_account(),
            sent_at: Some(sent_at),
            waited_nanos: 0,
        }
    }

    /// A request the backend failed for.
    pub(crate) fn failed(lane: Arc<Lane<Bk>>, account_key: BucketKey, error: BoxError) -> Self {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
            lane,
            account: account_key.into_account(),
            sent_at: None,
            waited_nanos: 0,
        }
    }

    /// Asks the gate once, from `call` (a class quota, others queued, or a wait; `pending` is the
    /// direct path's answer if it is still to come): a request admitted at once is sent from
    /// here, so the inner service is not cloned into the future; one that must wait takes the
    /// ready inner service with it and waits in the future. The first look has no waker to
    /// register, which is safe: the task's first poll passes its own waker to whatever the
    /// gate waits on.
    #[inline(never)]
    pub(crate) fn gated(
        lane: Arc<Lane<Bk>>,
        account_key: BucketKey,
        class_key: Option<BucketKey>,
        pending: Option<Bk::AcquireFuture>,
        inner: &mut S,
        mut request: Request<B>,
    ) -> Self
    where
        S: Clone,
        B: PeekBody,
    {
        let shared = &**shared_of(&lane);
        let mut cx = Context::from_waker(Waker::noop());
        let gate_class_passed = class_key.is_none() && !shared.classes.is_empty();
        let step = pending.map_or(Step::Start, Step::Acquiring);
        let mut gate = Gate {
            class_key,
            step,
            place: None,
            sleep: None,
            // The direct path's ask, if still to come, began a moment ago.
            epoch: shared.epoch.load(Ordering::Acquire),
            waited_since: None,
            limit: None,
            why: WaitLimit::MaxWait,
            back: false,
            in_flight: false,
            waited: false,
            // A class request here without its class key passed its class gate in `call`.
            pass: if gate_class_passed {
                shared.queues.next_pass()
            } else {
                0
            },
        };
        let first_look = gate.poll(&mut cx, &request, shared, &account_key);
        let (mut sent_at, mut waited) = (None, Duration::ZERO);
        let state = match first_look {
            Poll::Ready(Ok(())) => {
                admitted(&gate, &mut sent_at, &mut waited, &mut request);
                State::Calling {
                    future: inner.call(request),
                }
            }
            Poll::Ready(Err(error)) => State::Failed { error: Some(error) },
            Poll::Pending => {
                // Held back unsent until its turn: a layer above that holds something for the
                // request (a spend estimate, its slots) gives it back if the caller drops it.
                SendWatch::held(&request);
                let clone = inner.clone();
                return ResponseFuture {
                    state: State::Gating {
                        waiting: Box::new(Waiting {
                            gate,
                            inner: Some(std::mem::replace(inner, clone)),
                            request: Some(request),
                        }),
                    },
                    lane,
                    account: account_key.into_account(),
                    sent_at: None,
                    waited_nanos: 0,
                };
            }
        };
        ResponseFuture {
            state,
            lane,
            account: account_key.into_account(),
            sent_at,
            waited_nanos: nanos(waited),
        }
    }
}

/// A duration in nanoseconds (saturating, past 584 years).
fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Notes when an admitted request is sent and how long it waited (recorded for metrics).
fn admitted<Bk: Backend, B: PeekBody>(
    gate: &Gate<Bk>,
    sent_at: &mut Option<Instant>,
    waited: &mut Duration,
    request: &mut Request<B>,
) {
    let now = Instant::now();
    *sent_at = Some(now);
    if let Some(since) = gate.waited_since {
        *waited = now.saturating_duration_since(since);
        let kind = match Recognized::cached(request) {
            Some(recognized) => recognized.kind,
            None => Recognized::of(request).kind,
        }
        .as_str();
        metrics::histogram!(RATELIMIT_WAIT, LABEL_KIND => kind).record(waited.as_secs_f64());
    }
}

impl<S, B, Bk> fmt::Debug for ResponseFuture<S, B, Bk>
where
    S: Service<Request<B>>,
    Bk: Backend,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Gating { .. } => "gating",
            State::Failed { .. } => "failed",
            State::Calling { .. } => "calling",
            State::Reporting { .. } => "reporting",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("account", &self.account)
            .field(
                "queued",
                &matches!(&self.state, State::Gating { waiting } if waiting.gate.place.is_some()),
            )
            .finish()
    }
}

/// Counts a cooldown the backend reported. A store that cannot take the report must not cost
/// the caller its response: an error is let go.
fn note_cooldown(
    reported: Result<crate::backend::Reported, crate::error::BackendError>,
    account: &Option<AccountId>,
) {
    if reported.is_ok_and(|reported| reported.cooldown_until.is_some()) {
        let account = account
            .as_ref()
            .map_or("", |a| kling_core::metrics::account_label(a.as_str()));
        metrics::counter!(COOLDOWNS, LABEL_ACCOUNT => account).increment(1);
    }
}

/// Sends `feedback` (a response's, or the pause an inner error asked for:
/// [`feedback_of_error`]) to the backend; the report, if it is still to come. After a pause,
/// successes are reported too, so that one resets the streak.
#[inline]
fn report<Bk: Backend>(
    shared: &Shared<Bk>,
    account: &mut Option<AccountId>,
    feedback: Feedback,
    cx: &mut Context<'_>,
) -> Option<Bk::FeedbackFuture> {
    if matches!(feedback, Feedback::Pause { .. }) && !shared.report_success.load(Ordering::Relaxed)
    {
        shared.report_success.store(true, Ordering::Relaxed);
    }
    // The account is lent to the key for the call, not cloned.
    let key = BucketKey::account(account.take());
    let mut report = shared
        .backend
        .feedback(&key, &shared.account_policy(), feedback);
    // The in-process backend's report is ready at once: no state for it.
    if let Poll::Ready(reported) = Pin::new(&mut report).poll(cx) {
        if let Ok(crate::backend::Reported {
            cooldown_until: Some(until),
            ..
        }) = reported
        {
            pause_reported(shared, &key, until);
        }
        *account = key.into_account();
        note_cooldown(reported, account);
        return None;
    }
    hold_pause(shared, &key, &feedback);
    *account = key.into_account();
    Some(report)
}

/// A report still to come (a remote store's round trip): the pause it carries holds in this
/// process from now ([`LocalPauses`](crate::pause::LocalPauses)), as the response is seen, so
/// that a caller that drops the response future before the report ends (a timeout, a
/// `select!`) does not take the pause with it, and the key's next decision here sees it
/// whether or not the store has it yet.
#[cold]
#[inline(never)]
fn hold_pause<Bk>(shared: &Shared<Bk>, key: &BucketKey, feedback: &Feedback) {
    if let Some(until) = least_pause_until(&shared.cooldown, feedback) {
        shared.pauses.hold(key, until, Instant::now());
        pause_reported(shared, key, until);
    }
}

/// A pause of `key` until `until` reported from an answer: the requests queued behind a head
/// paced past it learn of it now ([`Queues::pause_reported`]), not when that head next asks.
#[inline]
fn pause_reported<Bk>(shared: &Shared<Bk>, key: &BucketKey, until: Instant) {
    if !shared.queues.is_idle() {
        shared.queues.pause_reported(key, until);
    }
}

/// A report whose response future was dropped before it ended: it runs to its end on the
/// runtime (if there is one), so a store still hears of it and its cooldown is counted.
#[cold]
#[inline(never)]
fn finish_report<R>(report: R, account: Option<AccountId>)
where
    R: Future<Output = Result<crate::backend::Reported, crate::error::BackendError>>
        + Send
        + 'static,
{
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move { note_cooldown(report.await, &account) });
    }
}

/// What a response tells the backend, if anything. A success is reported when
/// `report_success` says so (asked only for a successful response). A success on a 2xx is one
/// whatever `Retry-After` it carries: the request was not refused, and the header on a 2xx
/// says nothing about other requests (RFC 9110 §10.2.3 gives it a meaning for 503 and 3xx,
/// RFC 6585 for 429; an API that answers a create `202` with one says when to poll that
/// task). A 1302, or any other answer with a `Retry-After` — code 0 on a 429 or a 503
/// included: the status refused it, whatever the body says — pauses the key. A page without a
/// Kling envelope that no classify step below turned into an error (this layer alone over a
/// client) says what that error would ([`feedback_of_error`]).
fn feedback_of(
    response: &mut Response<Full<Bytes>>,
    sent_at: Instant,
    report_success: impl FnOnce() -> bool,
) -> Option<Feedback> {
    let outcome = match Outcome::of(response) {
        Some(outcome) => outcome,
        None => {
            if let Err(page) = Outcome::ensure(response) {
                return feedback_of_error(&page, sent_at);
            }
            Outcome::of(response)?
        }
    };
    let success = outcome.is_success();
    if success && outcome.status().is_success() {
        return report_success().then_some(Feedback::Success { sent_at });
    }
    let throttled = outcome.code() == Code::RateLimited;
    // `Retry-After` is asked about first: the instant it names is worked out only when there.
    if throttled || outcome.retry_after().is_some() {
        Some(Feedback::Pause {
            sent_at,
            received_at: outcome.received_at(),
            resume_at: outcome.resume_at(),
            throttled,
        })
    } else {
        // Code 0 on another status, with no `Retry-After`: a success as the stack reads it.
        (success && report_success()).then_some(Feedback::Success { sent_at })
    }
}

/// What an inner error tells the backend, if anything: a response without a Kling envelope
/// (a proxy's or gateway's page, which the classify step turns into a [`MalformedResponse`],
/// or into [`BodyTooLarge`] when it is too long to read) pauses the key as [`feedback_of`]
/// does for an envelope. Its `Retry-After` pauses the key until then, whatever the status (as
/// for a Kling answer); a 429 is a rate refusal, so it
/// also counts as throttled like a 1302 — it escalates the pause and lowers an adaptive
/// rate — while a 503 page (maintenance) or any other status pauses only for its
/// `Retry-After`, and without one says nothing.
///
/// The error's source chain is walked, not only its top: every layer that may sit between
/// this one and the classify step (auth, a timeout, a second classify step wrapping it in a
/// [`Transport`](kling_core::error::Transport), a caller's own wrapper) answers for this same
/// request, so a `MalformedResponse` or `BodyTooLarge` anywhere in the chain is the answer it
/// got. The walk
/// costs nothing on the success path, and stops at the first one.
#[cold]
#[inline(never)]
fn feedback_of_error(
    error: &(dyn std::error::Error + 'static),
    sent_at: Instant,
) -> Option<Feedback> {
    let mut cause = Some(error);
    let (status, retry_after, received_at) = loop {
        let error = cause?;
        if let Some(malformed) = error.downcast_ref::<MalformedResponse>() {
            break (
                malformed.status(),
                malformed.retry_after(),
                malformed.received_at(),
            );
        }
        // A page too long to read is an answer all the same, and keeps its `Retry-After`.
        if let Some(too_large) = error.downcast_ref::<BodyTooLarge>() {
            break (
                too_large.status(),
                too_large.retry_after(),
                too_large.received_at(),
            );
        }
        cause = error.source();
    };
    let throttled = status == StatusCode::TOO_MANY_REQUESTS;
    if !throttled && retry_after.is_none() {
        return None;
    }
    // The classify step notes when the page arrived; an error built without it counts from now.
    let received_at = received_at.unwrap_or_else(Instant::now);
    Some(Feedback::Pause {
        sent_at,
        received_at,
        resume_at: retry_after.and_then(|delay| received_at.checked_add(delay)),
        throttled,
    })
}

impl<S, B, Bk> Future for ResponseFuture<S, B, Bk>
where
    S: Service<Request<B>, Response = Response<Full<Bytes>>>,
    S::Error: Into<BoxError>,
    B: PeekBody,
    Bk: Backend,
{
    type Output = Result<Response<Full<Bytes>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Gating { waiting } => {
                    let Waiting {
                        gate,
                        inner,
                        request,
                    } = &mut **waiting;
                    let held = request.as_ref().expect("gating holds the request");
                    // The account key is the future's account (never a class): rebuilt for each
                    // wake-up rather than kept in the waiter's box, which 100,000 queued
                    // requests each hold.
                    let account_key = BucketKey::account(this.account.clone());
                    if let Err(error) =
                        ready!(gate.poll(cx, held, shared_of(this.lane), &account_key))
                    {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(error));
                    }
                    let mut request = request.take().expect("gating holds the request");
                    SendWatch::handed(&request);
                    let mut waited = Duration::ZERO;
                    admitted(gate, this.sent_at, &mut waited, &mut request);
                    *this.waited_nanos = nanos(waited);
                    let mut inner = inner.take().expect("called once");
                    this.state.set(State::Calling {
                        future: inner.call(request),
                    });
                }
                StateProj::Failed { error } => {
                    let error = error
                        .take()
                        .unwrap_or_else(|| "polled after completion".into());
                    this.state.set(State::Done);
                    return Poll::Ready(Err(error));
                }
                StateProj::Calling { future } => {
                    // The response stays in the output it is returned in (no copy of it on the
                    // way out); the checks below borrow it there.
                    let mut result: Self::Output = ready!(future.poll(cx)).map_err(Into::into);
                    let sent_at = this.sent_at.expect("set before calling");
                    let shared = &**shared_of(this.lane);
                    let feedback = match &mut result {
                        Ok(response) => {
                            if *this.waited_nanos != 0 {
                                let rate_limit = Duration::from_nanos(*this.waited_nanos);
                                match response.extensions_mut().get_mut::<Waited>() {
                                    Some(waited) => waited.rate_limit += rate_limit,
                                    None => {
                                        response.extensions_mut().insert(Waited {
                                            rate_limit,
                                            ..Waited::default()
                                        });
                                    }
                                }
                            }
                            let report_success = shared.report_success.load(Ordering::Relaxed);
                            let account = &mut *this.account;
                            // A success is reported while a streak may be running: one this
                            // process saw (`report_success`), or one the store says another
                            // process started. With an adaptive rate, unless the store says
                            // the key is at its ceiling (where a success changes nothing,
                            // streak included). (The account is lent to the key for the
                            // question, not cloned; the in-process backend's `streak_running`
                            // is a constant `false`.)
                            let must_report = || {
                                let key = BucketKey::account(account.take());
                                let report = match &shared.adaptive {
                                    Some(_) => !shared
                                        .backend
                                        .adaptive_at_ceiling(&key, &shared.account_policy()),
                                    None => report_success || shared.backend.streak_running(&key),
                                };
                                *account = key.into_account();
                                report
                            };
                            feedback_of(response, sent_at, must_report)
                        }
                        Err(error) => feedback_of_error(&**error, sent_at),
                    };
                    let Some(pending) =
                        feedback.and_then(|feedback| report(shared, this.account, feedback, cx))
                    else {
                        this.state.set(State::Done);
                        return Poll::Ready(result);
                    };
                    this.state.set(State::Reporting {
                        reporting: Box::new((Some(pending), Some(result))),
                    });
                }
                StateProj::Reporting { reporting } => {
                    let (report, result) = &mut **reporting;
                    let report = report.as_mut().expect("reporting holds the report");
                    note_cooldown(ready!(Pin::new(report).poll(cx)), this.account);
                    let result = result.take().expect("reporting holds the result");
                    this.state.set(State::Done);
                    return Poll::Ready(result);
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}
