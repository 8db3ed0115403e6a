//! The composed stack in DESIGN.md's order (retry, task slots, GCRA, auth, per-attempt timeout,
//! classify) over any client, and the job driver the fault and cancellation tests share.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use kling_concurrency::{SlotsConfig, SlotsHandle, TaskSlotsLayer};
use kling_core::error::BoxError;
use kling_core::{ClassifyLayer, Outcome};
use kling_ratelimit::{Cooldown, GcraHandle, GcraLayer, Quota};
use kling_retry::{Backoff, RetryBudget, RetryLayer};
use kling_tower::auth::{AuthLayer, Credentials};
use kling_tower::clock::{SystemClock, WallClock};
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt};

/// The boxed stack: every test drives it the same way, whatever the client below.
pub(crate) type Svc = BoxCloneService<Request<Full<Bytes>>, Response<Full<Bytes>>, BoxError>;

/// The numbers of one stack, in API time; `speed` divides every duration and multiplies rates.
#[derive(Clone)]
pub(crate) struct Opts {
    pub(crate) speed: f64,
    pub(crate) slots: u32,
    pub(crate) per_minute: f64,
    /// Real time (already short): the per-attempt timeout.
    pub(crate) attempt_timeout: Duration,
    pub(crate) max_attempts: u32,
    /// API time.
    pub(crate) lease: Duration,
    /// API time: how often a slot hidden by a 1303 comes back.
    pub(crate) recovery_interval: Duration,
    pub(crate) max_body: usize,
    pub(crate) max_queue: Option<usize>,
    pub(crate) credentials: Credentials,
    pub(crate) clock: Option<JumpClock>,
}

impl Opts {
    pub(crate) fn new(speed: f64) -> Opts {
        Opts {
            speed,
            slots: 5,
            per_minute: 60.0,
            attempt_timeout: Duration::from_secs(2),
            max_attempts: 12,
            lease: Duration::from_secs(3600),
            recovery_interval: Duration::from_secs(20),
            max_body: 64 * 1024,
            max_queue: None,
            credentials: Credentials::api_key("reliability-test-key").expect("valid key"),
            clock: None,
        }
    }
}

/// What a test inspects after a run.
#[derive(Clone)]
pub(crate) struct Handles {
    pub(crate) slots: SlotsHandle,
    pub(crate) gcra: GcraHandle,
    pub(crate) auth: AuthLayer,
}

impl Handles {
    /// Asserts every limiter is idle: no slot in use or promised, no waiter, no task held, no
    /// request queued for the rate limiter.
    pub(crate) async fn assert_idle(&self) {
        let snapshot = self.slots.snapshot().await.expect("in-process snapshot");
        for pool in snapshot.pools() {
            assert_eq!(pool.in_use, 0, "slots leaked in {pool:?}");
            assert_eq!(pool.waiters, 0, "waiters left in {pool:?}");
            assert_eq!(pool.tasks, 0, "tasks left in {pool:?}");
        }
        assert_eq!(
            self.gcra.waiting(),
            0,
            "requests left in the rate limiter's queue"
        );
    }
}

/// Builds the stack over `client` (which must already return classified responses).
pub(crate) fn stack<C>(client: C, opts: &Opts) -> (Svc, Handles)
where
    C: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    C::Future: Send + 'static,
{
    let speed = opts.speed;
    let scaled = |d: Duration| Duration::from_secs_f64(d.as_secs_f64() / speed);
    let timed =
        BoxCloneService::new(tower::timeout::TimeoutLayer::new(opts.attempt_timeout).layer(client));
    let mut auth = AuthLayer::new(opts.credentials.clone());
    if let Some(clock) = &opts.clock {
        auth = auth.with_clock(clock.clone());
    }
    let mut gcra = GcraLayer::builder(
        Quota::per_minute(opts.per_minute)
            .with_headroom(0.05)
            .scaled(speed),
    )
    .cooldown(Cooldown::new().scaled(speed));
    if let Some(max) = opts.max_queue {
        gcra = gcra.max_queue(max);
    }
    let gcra = gcra.build().expect("valid quota");
    let (slots, slots_handle) = TaskSlotsLayer::pair(
        SlotsConfig::new(opts.slots)
            .lease(scaled(opts.lease))
            .recovery_interval(scaled(opts.recovery_interval)),
    )
    .expect("valid slots");
    let retry = RetryLayer::builder()
        .max_attempts(opts.max_attempts)
        .deadline(scaled(Duration::from_secs(3600)))
        .backoff(Backoff::new().sped_up(speed))
        .budget(RetryBudget::unlimited())
        .seed(11)
        .build()
        .expect("valid retry");
    let handles = Handles {
        slots: slots_handle,
        gcra: gcra.handle(),
        auth: auth.clone(),
    };
    let service = retry.layer(slots.layer(gcra.layer(auth.layer(timed))));
    (BoxCloneService::new(service), handles)
}

/// The classify step over hyper-util's legacy client, boxed for [`stack`].
pub(crate) fn tcp_client(max_body: usize) -> Svc {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build_http::<Full<Bytes>>();
    BoxCloneService::new(ClassifyLayer::new().max_body_bytes(max_body).layer(client))
}

/// The classify step over the in-process mock, boxed for [`stack`].
pub(crate) fn mock_client(mock: kling_mock::MockKling, max_body: usize) -> Svc {
    BoxCloneService::new(ClassifyLayer::new().max_body_bytes(max_body).layer(mock))
}

/// A request with a JSON body.
pub(crate) fn request(method: Method, url: &str, body: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("valid request")
}

/// Sends one request through the stack and returns its outcome.
pub(crate) fn send(
    svc: &Svc,
    request: Request<Full<Bytes>>,
) -> impl Future<Output = Result<Outcome, BoxError>> + Send + use<> {
    let call = svc.clone().oneshot(request);
    async move {
        let mut response = call.await?;
        Ok(Outcome::ensure(&mut response)?)
    }
}

/// One job as a batch runner drives it: create (with its external id) until the task exists
/// exactly once, looking it up by external id after any error and sending the create again
/// only once a lookup says there is no such task (1203): a lookup that failed otherwise (its
/// answer lost or garbled) proves nothing, and is asked again. Then poll until the task ends.
/// Returns the task id and the errors the caller saw on the way.
pub(crate) async fn run_job(
    svc: Svc,
    base: &str,
    job: usize,
    poll_every: Duration,
) -> (String, Vec<String>) {
    let path = "/v1/videos/text2video";
    let external = format!("job-{job}");
    let body = format!(r#"{{"prompt":"job {job}","external_task_id":"{external}"}}"#);
    let mut seen = Vec::new();
    let mut task_id = None;
    let mut create = true;
    for _ in 0..40 {
        if create {
            match send(&svc, request(Method::POST, &format!("{base}{path}"), &body)).await {
                Ok(outcome) if outcome.is_success() => {
                    task_id = outcome.task().map(|t| t.id.clone());
                    break;
                }
                Ok(outcome) => seen.push(outcome.to_result().unwrap_err().to_string()),
                Err(e) => seen.push(e.to_string()),
            }
        }
        // The create may have happened: look it up by its external id before sending it again.
        let lookup = send(
            &svc,
            request(Method::GET, &format!("{base}{path}/{external}"), ""),
        )
        .await;
        match &lookup {
            Ok(outcome) if outcome.is_success() => {
                if let Some(task) = outcome.task() {
                    task_id = Some(task.id.clone());
                    break;
                }
                create = false;
            }
            Ok(outcome) => create = outcome.code() == kling_core::Code::NotFound,
            Err(e) => {
                create = e
                    .downcast_ref::<kling_retry::error::Failed>()
                    .and_then(|failed| failed.code())
                    == Some(kling_core::Code::NotFound)
            }
        }
        tokio::time::sleep(poll_every).await;
    }
    let task_id = task_id.unwrap_or_else(|| panic!("job {job} never got a task: {seen:?}"));
    for _ in 0..2000 {
        if let Ok(outcome) = send(
            &svc,
            request(Method::GET, &format!("{base}{path}/{task_id}"), ""),
        )
        .await
            && outcome.task().is_some_and(|t| t.status.is_terminal())
        {
            return (task_id, seen);
        }
        tokio::time::sleep(poll_every).await;
    }
    panic!("job {job} (task {task_id}) never ended");
}

/// A wall clock that can jump: the system clock plus an offset the test moves.
#[derive(Clone, Debug, Default)]
pub(crate) struct JumpClock {
    offset_secs: Arc<AtomicI64>,
}

impl JumpClock {
    pub(crate) fn jump(&self, secs: i64) {
        self.offset_secs.fetch_add(secs, Ordering::SeqCst);
    }
}

impl WallClock for JumpClock {
    fn unix_now(&self) -> Duration {
        let now = SystemClock.unix_now();
        let offset = self.offset_secs.load(Ordering::SeqCst);
        if offset >= 0 {
            now + Duration::from_secs(offset.unsigned_abs())
        } else {
            now.saturating_sub(Duration::from_secs(offset.unsigned_abs()))
        }
    }
}
