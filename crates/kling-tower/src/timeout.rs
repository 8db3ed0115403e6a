//! [`AttemptTimeoutLayer`]: a per-attempt timeout whose timer is armed only when the attempt
//! actually waits, and is one timer for all the attempts of a layer.
//!
//! tower's `Timeout` builds a `Sleep` for every call (a clock read, a runtime-handle clone, a
//! timer entry to tear down); an attempt answered at once — a cache, an in-memory client, a
//! mock — never needs one. This layer polls the attempt first and arms its deadline on the
//! first poll that finds it pending, so the time counts from that poll (the stack's layers poll
//! an attempt in the same step that sends it). A late attempt fails with tower's own
//! [`Elapsed`], so code that recognises tower's timeout keeps working.
//!
//! An attempt that waits is not given a `Sleep` of its own either: registering one with
//! tokio's timer per attempt cost some 850 ns (`kling-bench overhead`, "inner answers after one
//! wait"), most of it the time driver woken to take a timer due sooner than the one it sleeps
//! for. The attempts of a layer (and its services' clones) keep their deadlines in one list
//! instead, in the order they were set, and one task per layer and runtime (spawned on the
//! runtime's first wait) sleeps until the first of them, wakes the attempts whose time is up,
//! and goes back to sleep for at most the timeout: a deadline set later is never sooner, so
//! setting one needs nothing from that task. One per runtime, because a runtime kept but no
//! longer driven (a `current_thread` runtime between two `block_on`s) runs no task: its timer
//! would leave the attempts of every other runtime waiting. It holds no strong reference to
//! the layer, and ends within a timeout of the layer's last service being dropped.
//!
//! ```
//! use std::time::Duration;
//! use kling_tower::timeout::AttemptTimeoutLayer;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let stalled = service_fn(|_: ()| std::future::pending::<Result<(), std::convert::Infallible>>());
//! let service = AttemptTimeoutLayer::new(Duration::from_secs(30)).layer(stalled);
//! let error = service.oneshot(()).await.unwrap_err();
//! assert!(error.is::<tower::timeout::error::Elapsed>());
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use kling_core::BoxError;
use kling_core::lanes::{self, LANES, Lane, Lanes};
use kling_core::waitlist::WaitList;
use pin_project_lite::pin_project;
use tokio::runtime::{Handle, Id};
use tokio::time::Instant;
use tower::timeout::error::Elapsed;
use tower_layer::Layer;
use tower_service::Service;

/// Fails an attempt that takes longer than a timeout; see the [module docs](self).
///
/// # Clone
///
/// Clones, and every service they build, share one list of deadlines and its timer.
#[derive(Clone, Debug)]
pub struct AttemptTimeoutLayer {
    deadlines: Arc<Deadlines>,
}

impl AttemptTimeoutLayer {
    /// A layer failing attempts still pending `timeout` after their first poll (with
    /// `Duration::ZERO`, on that poll).
    pub fn new(timeout: Duration) -> Self {
        AttemptTimeoutLayer {
            deadlines: Arc::new(Deadlines::new(timeout)),
        }
    }

    /// The timeout.
    pub fn timeout(&self) -> Duration {
        self.deadlines.timeout
    }
}

impl<S> Layer<S> for AttemptTimeoutLayer {
    type Service = AttemptTimeout<S>;

    fn layer(&self, inner: S) -> AttemptTimeout<S> {
        AttemptTimeout {
            inner,
            deadlines: Arc::new(Lanes::new(Arc::clone(&self.deadlines))),
        }
    }
}

/// The deadlines, one reference per thread: a response future takes its thread's, so the
/// threads of a runtime never write one shared reference count per request.
type Shared = Arc<Lanes<Arc<Deadlines>>>;

/// The service [`AttemptTimeoutLayer`] builds.
///
/// # Clone
///
/// Clones share the layer's deadlines and timer and clone the inner service.
#[derive(Clone, Debug)]
pub struct AttemptTimeout<S> {
    inner: S,
    deadlines: Shared,
}

impl<S> AttemptTimeout<S> {
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

impl<S, R> Service<R> for AttemptTimeout<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        // The lane's reference first: with nothing left to run after the inner call, its
        // future is built in place in this one rather than built aside and copied over (the
        // stack's inner future is some 200 bytes; 29 instructions a request).
        let deadlines = self.deadlines.lane();
        ResponseFuture {
            inner: self.inner.call(request),
            deadlines,
            armed: None,
        }
    }
}

/// The deadlines of a layer's attempts that wait, and the task that fails the late ones.
///
/// One list per lane (the threads' [`kling_core::lanes`]): an attempt sets its deadline in its
/// thread's list, so the threads of a runtime do not take turns at one lock per attempt, nor
/// write one cache line (each list has its own, and its own ticket count).
struct Deadlines {
    timeout: Duration,
    lanes: [LaneDeadlines; LANES],
    /// The runtimes a timer task runs on (added by the attempt that spawns it, removed when
    /// the task ends, or when its runtime drops it).
    timers: Mutex<Vec<Id>>,
    /// The key ([`runtime_key`]) of one runtime in `timers`, 0 for none: an attempt on it
    /// arms without taking that lock.
    known: AtomicU64,
}

impl fmt::Debug for Deadlines {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deadlines")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// One lane's deadlines, alone on its cache lines (two: adjacent-line prefetching pairs them):
/// the two threads of a runtime each write their own.
#[repr(align(128))]
#[derive(Default)]
struct LaneDeadlines(Mutex<LaneList>);

/// A lane's list and the next ticket of its attempts (searched for in this list only).
#[derive(Default)]
struct LaneList {
    list: WaitList<Instant>,
    next_ticket: u64,
}

impl std::ops::Deref for LaneList {
    type Target = WaitList<Instant>;

    fn deref(&self) -> &WaitList<Instant> {
        &self.list
    }
}

impl std::ops::DerefMut for LaneList {
    fn deref_mut(&mut self) -> &mut WaitList<Instant> {
        &mut self.list
    }
}

impl Deadlines {
    fn new(timeout: Duration) -> Deadlines {
        Deadlines {
            timeout,
            lanes: std::array::from_fn(|_| LaneDeadlines::default()),
            timers: Mutex::new(Vec::new()),
            known: AtomicU64::new(0),
        }
    }

    fn lane(&self, lane: usize) -> MutexGuard<'_, LaneList> {
        self.lanes[lane].0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A timeout from `now`; a year ahead where the clock holds no more (the timer sleeps at
    /// most a timeout at a time).
    fn after(&self, now: Instant) -> Instant {
        now.checked_add(self.timeout)
            .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
    }

    /// Sets a waiting attempt's deadline a timeout from now, in this thread's list; its lane,
    /// ticket and deadline.
    fn arm(self: &Arc<Self>, waker: &Waker) -> (usize, u64, Instant) {
        let lane = lanes::current();
        let (ticket, deadline) = {
            // Ticket and deadline taken under the list's lock (threads beyond the lanes share
            // them), so both rise along each list: it is searched by ticket, and the timer
            // reads its deadlines from the front.
            let mut list = self.lane(lane);
            let ticket = list.next_ticket;
            list.next_ticket += 1;
            let deadline = self.after(Instant::now());
            list.push_back(ticket, deadline, waker.clone());
            (ticket, deadline)
        };
        let runtime = Handle::current();
        let id = runtime.id();
        let key = runtime_key(&id);
        if self.known.load(Ordering::Acquire) != key {
            self.ensure_timer(&runtime, id, key);
        }
        (lane, ticket, deadline)
    }

    /// Spawns a timer on `runtime` unless one runs there.
    #[cold]
    fn ensure_timer(self: &Arc<Self>, runtime: &Handle, id: Id, key: u64) {
        let mut timers = self.timers.lock().unwrap_or_else(|e| e.into_inner());
        if !timers.contains(&id) {
            timers.push(id);
            // The guard is made here and moved in: a task its runtime drops before its first
            // poll (the runtime shutting down) still drops it, so the runtime is never left
            // listed with no timer running, which would leave its attempts without a timeout.
            runtime.spawn(fail_late_attempts(TimerRunning {
                deadlines: Arc::downgrade(self),
                id,
                key,
            }));
        }
        self.known.store(key, Ordering::Release);
    }

    /// The attempt holding `ticket` is polled again: it will be woken with `waker`. False when
    /// its place is gone: the timer took it out, as late, and woke the waker it had then.
    fn rewake(&self, lane: usize, ticket: u64, waker: &Waker) -> bool {
        let mut list = self.lane(lane);
        match list.position(ticket) {
            Some(at) => {
                list.set_waker(at, waker);
                true
            }
            None => false,
        }
    }

    /// The attempt holding `ticket` is done (answered, failed late, or dropped).
    fn disarm(&self, lane: usize, ticket: u64) {
        self.lane(lane).remove(ticket);
    }

    /// Wakes every attempt whose deadline has come; the first deadline left, if any.
    fn wake_late(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut due = Vec::new();
        for lane in 0..LANES {
            let mut list = self.lane(lane);
            while list.front().is_some_and(|w| w.value <= now) {
                if let Some(waker) = list.pop_front().and_then(|w| w.waker) {
                    due.push(waker);
                }
            }
            if let Some(first) = list.front() {
                next = Some(next.map_or(first.value, |n| n.min(first.value)));
            }
        }
        due.into_iter().for_each(Waker::wake);
        next
    }
}

/// A runtime's id as a nonzero number, for [`Deadlines::known`] (an `Id` is a nonzero
/// number, which its `Hash` writes).
fn runtime_key(id: &Id) -> u64 {
    /// Keeps what is written, folded into one number.
    struct Key(u64);
    impl Hasher for Key {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for &byte in bytes {
                self.0 = self.0.rotate_left(8) ^ u64::from(byte);
            }
        }
        fn write_u64(&mut self, n: u64) {
            self.0 = self.0.rotate_left(32) ^ n;
        }
    }
    let mut key = Key(0);
    id.hash(&mut key);
    key.finish().max(1)
}

/// Takes its runtime out of [`Deadlines::timers`] when the timer task ends or its runtime
/// drops it, so the runtime's next attempt that waits spawns another.
struct TimerRunning {
    deadlines: Weak<Deadlines>,
    id: Id,
    key: u64,
}

impl Drop for TimerRunning {
    fn drop(&mut self) {
        if let Some(deadlines) = self.deadlines.upgrade() {
            let mut timers = deadlines.timers.lock().unwrap_or_else(|e| e.into_inner());
            timers.retain(|id| *id != self.id);
            // Under the lock, so no attempt lists the runtime again in between.
            let _ =
                deadlines
                    .known
                    .compare_exchange(self.key, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

/// The layer's timer: wakes every attempt whose deadline has come, then sleeps until the next
/// deadline, or for a timeout when there is none sooner (a deadline set meanwhile is at least
/// that far), until the layer is gone.
async fn fail_late_attempts(running: TimerRunning) {
    let deadlines = running.deadlines.clone();
    let _running = running;
    loop {
        let next = {
            let Some(deadlines) = deadlines.upgrade() else {
                return;
            };
            let now = Instant::now();
            let idle = deadlines.after(now);
            deadlines
                .wake_late(now)
                .map_or(idle, |first| first.min(idle))
        };
        tokio::time::sleep_until(next).await;
    }
}

/// A waiting attempt's place in its layer's deadlines (given up by its future when it ends or
/// is dropped: the future holds the deadlines already, so the place needs no reference of its
/// own).
#[derive(Clone, Copy, Debug)]
struct Armed {
    lane: usize,
    ticket: u64,
    deadline: Instant,
}

pin_project! {
    /// The [`AttemptTimeout`] response future.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        deadlines: Arc<Lane<Arc<Deadlines>>>,
        // Set on the first pending poll.
        armed: Option<Armed>,
    }
    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(armed) = this.armed.take() {
                this.deadlines.disarm(armed.lane, armed.ticket);
            }
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // Returned as polled (not taken apart and put together again): the answer is copied
        // once, not twice.
        let polled = this.inner.poll(cx);
        if polled.is_ready() {
            if let Some(armed) = this.armed.take() {
                this.deadlines.disarm(armed.lane, armed.ticket);
            }
            return polled.map_err(Into::into);
        }
        match *this.armed {
            // Late as soon as it waits, with no deadline listed: the timer, sleeping until a
            // timeout from now, would wake at once for ever.
            None if this.deadlines.timeout.is_zero() => Poll::Ready(Err(Box::new(Elapsed::new()))),
            None => {
                let (lane, ticket, deadline) = this.deadlines.arm(cx.waker());
                *this.armed = Some(Armed {
                    lane,
                    ticket,
                    deadline,
                });
                Poll::Pending
            }
            Some(armed) if Instant::now() >= armed.deadline => {
                *this.armed = None;
                this.deadlines.disarm(armed.lane, armed.ticket);
                Poll::Ready(Err(Box::new(Elapsed::new())))
            }
            // The timer took the place out between the clock read above and here (it wakes
            // the waker the place held, perhaps another task's): late all the same.
            Some(armed) if !this.deadlines.rewake(armed.lane, armed.ticket, cx.waker()) => {
                *this.armed = None;
                Poll::Ready(Err(Box::new(Elapsed::new())))
            }
            Some(_) => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::time::Instant;
    use tower::{ServiceExt, service_fn};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_ready_attempt_passes_and_a_slow_one_times_out_from_its_first_poll() {
        let calls = Arc::new(AtomicU32::new(0));
        let counter = Arc::clone(&calls);
        let service = AttemptTimeoutLayer::new(Duration::from_secs(5)).layer(service_fn(
            move |delay: u64| {
                counter.fetch_add(1, Ordering::Relaxed);
                async move {
                    tokio::time::sleep(Duration::from_secs(delay)).await;
                    Ok::<_, BoxError>(delay)
                }
            },
        ));
        assert_eq!(service.clone().oneshot(0).await.unwrap(), 0);
        assert_eq!(service.clone().oneshot(4).await.unwrap(), 4);
        let start = Instant::now();
        let error = service.clone().oneshot(6).await.unwrap_err();
        assert!(error.is::<Elapsed>(), "{error}");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(calls.load(Ordering::Relaxed), 3);
    }

    /// Attempts armed at different times each fail at their own deadline, from the one timer;
    /// answered and dropped attempts leave the list empty.
    #[tokio::test(start_paused = true)]
    async fn each_waiting_attempt_fails_at_its_own_deadline_and_leaves_nothing_behind() {
        let layer = AttemptTimeoutLayer::new(Duration::from_secs(10));
        let service = layer.layer(service_fn(|delay: u64| async move {
            tokio::time::sleep(Duration::from_secs(delay)).await;
            Ok::<_, std::convert::Infallible>(delay)
        }));
        let start = Instant::now();
        let mut late = Vec::new();
        for i in 0..5 {
            let waiting = service.clone();
            late.push(tokio::spawn(async move {
                let error = waiting.oneshot(100).await.unwrap_err();
                assert!(error.is::<Elapsed>(), "{error}");
                Instant::now()
            }));
            let answered = service.clone().oneshot(1).await.unwrap();
            assert_eq!(answered, 1);
            assert_eq!(start.elapsed(), Duration::from_secs(i + 1));
        }
        for (i, late) in late.into_iter().enumerate() {
            let failed_at = late.await.unwrap();
            assert_eq!(failed_at - start, Duration::from_secs(i as u64 + 10));
        }
        // A waiting attempt dropped gives its place up.
        let dropped = tokio::time::timeout(Duration::from_secs(1), service.clone().oneshot(100));
        assert!(dropped.await.is_err());
        assert!((0..LANES).all(|lane| layer.deadlines.lane(lane).is_empty()));
    }

    /// The timer task holds no strong reference: it ends within a timeout of the layer being
    /// dropped.
    #[tokio::test(start_paused = true)]
    async fn the_timer_ends_once_the_layer_is_gone() {
        let layer = AttemptTimeoutLayer::new(Duration::from_secs(10));
        let service = layer.layer(service_fn(|_: ()| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, BoxError>(())
        }));
        service.clone().oneshot(()).await.unwrap();
        assert_eq!(
            layer.deadlines.timers.lock().unwrap().len(),
            1,
            "spawned on the first wait"
        );
        let deadlines = Arc::downgrade(&layer.deadlines);
        drop((layer, service));
        assert!(deadlines.upgrade().is_none());
        // The task wakes within a timeout, finds the layer gone and ends: nothing else runs,
        // so the runtime has no timer left to move the paused clock to.
        tokio::time::sleep(Duration::from_secs(11)).await;
        let remaining = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        assert_eq!(remaining, 0);
    }

    /// A layer used on a runtime that has gone, then on another: the timer is spawned again
    /// there, and a late attempt still fails.
    #[test]
    fn a_layer_outliving_its_runtime_times_out_on_the_next() {
        let layer = AttemptTimeoutLayer::new(Duration::from_millis(50));
        let service = layer.layer(service_fn(|delay: u64| async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            Ok::<_, BoxError>(delay)
        }));
        for _ in 0..2 {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            runtime.block_on(async {
                assert_eq!(service.clone().oneshot(1).await.unwrap(), 1);
                let error = service.clone().oneshot(10_000).await.unwrap_err();
                assert!(error.is::<Elapsed>(), "{error}");
            });
        }
    }

    /// A runtime dropped before its timer task was first polled (an attempt armed, then given
    /// up at once, as a `select!` with another branch ready does): the next runtime's late
    /// attempt still times out. The flag that says a timer runs was left set before, with no
    /// timer, and no attempt timed out again.
    #[test]
    fn a_timer_its_runtime_never_polled_is_spawned_again_on_the_next() {
        let layer = AttemptTimeoutLayer::new(Duration::from_millis(50));
        let service = layer.layer(service_fn(|delay: u64| async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            Ok::<_, BoxError>(delay)
        }));
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap()
        };
        runtime().block_on(async {
            let mut attempt = Box::pin(service.clone().oneshot(10_000));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(attempt.as_mut().poll(&mut cx).is_pending(), "armed");
        });
        let late = runtime().block_on(async {
            tokio::time::timeout(Duration::from_secs(5), service.clone().oneshot(3_000)).await
        });
        match late {
            Ok(Err(error)) => assert!(error.is::<Elapsed>(), "{error}"),
            other => panic!("the attempt did not time out: {other:?}"),
        }
    }

    /// An attempt whose place the timer has taken out (it woke the waker the place held) and
    /// that is polled again, by another task, before the clock reads its deadline: it fails as
    /// late rather than waiting for a wake that already went to the other waker.
    #[tokio::test(start_paused = true)]
    async fn an_attempt_the_timer_took_out_fails_when_polled_again() {
        let layer = AttemptTimeoutLayer::new(Duration::from_secs(10));
        let service = layer.layer(service_fn(|_: ()| {
            std::future::pending::<Result<(), std::convert::Infallible>>()
        }));
        let mut attempt = Box::pin(service.oneshot(()));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(attempt.as_mut().poll(&mut cx).is_pending(), "armed");
        // The timer's step, without its clock: the place taken out and its waker woken.
        let lane = lanes::current();
        let taken = layer.deadlines.lane(lane).pop_front().expect("the place");
        taken.waker.expect("a waker").wake();
        match attempt.as_mut().poll(&mut cx) {
            Poll::Ready(Err(error)) => assert!(error.is::<Elapsed>(), "{error}"),
            other => panic!("still waiting: {other:?}"),
        }
    }

    /// A runtime that hosted the layer's timer and is kept but no longer driven (a
    /// `current_thread` runtime between two `block_on`s) runs no task: a late attempt on
    /// another runtime failed only when something else polled it (here, the 2 s guard),
    /// never at its 50 ms. Each runtime now runs a timer of its own.
    #[test]
    fn a_runtime_kept_idle_does_not_hold_up_the_timeouts_of_another() {
        let layer = AttemptTimeoutLayer::new(Duration::from_millis(50));
        let service = layer.layer(service_fn(|delay: u64| async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            Ok::<_, BoxError>(delay)
        }));
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap()
        };
        let first = runtime();
        first.block_on(async { assert_eq!(service.clone().oneshot(1).await.unwrap(), 1) });
        let start = std::time::Instant::now();
        let late = runtime().block_on(async {
            tokio::time::timeout(Duration::from_secs(2), service.clone().oneshot(10_000)).await
        });
        let took = start.elapsed();
        match late {
            Ok(Err(error)) => assert!(error.is::<Elapsed>(), "{error}"),
            other => panic!("the attempt did not time out: {other:?}"),
        }
        assert!(took < Duration::from_secs(1), "timed out after {took:?}");
        drop(first);
    }

    /// A zero timeout fails an attempt that waits at once, and leaves no timer running: the
    /// timer slept until deadlines a timeout from now, which with no timeout is now, and
    /// spun for as long as the layer lived (a core busy; a paused clock never moved again).
    #[test]
    fn a_zero_timeout_fails_a_waiting_attempt_at_once_and_leaves_no_timer_spinning() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            runtime.block_on(async {
                let layer = AttemptTimeoutLayer::new(Duration::ZERO);
                let service = layer.layer(service_fn(|delay: u64| async move {
                    tokio::time::sleep(Duration::from_secs(delay)).await;
                    Ok::<_, BoxError>(delay)
                }));
                assert_eq!(
                    service.clone().oneshot(0).await.unwrap(),
                    0,
                    "ready at once"
                );
                let start = Instant::now();
                let error = service.clone().oneshot(1).await.unwrap_err();
                assert!(error.is::<Elapsed>(), "{error}");
                assert_eq!(start.elapsed(), Duration::ZERO);
                // The paused clock moves on only when nothing is ready to run.
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop((layer, service));
            });
            let _ = done.send(());
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the runtime went idle: no timer spins");
    }

    #[tokio::test(start_paused = true)]
    async fn the_inner_error_passes_through() {
        let service = AttemptTimeoutLayer::new(Duration::from_secs(5))
            .layer(service_fn(|_: ()| async { Err::<(), _>("refused") }));
        let error = service.oneshot(()).await.unwrap_err();
        assert_eq!(error.to_string(), "refused");
    }
}
