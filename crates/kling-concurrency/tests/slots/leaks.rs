//! An adversarial review's scenarios: slot leaks and oversubscription. Creates and queries
//! dropped at each point, a `1303` the layer did not expect, a task's end reported twice or by a
//! stranger, unreadable answers, weights past the capacity, and leases ending as late reports
//! come.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use kling_concurrency::error::OverCapacity;
use kling_concurrency::{SlotsConfig, SlotsHandle, TaskSlots, TaskSlotsLayer};
use kling_core::{Pool, Product};
use serde_json::json;
use tokio::time::advance;
use tokio_test::task::spawn;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::{Layer, Service, ServiceExt};

use crate::support::*;

type Manual = tower_test::mock::Mock<Request<Full<Bytes>>, Response<Full<Bytes>>>;
type Server = tower_test::mock::Handle<Request<Full<Bytes>>, Response<Full<Bytes>>>;

fn manual(config: SlotsConfig) -> (TaskSlots<Manual>, SlotsHandle, Server) {
    let (mock, server) = tower_test::mock::pair::<Request<Full<Bytes>>, Response<Full<Bytes>>>();
    let (layer, handle) = TaskSlotsLayer::pair(config).unwrap();
    (layer.layer(mock), handle, server)
}

fn fake(config: SlotsConfig) -> (TaskSlots<Fake>, SlotsHandle, Fake) {
    let fake = Fake::new();
    let (layer, handle) = TaskSlotsLayer::pair(config).unwrap();
    (layer.layer(fake.clone()), handle, fake)
}

fn legacy_task(id: &str, status: &str, external: Option<&str>) -> serde_json::Value {
    let mut task = json!({"task_id": id, "task_status": status});
    if let Some(ext) = external {
        task["task_info"] = json!({"external_task_id": ext});
    }
    task
}

/// (in use, tasks) of the default account's video pool.
async fn held(handle: &SlotsHandle) -> (u32, usize) {
    let snapshot = handle.snapshot().await.unwrap();
    let pool = snapshot.get(handle.default_account(), &video()).unwrap();
    (pool.in_use, pool.tasks)
}

/// A create whose answer came but was never read (the caller dropped the future after the
/// server answered) keeps its slot, as the task runs; a query dropped before its answer, or
/// after its answer came but before it was read, frees nothing; the query read ends the task
/// exactly once.
#[tokio::test(start_paused = true)]
async fn creates_and_queries_dropped_at_each_point_leak_nothing_and_free_nothing_early() {
    let lease = Duration::from_secs(900);
    let (mut svc, handle, mut server) = manual(SlotsConfig::new(2).lease(lease));

    // Answered, the answer never read: kept under the external id the create carried.
    svc.ready().await.unwrap();
    let mut create = spawn(svc.call(create_with_external("job-1")));
    assert_pending!(create.poll());
    let (_, respond) = server.next_request().await.unwrap();
    respond.send_response(envelope(
        200,
        0,
        &legacy_task("t1", "submitted", Some("job-1")),
    ));
    drop(create);
    assert_eq!(held(&handle).await, (1, 1));

    // A query of the task dropped before its answer: nothing freed.
    svc.ready().await.unwrap();
    let mut query = spawn(svc.call(get("/v1/videos/text2video/t1")));
    assert_pending!(query.poll());
    let (_, _respond) = server.next_request().await.unwrap();
    drop(query);
    assert_eq!(held(&handle).await, (1, 1), "the task may still run");

    // Its answer came, saying the task ended, but the query was dropped before reading it.
    svc.ready().await.unwrap();
    let mut query = spawn(svc.call(get("/v1/videos/text2video/t1")));
    assert_pending!(query.poll());
    let (_, respond) = server.next_request().await.unwrap();
    respond.send_response(envelope(
        200,
        0,
        &legacy_task("t1", "succeed", Some("job-1")),
    ));
    drop(query);
    assert_eq!(held(&handle).await, (1, 1), "nothing read, nothing freed");

    // A query read: released, by the external id the holding was kept under.
    svc.ready().await.unwrap();
    let mut query = spawn(svc.call(get("/v1/videos/text2video/t1")));
    assert_pending!(query.poll());
    let (_, respond) = server.next_request().await.unwrap();
    respond.send_response(envelope(
        200,
        0,
        &legacy_task("t1", "succeed", Some("job-1")),
    ));
    assert_ready_ok!(query.poll());
    assert_eq!(held(&handle).await, (0, 0));
    // Once: a callback of the same end frees nothing more.
    let callback = legacy_task("t1", "succeed", Some("job-1")).to_string();
    let applied = handle.on_callback(callback.as_bytes()).await.unwrap();
    assert!(applied.released.is_empty());
    assert_eq!(held(&handle).await, (0, 0));
}

/// A `1303` when the layer believed two slots free (someone else uses the account): the pool
/// learns it has none, the create sent again waits (is not sent) until a slot comes back by
/// time, and the end of our one task, reported by three routes, frees its slot and one hidden
/// slot once.
#[tokio::test(start_paused = true)]
async fn an_unexpected_1303_shrinks_the_pool_without_spinning_and_an_end_frees_once() {
    let interval = Duration::from_secs(20);
    let (mut svc, handle, fake) = fake(SlotsConfig::new(3).recovery_interval(interval));
    svc.ready().await.unwrap();
    let t1 = svc.call(create()).await.unwrap();
    let t1 = kling_core::Outcome::of(&t1)
        .unwrap()
        .task()
        .unwrap()
        .id
        .clone();
    fake.script(Scripted::Code(1303, 429));
    svc.ready().await.unwrap();
    svc.call(create()).await.unwrap();
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));

    svc.ready().await.unwrap();
    let mut again = spawn(svc.call(create()));
    for _ in 0..19 {
        assert_pending!(again.poll());
        advance(Duration::from_secs(1)).await;
    }
    assert_pending!(again.poll());
    assert_eq!(
        fake.creates(),
        2,
        "nothing sent while no slot is believed free"
    );

    // Our task ends; the query, a callback and `complete` all say so.
    fake.finish(&t1);
    svc.ready().await.unwrap();
    svc.call(get(&format!("/v1/videos/text2video/{t1}")))
        .await
        .unwrap();
    let callback = legacy_task(&t1, "succeed", None).to_string();
    handle.on_callback(callback.as_bytes()).await.unwrap();
    assert!(handle.complete(&t1).await.unwrap().is_none());
    assert_ready_ok!(again.poll());
    assert_eq!(
        pool_state(&handle, &video()).await,
        (1, 2, 0),
        "one slot of ours and one hidden slot back, not more"
    );
    advance(interval).await;
    assert_eq!(pool_state(&handle, &video()).await, (1, 3, 0));
}

/// Sends `request` through `svc` and answers it with `answer`.
async fn exchange(
    svc: &mut TaskSlots<Manual>,
    server: &mut Server,
    request: Request<Full<Bytes>>,
    answer: Response<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    svc.ready().await.unwrap();
    let mut call = spawn(svc.call(request));
    assert_pending!(call.poll());
    let (_, respond) = server.next_request().await.unwrap();
    respond.send_response(answer);
    assert_ready_ok!(call.poll())
}

/// One task's end reported by two routes (query then callback, callback then list) frees it
/// once; a report of a task this process never created frees nothing of the others.
#[tokio::test(start_paused = true)]
async fn ends_reported_twice_or_by_a_stranger_free_exactly_once() {
    let (mut svc, handle, mut server) = manual(SlotsConfig::new(3));
    for id in ["t1", "t2", "t3"] {
        let answer = envelope(200, 0, &legacy_task(id, "submitted", None));
        exchange(&mut svc, &mut server, create(), answer).await;
    }
    assert_eq!(held(&handle).await, (3, 3));

    // Query, then callback.
    let answer = envelope(200, 0, &legacy_task("t1", "succeed", None));
    exchange(
        &mut svc,
        &mut server,
        get("/v1/videos/text2video/t1"),
        answer,
    )
    .await;
    let callback = legacy_task("t1", "succeed", None).to_string();
    let applied = handle.on_callback(callback.as_bytes()).await.unwrap();
    assert!(applied.released.is_empty());
    assert_eq!(held(&handle).await, (2, 2));

    // Callback, then a list page reporting it (and the others).
    let callback = legacy_task("t2", "failed", None).to_string();
    let applied = handle.on_callback(callback.as_bytes()).await.unwrap();
    assert_eq!(applied.released.len(), 1);
    let page = json!([
        legacy_task("t1", "succeed", None),
        legacy_task("t2", "failed", None),
        legacy_task("t3", "processing", None),
    ]);
    let list = get("/v1/videos/text2video?pageNum=1&pageSize=30");
    exchange(&mut svc, &mut server, list, envelope(200, 0, &page)).await;
    assert_eq!(held(&handle).await, (1, 1));

    // A stranger's task, ended and running, by callback, query and `complete`: nothing of ours.
    for status in ["succeed", "processing"] {
        let callback = legacy_task("t-stranger", status, Some("someone-else")).to_string();
        let applied = handle.on_callback(callback.as_bytes()).await.unwrap();
        assert!(applied.released.is_empty());
    }
    let answer = envelope(200, 0, &legacy_task("t-stranger", "failed", None));
    let query = get("/v1/videos/text2video/t-stranger");
    exchange(&mut svc, &mut server, query, answer).await;
    assert!(handle.complete("t-stranger").await.unwrap().is_none());
    assert_eq!(held(&handle).await, (1, 1));
}

/// A lookup by external id that finds nothing (a legacy query on another create path, or a
/// new-style lookup the server has not indexed yet) says nothing of a task whose create was
/// answered with its task id: the task exists, and its slot stays held. Only a create of
/// unknown outcome (no task id) is given back on such an answer, and only one on the path
/// looked up: external ids may be unique per create path only, so another path's `1203` says
/// nothing of it either.
#[tokio::test(start_paused = true)]
async fn a_lookup_finding_nothing_keeps_a_task_whose_create_was_answered() {
    let (mut svc, handle, mut server) = manual(SlotsConfig::new(3));
    let answer = envelope(200, 0, &legacy_task("t1", "submitted", Some("job-1")));
    exchange(&mut svc, &mut server, create_with_external("job-1"), answer).await;
    // Its outcome unknown: held under its external id only.
    svc.ready().await.unwrap();
    let mut lost = spawn(svc.call(create_with_external("job-2")));
    assert_pending!(lost.poll());
    let (_, _respond) = server.next_request().await.unwrap();
    drop(lost);
    assert_eq!(held(&handle).await, (2, 2));

    // Looked up on another legacy create path: `1203` for both.
    for ext in ["job-1", "job-2"] {
        let lookup = get(&format!("/v1/videos/image2video/{ext}"));
        let answer = envelope(404, 1203, &serde_json::Value::Null);
        exchange(&mut svc, &mut server, lookup, answer).await;
    }
    assert_eq!(held(&handle).await, (2, 2), "neither was created there");
    // On its own path, `job-2` is not found either: the create that may never have happened
    // goes.
    let lookup = get("/v1/videos/text2video/job-2");
    let answer = envelope(404, 1203, &serde_json::Value::Null);
    exchange(&mut svc, &mut server, lookup, answer).await;
    assert_eq!(held(&handle).await, (1, 1), "the answered task stays");
    // New-style, answered with an empty list.
    let lookup = get("/tasks?external_task_ids=job-1");
    exchange(&mut svc, &mut server, lookup, envelope(200, 0, &json!([]))).await;
    assert_eq!(held(&handle).await, (1, 1));
    // Its own end still frees it.
    let answer = envelope(200, 0, &legacy_task("t1", "succeed", Some("job-1")));
    exchange(
        &mut svc,
        &mut server,
        get("/v1/videos/text2video/t1"),
        answer,
    )
    .await;
    assert_eq!(held(&handle).await, (0, 0));
}

/// A create whose answer cannot be read (a `200` that is no JSON, a proxy's `502` page) or is a
/// `5xx` envelope keeps its slot (the task may exist) until its lease ends, or until a lookup
/// by its external id finds nothing.
#[tokio::test(start_paused = true)]
async fn unreadable_and_5xx_answers_keep_the_slot_until_a_lookup_or_the_lease() {
    let lease = Duration::from_secs(600);
    let (mut svc, handle, mut server) = manual(SlotsConfig::new(4).lease(lease));
    let page = |status: u16, body: &'static str| {
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    svc.ready().await.unwrap();
    let mut garbled = spawn(svc.call(create_with_external("job-1")));
    assert_pending!(garbled.poll());
    let (_, respond) = server.next_request().await.unwrap();
    respond.send_response(page(200, "{\"code\":0,\"data\":"));
    assert!(garbled.poll().is_ready());
    svc.ready().await.unwrap();
    let mut proxy = spawn(svc.call(create()));
    assert_pending!(proxy.poll());
    let (_, respond) = server.next_request().await.unwrap();
    respond.send_response(page(502, "<html>Bad Gateway</html>"));
    assert!(proxy.poll().is_ready());
    let answer = envelope(504, 5002, &serde_json::Value::Null);
    exchange(&mut svc, &mut server, create_with_external("job-3"), answer).await;
    assert_eq!(held(&handle).await, (3, 3), "each may have made a task");

    // The lookup of `job-1` finds nothing: that one goes at once.
    let answer = envelope(404, 1203, &serde_json::Value::Null);
    exchange(
        &mut svc,
        &mut server,
        get("/v1/videos/text2video/job-1"),
        answer,
    )
    .await;
    assert_eq!(held(&handle).await, (2, 2));
    advance(lease - Duration::from_secs(1)).await;
    assert_eq!(held(&handle).await, (2, 2));
    advance(Duration::from_secs(1)).await;
    assert_eq!(held(&handle).await, (0, 0), "the lease ends the rest");
}

/// A create heavier than its pool fails at once, unsent and holding nothing, whether it comes
/// first or behind a waiter; a capacity lowered below what is held admits nothing until what
/// is held fits under it.
#[tokio::test(start_paused = true)]
async fn weights_past_the_capacity_fail_and_a_lowered_capacity_admits_nothing_until_it_fits() {
    let (mut svc, handle, fake) = fake(SlotsConfig::new(3));
    let image = Pool::new(Product::Image);
    let heavy = || post("/v1/images/generations", r#"{"n":4}"#);
    svc.ready().await.unwrap();
    let err = svc.call(heavy()).await.unwrap_err();
    assert!(err.is::<OverCapacity>(), "{err}");
    svc.ready().await.unwrap();
    svc.call(post("/v1/images/generations", r#"{"n":3}"#))
        .await
        .unwrap();
    svc.ready().await.unwrap();
    let err = svc.call(heavy()).await.unwrap_err();
    assert!(err.is::<OverCapacity>(), "{err}");
    assert_eq!(fake.creates(), 1);
    assert_eq!(pool_state(&handle, &image).await, (3, 3, 0));

    // Video: three held, capacity lowered to one.
    let mut ids = Vec::new();
    for _ in 0..3 {
        svc.ready().await.unwrap();
        let response = svc.call(create()).await.unwrap();
        let outcome = kling_core::Outcome::of(&response).unwrap();
        ids.push(outcome.task().unwrap().id.clone());
    }
    handle.set_capacity(None, video(), 1).await.unwrap();
    svc.ready().await.unwrap();
    let mut waiting = spawn(svc.call(create()));
    assert_pending!(waiting.poll());
    for id in &ids[..2] {
        handle.complete(id).await.unwrap().unwrap();
        assert_pending!(waiting.poll());
    }
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 1));
    handle.complete(&ids[2]).await.unwrap().unwrap();
    assert_ready_ok!(waiting.poll());
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));
    assert_eq!(fake.creates(), 5);
}

/// A lease that ends as a late report comes: the lease frees the slot once, the late end frees
/// nothing more (not the next task's slot), a late "running" report does not bring the expired
/// task back into the count twice, and a report just before the lease ends renews it.
#[tokio::test(start_paused = true)]
async fn a_lease_ending_as_a_late_report_comes_frees_the_slot_once() {
    let lease = Duration::from_secs(600);
    let (mut svc, handle, mut server) = manual(SlotsConfig::new(1).lease(lease));
    let answer = envelope(200, 0, &legacy_task("t1", "submitted", None));
    exchange(&mut svc, &mut server, create(), answer).await;
    svc.ready().await.unwrap();
    let mut next = spawn(svc.call(create()));
    assert_pending!(next.poll());

    // A running report at the last moment renews the lease.
    advance(lease - Duration::from_millis(1)).await;
    let answer = envelope(200, 0, &legacy_task("t1", "processing", None));
    exchange(
        &mut svc,
        &mut server,
        get("/v1/videos/text2video/t1"),
        answer,
    )
    .await;
    advance(Duration::from_millis(1)).await;
    assert_pending!(next.poll());
    assert_eq!(held(&handle).await, (1, 1));

    // Nothing more: the lease ends, and the next create takes the slot.
    advance(lease).await;
    assert!(next.is_woken());
    assert_pending!(next.poll());
    let (_, respond) = server.next_request().await.unwrap();
    respond.send_response(envelope(200, 0, &legacy_task("t2", "submitted", None)));
    assert_ready_ok!(next.poll());
    assert_eq!(held(&handle).await, (1, 1));

    // Late reports of the expired task, by every route: t2 keeps its slot.
    let answer = envelope(200, 0, &legacy_task("t1", "succeed", None));
    exchange(
        &mut svc,
        &mut server,
        get("/v1/videos/text2video/t1"),
        answer,
    )
    .await;
    let callback = legacy_task("t1", "succeed", None).to_string();
    handle.on_callback(callback.as_bytes()).await.unwrap();
    assert!(handle.complete("t1").await.unwrap().is_none());
    let answer = envelope(200, 0, &legacy_task("t1", "processing", None));
    exchange(
        &mut svc,
        &mut server,
        get("/v1/videos/text2video/t1"),
        answer,
    )
    .await;
    assert_eq!(held(&handle).await, (1, 1));
    svc.ready().await.unwrap();
    let mut third = spawn(svc.call(create()));
    assert_pending!(third.poll());
    handle.complete("t2").await.unwrap().unwrap();
    assert!(third.is_woken());
}

/// A callback overtakes the answer of the create that made its task, and that answer is then
/// lost (the caller dropped the create): the create is kept under its external id only, and
/// the end the callback reported, with that external id, frees it at once, not at its lease.
#[tokio::test(start_paused = true)]
async fn an_end_reported_before_a_create_whose_answer_is_then_lost_frees_its_slot() {
    let lease = Duration::from_secs(900);
    let (mut svc, handle, mut server) = manual(SlotsConfig::new(1).lease(lease));
    svc.ready().await.unwrap();
    let mut create = spawn(svc.call(create_with_external("job-1")));
    assert_pending!(create.poll());
    let (_, _respond) = server.next_request().await.unwrap();
    let callback = legacy_task("t1", "succeed", Some("job-1")).to_string();
    handle.on_callback(callback.as_bytes()).await.unwrap();
    drop(create);
    assert_eq!(
        held(&handle).await,
        (0, 0),
        "the task it may have made has ended"
    );

    // The end is spent: a later create under the same external id (sent again after a lookup
    // found nothing, or a new job reusing it) holds its slot.
    svc.ready().await.unwrap();
    let mut again = spawn(svc.call(create_with_external("job-1")));
    assert_pending!(again.poll());
    let (_, respond) = server.next_request().await.unwrap();
    respond.send_response(envelope(
        200,
        0,
        &legacy_task("t2", "submitted", Some("job-1")),
    ));
    assert_ready_ok!(again.poll());
    assert_eq!(held(&handle).await, (1, 1));
}

/// `complete` by external id before the create's answer frees that create once; the end is
/// spent then, and a later create reusing the external id keeps its slot.
#[tokio::test(start_paused = true)]
async fn an_early_complete_by_external_id_frees_one_create_only() {
    let (mut svc, handle, mut server) = manual(SlotsConfig::new(2));
    svc.ready().await.unwrap();
    let mut create = spawn(svc.call(create_with_external("job-1")));
    assert_pending!(create.poll());
    let (_, respond) = server.next_request().await.unwrap();
    assert!(handle.complete("job-1").await.unwrap().is_none());
    respond.send_response(envelope(
        200,
        0,
        &legacy_task("t1", "submitted", Some("job-1")),
    ));
    assert_ready_ok!(create.poll());
    assert_eq!(held(&handle).await, (0, 0));

    let answer = envelope(200, 0, &legacy_task("t2", "submitted", Some("job-1")));
    exchange(&mut svc, &mut server, create_with_external("job-1"), answer).await;
    assert_eq!(
        held(&handle).await,
        (1, 1),
        "a new task under a reused external id"
    );
}

/// A callback naming the task and its external id overtakes the create's answer, which then
/// comes with the task id: the create is freed, and the end is spent under both ids, so a later
/// create reusing the external id keeps its slot.
#[tokio::test(start_paused = true)]
async fn an_end_reported_before_the_answer_frees_that_create_only() {
    let (mut svc, handle, mut server) = manual(SlotsConfig::new(2));
    svc.ready().await.unwrap();
    let mut create = spawn(svc.call(create_with_external("job-1")));
    assert_pending!(create.poll());
    let (_, respond) = server.next_request().await.unwrap();
    let callback = legacy_task("t1", "succeed", Some("job-1")).to_string();
    handle.on_callback(callback.as_bytes()).await.unwrap();
    respond.send_response(envelope(
        200,
        0,
        &legacy_task("t1", "submitted", Some("job-1")),
    ));
    assert_ready_ok!(create.poll());
    assert_eq!(held(&handle).await, (0, 0));

    // A later create under the same external id whose answer is lost: kept.
    svc.ready().await.unwrap();
    let mut again = spawn(svc.call(create_with_external("job-1")));
    assert_pending!(again.poll());
    let (_, _respond) = server.next_request().await.unwrap();
    drop(again);
    assert_eq!(
        held(&handle).await,
        (1, 1),
        "a new create under a reused external id"
    );
}

/// A create under an external id that a task we know by its id already carries (the caller
/// reused it while that task runs) does not give that task's slot back: a task whose id an
/// answer gave runs until it is reported ended, whatever another create carried. (A holding
/// of unknown outcome under that external id is still replaced: the same create sent again.)
#[tokio::test(start_paused = true)]
async fn a_create_reusing_a_running_tasks_external_id_does_not_free_its_slot() {
    let (mut svc, handle, mut server) = manual(SlotsConfig::new(3));
    let answer = envelope(200, 0, &legacy_task("t1", "submitted", Some("job-1")));
    exchange(&mut svc, &mut server, create_with_external("job-1"), answer).await;
    // The server made a second task under the same external id.
    let answer = envelope(200, 0, &legacy_task("t2", "submitted", Some("job-1")));
    exchange(&mut svc, &mut server, create_with_external("job-1"), answer).await;
    assert_eq!(held(&handle).await, (2, 2), "two tasks run");
    // Its outcome unknown: it may have made a third.
    let answer = envelope(500, 5000, &serde_json::Value::Null);
    exchange(&mut svc, &mut server, create_with_external("job-1"), answer).await;
    assert_eq!(held(&handle).await, (3, 3));
    for id in ["t1", "t2"] {
        assert!(handle.complete(id).await.unwrap().is_some(), "{id} held");
    }
    assert_eq!(held(&handle).await, (1, 1));

    // Sent again, a create of unknown outcome replaces its earlier holding.
    let answer = envelope(200, 0, &legacy_task("t3", "submitted", Some("job-1")));
    exchange(&mut svc, &mut server, create_with_external("job-1"), answer).await;
    assert_eq!(held(&handle).await, (1, 1));
}

/// A layer below the slots (the rate limiter) that holds every create back unsent
/// (`hold: true`, saying so in the request's `SendWatch`), or passes it on at once; either
/// way its answer never comes.
fn below(
    hold: bool,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = kling_core::error::BoxError,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |request: Request<Full<Bytes>>| {
        if hold {
            kling_core::signals::SendWatch::held(&request);
        }
        std::future::pending::<Result<Response<Full<Bytes>>, kling_core::error::BoxError>>()
    })
}

/// A create with an external id whose first attempt may have made a task (`made`: a `5000`,
/// sent again after a lookup found nothing) or surely made none (a `1303`), as the retry layer
/// sends it again: its `Attempt` 2, the request's `SendWatch` (the spend guard's, above) final
/// when `made`.
fn second_attempt(
    external: &str,
    made: bool,
) -> (Request<Full<Bytes>>, kling_core::signals::SendWatch) {
    use kling_core::signals::{Attempt, SendWatch};
    let mut request = create_with_external(external);
    let watch = SendWatch::watch(&mut request);
    Attempt::set(&mut request, 1);
    SendWatch::handed(&request);
    SendWatch::answered(&request, made);
    SendWatch::held(&request);
    Attempt::set(&mut request, 2);
    SendWatch::handed(&request);
    (request, watch)
}

/// The send watch is the request's, not the attempt's: once an earlier attempt may have made a
/// task it is final, and a later attempt that the rate limiter held back unsent, dropped
/// there, kept its slot as a create of unknown outcome, under its external id (or its lease)
/// until the lease ran out, though it never left. Now that attempt's slot goes back, whether it
/// was granted at once or after waiting; the watch the layers above read stays final; an
/// attempt passed on toward the server is still kept.
#[tokio::test(start_paused = true)]
async fn a_later_attempt_held_back_below_and_dropped_gives_its_slot_back() {
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2)).unwrap();
    let mut holds = layer.layer(below(true));

    // A first attempt held back below and dropped: given back, as always.
    let mut request = create_with_external("job-0");
    let watch = kling_core::signals::SendWatch::watch(&mut request);
    kling_core::signals::Attempt::set(&mut request, 1);
    holds.ready().await.unwrap();
    let mut first = spawn(holds.call(request));
    assert_pending!(first.poll());
    assert!(watch.never_sent());
    drop(first);
    assert_eq!(held(&handle).await, (0, 0));

    // Granted at once, held back below, dropped.
    let (request, watch) = second_attempt("job-1", true);
    holds.ready().await.unwrap();
    let mut granted = spawn(holds.call(request));
    assert_pending!(granted.poll());
    assert_eq!(held(&handle).await, (1, 0), "granted");
    drop(granted);
    assert_eq!(held(&handle).await, (0, 0), "it never left");
    assert!(
        !watch.never_sent(),
        "the first attempt may have made a task"
    );

    // Waiting for the slot first, then held back below, dropped.
    let mut fake = layer.layer(Fake::new());
    for _ in 0..2 {
        fake.ready().await.unwrap().call(create()).await.unwrap();
    }
    let (request, _watch) = second_attempt("job-2", true);
    holds.ready().await.unwrap();
    let mut waited = spawn(holds.call(request));
    assert_pending!(waited.poll());
    handle.complete("t1").await.unwrap().unwrap();
    assert!(waited.is_woken());
    assert_pending!(waited.poll());
    assert_eq!(held(&handle).await, (2, 1), "granted, beside t2");
    drop(waited);
    assert_eq!(held(&handle).await, (1, 1), "it never left");
    handle.complete("t2").await.unwrap().unwrap();

    // Passed on toward the server, it may have made a task: kept under its external id.
    let mut sends = layer.layer(below(false));
    let (request, _watch) = second_attempt("job-3", true);
    sends.ready().await.unwrap();
    let mut sent = spawn(sends.call(request));
    assert_pending!(sent.poll());
    drop(sent);
    assert_eq!(held(&handle).await, (1, 1));
    // The same after an attempt that made nothing (the watch not final): kept, and the layers
    // above are told it may have left.
    let (request, watch) = second_attempt("job-4", false);
    sends.ready().await.unwrap();
    let mut sent = spawn(sends.call(request));
    assert_pending!(sent.poll());
    assert!(!watch.never_sent());
    drop(sent);
    assert_eq!(held(&handle).await, (2, 2));
}

/// The service below, panicking in `call` or in its future's poll while a flag says so.
#[derive(Clone)]
struct Panicky {
    fake: Fake,
    in_call: std::sync::Arc<std::sync::atomic::AtomicBool>,
    in_future: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

type Answer = Result<Response<Full<Bytes>>, kling_core::error::BoxError>;

impl Service<Request<Full<Bytes>>> for Panicky {
    type Response = Response<Full<Bytes>>;
    type Error = kling_core::error::BoxError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.fake.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        use std::sync::atomic::Ordering;
        assert!(
            !self.in_call.load(Ordering::SeqCst),
            "the service below panics in call"
        );
        let answer = self.fake.call(request);
        let in_future = self.in_future.load(Ordering::SeqCst);
        Box::pin(async move {
            assert!(!in_future, "the service below panics in its future");
            answer.await
        })
    }
}

/// A service below that panics leaks no slot. Before, a panic in its `call` on the fast path
/// (a create granted at once) lost the grant, plain data, with its slot for good: the pool
/// counted it in use for ever, not even until a lease. Now it goes back (no future was made to
/// send the create), as it does for a create granted after waiting; a panic in the service's
/// future (the create handed on, maybe sent) keeps the slot as an unknown outcome, until its
/// lease.
#[tokio::test(start_paused = true)]
async fn a_panic_in_the_service_below_leaks_no_slot() {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::atomic::Ordering;

    let lease = Duration::from_secs(600);
    let panicky = Panicky {
        fake: Fake::new(),
        in_call: Default::default(),
        in_future: Default::default(),
    };
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1).lease(lease)).unwrap();
    let mut svc = layer.layer(panicky.clone());

    // Granted at once, then `call` below panics.
    panicky.in_call.store(true, Ordering::SeqCst);
    svc.ready().await.unwrap();
    assert!(catch_unwind(AssertUnwindSafe(|| svc.call(create()))).is_err());
    panicky.in_call.store(false, Ordering::SeqCst);
    assert_eq!(held(&handle).await, (0, 0), "the slot went back");

    // Granted after waiting, then `call` below panics.
    svc.ready().await.unwrap();
    let first = svc.call(create()).await.unwrap();
    let t1 = kling_core::Outcome::of(&first)
        .unwrap()
        .task()
        .unwrap()
        .id
        .clone();
    svc.ready().await.unwrap();
    let mut waiting = spawn(svc.call(create()));
    assert_pending!(waiting.poll());
    panicky.in_call.store(true, Ordering::SeqCst);
    handle.complete(&t1).await.unwrap();
    assert!(catch_unwind(AssertUnwindSafe(|| waiting.poll())).is_err());
    drop(waiting);
    panicky.in_call.store(false, Ordering::SeqCst);
    assert_eq!(held(&handle).await, (0, 0), "the slot went back");

    // Handed on, then its future panics: kept as an unknown outcome until the lease.
    panicky.in_future.store(true, Ordering::SeqCst);
    svc.ready().await.unwrap();
    let mut sent = spawn(svc.call(create()));
    assert!(catch_unwind(AssertUnwindSafe(|| sent.poll())).is_err());
    drop(sent);
    panicky.in_future.store(false, Ordering::SeqCst);
    assert_eq!(
        held(&handle).await,
        (1, 1),
        "kept: the create may have been sent"
    );
    advance(lease).await;
    assert_eq!(held(&handle).await, (0, 0), "freed by its lease");

    // Nothing leaked: the pool's one slot serves the next create at once.
    svc.ready().await.unwrap();
    let mut next = spawn(svc.call(create()));
    assert_ready_ok!(next.poll());
}

/// A metrics recorder whose in-use gauge, waiters gauge and wait histogram each panic once
/// when their flag is set, and every one of whose metrics panics on every call while `every`
/// is set.
#[derive(Clone, Default)]
pub(crate) struct PanickyRecorder {
    pub(crate) in_use: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub(crate) waiters: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub(crate) wait: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub(crate) every: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

struct PanickyMetric(
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
);

impl PanickyMetric {
    fn touch(&self) {
        use std::sync::atomic::Ordering;
        let panics = self.0.swap(false, Ordering::SeqCst) || self.1.load(Ordering::SeqCst);
        assert!(!panics, "the metrics recorder panics");
    }
}

impl metrics::CounterFn for PanickyMetric {
    fn increment(&self, _: u64) {
        self.touch();
    }
    fn absolute(&self, _: u64) {
        self.touch();
    }
}

impl metrics::GaugeFn for PanickyMetric {
    fn increment(&self, _: f64) {
        self.touch();
    }
    fn decrement(&self, _: f64) {
        self.touch();
    }
    fn set(&self, _: f64) {
        self.touch();
    }
}

impl metrics::HistogramFn for PanickyMetric {
    fn record(&self, _: f64) {
        self.touch();
    }
}

impl metrics::Recorder for PanickyRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let never = std::sync::Arc::default();
        metrics::Counter::from_arc(std::sync::Arc::new(PanickyMetric(
            never,
            self.every.clone(),
        )))
    }
    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        let flag = match key.name() {
            name if name == kling_core::metrics::SLOTS_IN_USE => self.in_use.clone(),
            name if name == kling_core::metrics::SLOTS_WAITERS => self.waiters.clone(),
            _ => std::sync::Arc::default(),
        };
        let metric = PanickyMetric(flag, self.every.clone());
        metrics::Gauge::from_arc(std::sync::Arc::new(metric))
    }
    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        let flag = if key.name() == kling_core::metrics::SLOTS_WAIT {
            self.wait.clone()
        } else {
            std::sync::Arc::default()
        };
        let metric = PanickyMetric(flag, self.every.clone());
        metrics::Histogram::from_arc(std::sync::Arc::new(metric))
    }
}

/// A metrics recorder that panics between a grant and the create it is for leaks no slot.
/// Before, the in-process backend counted a create's slots in use and then moved its in-use
/// gauge: a panic there unwound out of `call` with the slots counted for a grant nobody held,
/// for good. And a create granted after waiting recorded its wait before its grant was kept
/// anywhere: a panic there dropped the grant, again for good. Now the gauge moves before the
/// slots are taken, and the wait is recorded once the response future holds the grant (which
/// gives it back when dropped).
#[tokio::test(start_paused = true)]
async fn a_panicking_metrics_recorder_leaks_no_slot() {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::atomic::Ordering;

    let recorder = PanickyRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (mut svc, handle, _fake) = fake(SlotsConfig::new(1));
    // The pool and its gauges are made (and the recorder is tried) with nothing panicking.
    svc.ready().await.unwrap();
    let first = svc.call(create()).await.unwrap();
    let t1 = kling_core::Outcome::of(&first)
        .unwrap()
        .task()
        .unwrap()
        .id
        .clone();
    handle.complete(&t1).await.unwrap().unwrap();
    assert_eq!(held(&handle).await, (0, 0));

    // Granted at once: the in-use gauge panics.
    recorder.in_use.store(true, Ordering::SeqCst);
    svc.ready().await.unwrap();
    assert!(catch_unwind(AssertUnwindSafe(|| svc.call(create()))).is_err());
    assert_eq!(held(&handle).await, (0, 0), "nothing was taken");

    // Granted after waiting: the wait histogram panics.
    svc.ready().await.unwrap();
    let second = svc.call(create()).await.unwrap();
    let t2 = kling_core::Outcome::of(&second)
        .unwrap()
        .task()
        .unwrap()
        .id
        .clone();
    svc.ready().await.unwrap();
    let mut waiting = spawn(svc.call(create()));
    assert_pending!(waiting.poll());
    handle.complete(&t2).await.unwrap().unwrap();
    assert!(waiting.is_woken());
    recorder.wait.store(true, Ordering::SeqCst);
    assert!(catch_unwind(AssertUnwindSafe(|| waiting.poll())).is_err());
    drop(waiting);
    assert_eq!(held(&handle).await, (0, 0), "the grant went back");

    // Joining the queue: the waiters gauge panics. The waiter left no place behind it that
    // a slot freed later is granted to, for nobody.
    svc.ready().await.unwrap();
    let third = svc.call(create()).await.unwrap();
    let t3 = kling_core::Outcome::of(&third)
        .unwrap()
        .task()
        .unwrap()
        .id
        .clone();
    recorder.waiters.store(true, Ordering::SeqCst);
    svc.ready().await.unwrap();
    assert!(catch_unwind(AssertUnwindSafe(|| svc.call(create()))).is_err());
    handle.complete(&t3).await.unwrap().unwrap();
    assert_eq!(held(&handle).await, (0, 0), "no waiter was left behind");

    // A task a reconcile adopts: the in-use gauge panics. The slot is the task's, not lost.
    let key = kling_concurrency::backend::SlotKey::new(handle.default_account().clone(), video());
    let adopt = kling_concurrency::backend::SlotOp::Adopt {
        key,
        task: kling_concurrency::backend::TaskRef {
            id: Some("listed".to_owned()),
            external_id: None,
        },
        weight: 1,
        lease: Duration::from_secs(600),
    };
    recorder.in_use.store(true, Ordering::SeqCst);
    use kling_concurrency::backend::SlotBackend;
    let backend = handle.backend();
    assert!(catch_unwind(AssertUnwindSafe(|| drop(backend.apply(adopt)))).is_err());
    assert_eq!(held(&handle).await, (1, 1), "held by the adopted task");
    handle.complete("listed").await.unwrap().unwrap();

    // Nothing leaked: the pool's one slot serves the next create at once.
    svc.ready().await.unwrap();
    let mut next = spawn(svc.call(create()));
    assert_ready_ok!(next.poll());
}

/// A metrics recorder that panics as a batch answer releases its first task still lets the
/// answer release every task it ended. Before, the in-process backend released the reported
/// tasks one by one: the panic in the first one's in-use gauge stopped the loop, and the
/// others kept their slots until reported again or their lease ran out.
#[tokio::test(start_paused = true)]
async fn a_panicking_metrics_recorder_does_not_stop_a_batch_answer_half_way() {
    use kling_concurrency::backend::{SlotBackend, SlotOp, TaskUpdate};
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::atomic::Ordering;

    let recorder = PanickyRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (mut svc, handle, fake) = fake(SlotsConfig::new(5));
    for _ in 0..5 {
        svc.ready().await.unwrap();
        svc.call(create()).await.unwrap();
    }
    assert_eq!(held(&handle).await, (5, 5));

    // One query answer ends t1, t2 and t3: the in-use gauge panics at the first release.
    for id in ["t1", "t2", "t3"] {
        fake.finish(id);
    }
    recorder.in_use.store(true, Ordering::SeqCst);
    svc.ready().await.unwrap();
    let mut query = spawn(svc.call(get("/tasks?task_ids=t1,t2,t3")));
    assert!(catch_unwind(AssertUnwindSafe(|| query.poll())).is_err());
    drop(query);
    assert_eq!(held(&handle).await, (2, 2), "all three released");

    // The same through the backend: one update ends t4 and t5.
    let updates = ["t4", "t5"]
        .map(|id| TaskUpdate {
            id: id.to_owned(),
            external_id: None,
            status: Some(kling_core::TaskStatus::Succeeded),
        })
        .to_vec();
    let op = SlotOp::Update {
        account: handle.default_account().clone(),
        updates,
        lease: Duration::from_secs(600),
    };
    recorder.in_use.store(true, Ordering::SeqCst);
    let backend = handle.backend();
    assert!(catch_unwind(AssertUnwindSafe(|| drop(backend.apply(op)))).is_err());
    assert_eq!(held(&handle).await, (0, 0), "both released");
}

/// A metrics recorder that panics as a create sent again gives back the slots of the first of
/// several earlier attempts displaced from the index (creates of unknown outcome under its
/// external id on other paths, which a create of a path not known may be an attempt of) still
/// lets every one of them give its slots back. Before, the in-process backend superseded them
/// one by one: the panic in the first one's in-use gauge stopped the loop, and the others hid
/// their slots until their lease.
#[tokio::test(start_paused = true)]
async fn a_panicking_metrics_recorder_does_not_stop_superseding_displaced_attempts_half_way() {
    use kling_concurrency::backend::{CreatePath, SlotBackend, SlotKey};
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::atomic::Ordering;

    let recorder = PanickyRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap();
    drop(layer);
    let backend = handle.backend();
    let key = SlotKey::new(handle.default_account().clone(), video());
    let lease = Duration::from_secs(600);
    let grant = || {
        let mut acquire = spawn(backend.acquire(key.clone(), 1));
        let std::task::Poll::Ready(Ok(reservation)) = acquire.poll() else {
            panic!("a free slot");
        };
        reservation
    };
    let keep = |reservation, id: Option<&str>, path: CreatePath| {
        drop(backend.hold_unread_on(reservation, id, Some("job"), lease, None, path));
    };
    let hold = |id: Option<&str>, path: CreatePath| keep(grant(), id, path);
    // Creates of unknown outcome under `job` on two paths, then a task of a third path under
    // `job` (known by its task id): the index names the task, and both creates are displaced.
    hold(None, CreatePath::legacy("/v1/videos/text2video"));
    hold(None, CreatePath::legacy("/v1/videos/image2video"));
    hold(
        Some("t1"),
        CreatePath::legacy("/v1/videos/multi-image2video"),
    );
    assert_eq!(held(&handle).await, (3, 3));

    // A create under `job` of a path not known, answered: both earlier creates may be it, and
    // give their slots back; the in-use gauge panics at the first.
    let reservation = grant();
    recorder.in_use.store(true, Ordering::SeqCst);
    let again = || keep(reservation, Some("t2"), CreatePath::UNKNOWN);
    assert!(catch_unwind(AssertUnwindSafe(again)).is_err());
    assert_eq!(
        held(&handle).await,
        (2, 2),
        "both earlier attempts gave theirs back"
    );
}

/// A metrics recorder that panics as a create sent again replaces the earlier attempt the
/// index names still lets the rest of the filing run: the other earlier attempts (displaced
/// from the index) give their slots back, and the create's task, reported ended before its
/// answer came, is released. Before, the panic in the first attempt's in-use gauge unwound out
/// of the filing: the others hid their slots, and the ended task held its slot, until their
/// leases.
#[tokio::test(start_paused = true)]
async fn a_panicking_metrics_recorder_does_not_stop_filing_a_create_half_way() {
    use kling_concurrency::backend::{CreatePath, SlotBackend, SlotKey, SlotOp, TaskUpdate};
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::atomic::Ordering;

    let recorder = PanickyRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap();
    drop(layer);
    let backend = handle.backend();
    let key = SlotKey::new(handle.default_account().clone(), video());
    let lease = Duration::from_secs(600);
    let grant = || {
        let mut acquire = spawn(backend.acquire(key.clone(), 1));
        let std::task::Poll::Ready(Ok(reservation)) = acquire.poll() else {
            panic!("a free slot");
        };
        reservation
    };
    let keep = |reservation, id: Option<&str>, path: CreatePath| {
        drop(backend.hold_unread_on(reservation, id, Some("job"), lease, None, path));
    };
    // Creates of unknown outcome under `job` on two paths: the index names the second.
    keep(grant(), None, CreatePath::legacy("/v1/videos/text2video"));
    keep(grant(), None, CreatePath::legacy("/v1/videos/image2video"));
    // `t9` is reported ended before any answer names it.
    let ended = SlotOp::Update {
        account: key.account.clone(),
        updates: vec![TaskUpdate {
            id: "t9".to_owned(),
            external_id: None,
            status: Some(kling_core::TaskStatus::Succeeded),
        }],
        lease,
    };
    drop(backend.apply(ended));
    assert_eq!(held(&handle).await, (2, 2));

    // A create under `job` of a path not known is answered `t9`: the in-use gauge panics as
    // the attempt the index names gives its slot back.
    let reservation = grant();
    recorder.in_use.store(true, Ordering::SeqCst);
    let answered = || keep(reservation, Some("t9"), CreatePath::UNKNOWN);
    assert!(catch_unwind(AssertUnwindSafe(answered)).is_err());
    assert_eq!(
        held(&handle).await,
        (0, 0),
        "both attempts replaced, and the ended task released"
    );
}

/// The service below: from `call` on, the metrics recorder panics on every call, and so does
/// `call`.
#[derive(Clone)]
struct ArmsAndPanics(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Service<Request<Full<Bytes>>> for ArmsAndPanics {
    type Response = Response<Full<Bytes>>;
    type Error = kling_core::error::BoxError;
    type Future = std::future::Ready<Answer>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        panic!("the service below panics in call")
    }
}

/// A metrics recorder that panics on every call does not abort the process when a panic
/// unwinds through the layer. Before, the in-process backend moved its gauges in drops: a
/// grant given back as the service below panicked in `call`, and a pool dropped with the
/// last clone of its backend, each called the recorder while the thread unwound, and its
/// panic there aborted. Now a recorder's panic while the thread unwinds is caught; the slots
/// go back, and the gauges catch up at their next move.
#[tokio::test(start_paused = true)]
async fn a_metrics_recorder_panicking_on_every_call_aborts_nothing_while_unwinding() {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::atomic::Ordering;

    let recorder = PanickyRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2)).unwrap();
    let mut svc = layer.layer(ArmsAndPanics(recorder.every.clone()));

    // Granted at once (the gauge moves), then `call` below panics with the recorder armed:
    // the grant goes back while unwinding.
    svc.ready().await.unwrap();
    assert!(catch_unwind(AssertUnwindSafe(|| svc.call(create()))).is_err());
    recorder.every.store(false, Ordering::SeqCst);
    assert_eq!(held(&handle).await, (0, 0), "the slot went back");

    // The last clones of the backend dropped while unwinding: the pool's drop moves no gauge.
    recorder.every.store(true, Ordering::SeqCst);
    let unwound = catch_unwind(AssertUnwindSafe(move || {
        let _gone = (svc, handle, layer);
        panic!("the caller panics");
    }));
    assert!(unwound.is_err());
    recorder.every.store(false, Ordering::SeqCst);
}

/// A task a reconcile listed without its external id, whose create's answer was lost (kept
/// under that external id alone), holds its slot once as soon as a report names it by both
/// ids, whichever came first. Before, the adopted holding (by task id) and the create's (by
/// external id) were two holdings of one task: the create's kept its slot until its lease,
/// after the task ended.
#[tokio::test(start_paused = true)]
async fn a_task_listed_without_its_external_id_and_its_lost_create_hold_one_slot() {
    use kling_concurrency::backend::{SlotBackend, SlotKey, SlotOp, TaskRef, TaskUpdate};
    use kling_core::TaskStatus;

    for adopted_first in [false, true] {
        let (mut svc, handle, fake) = fake(SlotsConfig::new(3));
        let backend = handle.backend();
        let lease = Duration::from_secs(600);
        let adopt = || SlotOp::Adopt {
            key: SlotKey::new(handle.default_account().clone(), video()),
            task: TaskRef {
                id: Some("t1".to_owned()),
                external_id: None,
            },
            weight: 1,
            lease,
        };
        if adopted_first {
            backend.apply(adopt()).await.unwrap();
        }
        fake.script(Scripted::Lost);
        svc.ready().await.unwrap();
        assert!(svc.call(create_with_external("e1")).await.is_err());
        if !adopted_first {
            backend.apply(adopt()).await.unwrap();
        }
        assert_eq!(
            held(&handle).await,
            (2, 2),
            "adopted first: {adopted_first}"
        );

        let report = |status| SlotOp::Update {
            account: handle.default_account().clone(),
            updates: vec![TaskUpdate {
                id: "t1".to_owned(),
                external_id: Some("e1".to_owned()),
                status: Some(status),
            }],
            lease,
        };
        backend.apply(report(TaskStatus::Processing)).await.unwrap();
        assert_eq!(
            held(&handle).await,
            (1, 1),
            "one task: adopted first: {adopted_first}"
        );
        // Known by its task id from now on: its end by task id alone frees it.
        handle.complete("t1").await.unwrap().unwrap();
        assert_eq!(
            held(&handle).await,
            (0, 0),
            "adopted first: {adopted_first}"
        );

        // Ended at once too.
        if adopted_first {
            let adopt = SlotOp::Adopt {
                key: SlotKey::new(handle.default_account().clone(), video()),
                task: TaskRef {
                    id: Some("t2".to_owned()),
                    external_id: None,
                },
                weight: 1,
                lease,
            };
            backend.apply(adopt).await.unwrap();
            fake.script(Scripted::Lost);
            svc.ready().await.unwrap();
            assert!(svc.call(create_with_external("e2")).await.is_err());
            let end = SlotOp::Update {
                account: handle.default_account().clone(),
                updates: vec![TaskUpdate {
                    id: "t2".to_owned(),
                    external_id: Some("e2".to_owned()),
                    status: Some(TaskStatus::Succeeded),
                }],
                lease,
            };
            backend.apply(end).await.unwrap();
            assert_eq!(held(&handle).await, (0, 0), "both holdings of t2 gone");
        }
    }
}

/// An error whose `source` panics (a service below's own error type).
#[derive(Debug)]
struct PanickySource;

impl std::fmt::Display for PanickySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an error whose source panics")
    }
}

impl std::error::Error for PanickySource {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        panic!("the error's source panics")
    }
}

/// A panic while a create's result is read leaks no slot. Before, the grant had been taken out
/// of the response future to settle it, and an error from below whose `source` panicked (read
/// to tell whether the create may have made a task) dropped it: the slot stayed in use with no
/// task and no lease, for good. Now it is settled as far as the result was read: a create
/// handed on, its result unread, may have made a task, so its slot is kept under its lease.
#[tokio::test(start_paused = true)]
async fn a_panic_reading_a_creates_result_keeps_its_slot_to_its_lease() {
    use std::panic::{AssertUnwindSafe, catch_unwind};

    let lease = Duration::from_secs(600);
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1).lease(lease)).unwrap();
    let below = tower::service_fn(|_: Request<Full<Bytes>>| async {
        Err::<Response<Full<Bytes>>, kling_core::error::BoxError>(Box::new(PanickySource))
    });
    let mut svc = layer.layer(below);
    svc.ready().await.unwrap();
    let mut sent = spawn(svc.call(create()));
    assert!(catch_unwind(AssertUnwindSafe(|| sent.poll())).is_err());
    drop(sent);
    assert_eq!(
        held(&handle).await,
        (1, 1),
        "kept: the create may have made a task"
    );
    advance(lease).await;
    assert_eq!(held(&handle).await, (0, 0), "freed by its lease");
}

/// A task a reconcile adopted before its create's answer came, then ended (its callback freed
/// the adopted holding), and only then the create's answer naming it. Before, the answer kept
/// the create's slot under the task id until its lease ran out (30 minutes), for a task that
/// had ended: the end had freed a holding, so it was not remembered where a create's answer
/// looks. Now the end of an adopted task is remembered there too, and the create's slot goes
/// back when its answer comes.
#[tokio::test(start_paused = true)]
async fn an_adopted_task_ended_before_its_creates_answer_holds_no_slot() {
    let (mut svc, handle, mut server) = manual(SlotsConfig::new(2));
    svc.ready().await.unwrap();
    let mut sent = spawn(svc.call(create()));
    assert_pending!(sent.poll());
    let (_, respond) = server.next_request().await.unwrap();

    // The server made t1; a reconcile's list names it before the create's answer comes.
    let listed = envelope(200, 0, &json!([legacy_task("t1", "processing", None)]));
    let mut list = tower::service_fn(move |_: Request<Full<Bytes>>| {
        std::future::ready(Ok::<_, std::convert::Infallible>(listed.clone()))
    });
    let plan = kling_concurrency::Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let found = handle.reconcile(&mut list, &plan).await.unwrap();
    assert_eq!(found.adopted, 1);
    assert_eq!(held(&handle).await, (2, 1), "the grant, and t1 adopted");

    // t1 ends at once; its callback frees the adopted holding.
    let callback = br#"{"task_id":"t1","task_status":"failed"}"#;
    handle.on_callback(callback).await.unwrap();
    assert_eq!(held(&handle).await, (1, 0), "the grant only");

    // The create's answer comes, naming t1, which has ended.
    respond.send_response(envelope(200, 0, &legacy_task("t1", "submitted", None)));
    assert_ready_ok!(sent.poll());
    assert_eq!(held(&handle).await, (0, 0), "t1 ended: nothing held for it");
}

/// A backend that panics right after it keeps a create's slots (the change made), once when
/// its flag is set.
#[derive(Clone, Debug)]
struct PanicsAfterHold {
    inner: kling_concurrency::backend::InProcess,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl kling_concurrency::backend::SlotBackend for PanicsAfterHold {
    type Acquire =
        <kling_concurrency::backend::InProcess as kling_concurrency::backend::SlotBackend>::Acquire;
    type Apply =
        <kling_concurrency::backend::InProcess as kling_concurrency::backend::SlotBackend>::Apply;
    type Snapshot = <kling_concurrency::backend::InProcess as kling_concurrency::backend::SlotBackend>::Snapshot;

    fn acquire(&self, key: kling_concurrency::backend::SlotKey, weight: u32) -> Self::Acquire {
        self.inner.acquire(key, weight)
    }

    fn apply(&self, op: kling_concurrency::backend::SlotOp) -> Self::Apply {
        self.inner.apply(op)
    }

    fn snapshot(&self) -> Self::Snapshot {
        self.inner.snapshot()
    }

    fn hold_unread_on(
        &self,
        reservation: kling_concurrency::backend::Reservation,
        id: Option<&str>,
        external_id: Option<&str>,
        lease: Duration,
        answered_at: Option<tokio::time::Instant>,
        path: kling_concurrency::backend::CreatePath,
    ) -> Self::Apply {
        let applied =
            self.inner
                .hold_unread_on(reservation, id, external_id, lease, answered_at, path);
        let armed = self.armed.swap(false, std::sync::atomic::Ordering::SeqCst);
        assert!(!armed, "the backend panics after keeping the slots");
        applied
    }
}

/// A backend whose change panics after it took effect: the layer does not make the change
/// again (`SlotBackend`'s contract), so the create's slot is held once, and its task's end frees
/// it once. (Made again, the slot would be kept twice and freed twice.)
#[tokio::test(start_paused = true)]
async fn a_backend_change_that_panics_is_not_made_again() {
    use std::panic::{AssertUnwindSafe, catch_unwind};

    let config = SlotsConfig::new(2);
    let backend = PanicsAfterHold {
        inner: kling_concurrency::backend::InProcess::new(config.clone()).unwrap(),
        armed: Default::default(),
    };
    let layer = TaskSlotsLayer::with_backend(&config, backend.clone()).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(Fake::new());
    backend
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    svc.ready().await.unwrap();
    let mut sent = spawn(svc.call(create()));
    assert!(catch_unwind(AssertUnwindSafe(|| sent.poll())).is_err());
    drop(sent);
    let pool = |snapshot: kling_concurrency::Snapshot| {
        let pool = snapshot.get(handle.default_account(), &video()).unwrap();
        (pool.in_use, pool.tasks)
    };
    assert_eq!(pool(handle.snapshot().await.unwrap()), (1, 1), "kept once");
    handle.complete("t1").await.unwrap().unwrap();
    assert_eq!(pool(handle.snapshot().await.unwrap()), (0, 0));
}

/// A reconcile adopting `t1` (external id `job-9`) before its create's answer came, then that
/// answer lost (a `5000`): what the create holds is kept under `job-9` alone.
async fn adopted_then_answer_lost(
    svc: &mut TaskSlots<Manual>,
    handle: &SlotsHandle,
    server: &mut Server,
    ended_first: bool,
) {
    svc.ready().await.unwrap();
    let mut sent = spawn(svc.call(create_with_external("job-9")));
    assert_pending!(sent.poll());
    let (_, respond) = server.next_request().await.unwrap();
    let listed = envelope(
        200,
        0,
        &json!([legacy_task("t1", "processing", Some("job-9"))]),
    );
    let mut list = tower::service_fn(move |_: Request<Full<Bytes>>| {
        std::future::ready(Ok::<_, std::convert::Infallible>(listed.clone()))
    });
    let plan = kling_concurrency::Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let found = handle.reconcile(&mut list, &plan).await.unwrap();
    assert_eq!(found.adopted, 1);
    assert_eq!(held(handle).await, (2, 1), "the grant, and t1 adopted");
    if ended_first {
        let callback =
            br#"{"task_id":"t1","task_status":"succeed","task_info":{"external_task_id":"job-9"}}"#;
        handle.on_callback(callback).await.unwrap();
        assert_eq!(held(handle).await, (1, 0), "the grant only");
    }
    respond.send_response(envelope(500, 5000, &json!(null)));
    assert_ready_ok!(sent.poll());
}

/// A task a reconcile adopted while its create was on its way, whose create's answer was then
/// lost: the create's slot, kept under its external id alone, is the adopted task's. Before,
/// both were held; the task's end (found by its task id) freed the adopted one only, and the
/// create's slot stayed in use for the whole lease (30 minutes) after the task ended. Now the
/// create's holding takes the adopted task's id and the adopted holding gives its slot back.
#[tokio::test(start_paused = true)]
async fn a_creates_lost_answer_after_its_task_was_adopted_holds_one_slot_freed_by_its_end() {
    let (mut svc, handle, mut server) = manual(SlotsConfig::new(3));
    adopted_then_answer_lost(&mut svc, &handle, &mut server, false).await;
    assert_eq!(held(&handle).await, (1, 1), "one task, one slot");

    // The retry layer's lookup by external id finds t1 running; then t1 ends, its callback
    // naming its task id only.
    svc.ready().await.unwrap();
    let mut lookup = spawn(svc.call(get("/v1/videos/text2video/job-9")));
    assert_pending!(lookup.poll());
    let (_, respond) = server.next_request().await.unwrap();
    let running = legacy_task("t1", "processing", Some("job-9"));
    respond.send_response(envelope(200, 0, &running));
    assert_ready_ok!(lookup.poll());
    assert_eq!(held(&handle).await, (1, 1));
    let callback = br#"{"task_id":"t1","task_status":"succeed"}"#;
    handle.on_callback(callback).await.unwrap();
    assert_eq!(held(&handle).await, (0, 0), "t1 ended: nothing held for it");
}

/// The same, with the adopted task's end (reported with its external id) coming before the
/// create's lost answer: the end is remembered under the external id too, where that create's
/// holding looks. Before, it was remembered by task id only, and the create's slot stayed in
/// use for the whole lease after its task ended.
#[tokio::test(start_paused = true)]
async fn an_adopted_tasks_end_frees_its_creates_slot_kept_later_under_its_external_id() {
    let (mut svc, handle, mut server) = manual(SlotsConfig::new(3));
    adopted_then_answer_lost(&mut svc, &handle, &mut server, true).await;
    assert_eq!(held(&handle).await, (0, 0), "t1 ended: nothing held for it");
}

/// A create whose answer was lost (kept under its external id alone), then a reconcile whose
/// list names its task: the list adopts nothing (the create's holding is the task) and now
/// also files the task id it names there, so that `complete` by task id (or a callback without
/// the external id) frees it. Before, only a report naming the external id found it, and
/// `complete("t1")` left the slot in use for the whole lease.
#[tokio::test(start_paused = true)]
async fn a_listed_task_of_a_create_of_unknown_outcome_is_freed_by_its_task_id() {
    let (mut svc, handle, mut server) = manual(SlotsConfig::new(3));
    svc.ready().await.unwrap();
    let mut sent = spawn(svc.call(create_with_external("job-9")));
    assert_pending!(sent.poll());
    let (_, respond) = server.next_request().await.unwrap();
    respond.send_response(envelope(500, 5000, &json!(null)));
    assert_ready_ok!(sent.poll());
    let listed = envelope(
        200,
        0,
        &json!([legacy_task("t1", "processing", Some("job-9"))]),
    );
    let mut list = tower::service_fn(move |_: Request<Full<Bytes>>| {
        std::future::ready(Ok::<_, std::convert::Infallible>(listed.clone()))
    });
    let plan = kling_concurrency::Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let found = handle.reconcile(&mut list, &plan).await.unwrap();
    assert_eq!(found.adopted, 0);
    assert_eq!(held(&handle).await, (1, 1), "one task, one slot");
    handle.complete("t1").await.unwrap();
    assert_eq!(held(&handle).await, (0, 0), "t1 ended: nothing held for it");
}

/// A capacity set for every account, with a metrics recorder that panics as the first pool's
/// gauges move, still sets every pool. Before, the in-process backend set and published each
/// pool in turn: a panic in the first one's gauges left the later ones at their old capacity
/// (while the configuration said the new one), admitting more creates than the account was
/// told it may run. Now every pool is set before any gauge moves.
#[tokio::test(start_paused = true)]
async fn a_panicking_metrics_recorder_does_not_stop_a_capacity_change_half_way() {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::atomic::Ordering;

    let recorder = PanickyRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (mut svc, handle, _fake) = fake(SlotsConfig::new(4));
    let image = Pool::new(Product::Image);
    let images = |n: u32, account: &str| {
        let mut req = post("/v1/images/generations", &format!(r#"{{"n":{n}}}"#));
        req.extensions_mut()
            .insert(kling_core::AccountId::new(account));
        req
    };
    // Account a: two slots held, a create of three waits. Account b: one held. (Within a
    // bound: a create counted under a's pool would queue behind `heavy`, which only this test
    // polls, and wait for ever rather than fail.)
    let granted = |call| async move {
        tokio::time::timeout(Duration::from_secs(1), call)
            .await
            .expect("a create with free slots in its own account's pool is granted at once")
    };
    svc.ready().await.unwrap();
    granted(svc.call(images(2, "a"))).await.unwrap();
    svc.ready().await.unwrap();
    let mut heavy = spawn(svc.call(images(3, "a")));
    assert_pending!(heavy.poll());
    svc.ready().await.unwrap();
    granted(svc.call(images(1, "b"))).await.unwrap();

    // Two slots for every account: a's waiter is refused, and its waiters gauge panics.
    recorder.waiters.store(true, Ordering::SeqCst);
    let mut set = spawn(handle.set_capacity(None, image.clone(), 2));
    assert!(catch_unwind(AssertUnwindSafe(|| set.poll())).is_err());
    drop(set);
    let err = tokio_test::assert_ready_err!(heavy.poll());
    assert!(err.is::<OverCapacity>(), "{err}");

    // b's pool has two slots too: one held, a create of two waits.
    let snapshot = handle.snapshot().await.unwrap();
    let b = snapshot
        .get(&kling_core::AccountId::new("b"), &image)
        .unwrap();
    assert_eq!((b.in_use, b.capacity, b.configured), (1, 2, 2));
    svc.ready().await.unwrap();
    let mut over = spawn(svc.call(images(2, "b")));
    assert_pending!(over.poll());
}
