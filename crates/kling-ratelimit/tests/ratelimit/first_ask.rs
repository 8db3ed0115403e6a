//! Requests whose first ask of a remote store is still on its way when others queue: they
//! keep their turn ahead of those.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kling_core::RequestKind;
use kling_ratelimit::backend::Reported;
use kling_ratelimit::error::{BackendError, QueueFull};
use kling_ratelimit::{
    Backend, BucketKey, Decision, Feedback, GcraLayer, InProcess, Policy, Quota,
};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

use crate::support::{Reply, Server, ms, request, request_to, spawn_call};

type Ask = Pin<Box<dyn Future<Output = Result<Decision, BackendError>> + Send>>;

/// The in-process backend behind a round trip of `ROUND_TRIP` for account keys (a class key
/// is decided at once), with a pause of every account that the test sets, as another process
/// sharing the store would by meeting a 1302.
#[derive(Debug, Clone, Default)]
struct Remote {
    inner: Arc<InProcess>,
    paused_until: Arc<Mutex<Option<Instant>>>,
    /// The round trips of the next account asks, in the order they are made (then
    /// `ROUND_TRIP`).
    round_trips: Arc<Mutex<std::collections::VecDeque<Duration>>>,
    /// The round trip of a report (none: it ends at once).
    report_trip: Option<Duration>,
    /// The round trip of a class key's ask, decided as it ends (none: decided at once).
    class_trip: Option<Duration>,
    /// The round trips of the next class asks, in the order they are made (then
    /// `class_trip`).
    class_trips: Arc<Mutex<std::collections::VecDeque<Duration>>>,
}

const ROUND_TRIP: Duration = Duration::from_millis(50);

impl Backend for Remote {
    type AcquireFuture = Ask;
    type FeedbackFuture = Pin<Box<dyn Future<Output = Result<Reported, BackendError>> + Send>>;

    fn acquire(&self, key: &BucketKey, policy: &Policy) -> Self::AcquireFuture {
        if key.request_kind().is_some() {
            let trip = self.class_trips.lock().unwrap().pop_front();
            let Some(trip) = trip.or(self.class_trip) else {
                return Box::pin(self.inner.acquire(key, policy));
            };
            let (inner, key, policy) = (Arc::clone(&self.inner), key.clone(), *policy);
            return Box::pin(async move {
                tokio::time::sleep(trip).await;
                inner.acquire(&key, &policy).await
            });
        }
        let (this, key, policy) = (self.clone(), key.clone(), *policy);
        let round_trip = self.round_trips.lock().unwrap().pop_front();
        Box::pin(async move {
            tokio::time::sleep(round_trip.unwrap_or(ROUND_TRIP)).await;
            let paused = *this.paused_until.lock().unwrap();
            match paused {
                Some(at) if at > Instant::now() => Ok(Decision::NotBefore { at, cooldown: true }),
                _ => this.inner.acquire(&key, &policy).await,
            }
        })
    }

    fn feedback(
        &self,
        key: &BucketKey,
        policy: &Policy,
        feedback: Feedback,
    ) -> Self::FeedbackFuture {
        let report = self.inner.feedback(key, policy, feedback);
        match self.report_trip {
            None => Box::pin(report),
            Some(trip) => Box::pin(async move {
                tokio::time::sleep(trip).await;
                report.await
            }),
        }
    }
}

/// Calls `first` and `second` of account `a` (`b1` of account `b` before them, so that a
/// request waits in the process while `first`'s first ask is on its way), all meeting a 3 s
/// pause: the order `a`'s requests reach the server in.
async fn order_after_pause(layer: GcraLayer<Remote>, first: Req, second: Req) -> Vec<String> {
    let server = Server::new();
    let backend = layer.handle().backend().clone();
    *backend.paused_until.lock().unwrap() = Some(Instant::now() + ms(3000));
    let service = layer.layer(server.service());
    let mut calls = vec![spawn_call(&service, request(Some("b"), "b1")).await];
    // `first` asks at 20 ms (its answer comes at 70), `b1` waits from 50, `second` comes at 60.
    for (req, after) in [(first, 20), (second, 40)] {
        tokio::time::advance(ms(after)).await;
        calls.push(spawn_call(&service, req).await);
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    server
        .hits()
        .into_iter()
        .filter(|hit| hit.account.as_deref() == Some("a"))
        .map(|hit| hit.tag)
        .collect()
}

type Req = crate::support::Req;

/// `a1` asks the store with nothing waiting; `a2` comes during the round trip, after `b1`
/// began to wait, so it queues, leads `a`'s queue and asks. `a1`'s answer (a pause) came
/// first: `a1` goes first. Before, it joined the queue behind `a2`.
#[tokio::test(start_paused = true)]
async fn a_first_ask_refused_after_others_queued_keeps_its_turn() {
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .backend(Remote::default())
        .build()
        .unwrap();
    let order = order_after_pause(layer, request(Some("a"), "a1"), request(Some("a"), "a2")).await;
    assert_eq!(order, ["a1", "a2"]);
}

/// The same with two `/account/costs` requests, both passing their class gate (a burst of
/// two) before `c1`'s account answer comes: `c1` passed it first and goes first.
#[tokio::test(start_paused = true)]
async fn a_class_request_whose_first_ask_meets_a_pause_keeps_its_turn() {
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0).with_burst(2))
        .backend(Remote::default())
        .build()
        .unwrap();
    let costs = |tag| request_to("/account/costs", Some("a"), tag);
    let order = order_after_pause(layer, costs("c1"), costs("c2")).await;
    assert_eq!(order, ["c1", "c2"]);
}

/// Two requests of `a`, `a2` coming 10 ms into `a1`'s first ask, with a quota that admits
/// both at once: the instants (ms) they reach the server at, or the error of the one that
/// failed.
async fn two_during_a_round_trip(layer: GcraLayer<Remote>) -> Vec<Result<(String, u128), String>> {
    let server = Server::new();
    let service = layer.layer(server.service());
    let start = Instant::now();
    let a1 = spawn_call(&service, request(Some("a"), "a1")).await;
    tokio::time::advance(ms(10)).await;
    let a2 = spawn_call(&service, request(Some("a"), "a2")).await;
    let mut out = Vec::new();
    for call in [a1, a2] {
        out.push(match call.await.unwrap() {
            Ok(_) => Ok(String::new()),
            Err(error) => Err(error.to_string()),
        });
    }
    let mut times = server.times_ms(start).into_iter();
    out.into_iter()
        .map(|sent| sent.map(|_| times.next().expect("a hit per success")))
        .collect()
}

/// A request that comes while another's first ask is on its way, and that the quota admits
/// too, is not refused for a full queue: nothing waits for the quota (the in-process backend
/// admits both at once).
#[tokio::test(start_paused = true)]
async fn a_request_during_a_first_ask_is_not_refused_for_a_full_queue() {
    let layer = GcraLayer::builder(Quota::per_second(10.0).with_burst(2))
        .max_queue(1)
        .backend(Remote::default())
        .build()
        .unwrap();
    let sent = two_during_a_round_trip(layer).await;
    assert_eq!(sent, [Ok(("a1".into(), 50)), Ok(("a2".into(), 60))]);
}

/// A request that comes while another's first ask is on its way, and that the quota admits
/// too, asks at once rather than after that answer: it is sent one round trip after it came.
#[tokio::test(start_paused = true)]
async fn a_request_during_a_first_ask_is_not_held_for_its_answer() {
    let layer = GcraLayer::builder(Quota::per_second(10.0).with_burst(2))
        .backend(Remote::default())
        .build()
        .unwrap();
    let sent = two_during_a_round_trip(layer).await;
    assert_eq!(sent, [Ok(("a1".into(), 50)), Ok(("a2".into(), 60))]);
}

/// Requests that came during a round trip and asked too, all refused (a pause): the ones
/// within `max_queue` wait, in the order they came, and the next fails with `QueueFull` (as
/// one refused with no place would fail to join), so the asks on their way never let more
/// than `max_queue` wait.
#[tokio::test(start_paused = true)]
async fn requests_refused_after_asking_together_wait_within_the_bound() {
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .max_queue(2)
        .backend(Remote::default())
        .build()
        .unwrap();
    let handle = layer.handle();
    let backend = handle.backend().clone();
    *backend.paused_until.lock().unwrap() = Some(Instant::now() + ms(3000));
    let server = Server::new();
    let service = layer.layer(server.service());
    let mut calls = Vec::new();
    for tag in ["a1", "a2", "a3"] {
        calls.push(spawn_call(&service, request(Some("a"), tag)).await);
        tokio::time::advance(ms(10)).await;
    }
    let mut failed = Vec::new();
    for call in calls {
        if let Err(error) = call.await.unwrap() {
            failed.push(error.is::<QueueFull>());
        }
    }
    assert_eq!(server.tags(), ["a1", "a2"]);
    assert_eq!(failed, [true], "a3 found two waiting");
    assert_eq!(handle.waiting(), 0);
}

/// A request dropped while its ask is on its way leaves its place (and its mark as asking):
/// the key's queue counts it no more. Here `a2` then waits alone for the pause (kept for
/// `a1`, the place would refuse it), so `a3`, coming with `a2` waiting (`max_queue` 1),
/// fails, and `a2` goes when the pause ends. Asking, neither is counted as waiting.
#[tokio::test(start_paused = true)]
async fn a_request_dropped_while_asking_leaves_its_place() {
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .max_queue(1)
        .backend(Remote::default())
        .build()
        .unwrap();
    let handle = layer.handle();
    let backend = handle.backend().clone();
    *backend.paused_until.lock().unwrap() = Some(Instant::now() + ms(3000));
    let server = Server::new();
    let service = layer.layer(server.service());
    let a1 = spawn_call(&service, request(Some("a"), "a1")).await;
    tokio::time::advance(ms(10)).await;
    let a2 = spawn_call(&service, request(Some("a"), "a2")).await;
    tokio::time::advance(ms(10)).await;
    assert!(handle.queue_bytes() > 0, "both hold a place while they ask");
    assert_eq!(handle.waiting(), 0, "neither waits yet");
    a1.abort();
    assert!(a1.await.unwrap_err().is_cancelled());
    // `a2`'s answer (the pause) comes at 60 ms.
    tokio::time::advance(ms(50)).await;
    let error = service
        .clone()
        .oneshot(request(Some("a"), "a3"))
        .await
        .unwrap_err();
    assert!(error.is::<QueueFull>(), "{error}");
    assert_eq!(handle.waiting(), 1, "refused, `a2` waits");
    a2.await.unwrap().unwrap();
    assert_eq!(server.tags(), ["a2"]);
    assert_eq!(handle.waiting(), 0);
    assert_eq!(handle.queue_bytes(), 0, "no queue is left");
}

/// A head that waited out a pause and asks again is a waiting request, not a first ask: when
/// the store refuses it again (another process met a 1302 meanwhile), it keeps waiting at the
/// head rather than fail with `QueueFull`, and a request that comes during its ask, with the
/// queue at its bound (`max_queue` 2: the head and `a2`), is the one refused.
#[tokio::test(start_paused = true)]
async fn a_head_asking_again_is_not_refused_for_a_full_queue() {
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .max_queue(2)
        .backend(Remote::default())
        .build()
        .unwrap();
    let handle = layer.handle();
    let backend = handle.backend().clone();
    let start = Instant::now();
    *backend.paused_until.lock().unwrap() = Some(start + ms(3000));
    let server = Server::new();
    let service = layer.layer(server.service());
    // `a1` asks at 0 and leads, refused at 50 until 3000; `a2` queues behind it at 100.
    let a1 = spawn_call(&service, request(Some("a"), "a1")).await;
    tokio::time::advance(ms(100)).await;
    let a2 = spawn_call(&service, request(Some("a"), "a2")).await;
    // `a1` asks again at 3000; another process pauses the account until 6000 meanwhile.
    tokio::time::advance(ms(2910)).await;
    *backend.paused_until.lock().unwrap() = Some(start + ms(6000));
    let a3 = spawn_call(&service, request(Some("a"), "a3")).await;
    let mut outcomes = Vec::new();
    for call in [a1, a2, a3] {
        outcomes.push(match call.await.unwrap() {
            Ok(_) => "sent".to_owned(),
            Err(error) if error.is::<QueueFull>() => "queue full".to_owned(),
            Err(error) => error.to_string(),
        });
    }
    assert_eq!(outcomes, ["sent", "sent", "queue full"]);
    assert_eq!(server.tags(), ["a1", "a2"]);
    assert_eq!(handle.waiting(), 0);
}

/// Advances the clock a millisecond at a time until `at` past `start`, so that every timer
/// due meanwhile fires at its own instant.
async fn run_until(start: Instant, at: u64) {
    while start.elapsed() < ms(at) {
        tokio::time::advance(ms(1)).await;
    }
}

/// A request that queued behind a head and then leads and asks is a waiting request too:
/// `a2` (queued at 100) asks at 1050 with a slow round trip, the account is paused again
/// meanwhile, and `a3`, coming during that ask with `a2` counted (`max_queue` 2), queues
/// behind it rather than ask beside it; `a4` finds the queue full. Before, `a2`'s ask was
/// taken for a first one: `a3` asked beside it, was refused first, and `a2`, refused after,
/// failed with `QueueFull` for its own place.
#[tokio::test(start_paused = true)]
async fn a_queued_request_that_leads_is_not_refused_for_a_full_queue() {
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .max_queue(2)
        .backend(Remote::default())
        .build()
        .unwrap();
    let handle = layer.handle();
    let backend = handle.backend().clone();
    let start = Instant::now();
    *backend.paused_until.lock().unwrap() = Some(start + ms(1000));
    // `a1` at 0 and again at 1000, `a2` at 1050 (slow: its answer comes at 1250).
    backend
        .round_trips
        .lock()
        .unwrap()
        .extend([ms(50), ms(50), ms(200)]);
    let server = Server::new();
    let service = layer.layer(server.service());
    let a1 = spawn_call(&service, request(Some("a"), "a1")).await;
    run_until(start, 100).await;
    let a2 = spawn_call(&service, request(Some("a"), "a2")).await;
    // `a1` is sent at 1050 and `a2` asks; another process pauses the account until 3000.
    run_until(start, 1060).await;
    assert_eq!(server.tags(), ["a1"]);
    *backend.paused_until.lock().unwrap() = Some(start + ms(3000));
    let a3 = spawn_call(&service, request(Some("a"), "a3")).await;
    run_until(start, 1120).await;
    let a4 = spawn_call(&service, request(Some("a"), "a4")).await;
    let mut outcomes = Vec::new();
    for call in [a1, a2, a3, a4] {
        outcomes.push(match call.await.unwrap() {
            Ok(_) => "sent".to_owned(),
            Err(error) if error.is::<QueueFull>() => "queue full".to_owned(),
            Err(error) => error.to_string(),
        });
    }
    assert_eq!(outcomes, ["sent", "sent", "sent", "queue full"]);
    assert_eq!(server.tags(), ["a1", "a2", "a3"]);
    assert_eq!(handle.waiting(), 0);
}

/// A mix of requests (two accounts, a class quota) over round trips of varied length, with
/// pauses another process sets now and then, some callers giving up and a bounded queue:
/// whatever fails, nothing is left waiting and no queue is left behind, and the requests sent
/// keep to the quota (the store's, which alone admits).
#[tokio::test(start_paused = true)]
async fn varied_round_trips_leave_nothing_waiting() {
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(2.0).with_burst(2))
        .max_queue(3)
        .max_wait(Duration::from_secs(4))
        .backend(Remote::default())
        .build()
        .unwrap();
    let handle = layer.handle();
    let backend = handle.backend().clone();
    let start = Instant::now();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |n: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % n
    };
    backend
        .round_trips
        .lock()
        .unwrap()
        .extend((0..2_000).map(|_| ms(5 + next(200))));
    let server = Server::new();
    let service = layer.layer(server.service());
    let mut calls = Vec::new();
    for n in 0..200u64 {
        if next(15) == 0 {
            *backend.paused_until.lock().unwrap() = Some(Instant::now() + ms(100 + next(900)));
        }
        let account = if next(3) == 0 { "b" } else { "a" };
        let tag = format!("{account}{n}");
        let req = if next(4) == 0 {
            request_to("/account/costs", Some(account), &tag)
        } else {
            request(Some(account), &tag)
        };
        let call = spawn_call(&service, req).await;
        if next(6) == 0 {
            let give_up = ms(next(300));
            calls.push(tokio::spawn(async move {
                // (Dropping a join handle leaves its task running: the call is aborted.)
                let mut call = call;
                if tokio::time::timeout(give_up, &mut call).await.is_err() {
                    call.abort();
                }
            }));
        } else {
            calls.push(tokio::spawn(async move {
                let _ = call.await;
            }));
        }
        run_until(start, (n + 1) * 30 + next(30)).await;
    }
    for call in calls {
        call.await.unwrap();
    }
    run_until(start, 60_000).await;
    assert_eq!(handle.waiting(), 0);
    for account in ["a", "b"] {
        let account = kling_core::AccountId::new(account);
        assert_eq!(handle.queue_depth(Some(&account)), 0);
    }
    assert_eq!(handle.queue_bytes(), 0, "no queue is left");
    for account in ["a", "b"] {
        let times: Vec<Instant> = server
            .hits()
            .into_iter()
            .filter(|hit| hit.account.as_deref() == Some(account))
            .map(|hit| hit.at)
            .collect();
        assert!(!times.is_empty(), "{account}: {} sent", times.len());
        for pair in times.windows(2) {
            assert!(
                pair[1] - pair[0] >= ms(99),
                "{account}: sent {:?} apart",
                pair[1] - pair[0]
            );
        }
    }
}

/// A class request that waited at its class gate asks its account's for the first time once
/// past it: that ask keeps its place too. `c2` waits for its class quota until 1000 (`c1`,
/// which took the turn before, gives up before it is sent, so no send of the class holds `c2`
/// after), asks its account then, and `a1` comes during the round trip; both meet a pause,
/// and `c2`, which asked first, goes first.
#[tokio::test(start_paused = true)]
async fn a_class_request_that_waited_at_its_class_gate_keeps_its_turn_at_its_account() {
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .backend(Remote::default())
        .build()
        .unwrap();
    let handle = layer.handle();
    let backend = handle.backend().clone();
    let start = Instant::now();
    let server = Server::new();
    let service = layer.layer(server.service());
    let costs = |tag| request_to("/account/costs", Some("a"), tag);
    let c1 = spawn_call(&service, costs("c1")).await;
    run_until(start, 10).await;
    let c2 = spawn_call(&service, costs("c2")).await;
    run_until(start, 20).await;
    c1.abort();
    run_until(start, 990).await;
    *backend.paused_until.lock().unwrap() = Some(start + ms(3000));
    run_until(start, 1020).await;
    let a1 = spawn_call(&service, request(Some("a"), "a1")).await;
    for call in [c2, a1] {
        call.await.unwrap().unwrap();
    }
    assert_eq!(server.tags(), ["c2", "a1"]);
    assert_eq!(handle.waiting(), 0);
}

/// What became of each call, in the order given: "sent", "queue full", or the error.
async fn outcomes(
    calls: Vec<tokio::task::JoinHandle<Result<crate::support::Res, kling_core::BoxError>>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for call in calls {
        out.push(match call.await.unwrap() {
            Ok(_) => "sent".to_owned(),
            Err(error) if error.is::<QueueFull>() => "queue full".to_owned(),
            Err(error) => error.to_string(),
        });
    }
    out
}

/// Two first asks on their way together, both refused (a pause), the later one's answer
/// first (`a1`'s round trip 200 ms, `a2`'s 50), with room for one (`max_queue` 1): arrival
/// decides, so `a1` waits and `a2` meets `QueueFull`. Before, the first answer took the place
/// and `a1`, which came first, failed.
#[tokio::test(start_paused = true)]
async fn first_asks_refused_out_of_order_get_places_in_arrival_order() {
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .max_queue(1)
        .backend(Remote::default())
        .build()
        .unwrap();
    let handle = layer.handle();
    let backend = handle.backend().clone();
    let start = Instant::now();
    *backend.paused_until.lock().unwrap() = Some(start + ms(1000));
    backend
        .round_trips
        .lock()
        .unwrap()
        .extend([ms(200), ms(50)]);
    let server = Server::new();
    let service = layer.layer(server.service());
    let a1 = spawn_call(&service, request(Some("a"), "a1")).await;
    run_until(start, 10).await;
    let a2 = spawn_call(&service, request(Some("a"), "a2")).await;
    assert_eq!(outcomes(vec![a1, a2]).await, ["sent", "queue full"]);
    assert_eq!(server.tags(), ["a1"]);
    assert_eq!(handle.waiting(), 0);
    assert_eq!(handle.queue_bytes(), 0, "no queue is left");
}

/// A request that must queue counts the first asks on their way ahead of it, which came
/// before it: `a1` asks (200 ms), `a2` asks during it and is refused first (at 60 ms) and
/// waits, `a3` comes at 70 ms with `max_queue` 2 and finds `a2` waiting and `a1` asking: it
/// meets `QueueFull`, and `a1`, refused at 200 ms, waits. Before, `a3` took the place and
/// `a1` failed.
#[tokio::test(start_paused = true)]
async fn a_request_that_queues_leaves_room_for_first_asks_ahead_of_it() {
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .max_queue(2)
        .backend(Remote::default())
        .build()
        .unwrap();
    let handle = layer.handle();
    let backend = handle.backend().clone();
    let start = Instant::now();
    *backend.paused_until.lock().unwrap() = Some(start + ms(1000));
    backend
        .round_trips
        .lock()
        .unwrap()
        .extend([ms(200), ms(50)]);
    let server = Server::new();
    let service = layer.layer(server.service());
    let a1 = spawn_call(&service, request(Some("a"), "a1")).await;
    run_until(start, 10).await;
    let a2 = spawn_call(&service, request(Some("a"), "a2")).await;
    run_until(start, 70).await;
    let a3 = spawn_call(&service, request(Some("a"), "a3")).await;
    assert_eq!(
        outcomes(vec![a1, a2, a3]).await,
        ["sent", "sent", "queue full"]
    );
    assert_eq!(server.tags(), ["a1", "a2"]);
    assert_eq!(handle.waiting(), 0);
    assert_eq!(handle.queue_bytes(), 0, "no queue is left");
}

/// What became of one request of [`arrival_order_decides_who_waits`]'s runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    Sent,
    QueueFull,
    GaveUp,
    Failed,
}

/// Seeded runs of requests of two accounts (no class quota, so every waiter is bounded) over
/// round trips of varied length, answers often coming back out of order, with pauses another
/// process sets now and then and callers giving up: the queue never shows more than
/// `max_queue` waiting (`queue_depth`, as the bound counts), and a request refused with
/// `QueueFull` always found `max_queue` requests that came before it still there: no later
/// request took its place.
#[tokio::test(start_paused = true)]
async fn arrival_order_decides_who_waits() {
    arrival_order_runs(false).await;
}

/// [`arrival_order_decides_who_waits`] with class requests too, whose class gate's asks are
/// on their way as well (class requests held or back from a paused account rejoin their
/// account's queue whatever its bound, so its depth is not checked): a create refused with
/// `QueueFull` found `max_queue` requests of its account that came before it still there. (A
/// class request waits at two gates, its class's and then its account's, in the order it
/// reaches each: it is not checked.) Not covered: run over 300 seeds, runs 170, 190 and 232
/// fail, where such a rejoin lands while a first ask is on its way, after a later request took
/// the room left for that ask: the ask is then refused for the later one's place (letting it
/// wait would put more than `max_queue` waiting).
#[tokio::test(start_paused = true)]
async fn arrival_order_decides_who_waits_with_class_requests() {
    arrival_order_runs(true).await;
}

/// The runs of [`arrival_order_decides_who_waits`], with class requests when `classes`.
async fn arrival_order_runs(classes: bool) {
    const MAX: usize = 2;
    for run in 0..12u64 {
        let mut builder = GcraLayer::builder(Quota::per_second(10.0)).max_queue(MAX);
        if classes {
            builder = builder.class_quota(RequestKind::Account, Quota::per_second(4.0));
        }
        let layer = builder
            .backend(Remote {
                class_trip: classes.then_some(ROUND_TRIP),
                ..Remote::default()
            })
            .build()
            .unwrap();
        let handle = layer.handle();
        let backend = handle.backend().clone();
        let start = Instant::now();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15 ^ run.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        backend
            .round_trips
            .lock()
            .unwrap()
            .extend((0..1_000).map(|_| ms(5 + next(150))));
        let server = Server::new();
        let service = layer.layer(server.service());
        // Per request: account, arrival, and its end and when.
        let ends = Arc::new(Mutex::new(Vec::new()));
        let mut arrivals = Vec::new();
        let mut calls = Vec::new();
        for n in 0..120usize {
            if next(10) == 0 {
                *backend.paused_until.lock().unwrap() = Some(Instant::now() + ms(100 + next(400)));
            }
            let account = if next(3) == 0 { "b" } else { "a" };
            let is_class = classes && next(2) == 0;
            arrivals.push((account, start.elapsed(), is_class));
            let req = if is_class {
                request_to("/account/costs", Some(account), &n.to_string())
            } else {
                request(Some(account), &n.to_string())
            };
            let mut call = spawn_call(&service, req).await;
            let give_up = (next(5) == 0).then(|| ms(next(300)));
            let ends = Arc::clone(&ends);
            calls.push(tokio::spawn(async move {
                let end = match give_up {
                    Some(after) => match tokio::time::timeout(after, &mut call).await {
                        Ok(result) => result.unwrap(),
                        Err(_) => {
                            call.abort();
                            ends.lock().unwrap().push((n, End::GaveUp, start.elapsed()));
                            return;
                        }
                    },
                    None => call.await.unwrap(),
                };
                let end = match end {
                    Ok(_) => End::Sent,
                    Err(error) if error.is::<QueueFull>() => End::QueueFull,
                    Err(_) => End::Failed,
                };
                ends.lock().unwrap().push((n, end, start.elapsed()));
            }));
            let until = start.elapsed().as_millis() as u64 + 1 + next(40);
            while start.elapsed() < ms(until) {
                tokio::time::advance(ms(1)).await;
                // (A class request back from a paused account, or held and going back to its
                // account's queue, rejoins it whatever its bound: only without them.)
                for account in ["a", "b"].into_iter().filter(|_| !classes) {
                    let account = kling_core::AccountId::new(account);
                    let depth = handle.queue_depth(Some(&account));
                    assert!(depth <= MAX, "run {run}: {depth} waiting");
                }
            }
        }
        for call in calls {
            call.await.unwrap();
        }
        assert_eq!(handle.waiting(), 0);
        assert_eq!(handle.queue_bytes(), 0, "no queue is left");
        let ends = ends.lock().unwrap().clone();
        assert_eq!(ends.len(), arrivals.len());
        let end_of = |n: usize| ends.iter().find(|end| end.0 == n).copied().unwrap();
        let mut refused = 0;
        for &(n, end, at) in &ends {
            if end != End::QueueFull {
                continue;
            }
            refused += 1;
            let (account, _, is_class) = arrivals[n];
            if is_class {
                continue;
            }
            // Came before it, same account, not yet gone when it was refused (ends are noted
            // by the tasks awaiting the calls, up to a millisecond late).
            let before = (0..n)
                .filter(|&m| arrivals[m].0 == account && end_of(m).2 + ms(1) >= at)
                .count();
            assert!(
                before >= MAX,
                "run {run}: request {n} refused at {at:?} with {before} before it waiting"
            );
        }
        assert!(ends.iter().any(|end| end.1 == End::Sent), "run {run}");
        // (The runs are made to fill the queue: the check is not empty.)
        assert!(refused > 0, "run {run}: none refused");
    }
}

/// A request that asks nothing, held at once by a pause whose report is on its way
/// (`LocalPauses`), with a first ask on its way ahead of it, leaves room for that ask too:
/// `x` asks (300 ms), `a0` is sent and answered 1302 (its report takes 500 ms), `n` comes
/// during the report and is held, and `x` is refused (another process paused the account):
/// with `max_queue` 1, `x`, which came first, waits and `n` meets `QueueFull`. Before, `n`
/// took the place and `x` failed.
#[tokio::test(start_paused = true)]
async fn a_request_held_by_a_pause_on_its_way_leaves_room_for_first_asks_ahead() {
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .max_queue(1)
        .backend(Remote {
            report_trip: Some(ms(500)),
            ..Remote::default()
        })
        .build()
        .unwrap();
    let handle = layer.handle();
    let backend = handle.backend().clone();
    let start = Instant::now();
    backend
        .round_trips
        .lock()
        .unwrap()
        .extend([ms(300), ms(10)]);
    let server = Server::new();
    server.script([Reply::throttled()]);
    let service = layer.layer(server.service());
    let x = spawn_call(&service, request(Some("a"), "x")).await;
    run_until(start, 5).await;
    let a0 = spawn_call(&service, request(Some("a"), "a0")).await;
    run_until(start, 20).await;
    assert_eq!(server.tags(), ["a0"]);
    *backend.paused_until.lock().unwrap() = Some(start + ms(2000));
    let n = spawn_call(&service, request(Some("a"), "n")).await;
    assert_eq!(
        outcomes(vec![a0, x, n]).await,
        ["sent", "sent", "queue full"]
    );
    assert_eq!(server.tags(), ["a0", "x"]);
    assert_eq!(handle.waiting(), 0);
    assert_eq!(handle.queue_bytes(), 0, "no queue is left");
}

/// A class request that joins its class gate's queue to ask at once (only a first ask on its
/// way ahead of it) but waits there instead, for its account's pause, leaves room for that
/// ask, which came before it. Class asks take 100 ms, `max_queue` 1. `r` passes its class
/// gate, meets the account's pause (to 2000) at 150 and goes back to its class gate, noting
/// the pause there; `a` asks its class gate at 120 (refused: `r` took the turn); `r` gives up
/// at 160; `c` comes at 170 and waits for the pause. `a`, refused at 220, came first: it
/// waits, and `c` meets `QueueFull`. Before, `c` took the place and `a` failed.
#[tokio::test(start_paused = true)]
async fn a_class_request_waiting_for_its_accounts_pause_leaves_room_for_first_asks_ahead() {
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_second(1.0))
        .max_queue(1)
        .backend(Remote {
            class_trip: Some(ms(100)),
            ..Remote::default()
        })
        .build()
        .unwrap();
    let handle = layer.handle();
    let backend = handle.backend().clone();
    let start = Instant::now();
    *backend.paused_until.lock().unwrap() = Some(start + ms(2000));
    let server = Server::new();
    let service = layer.layer(server.service());
    let costs = |tag| request_to("/account/costs", Some("a"), tag);
    let r = spawn_call(&service, costs("r")).await;
    run_until(start, 120).await;
    let a = spawn_call(&service, costs("a")).await;
    run_until(start, 160).await;
    r.abort();
    run_until(start, 170).await;
    let c = spawn_call(&service, costs("c")).await;
    assert_eq!(outcomes(vec![a, c]).await, ["sent", "queue full"]);
    assert_eq!(server.tags(), ["a"]);
    assert_eq!(handle.waiting(), 0);
    assert_eq!(handle.queue_bytes(), 0, "no queue is left");
}

/// Seeded runs of create and class requests of two accounts, the class gate's asks on their
/// way too, over round trips of varied length with pauses, callers giving up and a bounded
/// queue: at every millisecond the queue-depth gauge (every account's series) shows what
/// `waiting()` counts, whatever path a place takes (asking, refused, held, back at its class
/// gate), and it is back to zero once every call ended.
#[tokio::test(start_paused = true)]
async fn the_depth_gauge_shows_what_waiting_counts() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _recorder = metrics::set_default_local_recorder(&recorder);
    // The recorder hands over a gauge's moves since the last snapshot: they are added up.
    let mut shown = 0.0;
    let mut gauge = move || {
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            if key.key().name() == kling_core::metrics::RATELIMIT_QUEUE_DEPTH
                && let DebugValue::Gauge(moved) = value
            {
                shown += moved.into_inner();
            }
        }
        shown
    };
    for run in 0..6u64 {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d ^ run.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        let layer = GcraLayer::builder(Quota::per_second(10.0))
            .class_quota(RequestKind::Account, Quota::per_second(5.0))
            .max_queue(2 + next(4) as usize)
            .backend(Remote {
                class_trip: Some(ROUND_TRIP),
                ..Remote::default()
            })
            .build()
            .unwrap();
        let handle = layer.handle();
        let backend = handle.backend().clone();
        let start = Instant::now();
        backend
            .round_trips
            .lock()
            .unwrap()
            .extend((0..1_000).map(|_| ms(5 + next(150))));
        backend
            .class_trips
            .lock()
            .unwrap()
            .extend((0..1_000).map(|_| ms(5 + next(150))));
        let server = Server::new();
        let service = layer.layer(server.service());
        let mut calls = Vec::new();
        for n in 0..120u64 {
            if next(10) == 0 {
                *backend.paused_until.lock().unwrap() = Some(Instant::now() + ms(100 + next(600)));
            }
            let account = if next(3) == 0 { "b" } else { "a" };
            let tag = format!("{account}{n}");
            let req = if next(2) == 0 {
                request_to("/account/costs", Some(account), &tag)
            } else {
                request(Some(account), &tag)
            };
            let mut call = spawn_call(&service, req).await;
            let give_up = (next(5) == 0).then(|| ms(next(400)));
            calls.push(tokio::spawn(async move {
                match give_up {
                    Some(after) => {
                        if tokio::time::timeout(after, &mut call).await.is_err() {
                            call.abort();
                        }
                    }
                    None => {
                        let _ = call.await;
                    }
                }
            }));
            let until = start.elapsed().as_millis() as u64 + 1 + next(80);
            while start.elapsed() < ms(until) {
                tokio::time::advance(ms(1)).await;
                let waiting = handle.waiting();
                assert_eq!(
                    gauge(),
                    waiting as f64,
                    "run {run} at {:?}",
                    start.elapsed()
                );
            }
        }
        for call in calls {
            call.await.unwrap();
        }
        assert_eq!(handle.waiting(), 0);
        assert_eq!(gauge(), 0.0, "run {run}: the gauge drifted");
        assert_eq!(handle.queue_bytes(), 0, "run {run}: no queue is left");
    }
}
