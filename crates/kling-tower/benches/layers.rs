//! Success-path overhead of this crate's layers: `poll_ready` + `call` + awaiting the response,
//! over an always-ready inner service, against the bare inner service in the same run.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::Full;
use kling_core::Outcome;
use kling_tower::auth::{AuthLayer, Credentials};
use kling_tower::base_url::BaseUrlLayer;
use kling_tower::spend::{CostTable, SpendGuardLayer};
use kling_tower::{DrainLayer, KlingLayer, StackConfig, Tier};
use tower::{Layer, Service};

/// An always-ready inner service answering a pre-classified success.
#[derive(Clone)]
struct Ready200 {
    response: Response<Full<Bytes>>,
}

impl Ready200 {
    fn new() -> Self {
        let mut response = Response::new(Full::new(Bytes::from_static(
            br#"{"code":0,"message":"SUCCEED","request_id":"r","data":null}"#,
        )));
        Outcome::ensure(&mut response).expect("an envelope");
        Ready200 { response }
    }
}

impl Service<Request<Full<Bytes>>> for Ready200 {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Full<Bytes>>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
        let mut response = Response::new(self.response.body().clone());
        *response.extensions_mut() = self.response.extensions().clone();
        ready(Ok(response))
    }
}

fn query() -> Request<Full<Bytes>> {
    Request::get("/v1/videos/text2video/860000000000000001")
        .body(Full::new(Bytes::new()))
        .expect("valid")
}

/// A request as it reaches the auth layer inside a stack: it already has a header and
/// extensions (the account id, set by a gateway or an outer layer).
fn dressed() -> Request<Full<Bytes>> {
    let mut request = query();
    request.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    request
        .extensions_mut()
        .insert(kling_core::AccountId::new("bench"));
    request
}

fn run<S>(c: &mut Criterion, name: &str, service: S)
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    run_with(c, name, query, service)
}

fn run_with<S>(c: &mut Criterion, name: &str, make: fn() -> Request<Full<Bytes>>, mut service: S)
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let waker = std::task::Waker::noop();
    c.bench_function(name, |b| {
        b.iter_batched(
            make,
            |request| {
                let mut cx = Context::from_waker(waker);
                let _guard = rt.enter();
                assert!(service.poll_ready(&mut cx).is_ready());
                let mut future = std::pin::pin!(service.call(request));
                match future.as_mut().poll(&mut cx) {
                    Poll::Ready(result) => result.expect("success"),
                    Poll::Pending => unreachable!("the inner service is always ready"),
                }
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

use std::future::Future;

fn layers(c: &mut Criterion) {
    run(c, "bare inner service", Ready200::new());
    let api_key = AuthLayer::new(Credentials::api_key("bench-key").expect("key"));
    run(c, "auth, api key", api_key.layer(Ready200::new()));
    run_with(
        c,
        "bare inner service, dressed request",
        dressed,
        Ready200::new(),
    );
    run_with(
        c,
        "auth, api key, dressed request",
        dressed,
        api_key.layer(Ready200::new()),
    );
    let jwt = AuthLayer::new(Credentials::access_key("ak", "sk").expect("keys"));
    run(c, "auth, jwt (cached)", jwt.layer(Ready200::new()));
    run_with(
        c,
        "auth, jwt (cached), dressed request",
        dressed,
        jwt.layer(Ready200::new()),
    );
    let guard = SpendGuardLayer::new(66.0, CostTable::new()).expect("guard");
    run(c, "spend guard, query", guard.layer(Ready200::new()));
    let base = BaseUrlLayer::global();
    run(c, "base url", base.layer(Ready200::new()));
    run(c, "drain gate", DrainLayer::new().layer(Ready200::new()));
    // The whole stack with no rate cap and no budget (a paced query would wait): metrics,
    // drain, retry, slots, auth, timeout, classify, base url over the ready service.
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Enterprise),
        Credentials::api_key("bench-key").expect("key"),
    )
    .expect("stack");
    run(
        c,
        "kling stack (enterprise), query",
        kling.layer(Ready200::new()),
    );
}

criterion_group!(benches, layers);
criterion_main!(benches);
