//! Overhead of the slots layers on the uncontended path, against tower's `ConcurrencyLimit` in
//! the same run: `cargo bench -p kling-concurrency --bench slots`.
//!
//! Every future is polled by hand with a no-op waker (all of them complete on their first
//! poll here), so the numbers are the layers' own work, not a runtime's.

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use kling_concurrency::backend::{InProcess, SlotBackend, SlotKey, SlotOp};
use kling_concurrency::{InFlightLayer, SlotsConfig, TaskSlotsLayer};
use kling_core::{AccountId, Outcome, Pool, Product, Recognized};
use tower::limit::ConcurrencyLimitLayer;
use tower::{Layer, Service};

const CREATED: &[u8] =
    br#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t1","task_status":"submitted"}}"#;
const ENDED: &[u8] =
    br#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t1","task_status":"succeed"}}"#;

/// An always-ready client that answers with a response already classified (as `ClassifyLayer`
/// would leave it): a created task for POST, the same task ended for GET.
#[derive(Clone)]
struct AlwaysReady {
    created: Outcome,
    ended: Outcome,
}

impl AlwaysReady {
    fn new() -> Self {
        let parse = |body| {
            Outcome::parse(
                StatusCode::OK,
                &http::HeaderMap::new(),
                body,
                tokio::time::Instant::now(),
            )
            .unwrap()
        };
        AlwaysReady {
            created: parse(CREATED),
            ended: parse(ENDED),
        }
    }
}

impl Service<Request<Full<Bytes>>> for AlwaysReady {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Full<Bytes>>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let (body, outcome) = if req.method() == http::Method::POST {
            (CREATED, &self.created)
        } else {
            (ENDED, &self.ended)
        };
        let mut response = Response::new(Full::new(Bytes::from_static(body)));
        response.extensions_mut().insert(outcome.clone());
        ready(Ok(response))
    }
}

fn poll_now<F: Future>(future: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(future).poll(&mut cx) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the uncontended path never waits"),
    }
}

fn round_trip<S>(service: &mut S, request: Request<Full<Bytes>>) -> Response<Full<Bytes>>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    match service.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("always ready"),
    }
    poll_now(service.call(request)).unwrap()
}

/// Requests as a layer above (the retry layer) would pass them: already recognised.
struct Requests {
    create: Recognized,
    query: Recognized,
}

impl Requests {
    fn new() -> Self {
        Requests {
            create: Recognized::from_request(&Self::bare_create()),
            query: Recognized::from_request(&Self::bare_query()),
        }
    }

    fn bare_create() -> Request<Full<Bytes>> {
        Request::post("/v1/videos/text2video")
            .body(Full::new(Bytes::from_static(br#"{"prompt":"a cat"}"#)))
            .unwrap()
    }

    fn bare_query() -> Request<Full<Bytes>> {
        Request::get("/v1/videos/text2video/t1")
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    fn create(&self) -> Request<Full<Bytes>> {
        let mut req = Self::bare_create();
        req.extensions_mut().insert(self.create.clone());
        req
    }

    fn query(&self) -> Request<Full<Bytes>> {
        let mut req = Self::bare_query();
        req.extensions_mut().insert(self.query.clone());
        req
    }
}

fn uncontended(c: &mut Criterion) {
    let requests = Requests::new();
    let mut group = c.benchmark_group("uncontended");

    let mut bare = AlwaysReady::new();
    group.bench_function("bare client (baseline)", |b| {
        b.iter(|| black_box(round_trip(&mut bare, requests.query())))
    });

    let mut limit = ConcurrencyLimitLayer::new(5).layer(AlwaysReady::new());
    group.bench_function("tower ConcurrencyLimit: one request", |b| {
        b.iter(|| black_box(round_trip(&mut limit, requests.query())))
    });

    let mut in_flight = InFlightLayer::new(5).unwrap().layer(AlwaysReady::new());
    group.bench_function("InFlight: one request", |b| {
        b.iter(|| black_box(round_trip(&mut in_flight, requests.query())))
    });

    let backend = InProcess::new(SlotsConfig::new(5)).unwrap();
    let key = SlotKey::new(AccountId::new("a"), Pool::new(Product::Video));
    group.bench_function("InProcess backend: acquire + give back", |b| {
        b.iter(|| {
            let reservation = poll_now(backend.acquire(key.clone(), 1)).unwrap();
            black_box(poll_now(backend.apply(SlotOp::GiveBack(reservation))).unwrap())
        })
    });

    let (layer, _handle) = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap();
    let mut slots = layer.layer(AlwaysReady::new());
    group.bench_function("TaskSlots: query passing through", |b| {
        b.iter(|| black_box(round_trip(&mut slots, requests.query())))
    });
    group.bench_function(
        "TaskSlots: create (acquire, hold) + query ending it (release)",
        |b| {
            b.iter(|| {
                black_box(round_trip(&mut slots, requests.create()));
                black_box(round_trip(&mut slots, requests.query()))
            })
        },
    );
    group.bench_function(
        "bare client: create + query (baseline of the line above)",
        |b| {
            b.iter(|| {
                black_box(round_trip(&mut bare, requests.create()));
                black_box(round_trip(&mut bare, requests.query()))
            })
        },
    );
    group.finish();
}

criterion_group!(benches, uncontended);
criterion_main!(benches);
