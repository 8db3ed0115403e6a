//! Overhead of `GcraLayer` over an always-ready inner service, against governor's `check` alone
//! and `tower::limit::RateLimit`; 10,000 keys; 100,000 queued waiters.
//!
//! Run: `cargo bench -p kling-ratelimit --bench gcra`

use std::hint::black_box;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant as StdInstant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::Full;
use kling_core::{AccountId, BoxError, Outcome, TokioClock};
use kling_ratelimit::{GcraLayer, Quota, WAITER_RECORD_BYTES};
use tower::{Layer, Service, ServiceExt, service_fn};

type Req = http::Request<Full<Bytes>>;
type Res = http::Response<Full<Bytes>>;

/// An always-ready inner service answering success with the `Outcome` attached, as the
/// classify step would.
fn inner() -> impl Service<
    Req,
    Response = Res,
    Error = BoxError,
    Future = impl Future<Output = Result<Res, BoxError>>,
> + Clone {
    let outcome = Outcome::parse(
        http::StatusCode::OK,
        &http::HeaderMap::new(),
        br#"{"code":0,"message":"SUCCEED","request_id":"r"}"#,
        tokio::time::Instant::now(),
    )
    .unwrap();
    service_fn(move |_req: Req| {
        let mut response = http::Response::new(Full::new(Bytes::from_static(b"{}")));
        response.extensions_mut().insert(outcome.clone());
        std::future::ready(Ok::<_, BoxError>(response))
    })
}

/// A quota no benchmark reaches: the overhead of an admitting limiter.
fn open_quota() -> Quota {
    Quota::per_second(1e9).with_burst(65_535)
}

/// `poll_ready` (always ready here) then `call`, as tower's `oneshot` would.
fn ready_call<S: Service<Req>>(svc: &mut S, req: Req) -> S::Future {
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    svc.call(req)
}

fn request(account: Option<&AccountId>) -> Req {
    let mut req = http::Request::new(Full::new(Bytes::new()));
    if let Some(account) = account {
        req.extensions_mut().insert(account.clone());
    }
    req
}

fn overhead(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let account = AccountId::new("acct");
    let mut group = c.benchmark_group("overhead");

    let mut bare = inner();
    group.bench_function("inner service alone", |b| {
        b.to_async(&rt).iter(|| {
            let req = request(Some(&account));
            let call = bare.call(req);
            async move { black_box(call.await.unwrap()) }
        })
    });

    let limiter = governor::RateLimiter::direct_with_clock(
        governor::Quota::per_second(NonZeroU32::new(1_000_000_000).unwrap())
            .allow_burst(NonZeroU32::new(65_535).unwrap()),
        TokioClock,
    );
    let mut governed = inner();
    group.bench_function("governor check + inner", |b| {
        b.to_async(&rt).iter(|| {
            let req = request(Some(&account));
            limiter.check().unwrap();
            let call = governed.call(req);
            async move { black_box(call.await.unwrap()) }
        })
    });

    let mut tower_limit = tower::limit::RateLimit::new(
        inner(),
        tower::limit::rate::Rate::new(u64::MAX / 2, Duration::from_secs(1)),
    );
    group.bench_function("tower RateLimit + inner", |b| {
        b.to_async(&rt).iter(|| {
            let req = request(Some(&account));
            let call = ready_call(&mut tower_limit, req);
            async move { black_box(call.await.unwrap()) }
        })
    });

    let mut gcra = GcraLayer::new(open_quota()).unwrap().layer(inner());
    group.bench_function("GcraLayer + inner, one account", |b| {
        b.to_async(&rt).iter(|| {
            let req = request(Some(&account));
            let call = ready_call(&mut gcra, req);
            async move { black_box(call.await.unwrap()) }
        })
    });

    let keys: Vec<AccountId> = (0..10_000)
        .map(|i| AccountId::new(format!("acct-{i}")))
        .collect();
    let mut keyed = GcraLayer::new(open_quota()).unwrap().layer(inner());
    let mut next = 0usize;
    group.bench_function("GcraLayer + inner, 10,000 accounts", |b| {
        b.to_async(&rt).iter(|| {
            next = (next + 1) % keys.len();
            let req = request(Some(&keys[next]));
            let call = ready_call(&mut keyed, req);
            async move { black_box(call.await.unwrap()) }
        })
    });
    group.finish();
}

/// The bench's report line: the memory each waiter costs the limiter.
#[allow(clippy::print_stderr)]
fn report(line: &str) {
    eprintln!("{line}");
}

const WAITERS: usize = 100_000;

fn waiters(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut group = c.benchmark_group("waiters");
    group.sample_size(10);
    let mut reported = false;
    group.bench_function("serve 100,000 queued waiters in order", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // A quota that admits one request a day: everyone after the first queues.
                let layer = GcraLayer::new(Quota::per_minute(1.0 / 1440.0)).unwrap();
                let handle = layer.handle();
                let service = layer.layer(inner());
                let mut futures: Vec<_> =
                    (0..=WAITERS).map(|_| Box::pin(service.clone().oneshot(request(None)))).collect();
                let mut cx = Context::from_waker(Waker::noop());
                for (i, future) in futures.iter_mut().enumerate() {
                    let poll = rt.block_on(async { future.as_mut().poll(&mut cx) });
                    assert_eq!(poll.is_ready(), i == 0, "only the first is admitted");
                }
                assert_eq!(handle.waiting(), WAITERS);
                if !reported {
                    reported = true;
                    let queue = handle.queue_bytes();
                    report(&format!(
                        "waiters: record {WAITER_RECORD_BYTES} B; queue ring buffers {queue} B for {WAITERS} waiters = {:.1} B per waiter; \
                         response future {} B (holds the request)",
                        queue as f64 / WAITERS as f64,
                        std::mem::size_of_val(&*futures[1]),
                    ));
                }
                // Open the quota; the waiters now go in order, each on its first poll.
                handle.set_quota(open_quota()).unwrap();
                let start = StdInstant::now();
                for future in futures.iter_mut().skip(1) {
                    let poll = rt.block_on(async { Pin::new(&mut *future).poll(&mut cx) });
                    assert!(matches!(poll, Poll::Ready(Ok(_))), "served in order");
                }
                total += start.elapsed();
                assert_eq!(handle.waiting(), 0);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, overhead, waiters);
criterion_main!(benches);
