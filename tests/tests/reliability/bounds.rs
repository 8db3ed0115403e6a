//! Bounded memory: response bodies are read up to a limit, the rate limiter's queue is bounded
//! where configured, and keyed state (idle rate-limit keys, finished tasks, webhook ids) is
//! pruned. One test per bound.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use http_body_util::Full;
use kling_concurrency::{SlotsConfig, TaskSlotsLayer};
use kling_core::error::{BodyTooLarge, BoxError};
use kling_core::{AccountId, ClassifyLayer};
use kling_ratelimit::error::QueueFull;
use kling_ratelimit::{GcraLayer, Quota};
use kling_tower::error::WebhookErrorKind;
use kling_tower::webhook::WebhookVerifier;
use tower::{Layer, ServiceExt, service_fn};

/// A body of 1 KiB chunks, 1 MiB in all, that counts what was pulled from it. Far past any
/// limit here, and finite: a classify step that read on without a limit fails the test (a
/// body of spaces is no JSON) instead of hanging it.
struct Endless {
    pulled: Arc<AtomicUsize>,
}

impl http_body::Body for Endless {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.pulled.fetch_add(1024, Ordering::SeqCst) >= 1024 * 1024 {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&[b' '; 1024])))))
    }
}

#[tokio::test]
async fn response_bodies_are_read_no_further_than_the_limit() {
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = pulled.clone();
    let endless = service_fn(move |_req: Request<Full<Bytes>>| {
        let pulled = counter.clone();
        async move { Ok::<_, BoxError>(Response::new(Endless { pulled })) }
    });
    let classify = ClassifyLayer::new().max_body_bytes(8 * 1024).layer(endless);
    let error = classify
        .oneshot(Request::new(Full::new(Bytes::new())))
        .await
        .unwrap_err();
    let too_large = error.downcast_ref::<BodyTooLarge>().expect("typed error");
    assert_eq!(too_large.limit(), 8 * 1024);
    assert!(
        error
            .to_string()
            .contains("larger than the 8192-byte limit"),
        "{error}"
    );
    // One chunk past the limit was looked at, nothing more.
    assert!(pulled.load(Ordering::SeqCst) <= 9 * 1024, "{pulled:?}");

    // A declared Content-Length over the limit is refused before a byte is read.
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = pulled.clone();
    let declared = service_fn(move |_req: Request<Full<Bytes>>| {
        let pulled = counter.clone();
        async move {
            let mut response = Response::new(Endless { pulled });
            response
                .headers_mut()
                .insert("content-length", "1000000000".parse().unwrap());
            Ok::<_, BoxError>(response)
        }
    });
    let classify = ClassifyLayer::new()
        .max_body_bytes(8 * 1024)
        .layer(declared);
    let error = classify
        .oneshot(Request::new(Full::new(Bytes::new())))
        .await
        .unwrap_err();
    assert!(error.downcast_ref::<BodyTooLarge>().is_some(), "{error}");
    assert_eq!(pulled.load(Ordering::SeqCst), 0);
}

fn ok_service() -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Send,
> + Clone
+ Send {
    service_fn(|_req: Request<Full<Bytes>>| async {
        let body = r#"{"code":0,"message":"SUCCEED","request_id":"r"}"#;
        Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(body))))
    })
}

#[tokio::test(start_paused = true)]
async fn the_rate_limiter_queue_is_bounded_and_drains() {
    let layer = GcraLayer::builder(Quota::per_minute(1.0))
        .max_queue(10)
        .build()
        .unwrap();
    let handle = layer.handle();
    let service = layer.layer(ok_service());
    let account = AccountId::new("bounded");
    let call = |svc: kling_ratelimit::Gcra<_, _>| {
        let mut request = Request::new(Full::new(Bytes::new()));
        request.extensions_mut().insert(account.clone());
        tokio::spawn(svc.oneshot(request))
    };
    // The first goes at once; the next ten queue.
    call(service.clone()).await.unwrap().unwrap();
    let queued: Vec<_> = (0..10).map(|_| call(service.clone())).collect();
    tokio::task::yield_now().await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(handle.queue_depth(Some(&account)), 10);
    // The eleventh is refused at once, with the account named.
    let error = call(service.clone()).await.unwrap().unwrap_err();
    let full = error.downcast_ref::<QueueFull>().expect("typed error");
    assert_eq!(full.account(), Some(&account));
    // Dropping the waiters frees their places.
    for waiter in queued {
        waiter.abort();
        let _ = waiter.await;
    }
    tokio::task::yield_now().await;
    assert_eq!(handle.waiting(), 0);
    assert_eq!(handle.queue_depth(Some(&account)), 0);
}

#[tokio::test(start_paused = true)]
async fn idle_rate_limit_keys_are_pruned() {
    let layer = GcraLayer::new(Quota::per_minute(60.0)).unwrap();
    let handle = layer.handle();
    let service = layer.layer(ok_service());
    for i in 0..1000 {
        let mut request = Request::new(Full::new(Bytes::new()));
        request
            .extensions_mut()
            .insert(AccountId::new(format!("acct-{i}")));
        service.clone().oneshot(request).await.unwrap();
    }
    // Each key's request is paid off only a second from now: a sweep keeps them all (dropping
    // one would forget its debt and let its next request through early)...
    handle.backend().sweep();
    assert_eq!(
        handle.backend().len(),
        1000,
        "keys still paying off are kept"
    );
    // ...and once every key's state has paid off, a sweep drops them all.
    tokio::time::advance(Duration::from_secs(11 * 60)).await;
    handle.backend().sweep();
    assert_eq!(handle.backend().len(), 0);
}

#[tokio::test(start_paused = true)]
async fn finished_tasks_and_expired_leases_are_forgotten() {
    let next = Arc::new(AtomicUsize::new(0));
    let client = service_fn(move |_req: Request<Full<Bytes>>| {
        let id = next.fetch_add(1, Ordering::SeqCst);
        async move {
            let body = format!(
                r#"{{"code":0,"message":"SUCCEED","request_id":"r","data":{{"task_id":"t{id}","task_status":"submitted"}}}}"#
            );
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(body))))
        }
    });
    let (layer, handle) =
        TaskSlotsLayer::pair(SlotsConfig::new(1000).lease(Duration::from_secs(600))).unwrap();
    let slots = layer.layer(client);
    let create = || {
        Request::post("/v1/videos/text2video")
            .body(Full::new(Bytes::from(r#"{"prompt":"x"}"#)))
            .unwrap()
    };
    for _ in 0..1000 {
        slots.clone().oneshot(create()).await.unwrap();
    }
    let tasks = |s: &kling_concurrency::Snapshot| s.pools().iter().map(|p| p.tasks).sum::<usize>();
    assert_eq!(tasks(&handle.snapshot().await.unwrap()), 1000);
    // Half end through callbacks: their records go.
    for id in 0..500 {
        let body = format!(r#"{{"task_id":"t{id}","task_status":"succeed"}}"#);
        handle.on_callback(body.as_bytes()).await.unwrap();
    }
    assert_eq!(tasks(&handle.snapshot().await.unwrap()), 500);
    // Nothing reports the rest: their leases end and their records go too.
    tokio::time::advance(Duration::from_secs(601)).await;
    let snapshot = handle.snapshot().await.unwrap();
    assert_eq!(tasks(&snapshot), 0);
    assert!(snapshot.pools().iter().all(|p| p.in_use == 0));
}

#[test]
fn the_webhook_replay_cache_is_bounded() {
    let secret = "whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM=";
    let verifier = WebhookVerifier::new(secret)
        .unwrap()
        .replay_capacity(100)
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let headers = |id: &str| {
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", id.parse().unwrap());
        headers.insert("webhook-timestamp", now.to_string().parse().unwrap());
        let signature = WebhookVerifier::sign(secret, id, now, b"{}").unwrap();
        headers.insert("webhook-signature", signature.parse().unwrap());
        headers
    };
    for i in 0..1000 {
        verifier
            .verify(&headers(&format!("msg-{i}")), b"{}")
            .unwrap();
    }
    // The newest 100 ids are remembered, the oldest of them too...
    for id in ["msg-999", "msg-950", "msg-900"] {
        let replay = verifier.verify(&headers(id), b"{}").unwrap_err();
        assert_eq!(replay.kind(), WebhookErrorKind::Replayed, "{id}");
    }
    // ...and the ones before were let go: the cache holds its capacity, no less and no more.
    // (Within the time tolerance such an id would pass again, so the capacity must exceed the
    // callbacks one tolerance window brings; SECURITY.md says so.)
    assert!(verifier.verify(&headers("msg-899"), b"{}").is_ok());
    assert!(verifier.verify(&headers("msg-0"), b"{}").is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_create_sent_again_under_its_external_id_frees_the_first_attempts_slot() {
    // The first attempt is reset after it was sent (outcome unknown: its slot is kept under the
    // external id); the second, with the same external id, makes the task.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let client = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
                return Err::<Response<Full<Bytes>>, BoxError>(Box::new(
                    kling_core::error::Transport::new(reset),
                ));
            }
            let body = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t1","task_status":"submitted","task_info":{"external_task_id":"job-1"}}}"#;
            Ok(Response::new(Full::new(Bytes::from(body))))
        }
    });
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap();
    let slots = layer.layer(client);
    let create = || {
        Request::post("/v1/videos/text2video")
            .body(Full::new(Bytes::from(
                r#"{"prompt":"x","external_task_id":"job-1"}"#,
            )))
            .unwrap()
    };
    assert!(slots.clone().oneshot(create()).await.is_err());
    let in_use = |s: &kling_concurrency::Snapshot| s.pools().iter().map(|p| p.in_use).sum::<u32>();
    assert_eq!(
        in_use(&handle.snapshot().await.unwrap()),
        1,
        "kept: the task may exist"
    );
    slots.clone().oneshot(create()).await.unwrap();
    // One task, one slot (before the fix, the first attempt's slot hid until its lease).
    assert_eq!(in_use(&handle.snapshot().await.unwrap()), 1);
    handle
        .on_callback(br#"{"task_id":"t1","task_status":"succeed"}"#)
        .await
        .unwrap();
    assert_eq!(in_use(&handle.snapshot().await.unwrap()), 0);
}

#[tokio::test(start_paused = true)]
async fn a_create_the_rate_limiter_refuses_gives_its_slot_back() {
    // DESIGN.md's order: the task slots above the rate limiter. A create granted a slot and then
    // refused by the rate limiter never left the process, so its slot must come back at once,
    // not stay held as "may have made a task" until its lease ends.
    let next = Arc::new(AtomicUsize::new(0));
    let client = service_fn(move |_req: Request<Full<Bytes>>| {
        let id = next.fetch_add(1, Ordering::SeqCst);
        async move {
            let body = format!(
                r#"{{"code":0,"message":"SUCCEED","request_id":"r","data":{{"task_id":"t{id}","task_status":"submitted"}}}}"#
            );
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(body))))
        }
    });
    let rate = GcraLayer::builder(Quota::per_minute(1.0))
        .max_wait(Duration::from_secs(1))
        .build()
        .unwrap();
    let (slots, handle) =
        TaskSlotsLayer::pair(SlotsConfig::new(2).lease(Duration::from_secs(3600))).unwrap();
    let service = slots.layer(rate.layer(client));
    let create = || {
        let mut request = Request::post("/v1/videos/text2video")
            .body(Full::new(Bytes::from(r#"{"prompt":"x"}"#)))
            .unwrap();
        request.extensions_mut().insert(AccountId::new("refused"));
        request
    };
    service.clone().oneshot(create()).await.unwrap();
    let error = service.clone().oneshot(create()).await.unwrap_err();
    assert!(
        error.is::<kling_ratelimit::error::WaitExceeded>(),
        "refused by the rate limiter: {error}"
    );
    assert_eq!(
        kling_core::SendState::of(&*error),
        kling_core::SendState::NotSent
    );
    let in_use = |s: &kling_concurrency::Snapshot| s.pools().iter().map(|p| p.in_use).sum::<u32>();
    assert_eq!(
        in_use(&handle.snapshot().await.unwrap()),
        1,
        "only the task that was made holds a slot"
    );
}
