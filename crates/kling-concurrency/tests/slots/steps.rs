//! Paused-time tests that drive the task-slots layer step by step.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use kling_concurrency::error::{DeadlineExceeded, Halted, OverCapacity, QueueFull};
use kling_concurrency::{SlotsConfig, TaskSlots, TaskSlotsLayer};
use kling_core::error::BoxError;
use kling_core::signals::{Deadline, SlotGated, Waited};
use kling_core::{Code, Outcome, Pool, Product};
use tokio::time::{Instant, advance};
use tokio_test::task::spawn;
use tokio_test::{assert_pending, assert_ready_err, assert_ready_ok};
use tower::{Layer, Service, ServiceExt};

use crate::support::*;

type Slots = TaskSlots<Fake>;

fn stack(config: SlotsConfig) -> (Slots, kling_concurrency::SlotsHandle, Fake) {
    let fake = Fake::new();
    let (layer, handle) = TaskSlotsLayer::pair(config).unwrap();
    (layer.layer(fake.clone()), handle, fake)
}

async fn call(
    svc: &mut Slots,
    req: Request<Full<Bytes>>,
) -> <Slots as Service<Request<Full<Bytes>>>>::Future {
    svc.ready().await.unwrap();
    svc.call(req)
}

async fn send(
    svc: &mut Slots,
    req: Request<Full<Bytes>>,
) -> Result<Response<Full<Bytes>>, BoxError> {
    call(svc, req).await.await
}

fn task_id(response: &Response<Full<Bytes>>) -> String {
    Outcome::of(response).unwrap().task().unwrap().id.clone()
}

#[tokio::test(start_paused = true)]
async fn create_over_capacity_waits_until_a_query_reports_an_earlier_task_ended() {
    let (mut svc, handle, fake) = stack(SlotsConfig::new(2));
    let t1 = task_id(&send(&mut svc, create()).await.unwrap());
    send(&mut svc, create()).await.unwrap();
    assert_eq!(fake.creates(), 2);

    let mut third = spawn(call(&mut svc, create()).await);
    assert_pending!(third.poll());
    advance(Duration::from_secs(600)).await;
    assert_pending!(third.poll());
    assert_eq!(
        fake.creates(),
        2,
        "the third create must not reach the server"
    );
    assert_eq!(pool_state(&handle, &video()).await, (2, 2, 1));

    // A query that says t1 is still running frees nothing.
    send(&mut svc, get(&format!("/v1/videos/text2video/{t1}")))
        .await
        .unwrap();
    assert!(!third.is_woken());
    assert_pending!(third.poll());

    fake.finish(&t1);
    send(&mut svc, get(&format!("/v1/videos/text2video/{t1}")))
        .await
        .unwrap();
    assert!(third.is_woken());
    let response = assert_ready_ok!(third.poll());
    assert_eq!(fake.creates(), 3);
    let waited = response.extensions().get::<Waited>().unwrap();
    assert_eq!(waited.slots, Duration::from_secs(600));
    assert_eq!(pool_state(&handle, &video()).await, (2, 2, 0));
}

#[tokio::test(start_paused = true)]
async fn a_batch_query_ending_two_tasks_wakes_two_waiters() {
    let (mut svc, handle, fake) = stack(SlotsConfig::new(2));
    let path = "/text-to-video/kling-3.0";
    let pool = Pool::with_model(Product::Video, "kling-3.0");
    let a = task_id(&send(&mut svc, post(path, "{}")).await.unwrap());
    let b = task_id(&send(&mut svc, post(path, "{}")).await.unwrap());
    let mut w1 = spawn(call(&mut svc, post(path, "{}")).await);
    let mut w2 = spawn(call(&mut svc, post(path, "{}")).await);
    let mut w3 = spawn(call(&mut svc, post(path, "{}")).await);
    assert_pending!(w1.poll());
    assert_pending!(w2.poll());
    assert_pending!(w3.poll());
    assert_eq!(pool_state(&handle, &pool).await, (2, 2, 3));

    fake.finish(&a);
    fake.finish(&b);
    send(&mut svc, get(&format!("/tasks?task_ids={a},{b}")))
        .await
        .unwrap();
    assert!(w1.is_woken() && w2.is_woken());
    assert!(!w3.is_woken(), "only two slots freed");
    assert_ready_ok!(w1.poll());
    assert_ready_ok!(w2.poll());
    assert_pending!(w3.poll());
    assert_eq!(fake.creates(), 4);
    assert_eq!(pool_state(&handle, &pool).await, (2, 2, 1));
}

#[tokio::test(start_paused = true)]
async fn a_create_beyond_a_full_queue_is_refused_unsent() {
    let (mut svc, handle, fake) = stack(SlotsConfig::new(1).max_queue(1));
    let t1 = task_id(&send(&mut svc, create()).await.unwrap());
    let mut waiting = spawn(call(&mut svc, create()).await);
    assert_pending!(waiting.poll());
    let err = send(&mut svc, create()).await.unwrap_err();
    let full = err.downcast_ref::<QueueFull>().expect("typed error");
    assert_eq!((full.pool(), full.max()), (&video(), 1));
    assert_eq!(full.account(), handle.default_account());
    assert_eq!(
        full.to_string(),
        "the queue of pool video of account default is full (1 waiting)"
    );
    assert_eq!(fake.creates(), 1, "the refused create was not sent");
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 1));

    // The waiter keeps its turn; once it is served, the queue has room again.
    fake.finish(&t1);
    send(&mut svc, get(&format!("/v1/videos/text2video/{t1}")))
        .await
        .unwrap();
    assert_ready_ok!(waiting.poll());
    let mut next = spawn(call(&mut svc, create()).await);
    assert_pending!(next.poll());
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn with_no_queue_a_create_waits_for_nothing() {
    let (mut svc, handle, fake) = stack(SlotsConfig::new(1).max_queue(0));
    let t1 = task_id(&send(&mut svc, create()).await.unwrap());
    let err = send(&mut svc, create()).await.unwrap_err();
    let full = err.downcast_ref::<QueueFull>().expect("typed error");
    assert_eq!(full.max(), 0);
    assert_eq!(
        full.to_string(),
        "no free slot in pool video of account default and creates may not wait"
    );
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
    // A free slot is taken at once.
    fake.finish(&t1);
    send(&mut svc, get(&format!("/v1/videos/text2video/{t1}")))
        .await
        .unwrap();
    send(&mut svc, create()).await.unwrap();
    assert_eq!(fake.creates(), 2);
}

// Without a bound, the same creates wait (the control of the two tests above).
#[tokio::test(start_paused = true)]
async fn without_a_bound_every_create_waits() {
    let (mut svc, handle, _fake) = stack(SlotsConfig::new(1));
    send(&mut svc, create()).await.unwrap();
    let mut waiters: Vec<_> = Vec::new();
    for _ in 0..3 {
        let mut w = spawn(call(&mut svc, create()).await);
        assert_pending!(w.poll());
        waiters.push(w);
    }
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 3));
}

#[tokio::test(start_paused = true)]
async fn a_callback_releases_the_slots_once() {
    let (mut svc, handle, _fake) = stack(SlotsConfig::new(1));
    let t1 = task_id(&send(&mut svc, create()).await.unwrap());
    let mut waiting = spawn(call(&mut svc, create()).await);
    assert_pending!(waiting.poll());

    let running = format!(r#"{{"task_id":"{t1}","task_status":"processing"}}"#);
    let applied = handle.on_callback(running.as_bytes()).await.unwrap();
    assert!(applied.released.is_empty());
    assert_pending!(waiting.poll());

    let ended = format!(r#"{{"task_id":"{t1}","task_status":"succeed"}}"#);
    let applied = handle.on_callback(ended.as_bytes()).await.unwrap();
    assert_eq!(applied.released.len(), 1);
    assert_eq!(applied.released[0].task.as_deref(), Some(t1.as_str()));
    assert_ready_ok!(waiting.poll());

    // A repeated delivery, or `complete`, releases nothing more.
    assert!(
        handle
            .on_callback(ended.as_bytes())
            .await
            .unwrap()
            .released
            .is_empty()
    );
    assert!(handle.complete(&t1).await.unwrap().is_none());
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn complete_releases_a_task_by_id() {
    let (mut svc, handle, _fake) = stack(SlotsConfig::new(3));
    let t1 = task_id(&send(&mut svc, create()).await.unwrap());
    assert_eq!(pool_state(&handle, &video()).await.0, 1);
    let released = handle.complete(&t1).await.unwrap().unwrap();
    assert_eq!(released.weight, 1);
    assert_eq!(pool_state(&handle, &video()).await.0, 0);
}

#[tokio::test(start_paused = true)]
async fn an_answer_without_the_external_id_keeps_the_task_under_the_one_sent() {
    let (mut svc, handle, fake) = stack(SlotsConfig::new(3));
    // Short enough to be kept inline, and longer than that.
    let long = "kr-0123456789abcdef0123456789abcdef-and-then-some";
    for external in ["job-1", long] {
        fake.script(Scripted::Unechoed);
        let response = send(&mut svc, create_with_external(external))
            .await
            .unwrap();
        assert_eq!(
            Outcome::of(&response).unwrap().task().unwrap().external_id,
            None
        );
    }
    assert_eq!(pool_state(&handle, &video()).await.0, 2);
    // Known by the external ids the creates carried.
    let released = handle.complete(long).await.unwrap().unwrap();
    assert_eq!(released.task.as_deref(), Some("t2"));
    assert!(handle.complete("job-1").await.unwrap().is_some());
    assert_eq!(pool_state(&handle, &video()).await.0, 0);
}

#[tokio::test(start_paused = true)]
async fn the_lease_deadline_releases_a_task_nobody_follows() {
    let lease = Duration::from_secs(600);
    let (mut svc, handle, _fake) = stack(SlotsConfig::new(1).lease(lease));
    let t1 = task_id(&send(&mut svc, create()).await.unwrap());
    advance(Duration::from_secs(300)).await;
    // A query that reports the task running renews its lease from now.
    send(&mut svc, get(&format!("/v1/videos/text2video/{t1}")))
        .await
        .unwrap();

    let mut waiting = spawn(call(&mut svc, create()).await);
    assert_pending!(waiting.poll());
    advance(Duration::from_secs(599)).await;
    assert_pending!(waiting.poll());
    advance(Duration::from_secs(1)).await;
    assert!(waiting.is_woken(), "the waiter sleeps until the lease ends");
    assert_ready_ok!(waiting.poll());
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
    // The expired task is gone for good: a late report of it releases nothing.
    assert!(handle.complete(&t1).await.unwrap().is_none());
    assert_eq!(pool_state(&handle, &video()).await.0, 1);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiting_create_holds_nothing() {
    let (mut svc, handle, fake) = stack(SlotsConfig::new(1));
    let t1 = task_id(&send(&mut svc, create()).await.unwrap());
    let mut first = spawn(call(&mut svc, create()).await);
    let mut second = spawn(call(&mut svc, create()).await);
    assert_pending!(first.poll());
    assert_pending!(second.poll());
    assert_eq!(pool_state(&handle, &video()).await.2, 2);
    drop(first);
    assert_eq!(pool_state(&handle, &video()).await.2, 1);

    fake.finish(&t1);
    send(&mut svc, get(&format!("/v1/videos/text2video/{t1}")))
        .await
        .unwrap();
    assert_ready_ok!(second.poll());
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
    assert_eq!(fake.creates(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_create_granted_then_dropped_before_it_was_sent_gives_its_slot_on() {
    let (mut svc, handle, fake) = stack(SlotsConfig::new(1));
    let t1 = task_id(&send(&mut svc, create()).await.unwrap());
    let mut granted = spawn(call(&mut svc, create()).await);
    let mut next = spawn(call(&mut svc, create()).await);
    assert_pending!(granted.poll());
    assert_pending!(next.poll());
    fake.finish(&t1);
    send(&mut svc, get(&format!("/v1/videos/text2video/{t1}")))
        .await
        .unwrap();
    // The head was handed the slot but is dropped before it picks it up.
    drop(granted);
    assert!(next.is_woken());
    assert_ready_ok!(next.poll());
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
}

/// A service whose responses the test sends by hand.
type Manual = tower_test::mock::Mock<Request<Full<Bytes>>, Response<Full<Bytes>>>;

#[tokio::test(start_paused = true)]
async fn a_dropped_response_future_after_the_create_was_sent_does_not_leak_its_slot() {
    let (mock, mut server) =
        tower_test::mock::pair::<Request<Full<Bytes>>, Response<Full<Bytes>>>();
    let lease = Duration::from_secs(900);
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2).lease(lease)).unwrap();
    let mut svc: TaskSlots<Manual> = layer.layer(mock);

    // With an external id: kept under it until a report of the task says it ended.
    svc.ready().await.unwrap();
    let mut with_ext = spawn(svc.call(create_with_external("job-1")));
    assert_pending!(with_ext.poll());
    let (_req, _respond) = server.next_request().await.unwrap();
    drop(with_ext);
    // Without one: kept under the lease alone.
    svc.ready().await.unwrap();
    let mut anon = spawn(svc.call(create()));
    assert_pending!(anon.poll());
    let (_req2, _respond2) = server.next_request().await.unwrap();
    drop(anon);
    assert_eq!(pool_state(&handle, &video()).await, (2, 2, 0));

    // A list reports the task the first create made, by its external id, as failed.
    svc.ready().await.unwrap();
    let mut list = spawn(svc.call(get("/v1/videos/text2video?pageNum=1&pageSize=30")));
    assert_pending!(list.poll());
    let (_req, respond) = server.next_request().await.unwrap();
    respond.send_response(envelope(
        200,
        0,
        &serde_json::json!([{"task_id":"t77","task_status":"failed","task_info":{"external_task_id":"job-1"}}]),
    ));
    assert_ready_ok!(list.poll());
    assert_eq!(pool_state(&handle, &video()).await.0, 1);

    advance(lease).await;
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        0,
        "the lease ended the other"
    );
}

#[tokio::test(start_paused = true)]
async fn unknown_outcomes_keep_the_slot_and_refused_sends_give_it_back() {
    let (mut svc, handle, fake) = stack(SlotsConfig::new(4));
    fake.script(Scripted::Refused);
    assert!(send(&mut svc, create_with_external("e1")).await.is_err());
    assert_eq!(pool_state(&handle, &video()).await.0, 0);

    fake.script(Scripted::Lost);
    let err = send(&mut svc, create_with_external("e2"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("after it was sent"), "{err}");
    assert_eq!(pool_state(&handle, &video()).await.0, 1);

    fake.script(Scripted::Code(5000, 500));
    send(&mut svc, create_with_external("e3")).await.unwrap();
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        2,
        "a 5000 may have created e3"
    );
    fake.script(Scripted::Code(5000, 500));
    send(&mut svc, create()).await.unwrap();
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        3,
        "no external id: the task may run all the same, kept under its lease"
    );
    fake.script(Scripted::Code(1301, 400));
    send(&mut svc, create_with_external("e4")).await.unwrap();
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        3,
        "a fatal 4xx created nothing"
    );
    fake.script(Scripted::Code(1299, 400));
    send(&mut svc, create_with_external("e5")).await.unwrap();
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        3,
        "an undocumented code with a 4xx status created nothing"
    );

    // `complete` by external id ends a task whose id was never learnt.
    assert!(handle.complete("e2").await.unwrap().is_some());
    assert!(handle.complete("e3").await.unwrap().is_some());
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        1,
        "the lease holds one"
    );
}

#[tokio::test(start_paused = true)]
async fn a_1303_gives_back_lowers_capacity_and_it_grows_back() {
    let (mut svc, handle, fake) =
        stack(SlotsConfig::new(3).recovery_interval(Duration::from_secs(20)));
    let t1 = task_id(&send(&mut svc, create()).await.unwrap());
    fake.script(Scripted::Code(1303, 429));
    let response = send(&mut svc, create()).await.unwrap();
    assert_eq!(
        Outcome::of(&response).unwrap().code(),
        Code::ParallelTaskLimit
    );
    assert!(response.extensions().get::<SlotGated>().is_some());
    // Given back, and the pool is believed to hold only what we hold.
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));

    let mut retried = spawn(call(&mut svc, create()).await);
    assert_pending!(retried.poll());
    advance(Duration::from_secs(19)).await;
    assert_pending!(retried.poll());
    assert_eq!(fake.creates(), 2);

    // Our task ends: its slot frees, and one hidden slot comes back with it.
    fake.finish(&t1);
    send(&mut svc, get(&format!("/v1/videos/text2video/{t1}")))
        .await
        .unwrap();
    assert_ready_ok!(retried.poll());
    assert_eq!(pool_state(&handle, &video()).await, (1, 2, 0));

    // With no new 1303, the last hidden slot comes back by time.
    advance(Duration::from_secs(20)).await;
    assert_eq!(pool_state(&handle, &video()).await, (1, 3, 0));
}

#[tokio::test(start_paused = true)]
async fn a_1303_with_nothing_of_ours_running_recovers_by_time() {
    let (mut svc, handle, fake) =
        stack(SlotsConfig::new(2).recovery_interval(Duration::from_secs(20)));
    refused(&mut svc, &fake).await;
    assert_eq!(pool_state(&handle, &video()).await, (0, 0, 0));
    let mut retried = spawn(call(&mut svc, create()).await);
    assert_pending!(retried.poll());
    advance(Duration::from_secs(20)).await;
    assert!(retried.is_woken());
    assert_ready_ok!(retried.poll());
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
}

/// A create already waiting (the queue's head, asleep until our running task's lease ends)
/// when a 1303 hides a slot is woken when that slot comes back by time, 20 s later, not at the
/// lease's end half an hour on. (No snapshot before the check: taking one runs the recovery.)
#[tokio::test(start_paused = true)]
async fn a_waiting_create_is_woken_when_a_slot_hidden_after_it_came_back_by_time() {
    let (mut svc, handle, fake) =
        stack(SlotsConfig::new(2).recovery_interval(Duration::from_secs(20)));
    let _t1 = task_id(&send(&mut svc, create()).await.unwrap());
    fake.script(Scripted::Code(1303, 429));
    // Granted at once; its answer, a 1303, is read below.
    let refused = call(&mut svc, create()).await;
    let mut waiting = spawn(call(&mut svc, create()).await);
    assert_pending!(waiting.poll());
    refused.await.unwrap();
    advance(Duration::from_secs(20)).await;
    assert!(waiting.is_woken(), "the hidden slot is back");
    assert_ready_ok!(waiting.poll());
    assert_eq!(pool_state(&handle, &video()).await, (2, 2, 0));
}

#[tokio::test(start_paused = true)]
async fn a_1102_halts_creates_locally_until_reset() {
    let (mut svc, handle, fake) = stack(SlotsConfig::new(3));
    let t1 = task_id(&send(&mut svc, create()).await.unwrap());
    fake.script(Scripted::Code(1102, 429));
    send(&mut svc, create()).await.unwrap();
    assert_eq!(fake.creates(), 2);

    let err = send(&mut svc, create()).await.unwrap_err();
    let halted = err.downcast_ref::<Halted>().expect("typed error");
    assert_eq!(halted.code(), Code::ResourcePackExhausted);
    assert_eq!(halted.request_id(), Some("req-1"));
    // Queries still pass; creates never reach the server.
    send(&mut svc, get(&format!("/v1/videos/text2video/{t1}")))
        .await
        .unwrap();
    assert_eq!(fake.creates(), 2);
    assert_eq!(pool_state(&handle, &video()).await.0, 1);

    assert!(handle.reset_halt(handle.default_account()).await.unwrap());
    send(&mut svc, create()).await.unwrap();
    assert_eq!(fake.creates(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_halt_fails_creates_already_waiting() {
    let (mut svc, _handle, fake) = stack(SlotsConfig::new(1));
    let _t1 = send(&mut svc, create()).await.unwrap();
    let mut waiting = spawn(call(&mut svc, create()).await);
    assert_pending!(waiting.poll());
    // Another pool of the account meets 1102.
    fake.script(Scripted::Code(1102, 429));
    send(&mut svc, post("/v1/images/generations", "{}"))
        .await
        .unwrap();
    assert!(waiting.is_woken());
    let err = tokio_test::assert_ready_err!(waiting.poll());
    assert!(err.is::<Halted>());
}

#[tokio::test(start_paused = true)]
async fn a_wait_gives_up_at_the_request_deadline() {
    let (mut svc, handle, _fake) = stack(SlotsConfig::new(1));
    send(&mut svc, create()).await.unwrap();
    let mut req = create();
    req.extensions_mut()
        .insert(Deadline(Instant::now() + Duration::from_secs(30)));
    let mut waiting = spawn(call(&mut svc, req).await);
    assert_pending!(waiting.poll());
    advance(Duration::from_secs(30)).await;
    let err = tokio_test::assert_ready_err!(waiting.poll());
    let late = err.downcast_ref::<DeadlineExceeded>().expect("typed error");
    assert_eq!(late.waited(), Duration::from_secs(30));
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn image_creates_weigh_n_and_too_heavy_ones_are_refused() {
    let (mut svc, handle, fake) = stack(SlotsConfig::new(4));
    let image = Pool::new(Product::Image);
    send(&mut svc, post("/v1/images/generations", r#"{"n":3}"#))
        .await
        .unwrap();
    assert_eq!(pool_state(&handle, &image).await.0, 3);
    let mut two = spawn(call(&mut svc, post("/v1/images/generations", r#"{"n":2}"#)).await);
    assert_pending!(two.poll());
    let err = send(&mut svc, post("/v1/images/generations", r#"{"n":5}"#))
        .await
        .unwrap_err();
    assert!(err.is::<OverCapacity>());
    assert_eq!(fake.creates(), 1);

    // Raising the capacity at run time admits the waiter.
    handle.set_capacity(None, image.clone(), 5).await.unwrap();
    assert_ready_ok!(two.poll());
    assert_eq!(pool_state(&handle, &image).await, (5, 5, 0));
}

/// Capacities are set per account: a create too heavy for its pool names the account whose
/// capacity refused it, whether refused on arrival or when a lowered capacity no longer fits
/// it while it waits.
#[tokio::test(start_paused = true)]
async fn a_create_too_heavy_for_its_pool_names_the_account() {
    let image = Pool::new(Product::Image);
    let other = kling_core::AccountId::new("acct-b");
    let config = SlotsConfig::new(9).account_capacity(other.clone(), image.clone(), 5);
    let (mut svc, handle, fake) = stack(config);
    let nine = || {
        let mut request = post("/v1/images/generations", r#"{"n":9}"#);
        request.extensions_mut().insert(other.clone());
        request
    };
    let err = send(&mut svc, nine()).await.unwrap_err();
    let over = err.downcast_ref::<OverCapacity>().expect("typed error");
    assert_eq!(over.account(), Some(&other));
    assert_eq!(
        err.to_string(),
        "create needs 9 slot(s) but pool image of account acct-b has only 5"
    );

    // Waiting behind a create of 4 when the capacity drops to 5.
    handle
        .set_capacity(Some(&other), image.clone(), 9)
        .await
        .unwrap();
    let mut four = post("/v1/images/generations", r#"{"n":4}"#);
    four.extensions_mut().insert(other.clone());
    send(&mut svc, four).await.unwrap();
    let mut waiting = spawn(call(&mut svc, nine()).await);
    assert_pending!(waiting.poll());
    handle.set_capacity(Some(&other), image, 5).await.unwrap();
    let err = assert_ready_err!(waiting.poll());
    assert!(
        err.to_string().contains("of account acct-b has only 5"),
        "{err}"
    );
    assert_eq!(fake.creates(), 1);
}

#[tokio::test(start_paused = true)]
async fn accounts_have_their_own_slots() {
    let (mut svc, handle, _fake) = stack(SlotsConfig::new(1));
    send(&mut svc, create()).await.unwrap();
    let mut other = create();
    other
        .extensions_mut()
        .insert(kling_core::AccountId::new("other"));
    send(&mut svc, other).await.unwrap();
    let snapshot = handle.snapshot().await.unwrap();
    assert_eq!(snapshot.pools().len(), 2);
    assert!(snapshot.pools().iter().all(|p| p.in_use == 1));
}

#[tokio::test(start_paused = true)]
async fn a_create_with_free_slots_is_sent_from_call_and_a_waiting_one_once_granted() {
    let (mut svc, handle, fake) = stack(SlotsConfig::new(1));
    svc.ready().await.unwrap();
    let first = svc.call(create());
    assert_eq!(
        fake.creates(),
        1,
        "free slots and nobody ahead: sent from `call`"
    );
    let mut second = spawn(call(&mut svc, create()).await);
    assert_eq!(fake.creates(), 1, "no free slot: not sent");
    let response = first.await.unwrap();
    assert!(
        response.extensions().get::<Waited>().is_none(),
        "nothing waited"
    );
    let t1 = task_id(&response);
    assert_pending!(second.poll());
    fake.finish(&t1);
    send(&mut svc, get(&format!("/v1/videos/text2video/{t1}")))
        .await
        .unwrap();
    assert_ready_ok!(second.poll());
    assert_eq!(fake.creates(), 2);
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_create_sent_from_call_and_dropped_unpolled_keeps_its_slot_until_its_task_ends() {
    let (mut svc, handle, fake) = stack(SlotsConfig::new(1));
    svc.ready().await.unwrap();
    // Handed to the inner service in `call` (which here creates the task at once): its slot
    // stays held under its external id, as for any create dropped in flight.
    drop(svc.call(create_with_external("e1")));
    assert_eq!(fake.creates(), 1);
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
    // The retry layer's lookup by external id finds the task running: from now on it is
    // known by its task id, and its end frees the slot.
    let found = send(&mut svc, get("/v1/videos/text2video/e1"))
        .await
        .unwrap();
    let t1 = task_id(&found);
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
    fake.finish(&t1);
    send(&mut svc, get(&format!("/v1/videos/text2video/{t1}")))
        .await
        .unwrap();
    assert_eq!(pool_state(&handle, &video()).await, (0, 1, 0));
}

/// With no queue, nothing waits: a create that finds no free slot runs the pool's lease
/// expiry first, so a task nobody followed frees its slot for the next create once its lease
/// ran out (not never).
#[tokio::test(start_paused = true)]
async fn with_no_queue_an_expired_lease_frees_its_slot_for_the_next_create() {
    let lease = Duration::from_secs(30 * 60);
    let (mut svc, handle, fake) = stack(SlotsConfig::new(1).lease(lease).max_queue(0));
    send(&mut svc, create()).await.unwrap();
    advance(lease - Duration::from_secs(1)).await;
    let err = send(&mut svc, create()).await.unwrap_err();
    assert!(err.is::<QueueFull>(), "{err}");
    advance(Duration::from_secs(61)).await;
    // No snapshot in between (it would expire the lease itself): the create does it.
    send(&mut svc, create()).await.unwrap();
    assert_eq!(fake.creates(), 2);
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
}

/// With no queue, a slot hidden by a `1303` comes back by time: the refused create runs the
/// pool's recovery before it refuses.
#[tokio::test(start_paused = true)]
async fn with_no_queue_a_slot_hidden_by_a_1303_comes_back_by_time() {
    let (mut svc, handle, fake) = stack(
        SlotsConfig::new(1)
            .max_queue(0)
            .recovery_interval(Duration::from_secs(20)),
    );
    refused(&mut svc, &fake).await;
    let err = send(&mut svc, create()).await.unwrap_err();
    assert!(err.is::<QueueFull>(), "hidden: {err}");
    advance(Duration::from_secs(20)).await;
    send(&mut svc, create()).await.unwrap();
    assert_eq!(fake.creates(), 2);
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
}

/// Lowering a pool's capacity below the weight of a create already waiting refuses that create
/// (it could never be admitted) and serves the creates behind it, which it no longer blocks.
#[tokio::test(start_paused = true)]
async fn lowering_the_capacity_below_a_waiting_creates_weight_refuses_it_and_serves_the_rest() {
    let (mut svc, handle, fake) = stack(SlotsConfig::new(4));
    let image = Pool::new(Product::Image);
    let images = |n: u32| post("/v1/images/generations", &format!(r#"{{"n":{n}}}"#));
    send(&mut svc, images(1)).await.unwrap();
    let mut heavy = spawn(call(&mut svc, images(4)).await);
    let mut light = spawn(call(&mut svc, images(1)).await);
    assert_pending!(heavy.poll());
    assert_pending!(light.poll());
    assert_eq!(pool_state(&handle, &image).await, (1, 4, 2));

    handle.set_capacity(None, image.clone(), 3).await.unwrap();
    assert!(heavy.is_woken());
    let err = tokio_test::assert_ready_err!(heavy.poll());
    let over = err.downcast_ref::<OverCapacity>().expect("typed error");
    assert_eq!(
        (over.pool(), over.weight(), over.capacity()),
        (&image, 4, 3)
    );
    assert_eq!(
        err.to_string(),
        "create needs 4 slot(s) but pool image of account default has only 3"
    );
    assert!(
        light.is_woken(),
        "no longer behind a create that can never be served"
    );
    assert_ready_ok!(light.poll());
    assert_eq!(fake.creates(), 2, "the refused create was not sent");
    assert_eq!(pool_state(&handle, &image).await, (2, 3, 0));
}

/// Sends a create the fake server answers with a 1303.
async fn refused(svc: &mut Slots, fake: &Fake) {
    fake.script(Scripted::Code(1303, 429));
    send(svc, create()).await.unwrap();
}

/// Ends `id` at the fake server and queries it, so the layer sees the task end.
async fn end(svc: &mut Slots, fake: &Fake, id: &str) {
    fake.finish(id);
    send(svc, get(&format!("/v1/videos/text2video/{id}")))
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_second_1303_at_the_same_level_stops_ended_tasks_bringing_slots_back_and_doubles_recovery()
 {
    let (mut svc, handle, fake) =
        stack(SlotsConfig::new(4).recovery_interval(Duration::from_secs(20)));
    let t1 = task_id(&send(&mut svc, create()).await.unwrap());
    let t2 = task_id(&send(&mut svc, create()).await.unwrap());
    // Refused at 3 slots: the pool is believed to hold the 2 we hold.
    refused(&mut svc, &fake).await;
    assert_eq!(pool_state(&handle, &video()).await, (2, 2, 0));

    // The first 1303 is no pattern yet: an ended task brings a hidden slot back with it.
    end(&mut svc, &fake, &t1).await;
    assert_eq!(pool_state(&handle, &video()).await, (1, 3, 0));
    let _t3 = task_id(&send(&mut svc, create()).await.unwrap());
    // Refused at 3 slots again.
    refused(&mut svc, &fake).await;
    assert_eq!(pool_state(&handle, &video()).await, (2, 2, 0));

    // Now an ended task frees only its own slot,
    end(&mut svc, &fake, &t2).await;
    assert_eq!(pool_state(&handle, &video()).await, (1, 2, 0));
    // and a hidden slot comes back after twice the interval, not once.
    advance(Duration::from_secs(20)).await;
    assert_eq!(pool_state(&handle, &video()).await, (1, 2, 0));
    advance(Duration::from_secs(20)).await;
    assert_eq!(pool_state(&handle, &video()).await, (1, 3, 0));
    assert_eq!(fake.creates(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_create_that_succeeds_at_the_refused_level_ends_the_1303_streak() {
    let (mut svc, handle, fake) =
        stack(SlotsConfig::new(3).recovery_interval(Duration::from_secs(20)));
    let t1 = task_id(&send(&mut svc, create()).await.unwrap());
    // Two 1303s at 2 slots: a streak.
    for _ in 0..2 {
        refused(&mut svc, &fake).await;
        assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
    }
    // The streak doubled the interval: one slot back after 40 s, none after 20.
    advance(Duration::from_secs(20)).await;
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
    advance(Duration::from_secs(20)).await;
    assert_eq!(pool_state(&handle, &video()).await, (1, 2, 0));

    // The unseen holder let go: a create succeeds at the level that was refused,
    let _t2 = task_id(&send(&mut svc, create()).await.unwrap());
    // so ended tasks bring hidden slots back again, and the interval is the configured one.
    end(&mut svc, &fake, &t1).await;
    assert_eq!(pool_state(&handle, &video()).await, (1, 3, 0));
    let _t3 = task_id(&send(&mut svc, create()).await.unwrap());
    refused(&mut svc, &fake).await;
    assert_eq!(pool_state(&handle, &video()).await, (2, 2, 0));
    advance(Duration::from_secs(20)).await;
    assert_eq!(pool_state(&handle, &video()).await, (2, 3, 0));
}

#[tokio::test(start_paused = true)]
async fn a_success_while_another_create_awaits_its_answer_proves_nothing() {
    let (mut svc, handle, fake) =
        stack(SlotsConfig::new(2).recovery_interval(Duration::from_secs(20)));
    let t1 = task_id(&send(&mut svc, create()).await.unwrap());
    // Two 1303s at 2 slots (the second after the hidden slot came back by time): a streak.
    refused(&mut svc, &fake).await;
    advance(Duration::from_secs(20)).await;
    refused(&mut svc, &fake).await;
    end(&mut svc, &fake, &t1).await;
    assert_eq!(pool_state(&handle, &video()).await, (0, 1, 0));
    advance(Duration::from_secs(40)).await;
    assert_eq!(pool_state(&handle, &video()).await, (0, 2, 0));

    // Both slots are granted at once; the first succeeds while the second is unanswered, so
    // holding 2 proves nothing yet, and the second's 1303 continues the streak.
    let first = call(&mut svc, create()).await;
    fake.script(Scripted::Code(1303, 429));
    let second = call(&mut svc, create()).await;
    first.await.unwrap();
    second.await.unwrap();
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
    // Three in a row: four times the interval.
    advance(Duration::from_secs(79)).await;
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
    advance(Duration::from_secs(1)).await;
    assert_eq!(pool_state(&handle, &video()).await, (1, 2, 0));
}

#[tokio::test(start_paused = true)]
async fn setting_the_capacity_ends_a_1303_streak() {
    let (mut svc, handle, fake) =
        stack(SlotsConfig::new(4).recovery_interval(Duration::from_secs(20)));
    let t1 = task_id(&send(&mut svc, create()).await.unwrap());
    let t2 = task_id(&send(&mut svc, create()).await.unwrap());
    refused(&mut svc, &fake).await;
    end(&mut svc, &fake, &t1).await;
    let _t3 = task_id(&send(&mut svc, create()).await.unwrap());
    refused(&mut svc, &fake).await;
    assert_eq!(pool_state(&handle, &video()).await, (2, 2, 0));
    // A streak; the operator sets the capacity (the same number here): what the 1303s said
    // about the old one is no evidence now, so an ended task brings a hidden slot back again.
    handle
        .set_capacity(None, Pool::new(Product::Video), 4)
        .await
        .unwrap();
    end(&mut svc, &fake, &t2).await;
    assert_eq!(pool_state(&handle, &video()).await, (1, 3, 0));
}

/// The 1303s of creates already on their way together are one refusal: the level falls to the
/// last one's, and no streak starts, so an ended task still brings a hidden slot back.
#[tokio::test(start_paused = true)]
async fn the_1303s_of_a_burst_count_as_one() {
    let (mut svc, handle, fake) =
        stack(SlotsConfig::new(5).recovery_interval(Duration::from_secs(20)));
    let t1 = task_id(&send(&mut svc, create()).await.unwrap());
    let _t2 = task_id(&send(&mut svc, create()).await.unwrap());
    let mut burst = Vec::new();
    for _ in 0..3 {
        fake.script(Scripted::Code(1303, 429));
        burst.push(call(&mut svc, create()).await);
    }
    for refused in burst {
        refused.await.unwrap();
    }
    assert_eq!(pool_state(&handle, &video()).await, (2, 2, 0));
    end(&mut svc, &fake, &t1).await;
    assert_eq!(pool_state(&handle, &video()).await, (1, 3, 0));
}

/// A create sent again after its first answer was lost (kept under its external id) does not
/// count twice toward the refused level: its earlier holding gives its slot back before the
/// level is judged, so the streak stays.
#[tokio::test(start_paused = true)]
async fn a_create_sent_again_proves_no_level_with_its_earlier_holding() {
    let (mut svc, handle, fake) =
        stack(SlotsConfig::new(3).recovery_interval(Duration::from_secs(20)));
    let _t1 = task_id(&send(&mut svc, create()).await.unwrap());
    fake.script(Scripted::Lost);
    send(&mut svc, create_with_external("x1"))
        .await
        .unwrap_err();
    // Two 1303s at 3 slots, the second of a create sent after the first: a streak.
    refused(&mut svc, &fake).await;
    advance(Duration::from_secs(20)).await;
    refused(&mut svc, &fake).await;
    assert_eq!(pool_state(&handle, &video()).await, (2, 2, 0));
    advance(Duration::from_secs(40)).await;
    assert_eq!(pool_state(&handle, &video()).await, (2, 3, 0));
    // The lost create, sent again, answers: 2 tasks held (not 3), so the streak goes on and
    // the next 1303 lengthens it to four times the interval.
    send(&mut svc, create_with_external("x1")).await.unwrap();
    assert_eq!(pool_state(&handle, &video()).await, (2, 3, 0));
    refused(&mut svc, &fake).await;
    assert_eq!(pool_state(&handle, &video()).await, (2, 2, 0));
    advance(Duration::from_secs(79)).await;
    assert_eq!(pool_state(&handle, &video()).await, (2, 2, 0));
    advance(Duration::from_secs(1)).await;
    assert_eq!(pool_state(&handle, &video()).await, (2, 3, 0));
}

/// A task a reconcile adopts was made by no create of ours just now: it proves nothing about
/// the level the 1303s refused, and the streak goes on.
#[tokio::test(start_paused = true)]
async fn an_adopted_task_does_not_end_a_1303_streak() {
    use kling_concurrency::backend::{SlotBackend, SlotKey, SlotOp, TaskRef};

    let (mut svc, handle, fake) =
        stack(SlotsConfig::new(3).recovery_interval(Duration::from_secs(20)));
    let t1 = task_id(&send(&mut svc, create()).await.unwrap());
    refused(&mut svc, &fake).await;
    advance(Duration::from_secs(20)).await;
    refused(&mut svc, &fake).await;
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
    let key = SlotKey::new(handle.default_account().clone(), Pool::new(Product::Video));
    handle
        .backend()
        .apply(SlotOp::Adopt {
            key,
            task: TaskRef {
                id: Some("t9".to_owned()),
                external_id: None,
            },
            weight: 1,
            lease: Duration::from_secs(600),
        })
        .await
        .unwrap();
    assert_eq!(pool_state(&handle, &video()).await, (2, 1, 0));
    // Still a streak: an ended task of ours frees only its own slot.
    end(&mut svc, &fake, &t1).await;
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
}

/// When a success ends a streak, hidden slots come back at the configured interval from then:
/// the time spent under the longer interval is not counted again in shorter steps.
#[tokio::test(start_paused = true)]
async fn the_end_of_a_streak_restarts_the_recovery_clock() {
    let (mut svc, handle, fake) =
        stack(SlotsConfig::new(4).recovery_interval(Duration::from_secs(20)));
    let _t1 = task_id(&send(&mut svc, create()).await.unwrap());
    let _t2 = task_id(&send(&mut svc, create()).await.unwrap());
    refused(&mut svc, &fake).await;
    advance(Duration::from_secs(20)).await;
    refused(&mut svc, &fake).await;
    assert_eq!(pool_state(&handle, &video()).await, (2, 2, 0));
    // Twice the interval for one slot; 30 s into the next 40.
    advance(Duration::from_secs(70)).await;
    assert_eq!(pool_state(&handle, &video()).await, (2, 3, 0));
    // A success at the refused level ends the streak; the last slot is 20 s away from now.
    let _t3 = task_id(&send(&mut svc, create()).await.unwrap());
    assert_eq!(pool_state(&handle, &video()).await, (3, 3, 0));
    advance(Duration::from_secs(19)).await;
    assert_eq!(pool_state(&handle, &video()).await, (3, 3, 0));
    advance(Duration::from_secs(1)).await;
    assert_eq!(pool_state(&handle, &video()).await, (3, 4, 0));
}

/// A create waiting when a 1303 streak ends (here the capacity is set; a success at the
/// refused level ends it too), its timer set for the doubled interval, is woken when the
/// hidden slot comes back at the configured one. (No snapshot before the check: taking one
/// runs the recovery.)
#[tokio::test(start_paused = true)]
async fn a_waiting_create_is_woken_at_the_shorter_interval_once_a_streak_ends() {
    let (mut svc, handle, fake) =
        stack(SlotsConfig::new(4).recovery_interval(Duration::from_secs(20)));
    let _t1 = task_id(&send(&mut svc, create()).await.unwrap());
    let _t2 = task_id(&send(&mut svc, create()).await.unwrap());
    refused(&mut svc, &fake).await;
    advance(Duration::from_secs(20)).await;
    // Two 1303s at 3 slots: a streak, the next slot back in 40 s.
    refused(&mut svc, &fake).await;
    let mut waiting = spawn(call(&mut svc, create()).await);
    assert_pending!(waiting.poll());
    handle
        .set_capacity(None, Pool::new(Product::Video), 4)
        .await
        .unwrap();
    advance(Duration::from_secs(20)).await;
    assert!(
        waiting.is_woken(),
        "the hidden slot is back at the configured interval"
    );
    assert_ready_ok!(waiting.poll());
}

/// A waiter granted before a 1303 but picking its grant up after it was on its way with it:
/// its own 1303 belongs to that burst and does not lengthen the streak.
#[tokio::test(start_paused = true)]
async fn a_waiter_granted_before_a_1303_is_part_of_its_burst() {
    let (mut svc, handle, fake) =
        stack(SlotsConfig::new(2).recovery_interval(Duration::from_secs(20)));
    let t1 = task_id(&send(&mut svc, create()).await.unwrap());
    refused(&mut svc, &fake).await;
    advance(Duration::from_secs(20)).await;
    assert_eq!(pool_state(&handle, &video()).await, (1, 2, 0));
    // A is sent (to meet a 1303), W waits; t1 ends and W is granted, unpolled.
    fake.script(Scripted::Code(1303, 429));
    let a = call(&mut svc, create()).await;
    let mut w = spawn(call(&mut svc, create()).await);
    assert_pending!(w.poll());
    end(&mut svc, &fake, &t1).await;
    // A's 1303 (a create granted after the first): a streak of one, twice the interval.
    a.await.unwrap();
    // W picks its grant up and meets a 1303 too: part of A's burst, not a third in a row.
    fake.script(Scripted::Code(1303, 429));
    assert_ready_ok!(w.poll());
    assert_eq!(pool_state(&handle, &video()).await, (0, 0, 0));
    advance(Duration::from_secs(40)).await;
    assert_eq!(pool_state(&handle, &video()).await, (0, 1, 0));
}

/// Setting the capacity ends a streak as a success does: the recovery clock restarts, and the
/// time spent under the longer interval is not counted again in shorter steps.
#[tokio::test(start_paused = true)]
async fn setting_the_capacity_restarts_the_recovery_clock() {
    let (mut svc, handle, fake) =
        stack(SlotsConfig::new(4).recovery_interval(Duration::from_secs(20)));
    let _t1 = task_id(&send(&mut svc, create()).await.unwrap());
    let _t2 = task_id(&send(&mut svc, create()).await.unwrap());
    refused(&mut svc, &fake).await;
    advance(Duration::from_secs(20)).await;
    refused(&mut svc, &fake).await;
    assert_eq!(pool_state(&handle, &video()).await, (2, 2, 0));
    // Twice the interval for one slot; 30 s into the next 40.
    advance(Duration::from_secs(70)).await;
    assert_eq!(pool_state(&handle, &video()).await, (2, 3, 0));
    handle
        .set_capacity(None, Pool::new(Product::Video), 4)
        .await
        .unwrap();
    assert_eq!(pool_state(&handle, &video()).await, (2, 3, 0));
    advance(Duration::from_secs(19)).await;
    assert_eq!(pool_state(&handle, &video()).await, (2, 3, 0));
    advance(Duration::from_secs(1)).await;
    assert_eq!(pool_state(&handle, &video()).await, (2, 4, 0));
}

/// A callback can overtake the answer of the create it reports: the task's end, told before
/// the create's answer names the task, still frees its slot once the answer arrives.
#[tokio::test(start_paused = true)]
async fn an_end_reported_before_the_creates_answer_frees_the_slot_when_the_answer_comes() {
    let (mock, mut server) =
        tower_test::mock::pair::<Request<Full<Bytes>>, Response<Full<Bytes>>>();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1)).unwrap();
    let mut svc: TaskSlots<Manual> = layer.layer(mock);

    svc.ready().await.unwrap();
    let mut create = spawn(svc.call(create()));
    assert_pending!(create.poll());
    let (_req, respond) = server.next_request().await.unwrap();
    assert_eq!(pool_state(&handle, &video()).await.0, 1);

    let ended = r#"{"task_id":"t1","task_status":"failed"}"#;
    let applied = handle.on_callback(ended.as_bytes()).await.unwrap();
    assert!(applied.released.is_empty(), "nothing held under t1 yet");
    assert_eq!(pool_state(&handle, &video()).await.0, 1);

    respond.send_response(envelope(
        200,
        0,
        &serde_json::json!({"task_id":"t1","task_status":"submitted"}),
    ));
    assert_ready_ok!(create.poll());
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        0,
        "the end reported first frees the slot"
    );
    // A later report of the same end releases nothing more.
    let applied = handle.on_callback(ended.as_bytes()).await.unwrap();
    assert!(applied.released.is_empty());
    assert!(handle.complete("t1").await.unwrap().is_none());
}

/// `complete` by the external id a create carries, told before the create's answer arrives,
/// frees the create's slot once the answer comes (whether it echoes the external id or not).
#[tokio::test(start_paused = true)]
async fn complete_by_external_id_before_the_creates_answer_frees_the_slot_when_it_comes() {
    let (mock, mut server) =
        tower_test::mock::pair::<Request<Full<Bytes>>, Response<Full<Bytes>>>();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2)).unwrap();
    let mut svc: TaskSlots<Manual> = layer.layer(mock);

    for (external, answer) in [
        (
            "job-1",
            serde_json::json!({"task_id":"t1","task_status":"submitted",
                "task_info":{"external_task_id":"job-1"}}),
        ),
        (
            "job-2",
            serde_json::json!({"task_id":"t2","task_status":"submitted"}),
        ),
    ] {
        svc.ready().await.unwrap();
        let mut create = spawn(svc.call(create_with_external(external)));
        assert_pending!(create.poll());
        let (_req, respond) = server.next_request().await.unwrap();
        assert_eq!(pool_state(&handle, &video()).await.0, 1);

        assert!(handle.complete(external).await.unwrap().is_none());
        respond.send_response(envelope(200, 0, &answer));
        assert_ready_ok!(create.poll());
        assert_eq!(
            pool_state(&handle, &video()).await.0,
            0,
            "{external}: the end told first frees the slot"
        );
    }
}

/// A report read elsewhere (a verified callback already parsed) finds a task whose create's
/// answer was lost by its external id, as a callback body does: the slot held under that id
/// is freed. `complete`, given the task id alone, cannot find it.
#[tokio::test(start_paused = true)]
async fn a_report_frees_a_slot_held_under_its_external_id_only() {
    let (mut svc, handle, fake) = stack(SlotsConfig::new(4));
    fake.script(Scripted::Lost);
    assert!(send(&mut svc, create_with_external("e7")).await.is_err());
    assert_eq!(pool_state(&handle, &video()).await.0, 1);
    assert!(
        handle.complete("t-9").await.unwrap().is_none(),
        "unknown task id"
    );
    assert_eq!(pool_state(&handle, &video()).await.0, 1);

    let ended = kling_core::Envelope::parse_callback(
        br#"{"task_id":"t-9","task_status":"succeed","task_info":{"external_task_id":"e7"}}"#,
    )
    .unwrap()
    .remove(0);
    let account = handle.default_account().clone();
    let applied = handle.report_in(&account, &ended).await.unwrap();
    assert_eq!(applied.released.len(), 1);
    assert_eq!(pool_state(&handle, &video()).await.0, 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_create_is_woken_when_a_lease_ends_before_hidden_slots_come_back() {
    // Leases shorter than the recovery interval: the head's timer, set for the hidden slot's
    // return, is later than the lease of a task kept after it started waiting.
    let config = SlotsConfig::new(2)
        .lease(Duration::from_secs(60))
        .recovery_interval(Duration::from_secs(600));
    let (mut svc, handle, fake) = stack(config);
    // Granted and sent; its answer (a task nobody will report) is read below.
    let first = call(&mut svc, create()).await;
    refused(&mut svc, &fake).await;
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
    let mut waiting = spawn(call(&mut svc, create()).await);
    assert_pending!(waiting.poll());
    // Kept under its task id with a 60 s lease, after the head set its 600 s timer.
    first.await.unwrap();
    advance(Duration::from_secs(61)).await;
    assert!(
        waiting.is_woken(),
        "the lease ended before the hidden slot came back"
    );
    assert_ready_ok!(waiting.poll());
    assert_eq!(fake.creates(), 3);
}

#[tokio::test(start_paused = true)]
async fn an_answer_echoing_an_empty_external_id_keeps_each_task_apart() {
    // Kling's answers may carry `"task_info":{"external_task_id":""}` for a create that named
    // no external id: that is no id, and two such tasks are two tasks.
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let server = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let body = if req.method() == http::Method::POST {
            let id = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            format!(
                r#"{{"code":0,"message":"SUCCEED","request_id":"r","data":{{"task_id":"t{id}","task_status":"submitted","task_info":{{"external_task_id":""}}}}}}"#
            )
        } else {
            // A list of older tasks, long finished, none of them ours.
            r#"{"code":0,"message":"SUCCEED","request_id":"r","data":[{"task_id":"old","task_status":"succeed","task_info":{"external_task_id":""}}]}"#
                .to_owned()
        };
        std::future::ready(Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(
            body,
        )))))
    });
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2)).unwrap();
    let mut svc = layer.layer(server);
    for _ in 0..2 {
        svc.ready().await.unwrap().call(create()).await.unwrap();
    }
    assert_eq!(
        pool_state(&handle, &video()).await,
        (2, 2, 0),
        "both tasks hold"
    );
    let list = get("/v1/videos/text2video?pageNum=1&pageSize=30");
    svc.ready().await.unwrap().call(list).await.unwrap();
    assert_eq!(pool_state(&handle, &video()).await, (2, 2, 0), "still both");
    let mut third = spawn(svc.ready().await.unwrap().call(create()));
    assert_pending!(third.poll());
}
