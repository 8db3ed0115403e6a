//! Reports still to come when the response is in (a remote store's): the pause a response
//! asks for holds in this process at once, and a report outlives a caller that gives up.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kling_core::RequestKind;
use kling_ratelimit::backend::Reported;
use kling_ratelimit::error::{BackendError, RateLimited};
use kling_ratelimit::{Backend, BucketKey, Feedback, GcraLayer, InProcess, Policy, Quota};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::support::{Reply, Server, ms, request, request_to};

type Report = Pin<Box<dyn Future<Output = Result<Reported, BackendError>> + Send>>;

/// Decides in process; its reports of a pause reach its state only when they end, `delay`
/// after they are sent (`None`: never), as a remote store's round trip would. (A success's
/// report ends at once.)
#[derive(Debug, Clone, Default)]
struct SlowReports {
    inner: Arc<InProcess>,
    delay: Option<Duration>,
    reported: Arc<AtomicUsize>,
}

impl SlowReports {
    fn after(delay: Duration) -> Self {
        SlowReports {
            delay: Some(delay),
            ..SlowReports::default()
        }
    }

    fn reported(&self) -> usize {
        self.reported.load(Ordering::SeqCst)
    }
}

impl Backend for SlowReports {
    type AcquireFuture = <InProcess as Backend>::AcquireFuture;
    type FeedbackFuture = Report;

    fn acquire(&self, key: &BucketKey, policy: &Policy) -> Self::AcquireFuture {
        self.inner.acquire(key, policy)
    }

    fn acquire_or_refuse(
        &self,
        key: &BucketKey,
        policy: &Policy,
        decided_at: &mut Option<Instant>,
    ) -> Self::AcquireFuture {
        self.inner.acquire_or_refuse(key, policy, decided_at)
    }

    fn acquire_class_or_refuse(
        &self,
        class: &BucketKey,
        class_policy: &Policy,
        account: &BucketKey,
        account_policy: &Policy,
        decided_at: &mut Option<Instant>,
    ) -> Option<Self::AcquireFuture> {
        self.inner
            .acquire_class_or_refuse(class, class_policy, account, account_policy, decided_at)
    }

    fn feedback(
        &self,
        key: &BucketKey,
        policy: &Policy,
        feedback: Feedback,
    ) -> Self::FeedbackFuture {
        if matches!(feedback, Feedback::Success { .. }) {
            let reported = self.inner.feedback_now(key, policy, feedback);
            return Box::pin(std::future::ready(Ok(reported)));
        }
        let Some(delay) = self.delay else {
            return Box::pin(std::future::pending());
        };
        let (this, key, policy) = (self.clone(), key.clone(), *policy);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            let reported = this.inner.feedback_now(&key, &policy, feedback);
            this.reported.fetch_add(1, Ordering::SeqCst);
            Ok(reported)
        })
    }
}

/// A caller that gives up on its call (a timeout) once the 1302 is in but its report is not:
/// the next request of the key still waits out the pause (1 s), and another key's does not.
/// Before, the pause was noted only when the report ended, and was lost with the future: a2
/// went at 100 ms.
#[tokio::test(start_paused = true)]
async fn a_call_given_up_before_its_report_ends_keeps_the_pause() {
    let server = Server::new();
    server.script([Reply::throttled()]);
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .backend(SlowReports::default())
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    let start = Instant::now();
    let first = service.clone().oneshot(request(Some("a"), "a1"));
    assert!(tokio::time::timeout(ms(50), first).await.is_err());
    service
        .clone()
        .oneshot(request(Some("b"), "b1"))
        .await
        .unwrap();
    service
        .clone()
        .oneshot(request(Some("a"), "a2"))
        .await
        .unwrap();
    assert_eq!(
        server.times_ms(start),
        [("a1".into(), 0), ("b1".into(), 50), ("a2".into(), 1000)]
    );
}

/// A report whose caller gave up on it still runs to its end: the store hears of the pause.
/// Before, it was dropped with the response future.
#[tokio::test(start_paused = true)]
async fn a_report_outlives_a_caller_that_gave_up() {
    let server = Server::new();
    server.script([Reply::throttled()]);
    let backend = SlowReports::after(ms(300));
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .backend(backend.clone())
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    let first = service.clone().oneshot(request(Some("a"), "a1"));
    assert!(tokio::time::timeout(ms(50), first).await.is_err());
    tokio::time::sleep(ms(300)).await;
    assert_eq!(backend.reported(), 1);
}

/// Reject mode refuses a key held paused here, with the pause's end, before its store has the
/// pause; a class request so refused spends no turn of its class (one a minute here).
#[tokio::test(start_paused = true)]
async fn reject_mode_refuses_a_key_held_paused_here_and_spends_no_class_turn() {
    let server = Server::new();
    server.script([Reply::throttled()]);
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .class_quota(RequestKind::Account, Quota::per_minute(1.0))
        .reject()
        .backend(SlowReports::default())
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    let costs = |tag| request_to("/account/costs", Some("a"), tag);
    let first = service.clone().oneshot(request(Some("a"), "a1"));
    assert!(tokio::time::timeout(ms(400), first).await.is_err());
    for refused in [request(Some("a"), "a2"), costs("c1")] {
        let error = service.clone().oneshot(refused).await.unwrap_err();
        let limited = error.downcast_ref::<RateLimited>().expect("RateLimited");
        assert!(limited.in_cooldown());
        assert_eq!(limited.retry_after(), ms(600));
    }
    tokio::time::advance(ms(600)).await;
    service.clone().oneshot(costs("c2")).await.unwrap();
    assert_eq!(server.tags(), ["a1", "c2"]);
}

/// A response future dropped with its report on its way when no runtime is left (a caller's
/// runtime shut down first): the report is dropped with it, no panic.
#[test]
fn a_report_dropped_with_no_runtime_does_not_panic() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let backend = SlowReports::after(ms(300));
    let server = Server::new();
    server.script([Reply::throttled()]);
    let mut given_up = None;
    runtime.block_on(async {
        let layer = GcraLayer::builder(Quota::per_second(10.0))
            .backend(backend.clone())
            .build()
            .unwrap();
        let mut service = layer.layer(server.service());
        service.ready().await.unwrap();
        let mut call = Box::pin(service.call(request(Some("a"), "a1")));
        assert!(tokio::time::timeout(ms(50), &mut call).await.is_err());
        given_up = Some(call);
    });
    drop(runtime);
    let call = given_up.unwrap();
    assert!(format!("{call:?}").contains("reporting"), "{call:?}");
    drop(call);
    assert_eq!(backend.reported(), 0);
}
