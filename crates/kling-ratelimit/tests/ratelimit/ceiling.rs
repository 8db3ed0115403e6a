//! An adaptive key at its ceiling costs what a fixed quota does: its successes are not
//! reported (nothing in its state would change), and it paces as the same quota without an
//! adaptive rule, before any 1302 and again once recovery has brought it back.

use std::sync::atomic::{AtomicUsize, Ordering};

use kling_core::AccountId;
use kling_ratelimit::{
    Adaptive, Backend, BucketKey, Feedback, GcraLayer, InProcess, Policy, Quota,
};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

use crate::support::{Reply, Req, Server, ms, request, spawn_call};

/// The in-process backend, counting the feedback it is given.
#[derive(Debug, Default)]
struct Counted {
    inner: InProcess,
    successes: AtomicUsize,
    pauses: AtomicUsize,
}

impl Counted {
    fn counts(&self) -> (usize, usize) {
        (
            self.successes.load(Ordering::Relaxed),
            self.pauses.load(Ordering::Relaxed),
        )
    }
}

impl Backend for Counted {
    type AcquireFuture = <InProcess as Backend>::AcquireFuture;
    type FeedbackFuture = <InProcess as Backend>::FeedbackFuture;

    fn acquire(&self, key: &BucketKey, policy: &Policy) -> Self::AcquireFuture {
        self.inner.acquire(key, policy)
    }

    fn acquire_noting(
        &self,
        key: &BucketKey,
        policy: &Policy,
        decided_at: &mut Option<Instant>,
    ) -> Self::AcquireFuture {
        self.inner.acquire_noting(key, policy, decided_at)
    }

    fn feedback(
        &self,
        key: &BucketKey,
        policy: &Policy,
        feedback: Feedback,
    ) -> Self::FeedbackFuture {
        let counter = match feedback {
            Feedback::Success { .. } => &self.successes,
            _ => &self.pauses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.inner.feedback(key, policy, feedback)
    }

    fn adaptive_at_ceiling(&self, key: &BucketKey, policy: &Policy) -> bool {
        self.inner.adaptive_at_ceiling(key, policy)
    }
}

/// A request of account `a`, whose text every request shares (as an interned account does).
fn req(tag: &str) -> Req {
    let mut req = request(None, tag);
    req.extensions_mut().insert(AccountId::interned("a"));
    req
}

/// Sends the same arrivals to both services at the same instants: eight at once, then four
/// 100 ms apart, then one after a second.
async fn arrivals<S1, S2>(adaptive: &S1, fixed: &S2)
where
    S1: tower::Service<Req, Response = crate::support::Res, Error = kling_core::BoxError>
        + Clone
        + Send
        + 'static,
    S1::Future: Send,
    S2: tower::Service<Req, Response = crate::support::Res, Error = kling_core::BoxError>
        + Clone
        + Send
        + 'static,
    S2::Future: Send,
{
    let mut calls = Vec::new();
    for i in 0..8 {
        calls.push(spawn_call(adaptive, req(&format!("burst{i}"))).await);
        calls.push(spawn_call(fixed, req(&format!("burst{i}"))).await);
    }
    for i in 0..4 {
        tokio::time::sleep(ms(100)).await;
        calls.push(spawn_call(adaptive, req(&format!("spaced{i}"))).await);
        calls.push(spawn_call(fixed, req(&format!("spaced{i}"))).await);
    }
    tokio::time::sleep(ms(1000)).await;
    calls.push(spawn_call(adaptive, req("late")).await);
    calls.push(spawn_call(fixed, req("late")).await);
    for call in calls {
        call.await.unwrap().unwrap();
    }
}

/// An adaptive key that starts at its ceiling reports no success and paces as the fixed
/// quota; a 1302 lowers it and every success of its recovery is reported; back at the
/// ceiling it reports none again and paces as the fixed quota, request for request.
#[tokio::test(start_paused = true)]
async fn an_adaptive_key_back_at_its_ceiling_paces_as_a_fixed_quota() {
    let quota = Quota::per_second(4.0).with_burst(2);
    let (adaptive_server, fixed_server) = (Server::new(), Server::new());
    let adaptive = GcraLayer::builder(quota)
        .adaptive(Adaptive::new().start(quota))
        .backend(Counted::default())
        .build()
        .unwrap();
    let fixed = GcraLayer::builder(quota)
        .backend(Counted::default())
        .build()
        .unwrap();
    let (adaptive_handle, fixed_handle) = (adaptive.handle(), fixed.handle());
    let adaptive = adaptive.layer(adaptive_server.service());
    let fixed = fixed.layer(fixed_server.service());
    let key = BucketKey::account(Some(AccountId::interned("a")));
    let rate = || {
        let state = adaptive_handle.backend().inner.key_state(&key).unwrap();
        state.adaptive_rate.unwrap()
    };
    let same_times = |from: usize| {
        let times = |server: &Server| {
            let hits = server.hits();
            hits[from..]
                .iter()
                .map(|hit| (hit.tag.clone(), hit.at))
                .collect::<Vec<_>>()
        };
        let (a, f) = (times(&adaptive_server), times(&fixed_server));
        assert_eq!(a.len(), 13);
        assert_eq!(a, f, "the adaptive key at its ceiling paced otherwise");
        // The pacing is the quota's: a burst of two, then 250 ms apart.
        assert_eq!(a[2].1 - a[0].1, ms(250));
    };

    // Before any 1302: at the ceiling from the start.
    arrivals(&adaptive, &fixed).await;
    same_times(0);
    assert_eq!(adaptive_handle.backend().counts(), (0, 0));
    assert_eq!(rate(), 4.0);

    // A 1302 lowers the key; its recovery reports every success.
    adaptive_server.script([Reply::throttled()]);
    adaptive.clone().oneshot(req("throttled")).await.unwrap();
    assert_eq!(adaptive_handle.backend().counts(), (0, 1));
    assert_eq!(rate(), 3.4);
    let mut successes = 0;
    while rate() < 4.0 {
        adaptive.clone().oneshot(req("recovery")).await.unwrap();
        successes += 1;
        assert_eq!(adaptive_handle.backend().counts(), (successes, 1));
        assert!(successes < 200, "never recovered: {}", rate());
    }
    // The next request applies the ceiling to the key's limiter; from its success on,
    // nothing is reported.
    adaptive.clone().oneshot(req("recovered")).await.unwrap();
    let reported = adaptive_handle.backend().counts();
    assert_eq!(reported, (successes, 1));

    // Both idle and paid off: the same arrivals, the same sends, no report.
    tokio::time::sleep(ms(10_000)).await;
    let from = adaptive_server.hits().len();
    let fixed_from = fixed_server.hits().len();
    arrivals(&adaptive, &fixed).await;
    assert_eq!(fixed_server.hits()[fixed_from..].len(), 13);
    let tail = |server: &Server, from: usize| {
        server.hits()[from..]
            .iter()
            .map(|hit| (hit.tag.clone(), hit.at))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        tail(&adaptive_server, from),
        tail(&fixed_server, fixed_from),
        "the adaptive key back at its ceiling paced otherwise"
    );
    assert_eq!(adaptive_handle.backend().counts(), reported);
    assert_eq!(fixed_handle.backend().counts(), (0, 0));
    assert_eq!(rate(), 4.0);

    // And a 1302 there still lowers it.
    adaptive_server.script([Reply::throttled()]);
    adaptive
        .clone()
        .oneshot(req("throttled again"))
        .await
        .unwrap();
    assert_eq!(rate(), 3.4);
}
