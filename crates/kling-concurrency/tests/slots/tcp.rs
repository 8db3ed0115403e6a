//! Against `kling-mock` over real TCP, in real time sped up 200×.

use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kling_concurrency::{DEFAULT_LEASE, SlotsConfig, TaskSlotsLayer};
use kling_core::error::BoxError;
use kling_core::{ClassifyLayer, Code, Outcome};
use kling_mock::{MockConfig, MockServer, Preset};
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt};

/// The speed factor applied to the mock and to the layer's durations.
const SPEED: f64 = 200.0;
const CREATES: usize = 50;

type Stack = BoxCloneService<Request<Full<Bytes>>, Response<Full<Bytes>>, BoxError>;

fn mock_config() -> MockConfig {
    // Pro: 5 video slots. Tasks of 30–60 s of API time; no request-rate limit, so that
    // only concurrency is judged.
    MockConfig::preset(Preset::Pro)
        .speed(SPEED)
        .no_rate_limit()
        .task_duration(Duration::from_secs(30), Duration::from_secs(60))
}

fn bare_client() -> Stack {
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    BoxCloneService::new(ClassifyLayer::new().layer(http))
}

fn request(method: http::Method, url: String, body: &'static str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(url)
        .header(AUTHORIZATION, "Bearer test-key")
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

async fn send(stack: &mut Stack, req: Request<Full<Bytes>>) -> Response<Full<Bytes>> {
    stack.ready().await.unwrap().call(req).await.unwrap()
}

/// One job: create, then poll every 20 ms until the task ends. Returns the create's code.
async fn job(mut stack: Stack, base: String) -> Code {
    let url = format!("{base}/v1/videos/text2video");
    let created = send(
        &mut stack,
        request(http::Method::POST, url.clone(), r#"{"prompt":"a cat"}"#),
    )
    .await;
    let outcome = Outcome::of(&created).unwrap().clone();
    let Some(task) = outcome.task().filter(|_| outcome.is_success()) else {
        return outcome.code();
    };
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let polled = send(
            &mut stack,
            request(http::Method::GET, format!("{url}/{}", task.id), ""),
        )
        .await;
        let status = Outcome::of(&polled)
            .unwrap()
            .task()
            .map(|t| t.status.is_terminal());
        if status == Some(true) {
            return outcome.code();
        }
    }
}

async fn run(stack: Stack, base: &str) -> Vec<Code> {
    let jobs: Vec<_> = (0..CREATES)
        .map(|_| tokio::spawn(job(stack.clone(), base.to_owned())))
        .collect();
    let mut codes = Vec::new();
    for job in jobs {
        codes.push(job.await.unwrap());
    }
    codes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_creates_through_the_layer_meet_no_1303_while_a_bare_client_does() {
    // Through the layer: every create waits for a slot the mock really has.
    let server = MockServer::start(mock_config()).await.unwrap();
    let base = server.base_url();
    let layer =
        TaskSlotsLayer::new(SlotsConfig::new(5).lease(DEFAULT_LEASE.div_f64(SPEED))).unwrap();
    let stack = BoxCloneService::new(layer.layer(bare_client()));
    let codes = tokio::time::timeout(Duration::from_secs(30), run(stack, &base))
        .await
        .expect("the run finishes");
    let stats = server.stats();
    assert!(codes.iter().all(|c| *c == Code::Success), "{codes:?}");
    assert_eq!(stats.tasks_created, CREATES as u64);
    assert_eq!(stats.responses("1303"), 0, "{stats:?}");
    assert!(stats.max_concurrent["video"] <= 5, "{stats:?}");
    assert_eq!(
        stats.max_concurrent["video"], 5,
        "the slots were used to the full"
    );
    server.shutdown().await;

    // Negative control: the same creates through the bare client on the same mock settings.
    let server = MockServer::start(mock_config()).await.unwrap();
    let base = server.base_url();
    let codes = run(bare_client(), &base).await;
    let stats = server.stats();
    assert!(
        stats.responses("1303") >= 40,
        "the bare client meets the wall: {stats:?}"
    );
    assert_eq!(
        codes
            .iter()
            .filter(|c| **c == Code::ParallelTaskLimit)
            .count() as u64,
        stats.responses("1303")
    );
    server.shutdown().await;
}
