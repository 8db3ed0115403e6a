//! Success-path overhead: `ready` + `call` + await over an always-ready in-memory Kling, one
//! driver task and 64, on a 2-worker runtime, every subject in the same run.
//!
//! Each driver does create-then-query lives: the create is answered with the 230-byte create
//! envelope, the query with the 360-byte "succeed" envelope of the same task (which frees the
//! slot the create took). A figure is process CPU time per request (every thread, from
//! `/proc/self/task/*/schedstat`), the median over interleaved rounds: on a shared machine CPU
//! time is far steadier than wall time. Wall time is kept beside it.

use std::fmt::Debug;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use governor::{Quota as GovernorQuota, RateLimiter};
use http::StatusCode;
use kling_concurrency::{SlotsConfig, TaskSlotsLayer};
use kling_core::{AccountId, ClassifyLayer, Outcome};
use kling_metrics::MetricsLayer;
use kling_ratelimit::{GcraLayer, Quota};
use kling_retry::RetryLayer;
use kling_tower::auth::{AuthLayer, Credentials};
use kling_tower::base_url::BaseUrlLayer;
use kling_tower::timeout::AttemptTimeoutLayer;
use kling_tower::{DrainLayer, KlingLayer, StackConfig, Tier};
use serde::Deserialize;
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use crate::alloc::{Counting, Counts};
use crate::cpu;
use crate::fixtures::{EchoKling, Fixtures, LIVE, Req, Res, WaitingKling, create_envelope};
use crate::tower_client::{tower_stack, tower_stack_buffered};

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Interleaved rounds; each figure is the median over them.
    pub rounds: usize,
    /// Create+query lives per subject per round (split over the driver tasks).
    pub lives: usize,
    /// Driver tasks of the concurrent case.
    pub tasks: usize,
}

impl Options {
    /// The published configuration.
    pub fn full() -> Self {
        Options {
            rounds: 7,
            lives: 20_000,
            tasks: 64,
        }
    }

    /// A smoke test.
    pub fn tiny() -> Self {
        Options {
            rounds: 1,
            lives: 256,
            tasks: 64,
        }
    }
}

/// One measurement: nanoseconds per request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// Process CPU time per request.
    pub cpu_ns: f64,
    /// Wall time per request.
    pub wall_ns: f64,
}

/// What one subject measured.
#[derive(Clone, Debug, Default)]
pub struct Row {
    /// The subject.
    pub name: String,
    /// What it is compared with (its own baseline row), for the "+ns" column.
    pub baseline: Option<&'static str>,
    /// One driver task, per round.
    pub single: Vec<Sample>,
    /// Many driver tasks, per round (`None` when the subject cannot be shared).
    pub multi: Option<Vec<Sample>>,
    /// Allocations per request, one driver task.
    pub allocs: f64,
    /// Bytes allocated per request, one driver task.
    pub bytes: f64,
    /// The size of the subject's response future.
    pub future_bytes: usize,
}

impl Row {
    /// Median CPU ns per request, one task.
    pub fn single_ns(&self) -> f64 {
        cpu::median(&self.single.iter().map(|s| s.cpu_ns).collect::<Vec<_>>())
    }

    /// Median wall ns per request, one task.
    pub fn single_wall(&self) -> f64 {
        cpu::median(&self.single.iter().map(|s| s.wall_ns).collect::<Vec<_>>())
    }

    /// Median CPU ns per request, many tasks.
    pub fn multi_ns(&self) -> Option<f64> {
        self.multi
            .as_ref()
            .map(|m| cpu::median(&m.iter().map(|s| s.cpu_ns).collect::<Vec<_>>()))
    }

    /// The median over rounds of this row's CPU ns per request less `other`'s in the same
    /// round (one task, or many with `multi`): the rounds take turns, so a change in the
    /// machine's load between rounds falls on both sides of each difference, where it would
    /// not between two medians taken apart.
    pub fn paired_added(&self, other: &Row, multi: bool) -> Option<f64> {
        let (mine, theirs) = self.samples(other, multi)?;
        let differences: Vec<f64> = mine
            .iter()
            .zip(theirs)
            .map(|(m, t)| m.cpu_ns - t.cpu_ns)
            .collect();
        Some(cpu::median(&differences))
    }

    /// The median over rounds of (this row − `bare`) / (`tower` − `bare`), each round's CPU ns
    /// per request: the "× tower" ratio, paired as [`paired_added`](Self::paired_added) is.
    pub fn paired_ratio(&self, bare: &Row, tower: &Row, multi: bool) -> Option<f64> {
        let (mine, bare) = self.samples(bare, multi)?;
        let (_, theirs) = self.samples(tower, multi)?;
        let ratios: Vec<f64> = mine
            .iter()
            .zip(bare)
            .zip(theirs)
            .map(|((m, b), t)| (m.cpu_ns - b.cpu_ns) / (t.cpu_ns - b.cpu_ns))
            .collect();
        Some(cpu::median(&ratios))
    }

    /// This row's and `other`'s samples, one task or many, when both have them round by round.
    fn samples<'a>(&'a self, other: &'a Row, multi: bool) -> Option<(&'a [Sample], &'a [Sample])> {
        let (mine, theirs) = if multi {
            (self.multi.as_deref()?, other.multi.as_deref()?)
        } else {
            (&self.single[..], &other.single[..])
        };
        (mine.len() == theirs.len() && !mine.is_empty()).then_some((mine, theirs))
    }

    /// Median wall ns per request, many tasks.
    pub fn multi_wall(&self) -> Option<f64> {
        self.multi
            .as_ref()
            .map(|m| cpu::median(&m.iter().map(|s| s.wall_ns).collect::<Vec<_>>()))
    }
}

/// Everything the overhead section measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The options used.
    pub tasks: usize,
    /// Rounds and lives.
    pub rounds: usize,
    /// Create+query lives per subject per round.
    pub lives: usize,
    /// The service subjects.
    pub rows: Vec<Row>,
    /// governor's `check` alone: ns per check, one task and many (median CPU).
    pub governor: (f64, f64),
    /// Reading the create envelope: plain typed serde_json parse, ns (median CPU).
    pub serde_create: f64,
    /// Reading the query envelope: plain typed serde_json parse, ns.
    pub serde_query: f64,
    /// `Outcome::parse` of the create envelope, ns.
    pub outcome_create: f64,
    /// `Outcome::parse` of the query envelope, ns.
    pub outcome_query: f64,
    /// A cache line handed between two threads, ns ([`cpu::line_handover_ns`]): before the
    /// rounds and after them.
    pub handover_ns: (f64, f64),
}

impl Report {
    /// The row of a subject.
    pub fn row(&self, name: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.name == name)
    }
}

/// A subject the runner can measure.
trait Subject {
    fn name(&self) -> &str;
    fn baseline(&self) -> Option<&'static str>;
    fn shareable(&self) -> bool;
    /// The size of the service's response future: what every layer above moves.
    fn future_bytes(&self) -> usize;
    /// Runs `lives` create+query lives over `tasks` drivers; returns CPU and wall ns/request.
    fn run(&self, rt: &Runtime, fixtures: &Arc<Fixtures>, tasks: usize, lives: usize) -> Sample;
    /// What one driver's `lives` lives allocate, counted on a service built and warmed up by
    /// `warm` lives first: neither the building nor a first use's allocations are counted.
    fn count(&self, rt: &Runtime, fixtures: &Arc<Fixtures>, warm: usize, lives: usize) -> Counts;
}

async fn drive<S>(service: &mut S, fixtures: Arc<Fixtures>, base: usize, lives: usize, auth: bool)
where
    S: Service<Req, Response = Res>,
    S::Error: Debug,
{
    for j in 0..lives {
        let index = base + j % LIVE;
        let (mut create, mut query) = (fixtures.create(index), fixtures.query(index));
        if auth {
            with_auth(&mut create);
            with_auth(&mut query);
        }
        let response = ServiceExt::ready(&mut *service)
            .await
            .expect("ready")
            .call(create)
            .await
            .expect("the create succeeds");
        if j == 0 {
            assert_success(&response);
        }
        std::hint::black_box(response);
        let response = ServiceExt::ready(&mut *service)
            .await
            .expect("ready")
            .call(query)
            .await
            .expect("the query succeeds");
        if j == 0 {
            assert_success(&response);
        }
        std::hint::black_box(response);
    }
}

/// [`drive`], each request through a clone of `service` made for it.
async fn drive_clones<S>(service: S, fixtures: Arc<Fixtures>, base: usize, lives: usize, auth: bool)
where
    S: Service<Req, Response = Res> + Clone,
    S::Error: Debug,
{
    for j in 0..lives {
        let index = base + j % LIVE;
        for mut request in [fixtures.create(index), fixtures.query(index)] {
            if auth {
                with_auth(&mut request);
            }
            let response = service
                .clone()
                .oneshot(request)
                .await
                .expect("the request succeeds");
            if j == 0 {
                assert_success(&response);
            }
            std::hint::black_box(response);
        }
    }
}

fn with_auth(request: &mut Req) {
    // A constant, checked at compile time: `from_static`'s check at run time was inlined
    // differently from build to build and moved every subject's figure with it.
    const BEARER: http::HeaderValue = http::HeaderValue::from_static("Bearer bench-key");
    request
        .headers_mut()
        .insert(http::header::AUTHORIZATION, BEARER);
}

/// A success, and where a classify step ran, a success by its Kling code too.
fn assert_success(response: &Res) {
    assert_eq!(response.status(), StatusCode::OK);
    if let Some(outcome) = Outcome::of(response) {
        assert!(outcome.is_success(), "{outcome:?}");
    }
}

fn timed(rt: &Runtime, requests: usize, work: impl std::future::Future<Output = ()>) -> Sample {
    let wall = Instant::now();
    let cpu = cpu::process();
    rt.block_on(work);
    let wall = wall.elapsed();
    // The kernel adds a running thread's time up when it is switched out (or at a tick): let the
    // workers park before reading, so their last slice is counted.
    std::thread::sleep(SETTLE);
    let cpu = cpu::process().saturating_sub(cpu);
    Sample {
        cpu_ns: cpu.as_nanos() as f64 / requests as f64,
        wall_ns: wall.as_nanos() as f64 / requests as f64,
    }
}

/// How long the workers are given to park before their CPU time is read.
pub(crate) const SETTLE: Duration = Duration::from_millis(3);

/// A subject whose service clones share its limits.
struct Shared<F> {
    name: String,
    baseline: Option<&'static str>,
    auth: bool,
    /// Each request through its own clone (`service.clone().oneshot(request)`, a common way to
    /// call a shared tower service), so the clone and its drop are counted too.
    clone_per_request: bool,
    make: F,
}

impl<F, S> Subject for Shared<F>
where
    F: Fn() -> S,
    S: Service<Req, Response = Res> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Debug + Send,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn baseline(&self) -> Option<&'static str> {
        self.baseline
    }

    fn shareable(&self) -> bool {
        true
    }

    fn future_bytes(&self) -> usize {
        std::mem::size_of::<S::Future>()
    }

    fn run(&self, rt: &Runtime, fixtures: &Arc<Fixtures>, tasks: usize, lives: usize) -> Sample {
        let service = {
            let _entered = rt.enter();
            (self.make)()
        };
        let per_task = (lives / tasks).max(1);
        let auth = self.auth;
        let clone_per_request = self.clone_per_request;
        let fixtures = Arc::clone(fixtures);
        timed(rt, per_task * tasks * 2, async move {
            let drivers: Vec<_> = (0..tasks)
                .map(|t| {
                    let (service, fixtures) = (service.clone(), Arc::clone(&fixtures));
                    tokio::spawn(async move {
                        if clone_per_request {
                            drive_clones(service, fixtures, t * LIVE, per_task, auth).await;
                        } else {
                            let mut service = service;
                            drive(&mut service, fixtures, t * LIVE, per_task, auth).await;
                        }
                    })
                })
                .collect();
            for driver in drivers {
                driver.await.expect("the driver finishes");
            }
        })
    }

    fn count(&self, rt: &Runtime, fixtures: &Arc<Fixtures>, warm: usize, lives: usize) -> Counts {
        let mut service = {
            let _entered = rt.enter();
            (self.make)()
        };
        let (auth, clone_per_request) = (self.auth, self.clone_per_request);
        let fixtures = Arc::clone(fixtures);
        rt.block_on(async move {
            tokio::spawn(async move {
                if clone_per_request {
                    drive_clones(service.clone(), Arc::clone(&fixtures), 0, warm, auth).await;
                    Counting::start();
                    drive_clones(service, fixtures, 0, lives, auth).await;
                } else {
                    drive(&mut service, Arc::clone(&fixtures), 0, warm, auth).await;
                    Counting::start();
                    drive(&mut service, fixtures, 0, lives, auth).await;
                }
                Counting::stop()
            })
            .await
            .expect("the driver finishes")
        })
    }
}

/// A subject that cannot be shared between tasks (tower's `RateLimit` is not `Clone`).
struct Single<F> {
    name: String,
    make: F,
}

impl<F, S> Subject for Single<F>
where
    F: Fn() -> S,
    S: Service<Req, Response = Res> + Send + 'static,
    S::Future: Send,
    S::Error: Debug + Send,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn baseline(&self) -> Option<&'static str> {
        Some(BARE)
    }

    fn shareable(&self) -> bool {
        false
    }

    fn future_bytes(&self) -> usize {
        std::mem::size_of::<S::Future>()
    }

    fn run(&self, rt: &Runtime, fixtures: &Arc<Fixtures>, _tasks: usize, lives: usize) -> Sample {
        let service = {
            let _entered = rt.enter();
            (self.make)()
        };
        let fixtures = Arc::clone(fixtures);
        timed(rt, lives * 2, async move {
            tokio::spawn(async move {
                let mut service = service;
                drive(&mut service, fixtures, 0, lives, true).await;
            })
            .await
            .expect("the driver finishes");
        })
    }

    fn count(&self, rt: &Runtime, fixtures: &Arc<Fixtures>, warm: usize, lives: usize) -> Counts {
        let mut service = {
            let _entered = rt.enter();
            (self.make)()
        };
        let fixtures = Arc::clone(fixtures);
        rt.block_on(async move {
            tokio::spawn(async move {
                drive(&mut service, Arc::clone(&fixtures), 0, warm, true).await;
                Counting::start();
                drive(&mut service, fixtures, 0, lives, true).await;
                Counting::stop()
            })
            .await
            .expect("the driver finishes")
        })
    }
}

/// The bare in-memory Kling.
pub const BARE: &str = "bare in-memory Kling";
/// The classify step alone: the envelope read.
pub const CLASSIFY: &str = "ClassifyLayer (envelope read)";
/// As many layer boundaries as the Pro stack crosses, each doing nothing: what crossing them costs.
pub const PASS_THROUGH: &str = "nine pass-through layers (tower MapResponse, identity)";
/// The whole Pro stack.
pub const PRO_STACK: &str = "kling-tower Pro stack (KlingLayer)";
/// tower's stack, unshared.
pub const TOWER: &str = "tower ConcurrencyLimit+RateLimit+Retry (unshared)";
/// tower's stack behind a Buffer.
pub const TOWER_BUFFERED: &str = "tower Retry+Buffer+ConcurrencyLimit+RateLimit";
/// The end of the name of a subject whose requests each go through a clone made for it.
pub const CLONED: &str = ", cloned per request";
/// The bare service, each request through a clone made for it.
pub const BARE_CLONED: &str = "bare in-memory Kling, cloned per request";
/// The whole Pro stack, each request through a clone made for it.
pub const PRO_STACK_CLONED: &str = "kling-tower Pro stack (KlingLayer), cloned per request";
/// tower's shareable stack, each request through a clone made for it.
pub const TOWER_BUFFERED_CLONED: &str =
    "tower Retry+Buffer+ConcurrencyLimit+RateLimit, cloned per request";

/// The end of the name of a subject over [`WaitingKling`]: each
/// answer comes after one wait, as a real client's does.
pub const WAITS: &str = ", inner answers after one wait";
/// The bare service, answering after one wait.
pub const BARE_WAITS: &str = "bare in-memory Kling, inner answers after one wait";
/// The envelope read over it.
pub const CLASSIFY_WAITS: &str = "ClassifyLayer (envelope read), inner answers after one wait";
/// tower's shareable stack over it.
pub const TOWER_BUFFERED_WAITS: &str =
    "tower Retry+Buffer+ConcurrencyLimit+RateLimit, inner answers after one wait";

/// tower's `RateLimit` is a fixed window (`num` per `per`); with `num` = 1 and a 1 ns `per`
/// every request would wait for the timer wheel's 1 ms tick, so the window is a billion requests
/// a second: the success path.
const TOWER_BURST: u64 = 1_000_000_000;

/// A GCRA burst that no two threads deciding at nearly the same instant can exhaust: with a
/// burst of 1 and a 1 ns interval, a decision a few nanoseconds behind another thread's was
/// refused and waited for the timer, and some runs of the 64-task column measured that wait
/// (6 to 7 µs a request instead of 1.5), not the success path.
const SUCCESS_BURST: u32 = 65_535;

/// The Pro preset with every limit too high to wait for: the success path of every layer.
pub fn pro_config() -> StackConfig {
    StackConfig::preset(Tier::Pro)
        .rate_per_minute(60e9)
        .burst(SUCCESS_BURST)
        .jitter_allowance(Duration::ZERO)
        .slots(100_000)
}

fn subjects(fixtures: &Arc<Fixtures>) -> Vec<Box<dyn Subject>> {
    let echo = {
        let fixtures = Arc::clone(fixtures);
        move || EchoKling::new(Arc::clone(&fixtures))
    };
    let classified = {
        let echo = echo.clone();
        move || ClassifyLayer::new().layer(echo())
    };
    // What the stack's auth layer sets: an id that clones without a shared reference count.
    let account = AccountId::interned("bench");
    let mut out: Vec<Box<dyn Subject>> = Vec::new();
    out.push(Box::new(Shared {
        name: BARE.into(),
        baseline: None,
        auth: true,
        clone_per_request: false,
        make: echo.clone(),
    }));
    out.push(Box::new(Shared {
        name: BARE_CLONED.into(),
        baseline: None,
        auth: true,
        clone_per_request: true,
        make: echo.clone(),
    }));
    out.push(Box::new(Shared {
        name: CLASSIFY.into(),
        baseline: Some(BARE),
        auth: true,
        clone_per_request: false,
        make: classified.clone(),
    }));
    macro_rules! over_classify {
        ($name:expr, $layer:expr) => {{
            let classified = classified.clone();
            let layer = $layer;
            out.push(Box::new(Shared {
                name: $name.into(),
                baseline: Some(CLASSIFY),
                auth: true,
                clone_per_request: false,
                make: move || layer.layer(classified()),
            }));
        }};
    }
    over_classify!("MetricsLayer", MetricsLayer::new());
    over_classify!("DrainLayer", DrainLayer::new());
    over_classify!(
        "RetryLayer (external ids on, as in the stack)",
        RetryLayer::builder()
            .generate_external_ids(true)
            .build()
            .expect("valid")
    );
    over_classify!("RetryLayer (external ids off)", RetryLayer::new());
    over_classify!(
        "TaskSlotsLayer",
        TaskSlotsLayer::new(SlotsConfig::new(100_000).default_account(account.clone()))
            .expect("valid")
    );
    over_classify!(
        "GcraLayer",
        GcraLayer::new(Quota::per_second(1e9).with_burst(SUCCESS_BURST)).expect("valid")
    );
    over_classify!(
        "AuthLayer (API key)",
        AuthLayer::new(Credentials::api_key("bench-key").expect("key"))
    );
    over_classify!(
        "AuthLayer (JWT, cached, resends a refusal itself)",
        AuthLayer::new(Credentials::access_key("ak", "sk").expect("keys"))
    );
    over_classify!(
        "AuthLayer (JWT, cached, leaves the resend to retry: as in the stack)",
        AuthLayer::new(Credentials::access_key("ak", "sk").expect("keys")).resend_on_refusal(false)
    );
    over_classify!(
        "AttemptTimeoutLayer (per attempt)",
        AttemptTimeoutLayer::new(Duration::from_secs(30))
    );
    over_classify!("BaseUrlLayer", BaseUrlLayer::global());
    // What crossing the stack's boundaries costs by itself: the Pro stack's eight layers and its
    // outer `Kling` service, each replaced by the thinnest layer that still wraps the response
    // future.
    let same: fn(Res) -> Res = |response| response;
    over_classify!(
        PASS_THROUGH,
        ServiceBuilder::new()
            .map_response(same)
            .map_response(same)
            .map_response(same)
            .map_response(same)
            .map_response(same)
            .map_response(same)
            .map_response(same)
            .map_response(same)
            .map_response(same)
            .into_inner()
    );
    for (name, baseline, clone_per_request) in [
        (PRO_STACK, BARE, false),
        (PRO_STACK_CLONED, BARE_CLONED, true),
    ] {
        let echo = echo.clone();
        let kling = KlingLayer::new(
            pro_config(),
            Credentials::api_key("bench-key").expect("key"),
        )
        .expect("a valid stack");
        out.push(Box::new(Shared {
            name: name.into(),
            baseline: Some(baseline),
            auth: false,
            clone_per_request,
            make: move || kling.layer(echo()),
        }));
    }
    {
        let echo = echo.clone();
        out.push(Box::new(Single {
            name: TOWER.into(),
            make: move || tower_stack(echo(), 100_000, 60e9, TOWER_BURST),
        }));
    }
    for (name, baseline, clone_per_request) in [
        (TOWER_BUFFERED, BARE, false),
        (TOWER_BUFFERED_CLONED, BARE_CLONED, true),
    ] {
        let echo = echo.clone();
        out.push(Box::new(Shared {
            name: name.into(),
            baseline: Some(baseline),
            auth: true,
            clone_per_request,
            make: move || tower_stack_buffered(echo(), 100_000, 60e9, TOWER_BURST, 1024),
        }));
    }
    // Over a service whose answers come after one wait, as a real client's do: the timer a
    // per-attempt timeout arms only then, and what a wait costs each stack.
    let waiting = {
        let echo = echo.clone();
        move || WaitingKling(echo())
    };
    let waiting_classified = {
        let waiting = waiting.clone();
        move || ClassifyLayer::new().layer(waiting())
    };
    out.push(Box::new(Shared {
        name: BARE_WAITS.into(),
        baseline: None,
        auth: true,
        clone_per_request: false,
        make: waiting.clone(),
    }));
    out.push(Box::new(Shared {
        name: CLASSIFY_WAITS.into(),
        baseline: Some(BARE_WAITS),
        auth: true,
        clone_per_request: false,
        make: waiting_classified.clone(),
    }));
    {
        let layer = AttemptTimeoutLayer::new(Duration::from_secs(30));
        let waiting_classified = waiting_classified.clone();
        out.push(Box::new(Shared {
            name: format!("AttemptTimeoutLayer (per attempt){WAITS}"),
            baseline: Some(CLASSIFY_WAITS),
            auth: true,
            clone_per_request: false,
            make: move || layer.layer(waiting_classified()),
        }));
    }
    {
        let waiting = waiting.clone();
        let kling = KlingLayer::new(
            pro_config(),
            Credentials::api_key("bench-key").expect("key"),
        )
        .expect("a valid stack");
        out.push(Box::new(Shared {
            name: format!("{PRO_STACK}{WAITS}"),
            baseline: Some(BARE_WAITS),
            auth: false,
            clone_per_request: false,
            make: move || kling.layer(waiting()),
        }));
    }
    out.push(Box::new(Shared {
        name: TOWER_BUFFERED_WAITS.into(),
        baseline: Some(BARE_WAITS),
        auth: true,
        clone_per_request: false,
        make: move || tower_stack_buffered(waiting(), 100_000, 60e9, TOWER_BURST, 1024),
    }));
    out
}

/// A 2-worker runtime, as the issue asks.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-worker")
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Checks that a subject answers what a real client would: a success whose outcome (where the
/// stack attaches one) is a success.
fn check(subject: &dyn Subject, rt: &Runtime, fixtures: &Arc<Fixtures>) {
    subject.run(rt, fixtures, 1, 2);
}

fn governor_checks(rt: &Runtime, tasks: usize, checks: usize) -> f64 {
    let limiter = Arc::new(RateLimiter::direct(GovernorQuota::per_second(
        NonZeroU32::MAX,
    )));
    let per_task = (checks / tasks).max(1);
    let sample = timed(rt, per_task * tasks, async move {
        let drivers: Vec<_> = (0..tasks)
            .map(|_| {
                let limiter = Arc::clone(&limiter);
                tokio::spawn(async move {
                    let mut admitted = 0usize;
                    for _ in 0..per_task {
                        admitted += usize::from(limiter.check().is_ok());
                    }
                    std::hint::black_box(admitted);
                })
            })
            .collect();
        for driver in drivers {
            driver.await.expect("finishes");
        }
    });
    sample.cpu_ns
}

/// A plain typed parse of an envelope, as a client without this stack would read it.
#[derive(Deserialize)]
#[allow(dead_code)]
struct PlainEnvelope {
    code: i64,
    message: String,
    request_id: String,
    data: Option<PlainTask>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct PlainTask {
    task_id: String,
    task_status: String,
    #[serde(default)]
    task_status_msg: Option<String>,
    #[serde(default)]
    task_info: Option<PlainInfo>,
    #[serde(default)]
    task_result: Option<PlainResult>,
    #[serde(default)]
    final_unit_deduction: Option<String>,
    created_at: u64,
    updated_at: u64,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct PlainInfo {
    #[serde(default)]
    external_task_id: Option<String>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct PlainResult {
    #[serde(default)]
    videos: Vec<PlainVideo>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct PlainVideo {
    id: String,
    url: String,
    duration: String,
}

/// CPU ns per call of `f`, over at least `n` calls and at least [`MIN_LOOP`] of wall time: the
/// kernel adds a running thread's CPU time up at scheduler ticks (every few milliseconds), so a
/// shorter loop could read as 0.
fn per_call(n: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..n / 10 {
        f();
    }
    let start = cpu::thread();
    let started = std::time::Instant::now();
    let mut calls = 0;
    while calls < n || started.elapsed() < MIN_LOOP {
        for _ in 0..1000 {
            f();
        }
        calls += 1000;
    }
    cpu::thread().saturating_sub(start).as_nanos() as f64 / calls as f64
}

/// The least wall time one [`per_call`] loop runs: long against the scheduler tick.
const MIN_LOOP: Duration = Duration::from_millis(250);

/// Envelope reads on one thread: plain serde_json against `Outcome::parse` (ns, median).
fn parses(rounds: usize, n: usize) -> [f64; 4] {
    let create = Bytes::from(create_envelope(1));
    let query = Bytes::from(crate::fixtures::query_envelope(1));
    let headers = http::HeaderMap::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let _entered = rt.enter();
    let mut samples: [Vec<f64>; 4] = Default::default();
    for _ in 0..rounds {
        samples[0].push(per_call(n, || {
            let env: PlainEnvelope = serde_json::from_slice(&create).expect("parses");
            std::hint::black_box(env);
        }));
        samples[1].push(per_call(n, || {
            let env: PlainEnvelope = serde_json::from_slice(&query).expect("parses");
            std::hint::black_box(env);
        }));
        samples[2].push(per_call(n, || {
            let now = tokio::time::Instant::now();
            let outcome = Outcome::parse(StatusCode::OK, &headers, &create, now).expect("parses");
            std::hint::black_box(outcome);
        }));
        samples[3].push(per_call(n, || {
            let now = tokio::time::Instant::now();
            let outcome = Outcome::parse(StatusCode::OK, &headers, &query, now).expect("parses");
            std::hint::black_box(outcome);
        }));
    }
    samples.map(|s| cpu::median(&s))
}

/// Runs the overhead section.
pub fn run(options: Options, log: &mut dyn FnMut(&str)) -> Report {
    let rt = runtime();
    let fixtures = Fixtures::new();
    let subjects = subjects(&fixtures);
    for subject in &subjects {
        check(subject.as_ref(), &rt, &fixtures);
    }
    let mut rows: Vec<Row> = subjects
        .iter()
        .map(|s| Row {
            name: s.name().to_owned(),
            baseline: s.baseline(),
            multi: s.shareable().then(Vec::new),
            future_bytes: s.future_bytes(),
            ..Row::default()
        })
        .collect();

    // Allocations, one driver task, counted once (they do not vary).
    let counted = (options.lives / 10).clamp(64, 2_000);
    for (subject, row) in subjects.iter().zip(&mut rows) {
        (row.allocs, row.bytes) = allocations(subject.as_ref(), &rt, &fixtures, counted);
    }

    let handover_before = cpu::line_handover_ns(options.lives as u64);
    let mut governor = (Vec::new(), Vec::new());
    for round in 0..options.rounds {
        log(&format!("overhead: round {}/{}", round + 1, options.rounds));
        for (subject, row) in subjects.iter().zip(&mut rows) {
            row.single
                .push(subject.run(&rt, &fixtures, 1, options.lives));
            if let Some(multi) = &mut row.multi {
                multi.push(subject.run(&rt, &fixtures, options.tasks, options.lives));
            }
        }
        governor.0.push(governor_checks(&rt, 1, options.lives * 2));
        governor
            .1
            .push(governor_checks(&rt, options.tasks, options.lives * 2));
    }
    let handover_after = cpu::line_handover_ns(options.lives as u64);
    let [serde_create, serde_query, outcome_create, outcome_query] =
        parses(options.rounds, options.lives.max(1_000));
    Report {
        tasks: options.tasks,
        rounds: options.rounds,
        lives: options.lives,
        rows,
        governor: (cpu::median(&governor.0), cpu::median(&governor.1)),
        serde_create,
        serde_query,
        outcome_create,
        outcome_query,
        handover_ns: (handover_before, handover_after),
    }
}

/// Allocations and bytes allocated per request by `subject` over `lives` lives of one driver,
/// on a service already built and warmed up (what is allocated once, like a pool's first
/// state, is not counted; nor is the timing's own reading of `/proc`).
fn allocations(
    subject: &dyn Subject,
    rt: &Runtime,
    fixtures: &Arc<Fixtures>,
    lives: usize,
) -> (f64, f64) {
    // At least one life of every fixture index: the first clone of an index's header value
    // and URI allocates once (their bytes become shared), which is the fixtures', not a
    // request's.
    let counts = subject.count(rt, fixtures, (lives / 4).max(LIVE), lives);
    let requests = (lives * 2) as f64;
    (
        counts.allocs as f64 / requests,
        counts.bytes as f64 / requests,
    )
}

/// Allocations and bytes allocated per request by the subject named `name` (exactly), counted
/// as the overhead section counts them, over `lives` lives.
pub fn allocations_per_request(name: &str, lives: usize) -> Option<(f64, f64)> {
    let rt = runtime();
    let fixtures = Fixtures::new();
    let subjects = subjects(&fixtures);
    let subject = subjects.iter().find(|s| s.name() == name)?;
    Some(allocations(subject.as_ref(), &rt, &fixtures, lives))
}

/// Allocations per request of more than [`THREAD_CACHE_MAX_BYTES`](crate::alloc::THREAD_CACHE_MAX_BYTES) by the subject named
/// `name` (exactly) on its success path, counted as [`allocations_per_request`] counts.
pub fn large_allocations_per_request(name: &str, lives: usize) -> Option<f64> {
    let rt = runtime();
    let fixtures = Fixtures::new();
    let subjects = subjects(&fixtures);
    let subject = subjects.iter().find(|s| s.name() == name)?;
    let counts = subject.count(&rt, &fixtures, (lives / 4).max(LIVE), lives);
    Some(counts.large as f64 / (lives * 2) as f64)
}

/// Every subject's name and the subject its added cost is taken over, in the table's order.
pub fn subject_names() -> Vec<(String, Option<&'static str>)> {
    subjects(&Fixtures::new())
        .iter()
        .map(|s| (s.name().to_owned(), s.baseline()))
        .collect()
}

/// Runs one subject (the one named `name`, else the first whose name contains it) for `lives`
/// lives shared by `tasks` driver tasks (1 for `valgrind --tool=callgrind`; 64 to see
/// contention under `perf`).
pub fn profile(name: &str, lives: usize, tasks: usize) -> Option<Sample> {
    let rt = runtime();
    let fixtures = Fixtures::new();
    let subjects = subjects(&fixtures);
    let subject = subjects
        .iter()
        .find(|s| s.name() == name)
        .or_else(|| subjects.iter().find(|s| s.name().contains(name)))?;
    Some(subject.run(&rt, &fixtures, tasks.max(1), lives))
}
