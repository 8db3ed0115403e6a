//! Fleets of OS processes sharing one Kling account on `kling-mock` through Redis.
//!
//! The worker is this test binary run again as a child process: the ignored test
//! `fleet_worker_process` does one process's share of the jobs when `KLING_FLEET_WORKER` is
//! set, and prints its tally as one `FLEET-RESULT` line.

use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kling_concurrency::{SlotsConfig, TaskSlotsLayer};
use kling_core::{AccountId, BoxError, ClassifyLayer, Code, Outcome};
use kling_mock::{MockConfig, MockServer, Preset, Stats};
use kling_ratelimit::{Cooldown, GcraLayer, Quota};
use kling_redis::{Connection, RedisConfig, RedisGcra, RedisSlots, WhenUnreachable};
use tower::{Layer, Service, ServiceExt};

use crate::support::redis;

/// API time runs this many times faster on both sides.
const SPEED: f64 = 200.0;
const PROCESSES: usize = 4;
const JOBS: usize = 200;
/// Jobs of the outage tests.
const OUTAGE_JOBS: usize = 160;

/// What one worker did.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    completed: u64,
    refused_1303: u64,
    refused_1302: u64,
    errors: u64,
}

impl Tally {
    fn parse(line: &str) -> Tally {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        Tally {
            completed: v["completed"].as_u64().unwrap(),
            refused_1303: v["1303"].as_u64().unwrap(),
            refused_1302: v["1302"].as_u64().unwrap(),
            errors: v["errors"].as_u64().unwrap(),
        }
    }

    fn add(self, other: Tally) -> Tally {
        Tally {
            completed: self.completed + other.completed,
            refused_1303: self.refused_1303 + other.refused_1303,
            refused_1302: self.refused_1302 + other.refused_1302,
            errors: self.errors + other.errors,
        }
    }
}

/// A create of job `job`, with an external id so an unknown outcome keeps its slot.
fn create(base: &str, worker: usize, job: usize) -> http::Request<Full<Bytes>> {
    let body = format!(r#"{{"prompt":"job {job}","external_task_id":"w{worker}-j{job}"}}"#);
    let mut request = http::Request::post(format!("{base}/v1/videos/text2video"))
        .header("authorization", "Bearer key")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    request.extensions_mut().insert(AccountId::new("fleet"));
    request
}

fn query(base: &str, task: &str) -> http::Request<Full<Bytes>> {
    let mut request = http::Request::get(format!("{base}/v1/videos/text2video/{task}"))
        .header("authorization", "Bearer key")
        .body(Full::new(Bytes::new()))
        .unwrap();
    request.extensions_mut().insert(AccountId::new("fleet"));
    request
}

type Res = http::Response<Full<Bytes>>;

/// Runs one job to its end: create (again after a refusal or an error) then poll.
async fn job<S>(service: S, base: String, worker: usize, n: usize, tally: &std::sync::Mutex<Tally>)
where
    S: Service<http::Request<Full<Bytes>>, Response = Res, Error = BoxError> + Clone,
{
    let pause = Duration::from_secs_f64(1.0 / SPEED);
    let task = loop {
        match service.clone().oneshot(create(&base, worker, n)).await {
            Ok(response) => {
                let outcome = Outcome::of(&response).expect("classified").clone();
                match outcome.code() {
                    Code::Success => break outcome.task().expect("a task").id.clone(),
                    Code::ParallelTaskLimit => tally.lock().unwrap().refused_1303 += 1,
                    Code::RateLimited => tally.lock().unwrap().refused_1302 += 1,
                    _ => tally.lock().unwrap().errors += 1,
                }
            }
            Err(_) => tally.lock().unwrap().errors += 1,
        }
        tokio::time::sleep(pause).await;
    };
    loop {
        tokio::time::sleep(pause * 5).await;
        match service.clone().oneshot(query(&base, &task)).await {
            Ok(response) => {
                let outcome = Outcome::of(&response).expect("classified").clone();
                match outcome.code() {
                    Code::Success => {
                        if outcome.task().is_some_and(|t| t.status.is_terminal()) {
                            tally.lock().unwrap().completed += 1;
                            return;
                        }
                    }
                    Code::RateLimited => tally.lock().unwrap().refused_1302 += 1,
                    _ => tally.lock().unwrap().errors += 1,
                }
            }
            Err(_) => tally.lock().unwrap().errors += 1,
        }
    }
}

/// One process's share of the jobs, configured from the environment.
async fn work() -> Tally {
    let env = |name: &str| std::env::var(name).unwrap();
    let base = env("FLEET_MOCK");
    let worker: usize = env("FLEET_WORKER").parse().unwrap();
    let jobs: usize = env("FLEET_JOBS").parse().unwrap();
    let mode = env("FLEET_MODE");
    let slots_config = SlotsConfig::new(5)
        .lease(Duration::from_secs(1800).div_f64(SPEED))
        .recovery_interval(Duration::from_secs(20).div_f64(SPEED));
    let quota = Quota::per_minute(60.0).scaled(SPEED).with_headroom(0.2);
    let cooldown = Cooldown::default().scaled(SPEED);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build_http::<Full<Bytes>>();
    let classified = ClassifyLayer::new().layer(client);
    let tally = std::sync::Arc::new(std::sync::Mutex::new(Tally::default()));
    let run = |service| {
        let tally = tally.clone();
        let base = base.clone();
        async move {
            let tasks: Vec<_> = (0..jobs)
                .map(|n| {
                    let service = tower::util::BoxCloneService::clone(&service);
                    let base = base.clone();
                    let tally = tally.clone();
                    tokio::spawn(async move { job(service, base, worker, n, &tally).await })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
        }
    };
    if mode == "in-process" {
        // The negative control: each process with limits of its own.
        let gcra = GcraLayer::builder(quota)
            .cooldown(cooldown)
            .build()
            .unwrap();
        let slots = TaskSlotsLayer::new(slots_config).unwrap();
        let service = slots.layer(gcra.layer(classified));
        run(tower::util::BoxCloneService::new(service)).await;
    } else {
        let when = match mode.as_str() {
            "fallback" => WhenUnreachable::fallback(PROCESSES as u32),
            _ => WhenUnreachable::Wait,
        };
        let conn = Connection::lazy(
            RedisConfig::new(env("FLEET_REDIS"))
                .prefix("fleet")
                .command_timeout(Duration::from_millis(250))
                .connect_timeout(Duration::from_millis(250)),
        )
        .unwrap();
        let gcra_backend = RedisGcra::new(conn.clone())
            .when_unreachable(when)
            .retry_every(Duration::from_millis(20));
        let slots_backend = RedisSlots::new(conn, slots_config.clone())
            .unwrap()
            .when_unreachable(when)
            .retry_every(Duration::from_millis(20))
            .poll_every(Duration::from_millis(200))
            .maintain_every(Duration::from_millis(50))
            .grace(Duration::from_millis(300));
        let gcra = GcraLayer::builder(quota)
            .cooldown(cooldown)
            .backend(gcra_backend)
            .build()
            .unwrap();
        let slots = TaskSlotsLayer::with_backend(&slots_config, slots_backend).unwrap();
        let service = slots.layer(gcra.layer(classified));
        run(tower::util::BoxCloneService::new(service)).await;
    }
    *tally.lock().unwrap()
}

/// Not a test: one worker process of the fleet tests (run by them with `--ignored`).
#[test]
#[ignore = "a child process of the fleet tests"]
fn fleet_worker_process() {
    if std::env::var("KLING_FLEET_WORKER").is_err() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tally = runtime.block_on(work());
    #[allow(clippy::print_stdout)]
    {
        println!(
            "FLEET-RESULT {}",
            serde_json::json!({
                "completed": tally.completed,
                "1303": tally.refused_1303,
                "1302": tally.refused_1302,
                "errors": tally.errors,
            })
        );
    }
}

/// Starts the workers; returns their handles.
fn spawn_workers(
    mock: &str,
    redis_url: &str,
    mode: &str,
    jobs_each: usize,
) -> Vec<std::process::Child> {
    (0..PROCESSES)
        .map(|worker| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "fleet::fleet_worker_process",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                ])
                .env("KLING_FLEET_WORKER", "1")
                .env("FLEET_MOCK", mock)
                .env("FLEET_REDIS", redis_url)
                .env("FLEET_WORKER", worker.to_string())
                .env("FLEET_JOBS", jobs_each.to_string())
                .env("FLEET_MODE", mode)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// Waits for the workers (none may panic or fail) and adds their tallies up.
async fn collect(children: Vec<std::process::Child>) -> Tally {
    let outputs = tokio::task::spawn_blocking(move || {
        children
            .into_iter()
            .map(|child| child.wait_with_output().unwrap())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let mut total = Tally::default();
    for output in outputs {
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "a worker failed: {}\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("FLEET-RESULT "))
            .unwrap_or_else(|| panic!("no result line in: {stdout}"));
        total = total.add(Tally::parse(line));
    }
    total
}

fn video_peak(stats: &Stats) -> u32 {
    stats.max_concurrent.get("video").copied().unwrap_or(0)
}

fn mock_config(slots: u32) -> MockConfig {
    MockConfig::preset(Preset::Pro)
        .speed(SPEED)
        .slots(slots)
        .task_duration(Duration::from_secs(6), Duration::from_secs(12))
}

/// Four processes, one account (Pro: 5 slots, 60 a minute, at 200×), 200 jobs through
/// `TaskSlotsLayer` + `GcraLayer` on Redis: not one 1303, never more than 5 tasks at once,
/// every job done. The control: the same workers with per-process limits meet 1303s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_share_one_account_without_a_1303() {
    let Some(redis_server) = redis() else { return };
    let mock = MockServer::start(mock_config(5)).await.unwrap();
    let started = std::time::Instant::now();
    let tally = collect(spawn_workers(
        &mock.base_url(),
        &redis_server.url(),
        "redis",
        JOBS / PROCESSES,
    ))
    .await;
    let elapsed = started.elapsed();
    let stats = mock.stats();
    assert_eq!(tally.completed, JOBS as u64, "{tally:?}");
    assert_eq!(stats.responses("1303"), 0, "{stats:?}");
    assert_eq!(tally.refused_1303, 0);
    // (The mock refuses a sixth task, so its peak never shows more: the 1303s are the check.)
    assert_eq!(stats.tasks_created, JOBS as u64, "{stats:?}");
    assert_eq!(stats.duplicate_external_ids, 0);
    #[allow(clippy::print_stderr)]
    {
        eprintln!(
            "fleet: {JOBS} jobs in {elapsed:?}, 1302s {}, peak {}",
            stats.responses("1302"),
            video_peak(&stats)
        );
    }

    // Negative control: the same workload, each process limited on its own. The control's
    // server allows twice Pro's rate: at Pro's rate, polling every 5 s of API time holds the
    // tasks it can serve to about rate × poll interval = 5 at once, the slot count itself, so
    // whether per-process slots over-admit would be left to chance. The processes, each told
    // Pro's rate, still send more than even that rate together.
    let control = MockServer::start(mock_config(5).rate_per_minute(120.0))
        .await
        .unwrap();
    let tally = collect(spawn_workers(
        &control.base_url(),
        &redis_server.url(),
        "in-process",
        JOBS / PROCESSES,
    ))
    .await;
    let stats = control.stats();
    #[allow(clippy::print_stderr)]
    {
        eprintln!(
            "control: 1302s {}, 1303s {}, peak {}",
            stats.responses("1302"),
            stats.responses("1303"),
            video_peak(&stats)
        );
    }
    assert_eq!(tally.completed, JOBS as u64);
    // Each process believes it has the 5 slots and the whole rate.
    assert!(
        stats.responses("1303") >= 1,
        "per-process limits must over-admit: {stats:?}"
    );
    assert!(
        stats.responses("1302") >= 20,
        "per-process limits must over-send: {stats:?}"
    );
}

/// Runs the fleet while Redis is killed and brought back empty; returns the mock's stats, the
/// tally, and how many tasks were created while Redis was away (after the creates already on
/// their way when it stopped had landed). The mock has 100 slots so over-admission shows as a
/// peak above 5 rather than as refusals.
async fn outage(mode: &str) -> (Stats, Tally, u64) {
    let mut redis_server = redis().expect("checked by the caller");
    let mock = MockServer::start(mock_config(100)).await.unwrap();
    let children = spawn_workers(
        &mock.base_url(),
        &redis_server.url(),
        mode,
        OUTAGE_JOBS / PROCESSES,
    );
    let waiting = tokio::spawn(collect(children));
    // Stop Redis once the fleet is well under way (process start-up varies with load).
    let under_way = tokio::time::Instant::now() + Duration::from_secs(30);
    while mock.stats().tasks_created < 20 && tokio::time::Instant::now() < under_way {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    redis_server.stop();
    // Creates admitted before the stop may still be on their way (milliseconds at 200x): let
    // them land before counting what the outage itself let through.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let at_stop = mock.stats().tasks_created;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let during = mock.stats().tasks_created - at_stop;
    redis_server.restart().unwrap();
    let at_restart = mock.stats().tasks_created;
    let tally = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("the fleet finishes")
        .unwrap();
    let stats = mock.stats();
    assert!(
        at_stop > 0 && at_restart < stats.tasks_created,
        "the outage fell mid-run: {at_stop} created before it, {at_restart} before the restart"
    );
    #[allow(clippy::print_stderr)]
    {
        eprintln!(
            "outage ({mode}): {at_stop} created before, {during} during, {} after; {tally:?}",
            stats.tasks_created - at_restart
        );
    }
    (stats, tally, during)
}

/// Redis is killed mid-run and restarted empty. Failing closed (the default): no process
/// panics, no job is lost, nothing is over-admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_run_loses_no_job_and_over_admits_nothing_when_failing_closed() {
    if redis().is_none() {
        return;
    }
    let (stats, tally, during) = outage("redis").await;
    // Failing closed: nothing is created while Redis is away.
    assert_eq!(during, 0, "created during the outage");
    assert_eq!(tally.completed, OUTAGE_JOBS as u64, "{tally:?}");
    assert_eq!(stats.tasks_created, OUTAGE_JOBS as u64, "{stats:?}");
    let over = video_peak(&stats).saturating_sub(5);
    #[allow(clippy::print_stderr)]
    {
        eprintln!(
            "outage, fail closed: over-admission {over}, stats {:?}",
            stats.max_concurrent
        );
    }
    assert_eq!(over, 0, "{stats:?}");
}

/// The same with the per-process fallback (4 processes, ⌊5/4⌋ = 1 slot each while Redis is
/// away): over-admission stays within one process's share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_run_with_fallback_over_admits_at_most_one_share() {
    if redis().is_none() {
        return;
    }
    let (stats, tally, during) = outage("fallback").await;
    // The fallback did something: creates went on, on each process's share, while Redis was
    // away (failing closed, the test above, makes none).
    assert!(during > 0, "nothing created during the outage");
    assert_eq!(tally.completed, OUTAGE_JOBS as u64, "{tally:?}");
    assert_eq!(stats.tasks_created, OUTAGE_JOBS as u64, "{stats:?}");
    let over = video_peak(&stats).saturating_sub(5);
    #[allow(clippy::print_stderr)]
    {
        eprintln!(
            "outage, fallback: over-admission {over}, stats {:?}",
            stats.max_concurrent
        );
    }
    assert!(over <= 1, "{stats:?}");
}
