//! The retry layer's overhead on the success path, against `tower::retry::Retry` with a trivial
//! policy, over the same always-ready inner service, in the same run.
//!
//! Run: `cargo bench -p kling-retry --bench overhead`

#![allow(missing_docs)]

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::Full;
use kling_core::signals::{Attempt, Deadline};
use kling_core::{AccountId, Outcome};
use kling_retry::RetryLayer;
use tower::{Layer, Service};

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

const CREATE: &[u8] =
    br#"{"model_name":"kling-v2","prompt":"a cat on a skateboard","duration":"5"}"#;
const ANSWER: &[u8] =
    br#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t","task_status":"submitted"}}"#;

/// An always-ready Kling that answers every request with a classified success.
#[derive(Clone)]
struct Ready200 {
    outcome: Outcome,
}

impl Service<Req> for Ready200 {
    type Response = Res;
    type Error = Infallible;
    type Future = Ready<Result<Res, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Req) -> Self::Future {
        let mut response = Response::new(Full::new(Bytes::from_static(ANSWER)));
        response.extensions_mut().insert(self.outcome.clone());
        ready(Ok(response))
    }
}

/// tower's retry with the most trivial policy: clone every request, never retry.
#[derive(Clone)]
struct Never;

impl<E> tower::retry::Policy<Req, Res, E> for Never {
    type Future = Ready<()>;

    fn retry(&mut self, _: &mut Req, _: &mut Result<Res, E>) -> Option<Self::Future> {
        None
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(copy(req))
    }
}

fn request() -> Req {
    let mut request = Request::post("http://127.0.0.1:8080/v1/videos/text2video")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(CREATE)))
        .expect("valid request");
    request.extensions_mut().insert(AccountId::new("acct"));
    request
}

fn copy(req: &Req) -> Req {
    let mut copy = Request::new(req.body().clone());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    copy
}

/// `poll_ready` + `call` + one poll of the (always ready) response future.
fn once<S>(service: &mut S, request: Req) -> S::Response
where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    match service.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("the inner service is always ready"),
    }
    let future = pin!(service.call(request));
    match future.poll(&mut cx) {
        Poll::Ready(Ok(response)) => response,
        _ => panic!("the inner service answers at once"),
    }
}

fn overhead(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let _entered = runtime.enter();
    let outcome = Outcome::parse(
        http::StatusCode::OK,
        &http::HeaderMap::new(),
        ANSWER,
        tokio::time::Instant::now(),
    )
    .expect("valid answer");
    let inner = Ready200 { outcome };

    let mut group = c.benchmark_group("success_path");
    let mut bare = inner.clone();
    group.bench_function("inner_alone", |b| b.iter(|| once(&mut bare, request())));
    // What any retry layer must do on the success path: keep a copy of the request to send it
    // again (kling-retry also sets the `Deadline` and `Attempt` extensions first).
    group.bench_function("inner_plus_request_copy", |b| {
        b.iter(|| {
            let mut req = request();
            req.extensions_mut()
                .insert(Deadline(tokio::time::Instant::now()));
            req.extensions_mut().insert(Attempt(1));
            let kept = copy(&req);
            (once(&mut bare, req), kept)
        })
    });
    let mut kling = RetryLayer::builder()
        .seed(1)
        .build()
        .expect("valid")
        .layer(inner.clone());
    group.bench_function("kling_retry", |b| b.iter(|| once(&mut kling, request())));
    let mut tower_retry = tower::retry::RetryLayer::new(Never).layer(inner.clone());
    group.bench_function("tower_retry", |b| {
        b.iter(|| once(&mut tower_retry, request()))
    });
    group.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
