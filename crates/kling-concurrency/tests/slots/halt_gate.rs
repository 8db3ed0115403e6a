//! A create whose slots were granted before its account's `1102`, and which a layer below the
//! slots (a rate limiter) still held back when the `1102` came, is refused by the classify step,
//! unsent (paused time).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use kling_concurrency::error::Halted;
use kling_concurrency::{SlotsConfig, SlotsHandle, TaskSlots, TaskSlotsLayer};
use kling_core::error::{BoxError, may_have_created};
use kling_core::{AccountId, Classify, ClassifyLayer, Code, Pool, Product, SendState};
use tokio::time::advance;
use tokio_test::task::spawn;
use tokio_test::{assert_pending, assert_ready_err, assert_ready_ok};
use tower::{Layer, Service, ServiceExt};

use crate::support::*;

/// Holds a request marked `x-hold` for a second before it passes it on, as a rate limiter's
/// queue below the slots does.
#[derive(Clone)]
struct HoldBelow<S>(S);

type Reply = Result<Response<Full<Bytes>>, BoxError>;

impl<S> Service<Request<Full<Bytes>>> for HoldBelow<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Reply> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let mut inner = self.0.clone();
        let hold = req.headers().contains_key("x-hold");
        Box::pin(async move {
            if hold {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            inner.ready().await?.call(req).await
        })
    }
}

type Stack = TaskSlots<HoldBelow<Classify<Fake>>>;

fn stack(capacity: u32) -> (Stack, SlotsHandle, Fake) {
    let fake = Fake::new();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(capacity)).unwrap();
    let below = HoldBelow(ClassifyLayer::new().layer(fake.clone()));
    (layer.layer(below), handle, fake)
}

async fn call(
    svc: &mut Stack,
    req: Request<Full<Bytes>>,
) -> <Stack as Service<Request<Full<Bytes>>>>::Future {
    svc.ready().await.unwrap();
    svc.call(req)
}

async fn send(svc: &mut Stack, req: Request<Full<Bytes>>) -> Reply {
    call(svc, req).await.await
}

/// `req`, held below the slots for a second.
fn held(mut req: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    req.headers_mut()
        .insert("x-hold", http::HeaderValue::from_static("1"));
    req
}

fn of_account(mut req: Request<Full<Bytes>>, account: &str) -> Request<Full<Bytes>> {
    req.extensions_mut().insert(AccountId::new(account));
    req
}

/// The refusal of a create held below while its account's `1102` came: the slots layer's
/// `Halted`, read as never sent (so no retry, no task, the slots given back).
fn assert_refused_unsent(err: &BoxError) {
    let halted = err
        .downcast_ref::<Halted>()
        .expect("the slots layer's Halted");
    assert_eq!(halted.code(), Code::ResourcePackExhausted);
    assert_eq!(SendState::of(&**err), SendState::NotSent);
    assert!(!may_have_created(&**err));
}

#[tokio::test(start_paused = true)]
async fn a_create_granted_before_a_1102_and_held_below_is_not_sent_after_it() {
    let (mut svc, handle, fake) = stack(5);
    // Granted at once, then held below the slots; another account's too.
    let mut before = spawn(call(&mut svc, held(create())).await);
    let mut other = spawn(call(&mut svc, held(of_account(create(), "other"))).await);
    assert_pending!(before.poll());
    assert_pending!(other.poll());
    assert_eq!(pool_state(&handle, &video()).await.0, 1, "granted");

    // Another create of the account meets 1102 meanwhile.
    fake.script(Scripted::Code(1102, 429));
    let halting = send(&mut svc, create()).await.unwrap();
    assert_eq!(halting.status(), 429);
    assert_eq!(fake.creates(), 1);

    advance(Duration::from_secs(1)).await;
    let err = assert_ready_err!(before.poll());
    assert_refused_unsent(&err);
    assert_eq!(fake.creates(), 1, "never reached the server");
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        0,
        "its slot given back"
    );
    // The other account was not halted: its create goes out.
    assert_ready_ok!(other.poll());
    assert_eq!(fake.creates(), 2);

    // Once the halt is lifted, a create granted after it goes out, held below or not.
    assert!(handle.reset_halt(handle.default_account()).await.unwrap());
    let mut after = spawn(call(&mut svc, held(create())).await);
    assert_pending!(after.poll());
    advance(Duration::from_secs(1)).await;
    assert_ready_ok!(after.poll());
    send(&mut svc, create()).await.unwrap();
    assert_eq!(fake.creates(), 4);
}

/// A create that waited for its slots, then was held below: the same.
#[tokio::test(start_paused = true)]
async fn a_create_that_waited_for_its_slots_is_not_sent_after_a_later_1102() {
    let (mut svc, handle, fake) = stack(1);
    let first = call(&mut svc, create()).await;
    let mut waiting = spawn(call(&mut svc, held(create())).await);
    assert_pending!(waiting.poll());
    // The first one never leaves (a refused connection): its slot goes back.
    fake.script(Scripted::Refused);
    first.await.unwrap_err();
    assert!(waiting.is_woken());
    // Granted now, and held below.
    assert_pending!(waiting.poll());
    assert_eq!(pool_state(&handle, &video()).await.0, 1, "granted");

    // Another pool of the account meets 1102.
    fake.script(Scripted::Code(1102, 429));
    send(&mut svc, post("/v1/images/generations", "{}"))
        .await
        .unwrap();
    advance(Duration::from_secs(1)).await;
    let err = assert_ready_err!(waiting.poll());
    assert_refused_unsent(&err);
    assert_eq!(fake.creates(), 2, "the refused one and the 1102's only");
    assert_eq!(pool_state(&handle, &video()).await.0, 0);
    let image = Pool::new(Product::Image);
    assert_eq!(pool_state(&handle, &image).await.0, 0);
}

/// A halt lifted while the create is still held below: it goes out (its account is no longer
/// halted when it would be sent).
#[tokio::test(start_paused = true)]
async fn a_create_held_below_while_a_halt_comes_and_goes_is_sent() {
    let (mut svc, handle, fake) = stack(5);
    let mut before = spawn(call(&mut svc, held(create())).await);
    assert_pending!(before.poll());
    fake.script(Scripted::Code(1102, 429));
    send(&mut svc, create()).await.unwrap();
    assert!(handle.reset_halt(handle.default_account()).await.unwrap());
    advance(Duration::from_secs(1)).await;
    assert_ready_ok!(before.poll());
    assert_eq!(fake.creates(), 2);
}

/// A metrics recorder that panics as a `1102`'s slot is given back loses no halt. Before, the
/// in-process backend moved its in-use gauge before it filed the halt, and counted the halt
/// for the classify step only once the change returned: a panic there left the account
/// unhalted, and both the create granted before the `1102` (held below) and the next one were
/// sent after it. Now the halt is filed first and counted also when the change unwinds.
#[tokio::test(start_paused = true)]
async fn a_panicking_metrics_recorder_loses_no_1102_halt() {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::atomic::Ordering;

    let recorder = crate::leaks::PanickyRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (mut svc, handle, fake) = stack(5);
    // Granted (the pool and its gauges made with nothing panicking), then held below.
    let mut before = spawn(call(&mut svc, held(create())).await);
    assert_pending!(before.poll());

    fake.script(Scripted::Code(1102, 429));
    let mut halting = spawn(call(&mut svc, create()).await);
    // The 1102's slot going back moves the in-use gauge: it panics.
    recorder.in_use.store(true, Ordering::SeqCst);
    assert!(catch_unwind(AssertUnwindSafe(|| halting.poll())).is_err());
    drop(halting);
    assert_eq!(fake.creates(), 1, "the 1102's");

    advance(Duration::from_secs(1)).await;
    let err = assert_ready_err!(before.poll());
    assert_refused_unsent(&err);
    let err = send(&mut svc, create()).await.unwrap_err();
    assert!(err.is::<Halted>(), "{err}");
    assert_eq!(fake.creates(), 1, "nothing sent after the 1102");
    assert_eq!(pool_state(&handle, &video()).await.0, 0, "no slot held");
}
