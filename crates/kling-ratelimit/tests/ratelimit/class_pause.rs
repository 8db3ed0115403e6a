//! Class requests around a pause of their account: the ones that meet it go back through their
//! class gate, and keep their turn there.

use std::future::{Ready, ready};
use std::sync::Mutex;

use kling_core::RequestKind;
use kling_ratelimit::error::BackendError;
use kling_ratelimit::{
    Backend, BucketKey, Decision, Feedback, GcraLayer, InProcess, Policy, Quota,
};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

use crate::support::{Reply, Server, costs, ms, request, spawn_call};

/// The in-process backend, with a pause of every account key that the test sets, as another
/// process sharing the store would by meeting a 1302 (class keys are never paused).
#[derive(Debug, Default)]
struct FleetPause {
    inner: InProcess,
    until: Mutex<Option<Instant>>,
}

impl FleetPause {
    fn pause_until(&self, at: Instant) {
        *self.until.lock().unwrap() = Some(at);
    }
}

impl Backend for FleetPause {
    type AcquireFuture = Ready<Result<Decision, BackendError>>;
    type FeedbackFuture = <InProcess as Backend>::FeedbackFuture;

    fn acquire(&self, key: &BucketKey, policy: &Policy) -> Self::AcquireFuture {
        let until = *self.until.lock().unwrap();
        match until {
            Some(at) if key.request_kind().is_none() && at > Instant::now() => {
                ready(Ok(Decision::NotBefore { at, cooldown: true }))
            }
            _ => self.inner.acquire(key, policy),
        }
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

/// Three `/account/costs` requests queue at their one-a-second class gate; a create meets a
/// 5 s pause before the first passes it. The first passes its gate during the pause, meets it
/// and goes back to the gate: ahead of the two that came after it, not behind them.
#[tokio::test(start_paused = true)]
async fn class_requests_queued_at_their_gate_when_a_pause_begins_keep_their_order() {
    let server = Server::new();
    server.script([Reply::ok(), Reply::throttled().header("retry-after", "5")]);
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    let start = Instant::now();
    service.clone().oneshot(costs("c0")).await.unwrap();
    let mut calls = Vec::new();
    for i in 1..4 {
        calls.push(spawn_call(&service, costs(&format!("c{i}"))).await);
    }
    tokio::time::advance(ms(500)).await;
    let create = service.clone().oneshot(request(Some("a"), "create"));
    create.await.unwrap();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    // Before, c1 went last: [c2 5500, c3 6500, c1 7500].
    assert_eq!(
        server.times_ms(start),
        [
            ("c0".into(), 0),
            ("create".into(), 500),
            ("c1".into(), 5500),
            ("c2".into(), 6500),
            ("c3".into(), 7500),
        ]
    );
    assert_eq!(layer.handle().waiting(), 0);
    assert_eq!(layer.handle().queue_bytes(), 0, "the queues are dropped");
}

/// A class request waiting at its gate for its account's pause to end, which another process
/// extends meanwhile: it meets the pause again when the first end comes, and goes back to its
/// gate ahead of the class request that came after it.
#[tokio::test(start_paused = true)]
async fn a_class_request_that_meets_an_extended_pause_keeps_its_turn() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .backend(FleetPause::default())
        .build()
        .unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let start = Instant::now();
    handle.backend().pause_until(start + ms(3000));
    let first = spawn_call(&service, costs("c1")).await;
    tokio::time::advance(ms(500)).await;
    let second = spawn_call(&service, costs("c2")).await;
    tokio::time::advance(ms(500)).await;
    handle.backend().pause_until(start + ms(6000));
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    // Before, c2 went first: [c2 6000, c1 7000].
    assert_eq!(
        server.times_ms(start),
        [("c1".into(), 6000), ("c2".into(), 7000)]
    );
    assert_eq!(handle.waiting(), 0);
}

/// A class request that passed its gate and waits at its account's (paced, one every 2 s)
/// meets a pause there that another process began, and goes back to its class gate (one every
/// 3 s), where a later class request already waits for its turn as the queue's head: the one
/// that came back leads now, and the other steps back rather than asks at the same instant.
/// With `max_queue` 2, two later class requests fill the class queue: the one coming back is
/// no new arrival, and is not refused.
async fn back_at_a_busy_class_gate(later: usize) -> Vec<(String, u128)> {
    let server = Server::new();
    let mut builder = GcraLayer::builder(Quota::per_second(0.5))
        .class_quota(RequestKind::Account, Quota::per_second(1.0 / 3.0))
        .backend(FleetPause::default());
    if later > 1 {
        builder = builder.max_queue(later);
    }
    let layer = builder.build().unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let start = Instant::now();
    service
        .clone()
        .oneshot(request(Some("a"), "x0"))
        .await
        .unwrap();
    // Passes its class gate, then waits for the account until 2 s.
    let back = spawn_call(&service, costs("back")).await;
    tokio::time::advance(ms(100)).await;
    let mut calls = vec![back];
    for i in 0..later {
        // Each waits at the class gate (the first for 3 s, as its head).
        calls.push(spawn_call(&service, costs(&format!("later{i}"))).await);
    }
    tokio::time::advance(ms(900)).await;
    handle.backend().pause_until(start + ms(2500));
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(handle.waiting(), 0);
    server.times_ms(start)
}

#[tokio::test(start_paused = true)]
async fn a_class_request_back_from_its_account_leads_its_class_queue() {
    // `back` asks its class gate again at 2.5 s (the pause's end) and is told 3 s, as is
    // `later0` then: `later0` no longer leads, and lets it go first.
    assert_eq!(
        back_at_a_busy_class_gate(1).await,
        [
            ("x0".into(), 0),
            ("back".into(), 3000),
            ("later0".into(), 6000)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_class_request_back_from_its_account_is_not_refused_by_a_full_class_queue() {
    // Before, `back` failed with `QueueFull` when it came back at 2 s.
    assert_eq!(
        back_at_a_busy_class_gate(2).await,
        [
            ("x0".into(), 0),
            ("back".into(), 3000),
            ("later0".into(), 6000),
            ("later1".into(), 9000)
        ]
    );
}

/// A quota change while a class request waits for its account's pause to end at its class
/// gate does not end that wait: the request does not pass the gate during the pause (spending
/// a turn of its class quota), and is sent when the pause ends, not a class turn later.
#[tokio::test(start_paused = true)]
async fn a_quota_change_during_a_class_requests_wait_for_a_pause_keeps_it_waiting() {
    let server = Server::new();
    server.script([Reply::throttled().header("retry-after", "5")]);
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
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
    tokio::time::advance(ms(500)).await;
    let cost = spawn_call(&service, costs("c1")).await;
    tokio::time::advance(ms(4100)).await;
    handle.set_quota(Quota::per_second(20.0)).unwrap();
    cost.await.unwrap().unwrap();
    // Before, c1 passed its gate at 4.6 s, met the pause again, and was sent at 5.6 s.
    assert_eq!(
        server.times_ms(start),
        [("create".into(), 0), ("c1".into(), 5000)]
    );
}

/// Account ten a second, `/account/costs` one a second; thirty creates queue at the account
/// gate at 0 s, then two costs requests pass their class gate (at 0 s and 1 s) and queue behind
/// them, and a create follows them. With `pause`, another process pauses the account from
/// 1.5 s to 3.5 s while both costs requests are queued at its gate. When each reached the
/// server: the creates' last, the costs', the late create's.
async fn costs_queued_at_the_account_gate(pause: bool) -> (u128, Vec<u128>, u128) {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .backend(FleetPause::default())
        .build()
        .unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let start = Instant::now();
    let mut calls = Vec::new();
    for i in 0..30 {
        calls.push(spawn_call(&service, request(Some("a"), &format!("create{i}"))).await);
    }
    calls.push(spawn_call(&service, costs("k0")).await);
    calls.push(spawn_call(&service, costs("k1")).await);
    tokio::time::sleep(ms(1100)).await;
    calls.push(spawn_call(&service, request(Some("a"), "late")).await);
    if pause {
        tokio::time::sleep(ms(400)).await;
        handle.backend().pause_until(start + ms(3500));
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(handle.waiting(), 0);
    let times = server.times_ms(start);
    let at = |tag: &str| times.iter().find(|(t, _)| t == tag).unwrap().1;
    (at("create29"), vec![at("k0"), at("k1")], at("late"))
}

/// Two costs requests queued at the account gate when a pause begins are sent a class turn
/// apart after it, not one account turn apart; the create behind them does not wait for the
/// second one's class turn.
#[tokio::test(start_paused = true)]
async fn class_requests_queued_at_the_account_gate_when_a_pause_begins_keep_their_quota() {
    // Before: (4900, [5000, 5100], 5200); then, with the second held at the account's
    // head, (4900, [5000, 6000], 6100).
    assert_eq!(
        costs_queued_at_the_account_gate(true).await,
        (4900, vec![5000, 6000], 5100)
    );
}

/// The same behind a long queue at the account gate, without a pause.
#[tokio::test(start_paused = true)]
async fn class_requests_queued_behind_a_long_account_queue_keep_their_quota() {
    // Before: (2900, [3000, 3100], 3200); then (2900, [3000, 4000], 4100).
    assert_eq!(
        costs_queued_at_the_account_gate(false).await,
        (2900, vec![3000, 4000], 3100)
    );
}

/// A costs request sent late (it passed its class gate at 0 s and waited behind creates at the
/// account gate until 0.9 s), and the next one asked when nothing queues, at 1 s: its class gate
/// admits it at once, but it is sent a class turn after the first was, not 0.1 s after.
#[tokio::test(start_paused = true)]
async fn a_class_request_asked_when_nothing_queues_keeps_its_quota_after_a_late_one() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    let start = Instant::now();
    let mut calls = Vec::new();
    for i in 0..9 {
        calls.push(spawn_call(&service, request(Some("a"), &format!("create{i}"))).await);
    }
    calls.push(spawn_call(&service, costs("k0")).await);
    for call in calls {
        call.await.unwrap().unwrap();
    }
    tokio::time::advance(ms(1000) - start.elapsed()).await;
    assert_eq!(layer.handle().waiting(), 0);
    service.clone().oneshot(costs("k1")).await.unwrap();
    let times = server.times_ms(start);
    // Before: k1 at 1000.
    assert_eq!(&times[9..], [("k0".into(), 900), ("k1".into(), 1900)]);
}

/// Account ten a second, `/account/costs` one a second. A costs request `k0` waits behind nine
/// creates and is sent late, at 0.9 s; at 1 s, when nothing queues, `k1` passes its class gate
/// at once but may be sent only at 1.9 s (a class turn after `k0`), and five creates and a third
/// costs request `k2` come after it. The creates are sent at the account's rate from 1 s: they
/// do not wait at the account's gate behind `k1`, which waits for its class alone; `k2` is
/// sent a class turn after `k1`, and not before it.
#[tokio::test(start_paused = true)]
async fn a_class_request_waiting_for_its_class_does_not_hold_the_accounts_creates() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
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
    for call in calls.drain(..) {
        call.await.unwrap().unwrap();
    }
    tokio::time::advance(ms(1000) - start.elapsed()).await;
    assert_eq!(handle.waiting(), 0);
    calls.push(spawn_call(&service, costs("k1")).await);
    for i in 0..5 {
        calls.push(spawn_call(&service, request(Some("a"), &format!("create{i}"))).await);
    }
    calls.push(spawn_call(&service, costs("k2")).await);
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(handle.waiting(), 0);
    assert_eq!(handle.queue_bytes(), 0, "the queues are dropped");
    // Before: the creates at 2000..2400 ms, behind `k1` at 1900.
    assert_eq!(
        &server.times_ms(start)[9..],
        [
            ("k0".into(), 900),
            ("create0".into(), 1000),
            ("create1".into(), 1100),
            ("create2".into(), 1200),
            ("create3".into(), 1300),
            ("create4".into(), 1400),
            ("k1".into(), 1900),
            ("k2".into(), 2900),
        ]
    );
}

/// Account ten a second, `/account/costs` one a second: thirty creates queue at 0 s, then three
/// costs requests pass their class gate (at 0, 1 and 2 s) and queue behind them, and five
/// creates follow at 2.1 s. `k0` is sent at 3 s; `k1` and `k2` reach the account's head too
/// soon after it and wait for their class out of the way of the five creates, in order. With
/// `drop_first`, `k1` is dropped at 3.6 s while it waits. When each reached the server, after
/// the thirty creates.
async fn costs_waiting_for_their_class(drop_first: bool) -> Vec<(String, u128)> {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .build()
        .unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let start = Instant::now();
    let mut calls = Vec::new();
    for i in 0..30 {
        calls.push(spawn_call(&service, request(Some("a"), &format!("x{i}"))).await);
    }
    calls.push(spawn_call(&service, costs("k0")).await);
    let k1 = spawn_call(&service, costs("k1")).await;
    calls.push(spawn_call(&service, costs("k2")).await);
    tokio::time::sleep(ms(2100)).await;
    for i in 0..5 {
        calls.push(spawn_call(&service, request(Some("a"), &format!("late{i}"))).await);
    }
    if drop_first {
        tokio::time::sleep(ms(1500)).await;
        assert!(!k1.is_finished());
        k1.abort();
        assert!(k1.await.unwrap_err().is_cancelled());
    } else {
        calls.push(k1);
    }
    for call in calls {
        let sent = tokio::time::timeout(ms(60_000), call).await;
        sent.expect("sent within a minute").unwrap().unwrap();
    }
    assert_eq!(handle.waiting(), 0);
    assert_eq!(handle.queue_bytes(), 0, "the queues are dropped");
    server.times_ms(start)[30..].to_vec()
}

#[tokio::test(start_paused = true)]
async fn class_requests_waiting_for_their_class_keep_their_order() {
    // Before: k1 at 4000 and k2 at 5000 held the five creates until 5100..5500.
    assert_eq!(
        costs_waiting_for_their_class(false).await,
        [
            ("k0".into(), 3000),
            ("late0".into(), 3100),
            ("late1".into(), 3200),
            ("late2".into(), 3300),
            ("late3".into(), 3400),
            ("late4".into(), 3500),
            ("k1".into(), 4000),
            ("k2".into(), 5000),
        ]
    );
}

/// The first of the costs requests waiting for their class is dropped: the next goes when the
/// class allows.
#[tokio::test(start_paused = true)]
async fn a_class_request_dropped_while_it_waits_for_its_class_lets_the_next_go() {
    assert_eq!(
        costs_waiting_for_their_class(true).await,
        [
            ("k0".into(), 3000),
            ("late0".into(), 3100),
            ("late1".into(), 3200),
            ("late2".into(), 3300),
            ("late3".into(), 3400),
            ("late4".into(), 3500),
            ("k2".into(), 4000),
        ]
    );
}

/// An account one request per 10 s with a queue of two, `/account/costs` one per 3 s. A costs
/// request passes its class gate at 0.1 s, meets the account's pause (a 1302 asking for 2 s)
/// and goes back to its class gate; meanwhile two creates fill the account's queue. When it
/// passes its class gate again, at 3.1 s, it joins the account's queue though it is full: it
/// was waiting already, since before the creates it now queues behind.
#[tokio::test(start_paused = true)]
async fn a_class_request_back_from_a_paused_account_is_not_refused_by_its_full_queue() {
    let server = Server::new();
    server.script([Reply::throttled().header("retry-after", "2")]);
    let layer = GcraLayer::builder(Quota::with_period(ms(10_000)))
        .class_quota(RequestKind::Account, Quota::with_period(ms(3000)))
        .max_queue(2)
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
    tokio::time::advance(ms(100)).await;
    let back = spawn_call(&service, costs("back")).await;
    tokio::time::advance(ms(100)).await;
    let c1 = spawn_call(&service, request(Some("a"), "c1")).await;
    let c2 = spawn_call(&service, request(Some("a"), "c2")).await;
    let err = service
        .clone()
        .oneshot(request(Some("a"), "c3"))
        .await
        .unwrap_err();
    assert!(err.is::<kling_ratelimit::error::QueueFull>(), "{err:?}");
    // Before, `back` failed with `QueueFull` at 3.1 s.
    back.await.unwrap().unwrap();
    for call in [c1, c2] {
        call.await.unwrap().unwrap();
    }
    assert_eq!(handle.waiting(), 0);
    assert_eq!(
        server.times_ms(start),
        [
            ("x0".into(), 0),
            ("c1".into(), 10_000),
            ("c2".into(), 20_000),
            ("back".into(), 30_000),
        ]
    );
}

/// An account one request per 10 s with a queue of one, `/account/costs` one a minute. A
/// costs request that finds the account's queue full fails with `QueueFull` before it asks its
/// class gate, so it spends no class turn: the next costs request, once the account's queue
/// has room, is sent at its account turn rather than a minute after the refused one.
#[tokio::test(start_paused = true)]
async fn a_class_request_refused_by_a_full_account_queue_spends_no_class_turn() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::with_period(ms(10_000)))
        .class_quota(RequestKind::Account, Quota::with_period(ms(60_000)))
        .max_queue(1)
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    let start = Instant::now();
    service
        .clone()
        .oneshot(request(Some("a"), "x0"))
        .await
        .unwrap();
    let c1 = spawn_call(&service, request(Some("a"), "c1")).await;
    tokio::time::advance(ms(100)).await;
    let err = service.clone().oneshot(costs("k1")).await.unwrap_err();
    let full = err
        .downcast_ref::<kling_ratelimit::error::QueueFull>()
        .expect("QueueFull");
    assert_eq!(full.max(), 1);
    c1.await.unwrap().unwrap();
    tokio::time::advance(ms(100)).await;
    service.clone().oneshot(costs("k2")).await.unwrap();
    // Before, k1 took the class turn at 0.1 s and k2 waited for the next, at 60.1 s.
    assert_eq!(
        server.times_ms(start),
        [
            ("x0".into(), 0),
            ("c1".into(), 10_000),
            ("k2".into(), 20_000),
        ]
    );
}

/// Account ten a second, `/account/costs` one a second; thirty creates queue at the account
/// gate at 0 s, then `k0` (passing its class gate at 0 s), a create `x` (0.5 s) and `k1`
/// (passing at 1 s) queue behind them. Another process pauses the account from 2.95 s to 5 s,
/// so `k0` meets the pause when it comes to lead, at 3 s, with `x` and `k1` behind it. When
/// each of the last four reached the server.
async fn class_head_meets_a_pause_with_others_behind() -> Vec<(String, u128)> {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .backend(FleetPause::default())
        .build()
        .unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let start = Instant::now();
    let mut calls = Vec::new();
    for i in 0..30 {
        calls.push(spawn_call(&service, request(Some("a"), &format!("create{i}"))).await);
    }
    calls.push(spawn_call(&service, costs("k0")).await);
    tokio::time::sleep(ms(500)).await;
    calls.push(spawn_call(&service, request(Some("a"), "x")).await);
    tokio::time::sleep(ms(500)).await;
    calls.push(spawn_call(&service, costs("k1")).await);
    tokio::time::sleep_until(start + ms(2950)).await;
    handle.backend().pause_until(start + ms(5000));
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(handle.waiting(), 0);
    server.times_ms(start).split_off(29)
}

/// A class request that meets its account's pause at the head of the account's queue, with
/// others queued behind it, keeps its place there: it goes at the pause's end, before the
/// create and the class request that came after it. Before, it went back to its class gate
/// and joined the account's queue again behind them: `k1`, which passed the class gate a
/// second after `k0`, was sent a class turn before it.
#[tokio::test(start_paused = true)]
async fn a_class_request_meeting_a_pause_with_others_queued_behind_keeps_its_place() {
    // Before: [create29 2900, x 5000, k1 5100, k0 6100].
    assert_eq!(
        class_head_meets_a_pause_with_others_behind().await,
        [
            ("create29".into(), 2900),
            ("k0".into(), 5000),
            ("x".into(), 5100),
            ("k1".into(), 6000),
        ]
    );
}
