//! No duplicate billed tasks: creates are sent again only when they surely did not happen, or
//! after a lookup by their external id finds nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, StatusCode};
use kling_core::{Outcome, Recognized};
use kling_retry::error::{Failed, StopReason};
use kling_retry::{Recovered, RetryLayer};
use tower::Layer;
use tower::timeout::TimeoutLayer;

use crate::support::{Reply, Seen, code, create, envelope, kling, send, task};

fn layer() -> RetryLayer {
    RetryLayer::builder().seed(1).build().unwrap()
}

/// A Kling that records created tasks by external id; the first create is a ghost (created and
/// billed, answered 5000), like kling-mock's `ghost_create_rate`.
fn ghost_kling(
    tasks: Arc<Mutex<Vec<Option<String>>>>,
) -> impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static {
    move |seen, _| {
        let mut tasks = tasks.lock().unwrap();
        if seen.method == Method::POST {
            let recognized = Recognized::from_parts(
                &seen.method,
                &seen.uri.parse().unwrap(),
                seen.body.as_bytes(),
            );
            let ext = recognized.external_id;
            if ext.is_some() && tasks.contains(&ext) {
                return Reply::Now(code(1201));
            }
            tasks.push(ext.clone());
            let id = format!("t{}", tasks.len());
            if tasks.len() == 1 {
                return Reply::Now(code(5000));
            }
            return Reply::Now(task(&id, ext.as_deref()));
        }
        // Legacy lookup: GET /v1/videos/text2video/{id}
        let wanted = seen.uri.rsplit('/').next().unwrap().to_owned();
        match tasks.iter().position(|t| t.as_deref() == Some(&wanted)) {
            Some(i) => Reply::Now(task(&format!("t{}", i + 1), Some(&wanted))),
            None => Reply::Now(code(1203)),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_create_after_a_5xx_with_an_external_id_is_looked_up_not_duplicated() {
    let tasks = Arc::new(Mutex::new(Vec::new()));
    let (server, log) = kling(ghost_kling(tasks.clone()));
    let client = layer().layer(server);
    let response = send(
        &client,
        create(r#"{"prompt":"a cat","external_task_id":"job-1"}"#),
    )
    .await
    .unwrap();
    assert_eq!(tasks.lock().unwrap().len(), 1, "one task, never two");
    assert_eq!(log.count("POST", "/v1/videos/text2video"), 1);
    assert_eq!(log.count("GET", "/v1/videos/text2video/job-1"), 1);
    // The caller gets the existing task as the create's result.
    assert_eq!(response.status(), StatusCode::OK);
    let outcome = Outcome::of(&response).unwrap();
    assert_eq!(outcome.task().unwrap().id, "t1");
    let recovered = response.extensions().get::<Recovered>().unwrap();
    assert_eq!(recovered.external_id, "job-1");
    assert_eq!(recovered.task_id, "t1");
}

#[tokio::test(start_paused = true)]
async fn a_create_whose_lookup_finds_nothing_is_sent_again() {
    // 5000 without creating anything, then the lookup says 1203, then the create succeeds.
    let (server, log) = kling(|seen, i| match (seen.method.clone(), i) {
        (Method::POST, 0) => Reply::Now(code(5000)),
        (Method::GET, _) => Reply::Now(code(1203)),
        _ => Reply::Now(task("t9", Some("job-2"))),
    });
    let client = layer().layer(server);
    let response = send(&client, create(r#"{"external_task_id":"job-2"}"#))
        .await
        .unwrap();
    assert_eq!(Outcome::of(&response).unwrap().task().unwrap().id, "t9");
    assert!(response.extensions().get::<Recovered>().is_none());
    let seen = log.all();
    assert_eq!(
        seen.iter()
            .map(|s| (s.method.as_str().to_owned(), s.attempt))
            .collect::<Vec<_>>(),
        vec![
            ("POST".to_owned(), Some(1)),
            ("GET".to_owned(), Some(2)),
            ("POST".to_owned(), Some(3))
        ]
    );
    // The create goes again as soon as the lookup says it did not happen.
    assert_eq!(seen[2].at, seen[1].at);
}

#[tokio::test(start_paused = true)]
async fn a_create_after_a_5xx_without_an_external_id_is_not_sent_again() {
    let (server, log) = kling(|_, _| Reply::Now(code(5002)));
    let error = send(&layer().layer(server), create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap_err();
    assert_eq!(log.len(), 1);
    let failed = error.downcast_ref::<Failed>().unwrap();
    assert_eq!(failed.reason(), StopReason::CreateMayHaveHappened);
    assert_eq!(failed.code(), Some(kling_core::Code::InternalTimeout));
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_create_without_an_external_id_is_not_sent_again() {
    let (server, log) = kling(|_, _| Reply::Later(Duration::from_secs(60), task("t1", None)));
    let client = layer().layer(TimeoutLayer::new(Duration::from_secs(10)).layer(server));
    let error = send(&client, create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap_err();
    assert_eq!(log.len(), 1);
    let failed = error.downcast_ref::<Failed>().unwrap();
    assert_eq!(failed.reason(), StopReason::CreateMayHaveHappened);
    assert!(
        std::error::Error::source(failed)
            .unwrap()
            .is::<tower::timeout::error::Elapsed>()
    );
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_create_with_an_external_id_is_looked_up() {
    let (server, log) = kling(|seen, i| match (seen.method.clone(), i) {
        (Method::POST, 0) => Reply::Later(Duration::from_secs(60), task("t1", Some("job-3"))),
        _ => Reply::Now(task("t1", Some("job-3"))),
    });
    let client = layer().layer(TimeoutLayer::new(Duration::from_secs(10)).layer(server));
    let response = send(&client, create(r#"{"external_task_id":"job-3"}"#))
        .await
        .unwrap();
    assert_eq!(
        response.extensions().get::<Recovered>().unwrap().task_id,
        "t1"
    );
    assert_eq!(log.count("POST", "text2video"), 1);
    assert_eq!(log.count("GET", "text2video/job-3"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_reset_after_sending_a_create_is_looked_up_and_a_refused_one_is_not() {
    let (server, log) = kling(|seen, i| match (seen.method.clone(), i) {
        (Method::POST, 0) => Reply::Fail(crate::support::reset()),
        (Method::POST, 2) => Reply::Fail(crate::support::refused()),
        (Method::GET, _) => Reply::Now(code(1203)),
        _ => Reply::Now(task("t1", Some("job-4"))),
    });
    let client = layer().layer(server);
    send(&client, create(r#"{"external_task_id":"job-4"}"#))
        .await
        .unwrap();
    let methods: Vec<_> = log
        .all()
        .iter()
        .map(|s| s.method.as_str().to_owned())
        .collect();
    // reset → lookup → create refused (never sent) → create again without a lookup.
    assert_eq!(methods, ["POST", "GET", "POST", "POST"]);
}

#[tokio::test(start_paused = true)]
async fn a_create_after_1302_or_1303_is_sent_again_without_a_lookup() {
    let (server, log) = kling(|_, i| {
        Reply::Now(match i {
            0 => code(1302),
            1 => code(1303),
            _ => task("t1", None),
        })
    });
    send(&layer().layer(server), create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap();
    assert_eq!(log.count("POST", "text2video"), 3);
    assert_eq!(log.count("GET", ""), 0);
}

#[tokio::test(start_paused = true)]
async fn new_style_creates_are_looked_up_through_tasks() {
    let (server, log) = kling(|seen, i| {
        if seen.method == Method::POST {
            return Reply::Now(if i == 0 {
                code(5000)
            } else {
                envelope(
                    StatusCode::OK,
                    0,
                    r#"{"id":"n2","status":"submitted","external_id":"e-1"}"#,
                )
            });
        }
        assert_eq!(seen.uri, "http://kling.test/tasks?external_task_ids=e-1");
        // First lookup: nothing yet (empty data); the create is sent again.
        Reply::Now(envelope(StatusCode::OK, 0, "[]"))
    });
    let request = http::Request::post("http://kling.test/text-to-video/kling-3.0")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"prompt":"x","external_id":"e-1"}"#,
        )))
        .unwrap();
    let response = send(&layer().layer(server), request).await.unwrap();
    assert_eq!(Outcome::of(&response).unwrap().task().unwrap().id, "n2");
    assert_eq!(log.count("POST", "text-to-video"), 2);
    assert_eq!(log.count("GET", "/tasks"), 1);
}

#[tokio::test(start_paused = true)]
async fn generated_external_ids_make_an_unknown_create_safe_to_repeat() {
    let tasks = Arc::new(Mutex::new(Vec::new()));
    let (server, log) = kling(ghost_kling(tasks.clone()));
    let client = RetryLayer::builder()
        .seed(5)
        .generate_external_ids(true)
        .build()
        .unwrap()
        .layer(server);
    let response = send(&client, create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap();
    let seen = log.all();
    assert!(
        seen[0].body.contains(r#""external_task_id":"kr-"#),
        "{}",
        seen[0].body
    );
    let recovered = response.extensions().get::<Recovered>().unwrap();
    assert!(recovered.external_id.starts_with("kr-"));
    assert_eq!(recovered.external_id.len(), 35);
    assert_eq!(tasks.lock().unwrap().len(), 1);
    // A create that already has an id keeps it.
    send(&client, create(r#"{"external_task_id":"mine"}"#))
        .await
        .unwrap();
    assert!(
        log.all()
            .last()
            .unwrap()
            .body
            .contains(r#""external_task_id":"mine""#)
    );
}

#[tokio::test(start_paused = true)]
async fn a_create_with_a_generated_id_is_resent_byte_for_byte_when_the_lookup_finds_nothing() {
    // The first create fails with a 5xx before any task exists; the lookup finds nothing; the
    // create goes again with the same generated id.
    let (server, log) = kling(|seen: &Seen, n| {
        if seen.method == Method::POST && n == 0 {
            return Reply::Now(code(5000));
        }
        if seen.method == Method::GET {
            return Reply::Now(code(1203));
        }
        Reply::Now(task("t1", None))
    });
    let client = RetryLayer::builder()
        .seed(9)
        .generate_external_ids(true)
        .build()
        .unwrap()
        .layer(server);
    let response = send(&client, create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap();
    assert_eq!(Outcome::of(&response).unwrap().task().unwrap().id, "t1");
    let seen = log.all();
    let creates: Vec<_> = seen.iter().filter(|s| s.method == Method::POST).collect();
    assert_eq!(creates.len(), 2, "{seen:?}");
    assert!(creates[0].body.starts_with(r#"{"external_task_id":"kr-"#));
    assert_eq!(
        creates[0].body, creates[1].body,
        "the same id, the same bytes"
    );
    assert_eq!(log.count("GET", "text2video/kr-"), 1);
}
