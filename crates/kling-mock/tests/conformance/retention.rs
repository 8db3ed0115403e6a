//! Task retention: a task stays queryable 30 days (API time) after it ended, then answers as an
//! unknown task does (404, 1203), in queries, lists and external-id checks alike.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Caller, advance, quiet};

const LEGACY: &str = "/v1/videos/text2video";
const NEW: &str = "/text-to-video/kling-3.0";
const DAY: u64 = 24 * 3600;
const RETENTION: u64 = 30 * DAY;

/// The new-style list, followed to its end with pages of `limit`: the ids, newest first.
async fn list_all(c: &Caller, limit: u64) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor = Value::Null;
    loop {
        let page = c
            .post("/tasks", json!({"cursor": cursor, "limit": limit}))
            .await;
        let data = page.data().clone();
        for t in data["tasks"].as_array().unwrap() {
            ids.push(t["id"].as_str().unwrap().to_owned());
        }
        cursor = data["next_cursor"].clone();
        if cursor.is_null() {
            return ids;
        }
    }
}

/// Asks for the legacy and the new task by task id and by external id: `true` when all four
/// find them, `false` when all four answer 404 1203 (a mix fails the test).
async fn all_found(c: &Caller, legacy_id: &str, new_id: &str) -> bool {
    let answers = [
        c.get(&format!("{LEGACY}/{legacy_id}")).await,
        c.get(&format!("{LEGACY}/old-legacy")).await,
        c.get(&format!("/tasks?task_ids={new_id}")).await,
        c.get("/tasks?external_task_ids=old-new").await,
    ];
    let found = answers[0].status == 200;
    for a in &answers {
        if found {
            assert!(a.data().to_string().contains("succeed"), "{:?}", a.body);
        } else {
            a.assert_error(404, 1203);
        }
    }
    found
}

#[tokio::test(start_paused = true)]
async fn a_task_answers_until_its_retention_ends_then_as_unknown() {
    let c = Caller::new(quiet());
    let legacy = c
        .post(
            LEGACY,
            json!({"prompt": "x", "external_task_id": "old-legacy"}),
        )
        .await;
    let legacy_id = legacy.data()["task_id"].as_str().unwrap().to_owned();
    let new = c
        .post(NEW, json!({"prompt": "x", "external_id": "old-new"}))
        .await;
    let new_id = new.data()["id"].as_str().unwrap().to_owned();
    // Both end at 100 s; the retention counts from there.
    advance(100 + RETENTION - 1).await;
    assert!(all_found(&c, &legacy_id, &new_id).await);
    // Within the window the external ids are still taken.
    c.post(
        LEGACY,
        json!({"prompt": "x", "external_task_id": "old-legacy"}),
    )
    .await
    .assert_error(400, 1201);
    c.post(NEW, json!({"prompt": "x", "external_id": "old-new"}))
        .await
        .assert_error(400, 1201);
    tokio::time::advance(Duration::from_millis(999)).await;
    assert!(all_found(&c, &legacy_id, &new_id).await);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(!all_found(&c, &legacy_id, &new_id).await);
    assert_eq!(
        c.get(LEGACY).await.data().as_array().unwrap().len(),
        0,
        "the legacy list forgot it"
    );
    assert!(list_all(&c, 30).await.is_empty(), "the new list forgot it");
    // The counters never go back; the external ids are free again.
    let stats = c.mock.stats();
    assert_eq!((stats.tasks_created, stats.tasks_finished), (2, 2));
    assert_eq!(stats.duplicate_external_ids, 2);
    c.post(
        LEGACY,
        json!({"prompt": "x", "external_task_id": "old-legacy"}),
    )
    .await
    .data();
    c.post(NEW, json!({"prompt": "x", "external_id": "old-new"}))
        .await
        .data();
    let again = c.get("/tasks?external_task_ids=old-new").await;
    assert_ne!(
        again.data()[0]["id"],
        new_id.as_str(),
        "a new task, a new id"
    );
    assert_eq!(c.mock.stats().tasks_created, 4);
}

#[tokio::test(start_paused = true)]
async fn the_retention_is_api_time() {
    // At 1440× a day of API time is a minute: the task's 100 s are 69.4 ms, 30 days are 30
    // minutes.
    let c = Caller::new(quiet().speed(1440.0));
    let created = c.post(LEGACY, json!({"prompt": "x"})).await;
    let id = created.data()["task_id"].as_str().unwrap().to_owned();
    advance(30 * 60).await;
    c.get(&format!("{LEGACY}/{id}")).await.data();
    tokio::time::advance(Duration::from_millis(70)).await;
    c.get(&format!("{LEGACY}/{id}"))
        .await
        .assert_error(404, 1203);
}

/// At a speed where 30 days of API time are less than the second of real time a task is kept
/// at least, its result files last as long as it does: a query that shows the task succeeded
/// shows URLs that answer. They expired at the scaled 30 days (0.26 s at 10⁷×), so the task
/// listed URLs that were already 404.
#[tokio::test(start_paused = true)]
async fn result_files_last_as_long_as_their_task_at_any_speed() {
    use http_body_util::Full;
    use tower_service::Service as _;

    let c = Caller::new(quiet().speed(1e7));
    let created = c.post(LEGACY, json!({"prompt": "x"})).await;
    let id = created.data()["task_id"].as_str().unwrap().to_owned();
    let fetch = || {
        let (mut mock, id) = (c.mock.clone(), id.clone());
        async move {
            let req = http::Request::get(format!("/__mock/files/{id}/0.mp4"))
                .body(Full::new(bytes::Bytes::new()))
                .unwrap();
            mock.call(req).await.unwrap().status().as_u16()
        }
    };
    // 100 s of API time are 10 µs; 0.5 s later the task is still kept (1 s of real time).
    tokio::time::advance(Duration::from_millis(500)).await;
    let task = c.get(&format!("{LEGACY}/{id}")).await.data().clone();
    assert_eq!(task["task_status"], "succeed", "{task}");
    assert_eq!(fetch().await, 200, "the task still lists it");
    tokio::time::advance(Duration::from_millis(501)).await;
    c.get(&format!("{LEGACY}/{id}"))
        .await
        .assert_error(404, 1203);
    assert_eq!(fetch().await, 404, "gone with its task");
}

/// Counted finished when it goes, even when its account never came back to see it end: the
/// forgetting is done by another account's request.
#[tokio::test(start_paused = true)]
async fn a_task_forgotten_unseen_is_counted_finished_and_frees_its_slot() {
    let c = Caller::new(quiet().failure_rate(1.0).credits(10.0));
    c.post(LEGACY, json!({"prompt": "x"})).await.data();
    assert_eq!(c.mock.remaining_credits("test-key"), Some(9.0));
    advance(100 + RETENTION).await;
    c.with_key("other").get(LEGACY).await.data();
    let stats = c.mock.stats();
    assert_eq!((stats.tasks_created, stats.tasks_finished), (1, 1));
    assert_eq!(stats.in_use.get("video").copied().unwrap_or(0), 0);
    // The failure was refunded, as an ended failure always is.
    assert_eq!(c.mock.remaining_credits("test-key"), Some(10.0));
}

#[tokio::test(start_paused = true)]
async fn lists_page_on_across_forgotten_tasks() {
    // One task a day for 40 days: the first ten are forgotten while the lists are read.
    let c = Caller::new(quiet().slots(100));
    let mut legacy = Vec::new();
    let mut new = Vec::new();
    for day in 0..40 {
        let r = c
            .post(
                LEGACY,
                json!({"prompt": "x", "external_task_id": format!("l{day}")}),
            )
            .await;
        legacy.push(r.data()["task_id"].as_str().unwrap().to_owned());
        let r = c
            .post(
                NEW,
                json!({"prompt": "x", "external_id": format!("n{day}")}),
            )
            .await;
        new.push(r.data()["id"].as_str().unwrap().to_owned());
        advance(DAY).await;
    }
    // Day 40: days 0 to 9 ended 30 days ago or more and are gone, day 10 ended 100 s later.
    // Read the first page of the new list now, the rest two days on.
    let first = c.post("/tasks", json!({"limit": 7})).await;
    let first = first.data().clone();
    let mut seen: Vec<String> = first["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    advance(2 * DAY).await;
    // Day 42: days 0 to 11 are gone; the cursor still leads on from where the page ended.
    let mut cursor = first["next_cursor"].clone();
    while !cursor.is_null() {
        let page = c
            .post("/tasks", json!({"cursor": cursor, "limit": 7}))
            .await;
        let page = page.data().clone();
        seen.extend(
            page["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["id"].as_str().unwrap().to_owned()),
        );
        cursor = page["next_cursor"].clone();
    }
    let kept: Vec<String> = new[12..].iter().rev().cloned().collect();
    assert_eq!(
        seen, kept,
        "each kept task once, newest first, none forgotten"
    );
    assert_eq!(list_all(&c, 500).await, kept);

    // Legacy pages: newest first, 28 tasks left, pages of 10.
    let mut pages = Vec::new();
    for page in 1..=4 {
        let r = c.get(&format!("{LEGACY}?pageNum={page}&pageSize=10")).await;
        pages.extend(
            r.data()
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["task_id"].as_str().unwrap().to_owned()),
        );
    }
    let kept: Vec<String> = legacy[12..].iter().rev().cloned().collect();
    assert_eq!(pages, kept);

    // External ids: the forgotten ones are unknown, the kept ones still name their tasks.
    c.get(&format!("{LEGACY}/l11"))
        .await
        .assert_error(404, 1203);
    c.get("/tasks?external_task_ids=n11")
        .await
        .assert_error(404, 1203);
    let r = c.get(&format!("{LEGACY}/l12")).await;
    assert_eq!(r.data()["task_id"], legacy[12].as_str());
    let r = c.get("/tasks?external_task_ids=n11,n12,n39").await;
    let found: Vec<&str> = r
        .data()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(found, [new[12].as_str(), new[39].as_str()]);
    assert_eq!(c.mock.stats().tasks_created, 80);
}

/// A task is found by its id exactly as given out (the id is its number in decimal): a sign,
/// a leading zero or surrounding digits name no task.
#[tokio::test(start_paused = true)]
async fn a_task_answers_only_to_its_exact_id() {
    let c = Caller::new(quiet());
    let legacy = c.post(LEGACY, json!({"prompt": "x"})).await;
    let legacy_id = legacy.data()["task_id"].as_str().unwrap().to_owned();
    let new = c.post(NEW, json!({"prompt": "x"})).await;
    let new_id = new.data()["id"].as_str().unwrap().to_owned();
    c.get(&format!("{LEGACY}/{legacy_id}")).await.data();
    c.get(&format!("/tasks?task_ids={new_id}")).await.data();
    for bad in [
        format!("%2B{legacy_id}"),
        format!("0{legacy_id}"),
        format!("{legacy_id}0"),
        "1".to_owned(),
        "18446744073709551616".to_owned(),
    ] {
        c.get(&format!("{LEGACY}/{bad}"))
            .await
            .assert_error(404, 1203);
    }
    for bad in [format!("%2B{new_id}"), format!("00{new_id}")] {
        c.get(&format!("/tasks?task_ids={bad}"))
            .await
            .assert_error(404, 1203);
    }
}
