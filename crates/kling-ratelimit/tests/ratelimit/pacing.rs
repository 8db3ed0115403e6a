//! Pacing: never early, never late, FIFO, cancellation, bounds, modes, keys, run-time changes.

use std::time::Duration;

use kling_core::signals::{Deadline, Waited};
use kling_core::{AccountId, RequestKind};
use kling_ratelimit::error::{QueueFull, RateLimited, WaitExceeded, WaitLimit};
use kling_ratelimit::{GcraLayer, Quota};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

use crate::support::{
    Reply, Server, class_gated, costs, ms, request, request_to, send, spawn_call,
};

#[tokio::test(start_paused = true)]
async fn requests_are_never_earlier_than_the_quota_allows() {
    let server = Server::new();
    let service = GcraLayer::new(Quota::per_second(4.0))
        .unwrap()
        .layer(server.service());
    let start = Instant::now();
    let mut calls = Vec::new();
    for i in 0..6 {
        calls.push(spawn_call(&service, request(Some("a"), &i.to_string())).await);
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let times: Vec<u128> = server.times_ms(start).into_iter().map(|(_, t)| t).collect();
    assert_eq!(times, vec![0, 250, 500, 750, 1000, 1250]);
}

#[tokio::test(start_paused = true)]
async fn an_idle_key_waits_only_for_what_is_still_owed() {
    let server = Server::new();
    let service = GcraLayer::new(Quota::per_second(1.0))
        .unwrap()
        .layer(server.service());
    let start = Instant::now();
    service
        .clone()
        .oneshot(request(Some("a"), "first"))
        .await
        .unwrap();
    // After a full interval of silence the next request goes at once …
    tokio::time::sleep(Duration::from_secs(3)).await;
    let response = service
        .clone()
        .oneshot(request(Some("a"), "idle"))
        .await
        .unwrap();
    assert!(
        response.extensions().get::<Waited>().is_none(),
        "no wait recorded"
    );
    // … and 300 ms after that one it waits exactly the remaining 700 ms.
    tokio::time::sleep(ms(300)).await;
    let response = service
        .clone()
        .oneshot(request(Some("a"), "owed"))
        .await
        .unwrap();
    assert_eq!(
        response.extensions().get::<Waited>().unwrap().rate_limit,
        ms(700)
    );
    assert_eq!(
        server.times_ms(start),
        vec![
            ("first".into(), 0),
            ("idle".into(), 3000),
            ("owed".into(), 4000)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_burst_goes_at_once_then_the_rate_holds() {
    let server = Server::new();
    let layer = GcraLayer::new(Quota::per_second(2.0).with_burst(3)).unwrap();
    let service = layer.layer(server.service());
    let start = Instant::now();
    let mut calls = Vec::new();
    for i in 0..5 {
        calls.push(spawn_call(&service, request(None, &i.to_string())).await);
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let times: Vec<u128> = server.times_ms(start).into_iter().map(|(_, t)| t).collect();
    assert_eq!(times, vec![0, 0, 0, 500, 1000]);
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_first_come_first_served() {
    let server = Server::new();
    let layer = GcraLayer::new(Quota::per_second(10.0)).unwrap();
    // Several services and clones of the same layer share one queue.
    let one = layer.layer(server.service());
    let two = layer.layer(server.service());
    let mut calls = Vec::new();
    let mut expected = Vec::new();
    for i in 0..30 {
        let tag = format!("{i:02}");
        let service = if i % 3 == 0 { &one } else { &two };
        calls.push(spawn_call(service, request(Some("a"), &tag)).await);
        expected.push(tag);
    }
    assert_eq!(layer.handle().queue_depth(Some(&AccountId::new("a"))), 29);
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(server.tags(), expected);
    assert_eq!(layer.handle().waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_request_gives_its_place_up() {
    let server = Server::new();
    let layer = GcraLayer::new(Quota::per_second(1.0)).unwrap();
    let service = layer.layer(server.service());
    let start = Instant::now();
    let first = spawn_call(&service, request(None, "first")).await;
    let head = spawn_call(&service, request(None, "head")).await;
    let middle = spawn_call(&service, request(None, "middle")).await;
    let last = spawn_call(&service, request(None, "last")).await;
    assert_eq!(layer.handle().waiting(), 3);
    // The head (sleeping until 1 s) and a waiter in the middle give up.
    head.abort();
    middle.abort();
    tokio::task::yield_now().await;
    assert_eq!(layer.handle().waiting(), 1);
    first.await.unwrap().unwrap();
    last.await.unwrap().unwrap();
    assert_eq!(
        server.times_ms(start),
        vec![("first".into(), 0), ("last".into(), 1000)]
    );
    assert_eq!(layer.handle().waiting(), 0);
    assert_eq!(layer.handle().queue_bytes(), 0, "an empty queue is dropped");
}

#[tokio::test(start_paused = true)]
async fn keys_are_independent_and_a_key_fn_replaces_the_account() {
    let server = Server::new();
    let service = GcraLayer::new(Quota::per_second(1.0))
        .unwrap()
        .layer(server.service());
    let start = Instant::now();
    let mut calls = Vec::new();
    for (account, tag) in [("a", "a1"), ("b", "b1"), ("a", "a2"), ("b", "b2")] {
        calls.push(spawn_call(&service, request(Some(account), tag)).await);
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let accounts: Vec<_> = server.hits().into_iter().map(|h| h.account).collect();
    assert!(
        accounts.iter().all(|a| a.is_some()),
        "the account extension reaches the server"
    );
    let mut times = server.times_ms(start);
    times.sort();
    assert_eq!(
        times,
        vec![
            ("a1".into(), 0),
            ("a2".into(), 1000),
            ("b1".into(), 0),
            ("b2".into(), 1000)
        ]
    );

    // A key function that counts everything under one tenant, whatever the account says.
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(1.0))
        .key_fn(|parts| {
            parts
                .headers
                .get("x-tenant")
                .map(|v| AccountId::new(v.to_str().unwrap()))
        })
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    let start = Instant::now();
    let mut a = request(Some("a"), "a");
    a.headers_mut().insert("x-tenant", "t".parse().unwrap());
    let mut b = request(Some("b"), "b");
    b.headers_mut().insert("x-tenant", "t".parse().unwrap());
    let a = spawn_call(&service, a).await;
    let b = spawn_call(&service, b).await;
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(
        server.times_ms(start),
        vec![("a".into(), 0), ("b".into(), 1000)]
    );
}

#[tokio::test(start_paused = true)]
async fn reject_mode_fails_fast_with_the_wait() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(2.0))
        .reject()
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    service.clone().oneshot(request(None, "1")).await.unwrap();
    let err = service
        .clone()
        .oneshot(request(None, "2"))
        .await
        .unwrap_err();
    let limited = err.downcast_ref::<RateLimited>().expect("RateLimited");
    assert_eq!(limited.retry_after(), ms(500));
    assert!(!limited.in_cooldown());
    assert_eq!(
        err.to_string(),
        "rate limited: key over its quota, retry after 500ms"
    );
    tokio::time::advance(ms(500)).await;
    service.clone().oneshot(request(None, "3")).await.unwrap();
    assert_eq!(server.tags(), vec!["1", "3"]);
}

/// Reject mode's refusal names the account refused, as a wait refused in wait mode does: a
/// gateway that rejects for many accounts logs which one is over its quota or paused.
#[tokio::test(start_paused = true)]
async fn reject_mode_names_the_account_refused() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(2.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .reject()
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    send(&service, request(Some("b"), "b1")).await.unwrap();
    let err = send(&service, request(Some("b"), "b2")).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "rate limited: account b over its quota, retry after 500ms"
    );
    let limited = err.downcast_ref::<RateLimited>().expect("RateLimited");
    assert_eq!(limited.account().map(|a| a.as_str()), Some("b"));
    // Paused after a 1302: a class request is refused naming its account too.
    tokio::time::advance(ms(500)).await;
    server.script([Reply::throttled()]);
    send(&service, request(Some("b"), "b3")).await.unwrap();
    let costs = request_to("/account/costs", Some("b"), "b4");
    let err = send(&service, costs).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "rate limited: account b paused after a throttling response, retry after 1s"
    );
    // Another account is not paused.
    send(&service, request(Some("c"), "c1")).await.unwrap();
    assert_eq!(server.tags(), vec!["b1", "b3", "c1"]);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_and_a_long_wait_become_typed_errors() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(1.0))
        .max_queue(2)
        .max_wait(ms(1500))
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    let start = Instant::now();
    let first = spawn_call(&service, request(Some("a"), "first")).await;
    let second = spawn_call(&service, request(Some("a"), "second")).await;
    let third = spawn_call(&service, request(Some("a"), "third")).await;
    // Two wait; the next one finds the queue full.
    let err = service
        .clone()
        .oneshot(request(Some("a"), "fourth"))
        .await
        .unwrap_err();
    let full = err.downcast_ref::<QueueFull>().expect("QueueFull");
    assert_eq!(
        (full.max(), full.account().map(AccountId::as_str)),
        (2, Some("a"))
    );
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    // The third would go at 2 s, past its 1.5 s maximum wait.
    let err = third.await.unwrap().unwrap_err();
    let exceeded = err.downcast_ref::<WaitExceeded>().expect("WaitExceeded");
    assert_eq!(exceeded.limit(), WaitLimit::MaxWait);
    assert_eq!(exceeded.resume_at(), start + ms(2000));
    assert_eq!(server.tags(), vec!["first", "second"]);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_bounds_the_wait() {
    let server = Server::new();
    let service = GcraLayer::new(Quota::per_second(1.0))
        .unwrap()
        .layer(server.service());
    let start = Instant::now();
    service
        .clone()
        .oneshot(request(None, "first"))
        .await
        .unwrap();
    let mut late = request(None, "late");
    late.extensions_mut().insert(Deadline(start + ms(400)));
    let err = service.clone().oneshot(late).await.unwrap_err();
    let exceeded = err.downcast_ref::<WaitExceeded>().expect("WaitExceeded");
    assert_eq!(exceeded.limit(), WaitLimit::Deadline);
    assert_eq!(exceeded.resume_at(), start + ms(1000));
    assert_eq!(
        Instant::now(),
        start,
        "it failed at once instead of sleeping"
    );
    let mut fine = request(None, "fine");
    fine.extensions_mut().insert(Deadline(start + ms(1000)));
    service.clone().oneshot(fine).await.unwrap();
    assert_eq!(server.tags(), vec!["first", "fine"]);
}

#[tokio::test(start_paused = true)]
async fn a_class_quota_applies_on_top_of_the_account_quota() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    let start = Instant::now();
    let mut calls = Vec::new();
    for i in 0..3 {
        calls.push(
            spawn_call(
                &service,
                request_to("/account/costs", Some("a"), &format!("costs{i}")),
            )
            .await,
        );
        calls.push(spawn_call(&service, request(Some("a"), &format!("create{i}"))).await);
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let times = server.times_ms(start);
    let costs: Vec<u128> = times
        .iter()
        .filter(|(t, _)| t.starts_with("costs"))
        .map(|(_, t)| *t)
        .collect();
    let creates: Vec<u128> = times
        .iter()
        .filter(|(t, _)| t.starts_with("create"))
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(costs, vec![0, 1000, 2000]);
    assert_eq!(creates, vec![100, 200, 300]);
    assert_eq!(
        layer.handle().class_quota(RequestKind::Account),
        Some(Quota::per_second(1.0))
    );
    assert!(
        layer
            .handle()
            .set_class_quota(RequestKind::Query, Quota::per_second(1.0))
            .is_err()
    );
}

/// Four `/account/costs` requests a second apart during a 5 s pause of their account (class
/// quota one a second, account ten), and one create of the account, sent before them
/// (waiting out the pause at the head of the account's queue) or after them: when each cost
/// and the create reached the server.
async fn costs_during_a_pause(create_first: bool) -> (Vec<u128>, u128) {
    let server = Server::new();
    server.script([Reply::throttled().header("retry-after", "5")]);
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    let start = Instant::now();
    service
        .clone()
        .oneshot(request(Some("a"), "create0"))
        .await
        .unwrap();
    let mut calls = Vec::new();
    if create_first {
        calls.push(spawn_call(&service, request(Some("a"), "create1")).await);
    }
    for i in 0..4 {
        tokio::time::advance(ms(500)).await;
        let costs = request_to("/account/costs", Some("a"), &format!("costs{i}"));
        calls.push(spawn_call(&service, costs).await);
        tokio::time::advance(ms(500)).await;
    }
    if !create_first {
        calls.push(spawn_call(&service, request(Some("a"), "create1")).await);
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let times = server.times_ms(start);
    let costs = times
        .iter()
        .filter(|(t, _)| t.starts_with("costs"))
        .map(|(_, t)| *t)
        .collect();
    let create1 = times.iter().find(|(t, _)| t == "create1").unwrap().1;
    (costs, create1)
}

/// Class requests that pass their gate while the account is paused go back through it when the
/// pause ends: their class quota spaces their sending, not only their passing of its gate.
/// Without going back, all four went within 400 ms of the pause's end.
#[tokio::test(start_paused = true)]
async fn class_requests_that_meet_an_account_pause_pass_their_gate_again_after_it() {
    // The first cost passes its class gate at 5000 ms and waits one account turn behind
    // `create1`, which came to the account's gate first (at 4000 ms, its queue empty); the
    // others are sent a class turn after it (before, at 6000 ms: 900 ms after it).
    assert_eq!(
        costs_during_a_pause(false).await,
        (vec![5100, 6100, 7100, 8100], 5000)
    );
}

/// The same when the pause is met not by asking the account but by finding its queue's head
/// waiting it out.
#[tokio::test(start_paused = true)]
async fn class_requests_behind_an_account_waiting_out_a_pause_pass_their_gate_again_after_it() {
    assert_eq!(
        costs_during_a_pause(true).await,
        (vec![5100, 6100, 7100, 8100], 5000)
    );
}

/// A class request queued behind one that waits out its account's pause at the head of its
/// class queue fails at once when the pause ends past its deadline: it cannot go before the
/// head. (It failed when it came to the head, 500 ms later here, or at its deadline had the
/// head not given up.)
#[tokio::test(start_paused = true)]
async fn a_class_request_whose_deadline_comes_before_the_account_pause_ends_fails_at_once() {
    let server = Server::new();
    server.script([Reply::throttled().header("retry-after", "5")]);
    let layer = class_gated().build().unwrap();
    let service = layer.layer(server.service());
    let start = Instant::now();
    send(&service, costs("c0")).await.unwrap();
    tokio::time::advance(ms(1000)).await;
    // Passes its class gate, meets the pause and waits for its end at the class queue's head.
    let first = spawn_call(&service, costs("c1")).await;
    let mut late = costs("c2");
    late.extensions_mut().insert(Deadline(start + ms(4000)));
    let err = send(&service, late).await.unwrap_err();
    let exceeded = err.downcast_ref::<WaitExceeded>().expect("WaitExceeded");
    assert!(exceeded.in_cooldown());
    assert!(exceeded.was_queued());
    assert_eq!(exceeded.resume_at(), start + ms(5000));
    assert_eq!(Instant::now(), start + ms(1000), "it failed as it queued");
    first.abort();
    let _ = first.await;
    assert_eq!(server.tags(), vec!["c0"]);
}

/// A class request that comes to the head of its class queue while the account's pause is
/// noted there waits for the pause's end, and fails at once when that is past its deadline:
/// here it queued behind a head paced by the class quota, which then met the pause and gave
/// up.
#[tokio::test(start_paused = true)]
async fn a_class_request_that_comes_to_the_head_during_a_pause_past_its_deadline_fails_at_once() {
    let server = Server::new();
    server.script([Reply::ok(), Reply::throttled().header("retry-after", "5")]);
    let layer = class_gated().build().unwrap();
    let service = layer.layer(server.service());
    let start = Instant::now();
    send(&service, costs("c0")).await.unwrap();
    // Both wait for the class's next turn, at 1000 ms.
    let first = spawn_call(&service, costs("c1")).await;
    let mut late = costs("c2");
    late.extensions_mut().insert(Deadline(start + ms(4000)));
    let late = spawn_call(&service, late).await;
    // A create meets a 1302 asking for 5 s: the account is paused until 5100 ms.
    tokio::time::advance(ms(100)).await;
    send(&service, request(Some("a"), "x1")).await.unwrap();
    // c1 passes its class gate at 1000 ms, meets the pause and waits it out at the head.
    tokio::time::advance(ms(1400)).await;
    first.abort();
    let _ = first.await;
    let err = late.await.unwrap().unwrap_err();
    let exceeded = err.downcast_ref::<WaitExceeded>().expect("WaitExceeded");
    assert!(exceeded.in_cooldown());
    assert!(!exceeded.was_queued());
    assert_eq!(exceeded.resume_at(), start + ms(5100));
    assert_eq!(
        Instant::now(),
        start + ms(1500),
        "it failed when it came to the head"
    );
    assert_eq!(server.tags(), vec!["c0", "x1"]);
}

/// The class gate and then the account gate, both decided in `call` when nothing queues: a
/// refusal at either is the request's, and a class refusal takes nothing from the account.
#[tokio::test(start_paused = true)]
async fn reject_mode_checks_the_class_then_the_account() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .reject()
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    let costs = |tag: &str| request_to("/account/costs", Some("a"), tag);
    service.clone().oneshot(costs("c0")).await.unwrap();
    tokio::time::advance(ms(200)).await;
    // The account (one per 100 ms) would admit it; the class (one per second) does not.
    let err = service.clone().oneshot(costs("c1")).await.unwrap_err();
    let limited = err.downcast_ref::<RateLimited>().expect("RateLimited");
    assert_eq!(limited.retry_after(), ms(800));
    // The refused class request took no account turn.
    service
        .clone()
        .oneshot(request(Some("a"), "create0"))
        .await
        .unwrap();
    tokio::time::advance(ms(800)).await;
    service.clone().oneshot(costs("c2")).await.unwrap();
    // The class admits (a tenth of its interval later) but the account is spent.
    tokio::time::advance(ms(10)).await;
    let layer = GcraLayer::builder(Quota::per_second(1.0))
        .class_quota(RequestKind::Account, Quota::per_second(10.0))
        .reject()
        .build()
        .unwrap();
    let strict = layer.layer(server.service());
    strict
        .clone()
        .oneshot(request(Some("a"), "create1"))
        .await
        .unwrap();
    let err = strict.clone().oneshot(costs("c3")).await.unwrap_err();
    let limited = err.downcast_ref::<RateLimited>().expect("RateLimited");
    assert_eq!(limited.retry_after(), ms(1000));
    assert_eq!(server.tags(), vec!["c0", "create0", "c2", "create1"]);
}

/// Reject mode: a class request its account refuses spends no class turn. A create takes the
/// account's turn (one per 100 ms) at 0; `c0` at 50 ms passes its class (one a second) but
/// not its account, and is refused for 50 ms; `c1` at 100 ms is sent, and the class turn it
/// took holds `c2` back.
#[tokio::test(start_paused = true)]
async fn reject_mode_spends_no_class_turn_on_a_request_its_account_refuses() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .reject()
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    let costs = |tag: &str| request_to("/account/costs", Some("a"), tag);
    let start = Instant::now();
    service
        .clone()
        .oneshot(request(Some("a"), "create"))
        .await
        .unwrap();
    tokio::time::advance(ms(50)).await;
    let err = service.clone().oneshot(costs("c0")).await.unwrap_err();
    let limited = err.downcast_ref::<RateLimited>().expect("RateLimited");
    assert_eq!(limited.retry_after(), ms(50), "the account's wait");
    assert!(!limited.in_cooldown());
    tokio::time::advance(ms(50)).await;
    // Before: refused for 950 ms, the class turn spent on `c0`.
    service.clone().oneshot(costs("c1")).await.unwrap();
    tokio::time::advance(ms(100)).await;
    let err = service.clone().oneshot(costs("c2")).await.unwrap_err();
    let limited = err.downcast_ref::<RateLimited>().expect("RateLimited");
    assert_eq!(
        limited.retry_after(),
        ms(900),
        "the class's wait after `c1`"
    );
    assert_eq!(
        server.times_ms(start),
        [("create".into(), 0), ("c1".into(), 100)]
    );
}

/// A test backend's answer to an ask, boxed.
type BoxedAnswer = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<kling_ratelimit::Decision, kling_ratelimit::error::BackendError>,
            > + Send,
    >,
>;

/// The in-process backend whose answers, once `hold` is set, come only when `release` is
/// notified (decided when asked, as a remote store decides before its answer travels back).
#[derive(Debug, Clone, Default)]
struct HeldAnswers {
    inner: std::sync::Arc<kling_ratelimit::InProcess>,
    hold: std::sync::Arc<std::sync::atomic::AtomicBool>,
    release: std::sync::Arc<tokio::sync::Notify>,
}

impl kling_ratelimit::Backend for HeldAnswers {
    type AcquireFuture = BoxedAnswer;
    type FeedbackFuture = <kling_ratelimit::InProcess as kling_ratelimit::Backend>::FeedbackFuture;

    fn acquire(
        &self,
        key: &kling_ratelimit::BucketKey,
        policy: &kling_ratelimit::Policy,
    ) -> Self::AcquireFuture {
        let decided = self.inner.acquire(key, policy);
        let held = self.hold.load(std::sync::atomic::Ordering::SeqCst);
        let release = self.release.clone();
        Box::pin(async move {
            let decision = decided.await;
            if held {
                release.notified().await;
            }
            decision
        })
    }

    fn feedback(
        &self,
        key: &kling_ratelimit::BucketKey,
        policy: &kling_ratelimit::Policy,
        feedback: kling_ratelimit::Feedback,
    ) -> Self::FeedbackFuture {
        self.inner.feedback(key, policy, feedback)
    }
}

/// A quota change made while a waiting request's answer is on its way (decided under the old
/// quota): the request asks again under the new one rather than sleeping until the old
/// quota's instant.
#[tokio::test(start_paused = true)]
async fn a_quota_change_during_an_answer_in_flight_is_followed() {
    let server = Server::new();
    let backend = HeldAnswers::default();
    let layer = GcraLayer::builder(Quota::per_minute(1.0))
        .backend(backend.clone())
        .build()
        .unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let start = Instant::now();
    service
        .clone()
        .oneshot(request(None, "first"))
        .await
        .unwrap();
    backend
        .hold
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let second = spawn_call(&service, request(None, "second")).await;
    tokio::time::sleep(ms(100)).await;
    handle.set_quota(Quota::per_second(1.0)).unwrap();
    backend
        .hold
        .store(false, std::sync::atomic::Ordering::SeqCst);
    backend.release.notify_one();
    second.await.unwrap().unwrap();
    let sent = server.times_ms(start);
    assert_eq!(sent[1].0, "second");
    // The owed part of the 1/min interval, at 1/s: under a second after the change.
    assert!(
        sent[1].1 < 1_200,
        "sent at {} ms, not at the old 60 s",
        sent[1].1
    );
}

#[tokio::test(start_paused = true)]
async fn a_quota_change_reaches_requests_already_waiting() {
    let server = Server::new();
    let layer = GcraLayer::new(Quota::per_minute(1.0)).unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let start = Instant::now();
    let first = spawn_call(&service, request(None, "first")).await;
    let second = spawn_call(&service, request(None, "second")).await;
    let third = spawn_call(&service, request(None, "third")).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        server.tags() == vec!["first"],
        "the second still waits for the 60 s slot"
    );
    handle.set_quota(Quota::per_second(1.0)).unwrap();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    third.await.unwrap().unwrap();
    // The 50 s still owed at 1/min are 50/60 of an interval, 834 ms at 1/s.
    assert_eq!(
        server.times_ms(start),
        vec![
            ("first".into(), 0),
            ("second".into(), 10_834),
            ("third".into(), 11_834)
        ]
    );
    assert!(handle.set_quota(Quota::per_second(-1.0)).is_err());
}

#[tokio::test]
async fn invalid_configuration_names_the_field() {
    let err = GcraLayer::new(Quota::per_minute(0.0)).unwrap_err();
    assert_eq!(err.field(), "quota.rate");
    assert_eq!(
        err.to_string(),
        "invalid rate limit configuration: quota.rate must be a positive, finite number"
    );
    let err = GcraLayer::builder(Quota::per_minute(1.0))
        .max_queue(0)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "layer.max_queue");
    let err = GcraLayer::builder(Quota::per_minute(1.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0).with_burst(0))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "class_quota.burst");
    // A cooldown past a year (here, past the clock's range) would panic at the first 1302.
    let err = GcraLayer::builder(Quota::per_minute(1.0))
        .cooldown(kling_ratelimit::Cooldown::new().window(Duration::MAX))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "cooldown.window");
}

/// How a request asked the [`Recording`] backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ask {
    /// [`kling_ratelimit::Backend::acquire`]: a first ask, in wait mode.
    First,
    /// [`kling_ratelimit::Backend::acquire_or_refuse`]: reject mode.
    OrRefuse,
    /// [`kling_ratelimit::Backend::acquire_waiting`], saying since when.
    Waiting(Instant),
}

/// The in-process backend, recording how each request asked: plainly, or saying since when it
/// had waited ([`kling_ratelimit::Backend::acquire_waiting`]). Its answers may be held back
/// (`hold`: pending, as a remote store's are on the way) or fail (`fail`).
#[derive(Debug, Default)]
struct Recording {
    inner: kling_ratelimit::InProcess,
    asks: std::sync::Mutex<Vec<Ask>>,
    /// When the layer said its process stopped waiting for account `a`.
    stopped: std::sync::Mutex<Vec<Instant>>,
    hold: std::sync::atomic::AtomicBool,
    fail: std::sync::atomic::AtomicBool,
}

impl Recording {
    fn answer(
        &self,
        ask: Ask,
        key: &kling_ratelimit::BucketKey,
        policy: &kling_ratelimit::Policy,
    ) -> <Self as kling_ratelimit::Backend>::AcquireFuture {
        use std::sync::atomic::Ordering::Relaxed;
        self.asks.lock().unwrap().push(ask);
        if self.hold.load(Relaxed) {
            return Box::pin(std::future::pending());
        }
        if self.fail.load(Relaxed) {
            return Box::pin(std::future::ready(Err(
                kling_ratelimit::error::BackendError::protocol("refused by the test"),
            )));
        }
        Box::pin(kling_ratelimit::Backend::acquire(&self.inner, key, policy))
    }
}

impl kling_ratelimit::Backend for Recording {
    type AcquireFuture = BoxedAnswer;
    type FeedbackFuture = <kling_ratelimit::InProcess as kling_ratelimit::Backend>::FeedbackFuture;

    fn acquire(
        &self,
        key: &kling_ratelimit::BucketKey,
        policy: &kling_ratelimit::Policy,
    ) -> Self::AcquireFuture {
        self.answer(Ask::First, key, policy)
    }

    fn acquire_or_refuse(
        &self,
        key: &kling_ratelimit::BucketKey,
        policy: &kling_ratelimit::Policy,
        _decided_at: &mut Option<Instant>,
    ) -> Self::AcquireFuture {
        self.answer(Ask::OrRefuse, key, policy)
    }

    fn acquire_waiting(
        &self,
        key: &kling_ratelimit::BucketKey,
        policy: &kling_ratelimit::Policy,
        since: Instant,
    ) -> Self::AcquireFuture {
        self.answer(Ask::Waiting(since), key, policy)
    }

    fn stop_waiting(&self, key: &kling_ratelimit::BucketKey) {
        assert_eq!(key.account_id().map(AccountId::as_str), Some("a"));
        self.stopped.lock().unwrap().push(Instant::now());
    }

    fn feedback(
        &self,
        key: &kling_ratelimit::BucketKey,
        policy: &kling_ratelimit::Policy,
        feedback: kling_ratelimit::Feedback,
    ) -> Self::FeedbackFuture {
        self.inner.feedback(key, policy, feedback)
    }
}

/// A request sent through the layer, running on its own task.
type Sent = tokio::task::JoinHandle<Result<crate::support::Res, kling_core::BoxError>>;

/// A layer at 10 requests a second over a [`Recording`] backend (waiting at most `max_wait`),
/// with `tags` sent through it in that order at the start (account `a`).
async fn recorded(
    max_wait: Option<Duration>,
    tags: &[&str],
) -> (Server, GcraLayer<Recording>, Instant, Vec<Sent>) {
    let server = Server::new();
    let mut builder = GcraLayer::builder(Quota::per_second(10.0)).backend(Recording::default());
    if let Some(max) = max_wait {
        builder = builder.max_wait(max);
    }
    let layer = builder.build().unwrap();
    let service = layer.layer(server.service());
    let start = Instant::now();
    let mut calls = Vec::new();
    for tag in tags {
        calls.push(spawn_call(&service, request(Some("a"), tag)).await);
    }
    (server, layer, start, calls)
}

/// A request that has waited tells the backend since when, every time it asks again: a store
/// several processes share can then serve their waiting requests in that order.
#[tokio::test(start_paused = true)]
async fn a_waiting_request_asks_saying_since_when_it_has_waited() {
    let (server, layer, start, calls) = recorded(None, &["a1", "a2", "a3"]).await;
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(server.tags(), ["a1", "a2", "a3"]);
    // Each request asks plainly at most once, on arrival; a2 and a3 then ask again from the
    // head of the queue, each saying it has waited since it arrived (all at `start`: time is
    // paused).
    let asks = layer.handle().backend().asks.lock().unwrap().clone();
    assert!(
        asks.iter().filter(|a| **a == Ask::First).count() <= 3,
        "{asks:?}"
    );
    let waiting: Vec<Instant> = asks
        .iter()
        .filter_map(|a| match a {
            Ask::Waiting(since) => Some(*since),
            _ => None,
        })
        .collect();
    assert!(waiting.len() >= 2, "{asks:?}");
    assert!(waiting.iter().all(|&since| since == start), "{asks:?}");
}

/// The backend hears that a process stopped waiting for a key only when the last request that
/// waited for it gives up: not when one is admitted, nor when one gives up with others still
/// waiting behind it.
#[tokio::test(start_paused = true)]
async fn the_last_waiting_request_to_give_up_tells_the_backend() {
    let (server, layer, start, calls) = recorded(None, &["a1", "a2", "a3", "a4"]).await;
    let stopped = || layer.handle().backend().stopped.lock().unwrap().clone();
    // a1 went at once, a2 at 100 ms; a3 has asked as the head since, a4 waits behind it.
    tokio::time::sleep_until(start + ms(150)).await;
    assert_eq!(server.tags(), ["a1", "a2"]);
    calls[2].abort();
    tokio::time::sleep_until(start + ms(170)).await;
    assert!(stopped().is_empty(), "a4 still waits");
    // a4 is the head now, and has asked; it gives up too, and nothing of `a` waits.
    calls[3].abort();
    tokio::time::sleep_until(start + ms(180)).await;
    assert_eq!(stopped(), [start + ms(170)]);
    assert_eq!(server.tags(), ["a1", "a2"]);
}

/// A request whose wait limit would pass gives up the same way.
#[tokio::test(start_paused = true)]
async fn a_waiting_request_past_its_limit_tells_the_backend_too() {
    let (server, layer, start, calls) = recorded(Some(ms(150)), &["a1", "a2", "a3"]).await;
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.unwrap());
    }
    // a3 asked as the head at 100 ms and was told 200 ms, past its limit at 150 ms.
    let error = results[2].as_ref().unwrap_err();
    assert!(error.is::<WaitExceeded>(), "{error}");
    assert_eq!(
        *layer.handle().backend().stopped.lock().unwrap(),
        [start + ms(100)]
    );
    // An admitted request tells nothing.
    assert_eq!(server.tags(), ["a1", "a2"]);
}

/// A request whose first ask is refused and that does not go on to wait — its wait would pass
/// its limit, the answer fails, or it is dropped before the answer comes — tells the backend,
/// as the last waiting request to give up does: a store the fleet shares may have ranked that
/// ask in the fleet's order ([`kling_ratelimit::Backend::acquire`]).
#[tokio::test(start_paused = true)]
async fn a_first_ask_that_does_not_lead_to_waiting_tells_the_backend() {
    use std::sync::atomic::Ordering::Relaxed;
    // Refused past its limit: a2 would go at 100 ms, it may wait 50 ms.
    let (server, layer, start, calls) = recorded(Some(ms(50)), &["a1", "a2"]).await;
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.unwrap());
    }
    assert!(results[1].as_ref().unwrap_err().is::<WaitExceeded>());
    assert_eq!(server.tags(), ["a1"]);
    let handle = layer.handle();
    let backend = handle.backend();
    // (A refusal in `call` is asked again in the gate: a2 asks twice.)
    let asks = backend.asks.lock().unwrap().clone();
    assert!(asks.iter().all(|a| *a == Ask::First), "{asks:?}");
    assert_eq!(*backend.stopped.lock().unwrap(), [start]);

    // Failed: the answer is an error.
    let (server, layer, start, _) = recorded(None, &[]).await;
    let handle = layer.handle();
    let backend = handle.backend();
    backend.fail.store(true, Relaxed);
    let service = layer.layer(server.service());
    let call = spawn_call(&service, request(Some("a"), "failed")).await;
    assert!(call.await.unwrap().is_err());
    assert_eq!(*backend.stopped.lock().unwrap(), [start]);

    // Dropped while its first ask is on the way.
    let (server, layer, start, _) = recorded(None, &[]).await;
    let handle = layer.handle();
    let backend = handle.backend();
    backend.hold.store(true, Relaxed);
    let service = layer.layer(server.service());
    let call = spawn_call(&service, request(Some("a"), "dropped")).await;
    tokio::time::sleep(ms(10)).await;
    assert!(backend.stopped.lock().unwrap().is_empty(), "still asking");
    call.abort();
    let _ = call.await;
    assert_eq!(*backend.stopped.lock().unwrap(), [start + ms(10)]);
    assert!(server.tags().is_empty());
}

/// Reject mode asks with `acquire_or_refuse`: a refused request never waits, so a shared store
/// must not rank it in the fleet's order, and nothing is told afterwards.
#[tokio::test(start_paused = true)]
async fn reject_mode_asks_so_that_a_refusal_leaves_nothing_behind() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .backend(Recording::default())
        .reject()
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    service
        .clone()
        .oneshot(request(Some("a"), "a1"))
        .await
        .unwrap();
    let err = service
        .clone()
        .oneshot(request(Some("a"), "a2"))
        .await
        .unwrap_err();
    assert!(err.is::<RateLimited>(), "{err}");
    let handle = layer.handle();
    let backend = handle.backend();
    let asks = backend.asks.lock().unwrap().clone();
    assert!(asks.iter().all(|a| *a == Ask::OrRefuse), "{asks:?}");
    assert!(backend.stopped.lock().unwrap().is_empty());
}

/// A maximum wait of `Duration::MAX` (or any past the clock's range) is no limit, not a panic
/// on the first wait.
#[tokio::test(start_paused = true)]
async fn a_maximum_wait_past_the_clocks_range_is_no_limit() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(1.0))
        .max_wait(Duration::MAX)
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    let start = Instant::now();
    let first = spawn_call(&service, request(None, "first")).await;
    let second = spawn_call(&service, request(None, "second")).await;
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    assert_eq!(
        server.times_ms(start),
        [("first".into(), 0), ("second".into(), 1000)]
    );
}

/// A response future dropped before it was ever polled (its place taken in `call`) gives its
/// place up: nothing is left waiting, and the request behind it keeps its turn.
#[tokio::test(start_paused = true)]
async fn a_future_dropped_unpolled_leaves_no_waiter() {
    use tower::Service;

    let server = Server::new();
    let layer = GcraLayer::new(Quota::per_second(1.0)).unwrap();
    let handle = layer.handle();
    let mut service = layer.layer(server.service());
    let start = Instant::now();
    let first = spawn_call(&service, request(Some("a"), "first")).await;
    let head = spawn_call(&service, request(Some("a"), "head")).await;
    std::future::poll_fn(|cx| service.poll_ready(cx))
        .await
        .unwrap();
    let unpolled = service.call(request(Some("a"), "unpolled"));
    let tail = spawn_call(&service, request(Some("a"), "tail")).await;
    assert_eq!(handle.waiting(), 3);
    drop(unpolled);
    assert_eq!(handle.waiting(), 2);
    for call in [first, head, tail] {
        call.await.unwrap().unwrap();
    }
    assert_eq!(
        server.times_ms(start),
        vec![
            ("first".into(), 0),
            ("head".into(), 1000),
            ("tail".into(), 2000)
        ]
    );
    assert_eq!((handle.waiting(), handle.queue_bytes()), (0, 0));
}
