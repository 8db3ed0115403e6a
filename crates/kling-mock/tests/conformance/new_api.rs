//! The new generation end to end: `id`, `status`, `succeeded`, `outputs`, `billing`,
//! batch query, cursor list.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kling_mock::{MockConfig, MockServer, PoolScope};
use serde_json::{Value, json};

use crate::support::{Caller, Delivery, advance, encode, hook_receiver, quiet};

const T2V: &str = "/text-to-video/kling-3.0";

#[tokio::test(start_paused = true)]
async fn a_new_video_goes_submitted_processing_succeeded_with_outputs_and_billing() {
    let c = Caller::new(quiet());
    let created = c
        .post(T2V, json!({"prompt": "a cat", "external_id": "e1"}))
        .await;
    let d = created.data();
    let id = d["id"].as_str().unwrap().to_owned();
    assert_eq!(d["status"], "submitted");
    assert_eq!(d["external_id"], "e1");
    assert!(d.get("task_id").is_none() && d.get("billing").is_none());

    advance(11).await;
    let q = c.get(&format!("/tasks?task_ids={id}")).await;
    assert_eq!(q.data()[0]["status"], "processing");

    advance(90).await;
    let q = c.get(&format!("/tasks?task_ids={id}")).await;
    let t = &q.data()[0];
    assert_eq!(t["status"], "succeeded");
    assert_eq!(t["outputs"][0]["type"], "video");
    assert!(t["outputs"][0]["url"].is_string());
    assert!(t["outputs"][0]["duration"].is_number());
    assert_eq!(
        t["billing"],
        json!([{"charge_type": "credits", "amount": 1, "currency": "credit", "package_type": "video"}])
    );
    assert!(t.get("message").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_failed_new_task_carries_a_message() {
    let c = Caller::new(quiet().failure_rate(1.0));
    let id = c.post(T2V, json!({"prompt": "x"})).await.data()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    advance(100).await;
    let q = c.get(&format!("/tasks?task_ids={id}")).await;
    let t = &q.data()[0];
    assert_eq!(t["status"], "failed");
    assert!(t["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(t.get("outputs").is_none());
    assert_eq!(t["billing"][0]["amount"], 0);
}

#[tokio::test(start_paused = true)]
async fn the_batch_query_answers_by_ids_or_external_ids_in_order() {
    let c = Caller::new(quiet());
    let a = c
        .post(T2V, json!({"prompt": "x", "external_id": "ea"}))
        .await
        .data()["id"]
        .clone();
    let b = c
        .post(
            "/text-to-image/kolors-v2",
            json!({"prompt": "x", "external_id": "eb"}),
        )
        .await
        .data()["id"]
        .clone();
    let r = c
        .get(&format!(
            "/tasks?task_ids={},{}",
            b.as_str().unwrap(),
            a.as_str().unwrap()
        ))
        .await;
    let list = r.data().as_array().unwrap().clone();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["id"], b);
    assert_eq!(list[1]["id"], a);
    let r = c.get("/tasks?external_task_ids=ea%2Ceb,unknown").await;
    let list = r.data().as_array().unwrap().clone();
    assert_eq!(list.len(), 2, "unknown ids are left out");
    assert_eq!(list[0]["external_id"], "ea");
    // Another account sees none of them.
    c.with_key("other")
        .get("/tasks?external_task_ids=ea")
        .await
        .assert_error(404, 1203);
}

#[tokio::test(start_paused = true)]
async fn the_batch_query_finds_every_external_id_a_create_accepts() {
    let c = Caller::new(quiet().slots(100));
    let long = "j".repeat(129);
    let longest = "\u{e9}".repeat(2048); // 4096 bytes: the create's own limit
    for (ext, value) in [
        (long.clone(), long.clone()),
        ("user:42@host".to_owned(), "user:42@host".to_owned()),
        ("a!$'()*;b".to_owned(), "a!$'()*;b".to_owned()),
        (
            "job 1/\u{e9}?#%&=+".to_owned(),
            encode("job 1/\u{e9}?#%&=+"),
        ),
        (longest.clone(), encode(&longest)),
    ] {
        let created = c
            .post(T2V, json!({"prompt": "x", "external_id": ext}))
            .await;
        let id = created.data()["id"].as_str().unwrap().to_owned();
        let r = c.get(&format!("/tasks?external_task_ids={value}")).await;
        let list = r.data().as_array().unwrap().clone();
        assert_eq!(list.len(), 1, "external id {ext:?}");
        assert_eq!(list[0]["id"], id.as_str());
        assert_eq!(list[0]["external_id"], ext.as_str());
    }
    c.get(&format!("/tasks?external_task_ids={}", "k".repeat(129)))
        .await
        .assert_error(404, 1203);
}

#[tokio::test(start_paused = true)]
async fn post_tasks_lists_with_a_cursor_and_filters() {
    let c = Caller::new(quiet().slots(10));
    for i in 0..5 {
        c.post(T2V, json!({"prompt": format!("p{i}")})).await.data();
    }
    c.post("/image-to-video/kling-3.0", json!({"image": "x"}))
        .await
        .data();
    let mut seen = Vec::new();
    let mut cursor = serde_json::Value::Null;
    loop {
        let r = c
            .post(
                "/tasks",
                json!({"cursor": cursor, "limit": 2, "product_type": "text-to-video"}),
            )
            .await;
        let d = r.data();
        for t in d["tasks"].as_array().unwrap() {
            seen.push(t["id"].as_str().unwrap().to_owned());
        }
        cursor = d["next_cursor"].clone();
        if cursor.is_null() {
            break;
        }
        assert!(cursor.is_string());
    }
    assert_eq!(seen.len(), 5);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(seen, sorted, "newest first");

    let r = c.post("/tasks", json!({"status": "succeeded"})).await;
    assert_eq!(r.data()["tasks"].as_array().unwrap().len(), 0);
    advance(100).await;
    let r = c.post("/tasks", json!({"status": "succeeded"})).await;
    assert_eq!(r.data()["tasks"].as_array().unwrap().len(), 6);
    assert!(r.data()["next_cursor"].is_null());
    // An empty body lists everything.
    let r = c
        .raw(http::Method::POST, "/tasks", bytes::Bytes::new())
        .await;
    assert_eq!(r.data()["tasks"].as_array().unwrap().len(), 6);
}

#[tokio::test(start_paused = true)]
async fn new_style_pools_are_per_model() {
    let c = Caller::new(quiet().slots(1));
    c.post(T2V, json!({"prompt": "x"})).await.data();
    c.post("/image-to-video/kling-3.0", json!({"image": "x"}))
        .await
        .assert_error(429, 1303);
    c.post("/text-to-video/kling-2.6", json!({"prompt": "x"}))
        .await
        .data();
    c.post("/v1/videos/text2video", json!({"prompt": "x"}))
        .await
        .data();
    let stats = c.mock.stats();
    assert_eq!(stats.in_use["video:kling-3.0"], 1);
    assert_eq!(stats.in_use["video:kling-2.6"], 1);
    assert_eq!(stats.in_use["video"], 1);
}

#[tokio::test(start_paused = true)]
async fn with_product_scope_every_model_and_the_legacy_endpoint_share_one_pool() {
    let c = Caller::new(quiet().slots(2).pool_scope(PoolScope::Product));
    c.post(T2V, json!({"prompt": "x"})).await.data();
    c.post("/text-to-video/kling-2.6", json!({"prompt": "x"}))
        .await
        .data();
    // Two models hold both of `video`'s slots: a third model and the legacy path are refused.
    c.post("/image-to-video/kling-2.1", json!({"image": "x"}))
        .await
        .assert_error(429, 1303);
    c.post("/v1/videos/text2video", json!({"prompt": "x"}))
        .await
        .assert_error(429, 1303);
    // Images have a pool of their own.
    c.post("/text-to-image/kolors-v2", json!({"prompt": "x", "n": 2}))
        .await
        .data();
    let stats = c.mock.stats();
    assert_eq!(stats.in_use["video"], 2);
    assert_eq!(stats.in_use["image"], 2);
    assert!(!stats.in_use.contains_key("video:kling-3.0"));
}

#[test]
fn a_model_pools_slots_under_product_scope_are_refused() {
    let config = quiet()
        .pool_scope(PoolScope::Product)
        .pool_slots("video:kling-3.0", 2);
    let err = kling_mock::MockKling::new(config).unwrap_err();
    assert_eq!(err.field(), "pool_slots");
    let config = quiet()
        .pool_scope(PoolScope::Product)
        .pool_slots("video", 2);
    assert!(kling_mock::MockKling::new(config).is_ok());
}

/// Kling's own samples send optional fields empty (`"callback_url": ""`): read as absent. A
/// required one empty is still refused.
#[tokio::test(start_paused = true)]
async fn empty_optional_fields_are_absent() {
    let c = Caller::new(quiet());
    let r = c
        .post(
            "/v1/videos/text2video",
            json!({"prompt": "x", "callback_url": "", "external_task_id": ""}),
        )
        .await;
    assert_eq!(r.data()["task_info"], json!({}));
    c.post(
        T2V,
        json!({"prompt": "x", "external_id": "", "options": {"callback_url": ""}}),
    )
    .await
    .data();
    c.post(T2V, json!({"prompt": ""}))
        .await
        .assert_error(400, 1201);
    assert_eq!(c.mock.stats().tasks_created, 2);
}

/// `options.callback_url` gets the task at each status change, in the new shape (`id`,
/// `status`, `succeeded`, `outputs`, `billing`), to that very URL. Real sockets, so real time
/// at speed 1000 (100 s tasks last 100 ms).
#[tokio::test]
async fn the_new_callback_url_lives_in_options() {
    let (base, mut rx) = hook_receiver().await;
    let server = MockServer::start(
        MockConfig::default()
            .no_rate_limit()
            .speed(1000.0)
            .task_duration(Duration::from_secs(100), Duration::from_secs(100)),
    )
    .await
    .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let create = |body: Value| {
        let req = Request::post(format!("{}{T2V}", server.base_url()))
            .header("authorization", "Bearer cb-key")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let client = client.clone();
        async move {
            let resp = client.request(req).await.unwrap();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            serde_json::from_slice::<Value>(&bytes).unwrap()
        }
    };
    let created = create(json!({
        "prompt": "x",
        "external_id": "new-cb",
        "options": {"callback_url": format!("{base}/new-hook?k=v")},
    }))
    .await;
    assert_eq!(created["code"], 0, "{created}");
    let id = created["data"]["id"].as_str().unwrap().to_owned();

    let mut statuses = Vec::new();
    for _ in 0..2 {
        let Delivery { path, body, .. } = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("callback in time")
            .expect("callback");
        assert_eq!(path, "/new-hook");
        let task: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(task["id"], id.as_str(), "{task}");
        assert_eq!(task["external_id"], "new-cb");
        assert!(task.get("task_id").is_none() && task.get("task_status").is_none());
        let status = task["status"].as_str().unwrap().to_owned();
        if status == "succeeded" {
            assert_eq!(task["outputs"][0]["type"], "video", "{task}");
            assert_eq!(task["billing"][0]["amount"], 1, "{task}");
        }
        statuses.push(status);
    }
    assert_eq!(statuses, ["processing", "succeeded"]);

    // A top-level `callback_url` is the legacy field: a new-style create does not call it.
    let created = create(json!({"prompt": "x", "callback_url": format!("{base}/top-level")})).await;
    assert_eq!(created["code"], 0, "{created}");
    let extra = tokio::time::timeout(Duration::from_millis(400), rx.recv()).await;
    assert!(extra.is_err(), "unexpected callback {extra:?}");

    let refused = create(json!({"prompt": "x", "options": "nope"})).await;
    assert_eq!(refused["code"], 1201, "{refused}");
    assert_eq!(server.stats().callbacks_sent, 2);
    server.shutdown().await;
}

/// Opt-in: with `known_models` set, a new-style create of another model is 404 code 1203
/// (KLING_API.md: "resource or model not found") and bills nothing; by default every model
/// exists.
#[tokio::test(start_paused = true)]
async fn with_known_models_an_unknown_model_is_404_1203() {
    let c = Caller::new(quiet());
    c.post("/text-to-video/kling-9.9", json!({"prompt": "x"}))
        .await
        .data();

    let c = Caller::new(
        quiet()
            .credits(10.0)
            .known_model("kling-3.0")
            .known_model("kolors-v2"),
    );
    for path in [
        "/text-to-video/kling-3.0o",
        "/image-to-video/kling-9.9",
        "/text-to-image/kling-3.0.",
    ] {
        let r = c.post(path, json!({"prompt": "x", "image": "i"})).await;
        r.assert_error(404, 1203);
        assert!(r.body["message"].as_str().unwrap().contains("model"));
    }
    assert_eq!(c.mock.stats().tasks_created, 0);
    assert_eq!(c.mock.remaining_credits("test-key"), Some(10.0));
    c.post(T2V, json!({"prompt": "x"})).await.data();
    c.post("/text-to-image/kolors-v2", json!({"prompt": "x"}))
        .await
        .data();
    // Legacy creates name their model in the body and are not checked.
    c.post("/v1/videos/text2video", json!({"prompt": "x"}))
        .await
        .data();
}

/// An id named twice in a batch query is answered once: the answer is the tasks the ids name.
/// Each was listed once per mention, so a task came back twice.
#[tokio::test(start_paused = true)]
async fn the_batch_query_answers_each_task_once() {
    let c = Caller::new(quiet());
    let a = c
        .post(T2V, json!({"prompt": "x", "external_id": "ea"}))
        .await
        .data()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = c.post(T2V, json!({"prompt": "x"})).await.data()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = c.get(&format!("/tasks?task_ids={a},{b},{a}")).await;
    let ids: Vec<_> = r
        .data()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].clone())
        .collect();
    assert_eq!(ids, [json!(a), json!(b)]);
    let r = c.get("/tasks?external_task_ids=ea,ea%2Cea").await;
    assert_eq!(r.data().as_array().unwrap().len(), 1, "{}", r.body);
}
