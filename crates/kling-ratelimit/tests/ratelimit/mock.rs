//! Against `kling-mock` over real TCP, in real time at a speed factor, with the mock's
//! request-rate limit and its penalty on.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kling_core::{BoxError, ClassifyLayer, Code, Outcome};
use kling_mock::{MockConfig, MockServer, Preset};
use kling_ratelimit::{Cooldown, GcraLayer, Quota};
use tower::{Layer, Service, ServiceExt};

/// API time runs this many times faster on both sides. At 5× the layer's spacing (222 ms)
/// leaves 22 ms over the mock's (200 ms) for the loopback's and scheduler's jitter: at 40× it
/// left 2.8 ms, which a loaded machine's scheduling alone could eat, at 20× 5.6 ms, which
/// three busy loops beside the test on two cores did once (two 1302s, the second from the
/// mock's penalty for the first), and at 10× 11 ms, which a CI run beside two other builds
/// did once (2026-12-03).
const SPEED: f64 = 5.0;
const CREATES: usize = 100;

async fn mock() -> MockServer {
    let config = MockConfig::preset(Preset::Pro)
        .speed(SPEED)
        .penalty(true)
        .slots(100_000);
    MockServer::start(config).await.unwrap()
}

fn create(base: &str) -> http::Request<Full<Bytes>> {
    http::Request::post(format!("{base}/v1/videos/text2video"))
        .header("authorization", "Bearer key")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"prompt":"a cat"}"#)))
        .unwrap()
}

/// Sends the whole burst at once; returns how many came back 1302, and how many succeeded.
async fn burst<S>(service: S, base: &str) -> (usize, usize)
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
    let calls: Vec<_> = (0..CREATES)
        .map(|_| tokio::spawn(service.clone().oneshot(create(base))))
        .collect();
    let (mut throttled, mut ok) = (0, 0);
    for call in calls {
        let response = call.await.unwrap().unwrap();
        match Outcome::of(&response).unwrap().code() {
            Code::RateLimited => throttled += 1,
            Code::Success => ok += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    (throttled, ok)
}

fn client() -> impl Service<
    http::Request<Full<Bytes>>,
    Response = http::Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build_http::<Full<Bytes>>();
    ClassifyLayer::new().layer(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_creates_through_the_layer_meets_at_most_one_1302() {
    let server = mock().await;
    let base = server.base_url();
    // The Pro tier's 60 a minute with 10% headroom, at the mock's speed.
    let layer = GcraLayer::builder(Quota::per_minute(60.0).with_headroom(0.10).scaled(SPEED))
        .cooldown(Cooldown::new().scaled(SPEED))
        .build()
        .unwrap();
    let (throttled, ok) = burst(layer.layer(client()), &base).await;
    assert!(throttled <= 1, "{throttled} creates met 1302");
    assert_eq!(ok + throttled, CREATES);
    assert_eq!(server.stats().tasks_created, ok as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_burst_through_a_bare_client_meets_many_1302s() {
    let server = mock().await;
    let base = server.base_url();
    let (throttled, ok) = burst(client(), &base).await;
    assert!(
        throttled >= CREATES / 2,
        "only {throttled} creates met 1302 ({ok} succeeded)"
    );
}
