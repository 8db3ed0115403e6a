//! Requests whose first ask of a remote store is still on its way when others queue: they
//! keep their turn ahead of those.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kling_core::RequestKind;
use kling_ratelimit::error::{BackendError, QueueFull};
use kling_ratelimit::{
    Backend, BucketKey, Decision, Feedback, GcraLayer, InProcess, Policy, Quota,
};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

use crate::support::{Server, ms, request, request_to, spawn_call};

type Ask = Pin<Box<dyn Future<Output = Result<Decision, BackendError>> + Send>>;

/// The in-process backend behind a round trip of `ROUND_TRIP` for account keys (a class key
/// is decided at once), with a pause of every account that the test sets, as another process
/// sharing the store would by meeting a 1302.
#[derive(Debug, Clone, Default)]
struct Remote {
    inner: Arc<InProcess>,
    paused_until: Arc<Mutex<Option<Instant>>>,
}

const ROUND_TRIP: Duration = Duration::from_millis(50);

impl Backend for Remote {
    type AcquireFuture = Ask;
    type FeedbackFuture = <InProcess as Backend>::FeedbackFuture;

    fn acquire(&self, key: &BucketKey, policy: &Policy) -> Self::AcquireFuture {
        if key.request_kind().is_some() {
            return Box::pin(self.inner.acquire(key, policy));
        }
        let (this, key, policy) = (self.clone(), key.clone(), *policy);
        Box::pin(async move {
            tokio::time::sleep(ROUND_TRIP).await;
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
        self.inner.feedback(key, policy, feedback)
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
/// the key's queue counts it no more. Here `a2` then waits alone for the pause, so `a3`,
/// coming with `a2` waiting (`max_queue` 1), fails, and `a2` goes when the pause ends.
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
    assert_eq!(handle.waiting(), 2, "both hold a place while they ask");
    a1.abort();
    assert!(a1.await.unwrap_err().is_cancelled());
    assert_eq!(handle.waiting(), 1);
    // `a2`'s answer (the pause) comes at 60 ms.
    tokio::time::advance(ms(50)).await;
    let error = service
        .clone()
        .oneshot(request(Some("a"), "a3"))
        .await
        .unwrap_err();
    assert!(error.is::<QueueFull>(), "{error}");
    a2.await.unwrap().unwrap();
    assert_eq!(server.tags(), ["a2"]);
    assert_eq!(handle.waiting(), 0);
}
