//! Class requests held at the send by their class's record of sends: a quota change while
//! they wait, a store several processes share, reject mode, and a pause of their account.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use kling_core::RequestKind;
use kling_ratelimit::error::{BackendError, QueueFull, RateLimited};
use kling_ratelimit::{
    Backend, BucketKey, Decision, Feedback, GcraLayer, InProcess, Policy, Quota,
};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

use crate::support::{Server, ms, request, request_to, spawn_call};

fn costs(tag: &str) -> crate::support::Req {
    request_to("/account/costs", Some("a"), tag)
}

/// A test backend's answer to an ask, boxed.
type BoxedAnswer =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Decision, BackendError>> + Send>>;

/// The in-process backend as a store several processes share would answer: an account key's
/// answer comes after the next of `latencies` (none: at once, but not on the first poll), and
/// the keys the layer said it stopped waiting for are recorded.
#[derive(Debug, Default)]
struct Store {
    inner: std::sync::Arc<InProcess>,
    latencies: Mutex<VecDeque<Duration>>,
    stopped: Mutex<Vec<BucketKey>>,
    /// The end of a pause of every account key, as another process meeting a 1302 sets it.
    paused_until: Mutex<Option<Instant>>,
    /// Reject mode's class and account turns at once
    /// ([`Backend::acquire_class_or_refuse`]), answered after this round trip; `None`: the
    /// backend cannot (the default).
    both_latency: Option<Duration>,
    /// The keys asked with `acquire_noting` (a request decided in `call`, not in the gate).
    noted: Mutex<Vec<BucketKey>>,
}

impl Store {
    fn answer(&self, key: &BucketKey, policy: &Policy) -> BoxedAnswer {
        let paused = *self.paused_until.lock().unwrap();
        if let Some(at) = paused
            && key.request_kind().is_none()
            && at > Instant::now()
        {
            return Box::pin(std::future::ready(Ok(Decision::NotBefore {
                at,
                cooldown: true,
            })));
        }
        if key.request_kind().is_some() {
            return Box::pin(self.inner.acquire(key, policy));
        }
        let latency = self.latencies.lock().unwrap().pop_front();
        let Some(latency) = latency else {
            return Box::pin(self.inner.acquire(key, policy));
        };
        // Decided when the answer arrives: the latency is the whole round trip.
        let (inner, key, policy) = (std::sync::Arc::clone(&self.inner), key.clone(), *policy);
        Box::pin(async move {
            tokio::time::sleep(latency).await;
            inner.acquire(&key, &policy).await
        })
    }
}

impl Backend for Store {
    type AcquireFuture = BoxedAnswer;
    type FeedbackFuture = <InProcess as Backend>::FeedbackFuture;

    fn acquire(&self, key: &BucketKey, policy: &Policy) -> Self::AcquireFuture {
        self.answer(key, policy)
    }

    fn acquire_or_refuse(
        &self,
        key: &BucketKey,
        policy: &Policy,
        _decided_at: &mut Option<Instant>,
    ) -> Self::AcquireFuture {
        self.answer(key, policy)
    }

    fn acquire_noting(
        &self,
        key: &BucketKey,
        policy: &Policy,
        _decided_at: &mut Option<Instant>,
    ) -> Self::AcquireFuture {
        self.noted.lock().unwrap().push(key.clone());
        self.answer(key, policy)
    }

    fn acquire_class_or_refuse(
        &self,
        class: &BucketKey,
        class_policy: &Policy,
        account: &BucketKey,
        account_policy: &Policy,
        _decided_at: &mut Option<Instant>,
    ) -> Option<Self::AcquireFuture> {
        let latency = self.both_latency?;
        let inner = std::sync::Arc::clone(&self.inner);
        let (class, class_policy) = (class.clone(), *class_policy);
        let (account, account_policy) = (account.clone(), *account_policy);
        Some(Box::pin(async move {
            tokio::time::sleep(latency).await;
            let both = inner.acquire_class_now(&class, &class_policy, &account, &account_policy);
            Ok(both.0)
        }))
    }

    fn stop_waiting(&self, key: &BucketKey) {
        // Also while a failed test unwinds, from a future's drop.
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        stopped.push(key.clone());
    }

    fn feedback(
        &self,
        key: &BucketKey,
        policy: &Policy,
        feedback: Feedback,
    ) -> Self::FeedbackFuture {
        self.inner.feedback(key, policy, feedback)
    }
}

/// Account ten a second, `/account/costs` one a second: `k0` waits behind nine creates and is
/// sent at 0.9 s; at 1 s `k1` passes its class gate at once but is held until 1.9 s. Returns
/// the layer, its service, the start and `k1`'s call.
async fn k1_held<Bk: Backend>(
    server: &Server,
    layer: GcraLayer<Bk>,
) -> (
    impl tower::Service<
        crate::support::Req,
        Response = crate::support::Res,
        Error = kling_core::BoxError,
        Future: Send,
    > + Clone
    + Send
    + 'static,
    Instant,
    tokio::task::JoinHandle<Result<crate::support::Res, kling_core::BoxError>>,
) {
    let service = layer.layer(server.service());
    let start = Instant::now();
    let mut calls = Vec::new();
    for i in 0..9 {
        calls.push(spawn_call(&service, request(Some("a"), &format!("x{i}"))).await);
    }
    calls.push(spawn_call(&service, costs("k0")).await);
    for call in calls {
        call.await.unwrap().unwrap();
    }
    tokio::time::advance(ms(1000) - start.elapsed()).await;
    let k1 = spawn_call(&service, costs("k1")).await;
    (service, start, k1)
}

/// A slower class quota set while a class request is held for its class: its wait left counts
/// the same number of class turns under the new quota, as the class gate's own debt does, so it
/// is not sent sooner than the new quota allows.
#[tokio::test(start_paused = true)]
async fn a_held_class_request_keeps_a_slower_class_quota_set_while_it_waits() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .build()
        .unwrap();
    let handle = layer.handle();
    let (_service, start, k1) = k1_held(&server, layer).await;
    tokio::time::sleep(ms(500)).await;
    // 0.4 s of a 1 s turn left: 2 s of a 5 s turn.
    handle
        .set_class_quota(RequestKind::Account, Quota::per_second(0.2))
        .unwrap();
    k1.await.unwrap().unwrap();
    // Before: k1 at 1900, 1 s after k0 under the old quota.
    assert_eq!(
        &server.times_ms(start)[9..],
        [("k0".into(), 900), ("k1".into(), 3500)]
    );
}

/// The same with a faster class quota: the held request does not wait out the old one's turn.
#[tokio::test(start_paused = true)]
async fn a_held_class_request_takes_a_faster_class_quota_set_while_it_waits() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .build()
        .unwrap();
    let handle = layer.handle();
    let (_service, start, k1) = k1_held(&server, layer).await;
    tokio::time::sleep(ms(500)).await;
    // 0.4 s of a 1 s turn left: 0.2 s of a 0.5 s turn.
    handle
        .set_class_quota(RequestKind::Account, Quota::per_second(2.0))
        .unwrap();
    k1.await.unwrap().unwrap();
    // Before: k1 at 1900.
    assert_eq!(
        &server.times_ms(start)[9..],
        [("k0".into(), 900), ("k1".into(), 1700)]
    );
}

/// While `k1` is held for its class, `k2` waits at the class gate (its head, asking the store)
/// and is dropped: no other request of this process waits for the class key at the store, so
/// the store is told, as when any last waiter of a key gives up.
#[tokio::test(start_paused = true)]
async fn the_last_request_at_a_class_gate_gives_its_place_up_while_others_are_held() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .backend(Store::default())
        .build()
        .unwrap();
    let handle = layer.handle();
    let (service, start, k1) = k1_held(&server, layer).await;
    let k2 = spawn_call(&service, costs("k2")).await;
    tokio::time::sleep(ms(300)).await;
    assert!(!k2.is_finished() && !k1.is_finished());
    handle.backend().stopped.lock().unwrap().clear();
    k2.abort();
    assert!(k2.await.unwrap_err().is_cancelled());
    let class = BucketKey::class(Some(kling_core::AccountId::new("a")), RequestKind::Account);
    // Before: not told, the held `k1` counting as a waiter of the class key.
    assert_eq!(*handle.backend().stopped.lock().unwrap(), [class]);
    k1.await.unwrap().unwrap();
    assert_eq!(
        &server.times_ms(start)[9..],
        [("k0".into(), 900), ("k1".into(), 1900)]
    );
    assert_eq!(handle.waiting(), 0);
    assert_eq!(handle.queue_bytes(), 0, "the queues are dropped");
}

/// Reject mode over a store whose answers take a round trip: `c0`'s account answer takes
/// 50 ms, so it is sent at 50 ms; `c1` passes its class gate a class turn after `c0` did, at
/// 1 s, and is sent: the time an answer took to come back is no reason to refuse it after its
/// class turn was spent.
#[tokio::test(start_paused = true)]
async fn reject_mode_does_not_refuse_a_class_request_its_class_gate_admitted() {
    let server = Server::new();
    let store = Store::default();
    store.latencies.lock().unwrap().push_back(ms(50));
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .reject()
        .backend(store)
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    let start = Instant::now();
    service.clone().oneshot(costs("c0")).await.unwrap();
    tokio::time::advance(ms(1000) - start.elapsed()).await;
    let c1 = service.clone().oneshot(costs("c1")).await;
    // Before: refused with a 50 ms wait.
    if let Err(error) = &c1 {
        let limited = error.downcast_ref::<RateLimited>();
        panic!("c1 refused: {error} ({limited:?})");
    }
    assert_eq!(
        server.times_ms(start),
        [("c0".into(), 50), ("c1".into(), 1000)]
    );
}

/// `k1` is held for its class until 1.9 s, and `k2` waits at the class gate (until 2 s), when
/// another process pauses the account from 1.5 s to 4 s: `k1` meets the pause when it goes back
/// to the front of the account's queue, ahead of a create asked during the pause. It keeps its
/// place there (back at its class gate, it would come after the create, which came after it)
/// and goes at the pause's end, the create next, and `k2` a class turn after `k1`.
#[tokio::test(start_paused = true)]
async fn held_class_requests_that_meet_a_pause_keep_their_order_and_quota() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .backend(Store::default())
        .build()
        .unwrap();
    let handle = layer.handle();
    let (service, start, k1) = k1_held(&server, layer).await;
    tokio::time::sleep(ms(100)).await;
    // Passes its class gate at 2 s, and is held behind `k1`.
    let k2 = spawn_call(&service, costs("k2")).await;
    tokio::time::sleep(ms(400)).await;
    *handle.backend().paused_until.lock().unwrap() = Some(start + ms(4000));
    let create = spawn_call(&service, request(Some("a"), "create")).await;
    for call in [k1, k2, create] {
        let sent = tokio::time::timeout(ms(60_000), call).await;
        sent.expect("sent within a minute").unwrap().unwrap();
    }
    assert_eq!(handle.waiting(), 0);
    assert_eq!(handle.queue_bytes(), 0, "the queues are dropped");
    // Before: `k1` went back to its class gate and asked it again at the pause's end, behind
    // the create at the account's: create 4000, k1 4100, k2 5100.
    assert_eq!(
        &server.times_ms(start)[9..],
        [
            ("k0".into(), 900),
            ("k1".into(), 4000),
            ("create".into(), 4100),
            ("k2".into(), 5000),
        ]
    );
}

/// Class requests sent a burst apart, then held: account ten a second behind 30 creates,
/// `/account/costs` one a second with a burst of two. `k0` and `k1` pass their class gate at
/// once, `k2` at 1 s and `k3` at 2 s; the creates hold them all at the account gate until 3 s,
/// where `k0` and `k1` go out as the burst, and `k2` then `k3` are held for the class (until
/// 4 s). `k2` goes back to the account's queue at 4 s, where a create took the turn, and while
/// it waits there the class burst is lowered to one: its class no longer lets it go until 5 s,
/// and it is held again, still ahead of `k3`.
#[tokio::test(start_paused = true)]
async fn a_held_class_request_held_again_by_a_lowered_burst_keeps_its_turn() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0).with_burst(2))
        .build()
        .unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let start = Instant::now();
    let mut calls = Vec::new();
    for i in 0..30 {
        calls.push(spawn_call(&service, request(Some("a"), &format!("x{i}"))).await);
    }
    for tag in ["k0", "k1", "k2", "k3"] {
        calls.push(spawn_call(&service, costs(tag)).await);
    }
    tokio::time::sleep_until(start + ms(3950)).await;
    calls.push(spawn_call(&service, request(Some("a"), "create")).await);
    tokio::time::sleep_until(start + ms(4020)).await;
    handle
        .set_class_quota(RequestKind::Account, Quota::per_second(1.0))
        .unwrap();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(handle.waiting(), 0);
    assert_eq!(handle.queue_bytes(), 0, "the queues are dropped");
    // Before: `k2` went behind `k3` (`k3` at 5000, `k2` at 6000).
    assert_eq!(
        &server.times_ms(start)[29..],
        [
            ("x29".into(), 2900),
            ("k0".into(), 3000),
            ("k1".into(), 3100),
            ("create".into(), 3950),
            ("k2".into(), 5000),
            ("k3".into(), 6000),
        ]
    );
}

/// Reject mode over a store that takes a class request's two turns at once, answering after a
/// round trip of 50 ms: a create takes the account's turn (one per 100 ms) at 0; `c0`, asked
/// at 10 ms, is decided at 60 ms and refused by its account for the 40 ms left, and spends no
/// class turn (one a second): `c1`, asked at 100 ms, is sent at 150 ms, its two turns taken
/// once.
#[tokio::test(start_paused = true)]
async fn reject_mode_takes_both_turns_in_one_answer_from_a_store_that_can() {
    let server = Server::new();
    let store = Store {
        both_latency: Some(ms(50)),
        ..Store::default()
    };
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .reject()
        .backend(store)
        .build()
        .unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let start = Instant::now();
    service
        .clone()
        .oneshot(request(Some("a"), "create"))
        .await
        .unwrap();
    tokio::time::advance(ms(10)).await;
    let err = service.clone().oneshot(costs("c0")).await.unwrap_err();
    let limited = err.downcast_ref::<RateLimited>().expect("RateLimited");
    assert_eq!(limited.retry_after(), ms(40), "the account's wait");
    assert_eq!(Instant::now(), start + ms(60));
    tokio::time::advance(ms(40)).await;
    service.clone().oneshot(costs("c1")).await.unwrap();
    assert_eq!(
        server.times_ms(start),
        [("create".into(), 0), ("c1".into(), 150)]
    );
    // Sent on the one answer: the account's next turn is 100 ms after `c1`'s.
    let account = BucketKey::account(Some(kling_core::AccountId::new("a")));
    let policy = handle.policy(&account);
    tokio::time::advance(ms(99)).await;
    let inner = &handle.backend().inner;
    assert!(matches!(
        inner.acquire_now(&account, &policy),
        Decision::NotBefore { .. }
    ));
    tokio::time::advance(ms(1)).await;
    assert_eq!(inner.acquire_now(&account, &policy), Decision::Admit);
    assert!(handle.backend().stopped.lock().unwrap().is_empty());
}

/// Nothing queues at 1 s, but account `a`'s class keeps a record of sends (`k0` went late, at
/// 0.9 s): a class request of account `b`, whose class sent nothing late, is decided in `call`
/// as when no record is kept, while `a`'s next one is still held until 1.9 s. One account's
/// record routes no other account's class requests through the gate.
#[tokio::test(start_paused = true)]
async fn one_accounts_class_record_leaves_other_accounts_class_requests_alone() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .backend(Store::default())
        .build()
        .unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let start = Instant::now();
    let mut calls = Vec::new();
    for i in 0..9 {
        calls.push(spawn_call(&service, request(Some("a"), &format!("x{i}"))).await);
    }
    calls.push(spawn_call(&service, costs("k0")).await);
    for call in calls {
        call.await.unwrap().unwrap();
    }
    tokio::time::advance(ms(1000) - start.elapsed()).await;
    assert_eq!(handle.waiting(), 0);
    handle.backend().noted.lock().unwrap().clear();
    let b0 = request_to("/account/costs", Some("b"), "b0");
    service.clone().oneshot(b0).await.unwrap();
    let account_b = BucketKey::account(Some(kling_core::AccountId::new("b")));
    // Before: asked through the gate (`acquire`), since `a`'s class kept a record.
    assert!(
        handle.backend().noted.lock().unwrap().contains(&account_b),
        "decided in `call`"
    );
    service.clone().oneshot(costs("k1")).await.unwrap();
    assert_eq!(
        &server.times_ms(start)[9..],
        [("k0".into(), 900), ("b0".into(), 1000), ("k1".into(), 1900)]
    );
}

/// `max_queue` counts a held class request as waiting for its class key, whose turn (at the
/// send) it waits for, and not for its account's. Account ten a second, `/account/costs` one a
/// second, at most one waiter per key: `k0` is sent late (100 ms, behind a create), so `k1`,
/// which passes its class gate at 1 s, is held until 1.1 s. Meanwhile a second costs request
/// is refused (one waits for the class already), while a create is sent at once (so `k1` goes
/// an account turn later, at 1.11 s); once `k1` is sent, a costs request waits again.
#[tokio::test(start_paused = true)]
async fn a_held_class_request_counts_against_its_class_queue_bound_only() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .max_queue(1)
        .build()
        .unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let start = Instant::now();
    service
        .clone()
        .oneshot(request(Some("a"), "x0"))
        .await
        .unwrap();
    service.clone().oneshot(costs("k0")).await.unwrap();
    tokio::time::advance(ms(1000) - start.elapsed()).await;
    let k1 = spawn_call(&service, costs("k1")).await;
    assert_eq!(handle.waiting(), 1, "held");
    tokio::time::advance(ms(10)).await;
    let err = service.clone().oneshot(costs("k2")).await.unwrap_err();
    let full = err.downcast_ref::<QueueFull>().expect("QueueFull");
    assert_eq!(full.max(), 1);
    service
        .clone()
        .oneshot(request(Some("a"), "create"))
        .await
        .unwrap();
    k1.await.unwrap().unwrap();
    tokio::time::advance(ms(100)).await;
    service.clone().oneshot(costs("k3")).await.unwrap();
    assert_eq!(
        server.times_ms(start),
        [
            ("x0".into(), 0),
            ("k0".into(), 100),
            ("create".into(), 1010),
            ("k1".into(), 1110),
            ("k3".into(), 2110),
        ]
    );
}
