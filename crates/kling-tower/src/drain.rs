//! [`DrainLayer`]: graceful drain — stop admitting new creates, let what is in flight finish,
//! then return.
//!
//! While the gate is open every request passes, counted in flight until its response future
//! completes or is dropped. [`DrainHandle::drain`] closes the gate: from then on a create (or a
//! `POST` the router does not recognise, which may be a create endpoint newer than this crate;
//! not one it knows answers at once with no task, `identify-face`) fails at once with
//! [`Draining`] (it is never sent), while queries, lists and every request
//! already in flight go on; `drain` returns once nothing admitted before it is in flight
//! (queries and lists admitted since are not counted: a steady stream of them would never let
//! it return). Tasks being followed count too: a [`Follower`](crate::follow::Follower) given
//! the handle ([`with_drain`](crate::follow::Follower::with_drain)) holds a [`DrainGuard`] for each
//! `follow`, so a drain waits for the tasks it follows to end (their queries still pass).
//!
//! A create admitted before the gate closed that a layer below still holds back unsent when it
//! closes (waiting for its rate turn or a task slot, or in the retry layer's backoff after
//! attempts that made no task: kling-core's `SendWatch`) is refused too, with the same error,
//! and dropped, so those layers give back what they held for it (its slot, its turn, its
//! credit estimate). Let through, it was sent after the drain began, made a task nobody
//! followed in a process shutting down, and held the drain up until then (for a slot, up to
//! its retry deadline). A create on its way, or one that may have made a task, goes on, and
//! the drain waits for its answer. Below a stack with no layer that reports holding a create
//! back, no create admitted before the gate closed is refused.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use kling_tower::drain::DrainLayer;
//! use kling_tower::error::Draining;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), kling_core::BoxError> {
//! let client = service_fn(|_req: http::Request<Full<Bytes>>| async {
//!     Ok::<_, kling_core::BoxError>(http::Response::new(Full::new(Bytes::new())))
//! });
//! let (layer, handle) = DrainLayer::pair();
//! let service = layer.layer(client);
//! handle.drain().await; // nothing in flight: returns at once
//!
//! let create = http::Request::post("/v1/videos/text2video")
//!     .body(Full::new(Bytes::from(r#"{"prompt":"a cat"}"#)))?;
//! let refused = service.clone().oneshot(create).await.unwrap_err();
//! assert!(refused.is::<Draining>());
//! // Queries still pass: a caller may still follow the tasks it created.
//! let query = http::Request::get("/v1/videos/text2video/t1").body(Full::new(Bytes::new()))?;
//! assert!(service.oneshot(query).await.is_ok());
//! # Ok(())
//! # }
//! ```
//!
//! # Position
//!
//! Under the metrics layer (a refused create is counted) and above everything that waits: a
//! create refused here holds no slot, no rate-limit turn and no budget. For the same reasons,
//! in [`KlingLayer`](crate::KlingLayer)'s stack with an access key pair, the gate also
//! refuses a request to a new-style endpoint that the auth layer below would refuse
//! ([`ApiKeyRequired`](crate::error::ApiKeyRequired), [`AuthLayer::check_endpoint`]), before
//! the drain is looked at: it could never be sent, drained or not.

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use http::uri::PathAndQuery;
use http::{Method, Request};
use kling_core::signals::SendWatch;
use kling_core::{BoxError, PeekBody, Recognized, RequestKind};
use pin_project_lite::pin_project;
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;
use tower_layer::Layer;
use tower_service::Service;

use crate::auth::AuthLayer;
use crate::error::Draining;

/// How many counters the in-flight count is split into (a power of two).
const SHARDS: usize = 8;

/// What every shard's guard needs when it leaves: whether a drain waits, and how to wake it.
#[derive(Debug, Default)]
struct Common {
    draining: AtomicBool,
    /// The drains waiting. Read by a leaving guard rather than `draining`: a drain the gate's
    /// reopening left waiting was never woken again.
    waiting: AtomicUsize,
    idle: Notify,
    /// Wakes the creates held back unsent below the gate when it closes, to refuse them.
    closing: Arc<Notify>,
}

impl Common {
    /// Closes the gate, and wakes the creates waiting below it to be refused.
    fn close(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.closing.notify_waiters();
    }
}

/// Counts a drain as waiting ([`Common::waiting`]) until it returns or is dropped.
struct Waiting<'a>(&'a Common);

impl<'a> Waiting<'a> {
    fn new(common: &'a Common) -> Self {
        common.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(common)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One slice of the in-flight count. Each thread enters through its own shard, so the
/// reference count and counter a request touches stay in that thread's cache instead of one
/// line every thread writes (the 64-task column of `kling-bench overhead`). Aligned so two
/// shards never share a cache line.
#[derive(Debug)]
#[repr(align(64))]
struct Shard {
    in_flight: AtomicUsize,
    common: Arc<Common>,
}

#[derive(Debug)]
struct Gate {
    common: Arc<Common>,
    shards: [Arc<Shard>; SHARDS],
}

impl Default for Gate {
    fn default() -> Self {
        let common = Arc::new(Common::default());
        Gate {
            shards: std::array::from_fn(|_| {
                Arc::new(Shard {
                    in_flight: AtomicUsize::new(0),
                    common: common.clone(),
                })
            }),
            common,
        }
    }
}

/// The next shard index handed to a thread.
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's shard index, handed out round-robin on first use.
    static THREAD_SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The shard this thread enters through.
#[inline]
fn thread_shard() -> usize {
    THREAD_SHARD.with(|shard| {
        let mut index = shard.get();
        if index == usize::MAX {
            index = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
            shard.set(index);
        }
        index
    })
}

impl Gate {
    #[inline]
    fn enter(&self) -> DrainGuard {
        self.enter_at(thread_shard())
    }

    fn enter_at(&self, shard: usize) -> DrainGuard {
        let shard = self.shards[shard % SHARDS].clone();
        // SeqCst here, in the guard's drop and in `drain`: a drain that reads a shard before a
        // guard leaves it must be woken by that guard (see `DrainGuard::drop`).
        shard.in_flight.fetch_add(1, Ordering::SeqCst);
        DrainGuard { shard }
    }

    /// Counts a request in flight, unless the gate is closed and `refused` says the gate keeps
    /// it out (a create): `Err` when refused, `Ok(None)` when admitted while the gate is
    /// closed, uncounted. The count comes first and the flag is read after it, both `SeqCst`,
    /// as `drain` stores the flag and then sums the counts: either this read sees the gate
    /// closed, or the drain's sum sees this request. Read the other way round, a drain could
    /// store the flag, find nothing in flight and return between the read and the count, and
    /// a create would go out after it.
    ///
    /// A request the closed gate lets through (a query, a list) is not counted: the drain
    /// waits for what entered before it, and for the work [`DrainGuard`]s hold (the tasks a
    /// follower follows, whose queries these may be). Counted, a steady stream of queries,
    /// each starting before the last ended, kept the count from ever reaching zero, and the
    /// drain from returning.
    #[inline]
    fn admit(&self, refused: impl FnOnce() -> bool) -> Result<Option<DrainGuard>, ()> {
        let guard = self.enter();
        if self.is_draining() {
            return if refused() { Err(()) } else { Ok(None) };
        }
        Ok(Some(guard))
    }

    /// The sum of the shards, each read once: zero means every piece of work that entered
    /// before this read began has left.
    fn in_flight(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.in_flight.load(Ordering::SeqCst))
            .sum()
    }

    #[inline]
    fn is_draining(&self) -> bool {
        self.common.draining.load(Ordering::SeqCst)
    }
}

/// Counts one piece of work as in flight until dropped; a drain waits for it.
///
/// From [`DrainHandle::track`]; the [`Drain`] service holds one per request.
pub struct DrainGuard {
    shard: Arc<Shard>,
}

impl fmt::Debug for DrainGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainGuard").finish_non_exhaustive()
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        // The last guard to leave its shard while a drain waits wakes it; the drain then sums
        // every shard again. The last guard of all empties its shard, so it always wakes it.
        // A drain waits whether or not the gate was reopened meanwhile.
        if self.shard.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && self.shard.common.waiting.load(Ordering::SeqCst) > 0
        {
            self.shard.common.idle.notify_waiters();
        }
    }
}

/// Closes the gate and waits for what is in flight. See the [module docs](self).
///
/// # Clone
///
/// Clones control the same gate as the [`DrainLayer`] and every service it built.
#[derive(Clone, Debug)]
pub struct DrainHandle {
    gate: Arc<Gate>,
}

impl DrainHandle {
    /// Stops admitting creates, then waits until nothing is in flight (the requests admitted
    /// before the gate closed, and work held by [`DrainGuard`]s such as followed tasks): it
    /// returns once one pass over the per-thread in-flight counters finds them all at zero.
    /// Queries and lists admitted after the gate closed are not waited for (their stream may
    /// never pause); a follower's still are, through the guard of the task it follows.
    ///
    /// A create admitted earlier and still held back unsent below the gate is refused with
    /// [`Draining`] (see the [module docs](self)).
    ///
    /// A [`reopen`](Self::reopen) meanwhile does not call it off: it still returns once
    /// nothing is in flight (the creates admitted since included), with the gate open.
    ///
    /// Wrap it in `tokio::time::timeout` to bound the wait.
    pub async fn drain(&self) {
        // Counted as waiting before the gate closes and the shards are read: a guard that
        // leaves after this reads it and wakes the drain, or left before the read.
        let _waiting = Waiting::new(&self.gate.common);
        self.gate.common.close();
        loop {
            let idle = self.gate.common.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.gate.in_flight() == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Stops admitting creates without waiting (those held back unsent below the gate are
    /// refused too, as by [`drain`](Self::drain)).
    pub fn close(&self) {
        self.gate.common.close();
    }

    /// Admits creates again.
    pub fn reopen(&self) {
        self.gate.common.draining.store(false, Ordering::SeqCst);
    }

    /// Whether creates are refused.
    pub fn is_draining(&self) -> bool {
        self.gate.is_draining()
    }

    /// Requests and guards in flight now (the sum of the per-thread counters).
    pub fn in_flight(&self) -> usize {
        self.gate.in_flight()
    }

    /// Counts a piece of work (e.g. following a task) as in flight until the guard drops.
    pub fn track(&self) -> DrainGuard {
        self.gate.enter()
    }
}

/// Applies [`Drain`] to a service. See the [module docs](self).
///
/// # Clone
///
/// Clones, the services they build and the [`DrainHandle`] share one gate.
#[derive(Clone, Debug, Default)]
pub struct DrainLayer {
    gate: Arc<Gate>,
}

impl DrainLayer {
    /// An open gate.
    pub fn new() -> Self {
        DrainLayer::default()
    }

    /// An open gate and its handle.
    pub fn pair() -> (DrainLayer, DrainHandle) {
        let layer = DrainLayer::new();
        let handle = layer.handle();
        (layer, handle)
    }

    /// A handle on this gate.
    pub fn handle(&self) -> DrainHandle {
        DrainHandle {
            gate: self.gate.clone(),
        }
    }
}

impl<S> Layer<S> for DrainLayer {
    type Service = Drain<S>;

    fn layer(&self, inner: S) -> Drain<S> {
        Drain {
            inner,
            gate: self.gate.clone(),
            endpoint_check: None,
        }
    }
}

/// Refuses creates while draining and counts requests in flight. See the [module docs](self).
///
/// # Clone
///
/// Clones share the gate of the [`DrainLayer`] that built them.
#[derive(Clone)]
pub struct Drain<S> {
    inner: S,
    gate: Arc<Gate>,
    /// In [`KlingLayer`](crate::KlingLayer)'s stack with an access key pair: its auth layer,
    /// whose JWT Kling refuses on a new-style endpoint. Such a request is refused here, at the
    /// gate: counted by the metrics layer above, and before any layer below gives it a rate
    /// turn or a slot only for the auth layer to refuse it.
    endpoint_check: Option<AuthLayer>,
}

impl<S: fmt::Debug> fmt::Debug for Drain<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drain")
            .field("inner", &self.inner)
            .field("draining", &self.gate.is_draining())
            .finish_non_exhaustive()
    }
}

impl<S> Drain<S> {
    /// Refuses at the gate what `auth` would refuse for its endpoint
    /// ([`AuthLayer::check_endpoint`]), whether draining or not: the request could never be
    /// sent, and that is the error that names the fix.
    pub(crate) fn check_endpoints(mut self, auth: Option<AuthLayer>) -> Self {
        self.endpoint_check = auth;
        self
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for Drain<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
    B: PeekBody,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if let Some(auth) = &self.endpoint_check
            && let Err(refused) = auth.check_endpoint(&request)
        {
            return ResponseFuture {
                future: None,
                guard: None,
                held: None,
                refused: Some(Box::new(refused)),
            };
        }
        let admitted = self.gate.admit(|| creates(&mut request));
        match admitted {
            Ok(guard) => {
                // A create admitted while the gate is open: refused still, should the gate close
                // while a layer below holds it back unsent.
                let held = (guard.is_some() && creates(&mut request)).then(|| HeldCreate {
                    watch: SendWatch::shared(&mut request),
                    path: request.uri().path_and_query().cloned(),
                    closing: None,
                });
                ResponseFuture {
                    future: Some(self.inner.call(request)),
                    guard,
                    held,
                    refused: None,
                }
            }
            Err(()) => ResponseFuture {
                future: None,
                guard: None,
                held: None,
                refused: Some(Box::new(Draining::new(request.uri().path()))),
            },
        }
    }
}

/// Whether the closed gate keeps `request` out: a create, or a `POST` the router does not
/// recognise, which may be a create endpoint newer than this crate (the retry layer treats it
/// so), so none goes out after a drain. A `POST` the router knows as Kling's and no create
/// (`identify-face`: it answers at once, with no task) passes, when its path is written
/// plainly, as the retry layer reads it.
fn creates<B: PeekBody>(request: &mut Request<B>) -> bool {
    if request.method() != Method::POST {
        return false;
    }
    // The stack's entry has recognised it already: one lookup rather than `of`'s two.
    let (kind, answers_at_once) = match Recognized::cached(request) {
        Some(recognized) => (recognized.kind, recognized.answers_at_once),
        None => {
            let recognized = Recognized::of(request);
            (recognized.kind, recognized.answers_at_once)
        }
    };
    match kind {
        RequestKind::Create => true,
        RequestKind::Other => {
            !(answers_at_once && kling_core::Route::written_plainly(request.uri().path()))
        }
        _ => false,
    }
}

/// A create admitted while the gate was open, watched while it waits below the gate: once the
/// gate closes, one that a layer below still holds back unsent (for its rate turn, a task slot,
/// or the retry layer's backoff after attempts that made no task: [`SendWatch::never_sent`])
/// is refused as a create arriving then is, and dropped, so those layers give back what they
/// held for it. One that may have made a task goes on.
struct HeldCreate {
    watch: SendWatch,
    /// For the refusal's path (not the whole URI: the future is moved, and kept small).
    path: Option<PathAndQuery>,
    /// Wakes the create's task when the gate closes; made on its first wait.
    closing: Option<Pin<Box<OwnedNotified>>>,
}

impl HeldCreate {
    /// Has the task woken when the gate closes (from now: a close before this call is read from
    /// the flag after it).
    fn listen(&mut self, closing: &Arc<Notify>, cx: &mut Context<'_>) {
        loop {
            let notified = self
                .closing
                .get_or_insert_with(|| Box::pin(Arc::clone(closing).notified_owned()));
            if notified.as_mut().poll(cx).is_pending() {
                return;
            }
            // Woken already: listen again, for a gate reopened and closed once more.
            self.closing = None;
        }
    }

    /// Whether the closed gate refuses the create now: held back unsent below it.
    fn refused(&self, common: &Common) -> bool {
        common.draining.load(Ordering::SeqCst) && self.watch.never_sent()
    }
}

pin_project! {
    /// The [`Drain`] response future: the inner future with its in-flight guard, or a refused
    /// create (or, in the stack, a request its credentials cannot be sent on).
    pub struct ResponseFuture<F> {
        // Fields rather than an enum of states: the inner future (the whole stack below, in
        // the Pro stack) is written in place once instead of being moved into a variant.
        #[pin]
        future: Option<F>,
        guard: Option<DrainGuard>,
        // A create admitted while the gate was open.
        held: Option<HeldCreate>,
        refused: Option<BoxError>,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(future) = this.future.as_mut().as_pin_mut() {
            let common = this.guard.as_ref().map(|guard| &guard.shard.common);
            let held = this.held.as_mut().zip(common);
            if !held
                .as_ref()
                .is_some_and(|(held, common)| held.refused(common))
            {
                if let Poll::Ready(output) = future.poll(cx) {
                    drop(this.guard.take());
                    *this.held = None;
                    return Poll::Ready(output.map_err(Into::into));
                }
                // Held back unsent below: listening for the gate closing first, then reading the
                // flag. A create on its way is not (only a poll of it can hold it back again).
                let Some((held, common)) = held.filter(|(held, _)| held.watch.never_sent()) else {
                    return Poll::Pending;
                };
                held.listen(&common.closing, cx);
                if !held.refused(common) {
                    return Poll::Pending;
                }
            }
            // Held back unsent when the gate closed: dropped here, refused as never sent.
            this.future.set(None);
            drop(this.guard.take());
            let path = this.held.take().and_then(|held| held.path);
            return Poll::Ready(Err(Box::new(Draining::new(
                path.as_ref().map_or("/", PathAndQuery::path),
            ))));
        }
        Poll::Ready(Err(this
            .refused
            .take()
            .unwrap_or_else(|| "drain future polled after completion".into())))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A request is counted in flight before the closed gate is read for it, so a drain that
    /// closes the gate and finds nothing in flight cannot miss a create admitted meanwhile.
    #[test]
    fn a_request_is_counted_before_the_gate_is_read() {
        let (layer, handle) = DrainLayer::pair();
        handle.close();
        let mut counted_when_judged = None;
        let admitted = layer.gate.admit(|| {
            counted_when_judged = Some(handle.in_flight());
            true
        });
        assert!(admitted.is_err(), "a create is refused while draining");
        assert_eq!(counted_when_judged, Some(1), "judged while counted");
        assert_eq!(handle.in_flight(), 0, "a refused request leaves no count");
        let query = layer.gate.admit(|| false);
        assert!(matches!(query, Ok(None)), "a query passes uncounted");
        assert_eq!(handle.in_flight(), 0);

        handle.reopen();
        let guard = layer
            .gate
            .admit(|| unreachable!("an open gate judges nothing"));
        assert!(matches!(guard, Ok(Some(_))));
        assert_eq!(handle.in_flight(), 1);
        drop(guard);
        assert_eq!(handle.in_flight(), 0);
    }

    /// While draining, a `POST` the router does not recognise (a create endpoint newer than
    /// this crate, maybe) is refused as a create is; lists, queries and unknown `GET`s pass.
    #[tokio::test]
    async fn draining_refuses_unrecognised_posts_and_lets_reads_through() {
        use tower::{Layer, ServiceExt, service_fn};

        let (layer, handle) = DrainLayer::pair();
        let service = layer.layer(service_fn(
            |_: Request<http_body_util::Full<bytes::Bytes>>| async { Ok::<_, BoxError>(()) },
        ));
        handle.close();
        let send = |method: Method, path: &str| {
            let request = Request::builder()
                .method(method)
                .uri(path)
                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                .unwrap();
            service.clone().oneshot(request)
        };
        for path in [
            "/v1/audio/text-to-audio",
            "/text-to-audio/kling-v1",
            "/v1/videos/text2video",
        ] {
            let refused = send(Method::POST, path).await.unwrap_err();
            assert!(refused.is::<Draining>(), "{path}: {refused}");
        }
        for (method, path) in [
            (Method::POST, "/tasks"),
            (Method::GET, "/v1/videos/text2video/t1"),
            (Method::GET, "/tasks?task_ids=t1"),
            (Method::GET, "/v1/audio/whatever"),
        ] {
            assert!(send(method.clone(), path).await.is_ok(), "{method} {path}");
        }
    }

    /// A `POST` the router knows as Kling's and no create (it answers at once, with no task)
    /// is neither refused at the closed gate nor when the gate closes while a layer below holds
    /// it back; a create is (the control), and so is such a `POST` written otherwise (a
    /// server may read it as a create). Before, each was refused as an unknown `POST`.
    #[tokio::test(start_paused = true)]
    async fn a_post_that_answers_at_once_passes_a_closed_gate() {
        use tower::{Layer, ServiceExt, service_fn};

        let (layer, handle) = DrainLayer::pair();
        // Held back unsent for a second, as a rate limiter waiting for a turn says it is.
        let service = layer.layer(service_fn(
            |request: Request<http_body_util::Full<bytes::Bytes>>| async move {
                SendWatch::held(&request);
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok::<_, BoxError>(())
            },
        ));
        let send = |path: &str| {
            let request = Request::post(path)
                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                .unwrap();
            tokio::spawn(service.clone().oneshot(request))
        };
        let answering = ["/v1/videos/identify-face", "/v1/videos/image-recognize"];
        let held: Vec<_> = answering.iter().map(|path| send(path)).collect();
        let create = send("/v1/videos/text2video");
        tokio::time::sleep(Duration::from_millis(10)).await;
        handle.close();
        for (task, path) in held.into_iter().zip(answering) {
            assert!(
                task.await.unwrap().is_ok(),
                "{path}, held when the gate closed"
            );
        }
        let refused = create.await.unwrap().unwrap_err();
        assert!(refused.is::<Draining>(), "{refused}");

        for path in answering {
            assert!(
                send(path).await.unwrap().is_ok(),
                "{path}, at the closed gate"
            );
        }
        for path in [
            "/v1/videos/text2video",
            "/v1/videos/./identify-face",
            "/v1/videos//identify-face",
            "/v1/videos/identify-face;x",
        ] {
            let refused = send(path).await.unwrap().unwrap_err();
            assert!(refused.is::<Draining>(), "{path}: {refused}");
        }
    }

    /// A create whose gate closes while the layers below are polled, before it listens for the
    /// close, is refused all the same: the flag is read again once it listens (the close woke
    /// nobody then).
    #[tokio::test(start_paused = true)]
    async fn a_create_is_refused_when_the_gate_closes_before_it_listens() {
        use tower::{Layer, ServiceExt, service_fn};

        let (layer, handle) = DrainLayer::pair();
        let service = layer.layer(service_fn(
            move |request: Request<http_body_util::Full<bytes::Bytes>>| {
                let handle = handle.clone();
                async move {
                    SendWatch::held(&request);
                    handle.close();
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    Ok::<_, BoxError>(())
                }
            },
        ));
        let create = Request::post("/v1/videos/text2video")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap();
        // Its own task, polled only when woken (a timeout around it would poll it again).
        let create = tokio::spawn(service.oneshot(create));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(
            create.is_finished(),
            "refused on the poll that closed the gate"
        );
        let refused = create.await.unwrap().unwrap_err();
        assert!(refused.is::<Draining>(), "{refused}");
    }

    /// A create held back below the gate through a close and a reopen (it waits on: the gate
    /// is open when it is next polled) is refused at the next close, whether or not it ran
    /// between the two: woken by the first, it listens again.
    #[tokio::test(start_paused = true)]
    async fn a_held_create_is_refused_at_a_close_after_a_close_and_a_reopen() {
        use tower::{Layer, ServiceExt, service_fn};

        for ran_between in [false, true] {
            let (layer, handle) = DrainLayer::pair();
            let service = layer.layer(service_fn(
                |request: Request<http_body_util::Full<bytes::Bytes>>| async move {
                    SendWatch::held(&request);
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    Ok::<_, BoxError>(())
                },
            ));
            let create = Request::post("/v1/videos/text2video")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                .unwrap();
            let create = tokio::spawn(service.oneshot(create));
            tokio::time::sleep(Duration::from_millis(1)).await;
            handle.close();
            handle.reopen();
            if ran_between {
                tokio::time::sleep(Duration::from_millis(1)).await;
                assert!(!create.is_finished(), "reopened: it waits on");
            }
            handle.close();
            let refused = tokio::time::timeout(Duration::from_millis(1), create)
                .await
                .expect("refused at the second close")
                .unwrap()
                .unwrap_err();
            assert!(refused.is::<Draining>(), "{refused}");
        }
    }

    /// Queries that overlap without a pause (one every 5 ms, each 10 ms long) do not keep a
    /// drain from returning once the create admitted before it is answered; before, each was
    /// counted, the count never reached zero, and the drain never returned.
    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_of_queries_does_not_hold_a_drain_up() {
        use tower::{Layer, ServiceExt, service_fn};

        let (layer, handle) = DrainLayer::pair();
        let service = layer.layer(service_fn(
            |request: Request<http_body_util::Full<bytes::Bytes>>| async move {
                let long = if request.method() == Method::POST {
                    200
                } else {
                    10
                };
                tokio::time::sleep(Duration::from_millis(long)).await;
                Ok::<_, BoxError>(())
            },
        ));
        let request = |method: Method, path: &str| {
            Request::builder()
                .method(method)
                .uri(path)
                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                .unwrap()
        };
        let create = tokio::spawn(
            service
                .clone()
                .oneshot(request(Method::POST, "/v1/videos/text2video")),
        );
        let queries = tokio::spawn({
            let service = service.clone();
            async move {
                loop {
                    let query = request(Method::GET, "/v1/videos/text2video/t1");
                    tokio::spawn(service.clone().oneshot(query));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let start = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(60), handle.drain())
            .await
            .expect("the drain returns");
        assert!(
            create.await.unwrap().is_ok(),
            "the create admitted before it ran"
        );
        assert!(
            start.elapsed() <= Duration::from_millis(160),
            "{:?}",
            start.elapsed()
        );
        queries.abort();
    }

    /// Guards entered through different shards add up, and a drain waits for the last of them,
    /// whichever shard it left last.
    #[tokio::test(start_paused = true)]
    async fn a_drain_waits_for_guards_on_every_shard() {
        for last in 0..SHARDS {
            let (layer, handle) = DrainLayer::pair();
            let mut guards: Vec<Option<DrainGuard>> =
                (0..SHARDS).map(|i| Some(layer.gate.enter_at(i))).collect();
            let extra = layer.gate.enter_at(last);
            assert_eq!(handle.in_flight(), SHARDS + 1);
            let drain = tokio::spawn({
                let handle = handle.clone();
                async move { handle.drain().await }
            });
            tokio::time::sleep(Duration::from_millis(1)).await;
            assert!(handle.is_draining());
            drop(extra);
            for (i, guard) in guards.iter_mut().enumerate() {
                if i != last {
                    guard.take();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    assert!(!drain.is_finished(), "shard {i} of {last}");
                }
            }
            assert_eq!(handle.in_flight(), 1);
            guards[last].take();
            tokio::time::timeout(Duration::from_secs(1), drain)
                .await
                .expect("the drain ends once the last guard leaves")
                .unwrap();
            assert_eq!(handle.in_flight(), 0);
        }
    }

    /// A drain waiting when the gate is reopened (a "resume" while a "drain" call waits) still
    /// returns once nothing is in flight. The last request to leave woke a drain only while
    /// the gate was closed, so this one waited for ever.
    #[tokio::test(start_paused = true)]
    async fn a_drain_waiting_when_the_gate_reopens_returns_once_nothing_is_in_flight() {
        let (layer, handle) = DrainLayer::pair();
        let guard = layer.handle().track();
        let drain = tokio::spawn({
            let handle = handle.clone();
            async move { handle.drain().await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!drain.is_finished(), "a request is in flight");
        handle.reopen();
        drop(guard);
        tokio::time::timeout(Duration::from_secs(60), drain)
            .await
            .expect("the drain returns")
            .unwrap();
        assert!(!handle.is_draining(), "the gate stays open");
    }

    /// Guards dropped on other threads than the one they entered on wake the drain too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn guards_dropped_on_other_threads_end_the_drain() {
        let (layer, handle) = DrainLayer::pair();
        let guards: Vec<DrainGuard> = (0..64).map(|_| layer.handle().track()).collect();
        assert_eq!(handle.in_flight(), 64);
        let drain = tokio::spawn({
            let handle = handle.clone();
            async move { handle.drain().await }
        });
        let mut leaving = Vec::new();
        for guard in guards {
            leaving.push(tokio::spawn(async move {
                tokio::task::yield_now().await;
                drop(guard);
            }));
        }
        for task in leaving {
            task.await.unwrap();
        }
        tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .expect("the drain ends")
            .unwrap();
        assert_eq!(handle.in_flight(), 0);
    }

    #[test]
    fn a_thread_keeps_its_shard() {
        let first = thread_shard();
        assert!(first < SHARDS);
        assert_eq!(thread_shard(), first);
        let other = std::thread::spawn(thread_shard).join().unwrap();
        assert!(other < SHARDS);
    }
}
