use std::time::Duration;

use http::HeaderMap;
use kling_core::TaskStatus;
use kling_tower::clock::TokioWallClock;
use kling_tower::error::WebhookErrorKind;
use kling_tower::webhook::{WebhookVerifier, parse_task, parse_tasks};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OTHER: &str = "whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM=";
const NOW: u64 = 1_704_067_200;
const BODY: &[u8] = br#"{"task_id":"t-1","task_status":"succeed","final_unit_deduction":"1"}"#;

fn verifier() -> WebhookVerifier {
    WebhookVerifier::new(SECRET)
        .unwrap()
        .with_clock(TokioWallClock::starting_at(Duration::from_secs(NOW)))
}

fn headers(id: &str, timestamp: u64, signature: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("webhook-id", id.parse().unwrap());
    h.insert("webhook-timestamp", timestamp.to_string().parse().unwrap());
    h.insert("webhook-signature", signature.parse().unwrap());
    h
}

#[tokio::test(start_paused = true)]
async fn accepts_the_right_signature_made_by_the_mock() {
    let v = verifier();
    let signature = kling_mock::sign_webhook(SECRET, "msg_1", NOW, BODY);
    assert_eq!(
        signature,
        WebhookVerifier::sign(SECRET, "msg_1", NOW, BODY).unwrap(),
        "same scheme as the mock"
    );
    let verified = v.verify(&headers("msg_1", NOW, &signature), BODY).unwrap();
    assert_eq!((verified.id.as_str(), verified.timestamp), ("msg_1", NOW));
    // Raw (non-whsec) secrets work the mock's way too.
    let raw = WebhookVerifier::new("plain-secret")
        .unwrap()
        .with_clock(TokioWallClock::starting_at(Duration::from_secs(NOW)));
    let signature = kling_mock::sign_webhook("plain-secret", "msg_2", NOW, BODY);
    raw.verify(&headers("msg_2", NOW, &signature), BODY)
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn rejects_a_wrong_signature_a_changed_body_and_another_key() {
    let v = verifier();
    let good = kling_mock::sign_webhook(SECRET, "msg_1", NOW, BODY);
    let wrong = [
        (
            headers(
                "msg_1",
                NOW,
                "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            ),
            BODY,
        ),
        (
            headers("msg_1", NOW, &good),
            &br#"{"task_id":"t-1","task_status":"failed"}"#[..],
        ),
        (
            headers(
                "msg_1",
                NOW,
                &kling_mock::sign_webhook(OTHER, "msg_1", NOW, BODY),
            ),
            BODY,
        ),
        (headers("msg_2", NOW, &good), BODY),
        (headers("msg_1", NOW, &good.replace("v1,", "v2,")), BODY),
    ];
    for (h, body) in wrong {
        let err = v.verify(&h, body).unwrap_err();
        assert_eq!(err.kind(), WebhookErrorKind::BadSignature, "{err}");
    }
    let mut missing = headers("msg_1", NOW, &good);
    missing.remove("webhook-signature");
    assert_eq!(
        v.verify(&missing, BODY).unwrap_err().kind(),
        WebhookErrorKind::MissingHeader
    );
    let mut bad_ts = headers("msg_1", NOW, &good);
    bad_ts.insert("webhook-timestamp", "yesterday".parse().unwrap());
    assert_eq!(
        v.verify(&bad_ts, BODY).unwrap_err().kind(),
        WebhookErrorKind::BadTimestamp
    );
    // None of the refusals burnt the id.
    v.verify(&headers("msg_1", NOW, &good), BODY).unwrap();
}

#[tokio::test(start_paused = true)]
async fn rejects_stale_and_future_timestamps_beyond_five_minutes() {
    let v = verifier();
    for (ts, ok) in [
        (NOW - 300, true),
        (NOW + 300, true),
        (NOW - 301, false),
        (NOW + 301, false),
    ] {
        let id = format!("msg_{ts}");
        let sig = kling_mock::sign_webhook(SECRET, &id, ts, BODY);
        let result = v.verify(&headers(&id, ts, &sig), BODY);
        assert_eq!(result.is_ok(), ok, "{ts}: {result:?}");
        if !ok {
            assert_eq!(result.unwrap_err().kind(), WebhookErrorKind::Stale);
        }
    }
    // Time moves: a message signed now is stale in six minutes.
    let sig = kling_mock::sign_webhook(SECRET, "late", NOW, BODY);
    tokio::time::advance(Duration::from_secs(360)).await;
    assert_eq!(
        v.verify(&headers("late", NOW, &sig), BODY)
            .unwrap_err()
            .kind(),
        WebhookErrorKind::Stale
    );
}

#[tokio::test(start_paused = true)]
async fn rejects_a_replayed_message_on_any_clone() {
    let v = verifier();
    let sig = kling_mock::sign_webhook(SECRET, "msg_r", NOW, BODY);
    v.verify(&headers("msg_r", NOW, &sig), BODY).unwrap();
    let err = v
        .clone()
        .verify(&headers("msg_r", NOW, &sig), BODY)
        .unwrap_err();
    assert_eq!(err.kind(), WebhookErrorKind::Replayed);

    // The cache is bounded: with room for 2 ids, the oldest is forgotten, even inside the
    // tolerance (the documented limit of a bounded cache; a message that old is refused as
    // stale once out of tolerance).
    let small = verifier().replay_capacity(2).unwrap();
    let again = |id: &str| {
        let sig = kling_mock::sign_webhook(SECRET, id, NOW, BODY);
        small.verify(&headers(id, NOW, &sig), BODY)
    };
    for id in ["a", "b", "c"] {
        again(id).unwrap();
    }
    // The two newest are still refused, ...
    for id in ["c", "b"] {
        assert_eq!(
            again(id).unwrap_err().kind(),
            WebhookErrorKind::Replayed,
            "{id}"
        );
    }
    // ... the oldest verifies again.
    again("a").unwrap();
    assert_eq!(
        verifier().replay_capacity(0).unwrap_err().field(),
        "replay_capacity"
    );
}

#[tokio::test(start_paused = true)]
async fn several_signatures_and_several_secrets_during_rotation() {
    let v = verifier();
    let old = kling_mock::sign_webhook(OTHER, "rot_1", NOW, BODY);
    let new = kling_mock::sign_webhook(SECRET, "rot_1", NOW, BODY);
    // The sender signs with both keys while rotating; ours is the second.
    v.verify(&headers("rot_1", NOW, &format!("{old} {new}")), BODY)
        .unwrap();

    // We accept both keys while rotating; the sender signs with the old one.
    let both = verifier().with_secret(OTHER).unwrap();
    let sig = kling_mock::sign_webhook(OTHER, "rot_2", NOW, BODY);
    both.verify(&headers("rot_2", NOW, &sig), BODY).unwrap();
    assert_eq!(
        WebhookVerifier::new("whsec_!!!").unwrap_err().field(),
        "webhook_secret"
    );
    assert!(!format!("{both:?}").contains("MfKQ"));
}

#[test]
fn callback_payloads_of_both_generations_are_read() {
    let legacy = parse_task(BODY).unwrap();
    assert_eq!(
        (legacy.id.as_str(), &legacy.status, legacy.cost),
        ("t-1", &TaskStatus::Succeeded, Some(1.0))
    );
    let new = parse_task(br#"{"id":"n-1","status":"failed","message":"why"}"#).unwrap();
    assert_eq!(new.status, TaskStatus::Failed);
    let wrapped = parse_task(br#"{"code":0,"data":{"id":"n-2","status":"succeeded"}}"#).unwrap();
    assert_eq!(wrapped.id, "n-2");
    assert!(parse_task(b"not json").is_none());
}

/// A body that reports two tasks (a proxy batching callbacks): `verify_task` returned the
/// first and remembered the id, so the second was lost and the sender's next delivery, or a
/// `verify_tasks` of it, refused as a replay. It is refused now, before the id is remembered,
/// and `verify_tasks` reads both.
#[tokio::test(start_paused = true)]
async fn a_body_of_two_tasks_is_refused_by_verify_task_and_read_whole_by_verify_tasks() {
    let two_shapes: [&[u8]; 2] = [
        br#"[{"task_id":"t-1","task_status":"processing"},{"task_id":"t-2","task_status":"succeed"}]"#,
        br#"{"code":0,"data":[{"task_id":"t-1","task_status":"processing"},{"task_id":"t-2","task_status":"succeed"}]}"#,
    ];
    for (n, body) in two_shapes.into_iter().enumerate() {
        let v = verifier();
        let id = format!("two_{n}");
        let h = headers(&id, NOW, &kling_mock::sign_webhook(SECRET, &id, NOW, body));
        let err = v.verify_task(&h, body).unwrap_err();
        assert_eq!(err.kind(), WebhookErrorKind::SeveralTasks, "{err}");
        assert!(err.to_string().contains("verify_tasks"), "{err}");
        // Not remembered: the whole body is read with the same id, ...
        let tasks = v.verify_tasks(&h, body).unwrap();
        let read: Vec<_> = tasks.iter().map(|t| (t.id.as_str(), &t.status)).collect();
        assert_eq!(
            read,
            [
                ("t-1", &TaskStatus::Processing),
                ("t-2", &TaskStatus::Succeeded)
            ]
        );
        // ... and then it is remembered.
        let again = v.verify_tasks(&h, body).unwrap_err();
        assert_eq!(again.kind(), WebhookErrorKind::Replayed);
        assert_eq!(
            v.verify_task(&h, body).unwrap_err().kind(),
            WebhookErrorKind::Replayed
        );
        assert_eq!(parse_tasks(body).unwrap(), tasks);
        assert_eq!(parse_task(body).as_ref(), tasks.first());
    }
}

/// One task: `verify_task` and `verify_tasks` read it alike and remember its id. A verified
/// body that reports no task is read as none and its id is not remembered, as the axum route
/// answers it `400` each time (a second delivery was refused as a replay).
#[tokio::test(start_paused = true)]
async fn one_task_is_read_by_both_forms_and_a_body_of_none_leaves_its_id_unremembered() {
    let v = verifier();
    let one = |id: &str| headers(id, NOW, &kling_mock::sign_webhook(SECRET, id, NOW, BODY));
    let task = v.verify_task(&one("one_a"), BODY).unwrap().unwrap();
    assert_eq!(Some(&task), parse_task(BODY).as_ref());
    assert_eq!(v.verify_tasks(&one("one_b"), BODY).unwrap(), [task]);
    for id in ["one_a", "one_b"] {
        assert_eq!(
            v.verify_tasks(&one(id), BODY).unwrap_err().kind(),
            WebhookErrorKind::Replayed
        );
    }
    for none in [&b"{}"[..], b"not json", br#"{"code":0,"data":[]}"#] {
        let h = headers(
            "none",
            NOW,
            &kling_mock::sign_webhook(SECRET, "none", NOW, none),
        );
        for _ in 0..2 {
            assert_eq!(v.verify_task(&h, none).unwrap(), None);
            assert!(v.verify_tasks(&h, none).unwrap().is_empty());
        }
        // The signature is still checked first.
        let forged = headers(
            "none",
            NOW,
            "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        );
        assert_eq!(
            v.verify_tasks(&forged, none).unwrap_err().kind(),
            WebhookErrorKind::BadSignature
        );
    }
    assert!(parse_tasks(b"not json").is_none());
    assert!(parse_tasks(b"{}").unwrap().is_empty());
}

#[cfg(feature = "axum")]
#[tokio::test(start_paused = true)]
async fn axum_route_verifies_and_hands_over_the_task() {
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use kling_tower::webhook::axum::callback_route;
    use tower::ServiceExt;

    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = got.clone();
    let app: Router = Router::new().route(
        "/cb",
        callback_route(verifier(), move |task| {
            log.lock().unwrap().push(task.id);
            std::future::ready(Ok::<_, std::convert::Infallible>(()))
        }),
    );
    let post = |sig: &str| {
        let mut req = http::Request::post("/cb")
            .body(axum::body::Body::from(BODY))
            .unwrap();
        *req.headers_mut() = headers("ax_1", NOW, sig);
        req
    };
    let good = kling_mock::sign_webhook(SECRET, "ax_1", NOW, BODY);
    let status = |r: http::Response<axum::body::Body>| r.status().as_u16();
    assert_eq!(
        status(app.clone().oneshot(post("v1,AAAA")).await.unwrap()),
        401
    );
    assert_eq!(status(app.clone().oneshot(post(&good)).await.unwrap()), 204);
    assert_eq!(status(app.clone().oneshot(post(&good)).await.unwrap()), 200);
    assert_eq!(*got.lock().unwrap(), vec!["t-1".to_owned()]);
}

/// The route bounds its body itself: a router that lifts axum's default limit (for uploads
/// elsewhere) does not leave callbacks unbounded.
#[cfg(feature = "axum")]
#[tokio::test(start_paused = true)]
async fn axum_route_bounds_its_body_whatever_the_router_allows() {
    use axum::Router;
    use axum::extract::DefaultBodyLimit;
    use kling_tower::webhook::axum::{CALLBACK_BODY_LIMIT, callback_route};
    use tower::ServiceExt;

    let app: Router = Router::new()
        .route(
            "/cb",
            callback_route(verifier(), |_| {
                std::future::ready(Ok::<_, std::convert::Infallible>(()))
            }),
        )
        .layer(DefaultBodyLimit::disable());
    let post = |body: Vec<u8>| {
        let good = kling_mock::sign_webhook(SECRET, "ax_big", NOW, &body);
        let mut req = http::Request::post("/cb")
            .body(axum::body::Body::from(body))
            .unwrap();
        *req.headers_mut() = headers("ax_big", NOW, &good);
        req
    };
    let big = vec![b' '; CALLBACK_BODY_LIMIT + 1];
    let answer = app.clone().oneshot(post(big)).await.unwrap();
    assert_eq!(answer.status().as_u16(), 413);
    let answer = app.oneshot(post(BODY.to_vec())).await.unwrap();
    assert_eq!(answer.status().as_u16(), 204);
}

/// Bad requests to the route, each answered without calling `on_task`: a body over the limit
/// with no length given (streamed) `413`; a signed body that is not JSON, or JSON that reports
/// no task (an empty body, one that is not UTF-8), `400`; an accepted message's id sent again with a wrong signature `401` (not the
/// replay's `200`: only the sender can make a delivery a replay); a `GET` `405`; another path
/// `404`.
#[cfg(feature = "axum")]
#[tokio::test(start_paused = true)]
async fn axum_route_answers_bad_requests_without_handling_them() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use http_body_util::BodyExt;
    use kling_tower::webhook::axum::{CALLBACK_BODY_LIMIT, callback_route};
    use tower::ServiceExt;

    let calls = Arc::new(AtomicUsize::new(0));
    let count = calls.clone();
    let app: Router = Router::new().route(
        "/cb",
        callback_route(verifier(), move |_| {
            count.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok::<_, std::convert::Infallible>(()))
        }),
    );
    let signed = |id: &str, body: &[u8]| {
        let good = kling_mock::sign_webhook(SECRET, id, NOW, body);
        headers(id, NOW, &good)
    };
    let send = |method: &str, path: &str, headers: HeaderMap, body: axum::body::Body| {
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .body(body)
            .unwrap();
        *req.headers_mut() = headers;
        let app = app.clone();
        async move { app.oneshot(req).await.unwrap().status().as_u16() }
    };
    let body = |bytes: &[u8]| axum::body::Body::from(bytes.to_vec());

    let big = vec![b' '; CALLBACK_BODY_LIMIT + 1];
    let streamed = axum::body::Body::new(
        http_body_util::Full::new(bytes::Bytes::from(big.clone())).map_frame(|frame| frame),
    );
    assert_eq!(
        send("POST", "/cb", signed("big", &big), streamed).await,
        413
    );
    // An empty body and one that is not UTF-8 too, signed as they are.
    for junk in [
        &b"not json"[..],
        b"{}",
        b"[]",
        br#"{"code":0,"data":null}"#,
        b"",
        b"\xff\xfe{\"task_id\":\"t\xff\",\"task_status\":\"succeed\"}",
    ] {
        assert_eq!(
            send("POST", "/cb", signed("junk", junk), body(junk)).await,
            400
        );
    }
    // The 400 says why, for whoever set up the sender, and quotes nothing of the body.
    let mut req = http::Request::builder()
        .method("POST")
        .uri("/cb")
        .body(body(br#"{"task_id":"","task_status":"succeed"}"#))
        .unwrap();
    *req.headers_mut() = signed("empty", br#"{"task_id":"","task_status":"succeed"}"#);
    let answer = app.clone().oneshot(req).await.unwrap();
    assert_eq!(answer.status(), 400);
    let text = answer.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("task_id"), "{text}");
    assert!(!text.contains("succeed"), "{text}");
    assert_eq!(
        send("POST", "/cb", signed("ok", BODY), body(BODY)).await,
        204
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let wrong = headers("ok", NOW, &kling_mock::sign_webhook(OTHER, "ok", NOW, BODY));
    assert_eq!(send("POST", "/cb", wrong, body(BODY)).await, 401);
    assert_eq!(
        send("POST", "/cb", signed("ok", BODY), body(BODY)).await,
        200
    );
    assert_eq!(send("GET", "/cb", signed("get", b""), body(b"")).await, 405);
    assert_eq!(
        send("POST", "/other", signed("p", BODY), body(BODY)).await,
        404
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "only the good delivery was handled"
    );
}

/// A verified body that reports several tasks (an array, as a proxy batching callbacks may
/// post) hands each to `on_task` before answering `204`: only the first was, so the others'
/// slots stayed held until their leases ran out. A failure on any answers `503`.
#[cfg(feature = "axum")]
#[tokio::test(start_paused = true)]
async fn axum_route_hands_over_every_task_of_the_body() {
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use kling_tower::webhook::axum::callback_route;
    use tower::ServiceExt;

    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = got.clone();
    let app: Router = Router::new().route(
        "/cb",
        callback_route(verifier(), move |task| {
            let failing = task.id == "t-fails";
            log.lock().unwrap().push(task.id);
            std::future::ready(if failing { Err("store away") } else { Ok(()) })
        }),
    );
    let post = |id: &str, body: &str| {
        let good = kling_mock::sign_webhook(SECRET, id, NOW, body.as_bytes());
        let mut req = http::Request::post("/cb")
            .body(axum::body::Body::from(body.to_owned()))
            .unwrap();
        *req.headers_mut() = headers(id, NOW, &good);
        let app = app.clone();
        async move { app.oneshot(req).await.unwrap().status().as_u16() }
    };
    let two = r#"[{"task_id":"t-1","task_status":"succeed"},{"id":"t-2","status":"failed"}]"#;
    assert_eq!(post("two", two).await, 204);
    assert_eq!(*got.lock().unwrap(), ["t-1", "t-2"]);
    let failing = concat!(
        r#"[{"task_id":"t-fails","task_status":"succeed"},"#,
        r#"{"task_id":"t-3","task_status":"succeed"}]"#
    );
    assert_eq!(post("failing", failing).await, 503);
    assert_eq!(post("failing", failing).await, 503, "not remembered");
}

/// A delivery whose handling failed (here `on_task` panics) is not remembered: the sender's
/// next delivery of the message is handled, not answered as a replay and dropped.
#[cfg(feature = "axum")]
#[tokio::test(start_paused = true)]
async fn axum_route_takes_again_a_message_whose_handling_failed() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use kling_tower::webhook::axum::callback_route;
    use tower::ServiceExt;

    let calls = Arc::new(AtomicUsize::new(0));
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let (count, log) = (calls.clone(), got.clone());
    let app: Router = Router::new().route(
        "/cb",
        callback_route(verifier(), move |task| {
            assert!(
                count.fetch_add(1, Ordering::SeqCst) > 0,
                "the first delivery's handling fails"
            );
            log.lock().unwrap().push(task.id);
            std::future::ready(Ok::<_, std::convert::Infallible>(()))
        }),
    );
    let good = kling_mock::sign_webhook(SECRET, "ax_2", NOW, BODY);
    let post = || {
        let mut req = http::Request::post("/cb")
            .body(axum::body::Body::from(BODY))
            .unwrap();
        *req.headers_mut() = headers("ax_2", NOW, &good);
        req
    };
    let failed = tokio::spawn(app.clone().oneshot(post())).await;
    assert!(failed.unwrap_err().is_panic());
    let status = |r: http::Response<axum::body::Body>| r.status().as_u16();
    assert_eq!(status(app.clone().oneshot(post()).await.unwrap()), 204);
    assert_eq!(*got.lock().unwrap(), vec!["t-1".to_owned()]);
    // Handled once: now it is a replay.
    assert_eq!(status(app.oneshot(post()).await.unwrap()), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A handler that fails (the slot could not be freed: Redis away) answers 503, so the sender
/// delivers the message again, and the message is not remembered: the next delivery is
/// handled, and only after it succeeded is a delivery a replay.
#[cfg(feature = "axum")]
#[tokio::test(start_paused = true)]
async fn axum_route_answers_503_when_the_handler_fails_and_takes_the_message_again() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use kling_tower::webhook::axum::callback_route;
    use tower::ServiceExt;

    let calls = Arc::new(AtomicUsize::new(0));
    let count = calls.clone();
    let app: Router = Router::new().route(
        "/cb",
        callback_route(verifier(), move |_task| {
            let first = count.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    Err("the slots' store is away")
                } else {
                    Ok(())
                }
            }
        }),
    );
    let good = kling_mock::sign_webhook(SECRET, "ax_3", NOW, BODY);
    let post = || {
        let mut req = http::Request::post("/cb")
            .body(axum::body::Body::from(BODY))
            .unwrap();
        *req.headers_mut() = headers("ax_3", NOW, &good);
        req
    };
    let status = |r: http::Response<axum::body::Body>| r.status().as_u16();
    assert_eq!(status(app.clone().oneshot(post()).await.unwrap()), 503);
    assert_eq!(status(app.clone().oneshot(post()).await.unwrap()), 204);
    assert_eq!(status(app.oneshot(post()).await.unwrap()), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn only_the_first_sixteen_signature_entries_are_read() {
    let v = verifier();
    // `junk` undecodable candidates, then the right signature of message `id`.
    let listed = |id: &str, junk: usize| {
        let good = kling_mock::sign_webhook(SECRET, id, NOW, BODY);
        let mut entries = vec!["v1,AA=="; junk];
        entries.push(&good);
        headers(id, NOW, &entries.join(" "))
    };
    // The right signature as the 16th entry is found; as the 17th or after ten thousand
    // junk candidates it is not read.
    assert_eq!(kling_tower::webhook::MAX_SIGNATURES, 16);
    v.verify(&listed("msg_1", 15), BODY).unwrap();
    for (id, junk) in [("msg_2", 16), ("msg_3", 10_000)] {
        let err = v.verify(&listed(id, junk), BODY).unwrap_err();
        assert_eq!(err.kind(), WebhookErrorKind::BadSignature, "{junk}");
        // The same message with its signature first is accepted: only the position mattered.
        v.verify(&listed(id, 0), BODY).unwrap();
    }
}

/// `webhook-timestamp` is whole seconds and the check compared whole seconds with the
/// tolerance cut down to whole seconds: under 1 s it was 0, and a message signed at NOW + 0.95 s
/// and delivered 150 ms later (at NOW + 1.1 s) was refused as stale, as was one 1.4 s late under
/// a 1.5 s tolerance. The tolerance is rounded up to whole seconds, at least 1, so a message
/// delivered within it is never refused for the rounding; one surely later still is.
#[tokio::test(start_paused = true)]
async fn a_tolerance_in_fractions_of_a_second_still_accepts_a_message_delivered_within_it() {
    let at = |millis: u64| TokioWallClock::starting_at(Duration::from_millis(NOW * 1000 + millis));
    let signed = kling_mock::sign_webhook(SECRET, "msg_1", NOW, BODY);
    let cases = [
        (Duration::from_millis(500), 1_100),
        (Duration::ZERO, 1_100),
        (Duration::from_millis(1_500), 2_300),
    ];
    for (tolerance, now) in cases {
        let v = WebhookVerifier::new(SECRET)
            .unwrap()
            .tolerance(tolerance)
            .with_clock(at(now));
        v.verify(&headers("msg_1", NOW, &signed), BODY)
            .unwrap_or_else(|e| panic!("{tolerance:?} at +{now} ms: {e}"));
    }
    // Surely later than the tolerance (signed by NOW + 1 s, checked at NOW + 3 s): refused.
    let v = WebhookVerifier::new(SECRET)
        .unwrap()
        .tolerance(Duration::from_millis(1_500))
        .with_clock(at(3_000));
    let err = v.verify(&headers("msg_1", NOW, &signed), BODY).unwrap_err();
    assert_eq!(err.kind(), WebhookErrorKind::Stale, "{err}");
    assert!(format!("{v:?}").contains("tolerance: 2s"), "{v:?}");
    // The largest tolerance does not overflow when rounded.
    let v = WebhookVerifier::new(SECRET)
        .unwrap()
        .tolerance(Duration::MAX);
    assert!(format!("{v:?}").contains("tolerance"), "{v:?}");
}
