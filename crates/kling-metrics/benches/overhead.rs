//! Overhead of `MetricsLayer` over an always-ready inner service that answers a classified
//! response at once: with no recorder installed (the `metrics` no-op) and with the Prometheus
//! recorder, against the bare service and against the bare service plus request recognition
//! (which the layer pays for the whole stack: the result is cached in the request).
//!
//! Run: `cargo bench -p kling-metrics --all-features --bench overhead`

use std::future::{Future, Ready, ready};
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::Full;
use kling_core::error::BoxError;
use kling_core::{Outcome, Recognized};
use kling_metrics::MetricsLayer;
use tower::{Layer, Service};

/// Answers every request with the same classified response, at once.
#[derive(Clone)]
struct Answer {
    body: Bytes,
    outcome: Outcome,
}

impl Answer {
    fn new() -> Self {
        let body = Bytes::from_static(
            br#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t","task_status":"processing"}}"#,
        );
        let outcome = Outcome::parse(
            http::StatusCode::OK,
            &http::HeaderMap::new(),
            &body,
            tokio::time::Instant::now(),
        )
        .unwrap();
        Answer { body, outcome }
    }
}

impl Service<Request<Full<Bytes>>> for Answer {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = Ready<Result<Response<Full<Bytes>>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        let mut response = Response::new(Full::new(self.body.clone()));
        response.extensions_mut().insert(self.outcome.clone());
        ready(Ok(response))
    }
}

fn query() -> Request<Full<Bytes>> {
    Request::get("/v1/videos/text2video/860000000000000001")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// `poll_ready` + `call` + poll to completion, without a runtime (everything is ready).
fn once<S>(service: &mut S, request: Request<Full<Bytes>>) -> S::Response
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(service.poll_ready(&mut cx).is_ready());
    let mut future = pin!(service.call(request));
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(result) => result.unwrap(),
        Poll::Pending => unreachable!("the inner service is always ready"),
    }
}

fn overhead(c: &mut Criterion) {
    let mut group = c.benchmark_group("metrics_layer");

    let mut bare = Answer::new();
    group.bench_function("bare", |b| {
        b.iter(|| black_box(once(&mut bare, query())));
    });

    let mut recognized = Answer::new();
    group.bench_function("bare_plus_recognition", |b| {
        b.iter(|| {
            let mut request = query();
            black_box(Recognized::of(&mut request));
            black_box(once(&mut recognized, request))
        });
    });

    let mut noop = MetricsLayer::new().layer(Answer::new());
    group.bench_function("noop_recorder", |b| {
        b.iter(|| black_box(once(&mut noop, query())));
    });

    #[cfg(feature = "prometheus")]
    {
        let recorder = kling_metrics::prometheus::builder().build_recorder();
        let handle = recorder.handle();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let mut prom = MetricsLayer::new().layer(Answer::new());
        group.bench_function("prometheus_recorder", |b| {
            b.iter(|| black_box(once(&mut prom, query())));
        });
        handle.run_upkeep();
        assert!(
            handle
                .render()
                .contains("http_client_request_duration_seconds_bucket")
        );
    }
    group.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
