//! What a waiting create holds of the service below: nothing. A layer below that reserves in
//! `poll_ready` (an in-flight bound) is readied again by the create once it is granted.

use bytes::Bytes;
use http_body_util::Full;
use kling_concurrency::{InFlightLayer, SlotsConfig, TaskSlotsLayer};
use kling_core::Outcome;
use tokio_test::task::spawn;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::{Layer, Service, ServiceExt};

use crate::support::*;

/// A create waiting for a slot holds no place of an in-flight bound below, so the query that
/// ends the task it waits for goes through; granted, the create takes its place then.
#[tokio::test(start_paused = true)]
async fn a_waiting_create_holds_no_place_of_a_bound_below_so_queries_pass() {
    let fake = Fake::new();
    let in_flight = InFlightLayer::new(1).unwrap();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1)).unwrap();
    let svc = layer.layer(in_flight.layer(fake.clone()));

    let first = svc.clone().oneshot(create()).await.unwrap();
    let t1 = Outcome::of(&first).unwrap().task().unwrap().id.clone();
    let mut waiting = spawn(svc.clone().oneshot(create()));
    assert_pending!(waiting.poll());
    assert_eq!(
        in_flight.in_flight(),
        0,
        "the waiting create holds no place below"
    );

    fake.finish(&t1);
    let mut query = spawn(
        svc.clone()
            .oneshot(get(&format!("/v1/videos/text2video/{t1}"))),
    );
    assert_ready_ok!(query.poll());
    assert!(waiting.is_woken());
    assert_ready_ok!(waiting.poll());
    assert_eq!(fake.creates(), 2);
    assert_eq!(in_flight.in_flight(), 0);
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
}

/// Granted while the service below is busy, a create keeps its slot and waits for the service;
/// dropped then, it gives the slot back (it was never sent). Once the service is free, the
/// next granted create is sent.
#[tokio::test(start_paused = true)]
async fn a_granted_create_waits_for_the_service_below_and_gives_its_slot_back_if_dropped() {
    let fake = Fake::new();
    let in_flight = InFlightLayer::new(1).unwrap();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1)).unwrap();
    let svc = layer.layer(in_flight.layer(fake.clone()));

    let first = svc.clone().oneshot(create()).await.unwrap();
    let t1 = Outcome::of(&first).unwrap().task().unwrap().id.clone();
    let mut granted = spawn(svc.clone().oneshot(create()));
    let mut next = spawn(svc.clone().oneshot(create()));
    assert_pending!(granted.poll());
    assert_pending!(next.poll());

    // Another user of the bound takes its only place.
    let mut busy = in_flight.layer(fake.clone());
    assert_ready_ok!(spawn(busy.ready()).poll());
    assert_eq!(in_flight.in_flight(), 1);
    handle.complete(&t1).await.unwrap();
    assert!(granted.is_woken());
    assert_pending!(granted.poll());
    assert_eq!(
        pool_state(&handle, &video()).await,
        (1, 1, 1),
        "granted, not sent"
    );
    assert_eq!(fake.creates(), 1);

    drop(granted);
    assert!(next.is_woken(), "the slot went on to the next create");
    assert_pending!(next.poll());
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
    drop(busy);
    assert!(next.is_woken(), "the place below came free");
    assert_ready_ok!(next.poll());
    assert_eq!(fake.creates(), 2);
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
}

/// A granted create whose service below fails to get ready gives its slot back (it was never
/// sent) and fails with that error.
#[tokio::test(start_paused = true)]
async fn a_granted_create_whose_service_below_fails_to_get_ready_gives_its_slot_back() {
    let (mock, mut server) =
        tower_test::mock::pair::<http::Request<Full<Bytes>>, http::Response<Full<Bytes>>>();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1)).unwrap();
    let mut svc = layer.layer(mock);

    let mut first = spawn(svc.ready().await.unwrap().call(create()));
    let (_, respond) = server.next_request().await.unwrap();
    let task = serde_json::json!({"task_id": "t1", "task_status": "submitted"});
    respond.send_response(envelope(200, 0, &task));
    assert_ready_ok!(first.poll());
    let mut waiting = spawn(svc.ready().await.unwrap().call(create()));
    assert_pending!(waiting.poll());

    server.send_error("the service below is gone");
    handle.complete("t1").await.unwrap();
    assert!(waiting.is_woken());
    let err = tokio_test::assert_ready_err!(waiting.poll());
    assert_eq!(err.to_string(), "the service below is gone");
    assert_eq!(pool_state(&handle, &video()).await, (0, 1, 0), "given back");
}

/// A create granted its slot while the service below is not ready (an in-flight bound held
/// by another user) gives up at its request's deadline, as a wait for slots does: it fails
/// with `DeadlineExceeded` saying the slots were granted, unsent, and its slot goes on to the
/// next create. Before, it waited for the service below past its deadline, holding the slot.
#[tokio::test(start_paused = true)]
async fn a_granted_create_waiting_for_the_service_below_gives_up_at_its_deadline() {
    use std::time::Duration;

    use kling_concurrency::error::DeadlineExceeded;
    use kling_core::signals::Deadline;
    use tokio::time::{Instant, advance};

    let fake = Fake::new();
    let in_flight = InFlightLayer::new(1).unwrap();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1)).unwrap();
    let svc = layer.layer(in_flight.layer(fake.clone()));

    let first = svc.clone().oneshot(create()).await.unwrap();
    let t1 = Outcome::of(&first).unwrap().task().unwrap().id.clone();
    let mut late = create();
    late.extensions_mut()
        .insert(Deadline(Instant::now() + Duration::from_secs(30)));
    let mut granted = spawn(svc.clone().oneshot(late));
    let mut next = spawn(svc.clone().oneshot(create()));
    assert_pending!(granted.poll());
    assert_pending!(next.poll());

    let mut busy = in_flight.layer(fake.clone());
    assert_ready_ok!(spawn(busy.ready()).poll());
    advance(Duration::from_secs(10)).await;
    handle.complete(&t1).await.unwrap();
    assert_pending!(granted.poll());
    assert_eq!(
        pool_state(&handle, &video()).await,
        (1, 1, 1),
        "granted, not sent"
    );

    advance(Duration::from_secs(20)).await;
    assert!(granted.is_woken(), "woken at the deadline");
    let err = tokio_test::assert_ready_err!(granted.poll());
    let late = err.downcast_ref::<DeadlineExceeded>().expect("typed error");
    assert!(late.slots_granted());
    assert_eq!(late.waited(), Duration::from_secs(30));
    assert!(
        err.to_string().contains("service below was not ready"),
        "{err}"
    );
    assert_eq!(
        kling_core::error::SendState::of(&*err),
        kling_core::error::SendState::NotSent
    );
    assert_eq!(fake.creates(), 1);
    assert!(next.is_woken(), "the slot went on to the next create");
    assert_pending!(next.poll());
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
    drop(busy);
    assert_ready_ok!(next.poll());
    assert_eq!(fake.creates(), 2);
}

/// A create that must wait, sent through a service the caller readied and keeps (not a
/// `oneshot` clone), is sent once granted. Before, the place that service reserved below in
/// `poll_ready` (an in-flight bound of 1) stayed with it for its next call, which a caller
/// awaiting the create never makes: granted, the create waited for that place for good, its
/// slot held. Now the place is given back when the create starts to wait.
#[tokio::test(start_paused = true)]
async fn a_create_waiting_behind_a_readied_service_is_sent_once_granted() {
    let fake = Fake::new();
    let in_flight = InFlightLayer::new(1).unwrap();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1)).unwrap();
    let mut svc = layer.layer(in_flight.layer(fake.clone()));

    let first = svc.ready().await.unwrap().call(create()).await.unwrap();
    let t1 = Outcome::of(&first).unwrap().task().unwrap().id.clone();
    let mut waiting = spawn(svc.ready().await.unwrap().call(create()));
    assert_pending!(waiting.poll());
    assert_eq!(
        in_flight.in_flight(),
        0,
        "the waiting create holds no place"
    );

    // The task ends, told by a callback (no call through `svc`).
    handle.complete(&t1).await.unwrap().unwrap();
    assert!(waiting.is_woken());
    assert_ready_ok!(waiting.poll());
    assert_eq!(fake.creates(), 2);
    assert_eq!(in_flight.in_flight(), 0);
}

/// A create refused in `call` (heavier than its pool) gives back the place its readied
/// service reserved below: another clone's query is not held up by a service nobody calls.
#[tokio::test(start_paused = true)]
async fn a_create_refused_in_call_gives_back_the_place_reserved_below() {
    let fake = Fake::new();
    let in_flight = InFlightLayer::new(1).unwrap();
    let (layer, _handle) = TaskSlotsLayer::pair(SlotsConfig::new(1)).unwrap();
    let mut svc = layer.layer(in_flight.layer(fake.clone()));
    let heavy = post("/v1/images/generations", r#"{"n":4}"#);
    let refused = svc.ready().await.unwrap().call(heavy).await;
    assert!(refused.is_err());
    assert_eq!(
        in_flight.in_flight(),
        0,
        "nothing reserved by an idle service"
    );
    let mut other = svc.clone();
    let mut query = spawn(other.ready());
    assert_ready_ok!(query.poll());
}
