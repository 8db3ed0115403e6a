//! Whole runs against kling-mock over real TCP, in real time sped up 100×, with faults and
//! credits switched on; each with a negative control through a bare or naive client.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kling_core::error::BoxError;
use kling_core::{ClassifyLayer, Code, Outcome};
use kling_mock::{MockConfig, MockServer, Preset};
use kling_retry::error::{DeadlineExceeded, Failed};
use kling_retry::{Backoff, RetryBudget, RetryLayer};
use tower::timeout::TimeoutLayer;
use tower::{Layer, Service, ServiceExt};

/// The shared speed factor: the mock runs 100× faster than Kling, and so do the client's delays.
const SPEED: f64 = 100.0;

type Req = Request<Full<Bytes>>;
type Res = http::Response<Full<Bytes>>;

fn create(base: &str, job: usize) -> Req {
    Request::post(format!("{base}/v1/videos/text2video"))
        .header("authorization", "Bearer retry-test-key")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!(
            r#"{{"model_name":"kling-v2","prompt":"job {job}"}}"#
        ))))
        .unwrap()
}

/// hyper-util's client under the classify step and a per-attempt timeout: what the retry layer
/// wraps in the recommended stack.
fn bare_client()
-> impl Service<Req, Response = Res, Error = BoxError, Future: Send> + Clone + Send + 'static {
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    TimeoutLayer::new(Duration::from_secs(2)).layer(ClassifyLayer::new().layer(http))
}

fn retry_layer(budget: RetryBudget) -> RetryLayer {
    RetryLayer::builder()
        .seed(11)
        .max_attempts(40)
        .deadline(Duration::from_secs_f64(600.0 / SPEED))
        .backoff(Backoff::new().sped_up(SPEED))
        .budget(budget)
        .generate_external_ids(true)
        .build()
        .unwrap()
}

/// A final error must be one of this layer's, read as one line, and carry what happened.
fn assert_clear(error: &BoxError) {
    let text = error.to_string();
    assert!(!text.contains('\n'), "{text}");
    assert!(
        error.is::<Failed>() || error.is::<DeadlineExceeded>(),
        "not a final retry error: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_through_faults_and_1303s_all_end_clearly_without_duplicates() {
    let config = || {
        MockConfig::preset(Preset::Standard)
            .speed(SPEED)
            .no_rate_limit()
            .task_duration(Duration::from_secs(10), Duration::from_secs(20))
            .fault_rate(0.15)
            .ghost_create_rate(0.2)
            .seed(7)
    };
    const JOBS: usize = 16;

    let server = MockServer::start(config()).await.unwrap();
    // Without a slots layer below, every 1303 is a retry: a budget for that (the default one
    // would stop them, which is what `limits::the_budget_stops_a_retry_storm` shows).
    let budget = RetryBudget::new(Duration::from_secs_f64(10.0 / SPEED), 1_000, 5.0).unwrap();
    let client = retry_layer(budget).layer(bare_client());
    let base = server.base_url();
    let jobs: Vec<_> = (0..JOBS)
        .map(|job| {
            let client = client.clone();
            let request = create(&base, job);
            tokio::spawn(async move { client.oneshot(request).await })
        })
        .collect();
    let (mut tasks, mut failures) = (Vec::new(), Vec::new());
    for job in jobs {
        match job.await.unwrap() {
            Ok(response) => {
                let outcome = Outcome::of(&response).unwrap();
                tasks.push(outcome.task().unwrap().id.clone());
            }
            Err(error) => {
                assert_clear(&error);
                failures.push(error.to_string());
            }
        }
    }
    let stats = server.stats();
    assert!(failures.is_empty(), "{failures:#?} {stats:?}");
    assert_eq!(stats.duplicate_external_ids, 0, "{stats:?}");
    tasks.sort();
    tasks.dedup();
    assert_eq!(tasks.len(), JOBS, "every job got its own task: {stats:?}");
    assert_eq!(
        stats.tasks_created, JOBS as u64,
        "no orphan or duplicate task: {stats:?}"
    );
    assert!(stats.responses("1303") > 0, "the slots ran out: {stats:?}");
    assert!(
        stats.responses("5000") + stats.responses("5001") + stats.responses("5002") > 0,
        "faults were injected: {stats:?}"
    );
    assert!(stats.max_concurrent.values().all(|&n| n <= 3), "{stats:?}");

    // Negative control: the same jobs through the bare client on the same mock settings are
    // refused (1303s and 5xx come back to the caller).
    let server = MockServer::start(config()).await.unwrap();
    let bare = bare_client();
    let base = server.base_url();
    let jobs: Vec<_> = (0..JOBS)
        .map(|job| {
            let client = bare.clone();
            let request = create(&base, job);
            tokio::spawn(async move { client.oneshot(request).await })
        })
        .collect();
    let mut refused = 0;
    for job in jobs {
        match job.await.unwrap() {
            Ok(response) if Outcome::of(&response).unwrap().is_success() => {}
            _ => refused += 1,
        }
    }
    assert!(
        refused >= 5,
        "only {refused} of {JOBS} refused without the retry layer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_credits_run_out_the_1102_is_final_and_no_create_follows_it() {
    let config = || {
        MockConfig::preset(Preset::Pro)
            .speed(SPEED)
            .no_rate_limit()
            .slots(20)
            .credits(6.0)
            .task_duration(Duration::from_secs(10), Duration::from_secs(20))
            .fault_rate(0.15)
            .ghost_create_rate(0.2)
            .seed(3)
    };
    const JOBS: usize = 12;

    // A job runner that stops creating once Kling says the account can create no more.
    let server = MockServer::start(config()).await.unwrap();
    // The default budget, sped up: a floor of 1 retry per second becomes 100.
    let budget = RetryBudget::new(Duration::from_secs_f64(10.0 / SPEED), 100, 0.2).unwrap();
    let client = retry_layer(budget).layer(bare_client());
    let (mut succeeded, mut halted_at) = (0, None);
    for job in 0..JOBS {
        match client
            .clone()
            .oneshot(create(&server.base_url(), job))
            .await
        {
            Ok(_) => succeeded += 1,
            Err(error) => {
                assert_clear(&error);
                let code = error.downcast_ref::<Failed>().and_then(Failed::code);
                if code.is_some_and(Code::halts_creates) {
                    assert_eq!(code, Some(Code::ResourcePackExhausted), "{error}");
                    halted_at = Some(job);
                    break;
                }
            }
        }
    }
    let stats = server.stats();
    assert!(halted_at.is_some(), "the credits ran out: {stats:?}");
    assert_eq!(succeeded, 6, "six credits, six tasks: {stats:?}");
    assert_eq!(
        stats.responses("1102"),
        1,
        "the 1102 was never retried: {stats:?}"
    );
    assert_eq!(stats.creates_after_1102, 0, "{stats:?}");
    assert_eq!(stats.duplicate_external_ids, 0, "{stats:?}");
    assert_eq!(stats.tasks_created, 6, "{stats:?}");

    // Negative control: a naive retry (every failure, five times, external ids and all) on the
    // same settings re-sends the 1102, so creates reach the mock after it.
    let server = MockServer::start(config()).await.unwrap();
    let naive = tower::retry::RetryLayer::new(Naive(4)).layer(bare_client());
    for job in 0..JOBS {
        let mut request = create(&server.base_url(), job);
        *request.body_mut() = Full::new(Bytes::from(format!(
            r#"{{"model_name":"kling-v2","prompt":"job {job}","external_task_id":"naive-{job}"}}"#
        )));
        if naive
            .clone()
            .oneshot(request)
            .await
            .is_ok_and(|r| Outcome::of(&r).is_some_and(|o| o.code().halts_creates()))
        {
            break;
        }
    }
    let stats = server.stats();
    assert!(
        stats.responses("1102") > 1,
        "the naive client re-sent the 1102: {stats:?}"
    );
    assert!(stats.creates_after_1102 > 0, "{stats:?}");
}

#[tokio::test]
async fn a_create_to_a_closed_port_is_retried_as_never_sent() {
    // A port nobody listens on: every connect is refused, so the create surely never happened
    // and the layer may send it again (no external id needed).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let client = RetryLayer::builder()
        .seed(1)
        .max_attempts(3)
        .backoff(Backoff::new().sped_up(SPEED))
        .build()
        .unwrap()
        .layer(bare_client());
    let error = client.oneshot(create(&base, 0)).await.unwrap_err();
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(
        failed.reason(),
        kling_retry::error::StopReason::AttemptsExhausted,
        "{error}"
    );
    assert_eq!(failed.attempts(), 3);
    assert_eq!(
        kling_core::SendState::of(failed),
        kling_core::SendState::NotSent,
        "{error}"
    );
}

/// A request hyper-util refuses, unsent, for a reason every attempt meets again (an HTTP/2
/// request on its HTTP/1 connection, a relative URI, a `CONNECT` as HTTP/1.0): it fails at once with the client's
/// error, one request, no retry withdrawn from the budget, and reads as never sent, so a
/// create made nothing. The same create as HTTP/1.1 with its full URI is sent (the control).
#[tokio::test]
async fn a_request_the_client_refuses_for_good_fails_at_once_as_never_sent() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    let server = MockServer::start(MockConfig::preset(Preset::Pro).no_rate_limit())
        .await
        .unwrap();
    let base = server.base_url();
    let budget = RetryBudget::new(Duration::from_secs(10), 10, 0.0).unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let client = retry_layer(budget.clone()).layer(
        tower::ServiceBuilder::new()
            .map_request(move |request: Req| {
                counted.fetch_add(1, Ordering::SeqCst);
                request
            })
            .service(bare_client()),
    );
    let mut http2 = create(&base, 0);
    *http2.version_mut() = http::Version::HTTP_2;
    let mut relative = create(&base, 1);
    *relative.uri_mut() = "/v1/videos/text2video".parse().unwrap();
    let mut connect = create(&base, 2);
    *connect.method_mut() = http::Method::CONNECT;
    *connect.version_mut() = http::Version::HTTP_10;
    let cases = [
        ("http/2", http2),
        ("relative uri", relative),
        ("connect as http/1.0", connect),
    ];
    for (what, request) in cases {
        calls.store(0, Ordering::SeqCst);
        let before = budget.remaining();
        let error = client.clone().oneshot(request).await.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "{what}: {error:?}");
        assert_eq!(budget.remaining(), before, "{what}: no retry withdrawn");
        assert!(kling_core::error::will_recur(&*error), "{what}: {error:?}");
        assert_eq!(
            kling_core::SendState::of(&*error),
            kling_core::SendState::NotSent,
            "{what}: {error:?}"
        );
        assert!(
            !kling_core::error::may_have_created(&*error),
            "{what}: {error:?}"
        );
    }
    assert_eq!(server.stats().requests_total, 0, "the mock saw no request");

    calls.store(0, Ordering::SeqCst);
    let response = client.oneshot(create(&base, 3)).await.unwrap();
    assert!(Outcome::of(&response).unwrap().is_success());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(server.stats().tasks_created, 1);
}

/// Retries every non-success a fixed number of times after a flat 1 s (API time): what the
/// issue warns against.
#[derive(Clone)]
struct Naive(u32);

impl tower::retry::Policy<Req, Res, BoxError> for Naive {
    type Future = tokio::time::Sleep;

    fn retry(&mut self, _: &mut Req, result: &mut Result<Res, BoxError>) -> Option<Self::Future> {
        let failed = match result {
            Ok(response) => !Outcome::of(response).is_some_and(Outcome::is_success),
            Err(_) => true,
        };
        if failed && self.0 > 0 {
            self.0 -= 1;
            Some(tokio::time::sleep(Duration::from_secs_f64(1.0 / SPEED)))
        } else {
            None
        }
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        let mut copy = Request::new(req.body().clone());
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.headers_mut() = req.headers().clone();
        Some(copy)
    }
}
