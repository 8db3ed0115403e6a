//! The overhead of the run's counting layer over an always-ready inner service, beside the
//! bare service in the same run.
//!
//! `cargo bench -p kling-batch --bench tally`

use std::future::{Future, Ready, ready};
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use kling_batch::tally::TallyLayer;
use kling_core::Outcome;
use tower::{Layer, Service};

/// Answers every request at once with a classified success.
#[derive(Clone)]
struct Ready200 {
    response: Response<Full<Bytes>>,
}

impl Service<Request<Full<Bytes>>> for Ready200 {
    type Response = Response<Full<Bytes>>;
    type Error = std::convert::Infallible;
    type Future = Ready<Result<Response<Full<Bytes>>, std::convert::Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
        let mut response = Response::new(Full::new(Bytes::new()));
        if let Some(outcome) = Outcome::of(&self.response) {
            response.extensions_mut().insert(outcome.clone());
        }
        ready(Ok(response))
    }
}

fn inner() -> Ready200 {
    let body = br#"{"code":0,"message":"SUCCEED","request_id":"r"}"#;
    let outcome = Outcome::parse(
        StatusCode::OK,
        &http::HeaderMap::new(),
        body,
        tokio::time::Instant::now(),
    )
    .unwrap();
    let mut response = Response::new(Full::new(Bytes::new()));
    response.extensions_mut().insert(outcome);
    Ready200 { response }
}

fn drive<S>(service: &mut S)
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(service.poll_ready(&mut cx).is_ready());
    let future = pin!(service.call(black_box(Request::new(Full::new(Bytes::new())))));
    match future.poll(&mut cx) {
        Poll::Ready(result) => {
            black_box(result.unwrap());
        }
        Poll::Pending => unreachable!("always ready"),
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut group = c.benchmark_group("poll_ready+call");
    let mut bare = inner();
    group.bench_function("bare", |b| b.iter(|| drive(&mut bare)));
    let mut tally = TallyLayer::new().layer(inner());
    group.bench_function("tally", |b| b.iter(|| drive(&mut tally)));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
