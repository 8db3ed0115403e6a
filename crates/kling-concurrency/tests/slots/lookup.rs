//! Creates whose outcome was unknown, then looked up by external id (as the retry layer does
//! before sending them again): a lookup that finds nothing gives their slots back at once.

use std::time::Duration;

use kling_concurrency::{SlotsConfig, TaskSlotsLayer};
use tokio::time::advance;
use tokio_test::task::spawn;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::{Layer, Service, ServiceExt};

use crate::support::*;

#[tokio::test(start_paused = true)]
async fn a_legacy_lookup_that_finds_nothing_frees_the_slot_for_the_next_create() {
    let fake = Fake::new();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1)).unwrap();
    let mut svc = layer.layer(fake.clone());

    // Step 1: the create is lost after it was sent; its slot stays held under `e1`.
    fake.script(Scripted::Lost);
    svc.ready().await.unwrap();
    assert!(svc.call(create_with_external("e1")).await.is_err());
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 0));

    // Step 2: the create sent again waits for the only slot.
    svc.ready().await.unwrap();
    let mut again = spawn(svc.call(create_with_external("e1")));
    assert_pending!(again.poll());
    assert_eq!(pool_state(&handle, &video()).await, (1, 1, 1));

    // Step 3: the lookup by external id finds no task (1203): the slot goes to the waiter
    // now, not when the 30-minute lease ends.
    svc.ready().await.unwrap();
    let lookup = svc.call(get("/v1/videos/text2video/e1")).await.unwrap();
    assert_eq!(lookup.status(), 404);
    assert!(again.is_woken());
    let created = assert_ready_ok!(again.poll());
    assert_eq!(created.status(), 200);
    let snap = handle.snapshot().await.unwrap();
    let pool = snap.get(handle.default_account(), &video()).unwrap();
    assert_eq!((pool.in_use, pool.tasks, pool.waiters), (1, 1, 0));
    assert_eq!(fake.creates(), 2);

    // Step 4: a query by a task id the server does not know ends nothing of ours.
    svc.ready().await.unwrap();
    let unknown = svc.call(get("/v1/videos/text2video/t99")).await.unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(pool_state(&handle, &video()).await.0, 1);
    advance(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_new_style_lookup_that_finds_nothing_frees_the_slot() {
    let fake = Fake::new();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2)).unwrap();
    let mut svc = layer.layer(fake.clone());
    let create = |ext: &str| {
        post(
            "/text-to-video/kling-3.0",
            &format!(r#"{{"prompt":"x","external_id":"{ext}"}}"#),
        )
    };
    let pool = kling_core::Pool::with_model(kling_core::Product::Video, "kling-3.0");

    // Two creates lost after sending: both slots held under their external ids.
    for ext in ["e1", "e2"] {
        fake.script(Scripted::Lost);
        svc.ready().await.unwrap();
        assert!(svc.call(create(ext)).await.is_err());
    }
    assert_eq!(pool_state(&handle, &pool).await.0, 2);

    // A lookup of `e1` answered with no task: `e1`'s slot comes back, `e2`'s stays.
    svc.ready().await.unwrap();
    svc.call(get("/tasks?external_task_ids=e1")).await.unwrap();
    assert_eq!(pool_state(&handle, &pool).await.0, 1);

    // A lookup of a task id (not an external id) ends nothing.
    svc.ready().await.unwrap();
    svc.call(get("/tasks?task_ids=t9")).await.unwrap();
    assert_eq!(pool_state(&handle, &pool).await.0, 1);
}

/// A server that ignores the external-id filter answers a lookup with the account's other
/// tasks: that says nothing of the one asked for, whose slot stays held (the retry layer does
/// not send its create again on such an answer either).
#[tokio::test(start_paused = true)]
async fn a_lookup_answered_with_tasks_not_asked_for_ends_nothing() {
    let fake = Fake::new();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2)).unwrap();
    let mut svc = layer.layer(fake.clone());
    let create = |ext: &str| {
        post(
            "/text-to-video/kling-3.0",
            &format!(r#"{{"prompt":"x","external_id":"{ext}"}}"#),
        )
    };
    let pool = kling_core::Pool::with_model(kling_core::Product::Video, "kling-3.0");
    // `e1` is lost after it was sent (held under `e1`); `e2` is created as `t1`.
    fake.script(Scripted::Lost);
    svc.ready().await.unwrap();
    assert!(svc.call(create("e1")).await.is_err());
    svc.ready().await.unwrap();
    svc.call(create("e2")).await.unwrap();
    assert_eq!(pool_state(&handle, &pool).await.0, 2);

    fake.ignore_filters();
    svc.ready().await.unwrap();
    svc.call(get("/tasks?external_task_ids=e1")).await.unwrap();
    assert_eq!(
        pool_state(&handle, &pool).await.0,
        2,
        "e1 may exist: still held"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lookup_that_finds_a_ghost_create_links_its_task_id() {
    let fake = Fake::new();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1)).unwrap();
    let mut svc = layer.layer(fake.clone());

    // Step 1: the task is created but the answer is 5000: held under `e1` only.
    fake.script(Scripted::Ghost);
    svc.ready().await.unwrap();
    let ghost = svc.call(create_with_external("e1")).await.unwrap();
    assert_eq!(ghost.status(), 500);
    assert_eq!(pool_state(&handle, &video()).await.0, 1);

    // Step 2: the lookup by external id reports `t1` running with `e1`: the holding now
    // answers to `t1` too, and keeps its slot.
    svc.ready().await.unwrap();
    let found = svc.call(get("/v1/videos/text2video/e1")).await.unwrap();
    assert_eq!(found.status(), 200);
    assert_eq!(pool_state(&handle, &video()).await.0, 1);

    // Step 3: a query by the task id ends it.
    fake.finish("t1");
    svc.ready().await.unwrap();
    svc.call(get("/v1/videos/text2video/t1")).await.unwrap();
    assert_eq!(pool_state(&handle, &video()).await, (0, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_batch_lookup_ends_the_absent_and_still_settles_the_found() {
    let fake = Fake::new();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2)).unwrap();
    let mut svc = layer.layer(fake.clone());
    let pool = kling_core::Pool::with_model(kling_core::Product::Video, "kling-3.0");
    let create = |ext: &str| {
        post(
            "/text-to-video/kling-3.0",
            &format!(r#"{{"prompt":"x","external_id":"{ext}"}}"#),
        )
    };
    // `e1` is lost before the server saw it; `e2` is a ghost: created, answered 5000.
    fake.script(Scripted::Lost);
    svc.ready().await.unwrap();
    assert!(svc.call(create("e1")).await.is_err());
    fake.script(Scripted::Ghost);
    svc.ready().await.unwrap();
    svc.call(create("e2")).await.unwrap();
    assert_eq!(pool_state(&handle, &pool).await.0, 2);

    // The task ends; one batch lookup reports `e2` ended and says nothing of `e1`: both
    // slots come back.
    fake.finish("t1");
    svc.ready().await.unwrap();
    svc.call(get("/tasks?external_task_ids=e1,e2"))
        .await
        .unwrap();
    assert_eq!(pool_state(&handle, &pool).await, (0, 2, 0));
}

/// External ids are unique per account only: what one account's lookups and queries say of an
/// external id never settles another account's holding under the same external id.
#[tokio::test(start_paused = true)]
async fn a_lookup_or_report_in_one_account_never_settles_another_accounts_external_id() {
    let fake = Fake::new();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2)).unwrap();
    let mut svc = layer.layer(fake.clone());
    let other = kling_core::AccountId::new("other");
    let in_other = |mut request: http::Request<http_body_util::Full<bytes::Bytes>>| {
        request.extensions_mut().insert(other.clone());
        request
    };

    // The default account's create with `e1` is lost after sending: held under `e1`.
    fake.script(Scripted::Lost);
    svc.ready().await.unwrap();
    assert!(svc.call(create_with_external("e1")).await.is_err());
    assert_eq!(pool_state(&handle, &video()).await.0, 1);

    // The other account's lookup of its own `e1` finds nothing: the default account's
    // holding stays.
    svc.ready().await.unwrap();
    let lookup = svc
        .call(in_other(get("/v1/videos/text2video/e1")))
        .await
        .unwrap();
    assert_eq!(lookup.status(), 404);
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        1,
        "not the other's e1"
    );

    // The other account's list reports its own task with `e1`, ended (a second layer on the
    // same backend, over a client that answers so): still nothing of ours ends.
    let mut reporter = layer.layer(tower::service_fn(
        |_: http::Request<http_body_util::Full<bytes::Bytes>>| {
            let tasks = serde_json::json!([
                {"task_id": "t9", "task_status": "succeed", "task_info": {"external_task_id": "e1"}}
            ]);
            std::future::ready(Ok::<_, kling_core::error::BoxError>(envelope(
                200, 0, &tasks,
            )))
        },
    ));
    reporter.ready().await.unwrap();
    reporter
        .call(in_other(get("/v1/videos/text2video?pageNum=1&pageSize=30")))
        .await
        .unwrap();
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        1,
        "not the other's e1"
    );

    // The default account's own lookup finds nothing: its slot comes back (the control).
    svc.ready().await.unwrap();
    svc.call(get("/v1/videos/text2video/e1")).await.unwrap();
    assert_eq!(pool_state(&handle, &video()).await.0, 0);
}

#[tokio::test(start_paused = true)]
async fn a_lookup_answer_whose_data_cannot_be_read_keeps_the_slot() {
    // The create is lost after sending; the lookups answer code 0 with `data` null, then `[]`.
    let answers = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::from([
        "null", "{}", "[]",
    ])));
    let inner = tower::service_fn(
        move |req: http::Request<http_body_util::Full<bytes::Bytes>>| {
            let answer = if req.method() == http::Method::POST {
                Err::<_, kling_core::BoxError>(Box::new(kling_core::error::Transport::after_sent(
                    "connection reset",
                )))
            } else {
                let data = answers.lock().unwrap().pop_front().expect("three lookups");
                Ok(envelope(200, 0, &serde_json::from_str(data).unwrap()))
            };
            std::future::ready(answer)
        },
    );
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1)).unwrap();
    let mut svc = layer.layer(inner);
    let pool = kling_core::Pool::with_model(kling_core::Product::Video, "kling-3.0");
    svc.ready().await.unwrap();
    let create = post(
        "/text-to-video/kling-3.0",
        r#"{"prompt":"x","external_id":"e1"}"#,
    );
    assert!(svc.call(create).await.is_err());
    assert_eq!(pool_state(&handle, &pool).await.0, 1);

    // `data: null` and an object where a list belongs: the task may exist, the slot stays
    // (the retry layer above does not send the create again on these either).
    for _ in 0..2 {
        svc.ready().await.unwrap();
        svc.call(get("/tasks?external_task_ids=e1")).await.unwrap();
        assert_eq!(pool_state(&handle, &pool).await.0, 1);
    }
    // An empty list: no such task, the slot comes back.
    svc.ready().await.unwrap();
    svc.call(get("/tasks?external_task_ids=e1")).await.unwrap();
    assert_eq!(pool_state(&handle, &pool).await.0, 0);
}

/// An external id with a reserved character (`batch:42`) is looked up percent-encoded, as the
/// retry layer sends it: a lookup that finds nothing still frees its slot (compared with the
/// encoded text, it ended nothing, and the slot stayed for the lease).
#[tokio::test(start_paused = true)]
async fn a_lookup_of_an_encoded_external_id_that_finds_nothing_frees_its_slot() {
    let fake = Fake::new();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2)).unwrap();
    let mut svc = layer.layer(fake.clone());
    fake.script(Scripted::Lost);
    svc.ready().await.unwrap();
    assert!(svc.call(create_with_external("batch:42")).await.is_err());
    assert_eq!(pool_state(&handle, &video()).await.0, 1);
    svc.ready().await.unwrap();
    let lookup = svc
        .call(get("/v1/videos/text2video/batch%3A42"))
        .await
        .unwrap();
    assert_eq!(lookup.status(), 404);
    assert_eq!(pool_state(&handle, &video()).await.0, 0);

    let pool = kling_core::Pool::with_model(kling_core::Product::Video, "kling-3.0");
    fake.script(Scripted::Lost);
    svc.ready().await.unwrap();
    let create = post(
        "/text-to-video/kling-3.0",
        r#"{"prompt":"x","external_id":"job 1"}"#,
    );
    assert!(svc.call(create).await.is_err());
    assert_eq!(pool_state(&handle, &pool).await.0, 1);
    svc.ready().await.unwrap();
    svc.call(get("/tasks?external_task_ids=job%201"))
        .await
        .unwrap();
    assert_eq!(pool_state(&handle, &pool).await.0, 0);
}
