//! The one-line stack in paused time against the in-process mock: presets, handles, drain,
//! callbacks and the gateway.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use kling_core::{AccountId, Outcome, PoolScope, TaskStatus};
use kling_mock::{MockConfig, MockKling, Preset};
use kling_tower::error::{Draining, UnknownAccount};
use kling_tower::gateway::GatewayLayer;
use kling_tower::{Credentials, KlingLayer, StackConfig, TaskRef, Tier};
use tower::{Layer, Service, ServiceExt};

use crate::support::{accepted_create, envelope, request};

type Response = http::Response<Full<Bytes>>;

async fn send<S>(
    service: &S,
    req: http::Request<Full<Bytes>>,
) -> Result<Response, kling_core::BoxError>
where
    S: Service<http::Request<Full<Bytes>>, Response = Response, Error = kling_core::BoxError>
        + Clone,
{
    service.clone().oneshot(req).await
}

fn roomy_mock() -> MockKling {
    MockKling::new(
        MockConfig::preset(Preset::Enterprise)
            .slots(50)
            .no_rate_limit()
            .unlimited_credits(),
    )
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn each_preset_builds_the_stack_with_its_numbers() {
    // tier, video slots, image slots, rate per minute, daily credits
    let table = [
        (Tier::Free, 1, 1, Some(10.0), Some(66.0)),
        (Tier::Standard, 3, 3, Some(30.0), None),
        (Tier::Pro, 5, 5, Some(60.0), None),
        (Tier::Enterprise, 10, 10, None, None),
        (Tier::ResourcePack, 20, 9, None, None),
    ];
    let speed = 2.0;
    for (tier, video, image, rate, credits) in table {
        let config = StackConfig::preset(tier).speed(speed);
        let kling = KlingLayer::new(config, Credentials::api_key("k").unwrap()).unwrap();
        let service = kling.layer(roomy_mock());
        for (path, body) in [
            ("/v1/videos/text2video", r#"{"prompt":"a"}"#),
            ("/v1/images/generations", r#"{"prompt":"b","n":1}"#),
        ] {
            let response = send(&service, request("POST", path, body)).await.unwrap();
            assert!(Outcome::of(&response).unwrap().is_success(), "{tier}");
        }
        let snapshot = kling.snapshot();
        let pool = |name: &str| snapshot.pool(name).unwrap().clone();
        assert_eq!(
            (pool("video").capacity, pool("video").in_use),
            (video, 1),
            "{tier}"
        );
        assert_eq!(pool("image").capacity, image, "{tier}");
        assert_eq!(
            pool("video").account.as_deref(),
            Some(kling.account_id().as_str())
        );

        // The rate limiter paces at the rate's interval at this speed plus the 15 ms jitter
        // allowance (real time, not scaled); without a cap it is there too (for the cooldown
        // and `/account/costs`), with a quota that never holds a request.
        let quota = kling.rate_limit().expect("always a rate limiter").quota();
        match rate {
            Some(r) => {
                let expected = 1.0 / (60.0 / (r * speed) + 0.015);
                let paced = quota.rate_per_second();
                assert!(
                    (paced - expected).abs() < 1e-6,
                    "{tier}: {paced} vs {expected}"
                );
                assert_eq!(quota.burst(), 1, "{tier}");
            }
            None => {
                assert_eq!(quota.period(), Duration::from_micros(1), "{tier}");
                assert_eq!(quota.burst(), 65_535, "{tier}");
            }
        }
        // The monitor measures usage against the account's rate over a (sped-up) minute.
        assert_eq!(snapshot.rate.quota, rate.map(|r| r as u32), "{tier}");
        if rate.is_some() {
            assert_eq!(snapshot.rate.window, Duration::from_secs(30), "{tier}");
        }
        assert_eq!(snapshot.rate.requests, 2, "{tier}");
        // The Free tier's 66 credits a day, two of them spent on estimates.
        assert_eq!(kling.spend_guard().map(|g| g.budget()), credits, "{tier}");
        if let Some(guard) = kling.spend_guard() {
            assert_eq!(guard.remaining(Some(kling.account_id())), 64.0);
        }
        // The retry layer and the follow policy run at the speed factor.
        assert_eq!(
            kling.config().retry_deadline_duration(),
            Duration::from_secs(300)
        );
    }
}

/// The Pro mock of the forty-jobs test: tasks of 20–40 s, an API-key account.
fn forty_jobs_mock() -> MockConfig {
    MockConfig::preset(Preset::Pro)
        .task_duration(Duration::from_secs(20), Duration::from_secs(40))
        .api_key("forty-jobs-key")
}

/// The forty creates of the forty-jobs test, at once, through a bare client (the API key and
/// the classify step, no limit) on a mock of `config`: the mock's counts.
async fn forty_bare_creates(config: MockConfig) -> kling_mock::Stats {
    let mock = MockKling::new(config).unwrap();
    let bare = kling_tower::AuthLayer::new(Credentials::api_key("forty-jobs-key").unwrap())
        .layer(kling_core::ClassifyLayer::new().layer(mock.clone()));
    let creates: Vec<_> = (0..40)
        .map(|i| {
            let body = format!(r#"{{"prompt":"job {i}"}}"#);
            let create = bare
                .clone()
                .oneshot(request("POST", "/text-to-video/kling-3.0", &body));
            tokio::spawn(create)
        })
        .collect();
    for create in creates {
        create.await.unwrap().expect("the mock answers");
    }
    mock.stats()
}

#[tokio::test(start_paused = true)]
async fn the_pro_stack_runs_forty_jobs_without_a_refusal() {
    let mock = MockKling::new(forty_jobs_mock()).unwrap();
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Pro),
        Credentials::api_key("forty-jobs-key").unwrap(),
    )
    .unwrap();
    let service = kling.layer(mock.clone());
    let follower = kling
        .follower(service.clone(), kling.follow_policy())
        .unwrap();
    let jobs: Vec<_> = (0..40)
        .map(|i| {
            let service = service.clone();
            let follower = follower.clone();
            tokio::spawn(async move {
                let body = format!(r#"{{"prompt":"job {i}"}}"#);
                let created = send(&service, request("POST", "/text-to-video/kling-3.0", &body))
                    .await
                    .unwrap();
                let task = Outcome::of(&created).unwrap().task().unwrap().clone();
                follower
                    .follow(TaskRef::from_report("/text-to-video/kling-3.0", &task))
                    .await
                    .unwrap()
            })
        })
        .collect();
    for job in jobs {
        assert_eq!(job.await.unwrap().status, TaskStatus::Succeeded);
    }
    let stats = mock.stats();
    assert_eq!(stats.tasks_created, 40);
    assert_eq!(stats.responses_by_code.get("1302"), None, "{stats:?}");
    assert_eq!(stats.responses_by_code.get("1303"), None, "{stats:?}");
    // The account was used to the full (the mock refuses a sixth, so it never shows more).
    assert_eq!(stats.max_concurrent.get("video:kling-3.0"), Some(&5));
    // Every slot came back: the follower's queries went through the slots layer.
    assert_eq!(kling.snapshot().pool("video:kling-3.0").unwrap().in_use, 0);
    // An API key (new-style endpoints take no other) signs nothing; the JWT's reuse in the
    // stack is the auth tests' and the reliability suite's, on legacy endpoints.
    assert_eq!(kling.auth().tokens_signed(), 0);

    // Negative control: the same forty creates through a bare client on the same mock
    // settings meet the rate (a burst of one: all but the first are 1302s) ...
    let bare = forty_bare_creates(forty_jobs_mock()).await;
    assert_eq!(bare.responses("1302"), 39, "{bare:?}");
    // ... and, with the rate check off (it answers before the slots are looked at), the five
    // slots: all but five are 1303s.
    let bare = forty_bare_creates(forty_jobs_mock().no_rate_limit()).await;
    assert_eq!(bare.responses("1303"), 35, "{bare:?}");
    assert_eq!(bare.tasks_created, 5, "{bare:?}");
}

#[tokio::test(start_paused = true)]
async fn drain_refuses_new_creates_and_waits_for_followed_tasks() {
    let mock = MockKling::new(
        MockConfig::preset(Preset::Pro)
            .task_duration(Duration::from_secs(60), Duration::from_secs(60)),
    )
    .unwrap();
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Pro),
        Credentials::api_key("k").unwrap(),
    )
    .unwrap();
    let service = kling.layer(mock.clone());
    let created = send(
        &service,
        request("POST", "/v1/videos/text2video", r#"{"prompt":"a"}"#),
    )
    .await
    .unwrap();
    let task = Outcome::of(&created).unwrap().task().unwrap().clone();
    let follower = kling
        .follower(service.clone(), kling.follow_policy())
        .unwrap();
    let follow = tokio::spawn(async move {
        follower
            .follow(TaskRef::from_report("/v1/videos/text2video", &task))
            .await
    });
    tokio::time::sleep(Duration::from_secs(1)).await;

    let drained = tokio::spawn({
        let kling = kling.clone();
        async move {
            kling.drain().await;
            tokio::time::Instant::now()
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !drained.is_finished(),
        "a followed task holds the drain open"
    );
    assert!(kling.drain_handle().is_draining());

    // A new create is refused locally, never sent; a query still passes.
    let before = mock.stats().requests_total;
    let err = send(
        &service,
        request("POST", "/v1/videos/text2video", r#"{"prompt":"a"}"#),
    )
    .await
    .unwrap_err();
    let draining = err.downcast_ref::<Draining>().expect("a Draining error");
    assert_eq!(draining.path(), "/v1/videos/text2video");
    assert_eq!(mock.stats().requests_total, before);
    let listed = send(
        &service,
        request("GET", "/v1/videos/text2video?pageNum=1", ""),
    )
    .await
    .unwrap();
    assert!(Outcome::of(&listed).unwrap().is_success());

    let done = follow.await.unwrap().unwrap();
    assert_eq!(done.status, TaskStatus::Succeeded);
    let drained_at = drained.await.unwrap();
    assert!(drained_at.elapsed() < Duration::from_secs(1));
    assert_eq!(kling.drain_handle().in_flight(), 0);
}

/// A create admitted before the drain and still held back unsent when it begins (waiting for a
/// task slot, or for its rate turn) is refused with `Draining` as one arriving then is: it was
/// sent after the drain began, made a task nobody would follow in a process shutting down, and
/// held the drain up until then (up to its retry deadline, 10 minutes, for a slot). What it
/// held goes back: the image slot it had, its credit estimate.
#[tokio::test(start_paused = true)]
async fn a_create_held_back_unsent_when_the_drain_begins_is_refused_and_gives_back_what_it_held() {
    let mock = roomy_mock();
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Free),
        Credentials::api_key("k").unwrap(),
    )
    .unwrap();
    let service = kling.layer(mock.clone());
    let video = || request("POST", "/v1/videos/text2video", r#"{"prompt":"a"}"#);
    let image = || request("POST", "/v1/images/generations", r#"{"prompt":"b","n":1}"#);
    send(&service, video()).await.unwrap();
    // The Free tier's one video slot is taken: this one waits for it.
    let for_a_slot = tokio::spawn(service.clone().oneshot(video()));
    // Its image slot is free, but its rate turn is 6 s after the first create's.
    let for_a_turn = tokio::spawn(service.clone().oneshot(image()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(kling.snapshot().pool("image").unwrap().in_use, 1);

    let drained = tokio::spawn({
        let kling = kling.clone();
        async move { kling.drain().await }
    });
    for (waiting, path) in [
        (for_a_slot, "/v1/videos/text2video"),
        (for_a_turn, "/v1/images/generations"),
    ] {
        let refused = tokio::time::timeout(Duration::from_millis(1), waiting)
            .await
            .expect("refused once the drain begins")
            .unwrap()
            .unwrap_err();
        let draining = refused
            .downcast_ref::<Draining>()
            .unwrap_or_else(|| panic!("{refused}"));
        assert_eq!(draining.path(), path);
    }
    tokio::time::timeout(Duration::from_millis(1), drained)
        .await
        .expect("nothing else in flight")
        .unwrap();
    assert_eq!(mock.stats().tasks_created, 1, "neither was sent");
    let snapshot = kling.snapshot();
    assert_eq!(snapshot.pool("video").unwrap().in_use, 1);
    assert_eq!(
        snapshot.pool("image").unwrap().in_use,
        0,
        "its slot went back"
    );
    let spend = kling.spend_guard().unwrap();
    assert_eq!(spend.remaining(Some(kling.account_id())), 65.0);
}

/// The control: a create on its way when the drain begins (granted its slot and turn, its
/// answer slow) goes on, and the drain waits for its answer.
#[tokio::test(start_paused = true)]
async fn a_create_on_its_way_when_the_drain_begins_is_waited_for() {
    let mock = roomy_mock();
    let slow = tower::service_fn(move |request: http::Request<Full<Bytes>>| {
        let mock = mock.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            mock.oneshot(request).await
        }
    });
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Free),
        Credentials::api_key("k").unwrap(),
    )
    .unwrap();
    let service = kling.layer(slow);
    let create = tokio::spawn(service.clone().oneshot(request(
        "POST",
        "/v1/videos/text2video",
        r#"{"prompt":"a"}"#,
    )));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let drained = tokio::spawn({
        let kling = kling.clone();
        async move { kling.drain().await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!drained.is_finished(), "the create on its way holds it");
    let created = create.await.unwrap().unwrap();
    assert!(Outcome::of(&created).unwrap().is_success());
    tokio::time::timeout(Duration::from_millis(1), drained)
        .await
        .expect("the drain returns with its answer")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_verified_callback_frees_the_tasks_slot() {
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Free),
        Credentials::api_key("k").unwrap(),
    )
    .unwrap();
    let service = kling.layer(roomy_mock());
    let created = send(
        &service,
        request("POST", "/v1/videos/text2video", r#"{"prompt":"a"}"#),
    )
    .await
    .unwrap();
    let id = Outcome::of(&created).unwrap().task().unwrap().id.clone();
    assert_eq!(kling.snapshot().pool("video").unwrap().in_use, 1);

    let payload =
        format!(r#"{{"task_id":"{id}","task_status":"succeed","final_unit_deduction":"0.5"}}"#);
    let task = kling
        .on_callback(payload.as_bytes())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(task.status, TaskStatus::Succeeded);
    let snapshot = kling.snapshot();
    assert_eq!(snapshot.pool("video").unwrap().in_use, 0);
    assert_eq!(snapshot.tasks.finished, 1);
    // The reported cost replaced the 1-credit estimate.
    let guard = kling.spend_guard().unwrap();
    assert_eq!(guard.remaining(Some(kling.account_id())), 65.5);
}

/// A callback body that reports two tasks (an array, as a proxy batching callbacks may post):
/// both tasks' costs correct the spend guard and the monitor counts both ended. Only the first
/// task's were, so the second's estimate stayed spent and the monitor missed its end.
#[tokio::test(start_paused = true)]
async fn a_callback_reporting_several_tasks_settles_each() {
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Free).slots(2),
        Credentials::api_key("k").unwrap(),
    )
    .unwrap();
    let service = kling.layer(roomy_mock());
    let mut ids = Vec::new();
    for _ in 0..2 {
        let create = request("POST", "/v1/videos/text2video", r#"{"prompt":"a"}"#);
        let created = send(&service, create).await.unwrap();
        ids.push(Outcome::of(&created).unwrap().task().unwrap().id.clone());
    }
    assert_eq!(kling.snapshot().pool("video").unwrap().in_use, 2);
    let guard = kling.spend_guard().unwrap();
    assert_eq!(guard.remaining(Some(kling.account_id())), 64.0);

    let ended = |id: &str| {
        format!(r#"{{"task_id":"{id}","task_status":"succeed","final_unit_deduction":"0.5"}}"#)
    };
    let payload = format!("[{},{}]", ended(&ids[0]), ended(&ids[1]));
    let tasks = kling.on_callback_tasks(payload.as_bytes()).await.unwrap();
    assert_eq!(
        tasks.iter().map(|t| &t.id).collect::<Vec<_>>(),
        [&ids[0], &ids[1]]
    );
    let snapshot = kling.snapshot();
    assert_eq!(snapshot.pool("video").unwrap().in_use, 0);
    assert_eq!(snapshot.tasks.finished, 2);
    assert_eq!(guard.remaining(Some(kling.account_id())), 65.0);
    // `on_callback` applies each too, and returns the first.
    let more: Vec<String> = {
        let mut more = Vec::new();
        for _ in 0..2 {
            let create = request("POST", "/v1/videos/text2video", r#"{"prompt":"a"}"#);
            let created = send(&service, create).await.unwrap();
            more.push(Outcome::of(&created).unwrap().task().unwrap().id.clone());
        }
        more
    };
    let payload = format!("[{},{}]", ended(&more[0]), ended(&more[1]));
    let first = kling
        .on_callback(payload.as_bytes())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.id, more[0]);
    assert_eq!(kling.snapshot().tasks.finished, 4);
    assert_eq!(guard.remaining(Some(kling.account_id())), 64.0);
}

/// Task slots in this process whose backend fails every change while `down` (Redis away).
#[derive(Clone)]
struct FlakySlots {
    inner: kling_concurrency::backend::InProcess,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl kling_concurrency::backend::SlotBackend for FlakySlots {
    type Acquire = kling_concurrency::backend::InProcessAcquire;
    type Apply = std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<
                        kling_concurrency::backend::Applied,
                        kling_concurrency::error::BackendError,
                    >,
                > + Send,
        >,
    >;
    type Snapshot = <kling_concurrency::backend::InProcess as kling_concurrency::backend::SlotBackend>::Snapshot;

    fn acquire(&self, key: kling_concurrency::backend::SlotKey, weight: u32) -> Self::Acquire {
        self.inner.acquire(key, weight)
    }

    fn apply(&self, op: kling_concurrency::backend::SlotOp) -> Self::Apply {
        if self.down.load(std::sync::atomic::Ordering::Relaxed) {
            let err = kling_concurrency::error::BackendError::new("slots backend unreachable");
            return Box::pin(std::future::ready(Err(err)));
        }
        Box::pin(self.inner.apply(op))
    }

    fn snapshot(&self) -> Self::Snapshot {
        self.inner.snapshot()
    }

    fn create_halts(&self) -> Option<Arc<kling_core::signals::CreateHalts>> {
        self.inner.create_halts()
    }
}

/// [`FlakySlots`] under a stack, the rate limiter in this process.
#[derive(Clone)]
struct FlakyBackends {
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl kling_tower::backends::StackBackends for FlakyBackends {
    type Rate = kling_ratelimit::InProcess;
    type Slots = FlakySlots;

    fn rate_backend(
        &self,
        _config: &StackConfig,
    ) -> Result<Self::Rate, kling_tower::error::ConfigError> {
        Ok(kling_ratelimit::InProcess::new())
    }

    fn slots_backend(
        &self,
        slots: &kling_concurrency::SlotsConfig,
        _config: &StackConfig,
    ) -> Result<FlakySlots, kling_tower::error::ConfigError> {
        Ok(FlakySlots {
            inner: kling_concurrency::backend::InProcess::new(slots.clone()).unwrap(),
            down: self.down.clone(),
        })
    }
}

/// A callback (or a report handed to `on_task`) while the slots' backend fails (Redis away):
/// the error is returned, and the task's end still reaches the spend guard (its reported cost
/// replaces the estimate) and the monitor (counted finished). Both returned at the slots'
/// error first, so the estimate stayed spent and the monitor counted the task running.
#[tokio::test(start_paused = true)]
async fn a_callback_reaches_the_spend_guard_and_the_monitor_when_the_slots_fail() {
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let kling = KlingLayer::builder(
        StackConfig::preset(Tier::Free).slots(2),
        Credentials::api_key("k").unwrap(),
    )
    .backends(FlakyBackends { down: down.clone() })
    .build()
    .unwrap();
    let service = kling.layer(roomy_mock());
    let mut ids = Vec::new();
    for _ in 0..2 {
        let create = request("POST", "/v1/videos/text2video", r#"{"prompt":"a"}"#);
        let created = send(&service, create).await.unwrap();
        ids.push(Outcome::of(&created).unwrap().task().unwrap().id.clone());
    }
    let guard = kling.spend_guard().unwrap();
    assert_eq!(guard.remaining(Some(kling.account_id())), 64.0);
    assert_eq!(kling.snapshot().tasks.running, 2);

    down.store(true, std::sync::atomic::Ordering::Relaxed);
    let ended = |id: &str| {
        format!(r#"{{"task_id":"{id}","task_status":"succeed","final_unit_deduction":"0.5"}}"#)
    };
    let err = kling
        .on_callback_tasks(ended(&ids[0]).as_bytes())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unreachable"), "{err}");
    assert_eq!(guard.remaining(Some(kling.account_id())), 64.5);
    let tasks = kling.snapshot().tasks;
    assert_eq!((tasks.running, tasks.finished), (1, 1));

    let report = kling_core::Envelope::parse_callback(ended(&ids[1]).as_bytes()).unwrap();
    let err = kling.on_task(&report[0]).await.unwrap_err();
    assert!(err.to_string().contains("unreachable"), "{err}");
    assert_eq!(guard.remaining(Some(kling.account_id())), 65.0);
    let tasks = kling.snapshot().tasks;
    assert_eq!((tasks.running, tasks.finished), (0, 2));

    // Redis back: the sender's retry of the callback frees the slots, and counts nothing twice.
    down.store(false, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(kling.snapshot().pool("video").unwrap().in_use, 2);
    let payload = format!("[{},{}]", ended(&ids[0]), ended(&ids[1]));
    kling.on_callback_tasks(payload.as_bytes()).await.unwrap();
    let snapshot = kling.snapshot();
    assert_eq!(snapshot.pool("video").unwrap().in_use, 0);
    assert_eq!(snapshot.tasks.finished, 2);
    assert_eq!(guard.remaining(Some(kling.account_id())), 65.0);
}

/// A report handed to `on_task` (a verified callback the caller parsed) finds a task whose
/// create's answer was lost by its external id, as `on_callback` does: the slot held under
/// that id alone is freed.
#[tokio::test(start_paused = true)]
async fn on_task_frees_a_slot_held_under_the_external_id_only() {
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Free).retry_max_attempts(1),
        Credentials::api_key("k").unwrap(),
    )
    .unwrap();
    let lost = MockKling::new(
        MockConfig::preset(Preset::Enterprise)
            .no_rate_limit()
            .unlimited_credits()
            .lost_answer_rate(1.0),
    )
    .unwrap();
    let service = kling.layer(lost);
    let create = request(
        "POST",
        "/v1/videos/text2video",
        r#"{"prompt":"a","external_task_id":"job-7"}"#,
    );
    assert!(send(&service, create).await.is_err(), "the answer was lost");
    assert_eq!(kling.snapshot().pool("video").unwrap().in_use, 1);

    let ended = kling_core::Envelope::parse_callback(
        br#"{"task_id":"t-9","task_status":"succeed","task_info":{"external_task_id":"job-7"}}"#,
    )
    .unwrap()
    .remove(0);
    kling.on_task(&ended).await.unwrap();
    assert_eq!(kling.snapshot().pool("video").unwrap().in_use, 0);
}

/// `slot_queue` reaches the stack's task slots: with no queue, a create that finds the Free
/// tier's one slot taken is refused at once, unsent and not retried; without it, it waits.
#[tokio::test(start_paused = true)]
async fn with_no_slot_queue_a_create_that_finds_no_slot_is_refused_unsent() {
    let create = || request("POST", "/v1/videos/text2video", r#"{"prompt":"a"}"#);
    let mock = roomy_mock();
    let busy = KlingLayer::new(
        StackConfig::preset(Tier::Free).slot_queue(Some(0)),
        Credentials::api_key("k").unwrap(),
    )
    .unwrap()
    .layer(mock.clone());
    send(&busy, create()).await.unwrap();
    let err = send(&busy, create()).await.unwrap_err();
    let full = err
        .downcast_ref::<kling_concurrency::error::QueueFull>()
        .unwrap_or_else(|| panic!("{err}"));
    assert_eq!(full.max(), 0);
    assert_eq!(
        mock.stats().tasks_created,
        1,
        "the refused create was not sent"
    );

    // The control: the same stack without the bound waits for the slot.
    let waits = KlingLayer::new(
        StackConfig::preset(Tier::Free),
        Credentials::api_key("k").unwrap(),
    )
    .unwrap()
    .layer(roomy_mock());
    send(&waits, create()).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(60), send(&waits, create())).await;
    assert!(second.is_err(), "waits for the slot");
}

/// `pool_scope` reaches the stack's task slots: counted per product, a create of a second model
/// finds the Free tier's one `video` slot taken (and, with no queue, is refused unsent);
/// counted per model, as by default, it has a pool of its own and is sent.
#[tokio::test(start_paused = true)]
async fn pool_scope_product_puts_every_model_in_the_products_pool() {
    let create = |model: &str| {
        request(
            "POST",
            &format!("/text-to-video/{model}"),
            r#"{"prompt":"a"}"#,
        )
    };
    let stack = |scope| {
        let mock = roomy_mock();
        let config = StackConfig::preset(Tier::Free)
            .slot_queue(Some(0))
            .pool_scope(scope);
        let stack = KlingLayer::new(config, Credentials::api_key("k").unwrap())
            .unwrap()
            .layer(mock.clone());
        (stack, mock)
    };

    let (shared, mock) = stack(PoolScope::Product);
    send(&shared, create("kling-3.0")).await.unwrap();
    let err = send(&shared, create("kling-2.6")).await.unwrap_err();
    let full = err
        .downcast_ref::<kling_concurrency::error::QueueFull>()
        .unwrap_or_else(|| panic!("{err}"));
    assert_eq!(full.pool().to_string(), "video");
    assert_eq!(mock.stats().tasks_created, 1);

    // The control: per model, the second model's create goes.
    let (apart, mock) = stack(PoolScope::Model);
    send(&apart, create("kling-3.0")).await.unwrap();
    send(&apart, create("kling-2.6")).await.unwrap();
    assert_eq!(mock.stats().tasks_created, 2);
}

#[tokio::test(start_paused = true)]
async fn the_gateway_gives_each_account_its_own_preset() {
    let mock = MockKling::new(
        MockConfig::preset(Preset::Enterprise)
            .slots(50)
            .no_rate_limit()
            .unlimited_credits()
            .api_key_for("key-a", "acct-a")
            .api_key_for("key-b", "acct-b"),
    )
    .unwrap();
    let gateway = GatewayLayer::builder()
        .account(
            "team-a",
            KlingLayer::builder(
                StackConfig::preset(Tier::Pro),
                Credentials::api_key("key-a").unwrap(),
            ),
        )
        .account(
            "team-b",
            KlingLayer::builder(
                StackConfig::preset(Tier::Free),
                Credentials::api_key("key-b").unwrap(),
            ),
        )
        .build()
        .unwrap();
    let service = gateway.layer(mock.clone());
    let for_account = |account: &str| {
        let mut req = request("POST", "/v1/videos/text2video", r#"{"prompt":"a"}"#);
        req.extensions_mut().insert(AccountId::new(account));
        req
    };

    // team-b (Free) has one slot: its second create waits for it; team-a's do not wait.
    send(&service, for_account("team-b")).await.unwrap();
    let waiting = tokio::spawn({
        let service = service.clone();
        let req = for_account("team-b");
        async move { service.oneshot(req).await }
    });
    for _ in 0..3 {
        send(&service, for_account("team-a")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !waiting.is_finished(),
        "team-b's second create waits for its slot"
    );

    let a = gateway.get(&AccountId::new("team-a")).unwrap().snapshot();
    let b = gateway.get(&AccountId::new("team-b")).unwrap().snapshot();
    let (a, b) = (a.pool("video").unwrap(), b.pool("video").unwrap());
    assert_eq!((a.in_use, a.capacity), (3, 5));
    assert_eq!((b.in_use, b.capacity, b.waiters), (1, 1, 1));
    assert_eq!(a.account.as_deref(), Some("team-a"));
    assert_eq!(mock.in_use("acct-a", "video"), 3);
    assert_eq!(mock.in_use("acct-b", "video"), 1);
    waiting.abort();

    // A request for no account, or an unknown one, is refused before it is sent.
    let err = send(&service, request("GET", "/v1/videos/text2video/x", ""))
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<UnknownAccount>().unwrap().account(),
        None
    );
    let mut stranger = request("GET", "/v1/videos/text2video/x", "");
    stranger.extensions_mut().insert(AccountId::new("team-z"));
    let err = send(&service, stranger).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "no kling stack is configured for account team-z"
    );

    // Bad numbers name the account and the field.
    let err = GatewayLayer::builder()
        .account(
            "team-c",
            KlingLayer::builder(
                StackConfig::preset(Tier::Pro).burst(0),
                Credentials::api_key("key-c").unwrap(),
            ),
        )
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "accounts.team-c.burst");
}

#[test]
fn invalid_numbers_are_refused_with_the_field() {
    let credentials = || Credentials::api_key("k").unwrap();
    let err =
        KlingLayer::new(StackConfig::preset(Tier::Pro).headroom(1.5), credentials()).unwrap_err();
    assert_eq!(err.field(), "headroom");
    let err = KlingLayer::builder(StackConfig::preset(Tier::Pro), credentials())
        .base_url("ftp://example.com")
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "base_url");
}

/// An auth layer given to the builder signs for the account of its own credentials: one for
/// another account than the builder's credentials is refused, naming `auth` and both accounts,
/// rather than counting the requests it signs under the builder's account (two stacks built so
/// for two accounts would share one account's slots and rate).
#[test]
fn an_auth_layer_for_other_credentials_than_the_builders_is_refused() {
    use kling_tower::AuthLayer;
    use kling_tower::clock::TokioWallClock;

    let pro = || StackConfig::preset(Tier::Pro);
    for (theirs, builders) in [
        (
            Credentials::api_key("key-b").unwrap(),
            Credentials::api_key("key-a").unwrap(),
        ),
        (
            Credentials::access_key("ak-b", "sk").unwrap(),
            Credentials::access_key("ak-a", "sk").unwrap(),
        ),
        (
            Credentials::access_key("ak-a", "sk").unwrap(),
            Credentials::api_key("key-a").unwrap(),
        ),
    ] {
        let (signs_for, given) = (theirs.account_id(), builders.account_id());
        let err = KlingLayer::builder(pro(), builders.clone())
            .auth(AuthLayer::new(theirs.clone()))
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "auth");
        assert!(err.reason().contains(signs_for.as_str()), "{err}");
        assert!(err.reason().contains(given.as_str()), "{err}");
        // An explicit account does not make the mismatch right: the credentials still differ.
        let err = KlingLayer::builder(pro(), builders)
            .account(AccountId::new("team-a"))
            .auth(AuthLayer::new(theirs))
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "auth");
    }

    // The builder's own credentials with a clock of their own (what `auth` is for) build, and
    // count under that account; so does another secret for the same access key.
    let credentials = Credentials::access_key("ak-a", "sk").unwrap();
    let clocked = AuthLayer::new(credentials.clone()).with_clock(TokioWallClock::new());
    let kling = KlingLayer::builder(pro(), credentials.clone())
        .auth(clocked)
        .build()
        .unwrap();
    assert_eq!(kling.account_id(), &credentials.account_id());
    assert_eq!(kling.auth().account_id(), &credentials.account_id());
    KlingLayer::builder(pro(), credentials)
        .auth(AuthLayer::new(
            Credentials::access_key("ak-a", "sk-2").unwrap(),
        ))
        .build()
        .unwrap();
}

/// The client below the stack sees every attempt's account: the stack's own, or the one the
/// caller set, on a retried attempt too (the stack sets it once, above the retry layer).
#[tokio::test(start_paused = true)]
async fn every_attempt_reaches_the_client_with_its_account() {
    use std::sync::{Arc, Mutex};

    let seen: Arc<Mutex<Vec<Option<AccountId>>>> = Arc::default();
    let log = seen.clone();
    let client = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let n = {
            let mut log = log.lock().unwrap();
            log.push(AccountId::of(&req).cloned());
            log.len()
        };
        async move {
            // Every first attempt is a 5xx (retried), every second one a success.
            let (status, body) = if n % 2 == 1 {
                (500, r#"{"code":5000,"message":"busy","request_id":"r"}"#)
            } else {
                (
                    200,
                    r#"{"code":0,"message":"SUCCEED","request_id":"r","data":null}"#,
                )
            };
            Ok::<_, kling_core::BoxError>(
                http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(body.as_bytes())))
                    .unwrap(),
            )
        }
    });
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Pro),
        Credentials::api_key("k").unwrap(),
    )
    .unwrap();
    let service = kling.layer(client);
    let own = kling.account_id().clone();
    send(&service, request("GET", "/v1/videos/text2video/t1", ""))
        .await
        .unwrap();
    let mut theirs = request("GET", "/v1/videos/text2video/t2", "");
    AccountId::set_if_absent(&mut theirs, &AccountId::new("team-x"));
    send(&service, theirs).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    let team = Some(AccountId::new("team-x"));
    assert_eq!(seen, [Some(own.clone()), Some(own), team.clone(), team]);
}

/// A slots backend that answers like a remote store: its snapshot never completes on the
/// first poll (an in-process backend underneath).
#[derive(Clone)]
struct RoundTrip(kling_concurrency::backend::InProcess);

impl kling_concurrency::backend::SlotBackend for RoundTrip {
    type Acquire =
        <kling_concurrency::backend::InProcess as kling_concurrency::backend::SlotBackend>::Acquire;
    type Apply =
        <kling_concurrency::backend::InProcess as kling_concurrency::backend::SlotBackend>::Apply;
    type Snapshot = std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<
                        Vec<kling_concurrency::backend::PoolSnapshot>,
                        kling_concurrency::error::BackendError,
                    >,
                > + Send,
        >,
    >;

    fn acquire(&self, key: kling_concurrency::backend::SlotKey, weight: u32) -> Self::Acquire {
        self.0.acquire(key, weight)
    }

    fn apply(&self, op: kling_concurrency::backend::SlotOp) -> Self::Apply {
        self.0.apply(op)
    }

    fn snapshot(&self) -> Self::Snapshot {
        let read = self.0.snapshot();
        Box::pin(async move {
            tokio::task::yield_now().await;
            read.await
        })
    }
}

/// A source whose backend takes a round trip shows what its last read found, and each
/// synchronous snapshot starts the next read: the pools are at most one snapshot old, never
/// missing for good. `refreshed_snapshot` reads them first.
#[tokio::test(start_paused = true)]
async fn a_snapshot_of_a_remote_backend_shows_its_last_read_and_starts_the_next() {
    use kling_concurrency::backend::{SlotBackend, SlotKey};
    use kling_concurrency::{SlotsConfig, TaskSlotsLayer};
    use kling_metrics::Monitor;
    use kling_tower::stack::SlotsSource;

    let config = SlotsConfig::new(5);
    let backend = RoundTrip(kling_concurrency::backend::InProcess::new(config.clone()).unwrap());
    let layer = TaskSlotsLayer::with_backend(&config, backend).unwrap();
    let handle = layer.handle();
    let monitor = Monitor::builder().build().unwrap();
    monitor.add_source(SlotsSource::new(handle.clone()));
    let key = SlotKey::new(
        AccountId::new("acct"),
        kling_core::Pool::parse("video").unwrap(),
    );
    let in_use = |snapshot: &kling_metrics::Snapshot| snapshot.pool("video").map(|p| p.in_use);
    // In paused time a sleep ends only once every other task is idle: the read is back.
    let settle = || tokio::time::sleep(Duration::from_millis(1));

    let _first = handle.backend().acquire(key.clone(), 1).await.unwrap();
    // Nothing read yet: the pools are missing, and the read starts.
    assert_eq!(in_use(&monitor.snapshot()), None);
    settle().await;
    assert_eq!(in_use(&monitor.snapshot()), Some(1));
    settle().await;
    // A second slot: the next snapshot still shows the last read, the one after it the new.
    let _second = handle.backend().acquire(key.clone(), 1).await.unwrap();
    assert_eq!(in_use(&monitor.snapshot()), Some(1));
    settle().await;
    assert_eq!(in_use(&monitor.snapshot()), Some(2));
    // A refreshed snapshot reads first.
    let _third = handle.backend().acquire(key.clone(), 1).await.unwrap();
    assert_eq!(in_use(&monitor.refreshed_snapshot().await), Some(3));
    settle().await;
    // A snapshot taken off any runtime (a thread of its own) starts the read on the source's.
    let _fourth = handle.backend().acquire(key, 1).await.unwrap();
    let off_runtime = monitor.clone();
    let shown = std::thread::spawn(move || in_use(&off_runtime.snapshot()))
        .join()
        .unwrap();
    assert_eq!(shown, Some(3));
    settle().await;
    assert_eq!(in_use(&monitor.snapshot()), Some(4));
}

/// A rate-limit backend that a fleet shares, as the stack sees it: its count of the fleet's
/// requests answers on a second poll, or fails while `down` (Redis unreachable).
struct FleetStore {
    inner: kling_ratelimit::InProcess,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl kling_ratelimit::Backend for FleetStore {
    type AcquireFuture = <kling_ratelimit::InProcess as kling_ratelimit::Backend>::AcquireFuture;
    type FeedbackFuture = <kling_ratelimit::InProcess as kling_ratelimit::Backend>::FeedbackFuture;

    fn acquire(
        &self,
        key: &kling_ratelimit::BucketKey,
        policy: &kling_ratelimit::Policy,
    ) -> Self::AcquireFuture {
        self.inner.acquire(key, policy)
    }

    fn feedback(
        &self,
        key: &kling_ratelimit::BucketKey,
        policy: &kling_ratelimit::Policy,
        feedback: kling_ratelimit::Feedback,
    ) -> Self::FeedbackFuture {
        self.inner.feedback(key, policy, feedback)
    }

    fn fleet_requests(
        &self,
        _key: &kling_ratelimit::BucketKey,
    ) -> Option<kling_ratelimit::backend::FleetRequests> {
        let (requests, down) = (self.requests.clone(), self.down.clone());
        Some(Box::pin(async move {
            tokio::task::yield_now().await;
            if down.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(kling_ratelimit::error::BackendError::unreachable("down"));
            }
            Ok(requests.load(std::sync::atomic::Ordering::Relaxed))
        }))
    }
}

/// The fleet's requests show in the snapshot from the source's last read (each snapshot
/// starts the next), count against the quota, and stop showing once the last read is older
/// than the window (the store unreachable since): a count over the window that old says
/// nothing of now.
#[tokio::test(start_paused = true)]
async fn the_fleets_requests_show_from_the_last_read_until_it_is_older_than_the_window() {
    use std::sync::atomic::Ordering;

    use kling_metrics::Monitor;
    use kling_ratelimit::{GcraLayer, Quota};
    use kling_tower::stack::RateLimitSource;

    let requests = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(45));
    let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store = FleetStore {
        inner: kling_ratelimit::InProcess::new(),
        requests: requests.clone(),
        down: down.clone(),
    };
    let layer = GcraLayer::builder(Quota::per_second(1.0))
        .backend(store)
        .build()
        .unwrap();
    let monitor = Monitor::builder()
        .rate_quota(50, Duration::from_secs(60))
        .build()
        .unwrap();
    let account = AccountId::new("acct");
    monitor.add_source(RateLimitSource::new(layer.handle(), vec![account]));
    let settle = || tokio::time::sleep(Duration::from_millis(1));

    assert_eq!(
        monitor.snapshot().rate.fleet_requests,
        None,
        "nothing read yet"
    );
    settle().await;
    let snapshot = monitor.snapshot();
    assert_eq!(snapshot.rate.fleet_requests, Some(45));
    assert_eq!(snapshot.rate.percent(), Some(90.0));
    let read_at = snapshot.rate.fleet_read_at.expect("the read's time");
    assert!(read_at.elapsed() <= Duration::from_millis(1), "{read_at:?}");
    // The store goes away: the last read shows, with its time, while it is within the
    // window, then not.
    down.store(true, Ordering::Relaxed);
    tokio::time::advance(Duration::from_secs(30)).await;
    settle().await;
    let snapshot = monitor.snapshot();
    assert_eq!(snapshot.rate.fleet_requests, Some(45));
    assert_eq!(snapshot.rate.fleet_read_at, Some(read_at));
    tokio::time::advance(Duration::from_secs(31)).await;
    settle().await;
    assert_eq!(monitor.snapshot().rate.fleet_requests, None);
    // Back: read again.
    down.store(false, Ordering::Relaxed);
    requests.store(7, Ordering::Relaxed);
    monitor.snapshot();
    settle().await;
    assert_eq!(monitor.snapshot().rate.fleet_requests, Some(7));
}

#[tokio::test(start_paused = true)]
async fn without_a_rate_cap_a_1302_pauses_the_account_and_account_costs_go_once_a_second() {
    // The client answers the first request 1302 with `Retry-After: 5` and every other one
    // code 0, noting when each arrives.
    let start = tokio::time::Instant::now();
    let arrivals: Arc<Mutex<Vec<(String, Duration)>>> = Arc::default();
    let log = arrivals.clone();
    let client = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let mut log = log.lock().unwrap();
        let first = log.is_empty();
        log.push((req.uri().path().to_owned(), start.elapsed()));
        async move {
            let response = if first {
                let mut response = envelope(
                    429,
                    r#"{"code":1302,"message":"too fast","request_id":"r1"}"#,
                );
                response
                    .headers_mut()
                    .insert("retry-after", "5".parse().unwrap());
                response
            } else {
                envelope(200, r#"{"code":0,"message":"SUCCEED","request_id":"r2"}"#)
            };
            Ok::<_, kling_core::BoxError>(response)
        }
    });
    for tier in [Tier::Enterprise, Tier::ResourcePack] {
        arrivals.lock().unwrap().clear();
        let base = start.elapsed();
        let kling = KlingLayer::new(
            StackConfig::preset(tier),
            Credentials::api_key("k").unwrap(),
        )
        .unwrap();
        let service = kling.layer(client.clone());
        let query = |id: &str| request("GET", &format!("/v1/videos/text2video/{id}"), "");

        // A query refused with 1302 pauses the account: one sent after it waits too.
        let first = tokio::spawn(send_owned(service.clone(), query("t-1")));
        tokio::time::sleep(Duration::from_millis(10)).await;
        send(&service, query("t-2")).await.unwrap();
        first.await.unwrap().unwrap();
        // Three `/account/costs` back to back: one a second, plus the jitter allowance, so
        // that network jitter does not make two of them arrive within Kling's second.
        for _ in 0..3 {
            send(&service, request("GET", "/account/costs", ""))
                .await
                .unwrap();
        }
        let arrivals = arrivals.lock().unwrap();
        let at: Vec<(&str, u128)> = arrivals
            .iter()
            .map(|(path, at)| (path.as_str(), (*at - base).as_millis()))
            .collect();
        assert_eq!(at.len(), 6, "{tier}: {at:?}");
        assert_eq!(at[0], ("/v1/videos/text2video/t-1", 0), "{tier}");
        // Both queries go once the pause ends (the retry after its jittered Retry-After), not
        // the second at once.
        for (path, ms) in &at[1..3] {
            assert!(path.starts_with("/v1/videos/text2video/"), "{tier}: {at:?}");
            assert!((5_000..=7_000).contains(ms), "{tier}: {at:?}");
        }
        let costs: Vec<u128> = at[3..].iter().map(|(_, ms)| *ms).collect();
        assert!(
            costs[1] - costs[0] >= 1_015 && costs[2] - costs[1] >= 1_015,
            "{tier}: {at:?}"
        );
    }
}

async fn send_owned<S>(
    service: S,
    req: http::Request<Full<Bytes>>,
) -> Result<Response, kling_core::BoxError>
where
    S: Service<http::Request<Full<Bytes>>, Response = Response, Error = kling_core::BoxError>,
{
    service.oneshot(req).await
}

#[tokio::test(start_paused = true)]
async fn a_call_retried_counts_every_request_it_sent_in_the_rate_usage() {
    // Each query is answered 1302 once, then with the task: two requests per call reach the
    // account's rate, and the usage the warning is read from says so.
    let sent = Arc::new(Mutex::new(0_u32));
    let counted = sent.clone();
    let client = tower::service_fn(move |_req: http::Request<Full<Bytes>>| {
        let n = {
            let mut sent = counted.lock().unwrap();
            *sent += 1;
            *sent
        };
        let response = if n % 2 == 1 {
            envelope(
                429,
                r#"{"code":1302,"message":"too fast","request_id":"r1"}"#,
            )
        } else {
            envelope(
                200,
                r#"{"code":0,"message":"SUCCEED","request_id":"r2","data":{"task_id":"t1","task_status":"processing"}}"#,
            )
        };
        std::future::ready(Ok::<_, kling_core::BoxError>(response))
    });
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Enterprise),
        Credentials::api_key("key").unwrap(),
    )
    .unwrap();
    let service = kling.layer(client);
    for _ in 0..3 {
        let response = send(&service, request("GET", "/v1/videos/text2video/t1", ""))
            .await
            .unwrap();
        assert!(Outcome::of(&response).unwrap().is_success());
    }
    assert_eq!(*sent.lock().unwrap(), 6);
    assert_eq!(kling.snapshot().rate.requests, 6);
}

#[tokio::test(start_paused = true)]
async fn a_follower_through_the_gateway_queries_as_its_stack_s_account() {
    // Without callbacks, only the follower's queries see the task end and free its slot.
    let mock = MockKling::new(
        MockConfig::preset(Preset::Enterprise)
            .slots(50)
            .no_rate_limit()
            .unlimited_credits()
            .api_key_for("key-a", "acct-a")
            .task_duration(Duration::from_secs(20), Duration::from_secs(20)),
    )
    .unwrap();
    let gateway = GatewayLayer::builder()
        .account(
            "team-a",
            KlingLayer::builder(
                StackConfig::preset(Tier::Pro),
                Credentials::api_key("key-a").unwrap(),
            ),
        )
        .build()
        .unwrap();
    let service = gateway.layer(mock.clone());
    let mut create = request("POST", "/v1/videos/text2video", r#"{"prompt":"a"}"#);
    create.extensions_mut().insert(AccountId::new("team-a"));
    let created = send(&service, create).await.unwrap();
    let task = Outcome::of(&created).unwrap().task().unwrap().clone();

    let stack = gateway.get(&AccountId::new("team-a")).unwrap();
    let follower = stack
        .follower(service.clone(), stack.follow_policy())
        .unwrap();
    let done = follower
        .follow(TaskRef::from_report("/v1/videos/text2video", &task))
        .await
        .expect("followed through the gateway");
    assert_eq!(done.status, TaskStatus::Succeeded);
    assert_eq!(stack.snapshot().pool("video").unwrap().in_use, 0);
}

/// A task nobody follows: at the preset's task lease its slot is given back, and within the
/// second after it the monitor stops counting it as running (the monitor's default lease is the
/// preset's; it counts whole seconds, never early).
#[tokio::test(start_paused = true)]
async fn a_task_nobody_follows_stops_counting_as_running_when_its_slot_is_given_back() {
    let config = StackConfig::preset(Tier::Pro).task_lease(Duration::from_secs(600));
    let kling = KlingLayer::new(config, Credentials::api_key("k").unwrap()).unwrap();
    let mock = MockKling::new(MockConfig::preset(Preset::Pro).api_key("k")).unwrap();
    let service = kling.layer(mock);
    accepted_create(service).await;
    let state = || {
        let snapshot = kling.snapshot();
        let video = snapshot.pool("video").unwrap().in_use;
        (video, snapshot.tasks.running, snapshot.tasks.expired)
    };
    assert_eq!(state(), (1, 1, 0));
    tokio::time::advance(Duration::from_secs(599)).await;
    assert_eq!(state(), (1, 1, 0));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(state(), (0, 1, 0));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(state(), (0, 0, 1));
}

/// The endpoints that answer at once with no task (a video's faces, an image's content) take no
/// slot: before, the stack took each POST there for a create whose answer named no task, and
/// kept a video slot for it until the task lease ran out.
#[tokio::test(start_paused = true)]
async fn endpoints_that_answer_at_once_hold_no_slot() {
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Pro),
        Credentials::api_key("k").unwrap(),
    )
    .unwrap();
    let service = kling.layer(roomy_mock());
    for _ in 0..6 {
        for (path, body) in [
            ("/v1/videos/identify-face", r#"{"video_url":"https://v"}"#),
            ("/v1/videos/image-recognize", r#"{"image":"x"}"#),
        ] {
            let answer = send(&service, request("POST", path, body)).await.unwrap();
            let outcome = Outcome::of(&answer).unwrap();
            assert!(outcome.is_success() && outcome.task().is_none(), "{path}");
        }
    }
    assert!(
        kling
            .snapshot()
            .pool("video")
            .is_none_or(|video| video.in_use == 0),
        "{:?}",
        kling.snapshot().pools
    );
    // All five of the Pro tier's video slots are free: five creates are answered at once.
    let started = tokio::time::Instant::now();
    for _ in 0..5 {
        let created = send(
            &service,
            request("POST", "/v1/videos/text2video", r#"{"prompt":"a"}"#),
        )
        .await
        .unwrap();
        assert!(Outcome::of(&created).unwrap().is_success());
    }
    assert!(started.elapsed() < Duration::from_secs(10), "no slot wait");
    assert_eq!(kling.snapshot().pool("video").unwrap().in_use, 5);
}

/// A create to an endpoint one segment deeper than the others (image expansion) holds a slot of
/// its product's pool, weighted by `n`, until a query of its task says it ended.
#[tokio::test(start_paused = true)]
async fn a_grouped_endpoints_create_holds_its_slots_until_queried() {
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Pro),
        Credentials::api_key("k").unwrap(),
    )
    .unwrap();
    let service = kling.layer(roomy_mock());
    let path = "/v1/images/editing/expand";
    let created = send(&service, request("POST", path, r#"{"image":"x","n":2}"#))
        .await
        .unwrap();
    let id = Outcome::of(&created).unwrap().task().unwrap().id.clone();
    assert_eq!(kling.snapshot().pool("image").unwrap().in_use, 2);
    tokio::time::advance(Duration::from_secs(600)).await;
    let queried = send(&service, request("GET", &format!("{path}/{id}"), ""))
        .await
        .unwrap();
    let task = Outcome::of(&queried).unwrap().task().unwrap().clone();
    assert!(task.status.is_terminal(), "{task:?}");
    assert_eq!(kling.snapshot().pool("image").unwrap().in_use, 0);
}

/// Creates granted their slots at once and then queued at the rate limiter, dropped by the
/// caller before their turn, give their slots back: they never left. Before, the slots layer
/// took them for creates that may have reached Kling and kept their slots for the task lease
/// (30 minutes), so a few caller timeouts held every slot of the pool.
#[tokio::test(start_paused = true)]
async fn creates_dropped_while_queued_at_the_rate_limiter_give_their_slots_back() {
    let mock = MockKling::new(
        MockConfig::preset(Preset::Standard)
            .api_key("k")
            .task_duration(Duration::from_secs(60), Duration::from_secs(60)),
    )
    .unwrap();
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Standard),
        Credentials::api_key("k").unwrap(),
    )
    .unwrap();
    let service = kling.layer(mock.clone());
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let create = request("POST", "/v1/videos/text2video", r#"{"prompt":"a"}"#);
            tokio::spawn(tokio::time::timeout(
                Duration::from_millis(200),
                service.clone().oneshot(create),
            ))
        })
        .collect();
    for call in calls {
        let _ = call.await.unwrap();
    }
    assert_eq!(mock.stats().tasks_created, 1);
    assert_eq!(kling.snapshot().pool("video").unwrap().in_use, 1);
}

/// The other side of the test above: a create that waited its turn at the rate limiter and
/// was then sent keeps its slots when the caller drops it unanswered (the task may run): the
/// rate limiter says it handed the create on.
#[tokio::test(start_paused = true)]
async fn a_create_sent_after_its_rate_limit_turn_keeps_its_slots_when_dropped() {
    let creates = Arc::new(Mutex::new(0));
    let count = creates.clone();
    let client = tower::service_fn(move |_: http::Request<Full<Bytes>>| {
        let n = {
            let mut n = count.lock().unwrap();
            *n += 1;
            *n
        };
        async move {
            if n > 1 {
                std::future::pending::<()>().await;
            }
            Ok::<_, kling_core::BoxError>(envelope(
                200,
                r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t1","task_status":"submitted"}}"#,
            ))
        }
    });
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Standard),
        Credentials::api_key("k").unwrap(),
    )
    .unwrap();
    let service = kling.layer(client);
    let create = || request("POST", "/v1/videos/text2video", r#"{"prompt":"a"}"#);
    send(&service, create()).await.unwrap();
    // The second waits about 2 s for its turn, is sent, and is never answered.
    let dropped = tokio::time::timeout(Duration::from_secs(10), send(&service, create())).await;
    assert!(dropped.is_err());
    assert_eq!(*creates.lock().unwrap(), 2, "sent after its turn");
    assert_eq!(kling.snapshot().pool("video").unwrap().in_use, 2);
}

/// The same through the slots' queue: a create that waited for a slot, was granted it, then
/// queued at the rate limiter and was dropped there gives the slot back (its send watch is
/// made at the grant, when no layer above made one: here no spend guard).
#[tokio::test(start_paused = true)]
async fn a_create_granted_after_waiting_then_dropped_at_the_rate_limiter_gives_its_slot_back() {
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Free).no_daily_credits(),
        Credentials::api_key("k").unwrap(),
    )
    .unwrap();
    let service = kling.layer(roomy_mock());
    let create = || request("POST", "/v1/videos/text2video", r#"{"prompt":"a"}"#);
    let first = send(&service, create()).await.unwrap();
    let id = Outcome::of(&first).unwrap().task().unwrap().id.clone();
    // The second waits for Free's one slot, then (granted at 1 s) for the rate limiter's next
    // turn, about 6 s after the first create; its caller gives up at 3 s.
    let second = tokio::spawn(tokio::time::timeout(
        Duration::from_secs(3),
        service.clone().oneshot(create()),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ended = format!(r#"{{"task_id":"{id}","task_status":"succeed"}}"#);
    kling.on_callback(ended.as_bytes()).await.unwrap();
    assert!(second.await.unwrap().is_err(), "dropped before its turn");
    assert_eq!(kling.snapshot().pool("video").unwrap().in_use, 0);
}

/// The stack's response future is `Send` and `Sync` (a spawned call, a future held across an
/// await in a `Send` task), and `Unpin` when the client's is, with an access key pair or an
/// API key alike: the gate's refusal of a request its credentials cannot be sent on is a
/// field of the drain's future, not another future type around the stack's.
#[tokio::test(start_paused = true)]
async fn the_stacks_future_is_send_sync_and_unpin() {
    fn send_sync_unpin<F: std::future::Future + Send + Sync + Unpin>(_: &F) {}
    let client = tower::service_fn(|_: http::Request<Full<Bytes>>| {
        std::future::ready(Ok::<_, kling_core::BoxError>(http::Response::new(
            Full::new(Bytes::new()),
        )))
    });
    for credentials in [
        Credentials::access_key("ak", "sk").unwrap(),
        Credentials::api_key("k").unwrap(),
    ] {
        let kling = KlingLayer::new(StackConfig::preset(Tier::Pro), credentials).unwrap();
        let mut stack = kling.layer(client);
        let future = stack.call(request("POST", "/text-to-video/kling-3.0", "{}"));
        send_sync_unpin(&future);
    }
}
