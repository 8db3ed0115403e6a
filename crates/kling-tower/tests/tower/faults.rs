//! The Pro stack, as users build it, against the mock's slow and garbled answers in paused
//! time. The mock carries such a request out when it arrives (a create's task made and billed)
//! and only its answer comes late or cut in half: a create whose answer the stack gave up on or
//! could not read made its task all the same (DESIGN.md fact 6). Each job must still end with
//! its task, and no task may be made twice. Each test has its negative control: a client that
//! sends a create again after any error, with no external id, makes tasks twice on the same
//! mock settings.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use kling_core::{BoxError, ClassifyLayer, Outcome, TaskStatus};
use kling_mock::{MockConfig, MockKling, Preset, Stats};
use kling_retry::Recovered;
use kling_retry::error::Failed;
use kling_tower::{AuthLayer, Credentials, KlingLayer, StackConfig, TaskRef, Tier};
use tower::{Layer, Service, ServiceExt};

use crate::support::request;

const KEY: &str = "faults-key";
const CREATE: &str = "/text-to-video/kling-3.0";
const POOL: &str = "video:kling-3.0";
const JOBS: usize = 40;
/// How late a slow answer comes: twice the Pro preset's 30 s attempt timeout.
const SLOW_DELAY: Duration = Duration::from_secs(60);

/// The Pro mock: tasks of 20–40 s, an API-key account, a fixed seed.
fn pro_mock() -> MockConfig {
    MockConfig::preset(Preset::Pro)
        .task_duration(Duration::from_secs(20), Duration::from_secs(40))
        .api_key(KEY)
        .seed(42)
}

/// The Pro stack with its defaults (generated external ids, a 30 s attempt timeout), its retry
/// jitter seeded so that a run is the same every time.
fn pro_stack() -> KlingLayer {
    let kling = KlingLayer::builder(
        StackConfig::preset(Tier::Pro),
        Credentials::api_key(KEY).unwrap(),
    )
    .seed(7)
    .build()
    .unwrap();
    assert!(kling.config().attempt_timeout_duration() < SLOW_DELAY);
    kling
}

/// How one job's create came back (counted in [`Creates`]).
enum How {
    Answered,
    Recovered,
    Unresolved,
}

/// How the jobs' creates came back.
#[derive(Debug, Default)]
struct Creates {
    /// Answered with the task, by the create itself.
    answered: usize,
    /// Answered with the task a lookup by the generated external id found: the create's own
    /// answer was late or unreadable.
    recovered: usize,
    /// An error naming the generated external id of a create that may have made its task: the
    /// job followed the task by that id.
    unresolved: usize,
}

/// Runs the jobs at once through the stack over `client` (the mock under the classify step):
/// each creates a video, then follows its task to the end, by the task id the create reported or,
/// when the create failed with a task it may have made, by the external id its error names.
/// Asserts every job ended with a task of its own; returns how the creates came back.
async fn run_jobs<C>(kling: &KlingLayer, client: C) -> Creates
where
    C: Service<
            http::Request<Full<Bytes>>,
            Response = http::Response<Full<Bytes>>,
            Error = BoxError,
        > + Clone
        + Send
        + Sync
        + 'static,
    C::Future: Send,
{
    let service = kling.layer(client);
    let follower = kling
        .follower(service.clone(), kling.follow_policy())
        .unwrap();
    let jobs: Vec<_> = (0..JOBS)
        .map(|i| {
            let service = service.clone();
            let follower = follower.clone();
            tokio::spawn(async move {
                let body = format!(r#"{{"prompt":"job {i}"}}"#);
                let (task, how) = match service.oneshot(request("POST", CREATE, &body)).await {
                    Ok(created) => {
                        let task = Outcome::of(&created).unwrap().task().unwrap();
                        let how = match created.extensions().get::<Recovered>() {
                            Some(_) => How::Recovered,
                            None => How::Answered,
                        };
                        (TaskRef::from_report(CREATE, task), how)
                    }
                    Err(error) => {
                        let failed = error
                            .downcast_ref::<Failed>()
                            .unwrap_or_else(|| panic!("job {i}: not the retry layer's: {error}"));
                        assert!(failed.may_have_created(), "job {i}: {failed}");
                        let id = failed
                            .external_id()
                            .unwrap_or_else(|| panic!("job {i}: no external id: {failed}"));
                        assert!(id.starts_with("kr-"), "job {i}: {failed}");
                        (TaskRef::new_style_external(id), How::Unresolved)
                    }
                };
                let ended = follower
                    .follow(task)
                    .await
                    .unwrap_or_else(|e| panic!("job {i}'s task is followed to its end: {e}"));
                (ended, how)
            })
        })
        .collect();
    let mut creates = Creates::default();
    let mut tasks = HashSet::new();
    for job in jobs {
        let (ended, how) = job.await.unwrap();
        assert_eq!(ended.status, TaskStatus::Succeeded, "{ended:?}");
        assert!(
            tasks.insert(ended.id.clone()),
            "two jobs, one task: {ended:?}"
        );
        match how {
            How::Answered => creates.answered += 1,
            How::Recovered => creates.recovered += 1,
            How::Unresolved => creates.unresolved += 1,
        }
    }
    assert_eq!(tasks.len(), JOBS);
    creates
}

/// Every job made one task, none twice, and the stack holds nothing.
async fn assert_once_each(kling: &KlingLayer, stats: &Stats) {
    assert_eq!(
        stats.tasks_created, JOBS as u64,
        "one task per job: {stats:?}"
    );
    assert_eq!(
        stats.duplicate_external_ids, 0,
        "a create was repeated: {stats:?}"
    );
    let snapshot = kling.snapshot();
    assert_eq!(snapshot.pool(POOL).unwrap().in_use, 0, "{snapshot:?}");
    assert_eq!(snapshot.tasks.running, 0, "{snapshot:?}");
    for pool in kling.slots().snapshot().await.unwrap().pools() {
        assert_eq!(
            (pool.in_use, pool.waiters, pool.tasks),
            (0, 0, 0),
            "{pool:?}"
        );
    }
}

/// The negative control: the same jobs' creates through a naive client on a mock of `config`
/// (the API key, a 30 s timeout per attempt as the stack's, the classify step; no external
/// id), one job after the other, each create sent again a second after any error or refusal
/// until one is answered with its task. Returns the mock's counts.
async fn naive_creates(config: MockConfig) -> Stats {
    let mock = MockKling::new(config).unwrap();
    let naive = tower::ServiceBuilder::new()
        .layer(AuthLayer::new(Credentials::api_key(KEY).unwrap()))
        .timeout(Duration::from_secs(30))
        .layer(ClassifyLayer::new())
        .service(mock.clone());
    for i in 0..JOBS {
        let body = format!(r#"{{"prompt":"job {i}"}}"#);
        loop {
            let answer = naive.clone().oneshot(request("POST", CREATE, &body)).await;
            if answer.is_ok_and(|created| Outcome::of(&created).is_some_and(Outcome::is_success)) {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    mock.stats()
}

/// A fifth of the answers come a minute late, twice the attempt timeout: the stack gives up on
/// them, and a create it gave up on has made its task. The retry layer looks such a create up
/// by the external id it gave it before sending it again, so every job gets its one task.
#[tokio::test(start_paused = true)]
async fn creates_answered_after_the_attempt_timeout_make_each_task_once() {
    let config = pro_mock().slow(0.2, SLOW_DELAY);
    let mock = MockKling::new(config.clone()).unwrap();
    let cut = Arc::new(AtomicUsize::new(0));
    let kling = pro_stack();
    let creates = run_jobs(&kling, counting_cut_creates(mock.clone(), cut.clone())).await;
    // Some creates' answers were cut by the timeout, their tasks made; the stack found them.
    assert!(
        cut.load(Ordering::SeqCst) > 0,
        "no create timed out: {creates:?}"
    );
    assert!(
        creates.recovered + creates.unresolved > 0,
        "no create was found by its external id: {creates:?}"
    );
    assert_once_each(&kling, &mock.stats()).await;

    // Negative control: the same creates, same mock settings, through a client that sends a
    // create again when it times out.
    let naive = naive_creates(config).await;
    assert!(
        naive.tasks_created > JOBS as u64,
        "the naive client made no task twice: {naive:?}"
    );
}

/// A fifth of the answers arrive with their body cut in half: a create's 200 that says nothing
/// readable made its task. The stack does not send it again; it returns an error naming the
/// create's generated external id, and the job follows the task by that id to its end.
#[tokio::test(start_paused = true)]
async fn creates_answered_with_a_garbled_body_make_each_task_once() {
    let config = pro_mock().malformed_rate(0.2);
    let mock = MockKling::new(config.clone()).unwrap();
    let kling = pro_stack();
    let creates = run_jobs(&kling, ClassifyLayer::new().layer(mock.clone())).await;
    let stats = mock.stats();
    assert!(
        stats.malformed_responses > 0,
        "the fault happened: {stats:?}"
    );
    assert!(
        creates.unresolved > 0,
        "no create's 200 was garbled: {creates:?}"
    );
    assert_once_each(&kling, &stats).await;

    // Negative control: the same creates, same mock settings, through a client that sends a
    // create again when its answer cannot be read.
    let naive = naive_creates(config).await;
    assert!(naive.malformed_responses > 0, "{naive:?}");
    assert!(
        naive.tasks_created > JOBS as u64,
        "the naive client made no task twice: {naive:?}"
    );
}

/// The classify step over `mock`, counting the creates whose call was dropped before it
/// answered: with no caller giving up, those are the attempts the stack's timeout cut.
fn counting_cut_creates(
    mock: MockKling,
    cut: Arc<AtomicUsize>,
) -> impl Service<
    http::Request<Full<Bytes>>,
    Response = http::Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Send,
> + Clone
+ Send
+ Sync
+ 'static {
    /// Counts its drop unless disarmed.
    struct Armed(Option<Arc<AtomicUsize>>);
    impl Drop for Armed {
        fn drop(&mut self) {
            if let Some(cut) = self.0.take() {
                cut.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    let classify = ClassifyLayer::new().layer(mock);
    tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let create = req.method() == http::Method::POST;
        let call = classify.clone().oneshot(req);
        let cut = cut.clone();
        async move {
            let mut armed = Armed(create.then_some(cut));
            let answer = call.await;
            armed.0 = None;
            answer
        }
    })
}
