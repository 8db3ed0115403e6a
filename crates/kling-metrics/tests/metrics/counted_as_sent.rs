//! Over a classify step, the rate window counts each request when it was sent, as Kling counts
//! it: every attempt of a retried call at its own instant, the requests of a call dropped in
//! flight, and a resend made below the metrics layer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use kling_core::error::{BoxError, Transport};
use kling_core::signals::{Attempt, SendCounter};
use kling_core::{ClassifyLayer, Outcome};
use kling_metrics::{MetricsLayer, Monitor};
use tokio::time::{sleep, timeout};
use tower::{Layer, Service, ServiceExt};

use crate::support;

/// A request as kling-tower's `KlingLayer` passes it to the metrics layer: recognised, with
/// its account, in the request's signals.
fn request(method: &str, uri: &str, body: &str, bearer: &str) -> http::Request<Full<Bytes>> {
    let mut request = support::request(method, uri, body, bearer);
    kling_core::Recognized::of_with_account(&mut request, &kling_core::AccountId::new("acct"));
    request
}

const OK: &str = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":null}"#;
const BUSY: &str = r#"{"code":5000,"message":"server error","request_id":"r"}"#;
const EXPIRED: &str = r#"{"code":1004,"message":"token expired","request_id":"r"}"#;

type Reply = Result<http::Response<Full<Bytes>>, BoxError>;

/// Kling: the `n`th request (from 0) is answered after `script(n)`'s delay with its body, or
/// never (`None`).
fn kling(
    script: fn(u32) -> Option<(u64, &'static str)>,
) -> impl Service<
    http::Request<Full<Bytes>>,
    Response = http::Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Future<Output = Reply> + Send,
> + Clone
+ Send {
    let calls = Arc::new(AtomicU32::new(0));
    tower::service_fn(move |_req: http::Request<Full<Bytes>>| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            let Some((delay, body)) = script(n) else {
                std::future::pending::<()>().await;
                unreachable!()
            };
            sleep(Duration::from_secs(delay)).await;
            let status = if body == OK { 200 } else { 500 };
            Ok(http::Response::builder()
                .status(status)
                .body(Full::new(Bytes::from_static(body.as_bytes())))?)
        }
    })
}

/// A copy of `req` for another attempt, extensions (the request's signals) included, as the
/// retry layer makes it.
fn copy(req: &http::Request<Full<Bytes>>) -> http::Request<Full<Bytes>> {
    let mut copy = http::Request::new(req.body().clone());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    copy
}

/// What a retry layer does over the classify step: sends each attempt through `below`,
/// `pause` after an answer with code 5000, up to `attempts`; the answer carries `Attempt(n)`.
fn retrying<S>(
    below: S,
    attempts: u32,
    pause: u64,
) -> impl Service<
    http::Request<Full<Bytes>>,
    Response = http::Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Future<Output = Reply> + Send,
> + Clone
where
    S: Service<
            http::Request<Full<Bytes>>,
            Response = http::Response<Full<Bytes>>,
            Error = BoxError,
            Future: Send,
        > + Clone
        + Send
        + 'static,
{
    tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let below = below.clone();
        async move {
            for n in 1..=attempts {
                let mut response = below.clone().oneshot(copy(&req)).await?;
                let busy = Outcome::of(&response).is_some_and(|o| o.code().as_i64() == 5000);
                if !busy || n == attempts {
                    response.extensions_mut().insert(Attempt(n));
                    return Ok(response);
                }
                sleep(Duration::from_secs(pause)).await;
            }
            unreachable!("at least one attempt")
        }
    })
}

fn monitor() -> Monitor {
    Monitor::builder()
        .rate_quota(60, Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A call answered on its third attempt after 40 s of retries: each of its three requests is in
/// the window from the instant it was sent, and leaves it a window later, not all three at
/// the call's end.
#[tokio::test(start_paused = true)]
async fn a_retried_calls_attempts_each_count_when_they_were_sent() {
    let monitor = monitor();
    // Answered in a second: 5000, 5000, then success; sent at 0 s, 20 s and 40 s.
    let busy_twice = kling(|n| Some((1, if n < 2 { BUSY } else { OK })));
    let stack = MetricsLayer::with_monitor(monitor.clone()).layer(retrying(
        ClassifyLayer::new().layer(busy_twice),
        3,
        19,
    ));
    let requests = || monitor.snapshot().rate.requests;
    let call = tokio::spawn(stack.oneshot(request("GET", "/v1/videos/text2video/t-1", "", "k")));

    sleep(Duration::from_secs(10)).await;
    assert_eq!(requests(), 1, "the first attempt, at 0 s");
    sleep(Duration::from_secs(20)).await;
    assert_eq!(requests(), 2, "the second, at 20 s");
    sleep(Duration::from_secs(15)).await;
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.extensions().get::<Attempt>(), Some(&Attempt(3)));
    assert_eq!(requests(), 3, "each once");
    // At 61 s the first request left the window; the others are still in it.
    sleep(Duration::from_secs(16)).await;
    assert_eq!(
        requests(),
        2,
        "the first, sent at 0 s, is out of the window"
    );
    sleep(Duration::from_secs(20)).await;
    assert_eq!(requests(), 1, "the second, sent at 20 s, too");
}

/// A call dropped in flight (a caller's timeout above the stack) counts the requests it sent,
/// a query as well as a create: its answered attempt and the one in flight, each when it was
/// sent. A request the client surely never sent (connection refused) counts nothing; one reset
/// after it left counts.
#[tokio::test(start_paused = true)]
async fn a_dropped_call_counts_the_requests_it_sent() {
    let monitor = monitor();
    let requests = || monitor.snapshot().rate.requests;
    // A 5000 after a second, then no answer: sent at 0 s and 10 s, dropped at 15 s.
    let busy_then_silent = kling(|n| (n == 0).then_some((1, BUSY)));
    let stack = MetricsLayer::with_monitor(monitor.clone()).layer(retrying(
        ClassifyLayer::new().layer(busy_then_silent),
        3,
        9,
    ));
    let query = || request("GET", "/v1/videos/text2video/t-1", "", "k");
    let dropped = timeout(Duration::from_secs(15), stack.oneshot(query())).await;
    assert!(dropped.is_err(), "timed out");
    assert_eq!(requests(), 2, "both attempts");
    sleep(Duration::from_secs(46)).await;
    assert_eq!(
        requests(),
        1,
        "the first, sent at 0 s, is out of the window at 61 s"
    );
    sleep(Duration::from_secs(10)).await;
    assert_eq!(requests(), 0);

    // A single query dropped in flight.
    let stack = MetricsLayer::with_monitor(monitor.clone())
        .layer(ClassifyLayer::new().layer(kling(|_| None)));
    let dropped = timeout(Duration::from_secs(5), stack.oneshot(query())).await;
    assert!(dropped.is_err(), "timed out");
    assert_eq!(requests(), 1, "in flight when dropped");

    // Refused before it left, and reset after it did.
    for (kind, counted) in [
        (std::io::ErrorKind::ConnectionRefused, 1),
        (std::io::ErrorKind::ConnectionReset, 2),
    ] {
        let failing = tower::service_fn(move |_req: http::Request<Full<Bytes>>| async move {
            Err::<http::Response<Full<Bytes>>, _>(BoxError::from(Transport::new(
                std::io::Error::from(kind),
            )))
        });
        let stack =
            MetricsLayer::with_monitor(monitor.clone()).layer(ClassifyLayer::new().layer(failing));
        stack.oneshot(query()).await.unwrap_err();
        assert_eq!(requests(), counted, "{kind:?}");
    }
}

/// What an auth layer's own resend does below the metrics layer: on a 1004 it sends a copy of
/// the request that carries none of its extensions but the request's `SendCounter`. Kling
/// counts both requests, and so does the window, each when it was sent.
#[tokio::test(start_paused = true)]
async fn a_resend_below_the_metrics_layer_counts() {
    let monitor = monitor();
    // A 1004 after a second, then success.
    let classify =
        ClassifyLayer::new().layer(kling(|n| Some((1, if n == 0 { EXPIRED } else { OK }))));
    let resending = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let classify = classify.clone();
        async move {
            let mut again = http::Request::new(req.body().clone());
            *again.method_mut() = req.method().clone();
            *again.uri_mut() = req.uri().clone();
            if let Some(counter) = SendCounter::of(&req) {
                SendCounter::set(&mut again, counter);
            }
            let response = classify.clone().oneshot(req).await?;
            if Outcome::of(&response).is_some_and(|o| o.code().as_i64() == 1004) {
                sleep(Duration::from_secs(30)).await;
                return classify.oneshot(again).await;
            }
            Ok(response)
        }
    });
    let stack = MetricsLayer::with_monitor(monitor.clone()).layer(resending);
    let response = stack
        .oneshot(request("GET", "/v1/videos/text2video/t-1", "", "k"))
        .await
        .unwrap();
    assert!(Outcome::of(&response).unwrap().is_success());
    assert_eq!(
        monitor.snapshot().rate.requests,
        2,
        "the request and its resend"
    );
    sleep(Duration::from_secs(30)).await;
    assert_eq!(
        monitor.snapshot().rate.requests,
        1,
        "the first, sent at 0 s, left at 61 s"
    );
}

/// A request that carries no signals extension gets no counter (putting the extension in would
/// cost it allocations): the layer counts it when it ends, once, also after a request that
/// carried one taught its lane that a classify step below counts. A create always carries the
/// signals (its send watch): the classify step counts it.
#[tokio::test(start_paused = true)]
async fn a_request_without_signals_counts_once_when_it_ends() {
    let monitor = monitor();
    let requests = || monitor.snapshot().rate.requests;
    let stack = MetricsLayer::with_monitor(monitor.clone())
        .layer(ClassifyLayer::new().layer(kling(|_| Some((1, OK)))));
    let query = || request("GET", "/v1/videos/text2video/t-1", "", "k");
    stack.clone().oneshot(query()).await.unwrap();
    assert_eq!(requests(), 1, "counted by the classify step");
    let bare = support::request("GET", "/v1/videos/text2video/t-1", "", "k");
    assert!(bare.extensions().is_empty());
    stack.clone().oneshot(bare).await.unwrap();
    assert_eq!(requests(), 2, "counted by the metrics layer");
    let create = support::request("POST", "/v1/videos/text2video", r#"{"prompt":"x"}"#, "k");
    let dropped = timeout(Duration::from_millis(500), stack.oneshot(create)).await;
    assert!(dropped.is_err(), "timed out");
    assert_eq!(requests(), 3, "counted by the classify step, in flight");
}

/// A stack below that sends some requests through a classify step and others past it (a
/// router that sends `/account/costs` to a plain client): once a call taught the lane that a
/// classify step counts, an answer that came up past the step (it carries no outcome attached
/// below) is still counted by the layer, as Kling counts it; one through the step once.
#[tokio::test(start_paused = true)]
async fn an_answer_sent_past_the_classify_step_counts_after_the_lane_learned() {
    let monitor = monitor();
    let requests = || monitor.snapshot().rate.requests;
    let classify = ClassifyLayer::new().layer(kling(|_| Some((1, OK))));
    let plain = kling(|_| Some((1, OK)));
    let routing = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let classify = classify.clone();
        let plain = plain.clone();
        async move {
            if req.uri().path().starts_with("/account/") {
                plain.oneshot(req).await
            } else {
                classify.oneshot(req).await
            }
        }
    });
    let stack = MetricsLayer::with_monitor(monitor.clone()).layer(routing);
    let query = request("GET", "/v1/videos/text2video/t-1", "", "k");
    stack.clone().oneshot(query).await.unwrap();
    assert_eq!(requests(), 1, "counted by the classify step");
    let costs = request("GET", "/account/costs", "", "k");
    assert!(SendCounter::of(&costs).is_none() && !costs.extensions().is_empty());
    let response = stack.clone().oneshot(costs).await.unwrap();
    assert!(Outcome::of(&response).is_some(), "parsed by the layer");
    assert_eq!(
        requests(),
        2,
        "sent past the classify step, counted by the layer"
    );
    let query = request("GET", "/v1/videos/text2video/t-2", "", "k");
    stack.oneshot(query).await.unwrap();
    assert_eq!(requests(), 3, "through the step, once");
}

/// The same router under a layer that parses the answers it passes up with `Outcome::ensure`,
/// as kling-concurrency's task slots do for creates, queries and lists: an answer that came up
/// past the classify step carries an outcome all the same, attached by that layer, not by a
/// step that counted its request. The layer still counts it, once; one through the step is
/// counted by the step alone.
#[tokio::test(start_paused = true)]
async fn an_answer_past_the_classify_step_counts_when_a_layer_between_parsed_it() {
    let monitor = monitor();
    let requests = || monitor.snapshot().rate.requests;
    let classify = ClassifyLayer::new().layer(kling(|_| Some((1, OK))));
    let plain = kling(|_| Some((1, OK)));
    let routing = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let classify = classify.clone();
        let plain = plain.clone();
        async move {
            if req.uri().path().ends_with("/plain") {
                plain.oneshot(req).await
            } else {
                classify.oneshot(req).await
            }
        }
    });
    let ensuring = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let routing = routing.clone();
        async move {
            let mut response = routing.oneshot(req).await?;
            Outcome::ensure(&mut response)?;
            Ok::<_, BoxError>(response)
        }
    });
    let stack = MetricsLayer::with_monitor(monitor.clone()).layer(ensuring);
    let query = request("GET", "/v1/videos/text2video/t-1", "", "k");
    stack.clone().oneshot(query).await.unwrap();
    assert_eq!(requests(), 1, "counted by the classify step");
    let past = request("GET", "/v1/videos/text2video/plain", "", "k");
    assert!(
        !past.extensions().is_empty(),
        "the metrics layer gives it its counter"
    );
    let response = stack.clone().oneshot(past).await.unwrap();
    assert!(
        Outcome::of(&response).is_some(),
        "parsed by the layer between"
    );
    assert_eq!(
        requests(),
        2,
        "sent past the classify step, counted by the metrics layer"
    );
    let query = request("GET", "/v1/videos/text2video/t-2", "", "k");
    stack.oneshot(query).await.unwrap();
    assert_eq!(requests(), 3, "through the step, once");
}

/// The layer reads a create's send watch only while its lane does not know that a classify
/// step below counts its requests, and so puts one in a create only then. Once the lane knows,
/// a create still counts as before: not when dropped while a layer below holds it back unsent
/// (a layer that reads a watch, as the task slots do, makes its own), once when dropped after
/// it was handed on toward Kling (the classify step counts it), once when answered.
#[tokio::test(start_paused = true)]
async fn a_create_gets_no_watch_once_the_lane_knows_the_classify_step_counts_and_counts_as_before()
{
    use kling_core::signals::{ExtensionsCopy, SendWatch};

    // An hour's window: every request below stays in it.
    let monitor = Monitor::builder()
        .rate_quota(3600, Duration::from_secs(3600))
        .build()
        .unwrap();
    let requests = || monitor.snapshot().rate.requests;
    // Whether each create reached this layer with a watch in its signals.
    let watched = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&watched);
    let classify = ClassifyLayer::new().layer(kling(|_| Some((10, OK))));
    // What the task slots do: a watch of their own when the create carries none, the create
    // held back for five minutes, then handed on. A create to `/direct` is sent at once.
    let below = tower::service_fn(move |mut req: http::Request<Full<Bytes>>| {
        seen.lock()
            .unwrap()
            .push(ExtensionsCopy::of(req.extensions()).send_watch().is_some());
        let held = !req.uri().path().ends_with("/direct");
        let watch = SendWatch::shared(&mut req);
        if held {
            SendWatch::held(&req);
        }
        let classify = classify.clone();
        async move {
            if held {
                sleep(Duration::from_secs(300)).await;
                SendWatch::handed(&req);
            }
            let answer = classify.oneshot(req).await;
            drop(watch);
            answer
        }
    });
    let stack = MetricsLayer::with_monitor(monitor.clone()).layer(below);
    let create = |path: &str| support::request("POST", path, r#"{"prompt":"x"}"#, "k");

    // The first create teaches the lane that the classify step counts.
    stack
        .clone()
        .oneshot(create("/text-to-video/direct"))
        .await
        .unwrap();
    assert_eq!(requests(), 1);

    // Dropped while held back: Kling never saw it.
    let waited = timeout(
        Duration::from_secs(100),
        stack.clone().oneshot(create("/v1/videos/text2video")),
    );
    assert!(waited.await.is_err(), "timed out");
    assert_eq!(requests(), 1, "held back unsent");

    // Dropped after it was handed on, while Kling works on it.
    let sent = timeout(
        Duration::from_secs(305),
        stack.clone().oneshot(create("/v1/videos/text2video")),
    );
    assert!(sent.await.is_err(), "timed out");
    assert_eq!(requests(), 2, "counted by the classify step, in flight");

    // Answered: once.
    stack
        .clone()
        .oneshot(create("/v1/videos/text2video"))
        .await
        .unwrap();
    assert_eq!(requests(), 3, "once, when answered");

    assert_eq!(
        *watched.lock().unwrap(),
        [true, false, false, false],
        "a watch only before the lane knew"
    );
}
