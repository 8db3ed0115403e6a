//! The legacy generation end to end: `task_id`, `task_status`, `succeed`, `task_result`,
//! `final_unit_deduction`, queries by id and external id, lists.

use kling_mock::{MockConfig, Preset};
use serde_json::json;

use crate::support::{Caller, advance, encode, quiet, secs};

const T2V: &str = "/v1/videos/text2video";

#[tokio::test(start_paused = true)]
async fn a_legacy_video_goes_submitted_processing_succeed_with_result_and_cost() {
    let c = Caller::new(quiet());
    let created = c
        .post(T2V, json!({"prompt": "a cat", "duration": "10"}))
        .await;
    let data = created.data();
    let id = data["task_id"].as_str().unwrap().to_owned();
    assert_eq!(data["task_status"], "submitted");
    assert!(
        data["created_at"].as_u64().unwrap() > 1_600_000_000_000,
        "milliseconds"
    );
    assert!(data.get("task_result").is_none());
    assert!(data.get("final_unit_deduction").is_none());

    advance(5).await;
    assert_eq!(
        c.get(&format!("{T2V}/{id}")).await.data()["task_status"],
        "submitted"
    );
    advance(6).await; // 11 s: past 10% of 100 s
    let q = c.get(&format!("{T2V}/{id}")).await;
    assert_eq!(q.data()["task_status"], "processing");
    assert!(q.data()["updated_at"].as_u64() > q.data()["created_at"].as_u64());

    advance(90).await;
    let q = c.get(&format!("{T2V}/{id}")).await;
    let d = q.data();
    assert_eq!(d["task_status"], "succeed");
    assert_eq!(d["final_unit_deduction"], "1");
    let video = &d["task_result"]["videos"][0];
    assert!(video["id"].is_string());
    assert!(video["url"].as_str().unwrap().starts_with("https://"));
    assert_eq!(video["duration"], "10");
    assert!(d.get("task_status_msg").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_failed_legacy_task_reports_its_reason_and_frees_its_slot() {
    let c = Caller::new(quiet().failure_rate(1.0).slots(1));
    let id = c.post(T2V, json!({"prompt": "x"})).await.data()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1303);
    advance(100).await;
    let q = c.get(&format!("{T2V}/{id}")).await;
    let d = q.data();
    assert_eq!(d["task_status"], "failed");
    assert!(d["task_status_msg"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(d.get("task_result").is_none());
    assert_eq!(d["final_unit_deduction"], "0", "failures are not billed");
    c.post(T2V, json!({"prompt": "x"})).await.data();
}

#[tokio::test(start_paused = true)]
async fn legacy_images_return_n_images_with_index() {
    let c = Caller::new(quiet());
    let path = "/v1/images/generations";
    let id = c.post(path, json!({"prompt": "x", "n": 3})).await.data()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    advance(100).await;
    let q = c.get(&format!("{path}/{id}")).await;
    let images = q.data()["task_result"]["images"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(images.len(), 3);
    assert_eq!(images[2]["index"], 2);
    assert_eq!(q.data()["final_unit_deduction"], "3");
}

#[tokio::test(start_paused = true)]
async fn a_task_is_queryable_by_its_external_task_id_echoed_in_task_info() {
    let c = Caller::new(quiet());
    let created = c
        .post(T2V, json!({"prompt": "x", "external_task_id": "job-1"}))
        .await;
    let id = created.data()["task_id"].as_str().unwrap().to_owned();
    assert_eq!(created.data()["task_info"]["external_task_id"], "job-1");
    let q = c.get(&format!("{T2V}/job-1")).await;
    assert_eq!(q.data()["task_id"], id.as_str());
    // Another endpoint does not know it; another account does not either.
    c.get("/v1/videos/image2video/job-1")
        .await
        .assert_error(404, 1203);
    c.with_key("other")
        .get(&format!("{T2V}/job-1"))
        .await
        .assert_error(404, 1203);
}

#[tokio::test(start_paused = true)]
async fn a_legacy_query_finds_every_external_task_id_a_create_accepts() {
    let c = Caller::new(quiet().slots(100));
    let long = "j".repeat(129);
    let longest = "\u{e9}".repeat(2048); // 4096 bytes: the create's own limit
    let cases = [
        // Over 128 bytes, sent as it is.
        (long.clone(), long.clone()),
        // ':' and '@' are path characters; RFC 3986 needs no escape for them.
        ("user:42@host".to_owned(), "user:42@host".to_owned()),
        // Sub-delims are path characters too, and '+' in a path is a plus, not a space.
        ("a!$&'()*+,;=b".to_owned(), "a!$&'()*+,;=b".to_owned()),
        // Anything else, percent-encoded (a space, '/', '?', '#', '%', non-ASCII).
        ("job 1/\u{e9}?#%".to_owned(), encode("job 1/\u{e9}?#%")),
        (longest.clone(), encode(&longest)),
    ];
    for (ext, segment) in &cases {
        let created = c
            .post(T2V, json!({"prompt": "x", "external_task_id": ext}))
            .await;
        let id = created.data()["task_id"].as_str().unwrap().to_owned();
        let q = c.get(&format!("{T2V}/{segment}")).await;
        assert_eq!(q.data()["task_id"], id.as_str(), "external id {ext:?}");
        assert_eq!(q.data()["task_info"]["external_task_id"], ext.as_str());
    }
    // A legal id that no task has is 1203 (not found), never 1202 (wrong path): a client that
    // looks an id up before creating again must be told it is free.
    for segment in [
        "k".repeat(129),
        "nobody@example".to_owned(),
        "a+b".to_owned(),
        encode(&"\u{e8}".repeat(2048)),
    ] {
        c.get(&format!("{T2V}/{segment}"))
            .await
            .assert_error(404, 1203);
    }
}

#[tokio::test(start_paused = true)]
async fn a_legacy_query_segment_no_path_may_hold_is_404_1202() {
    let c = Caller::new(quiet());
    c.post(T2V, json!({"prompt": "x", "external_task_id": "\u{fffd}"}))
        .await
        .data();
    let too_long = encode(&format!("{}x", "\u{e9}".repeat(2048))); // 4097 bytes decoded
    for segment in [
        "%",
        "%4",
        "%zz",
        "%+f",
        "a{b}",
        "a|b",
        "a\"b",
        "\u{e9}",
        too_long.as_str(),
    ] {
        c.get(&format!("{T2V}/{segment}"))
            .await
            .assert_error(404, 1202);
    }
    // Well-formed escapes that decode to bytes no id can hold (not UTF-8) match nothing; they are
    // never read as U+FFFD.
    c.get(&format!("{T2V}/%ff")).await.assert_error(404, 1203);
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_external_task_id_is_400_1201_and_counted() {
    let c = Caller::new(quiet());
    c.post(T2V, json!({"prompt": "x", "external_task_id": "job-1"}))
        .await
        .data();
    c.post(T2V, json!({"prompt": "x", "external_task_id": "job-1"}))
        .await
        .assert_error(400, 1201);
    // Even after the first task ended: external ids are unique where they are looked up, for
    // good.
    advance(200).await;
    c.post(T2V, json!({"prompt": "x", "external_task_id": "job-1"}))
        .await
        .assert_error(400, 1201);
    let stats = c.mock.stats();
    assert_eq!(stats.duplicate_external_ids, 2);
    assert_eq!(stats.tasks_created, 1);
    // Another create path is another place to look it up: the id is free there, and each task
    // is found on its own path (a 1201 there would name a task no lookup could find).
    c.post(
        "/v1/videos/image2video",
        json!({"image": "i", "external_task_id": "job-1"}),
    )
    .await
    .data();
    c.get("/v1/videos/image2video/job-1").await.data();
    c.get(&format!("{T2V}/job-1")).await.data();
    // Another account may use the same id.
    c.with_key("other")
        .post(T2V, json!({"prompt": "x", "external_task_id": "job-1"}))
        .await
        .data();
}

#[tokio::test(start_paused = true)]
async fn the_legacy_list_pages_newest_first() {
    let c = Caller::new(quiet().slots(10));
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = c.post(T2V, json!({"prompt": format!("p{i}")})).await;
        ids.push(r.data()["task_id"].as_str().unwrap().to_owned());
    }
    c.post("/v1/videos/image2video", json!({"image": "x"}))
        .await
        .data();
    let page1 = c.get(&format!("{T2V}?pageNum=1&pageSize=2")).await;
    let page1 = page1.data().as_array().unwrap().clone();
    assert_eq!(page1.len(), 2);
    assert_eq!(page1[0]["task_id"], ids[4].as_str());
    assert_eq!(page1[1]["task_id"], ids[3].as_str());
    let page3 = c.get(&format!("{T2V}?pageNum=3&pageSize=2")).await;
    let page3 = page3.data().as_array().unwrap().clone();
    assert_eq!(page3.len(), 1);
    assert_eq!(page3[0]["task_id"], ids[0].as_str());
    let all = c.get(T2V).await;
    assert_eq!(
        all.data().as_array().unwrap().len(),
        5,
        "default page of 30, this endpoint only"
    );
}

#[tokio::test(start_paused = true)]
async fn try_on_uses_its_own_pool() {
    let c = Caller::new(quiet().slots(1));
    let path = "/v1/images/kolors-virtual-try-on";
    c.post(path, json!({"human_image": "h", "cloth_image": "c"}))
        .await
        .data();
    c.post(T2V, json!({"prompt": "x"})).await.data();
    c.post("/v1/images/generations", json!({"prompt": "x"}))
        .await
        .data();
    c.post(path, json!({"human_image": "h", "cloth_image": "c"}))
        .await
        .assert_error(429, 1303);
    let stats = c.mock.stats();
    assert_eq!(stats.in_use["try-on"], 1);
    assert_eq!(stats.in_use["video"], 1);
    assert_eq!(stats.in_use["image"], 1);
}

#[tokio::test(start_paused = true)]
async fn account_costs_report_remaining_credits() {
    let c = Caller::new(quiet().credits(10.0));
    c.post("/v1/images/generations", json!({"prompt": "x", "n": 4}))
        .await
        .data();
    let r = c.get("/account/costs").await;
    let pack = &r.data()["resource_pack_subscribe_infos"][0];
    assert_eq!(pack["total_quantity"], 10.0);
    assert_eq!(pack["remaining_quantity"], 6.0);
    assert_eq!(pack["status"], "online");
    assert_eq!(c.mock.remaining_credits("test-key"), Some(6.0));
    // A create the rest cannot pay for is answered 1102, and every create after it: the pack
    // says it has run out, though 6 are left.
    c.post("/v1/images/generations", json!({"prompt": "x", "n": 9}))
        .await
        .assert_error(429, 1102);
    tokio::time::advance(std::time::Duration::from_secs(1)).await;
    let r = c.get("/account/costs").await;
    let pack = &r.data()["resource_pack_subscribe_infos"][0];
    assert_eq!(pack["remaining_quantity"], 6.0);
    // Kling's spelling of the state (`toBeOnline`, `online`, `expired`, `runOut`).
    assert_eq!(pack["status"], "runOut");
}

#[tokio::test(start_paused = true)]
async fn endpoints_in_a_group_make_tasks_in_their_products_pool() {
    let c = Caller::new(quiet().slots(1));
    for (path, body) in [
        ("/v1/images/editing/expand", json!({"image": "x", "n": 1})),
        (
            "/v1/videos/avatar/image2video",
            json!({"image": "x", "sound_file": "y"}),
        ),
    ] {
        let id = c.post(path, body.clone()).await.data()["task_id"]
            .as_str()
            .unwrap()
            .to_owned();
        // One slot: the task holds it.
        c.post(path, body).await.assert_error(429, 1303);
        assert!(c.get(path).await.data().as_array().is_some(), "a list");
        advance(100).await;
        let q = c.get(&format!("{path}/{id}")).await;
        assert_eq!(q.data()["task_status"], "succeed", "{path}");
    }
    c.post("/v1/images/editing/other", json!({"image": "x"}))
        .await
        .assert_error(404, 1202);
    c.post("/v1/videos/avatar", json!({"image": "x"}))
        .await
        .assert_error(404, 1202);
}

#[tokio::test(start_paused = true)]
async fn endpoints_that_answer_at_once_make_no_task_and_take_no_slot() {
    let c = Caller::new(quiet().slots(1));
    for _ in 0..3 {
        let faces = c
            .post(
                "/v1/videos/identify-face",
                json!({"video_url": "https://v"}),
            )
            .await;
        assert!(faces.data()["session_id"].is_string());
        assert!(faces.data().get("task_id").is_none());
        let seen = c
            .post("/v1/videos/image-recognize", json!({"image": "x"}))
            .await;
        assert!(seen.data()["task_result"]["images"].is_array());
        assert!(seen.data().get("task_id").is_none());
    }
    // The video pool's one slot is still free.
    c.post(T2V, json!({"prompt": "x"})).await.data();
    c.post("/v1/videos/identify-face", json!({}))
        .await
        .assert_error(400, 1201);
    c.post("/v1/videos/image-recognize", json!({"prompt": "x"}))
        .await
        .assert_error(400, 1201);
    c.get("/v1/videos/identify-face/x")
        .await
        .assert_error(404, 1202);
}

/// A pack's purchase and validity times are the pack's own, the same at every query, and the
/// query falls inside them. They were the query's own time (and 30 days on), so every query
/// showed a pack bought that instant, and one valid for 30 days before a daily period began.
#[tokio::test(start_paused = true)]
async fn account_costs_report_fixed_pack_times() {
    let pack = |r: &crate::support::Reply| r.data()["resource_pack_subscribe_infos"][0].clone();
    let date_ms = |r: &crate::support::Reply| {
        let date = httpdate::parse_http_date(r.headers["date"].to_str().unwrap()).unwrap();
        date.duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    for config in [quiet().credits(10.0), quiet()] {
        let c = Caller::new(config);
        let first = c.get("/account/costs").await;
        tokio::time::advance(std::time::Duration::from_secs(3600)).await;
        let later = c.get("/account/costs").await;
        for field in ["purchase_time", "effective_time", "invalid_time"] {
            assert_eq!(pack(&first)[field], pack(&later)[field], "{field}");
        }
        let (from, to) = (
            pack(&later)["effective_time"].as_u64().unwrap(),
            pack(&later)["invalid_time"].as_u64().unwrap(),
        );
        assert!(
            from <= date_ms(&later) && date_ms(&later) < to,
            "{}",
            later.body
        );
    }
    // The Free tier's pack lasts a day, before its first create as after.
    let c = Caller::new(MockConfig::preset(Preset::Free).no_rate_limit());
    for _ in 0..2 {
        let p = pack(&c.get("/account/costs").await);
        let valid_ms = p["invalid_time"].as_u64().unwrap() - p["effective_time"].as_u64().unwrap();
        assert_eq!(valid_ms, 24 * 3600 * 1000, "{p}");
        if c.mock.remaining_credits("test-key") == Some(66.0) {
            c.post("/v1/videos/text2video", json!({"prompt": "x"}))
                .await
                .data();
        }
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
    }
}

/// `start_time` and `end_time` (Unix milliseconds) select the packs bought in that window,
/// `resource_pack_name` the pack of that name; values that are not milliseconds, or a window
/// that ends before it starts, are 400 code 1201. Both were ignored: every query listed the
/// pack, so a client whose window missed its packs' purchase was never shown an empty list.
#[tokio::test(start_paused = true)]
async fn account_costs_list_the_packs_bought_in_the_window_and_of_the_name_asked() {
    let packs = |r: &crate::support::Reply| {
        r.data()["resource_pack_subscribe_infos"]
            .as_array()
            .unwrap()
            .clone()
    };
    let c = Caller::new(quiet().credits(10.0).no_costs_limit());
    let all = c.get("/account/costs").await;
    let pack = packs(&all)[0].clone();
    let bought = pack["purchase_time"].as_u64().unwrap();
    let name = pack["resource_pack_name"].as_str().unwrap().to_owned();
    advance(3600).await;
    let count = |start: u64, end: u64, name: &str| {
        let c = c.clone();
        let name = encode(name);
        async move {
            let path = format!(
                "/account/costs?start_time={start}&end_time={end}&resource_pack_name={name}"
            );
            packs(&c.get(&path).await).len()
        }
    };
    assert_eq!(count(bought, bought, &name).await, 1);
    assert_eq!(count(bought - 1000, bought + 1000, &name).await, 1);
    // Bought before the window: not listed, though the pack is still valid.
    assert_eq!(count(bought + 1, bought + 7_200_000, &name).await, 0);
    assert_eq!(count(0, bought - 1, &name).await, 0);
    assert_eq!(count(0, bought, "another pack").await, 0);
    assert_eq!(count(0, bought, "").await, 1, "an empty name is no name");
    let open_ended = c.get(&format!("/account/costs?start_time={bought}")).await;
    assert_eq!(
        packs(&open_ended),
        vec![packs(&c.get("/account/costs").await)[0].clone()]
    );
    for bad in [
        "/account/costs?start_time=yesterday&end_time=1".to_owned(),
        "/account/costs?start_time=-1".to_owned(),
        format!("/account/costs?start_time={}&end_time={bought}", bought + 1),
    ] {
        c.get(&bad).await.assert_error(400, 1201);
    }

    // A Free account's daily pack, before its first create as after, is listed for a window
    // that ends before the query (a client's `now`, read before it sends).
    let free = Caller::new(MockConfig::preset(Preset::Free).no_rate_limit());
    // The moment of the first query, as the pack valid from then says.
    let first = free.get("/account/costs").await;
    let end = packs(&first)[0]["effective_time"].as_u64().unwrap();
    tokio::time::advance(std::time::Duration::from_millis(1500)).await;
    let path = format!("/account/costs?start_time=0&end_time={end}");
    assert_eq!(packs(&free.get(&path).await).len(), 1);
    free.post("/v1/videos/text2video", json!({"prompt": "x"}))
        .await
        .data();
    tokio::time::advance(std::time::Duration::from_millis(1500)).await;
    let listed = packs(&free.get(&path).await);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["remaining_quantity"], 65.0);
}

/// A result file is served once its task has succeeded, for the files the task made, until
/// 30 days (API time) after the task ended, as Kling's output URLs expire; any other name is
/// 404. Every name was served for ever, so a client that kept URLs to download them later, or
/// fetched one before its task succeeded, passed against the mock.
#[tokio::test(start_paused = true)]
async fn result_files_are_served_from_success_until_they_expire_after_30_days() {
    use http_body_util::{BodyExt as _, Full};
    use tower_service::Service as _;

    let c = Caller::new(quiet().failure_rate(0.0).speed(10.0));
    let fetch = |name: String| {
        let mut mock = c.mock.clone();
        async move {
            let req = http::Request::get(format!("/__mock/files/{name}"))
                .body(Full::new(bytes::Bytes::new()))
                .unwrap();
            let resp = mock.call(req).await.unwrap();
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        }
    };
    let id = c
        .post("/v1/images/generations", json!({"prompt": "x", "n": 2}))
        .await
        .data()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(fetch(format!("{id}/0.png")).await.0, 404, "not made yet");
    advance(10).await; // 100 s of API time at speed 10: the task has succeeded.
    let url = c.get(&format!("/v1/images/generations/{id}")).await.data()["task_result"]["images"]
        [1]["url"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(url.ends_with(&format!("/{id}/1.png")), "{url}");
    for name in [format!("{id}/0.png"), format!("{id}/1.png")] {
        let (status, body) = fetch(name.clone()).await;
        assert_eq!(status, 200, "{name}");
        assert_eq!(body, kling_mock::file_bytes(&name));
    }
    for name in [
        format!("{id}/2.png"),
        format!("{id}/1.mp4"),
        format!("{id}/01.png"),
        id.clone(),
        "860000000000000999/0.png".to_owned(),
    ] {
        assert_eq!(fetch(name.clone()).await.0, 404, "{name}");
    }
    // 30 days of API time after the task ended (3 days of the mock's at speed 10).
    tokio::time::advance(secs(3 * 24 * 3600) - secs(1)).await;
    assert_eq!(fetch(format!("{id}/0.png")).await.0, 200, "a second before");
    advance(1).await;
    assert_eq!(fetch(format!("{id}/0.png")).await.0, 404, "expired");

    // A failed task made no file.
    let failing = Caller::new(quiet().failure_rate(1.0));
    let id = failing.post(T2V, json!({"prompt": "x"})).await.data()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    advance(100).await;
    let req = http::Request::get(format!("/__mock/files/{id}/0.mp4"))
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(failing.mock.clone().call(req).await.unwrap().status(), 404);
}
