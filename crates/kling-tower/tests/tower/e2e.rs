//! End to end over real TCP, in real time at a shared speed factor: 100 jobs (create, then
//! query until done) through the Pro preset against `kling-mock` on Pro, per client, each with
//! its negative control through the bare client.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kling_core::{BoxError, ClassifyLayer, Outcome, TaskStatus};
use kling_mock::{MockConfig, MockKling, MockServer, Preset, Stats};
use kling_tower::{Credentials, FollowPolicy, KlingLayer, StackConfig, TaskRef, Tier};
use tower::{Layer, Service, ServiceExt};

use crate::support::request;

/// API time runs this many times faster on both sides: Pro's 60 requests a minute become 10 a
/// second (100 ms apart, which the stack paces at 115 ms: the preset's 15 ms jitter allowance
/// is real time and does not shrink with the speed factor, because timer and scheduling jitter
/// do not). 200 requests at that pace take about 23 s.
const SPEED: f64 = 10.0;

/// The real-time tests of this binary (this file's and `shared`'s) run one at a time: two at
/// once on a 2-core machine would each add the other's scheduling jitter.
pub(crate) static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const JOBS: usize = 100;
const KEY: &str = "e2e-key";
const CREATE: &str = "/text-to-video/kling-3.0";

/// The mock on a runtime and thread of its own, so the client's tasks do not delay its clock
/// readings (the arrival times its rate limit judges).
pub(crate) struct Mock {
    pub(crate) base_url: String,
    mock: MockKling,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Mock {
    /// Starts a mock server of `config` on a thread of its own.
    pub(crate) fn start(config: MockConfig) -> Mock {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let server = MockServer::start(config).await.unwrap();
                ready_tx
                    .send((server.base_url(), server.mock().clone()))
                    .unwrap();
                let _ = stopped.await;
                server.shutdown().await;
            });
        });
        let (base_url, mock) = ready_rx.recv().unwrap();
        Mock {
            base_url,
            mock,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        self.mock.stats()
    }

    pub(crate) fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

/// The mock on Pro: tasks of 6–9 s of API time (0.6–0.9 s here).
fn pro_mock_config() -> MockConfig {
    MockConfig::preset(Preset::Pro)
        .speed(SPEED)
        .task_duration(Duration::from_secs(6), Duration::from_secs(9))
        .api_key(KEY)
}

fn pro_mock() -> Mock {
    Mock::start(pro_mock_config())
}

/// How long a run of the jobs may take before the test calls it hung: some 21 s on a quiet
/// machine. A guard, not a speed target (those are benchmarks).
const HANG_GUARD: Duration = Duration::from_secs(180);

fn pro_stack(server: &Mock) -> KlingLayer {
    KlingLayer::builder(
        StackConfig::preset(Tier::Pro).speed(SPEED),
        Credentials::api_key(KEY).unwrap(),
    )
    .base_url(&server.base_url)
    .build()
    .unwrap()
}

/// Opens the client's pooled connection (and resolves the address) before the run, with the
/// mock's control endpoint, which no limit counts: otherwise the first request pays for the
/// connect and arrives late while the second, on time, arrives less than an interval after it
/// — one 1302 per run that says nothing about the stack.
pub(crate) async fn warm_up<C>(client: C, server: &Mock)
where
    C: Service<http::Request<Full<Bytes>>>,
    C::Error: std::fmt::Debug,
{
    let stats = request("GET", &format!("{}/__mock/stats", server.base_url), "");
    client.oneshot(stats).await.unwrap();
}

/// Runs every job (create, then follow until it ends) at once through `service`.
async fn run_jobs<S>(kling: &KlingLayer, service: S) -> Vec<TaskStatus>
where
    S: Service<
            http::Request<Full<Bytes>>,
            Response = http::Response<Full<Bytes>>,
            Error = BoxError,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    // The first query after 9.5 s of API time, when a task is done: one query per job.
    let policy = FollowPolicy::new()
        .first_query(Duration::from_millis(9500))
        .speed(SPEED);
    let follower = kling.follower(service.clone(), policy).unwrap();
    let jobs: Vec<_> = (0..JOBS)
        .map(|i| {
            let service = service.clone();
            let follower = follower.clone();
            tokio::spawn(async move {
                let body = format!(r#"{{"prompt":"job {i}"}}"#);
                let created = service
                    .oneshot(request("POST", CREATE, &body))
                    .await
                    .expect("the create succeeds");
                let task = Outcome::of(&created).unwrap().task().unwrap().clone();
                follower
                    .follow(TaskRef::from_report(CREATE, &task))
                    .await
                    .expect("the task is followed to its end")
                    .status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for job in jobs {
        statuses.push(job.await.unwrap());
    }
    statuses
}

/// Every job succeeded, once, with no slot refusal and at most 5 tasks at once, and the
/// rate refused nothing the pacing could have prevented.
fn assert_all_done_within_the_limits(stats: &Stats, statuses: &[TaskStatus]) {
    assert_eq!(statuses.len(), JOBS);
    assert!(
        statuses.iter().all(|s| *s == TaskStatus::Succeeded),
        "{statuses:?}"
    );
    assert_eq!(stats.tasks_created, JOBS as u64, "{stats:?}");
    // The preset paces with a 15 ms real-time jitter allowance. A request held back longer
    // than that between the limiter and the mock lets the next one arrive early: none on a
    // quiet machine, one in 201 requests once with three busy loops beside the test on two
    // cores (the retry layer absorbs it). A pacing fault meets dozens (the bare client's
    // control below).
    assert!(stats.responses("1302") <= 1, "{stats:?}");
    assert_eq!(stats.responses("1303"), 0, "{stats:?}");
    assert_eq!(stats.duplicate_external_ids, 0, "{stats:?}");
    // The account was used to the full (the mock refuses a sixth, so it never shows more).
    assert_eq!(
        stats.max_concurrent.get("video:kling-3.0"),
        Some(&5),
        "{stats:?}"
    );
}

/// The negative control: the same jobs through the bare client (classify only), at once. Each
/// job creates, then queries its task once; refusals are counted, nothing is retried.
async fn bare_jobs<S>(service: S, base: &str)
where
    S: Service<
            http::Request<Full<Bytes>>,
            Response = http::Response<Full<Bytes>>,
            Error = BoxError,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let base = base.to_owned();
    let jobs: Vec<_> = (0..JOBS)
        .map(|i| {
            let service = service.clone();
            let base = base.clone();
            tokio::spawn(async move {
                let mut create = request(
                    "POST",
                    &format!("{base}{CREATE}"),
                    &format!(r#"{{"prompt":"job {i}"}}"#),
                );
                create
                    .headers_mut()
                    .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
                let created = service.clone().oneshot(create).await.unwrap();
                if let Some(task) = Outcome::of(&created).unwrap().task() {
                    let mut query =
                        request("GET", &format!("{base}/tasks?task_ids={}", task.id), "");
                    query
                        .headers_mut()
                        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
                    service.oneshot(query).await.unwrap();
                }
            })
        })
        .collect();
    for job in jobs {
        job.await.unwrap();
    }
}

/// Runs the negative controls through the bare client `bare` (classify only): the same jobs on the same
/// mock settings meet 1302s; on a copy of the mock without its rate check (which answers
/// before the slots are looked at, so a burst on the real settings never reaches them) they
/// meet 1303s.
async fn assert_bare_client_is_refused<S>(bare: S)
where
    S: Service<
            http::Request<Full<Bytes>>,
            Response = http::Response<Full<Bytes>>,
            Error = BoxError,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let server = pro_mock();
    bare_jobs(bare.clone(), &server.base_url).await;
    let stats = server.stats();
    assert!(
        stats.responses("1302") >= (JOBS / 2) as u64,
        "the bare client meets the rate: {stats:?}"
    );
    server.shutdown();

    let server = Mock::start(pro_mock_config().no_rate_limit());
    bare_jobs(bare, &server.base_url).await;
    let stats = server.stats();
    assert!(
        stats.responses("1303") >= (JOBS / 2) as u64,
        "the bare client meets the slots: {stats:?}"
    );
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_jobs_through_the_pro_preset_on_hyper_stay_within_the_limits() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = pro_mock();
    let kling = pro_stack(&server);
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    warm_up(client.clone(), &server).await;
    let statuses = tokio::time::timeout(HANG_GUARD, run_jobs(&kling, kling.layer(client.clone())))
        .await
        .expect("the jobs do not hang");
    assert_all_done_within_the_limits(&server.stats(), &statuses);
    assert_eq!(kling.snapshot().pool("video:kling-3.0").unwrap().in_use, 0);
    server.shutdown();

    // Negative control: the same jobs, same mock settings, bare client.
    assert_bare_client_is_refused(ClassifyLayer::new().layer(client)).await;
}

#[cfg(feature = "reqwest")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_jobs_through_the_pro_preset_on_reqwest_stay_within_the_limits() {
    use kling_tower::client::ReqwestService;

    let _one = ONE_AT_A_TIME.lock().await;
    let server = pro_mock();
    let kling = pro_stack(&server);
    let client = ReqwestService::new_client().unwrap();
    warm_up(client.clone(), &server).await;
    let statuses = tokio::time::timeout(HANG_GUARD, run_jobs(&kling, kling.layer(client.clone())))
        .await
        .expect("the jobs do not hang");
    assert_all_done_within_the_limits(&server.stats(), &statuses);
    server.shutdown();

    assert_bare_client_is_refused(ClassifyLayer::new().layer(client)).await;
}
