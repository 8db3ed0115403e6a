//! Scale: 100,000 queued waiters (bytes each, served in order), 1 to 100,000 keys (cost per
//! decision), 1,000 concurrent tasks followed to the end (by hand, and by the stack's
//! `Follower` one call each).

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant as StdInstant};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response};
use http_body_util::Full;
use kling_concurrency::{SlotsConfig, SlotsHandle, TaskSlotsLayer};
use kling_core::{AccountId, ClassifyLayer, Recognized};
use kling_mock::{MockConfig, MockKling, Preset};
use kling_ratelimit::{Adaptive, GcraLayer, Quota};
use kling_tower::{Credentials, KlingLayer, StackConfig, TaskRef};
use tokio::sync::{mpsc, oneshot};
use tower::{Layer, Service};

use crate::alloc::Counting;
use crate::cpu;
use crate::fixtures::{Req, Res, TASK_HEADER};

/// How big the runs are.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Queued waiters.
    pub waiters: usize,
    /// The most keys the GCRA decision is timed at (every count of [`KEY_COUNTS`] below it,
    /// and this one).
    pub keys: usize,
    /// Decisions per key-count measurement.
    pub decisions: usize,
    /// Concurrent tasks followed to the end.
    pub tasks: usize,
}

impl Options {
    /// The published configuration.
    pub fn full() -> Self {
        Options {
            waiters: 100_000,
            keys: 100_000,
            decisions: 200_000,
            tasks: 1_000,
        }
    }

    /// A smoke test.
    pub fn tiny() -> Self {
        Options {
            waiters: 500,
            keys: 50,
            decisions: 2_000,
            tasks: 20,
        }
    }
}

/// Queued waiters at one limiter.
#[derive(Clone, Debug, Default)]
pub struct Waiters {
    /// The limiter.
    pub limiter: String,
    /// Requests sent.
    pub count: usize,
    /// How many of them waited: still pending after the first poll (the rest the limiter let
    /// through at once). The bytes are per waiter of these; a limiter that queued none would
    /// have nothing measured.
    pub queued: usize,
    /// The limiter's own bytes per waiter (queue entries, wakers, timers, what it boxes beside
    /// the request), measured as the live-heap growth from calling and polling once, less the
    /// futures' own boxes (the requests the waiters hand over are the caller's too: their
    /// vector is freed as they move in).
    pub bytes_per_waiter: f64,
    /// The size of one response future (held by the caller, not the limiter).
    pub future_bytes: usize,
    /// CPU seconds to queue them all: every call, and the first poll that puts the waiter in
    /// the limiter's queue.
    pub queue_cpu_s: f64,
    /// CPU seconds to serve them all (paused time: the limiter's work, not the waiting).
    pub serve_cpu_s: f64,
    /// CPU seconds for as many queued waiters, queued anew, to give up in random order (their
    /// futures dropped), as callers whose deadlines differ do.
    pub give_up_cpu_s: f64,
    /// Requests that reached the inner service out of arrival order.
    pub out_of_order: usize,
}

/// The scale section's results.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Queued waiters per limiter.
    pub waiters: Vec<Waiters>,
    /// GCRA ns per decision by the number of keys cycled over round robin (1 first).
    pub keys: Vec<(usize, f64)>,
    /// The 1,000-task run: tasks, makespan (s), requests, CPU seconds, peak live-heap growth
    /// (bytes: the allocator's high-water mark from after the stack and mock were built).
    pub followed: (usize, f64, u64, f64, i64),
    /// New-style tasks followed by one `Follower::follow` call each: on clones of one follower
    /// (their calls share batch queries), then on a follower each (the control). For each:
    /// tasks completed, makespan (s), queries, CPU seconds (stack, follower and mock).
    pub follower: [(usize, f64, u64, f64); 2],
    /// The order check's control: waiters served out of order through a deliberately
    /// last-in-first-out gate ([`arrival_order_control`]), and how many waited.
    pub lifo_control: (usize, usize),
    /// The bytes check's control ([`bytes_control`]): bytes per waiter through a gate whose
    /// waiters hold [`BALLAST`] bytes each, and through the same gate without.
    pub bytes_control: (f64, f64),
}

/// The ballast of the bytes check's control: the bound the limiters are held to.
pub const BALLAST: usize = 256;

/// An always-ready inner that answers every request with a task that has already ended (so a
/// create gives its slot back at once) and counts requests that arrive out of order.
#[derive(Clone)]
struct InOrder {
    next: Arc<AtomicUsize>,
    late: Arc<AtomicUsize>,
    body: Bytes,
    /// Creates answer a running task `t{index}` (it holds its slot until completed), and the
    /// index is sent here, so the driver can end the task.
    hold: Option<mpsc::UnboundedSender<usize>>,
}

impl InOrder {
    fn new() -> Self {
        InOrder {
            next: Arc::new(AtomicUsize::new(0)),
            late: Arc::new(AtomicUsize::new(0)),
            body: Bytes::from_static(
                br#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t","task_status":"succeed"}}"#,
            ),
            hold: None,
        }
    }

    /// Creates hold their slot; the receiver hears of each task created.
    fn holding() -> (Self, mpsc::UnboundedReceiver<usize>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            InOrder {
                hold: Some(tx),
                ..InOrder::new()
            },
            rx,
        )
    }
}

impl Service<Req> for InOrder {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Res, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let index: usize = request
            .headers()
            .get(TASK_HEADER)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(usize::MAX);
        let expected = self.next.fetch_add(1, Ordering::Relaxed);
        if index != expected {
            self.late.fetch_add(1, Ordering::Relaxed);
        }
        let body = if let Some(created) = self
            .hold
            .as_ref()
            .filter(|_| request.method() == Method::POST)
        {
            let _ = created.send(index);
            Bytes::from(format!(
                r#"{{"code":0,"message":"SUCCEED","request_id":"r","data":{{"task_id":"t{index}","task_status":"submitted"}}}}"#
            ))
        } else {
            self.body.clone()
        };
        let mut response = Response::new(Full::new(body));
        response.headers_mut().insert(
            CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        ready(Ok(response))
    }
}

fn numbered(method: Method, index: usize) -> Req {
    let mut request = Request::new(Full::new(Bytes::from_static(b"{\"prompt\":\"x\"}")));
    *request.method_mut() = method;
    *request.uri_mut() = http::Uri::from_static("/v1/videos/text2video");
    request
        .headers_mut()
        .insert(TASK_HEADER, http::HeaderValue::from(index));
    request.extensions_mut().insert(AccountId::new("scale"));
    // Recognised up front, as `Kling::call` does for the whole stack: the recognition is the
    // request's, not a waiter's bookkeeping.
    Recognized::of(&mut request);
    request
}

/// Builds `count` response futures and polls each once (they queue), measuring the live-heap
/// growth of both steps: the limiters take a request's turn when it is called, and box what a
/// waiting request carries. The caller's part of that growth — the futures' own boxes — is taken
/// off; the requests moved into the limiter while they wait leave the measured vector they came
/// from, so what remains is the limiter's own bookkeeping.
///
/// Then serves them all in paused time, every waiter at once: each is spawned as a task of its
/// own, newest first, so the runtime polls them in the order the limiter wakes them (and at
/// first in reverse arrival order). Nothing in the driver puts them in order: a limiter that
/// lets a later waiter through first is seen at the inner service, which counts the requests
/// it is called with out of arrival order ([`arrival_order_control`] shows the count failing
/// for a last-in-first-out gate). With `slots`, each task created is ended as soon as the
/// inner service reports it, which frees the slot for the next waiter.
async fn queue<S>(
    name: &str,
    count: usize,
    method: Method,
    mut service: S,
    inner: &InOrder,
    slots: Option<(SlotsHandle, mpsc::UnboundedReceiver<usize>)>,
) -> Waiters
where
    S: Service<Req, Response = Res>,
    S::Future: 'static,
    S::Error: std::fmt::Debug + 'static,
{
    let requests: Vec<Req> = (0..count).map(|i| numbered(method.clone(), i)).collect();
    let mut futures: Vec<Pin<Box<S::Future>>> = Vec::with_capacity(count);
    let mut waiting = Vec::with_capacity(count);
    let mut cx = Context::from_waker(Waker::noop());
    let queue_cpu = cpu::thread();
    Counting::start();
    for request in requests {
        assert!(service.poll_ready(&mut cx).is_ready());
        futures.push(Box::pin(service.call(request)));
    }
    for mut future in futures {
        if future.as_mut().poll(&mut cx).is_pending() {
            waiting.push(future);
        }
    }
    let grown = Counting::stop();
    let queue_cpu_s = cpu::thread().saturating_sub(queue_cpu).as_secs_f64();
    let queued = waiting.len();
    let cpu = cpu::thread();
    if let Some((slots, mut created)) = slots {
        // Each task ends as soon as it is created: the next waiter's turn.
        tokio::task::spawn_local(async move {
            while let Some(i) = created.recv().await {
                slots.complete(&format!("t{i}")).await.expect("in-process");
            }
        });
    }
    let served: Vec<_> = waiting
        .into_iter()
        .rev()
        .map(tokio::task::spawn_local)
        .collect();
    for handle in served {
        handle
            .await
            .expect("a waiter never panics")
            .expect("served");
    }
    Waiters {
        limiter: name.to_owned(),
        count,
        queued,
        // The requests' vector and the futures' vector are freed inside the measured span
        // (the requests moved into the futures), which gives back what the moved requests
        // occupy in the limiter's boxes; the futures' own boxes are the caller's.
        bytes_per_waiter: (grown.live as f64 - (count * std::mem::size_of::<S::Future>()) as f64
            + (count * std::mem::size_of::<Pin<Box<S::Future>>>()) as f64)
            / queued.max(1) as f64,
        future_bytes: std::mem::size_of::<S::Future>(),
        queue_cpu_s,
        serve_cpu_s: cpu::thread().saturating_sub(cpu).as_secs_f64(),
        out_of_order: inner.late.load(Ordering::Relaxed),
        // Measured on a queue of its own ([`give_up`]).
        give_up_cpu_s: 0.0,
    }
}

/// Queues `count` waiters as [`queue`] does, then drops them in a random order (seeded, the
/// same every run); the CPU seconds the drops took.
fn give_up<S>(count: usize, method: &Method, mut service: S) -> f64
where
    S: Service<Req, Response = Res>,
{
    let mut cx = Context::from_waker(Waker::noop());
    let mut waiting: Vec<Option<Pin<Box<S::Future>>>> = Vec::with_capacity(count);
    for i in 0..count {
        assert!(service.poll_ready(&mut cx).is_ready());
        let mut future = Box::pin(service.call(numbered(method.clone(), i)));
        if future.as_mut().poll(&mut cx).is_pending() {
            waiting.push(Some(future));
        }
    }
    // A Fisher-Yates shuffle of the drop order on a xorshift generator.
    let mut order: Vec<usize> = (0..waiting.len()).collect();
    let mut x = 0x9E37_79B9_7F4A_7C15_u64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let cpu = cpu::thread();
    for i in order {
        waiting[i] = None;
    }
    cpu::thread().saturating_sub(cpu).as_secs_f64()
}

/// Runs the scale section.
pub fn run(options: Options, log: &mut dyn FnMut(&str)) -> Report {
    let mut report = Report::default();
    log("scale: queued waiters");
    let gcra = || {
        let inner = InOrder::new();
        let gcra = GcraLayer::new(Quota::per_second(1_000.0)).expect("valid");
        (gcra.layer(ClassifyLayer::new().layer(inner.clone())), inner)
    };
    let mut waiters = paused(async {
        let (service, inner) = gcra();
        queue(
            "GcraLayer",
            options.waiters,
            Method::GET,
            service,
            &inner,
            None,
        )
        .await
    });
    waiters.give_up_cpu_s = paused(async { give_up(options.waiters, &Method::GET, gcra().0) });
    report.waiters.push(waiters);
    let slots = || {
        let (inner, created) = InOrder::holding();
        let (slots, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1)).expect("valid");
        (
            slots.layer(ClassifyLayer::new().layer(inner.clone())),
            inner,
            (handle, created),
        )
    };
    let mut waiters = paused(async {
        let (service, inner, handle) = slots();
        queue(
            "TaskSlotsLayer",
            options.waiters,
            Method::POST,
            service,
            &inner,
            Some(handle),
        )
        .await
    });
    waiters.give_up_cpu_s = paused(async { give_up(options.waiters, &Method::POST, slots().0) });
    report.waiters.push(waiters);
    let control = options.waiters.min(CONTROL_WAITERS);
    report.lifo_control = (arrival_order_control(control, true), control);
    report.bytes_control = bytes_control(control, BALLAST);
    log("scale: keys");
    report.keys = keys(options.keys, options.decisions);
    log("scale: tasks followed to the end");
    report.followed = followed(options.tasks);
    log("scale: tasks followed by the stack's follower");
    report.follower = [
        followed_by_follower(options.tasks, true),
        followed_by_follower(options.tasks, false),
    ];
    report
}

/// Runs `work` on a paused current-thread runtime, inside a `LocalSet` (the waiters are
/// spawned as local tasks).
fn paused<T>(work: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime")
        .block_on(tokio::task::LocalSet::new().run_until(work))
}

/// Waiters in the arrival-order control.
const CONTROL_WAITERS: usize = 10_000;

/// A gate that lets one request through a millisecond, the newest waiting first (`lifo`) or
/// the oldest: a deliberately unfair limiter and a fair one, to show what the waiters' order
/// check sees.
#[derive(Clone)]
struct Gate {
    inner: InOrder,
    waiting: Arc<std::sync::Mutex<std::collections::VecDeque<oneshot::Sender<()>>>>,
    /// Bytes of ballast each waiter holds on the heap beyond the gate's own bookkeeping, for
    /// the bytes check's control ([`bytes_control`]).
    ballast: usize,
}

impl Service<Req> for Gate {
    type Response = Res;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Res, Infallible>>>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().expect("not poisoned").push_back(tx);
        let mut inner = self.inner.clone();
        let ballast = vec![1u8; self.ballast];
        Box::pin(async move {
            rx.await.expect("the gate opens for every waiter");
            drop(ballast);
            inner.call(request).await
        })
    }
}

/// The waiters' order check on `count` waiters through a gate, last in first out (`lifo`)
/// or first in first out: the requests the inner service saw out of arrival order. A check
/// that can fail finds almost all of them out of order through the LIFO gate, and none
/// through the FIFO one.
pub fn arrival_order_control(count: usize, lifo: bool) -> usize {
    gated(count, lifo, 0).out_of_order
}

/// The bytes check's control: the bytes per waiter measured for `count` waiters through the
/// first-in-first-out gate whose waiters each hold `ballast` bytes more, and through the same
/// gate without ballast. A measurement that sees a waiter's bookkeeping finds the difference
/// to be the ballast, to the byte.
pub fn bytes_control(count: usize, ballast: usize) -> (f64, f64) {
    (
        gated(count, false, ballast).bytes_per_waiter,
        gated(count, false, 0).bytes_per_waiter,
    )
}

/// `count` waiters through a [`Gate`] ([`queue`]'s measurements).
fn gated(count: usize, lifo: bool, ballast: usize) -> Waiters {
    paused(async move {
        let inner = InOrder::new();
        let gate = Gate {
            inner: inner.clone(),
            waiting: Arc::default(),
            ballast,
        };
        let waiting = gate.waiting.clone();
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let next = {
                    let mut waiting = waiting.lock().expect("not poisoned");
                    if lifo {
                        waiting.pop_back()
                    } else {
                        waiting.pop_front()
                    }
                };
                if let Some(open) = next {
                    let _ = open.send(());
                }
            }
        });
        queue("gate", count, Method::GET, gate, &inner, None).await
    })
}

/// The key counts the GCRA decision is timed at.
pub const KEY_COUNTS: [usize; 5] = [1, 100, 1_000, 10_000, 100_000];

/// Decisions built per batch, outside the timed span.
const BATCH: usize = 10_000;

/// GCRA cost per decision cycling round robin over each count of keys in [`KEY_COUNTS`] up to
/// `keys` (and `keys` itself), CPU ns on one thread, median of 5 runs. Every key is seen once
/// before the timing. The requests, each carrying its key's `AccountId` (a clone of one id
/// built per key), are built in batches outside the timed span, so what is timed is
/// `poll_ready`, `call`, the decision and dropping the request and response: not the bench's
/// own clones of cold ids.
fn keys(keys: usize, decisions: usize) -> Vec<(usize, f64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    let accounts: Vec<AccountId> = (0..keys)
        .map(|k| AccountId::new(format!("acct-{k}")))
        .collect();
    let measure = |count: usize| {
        rt.block_on(async {
            // As kling-tower's stack builds it under a rate cap: adaptive, starting at its
            // ceiling, so every key decides on the lock-free path at its ceiling, as a fixed
            // quota's would. A fixed quota's keys would be paid off the moment they are
            // decided at this rate, and swept as idle as fast as they are made (the table
            // would hold some of the row's keys, not all); an adaptive key is kept for its
            // idle time (ten minutes).
            let quota = Quota::per_second(1e9);
            let gcra = GcraLayer::builder(quota)
                .adaptive(Adaptive::new().start(quota))
                .build()
                .expect("valid");
            let state = gcra.handle();
            let mut service = gcra.layer(ClassifyLayer::new().layer(InOrder::new()));
            let mut cx = Context::from_waker(Waker::noop());
            let request = |i: usize| {
                let mut request = Request::new(Full::new(Bytes::new()));
                *request.uri_mut() = http::Uri::from_static("/v1/videos/text2video/t");
                request.extensions_mut().insert(accounts[i % count].clone());
                request
            };
            let mut decide = |request: Req| {
                assert!(service.poll_ready(&mut cx).is_ready());
                let mut future = std::pin::pin!(service.call(request));
                // Let through at once: a refusal would be a cheaper path than a decision.
                assert!(matches!(future.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
            };
            // Every key seen once before timing: the map is full.
            for i in 0..count.max(decisions / 10) {
                decide(request(i));
            }
            // As many keys as the row names, each with its own state: a series whose keys
            // shared one state would time one key at every count.
            assert_eq!(
                state.backend().len(),
                count,
                "keys held by the limiter, timed as {count}"
            );
            let mut timed = std::time::Duration::ZERO;
            let mut done = 0;
            while done < decisions {
                let batch: Vec<Req> = (done..decisions.min(done + BATCH)).map(request).collect();
                done += batch.len();
                let start = cpu::thread();
                for request in batch {
                    decide(request);
                }
                timed += cpu::thread().saturating_sub(start);
            }
            timed.as_nanos() as f64 / decisions as f64
        })
    };
    let mut counts: Vec<usize> = KEY_COUNTS.into_iter().filter(|&k| k < keys).collect();
    counts.push(keys);
    counts
        .into_iter()
        .map(|count| {
            let runs: Vec<f64> = (0..5).map(|_| measure(count)).collect();
            (count, cpu::median(&runs))
        })
        .collect()
}

/// An in-process mock of an Enterprise account with `tasks` slots and no rate cap, and the
/// whole stack's preset for it (both seeded: the same run on any machine).
fn enterprise(tasks: usize) -> (MockKling, KlingLayer) {
    let mock = MockKling::new(
        MockConfig::preset(Preset::Enterprise)
            .slots(tasks as u32)
            .seed(11),
    )
    .expect("a valid mock");
    let kling = KlingLayer::builder(
        StackConfig::enterprise(tasks as u32, None),
        Credentials::api_key("bench-key").expect("a key"),
    )
    .replay_seed(3)
    .build()
    .expect("a valid stack");
    (mock, kling)
}

/// `tasks` jobs at once on an Enterprise account with as many slots and no rate cap, each
/// created and polled every 10 s to its end through the whole stack, in paused time.
fn followed(tasks: usize) -> (usize, f64, u64, f64, i64) {
    paused(async move {
        let (mock, kling) = enterprise(tasks);
        let service = kling.layer(mock.clone());
        let started = tokio::time::Instant::now();
        let cpu = cpu::thread();
        let wall = StdInstant::now();
        Counting::start();
        let mut handles = Vec::with_capacity(tasks);
        for _ in 0..tasks {
            let service = service.clone();
            handles.push(tokio::spawn(follow_one(service)));
        }
        let mut done = 0;
        for handle in handles {
            if handle.await.expect("a job never panics") {
                done += 1;
            }
        }
        // The allocator's high-water mark over the run, from after the stack and the mock
        // were built (growth, not the process's whole heap).
        let peak = Counting::stop().peak;
        let _ = wall;
        (
            done,
            started.elapsed().as_secs_f64(),
            mock.stats().requests_total,
            cpu::thread().saturating_sub(cpu).as_secs_f64(),
            peak,
        )
    })
}

/// `tasks` new-style jobs at once on an Enterprise account with as many slots and no rate cap,
/// each created and then followed to its end by a `Follower::follow` call of its own through
/// the whole stack (the preset's follow policy), in paused time: on clones of one follower
/// (`share`), or on a follower each. Tasks completed, makespan (s), queries sent, CPU seconds.
fn followed_by_follower(tasks: usize, share: bool) -> (usize, f64, u64, f64) {
    const CREATE: &str = "/text-to-video/kling-3.0";
    paused(async move {
        let (mock, kling) = enterprise(tasks);
        let service = kling.layer(mock.clone());
        let one = kling
            .follower(service.clone(), kling.follow_policy())
            .expect("a valid policy");
        let started = tokio::time::Instant::now();
        let cpu = cpu::thread();
        let mut handles = Vec::with_capacity(tasks);
        for _ in 0..tasks {
            let service = service.clone();
            let follower = if share {
                one.clone()
            } else {
                kling
                    .follower(service.clone(), kling.follow_policy())
                    .expect("a valid policy")
            };
            handles.push(tokio::task::spawn_local(async move {
                use tower::ServiceExt;
                let create = Request::post(CREATE)
                    .header(CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from_static(br#"{"prompt":"a fox"}"#)))
                    .expect("valid");
                let mut created = service.oneshot(create).await.ok()?;
                let task = kling_core::Outcome::ensure(&mut created)
                    .ok()?
                    .task()?
                    .clone();
                follower
                    .follow(TaskRef::from_report(CREATE, &task))
                    .await
                    .ok()
                    .filter(|done| done.status.is_terminal())
            }));
        }
        let mut done = 0;
        for handle in handles {
            if handle.await.expect("a job never panics").is_some() {
                done += 1;
            }
        }
        let stats = mock.stats();
        (
            done,
            started.elapsed().as_secs_f64(),
            stats.requests_total.saturating_sub(stats.tasks_created),
            cpu::thread().saturating_sub(cpu).as_secs_f64(),
        )
    })
}

async fn follow_one<S>(service: S) -> bool
where
    S: Service<Req, Response = Res> + Clone,
    S::Error: Into<kling_core::BoxError>,
{
    use tower::ServiceExt;
    let create = Request::post("/v1/videos/text2video")
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(
            crate::fixtures::CREATE_BODY.as_bytes(),
        )))
        .expect("valid");
    let Ok(mut response) = service.clone().oneshot(create).await else {
        return false;
    };
    let Some(task) = kling_core::Outcome::ensure(&mut response)
        .ok()
        .and_then(|o| o.task().map(|t| t.id.clone()))
    else {
        return false;
    };
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let query = Request::get(format!("/v1/videos/text2video/{task}"))
            .body(Full::new(Bytes::new()))
            .expect("valid");
        let Ok(mut response) = service.clone().oneshot(query).await else {
            continue;
        };
        if kling_core::Outcome::ensure(&mut response)
            .ok()
            .and_then(|o| o.task().map(|t| t.status.is_terminal()))
            == Some(true)
        {
            return true;
        }
    }
}
