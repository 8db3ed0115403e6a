//! The one-line stack on Redis (feature `redis`): two `KlingLayer`s standing for two processes
//! of one account share its limits through one Redis, over real TCP against `kling-mock` on
//! Pro, in real time at a shared speed factor; the negative control is the same two stacks
//! with in-process limits. Each test starts its own `redis-server` (skipped, saying why, when
//! there is none and `CI` is not set).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kling_core::{BoxError, Outcome, Pool, TaskStatus};
use kling_mock::{MockConfig, MockKling, Preset, Stats};
use kling_redis::testing::RedisServer;
use kling_tower::backends::{Redis, StackBackends};
use kling_tower::redis::{Connection, RedisConfig, WhenUnreachable};
use kling_tower::{Credentials, FollowPolicy, Kling, KlingLayer, StackConfig, TaskRef, Tier};
use tower::{Layer, Service, ServiceExt};

use crate::e2e::{Mock, ONE_AT_A_TIME, warm_up};
use crate::support::request;

/// API time runs this many times faster on the mock and in both stacks: Pro's 60 requests a
/// minute become 30 a second, its tasks of 12–18 s last 0.4–0.6 s.
const SPEED: f64 = 30.0;
/// Jobs (create, then follow until done) per stack.
const JOBS_EACH: usize = 12;
const KEY: &str = "shared-key";
const CREATE: &str = "/v1/videos/text2video";

fn mock_config() -> MockConfig {
    MockConfig::preset(Preset::Pro)
        .speed(SPEED)
        .task_duration(Duration::from_secs(12), Duration::from_secs(18))
        .api_key(KEY)
}

fn redis() -> Option<RedisServer> {
    RedisServer::start_or_skip().expect("redis-server starts (CI=true)")
}

async fn connect(server: &RedisServer, prefix: &str) -> Connection {
    Connection::connect(RedisConfig::new(server.url()).prefix(prefix))
        .await
        .expect("redis answers")
}

fn builder(mock: &Mock) -> kling_tower::KlingBuilder {
    KlingLayer::builder(
        StackConfig::preset(Tier::Pro).speed(SPEED),
        Credentials::api_key(KEY).unwrap(),
    )
    .base_url(&mock.base_url)
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// Runs `JOBS_EACH` jobs through each stack at once; the statuses, or the errors, of all.
async fn run_jobs<B>(stacks: &[KlingLayer<B>]) -> Vec<Result<TaskStatus, BoxError>>
where
    B: StackBackends,
    Kling<HttpClient, B>: Service<
            http::Request<Full<Bytes>>,
            Response = http::Response<Full<Bytes>>,
            Error = BoxError,
        > + Clone
        + Send
        + Sync
        + 'static,
    <Kling<HttpClient, B> as Service<http::Request<Full<Bytes>>>>::Future: Send,
{
    // The first query after 18.5 s of API time, when a task is done: one query per job.
    let policy = FollowPolicy::new()
        .first_query(Duration::from_millis(18_500))
        .speed(SPEED);
    let mut jobs = Vec::new();
    for (n, kling) in stacks.iter().enumerate() {
        // Each stack ("process") on a client of its own.
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let service = kling.layer(client);
        let follower = kling.follower(service.clone(), policy.clone()).unwrap();
        for i in 0..JOBS_EACH {
            let (service, follower) = (service.clone(), follower.clone());
            jobs.push(tokio::spawn(async move {
                let body = format!(r#"{{"prompt":"stack {n} job {i}"}}"#);
                let created = service.oneshot(request("POST", CREATE, &body)).await?;
                let task = Outcome::of(&created)
                    .and_then(Outcome::task)
                    .ok_or("the create answered no task")?
                    .clone();
                let done = follower.follow(TaskRef::from_report(CREATE, &task)).await?;
                Ok::<_, BoxError>(done.status)
            }));
        }
    }
    let mut results = Vec::new();
    for job in jobs {
        results.push(job.await.expect("the job does not panic"));
    }
    results
}

fn video_peak(stats: &Stats) -> u32 {
    stats.max_concurrent.get("video").copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stacks_sharing_one_redis_never_exceed_the_pro_capacity() {
    let Some(redis) = redis() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let mock = Mock::start(mock_config());
    warm_up(
        Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>(),
        &mock,
    )
    .await;

    // Two "processes": each its own connection, its own stack, its own HTTP client.
    let mut stacks = Vec::new();
    for _ in 0..2 {
        let conn = connect(&redis, "shared-test").await;
        stacks.push(builder(&mock).shared(conn).build().unwrap());
    }
    let started = std::time::Instant::now();
    // About 8 s on a quiet machine: the timeout says "did not hang", not how fast.
    let results = tokio::time::timeout(Duration::from_secs(120), run_jobs(&stacks))
        .await
        .expect("the jobs do not hang");
    let took = started.elapsed();
    let stats = mock.stats();
    #[allow(clippy::print_stderr)]
    {
        eprintln!(
            "shared: {} jobs in {took:?}, codes {:?}, peak {}",
            results.len(),
            stats.responses_by_code,
            video_peak(&stats)
        );
    }
    for result in &results {
        assert_eq!(
            result.as_ref().map_err(ToString::to_string),
            Ok(&TaskStatus::Succeeded)
        );
    }
    assert_eq!(stats.tasks_created, 2 * JOBS_EACH as u64, "{stats:?}");
    assert_eq!(stats.responses("1303"), 0, "{stats:?}");
    assert_eq!(stats.duplicate_external_ids, 0, "{stats:?}");
    // The account was used: both stacks together kept its 5 slots busy (the mock refuses a
    // sixth task, so the peak never shows more: the zero 1303 above is the limit's check).
    assert_eq!(video_peak(&stats), 5, "{stats:?}");
    // Every slot was given back, in Redis, for the account of both stacks.
    let slots = stacks[1].slots().snapshot().await.unwrap();
    let video = slots
        .get(stacks[0].account_id(), &Pool::parse("video").unwrap())
        .unwrap();
    assert_eq!((video.in_use, video.capacity), (0, 5));
    mock.shutdown();

    // Negative control: the same two stacks with limits of their own, on the same settings.
    let mock = Mock::start(mock_config());
    let stacks = [
        builder(&mock).build().unwrap(),
        builder(&mock).build().unwrap(),
    ];
    let results = tokio::time::timeout(Duration::from_secs(30), run_jobs(&stacks)).await;
    let stats = mock.stats();
    #[allow(clippy::print_stderr)]
    {
        eprintln!(
            "in process: finished {}, codes {:?}",
            results.is_ok(),
            stats.responses_by_code
        );
    }
    assert!(
        stats.responses("1303") > 0,
        "two stacks with in-process limits meet 1303s: {stats:?}"
    );
    mock.shutdown();
}

/// A lazily connected stack whose Redis is not there.
/// A connection to a Redis that is not there (it connects on first use).
fn nowhere() -> Connection {
    Connection::lazy(
        RedisConfig::new("redis://127.0.0.1:1/")
            .prefix("nowhere")
            .connect_timeout(Duration::from_millis(50))
            .command_timeout(Duration::from_millis(50)),
    )
    .unwrap()
}

fn unreachable_stack(choice: WhenUnreachable) -> KlingLayer<Redis> {
    let conn = nowhere();
    KlingLayer::builder(
        StackConfig::preset(Tier::Pro),
        Credentials::api_key(KEY).unwrap(),
    )
    .shared(conn)
    .when_unreachable(choice)
    .build()
    .unwrap()
}

/// The fleet-order choice reaches both Redis backends: on by default, off when asked.
#[tokio::test]
async fn the_fleet_order_choice_reaches_both_shared_limits() {
    for (backends, on) in [
        (Redis::new(nowhere()), true),
        (Redis::new(nowhere()).arrival_order(false), false),
    ] {
        let kling = KlingLayer::builder(
            StackConfig::preset(Tier::Pro),
            Credentials::api_key(KEY).unwrap(),
        )
        .backends(backends)
        .build()
        .unwrap();
        let expected = format!("arrival_order: {on}");
        let slots = format!("{:?}", kling.slots());
        assert!(slots.contains(&expected), "{slots}");
        let rate = format!("{:?}", kling.rate_limit().expect("Pro paces requests"));
        assert!(rate.contains(&expected), "{rate}");
    }
}

#[tokio::test]
async fn the_unreachable_policy_reaches_the_shared_limits() {
    let mock = MockKling::new(MockConfig::preset(Preset::Pro).api_key(KEY)).unwrap();
    let create = || request("POST", CREATE, r#"{"prompt":"a"}"#);

    // Fail: the create fails at once, and nothing was sent.
    let kling = unreachable_stack(WhenUnreachable::Fail);
    let started = std::time::Instant::now();
    let err = kling
        .layer(mock.clone())
        .oneshot(create())
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    let backend = err
        .downcast_ref::<kling_tower::concurrency::error::BackendError>()
        .unwrap_or_else(|| panic!("the slots' backend error: {err}"));
    assert!(backend.message().contains("unreachable"), "{backend}");
    assert_eq!(mock.stats().requests_total, 0);

    // Wait (the default): the create waits for Redis, and nothing is sent meanwhile.
    let kling = unreachable_stack(WhenUnreachable::Wait);
    let waited = tokio::time::timeout(
        Duration::from_millis(400),
        kling.layer(mock.clone()).oneshot(create()),
    )
    .await;
    assert!(waited.is_err(), "still waiting for Redis");
    assert_eq!(mock.stats().requests_total, 0);
}

/// Three creates one after the other, through the services of stacks one, two, one; how long
/// they took. Each stack paces its own first request at once.
async fn alternate<S>(services: [S; 2]) -> Duration
where
    S: Service<http::Request<Full<Bytes>>, Response = http::Response<Full<Bytes>>> + Clone,
    S::Error: std::fmt::Debug,
{
    let started = std::time::Instant::now();
    for n in [0, 1, 0] {
        let body = format!(r#"{{"prompt":"from stack {n}"}}"#);
        let response = services[n]
            .clone()
            .oneshot(request("POST", CREATE, &body))
            .await
            .unwrap();
        assert!(Outcome::of(&response).unwrap().is_success());
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_rate_is_shared_by_the_stacks() {
    let Some(redis) = redis() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    // Pro at 10×: 10 requests a second, paced 105 ms apart. The mock (in process, on the real
    // clock) has no rate limit here, so the time taken is the stacks' pacing alone.
    let pro = || StackConfig::preset(Tier::Pro).speed(10.0);
    let mock = || {
        let config = MockConfig::preset(Preset::Pro).speed(10.0).no_rate_limit();
        MockKling::new(config.api_key(KEY)).unwrap()
    };
    let credentials = || Credentials::api_key(KEY).unwrap();

    let mut shared = Vec::new();
    for _ in 0..2 {
        let conn = connect(&redis, "rate-test").await;
        let kling = KlingLayer::builder(pro(), credentials())
            .shared(conn)
            .build()
            .unwrap();
        shared.push(kling);
    }
    let mock_one = mock();
    let shared_took =
        alternate([shared[0].layer(mock_one.clone()), shared[1].layer(mock_one)]).await;
    // One account-wide pace: 0, 105, 210 ms.
    assert!(shared_took >= Duration::from_millis(200), "{shared_took:?}");

    // The control: in-process limits pace each stack alone: 0, 0, 105 ms. Judged against the
    // shared run rather than a fixed bound, so a slow machine slows both: one interval less,
    // with half an interval of margin.
    let local = [
        KlingLayer::new(pro(), credentials()).unwrap(),
        KlingLayer::new(pro(), credentials()).unwrap(),
    ];
    let mock_two = mock();
    let local_took = alternate([local[0].layer(mock_two.clone()), local[1].layer(mock_two)]).await;
    assert!(
        local_took + Duration::from_millis(50) < shared_took,
        "in process {local_took:?}, shared {shared_took:?}"
    );
}

/// Warnings a monitor fired, by resource.
type Warned = Arc<Mutex<Vec<kling_metrics::Resource>>>;

/// A monitor that records its warnings in `warned`, with a rate quota if given.
fn watching(warned: &Warned, quota: Option<(u32, Duration)>) -> kling_metrics::Monitor {
    let warned = Arc::clone(warned);
    let mut builder = kling_metrics::Monitor::builder()
        .on_usage_warning(move |warning| warned.lock().unwrap().push(warning.resource.clone()));
    if let Some((requests, window)) = quota {
        builder = builder.rate_quota(requests, window);
    }
    builder.build().unwrap()
}

/// Two processes of one account: stacks on `config` sharing `prefix` on `redis`, the first
/// with the preset's monitor, the second with `monitor`.
async fn two_processes(
    redis: &RedisServer,
    prefix: &str,
    config: &StackConfig,
    monitor: kling_metrics::Monitor,
) -> [KlingLayer<Redis>; 2] {
    let credentials = || Credentials::api_key(KEY).unwrap();
    [
        KlingLayer::builder(config.clone(), credentials())
            .shared(connect(redis, prefix).await)
            .build()
            .unwrap(),
        KlingLayer::builder(config.clone(), credentials())
            .monitor(monitor)
            .shared(connect(redis, prefix).await)
            .build()
            .unwrap(),
    ]
}

/// Another process's tasks show in this process's snapshot: its pools are the fleet's, read
/// from Redis by `refreshed_snapshot`, and by each synchronous snapshot for the next one, and
/// the pool's usage warning fires in a process that created none of the tasks. The control is
/// the same two stacks with in-process limits: the other process's pool is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_shows_the_fleets_pools_and_warns_in_every_process() {
    use kling_metrics::Resource;

    let Some(redis) = redis() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    // Tasks of 10 minutes at 10×: a minute of real time, longer than the test.
    let new_mock = || {
        MockKling::new(
            MockConfig::preset(Preset::Pro)
                .speed(10.0)
                .no_rate_limit()
                .task_duration(Duration::from_secs(600), Duration::from_secs(600))
                .api_key(KEY),
        )
        .unwrap()
    };
    let mock = new_mock();
    let pro = || StackConfig::preset(Tier::Pro).speed(10.0);
    let credentials = || Credentials::api_key(KEY).unwrap();
    let warned = Warned::default();
    let create = |kling: &KlingLayer<Redis>, n: usize| {
        let service = kling.layer(mock.clone());
        async move {
            let body = format!(r#"{{"prompt":"fleet task {n}"}}"#);
            let response = service
                .oneshot(request("POST", CREATE, &body))
                .await
                .unwrap();
            assert!(Outcome::of(&response).unwrap().is_success());
        }
    };
    let video = |snapshot: &kling_metrics::Snapshot| snapshot.pool("video").map(|p| p.in_use);

    let [creating, watching_stack] =
        two_processes(&redis, "snapshot-test", &pro(), watching(&warned, None)).await;
    for n in 0..4 {
        create(&creating, n).await;
    }
    // Nothing read yet: the first synchronous snapshot starts the read (and shows the pools
    // only if Redis answered within its one poll).
    let first = video(&watching_stack.snapshot());
    assert!(matches!(first, None | Some(4)), "{first:?}");
    let fresh = watching_stack.refreshed_snapshot().await;
    let pool = fresh.pool("video").expect("the fleet's video pool");
    assert_eq!((pool.in_use, pool.capacity), (4, 5));
    assert_eq!(
        *warned.lock().unwrap(),
        [Resource::Slots {
            account: Some(watching_stack.account_id().to_string()),
            pool: "video".to_owned(),
        }],
        "4 of 5 slots is past the 80% threshold"
    );
    // A fifth task: the next synchronous snapshots show it once the read they start is back.
    create(&creating, 4).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while video(&watching_stack.snapshot()) != Some(5) {
        assert!(
            std::time::Instant::now() < deadline,
            "the snapshot never read the fifth task"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The control: with limits of their own, the other stack's pool stays empty.
    let local = KlingLayer::builder(pro(), credentials()).build().unwrap();
    let local_watching = KlingLayer::builder(pro(), credentials()).build().unwrap();
    let service = local.layer(new_mock());
    let response = service
        .oneshot(request("POST", CREATE, r#"{"prompt":"local"}"#))
        .await
        .unwrap();
    assert!(Outcome::of(&response).unwrap().is_success());
    let other = local_watching.refreshed_snapshot().await;
    assert_eq!(video(&other).unwrap_or(0), 0, "{other:?}");
    assert_eq!(video(&local.snapshot()), Some(1));
}

/// The requests of the whole fleet count against the account's quota in every process: one
/// process sends 20 requests, another sends none, and the other's snapshot shows the fleet's
/// 20 and fires the rate warning. The control: with in-process limits the other process
/// knows only its own requests (none) and stays quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleets_requests_count_against_the_quota_in_every_process() {
    use kling_metrics::Resource;

    let Some(redis) = redis() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    // Pro at 30×: 30 requests a second; the minute is 2 s.
    let pro = || StackConfig::preset(Tier::Pro).speed(30.0);
    let window = pro().scaled(Duration::from_secs(60));
    let credentials = || Credentials::api_key(KEY).unwrap();
    let mock = || {
        let config = MockConfig::preset(Preset::Pro).speed(30.0).no_rate_limit();
        MockKling::new(config.api_key(KEY)).unwrap()
    };
    let warned = Warned::default();
    // A quota of 20 a minute: the 20 requests, paced at the preset's rate, take a third of
    // the window, so however slow the machine they are still in it when the count is read.
    let quota = Some((20, window));
    async fn twenty_queries<B: StackBackends>(kling: &KlingLayer<B>, mock: MockKling)
    where
        Kling<MockKling, B>: Service<
                http::Request<Full<Bytes>>,
                Response = http::Response<Full<Bytes>>,
                Error = BoxError,
            > + Clone,
    {
        let service = kling.layer(mock);
        for _ in 0..20 {
            // A task the mock does not know: answered 1203, not retried.
            let err = service
                .clone()
                .oneshot(request("GET", "/v1/videos/text2video/missing", ""))
                .await
                .expect_err("a missing task is an error");
            let failed = err
                .downcast_ref::<kling_tower::retry::error::Failed>()
                .unwrap_or_else(|| panic!("the retry layer's error: {err}"));
            assert_eq!(failed.code(), Some(kling_core::Code::NotFound), "{failed}");
            assert_eq!(failed.attempts(), 1, "{failed}");
        }
    }

    let [sending, quiet] =
        two_processes(&redis, "fleet-rate-test", &pro(), watching(&warned, quota)).await;
    let started = std::time::Instant::now();
    twenty_queries(&sending, mock()).await;
    let snapshot = quiet.refreshed_snapshot().await;
    let took = started.elapsed();
    assert_eq!(snapshot.rate.requests, 0, "{snapshot:?}");
    // The count covers the last 59 to 60 sixtieths of the window (its buckets), read with
    // this process's estimate of Redis's clock: a sixtieth more of margin.
    if took < window.mul_f64(58.0 / 60.0) {
        assert_eq!(snapshot.rate.fleet_requests, Some(20), "{snapshot:?}");
    } else {
        let fleet = snapshot.rate.fleet_requests.unwrap_or(0);
        assert!(fleet >= 16, "{fleet} of 20 in the window after {took:?}");
    }
    assert_eq!(
        *warned.lock().unwrap(),
        [Resource::RateQuota],
        "the fleet used 80% of the quota: {snapshot:?}"
    );

    // The control: with limits of their own, the quiet process knows only its own requests.
    warned.lock().unwrap().clear();
    let sending = KlingLayer::builder(pro(), credentials()).build().unwrap();
    let quiet = KlingLayer::builder(pro(), credentials())
        .monitor(watching(&warned, quota))
        .build()
        .unwrap();
    twenty_queries(&sending, mock()).await;
    let snapshot = quiet.refreshed_snapshot().await;
    assert_eq!(snapshot.rate.fleet_requests, None);
    assert!(warned.lock().unwrap().is_empty(), "{snapshot:?}");

    // A fleet that does not count its requests: shared limits, no fleet figure.
    let not_counting = |monitor: Option<kling_metrics::Monitor>| {
        let redis = &redis;
        let pro = pro();
        async move {
            let backends =
                Redis::new(connect(redis, "fleet-rate-uncounted").await).count_requests(false);
            let builder = KlingLayer::builder(pro, credentials()).backends(backends);
            match monitor {
                Some(monitor) => builder.monitor(monitor),
                None => builder,
            }
            .build()
            .unwrap()
        }
    };
    let sending = not_counting(None).await;
    let quiet = not_counting(Some(watching(&warned, quota))).await;
    twenty_queries(&sending, mock()).await;
    let snapshot = quiet.refreshed_snapshot().await;
    assert_eq!(snapshot.rate.fleet_requests, None, "{snapshot:?}");
    assert!(warned.lock().unwrap().is_empty(), "{snapshot:?}");
}

/// A gateway in each of two processes (two `GatewayLayer`s on one Redis): an account's slot
/// taken through one is taken for the other, and the other's create for that account waits,
/// while another account's does not. The control: the same two gateways with in-process
/// limits each grant their own slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_in_two_processes_share_each_accounts_limits_through_redis() {
    use kling_core::AccountId;
    use kling_tower::gateway::GatewayLayer;

    let Some(server) = redis() else { return };
    let mock = kling_mock::MockKling::new(
        MockConfig::preset(Preset::Enterprise)
            .slots(50)
            .no_rate_limit()
            .unlimited_credits(),
    )
    .unwrap();
    // One slot, no request-rate cap: only the slot can make a create wait. Each team is its
    // own Kling account (a gateway refuses two entries with the same credentials).
    let stack = |key: &str| {
        KlingLayer::builder(
            StackConfig::preset(Tier::Enterprise).slots(1),
            Credentials::api_key(key).unwrap(),
        )
    };
    let for_account = |account: &str| {
        let mut req = request("POST", CREATE, r#"{"prompt":"a"}"#);
        req.extensions_mut().insert(AccountId::new(account));
        req
    };
    let shared = |connection: Connection| {
        GatewayLayer::builder()
            .account("team-a", stack("key-a").shared(connection.clone()))
            .account("team-b", stack("key-b").shared(connection))
            .build()
            .unwrap()
            .layer(mock.clone())
    };
    let one = shared(connect(&server, "gateway").await);
    let two = shared(connect(&server, "gateway").await);
    one.clone().oneshot(for_account("team-b")).await.unwrap();
    let waits = tokio::time::timeout(
        Duration::from_millis(500),
        two.clone().oneshot(for_account("team-b")),
    )
    .await;
    assert!(
        waits.is_err(),
        "team-b's one slot is taken in the other process"
    );
    two.clone().oneshot(for_account("team-a")).await.unwrap();

    let local = || {
        GatewayLayer::builder()
            .account("team-b", stack("key-b"))
            .build()
            .unwrap()
            .layer(mock.clone())
    };
    let (one, two) = (local(), local());
    one.oneshot(for_account("team-b")).await.unwrap();
    tokio::time::timeout(
        Duration::from_millis(500),
        two.oneshot(for_account("team-b")),
    )
    .await
    .expect("in-process limits: each gateway has its own slot")
    .unwrap();
}

/// Two accounts of one gateway on one Redis: each account's snapshot shows its own pools,
/// not the other's (Redis holds every account's pools under the prefix, and a snapshot read
/// them all: team-a's showed team-b's task as its own video pool, and warned about it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_accounts_snapshot_shows_only_its_own_pools_on_redis() {
    use kling_core::AccountId;
    use kling_tower::gateway::GatewayLayer;

    let Some(server) = redis() else { return };
    let mock = kling_mock::MockKling::new(
        MockConfig::preset(Preset::Enterprise)
            .slots(50)
            .no_rate_limit()
            .unlimited_credits(),
    )
    .unwrap();
    let stack = |key: &str| {
        KlingLayer::builder(
            StackConfig::preset(Tier::Enterprise).slots(2),
            Credentials::api_key(key).unwrap(),
        )
    };
    let connection = connect(&server, "gateway-snapshot").await;
    let gateway = GatewayLayer::builder()
        .account("team-a", stack("key-a").shared(connection.clone()))
        .account("team-b", stack("key-b").shared(connection))
        .build()
        .unwrap();
    let service = gateway.layer(mock.clone());
    let mut create = request("POST", CREATE, r#"{"prompt":"a"}"#);
    create.extensions_mut().insert(AccountId::new("team-b"));
    service.oneshot(create).await.unwrap();

    let team_a = gateway.get(&AccountId::new("team-a")).unwrap();
    let team_b = gateway.get(&AccountId::new("team-b")).unwrap();
    let a = team_a.refreshed_snapshot().await;
    let b = team_b.refreshed_snapshot().await;
    let in_use = |s: &kling_metrics::Snapshot| s.pool("video").map(|p| p.in_use).unwrap_or(0);
    assert_eq!(in_use(&b), 1, "{b:?}");
    assert_eq!(in_use(&a), 0, "team-b's task is not team-a's: {a:?}");
    for (snapshot, account) in [(&a, "team-a"), (&b, "team-b")] {
        for pool in &snapshot.pools {
            assert_eq!(pool.account.as_deref(), Some(account), "{snapshot:?}");
        }
    }
}

/// `queries` queries of one task through a Pro stack on Redis told 90 requests a minute against
/// the mock's 60 (in process, on the real clock, at 30× and with no jitter allowance, so the
/// stack's pace is 1.5 times the mock's), six workers sending back to back: the share of the
/// mock's requests answered 1302.
async fn share_1302_told_one_and_a_half_times(redis: &RedisServer, adaptive: bool) -> f64 {
    let mock = MockKling::new(mock_config().unlimited_credits()).unwrap();
    let config = StackConfig::preset(Tier::Pro)
        .speed(SPEED)
        .rate_per_minute(90.0)
        .jitter_allowance(Duration::ZERO)
        .adaptive_rate(adaptive);
    let prefix = format!("adaptive-{adaptive}");
    let kling = KlingLayer::builder(config, Credentials::api_key(KEY).unwrap())
        .shared(connect(redis, &prefix).await)
        .build()
        .unwrap();
    let service = kling.layer(mock.clone());
    let created = service
        .clone()
        .oneshot(request("POST", CREATE, r#"{"prompt":"a cat"}"#))
        .await
        .unwrap();
    let task = Outcome::of(&created).unwrap().task().unwrap().id.clone();
    let uri = format!("{CREATE}/{task}");
    let workers: Vec<_> = (0..6)
        .map(|_| {
            let (service, uri) = (service.clone(), uri.clone());
            tokio::spawn(async move {
                for _ in 0..25 {
                    service
                        .clone()
                        .oneshot(request("GET", &uri, ""))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let stats = mock.stats();
    let refused = stats.responses_by_code.get("1302").copied().unwrap_or(0);
    refused as f64 / stats.requests_total as f64
}

/// The adaptive rate (on by default under a rate cap) reaches the rate limiter in Redis: told
/// 1.5 times the mock's rate, the stack meets few 1302s; the control, with it off, many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adaptive_rate_works_on_redis() {
    let Some(redis) = redis() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let on = share_1302_told_one_and_a_half_times(&redis, true).await;
    let off = share_1302_told_one_and_a_half_times(&redis, false).await;
    assert!(
        on < 0.2,
        "adaptive: 1302s on {on:.3} of the requests (off: {off:.3})"
    );
    assert!(
        off > 0.3,
        "fixed rate: 1302s on {off:.3} of the requests (on: {on:.3})"
    );
}
