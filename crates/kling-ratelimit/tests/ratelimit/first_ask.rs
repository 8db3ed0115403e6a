//! Requests whose first ask of a remote store is still on its way when others queue: they
//! keep their turn ahead of those.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kling_core::RequestKind;
use kling_ratelimit::error::BackendError;
use kling_ratelimit::{
    Backend, BucketKey, Decision, Feedback, GcraLayer, InProcess, Policy, Quota,
};
use tokio::time::Instant;
use tower::Layer;

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
