//! Every row of the error-code table: HTTP status, code, and no `data`.

use bytes::Bytes;
use http::Method;
use kling_mock::{MockConfig, Preset, Switches};
use serde_json::json;

use crate::support::{Caller, advance, quiet};

const T2V: &str = "/v1/videos/text2video";

#[tokio::test(start_paused = true)]
async fn missing_authorization_header_is_401_1001() {
    let c = Caller::new(quiet()).without_auth();
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(401, 1001);
    c.get("/tasks?task_ids=1").await.assert_error(401, 1001);
}

/// KLING_API.md: 1001 is "header empty". A bearer scheme without a token authorizes nothing.
#[tokio::test(start_paused = true)]
async fn an_empty_bearer_token_is_401_1001() {
    let mut c = Caller::new(quiet());
    for auth in ["Bearer ", "Bearer", "bearer \t ", "BEARER"] {
        c.auth = Some(auth.into());
        let r = c.post(T2V, json!({"prompt": "x"})).await;
        r.assert_error(401, 1001);
    }
    c.without_auth()
        .post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(401, 1001);
    c.auth = Some("Basic".into());
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(401, 1000);
    assert_eq!(c.mock.stats().tasks_created, 0);
}

#[tokio::test(start_paused = true)]
async fn non_bearer_scheme_is_401_1000() {
    let mut c = Caller::new(quiet());
    c.auth = Some("Basic dXNlcjpwYXNz".into());
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(401, 1000);
}

#[tokio::test(start_paused = true)]
async fn unknown_api_key_is_401_1002() {
    let c = Caller::new(quiet().api_key("good"));
    c.with_key("bad")
        .post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(401, 1002);
    c.with_key("good")
        .post(T2V, json!({"prompt": "x"}))
        .await
        .data();
}

#[tokio::test(start_paused = true)]
async fn account_switches_refuse_every_request_with_429() {
    for (switches, code) in [
        (Switches::new().abnormal(true), 1100),
        (Switches::new().arrears(true), 1101),
        (Switches::new().ip_denied(true), 1304),
    ] {
        let c = Caller::new(quiet().switches(switches));
        c.post(T2V, json!({"prompt": "x"}))
            .await
            .assert_error(429, code);
        c.get(&format!("{T2V}/123")).await.assert_error(429, code);
        c.get("/account/costs").await.assert_error(429, code);
    }
}

/// The throttled switch answers 1302 to every request, however slow, with a `Retry-After`
/// of one rate interval when the mode asks for one, and leaves the rate limit as it was: the
/// first request after it is switched off goes through at once.
#[tokio::test(start_paused = true)]
async fn the_throttled_switch_refuses_every_request_with_1302() {
    let c = Caller::new(
        quiet()
            .rate_per_minute(60.0)
            .retry_after(kling_mock::RetryAfterMode::Seconds),
    );
    c.post(T2V, json!({"prompt": "x"})).await.data();
    c.mock.set_switches(Switches::new().throttled(true));
    for _ in 0..3 {
        advance(10).await;
        let r = c.get("/account/costs").await;
        r.assert_error(429, 1302);
        assert_eq!(r.headers["retry-after"], "1");
    }
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1302);
    // Per account, and through the control endpoint.
    c.mock.set_switches(Switches::new());
    c.post(T2V, json!({"prompt": "x"})).await.data();
    c.without_auth()
        .post(
            "/__mock/switches",
            json!({"account": "test-key", "throttled": true}),
        )
        .await;
    assert!(c.mock.account_switches("test-key").throttled);
    advance(10).await;
    c.get(&format!("{T2V}?pageSize=1"))
        .await
        .assert_error(429, 1302);
    c.mock.set_account_switches("test-key", Switches::new());
    c.get(&format!("{T2V}?pageSize=1")).await.data();
    let stats = c.mock.stats();
    assert_eq!(stats.responses_by_code["1302"], 5);
}

#[tokio::test(start_paused = true)]
async fn switches_can_be_flipped_at_runtime() {
    let c = Caller::new(quiet());
    c.post(T2V, json!({"prompt": "x"})).await.data();
    c.mock.set_switches(Switches::new().arrears(true));
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1101);
    c.mock.set_switches(Switches::new());
    c.post(T2V, json!({"prompt": "x"})).await.data();
}

/// Kling's account states are each account's own: one account in arrears leaves another's
/// requests alone, set in process or through `POST /__mock/switches` with an `account`.
#[tokio::test(start_paused = true)]
async fn an_accounts_own_switches_refuse_only_that_account() {
    let a = Caller::new(quiet());
    let b = a.with_key("other-key");
    a.mock
        .set_account_switches("test-key", Switches::new().arrears(true));
    a.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1101);
    a.get("/account/costs").await.assert_error(429, 1101);
    b.post(T2V, json!({"prompt": "x"})).await.data();
    assert_eq!(
        a.mock.switches(),
        Switches::new(),
        "mock-wide ones untouched"
    );
    assert!(a.mock.account_switches("test-key").arrears);

    // The control endpoint: with an account, that account's; without, every account's.
    let r = a
        .without_auth()
        .post(
            "/__mock/switches",
            json!({"account": "other-key", "ip_denied": true}),
        )
        .await;
    assert_eq!(r.body["account"], "other-key");
    b.get("/account/costs").await.assert_error(429, 1304);
    a.mock.set_account_switches("test-key", Switches::new());
    a.get(&format!("{T2V}?pageSize=1")).await.data();
    a.without_auth()
        .post("/__mock/switches", json!({"abnormal": true}))
        .await;
    a.get(&format!("{T2V}?pageSize=1"))
        .await
        .assert_error(429, 1100);
    // Mock-wide abnormal comes first, whatever the account's own say.
    b.get(&format!("{T2V}?pageSize=1"))
        .await
        .assert_error(429, 1100);
}

/// `POST /__mock/switches` with an `account` holds no more accounts than requests could: all
/// off for an account the mock does not hold makes none; in open mode a new one counts
/// against `max_open_accounts` (and is refused when none is idle); in keyed mode a name no
/// configured key is of is refused. It added an account per name, for good.
#[tokio::test(start_paused = true)]
async fn a_switches_request_makes_no_account_past_what_requests_could() {
    let c = Caller::new(quiet().max_open_accounts(2));
    let control = c.without_auth();
    let set = |account: String, on: bool| {
        let control = control.clone();
        async move {
            control
                .post(
                    "/__mock/switches",
                    json!({"account": account, "arrears": on}),
                )
                .await
        }
    };
    // A running task keeps the caller's account busy: one place left.
    c.post(T2V, json!({"prompt": "x"})).await.data();
    for n in 0..50 {
        let r = set(format!("ghost-{n}"), false).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    assert_eq!(set("held".to_owned(), true).await.status, 200);
    assert!(c.mock.account_switches("held").arrears);
    let r = set("one-too-many".to_owned(), true).await;
    assert_eq!((r.status.as_u16(), r.code()), (503, 5001), "{:?}", r.body);
    assert_eq!(c.mock.account_switches("one-too-many"), Switches::new());
    // Requests see the same bound: a new bearer finds no place either.
    c.with_key("fresh")
        .get("/account/costs")
        .await
        .assert_error(503, 5001);
    // An account the mock holds is switched as before, off included.
    assert_eq!(set("held".to_owned(), false).await.status, 200);
    c.with_key("held").get("/account/costs").await.data();

    let keyed = Caller::new(quiet().api_key_for("test-key", "team"));
    let r = keyed
        .without_auth()
        .post(
            "/__mock/switches",
            json!({"account": "nobody", "abnormal": true}),
        )
        .await;
    assert_eq!((r.status.as_u16(), r.code()), (400, 1201), "{:?}", r.body);
    assert_eq!(keyed.mock.account_switches("nobody"), Switches::new());
    let r = keyed
        .without_auth()
        .post(
            "/__mock/switches",
            json!({"account": "team", "abnormal": true}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    keyed.get("/account/costs").await.assert_error(429, 1100);
}

/// A `POST /__mock/switches` the mock cannot read (not a JSON object, a switch that is not a
/// boolean, a name it does not know, an `account` that is not a string) is refused with 400,
/// naming what was wrong, and changes nothing: it turned every switch of every account off
/// without a word, so a test that misspelt `arrears`, or sent `"true"`, ran on a healthy
/// account.
#[tokio::test(start_paused = true)]
async fn a_switches_request_the_mock_cannot_read_is_refused_and_changes_nothing() {
    let c = Caller::new(quiet());
    c.mock.set_switches(Switches::new().arrears(true));
    let control = c.without_auth();
    for (body, named) in [
        (Bytes::from_static(b"garbage"), "JSON object"),
        (Bytes::from_static(b"[true]"), "JSON object"),
        (
            Bytes::from(json!({"arrears": "true"}).to_string()),
            "arrears",
        ),
        (Bytes::from(json!({"arrear": true}).to_string()), "arrear"),
        (
            Bytes::from(json!({"account": 7, "abnormal": true}).to_string()),
            "account",
        ),
    ] {
        let r = control
            .raw(Method::POST, "/__mock/switches", body.clone())
            .await;
        assert_eq!(r.status, 400, "{body:?}: {:?}", r.body);
        let message = r.body["message"].as_str().unwrap_or_default();
        assert!(message.contains(named), "{body:?}: {message}");
        assert_eq!(c.mock.switches(), Switches::new().arrears(true), "{body:?}");
    }
    // An empty object turns every switch off, as it did.
    let r = control.post("/__mock/switches", json!({})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(c.mock.switches(), Switches::new());
}

#[tokio::test(start_paused = true)]
async fn exhausted_credits_are_429_1102() {
    let c = Caller::new(quiet().credits(1.0));
    c.post(T2V, json!({"prompt": "x"})).await.data();
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1102);
}

/// The README's check order: a duplicate id is refused before the credits left are counted, and
/// an 1102 once sent comes before it.
#[tokio::test(start_paused = true)]
async fn a_duplicate_id_is_1201_before_the_credits_left_are_counted() {
    let c = Caller::new(quiet().credits(1.0));
    let dup = json!({"prompt": "x", "external_task_id": "job-1"});
    c.post(T2V, dup.clone()).await.data();
    // Nothing left to pay with, but the id is checked first.
    c.post(T2V, dup.clone()).await.assert_error(400, 1201);
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1102);
    // Once an 1102 has gone out, it answers before the id is looked at.
    c.post(T2V, dup).await.assert_error(429, 1102);
    assert_eq!(c.mock.stats().duplicate_external_ids, 1);
}

#[tokio::test(start_paused = true)]
async fn forbidden_model_is_403_1103_in_both_generations() {
    let c = Caller::new(
        quiet()
            .forbid_model("kling-v2-master")
            .forbid_model("kling-3.0"),
    );
    c.post(T2V, json!({"prompt": "x", "model_name": "kling-v2-master"}))
        .await
        .assert_error(403, 1103);
    c.post("/text-to-video/kling-3.0", json!({"prompt": "x"}))
        .await
        .assert_error(403, 1103);
    c.post("/text-to-video/kling-2.6", json!({"prompt": "x"}))
        .await
        .data();
}

#[tokio::test(start_paused = true)]
async fn body_that_is_not_json_is_400_1200() {
    let c = Caller::new(quiet());
    c.raw(Method::POST, T2V, Bytes::from_static(b"{nope"))
        .await
        .assert_error(400, 1200);
    c.raw(Method::POST, "/text-to-video/kling-3.0", Bytes::new())
        .await
        .assert_error(400, 1200);
    c.raw(Method::POST, "/tasks", Bytes::from_static(b"["))
        .await
        .assert_error(400, 1200);
}

#[tokio::test(start_paused = true)]
async fn oversized_body_is_400_1200() {
    let c = Caller::new(quiet().max_body_bytes(64));
    let big = json!({"prompt": "x".repeat(100)});
    c.post(T2V, big).await.assert_error(400, 1200);
}

#[tokio::test(start_paused = true)]
async fn invalid_parameters_are_400_1201() {
    let c = Caller::new(quiet());
    c.post(T2V, json!({})).await.assert_error(400, 1201);
    c.post(T2V, json!({"prompt": ""}))
        .await
        .assert_error(400, 1201);
    c.post(T2V, json!({"prompt": 7}))
        .await
        .assert_error(400, 1201);
    c.post("/text-to-image/kolors-v2", json!({}))
        .await
        .assert_error(400, 1201);
    for n in [
        json!(0),
        json!(10),
        json!(-1),
        json!(2.5),
        json!("3"),
        json!(1e300),
    ] {
        c.post("/v1/images/generations", json!({"prompt": "x", "n": n}))
            .await
            .assert_error(400, 1201);
    }
    c.post(
        "/v1/images/kolors-virtual-try-on",
        json!({"human_image": "h"}),
    )
    .await
    .assert_error(400, 1201);
    c.get(&format!("{T2V}?pageNum=1&pageSize=501"))
        .await
        .assert_error(400, 1201);
    c.get(&format!("{T2V}?pageNum=0"))
        .await
        .assert_error(400, 1201);
    c.get(&format!("{T2V}?pageSize=99999999999999999999999"))
        .await
        .assert_error(400, 1201);
    c.get("/tasks?task_ids=a&external_task_ids=b")
        .await
        .assert_error(400, 1201);
    c.get("/tasks").await.assert_error(400, 1201);
    c.post("/tasks", json!({"limit": 501}))
        .await
        .assert_error(400, 1201);
    c.post("/tasks", json!({"status": "succeed"}))
        .await
        .assert_error(400, 1201);
}

/// Images are bounded by the body limit only: a real try-on carries megabytes of base64.
#[tokio::test(start_paused = true)]
async fn a_try_on_with_large_base64_images_is_accepted() {
    let c = Caller::new(quiet());
    let image = "QUJD".repeat(2048); // 8 KiB of base64
    let r = c
        .post(
            "/v1/images/kolors-virtual-try-on",
            json!({"human_image": image, "cloth_image": image}),
        )
        .await;
    assert_eq!(r.data()["task_status"], "submitted");
    c.post(
        "/image-to-video/kling-3.0",
        json!({"image": image, "image_tail": image}),
    )
    .await
    .data();
}

/// Prompts are bounded in characters (Kling's 2,500), not bytes: 1,400 CJK characters are
/// 4,200 bytes of UTF-8.
#[tokio::test(start_paused = true)]
async fn prompts_are_bounded_in_characters_not_bytes() {
    let c = Caller::new(quiet().slots(10));
    let cjk = "\u{732b}".repeat(1400);
    assert_eq!(cjk.len(), 4200);
    c.post(T2V, json!({"prompt": cjk})).await.data();
    c.post(T2V, json!({"prompt": "x", "negative_prompt": cjk}))
        .await
        .data();
    c.post("/text-to-video/kling-3.0", json!({"prompt": cjk}))
        .await
        .data();
    c.post(T2V, json!({"prompt": "\u{732b}".repeat(2500)}))
        .await
        .data();
    for (field, body) in [
        ("prompt", json!({"prompt": "x".repeat(2501)})),
        (
            "negative_prompt",
            json!({"prompt": "x", "negative_prompt": "x".repeat(2501)}),
        ),
    ] {
        for path in [T2V, "/text-to-video/kling-3.0", "/v1/videos/image2video"] {
            let r = c.post(path, body.clone()).await;
            r.assert_error(400, 1201);
            let message = r.body["message"].as_str().unwrap();
            assert!(message.contains(&format!(" {field} ")), "{path}: {message}");
        }
    }
    assert_eq!(c.mock.stats().tasks_created, 4);
}

/// Identifier fields keep their byte bound.
#[tokio::test(start_paused = true)]
async fn identifier_fields_are_bounded_in_bytes() {
    let c = Caller::new(quiet());
    let r = c
        .post(
            T2V,
            json!({"prompt": "x", "external_task_id": "\u{e9}".repeat(2049)}),
        )
        .await;
    assert_eq!((r.status.as_u16(), r.code()), (400, 1201), "{:?}", r.body);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("external_task_id")
    );
}

#[tokio::test(start_paused = true)]
async fn unknown_path_and_wrong_method_are_404_1202() {
    let c = Caller::new(quiet());
    c.get("/v2/nothing").await.assert_error(404, 1202);
    c.post("/v1/videos/text2audio", json!({"prompt": "x"}))
        .await
        .assert_error(404, 1202);
    c.get("/text-to-video/kling-3.0")
        .await
        .assert_error(404, 1202);
    c.raw(Method::DELETE, "/tasks", Bytes::new())
        .await
        .assert_error(404, 1202);
    c.raw(Method::PUT, T2V, Bytes::new())
        .await
        .assert_error(404, 1202);
    c.get("/").await.assert_error(404, 1202);
    c.get("/v1/videos/text2video/a/b")
        .await
        .assert_error(404, 1202);
}

/// `POST /v1/images/generation` (a typo of `generations`) is a wrong path, not a billed task;
/// every legacy path KLING_API.md lists still creates.
#[tokio::test(start_paused = true)]
async fn an_unknown_legacy_image_path_is_404_1202_and_bills_nothing() {
    let c = Caller::new(quiet().slots(20).credits(100.0));
    for path in [
        "/v1/images/generation",
        "/v1/images/text2video",
        "/v1/images/x",
    ] {
        c.post(path, json!({"prompt": "x"}))
            .await
            .assert_error(404, 1202);
        c.get(&format!("{path}/1")).await.assert_error(404, 1202);
        c.get(path).await.assert_error(404, 1202);
    }
    assert_eq!(c.mock.stats().tasks_created, 0);
    assert_eq!(c.mock.remaining_credits("test-key"), Some(100.0));
    for path in [
        "/v1/videos/text2video",
        "/v1/videos/image2video",
        "/v1/videos/multi-image2video",
        "/v1/videos/video-extend",
        "/v1/videos/lip-sync",
        "/v1/videos/effects",
        "/v1/images/generations",
        "/v1/images/multi-image2image",
        "/v1/images/omni-image",
    ] {
        let r = c.post(path, json!({"prompt": "x"})).await;
        let id = r.data()["task_id"].as_str().unwrap().to_owned();
        c.get(&format!("{path}/{id}")).await.data();
    }
    c.post(
        "/v1/images/kolors-virtual-try-on",
        json!({"human_image": "h", "cloth_image": "c"}),
    )
    .await
    .data();
}

#[tokio::test(start_paused = true)]
async fn unknown_task_is_404_1203() {
    let c = Caller::new(quiet());
    c.get(&format!("{T2V}/999")).await.assert_error(404, 1203);
    c.get("/tasks?task_ids=999").await.assert_error(404, 1203);
    c.get("/tasks?external_task_ids=nope")
        .await
        .assert_error(404, 1203);
}

#[tokio::test(start_paused = true)]
async fn policy_prompts_are_400_1300_and_1301() {
    let c = Caller::new(quiet());
    c.post(T2V, json!({"prompt": "a __policy__ b"}))
        .await
        .assert_error(400, 1300);
    c.post("/text-to-video/kling-3.0", json!({"prompt": "__unsafe__"}))
        .await
        .assert_error(400, 1301);
    assert_eq!(c.mock.stats().tasks_created, 0);
}

#[tokio::test(start_paused = true)]
async fn request_rate_over_limit_is_429_1302() {
    let c = Caller::new(quiet().rate_per_minute(60.0));
    let list = "/v1/videos/text2video?pageSize=1";
    c.get(list).await.data();
    c.get(list).await.assert_error(429, 1302);
    advance(1).await;
    c.get(list).await.data();
}

#[tokio::test(start_paused = true)]
async fn parallel_tasks_over_limit_is_429_1303() {
    let c = Caller::new(MockConfig::preset(Preset::Free).no_rate_limit());
    c.post(T2V, json!({"prompt": "x"})).await.data();
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1303);
}

#[tokio::test(start_paused = true)]
async fn injected_server_errors_are_5000_5001_5002_with_their_statuses() {
    let c = Caller::new(quiet().fault_rate(1.0).seed(7));
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let r = c.post(T2V, json!({"prompt": "x"})).await;
        let status = match r.code() {
            5000 => 500,
            5001 => 503,
            5002 => 504,
            other => panic!("unexpected code {other}"),
        };
        r.assert_error(status, r.code());
        seen.insert(r.code());
    }
    assert_eq!(seen.len(), 3, "all three server errors appear");
    assert_eq!(
        c.mock.stats().tasks_created,
        0,
        "a 5xx fault creates nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn odd_inputs_get_an_envelope_never_a_panic() {
    let c = Caller::new(quiet().slots(100));
    let long = format!("/v1/videos/text2video/{}", "a".repeat(5000));
    for path in [
        "/v1/videos/text2video/%",
        "/v1/videos/text2video/%ff%fe",
        "/tasks?task_ids=%%%,,,",
        "/tasks?external_task_ids=",
        "/v1/images/%ff",
        "/v1/images/generations?pageNum=18446744073709551615&pageSize=500",
        "/v1//videos",
        "/account/costs?x",
        long.as_str(),
    ] {
        let r = c.get(path).await;
        assert!(r.body["request_id"].is_string(), "{path}: {:?}", r.body);
    }
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    for body in [
        deep.as_str(),
        r#"{"prompt":"x","n":1e400}"#,
        r#"{"prompt":"x","duration":{"a":1}}"#,
        r#"{"prompt":"x","external_task_id":12}"#,
        r#"{"prompt":"x","callback_url":"not a url"}"#,
        r#"{"prompt":"x","duration":"18446744073709551616"}"#,
        "\u{0}\u{1}",
        "null",
    ] {
        for path in [T2V, "/text-to-image/m", "/tasks"] {
            let r = c
                .raw(Method::POST, path, Bytes::from(body.to_owned()))
                .await;
            assert!(
                r.body["request_id"].is_string(),
                "{path} {body}: {:?}",
                r.body
            );
        }
    }
}
