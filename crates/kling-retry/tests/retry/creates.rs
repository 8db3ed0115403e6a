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

use crate::support::{Reply, Seen, code, create, envelope, html, kling, send, task};

/// A scripted Kling that answers every create (`POST`) with `create()` and every other request
/// (the lookups) with `other()`.
fn by_method(
    create: impl Fn() -> crate::support::Res + Send + Sync + 'static,
    other: impl Fn() -> crate::support::Res + Send + Sync + 'static,
) -> impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static {
    move |seen, _| {
        Reply::Now(if seen.method == Method::POST {
            create()
        } else {
            other()
        })
    }
}

fn layer() -> RetryLayer {
    RetryLayer::builder().seed(1).build().unwrap()
}

/// A layer seeded with `seed` that gives creates without an external id one.
fn generating(seed: u64) -> RetryLayer {
    RetryLayer::builder()
        .seed(seed)
        .generate_external_ids(true)
        .build()
        .unwrap()
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

/// The tasks a scripted Kling made: each create's external id, and when lookups see it.
type Made = Arc<Mutex<Vec<(String, tokio::time::Instant)>>>;

/// A Kling that makes a task for every create it takes (it does not refuse an external id it
/// has seen), answering the first with `first` after `answer_in`, and whose lookups see a task
/// only `visible_in` after the create arrived: a create still queued, or made but not yet
/// indexed by its external id. Returns the tasks made, by external id.
fn lagging_kling(
    first: fn() -> crate::support::Res,
    answer_in: Duration,
    visible_in: Duration,
) -> (Made, impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) {
    let tasks = Made::default();
    let made = tasks.clone();
    let script = move |seen: &Seen, i: usize| {
        let mut tasks = made.lock().unwrap();
        if seen.method == Method::POST {
            let body: serde_json::Value = serde_json::from_str(&seen.body).unwrap();
            let ext = body["external_task_id"].as_str().unwrap().to_owned();
            tasks.push((ext.clone(), seen.at + visible_in));
            let answer = task(&format!("t{}", tasks.len()), Some(&ext));
            return if i == 0 {
                Reply::Later(answer_in, first())
            } else {
                Reply::Now(answer)
            };
        }
        let wanted = seen.uri.rsplit('/').next().unwrap();
        let found = tasks
            .iter()
            .position(|(ext, visible)| ext == wanted && *visible <= seen.at);
        Reply::Now(match found {
            Some(at) => task(&format!("t{}", at + 1), Some(wanted)),
            None => code(1203),
        })
    };
    (tasks, script)
}

/// One "not found" read right after a create that may have made a task is not enough to send
/// it again: the task may still be in the making (a create queued behind a timeout) or made
/// but not yet found by its external id. The lookup waits the settle time (2 s) after the
/// failed attempt, finds the task, and the caller gets it: one task, never two. (It used to go
/// within the transient backoff, 0 to 200 ms, and a 1203 then sent the create again.)
#[tokio::test(start_paused = true)]
async fn a_create_is_looked_up_only_once_the_server_has_had_time_to_record_it() {
    for (case, first, answer_in, visible_in, failed_at) in [
        // A ghost: made, answered 5000, found by its id a second later.
        (
            "5000",
            (|| code(5000)) as fn() -> _,
            Duration::ZERO,
            Duration::from_secs(1),
            0,
        ),
        // Queued: the per-attempt timeout (10 s) ends the attempt, the server makes it at 11 s.
        (
            "timeout",
            || task("t1", None),
            Duration::from_secs(60),
            Duration::from_secs(11),
            10,
        ),
    ] {
        let (tasks, script) = lagging_kling(first, answer_in, visible_in);
        let (server, log) = kling(script);
        let client = layer().layer(TimeoutLayer::new(Duration::from_secs(10)).layer(server));
        let response = send(&client, create(r#"{"external_task_id":"job-40"}"#))
            .await
            .unwrap_or_else(|error| panic!("{case}: {error}"));
        assert_eq!(
            tasks.lock().unwrap().len(),
            1,
            "{case}: one task, never two"
        );
        let recovered = response.extensions().get::<Recovered>().expect(case);
        assert_eq!(recovered.task_id, "t1", "{case}");
        let seen = log.all();
        assert_eq!(seen.len(), 2, "{case}: the create and one lookup");
        let failed = seen[0].at + Duration::from_secs(failed_at);
        assert!(
            seen[1].at >= failed + Duration::from_secs(2),
            "{case}: looked up {:?} after the failure",
            seen[1].at - failed
        );
    }
}

/// A call whose deadline comes before the settle time ends (a second after a `5000`) does not
/// look up early, where a "not found" could not be trusted: it ends at once, unresolved,
/// naming the id to look the task up by later.
#[tokio::test(start_paused = true)]
async fn a_create_whose_settle_time_passes_the_deadline_ends_unresolved_at_once() {
    let (server, log) = kling(by_method(|| code(5000), || code(1203)));
    let client = RetryLayer::builder()
        .seed(1)
        .deadline(Duration::from_secs(1))
        .build()
        .unwrap()
        .layer(server);
    let start = tokio::time::Instant::now();
    let error = send(&client, create(r#"{"external_task_id":"job-42"}"#))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO, "no wait");
    assert_eq!(log.len(), 1, "neither looked up nor sent again");
    let late = error
        .downcast_ref::<kling_retry::error::DeadlineExceeded>()
        .unwrap_or_else(|| panic!("{error}"));
    assert!(late.may_have_created(), "{error}");
    assert_eq!(late.external_id(), Some("job-42"));
}

/// A source whose every draw is 90% of the way up its range: jitter near its top.
#[derive(Debug)]
struct High;

impl kling_retry::RandomSource for High {
    fn next_u64(&self) -> u64 {
        u64::MAX / 10 * 9
    }
}

/// The backoff's jitter before a lookup is drawn from what fits before the deadline once the
/// settle time is counted: a lookup whose floor and settle time fit (0 + 2 s of 2.1 s left) is
/// not given up for jitter that would carry it past the deadline (180 ms of up to 200 ms drawn
/// here; 90 ms of the 100 ms that fit once the fix draws from them), which left the
/// create unresolved when a lookup would have found its task. (The draw used to ignore the
/// settle time, and the settle time then pushed the lookup past the deadline.)
#[tokio::test(start_paused = true)]
async fn a_lookup_whose_settle_time_fits_the_deadline_is_not_given_up_for_its_jitter() {
    let (server, log) = kling(by_method(|| code(5000), || task("t1", Some("job-43"))));
    let client = RetryLayer::builder()
        .rng(High)
        .deadline(Duration::from_millis(2_100))
        .build()
        .unwrap()
        .layer(server);
    let response = send(&client, create(r#"{"external_task_id":"job-43"}"#))
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    let recovered = response.extensions().get::<Recovered>().expect("recovered");
    assert_eq!(recovered.task_id, "t1");
    let seen = log.all();
    assert_eq!(seen.len(), 2, "the create and its lookup");
    let after = seen[1].at - seen[0].at;
    assert!(
        after >= Duration::from_secs(2) && after < Duration::from_millis(2_100),
        "looked up {after:?} after the create"
    );
}

/// The same after a `Retry-After`: the hint (1 s) and the settle time fit the deadline (3.2 s),
/// the jitter above the hint (450 ms here) would not once the settle time is counted, so the
/// lookup goes without it rather than the call ending unresolved.
#[tokio::test(start_paused = true)]
async fn a_lookup_after_a_retry_after_is_not_given_up_for_its_jitter() {
    let (server, log) = kling(by_method(
        || crate::support::with_header(code(5000), "retry-after", "1"),
        || task("t1", Some("job-44")),
    ));
    let client = RetryLayer::builder()
        .rng(High)
        .deadline(Duration::from_millis(3_200))
        .build()
        .unwrap()
        .layer(server);
    let response = send(&client, create(r#"{"external_task_id":"job-44"}"#))
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(response.extensions().get::<Recovered>().is_some());
    let seen = log.all();
    assert_eq!(seen.len(), 2, "the create and its lookup");
    assert_eq!(seen[1].at - seen[0].at, Duration::from_secs(3));
}

/// With the settle time set to zero the lookup goes after the backoff alone, for a server
/// that records a create before it answers.
#[tokio::test(start_paused = true)]
async fn a_settle_time_of_zero_looks_up_after_the_backoff_alone() {
    let (server, log) = kling(by_method(|| code(5000), || code(1203)));
    let client = RetryLayer::builder()
        .seed(1)
        .max_attempts(2)
        .backoff(kling_retry::Backoff::new().lookup_settle(Duration::ZERO))
        .build()
        .unwrap()
        .layer(server);
    send(&client, create(r#"{"external_task_id":"job-41"}"#))
        .await
        .unwrap_err();
    let seen = log.all();
    assert_eq!(seen.len(), 2);
    assert!(seen[1].at - seen[0].at <= Duration::from_millis(200));
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
    assert!(failed.last().is::<tower::timeout::error::Elapsed>());
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

/// A new-style create's lookup goes to the `tasks` of the create's own API (its base path
/// kept), read as the router reads the create's path: a `%2F` between product and model (which
/// nginx and Envoy decode before routing), or an empty segment between them. Split at its last
/// two `/`s alone, `/kling/text-to-video%2Fkling-3.0` was looked up at `/tasks` (the base path
/// lost) and `/kling/text-to-video//kling-3.0` at `/kling/text-to-video/tasks`: a server's
/// 1203 there ("resource not found") was read as no task, and the create was sent again. A
/// path whose product or model is a dot segment is not looked up at all.
#[tokio::test(start_paused = true)]
async fn a_new_style_create_is_looked_up_under_its_own_base_path() {
    for path in [
        "/kling/text-to-video%2Fkling-3.0",
        "/kling/text-to-video%2fkling-3.0/",
        "/kling/text-to-video//kling-3.0",
        "/kling%2Ftext-to-video/kling-3.0",
        // An escape that changes no segment (an escaped `.` in the model) is looked up.
        "/kling/text-to-video/kling-3%2E0",
    ] {
        let (server, log) = kling(|seen, _| {
            if seen.method == Method::POST {
                return Reply::Now(code(5000));
            }
            Reply::Now(
                if seen.uri == "http://kling.test/kling/tasks?external_task_ids=e-1" {
                    envelope(
                        StatusCode::OK,
                        0,
                        r#"[{"id":"n1","status":"submitted","external_id":"e-1"}]"#,
                    )
                } else {
                    // Anywhere else: no such resource.
                    code(1203)
                },
            )
        });
        let request = http::Request::post(format!("http://kling.test{path}"))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                br#"{"prompt":"x","external_id":"e-1"}"#,
            )))
            .unwrap();
        assert!(
            Recognized::of(&mut request.clone()).is_create(),
            "{path}: a create"
        );
        let response = send(&layer().layer(server), request)
            .await
            .unwrap_or_else(|error| panic!("{path}: {error}"));
        let recovered = response.extensions().get::<Recovered>().expect(path);
        assert_eq!(recovered.task_id, "n1", "{path}");
        assert_eq!(log.count("POST", "text-to-video"), 1, "{path}: made once");
    }
    // A dot segment after the model, or one that removes the segment before it in one
    // reading (RFC 3986's, an empty segment a segment) and two in another (`//` merged
    // first), each a create: no one lookup path is each reading's, none is sent, and the
    // create is reported with its id.
    for path in [
        "/text-to-video/text-to-video/m/x//../..",
        "/text-to-video/text-to-video/m/x//..;/..;",
    ] {
        let (server, log) = kling(|seen, _| {
            Reply::Now(if seen.method == Method::POST {
                code(5000)
            } else {
                code(1203)
            })
        });
        let request = http::Request::post(format!("http://kling.test{path}"))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                br#"{"prompt":"x","external_id":"e-1"}"#,
            )))
            .unwrap();
        assert!(
            Recognized::of(&mut request.clone()).is_create(),
            "{path}: a create"
        );
        let error = send(&layer().layer(server), request).await.unwrap_err();
        let failed = error.downcast_ref::<Failed>().expect(path);
        assert_eq!(failed.reason(), StopReason::CreateMayHaveHappened, "{path}");
        assert_eq!(failed.external_id(), Some("e-1"), "{path}");
        assert_eq!(log.len(), 1, "{path}: the create alone");
    }
}

/// A create whose path kling-core reads as a server that normalizes it does (`;` parameters
/// removed as Tomcat and Spring remove them, `%2F`s read as `/`s, dot segments removed, `..;x`
/// a `..`) is looked up where that server routes the lookup, and where every other server
/// that reads the path as a create routes it too. Built from the path's segments as written,
/// `/kling/text-to-video/x/..;/kling-3.0` was looked up at `/kling/text-to-video/x/tasks` and
/// `/kling/text-to-video/kling-3.0/;x` at `/kling/text-to-video/tasks`: a 1203 there was read
/// as no task, and the create sent again, a second billed task.
#[tokio::test(start_paused = true)]
async fn a_create_written_with_parameters_dots_or_escapes_is_looked_up_where_it_is_routed() {
    for (path, body, lookup) in [
        // New-style: `{base}/tasks`, the base as each server reads it.
        (
            "/kling/text-to-video/x/..;/kling-3.0",
            r#"{"external_id":"e-1"}"#,
            "/kling/tasks?external_task_ids=e-1",
        ),
        (
            "/kling/text-to-video/kling-3.0/;x",
            r#"{"external_id":"e-1"}"#,
            "/kling/tasks?external_task_ids=e-1",
        ),
        (
            "/kling/text-to-video/kling-3.0;jsessionid=1",
            r#"{"external_id":"e-1"}"#,
            "/kling/tasks?external_task_ids=e-1",
        ),
        (
            "/kling/text-to-video;x/kling-3.0/",
            r#"{"external_id":"e-1"}"#,
            "/kling/tasks?external_task_ids=e-1",
        ),
        (
            "/kling/text-to-video/kling-3.0/x/..;a=b/",
            r#"{"external_id":"e-1"}"#,
            "/kling/tasks?external_task_ids=e-1",
        ),
        (
            "/kling/text-to-video/kling-3.0/.",
            r#"{"external_id":"e-1"}"#,
            "/kling/tasks?external_task_ids=e-1",
        ),
        (
            "/kling/text-to-video/kling-3.0/x/%2E%2E",
            r#"{"external_id":"e-1"}"#,
            "/kling/tasks?external_task_ids=e-1",
        ),
        // A base path with parameters is kept as written: a server that removes them reads
        // `/kling/tasks`, one that keeps them (a create there too) `/kling;p/tasks`.
        (
            "/kling;p/text-to-video/kling-3.0",
            r#"{"external_id":"e-1"}"#,
            "/kling;p/tasks?external_task_ids=e-1",
        ),
        (
            "/kling;p/text-to-video/x/..;/kling-3.0",
            r#"{"external_id":"e-1"}"#,
            "/kling;p/tasks?external_task_ids=e-1",
        ),
        // Legacy: `{create path}/{id}`, read the same way as the create's path.
        (
            "/kling/v1;a=b/videos/text2video",
            r#"{"external_task_id":"job-1"}"#,
            "/kling/v1;a=b/videos/text2video/job-1",
        ),
        (
            "/kling/v1/videos/text2video/;x",
            r#"{"external_task_id":"job-1"}"#,
            "/kling/v1/videos/text2video/;x/job-1",
        ),
        (
            "/kling/v1/videos/x/..;/text2video",
            r#"{"external_task_id":"job-1"}"#,
            "/kling/v1/videos/x/..;/text2video/job-1",
        ),
        (
            "/kling/v1%2Fvideos;x%2Ftext2video",
            r#"{"external_task_id":"job-1"}"#,
            "/kling/v1%2Fvideos;x%2Ftext2video/job-1",
        ),
    ] {
        let (server, log) = kling(move |seen, _| {
            if seen.method == Method::POST {
                // Made and billed, answered 5000.
                return Reply::Now(code(5000));
            }
            Reply::Now(if seen.uri == format!("http://kling.test{lookup}") {
                envelope(
                    StatusCode::OK,
                    0,
                    if lookup.contains("/tasks?") {
                        r#"[{"id":"n1","status":"submitted","external_id":"e-1"}]"#
                    } else {
                        r#"{"task_id":"n1","task_status":"submitted"}"#
                    },
                )
            } else {
                // Anywhere else: no such resource.
                code(1203)
            })
        });
        let request = http::Request::post(format!("http://kling.test{path}"))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                body.as_bytes(),
            )))
            .unwrap();
        assert!(
            Recognized::of(&mut request.clone()).is_create(),
            "{path}: a create"
        );
        let response = send(&layer().layer(server), request)
            .await
            .unwrap_or_else(|error| panic!("{path}: {error}"));
        let recovered = response.extensions().get::<Recovered>().expect(path);
        assert_eq!(recovered.task_id, "n1", "{path}");
        assert_eq!(log.count("POST", ""), 1, "{path}: made once");
        assert_eq!(log.len(), 2, "{path}: the create and its lookup");
    }
}

/// A legacy create's id holding a `/` is looked up as `{create path}/a%2Fb`, which a proxy that
/// decodes `%2F`s (nginx, Envoy's `UNESCAPE_AND_FORWARD`, which kling-core's readings allow
/// for) routes to `{create path}/a/b`: no task lookup, and its "not found" sent the create
/// again. Such an id is not looked up; the create is reported with it, never sent twice.
#[tokio::test(start_paused = true)]
async fn a_legacy_id_that_a_decoding_proxy_would_split_is_not_looked_up() {
    let (server, log) = kling(|seen, _| {
        Reply::Now(if seen.method == Method::POST {
            code(5000)
        } else {
            // A decoding proxy: `/v1/videos/text2video/a/b`, no such resource.
            code(1203)
        })
    });
    let error = send(
        &layer().layer(server),
        create(r#"{"prompt":"a cat","external_task_id":"a/b"}"#),
    )
    .await
    .unwrap_err();
    let failed = error.downcast_ref::<Failed>().unwrap();
    assert_eq!(failed.reason(), StopReason::CreateMayHaveHappened);
    assert_eq!(failed.external_id(), Some("a/b"));
    assert_eq!(log.len(), 1, "the create alone");
}

/// kling-mock (which reads a create's body as a JSON value, its last key winning, and each
/// generation's own id field only) answering every create 5000 though it made the task: a
/// create whose body names the other generation's field, or its own field unset, gets a
/// generated id the server reads, is found by it, and is made once.
#[tokio::test(start_paused = true)]
async fn a_create_whose_id_the_server_would_not_read_gets_one_it_does_and_is_made_once() {
    use http_body_util::Full;
    use kling_mock::{MockConfig, MockKling};
    for (uri, body) in [
        // New-style: the server reads `external_id`, not the legacy field.
        (
            "/text-to-video/kling-3.0",
            r#"{"prompt":"x","external_task_id":"job-1"}"#,
        ),
        // Legacy, the field written unset (as serializers write an optional field).
        (
            "/v1/videos/text2video",
            r#"{"prompt":"x","external_task_id":null}"#,
        ),
        (
            "/v1/videos/text2video",
            r#"{"prompt":"x","external_task_id":""}"#,
        ),
        // Of a type no id has: named, so set rather than given a second key.
        (
            "/v1/videos/text2video",
            r#"{"prompt":"x","external_task_id":0}"#,
        ),
        // A field the legacy server ignores, of a type the typed read refuses: the caller's
        // id is still read (it was lost, and a generated one put in front of it).
        (
            "/v1/videos/text2video",
            r#"{"prompt":"x","external_task_id":"job-1","options":"x"}"#,
        ),
        // Written twice: set once, to the id looked up.
        (
            "/v1/videos/text2video",
            r#"{"external_task_id":null,"prompt":"x","external_task_id":"job-1"}"#,
        ),
    ] {
        let mock = MockKling::new(
            MockConfig::default()
                .no_rate_limit()
                .ghost_create_rate(1.0)
                .seed(3),
        )
        .unwrap();
        let client = generating(5).layer(kling_core::ClassifyLayer::new().layer(mock.clone()));
        let request = http::Request::post(uri)
            .header("authorization", "Bearer k")
            .body(Full::new(bytes::Bytes::from_static(body.as_bytes())))
            .unwrap();
        let response = send(&client, request).await.unwrap();
        assert!(
            response.extensions().get::<Recovered>().is_some(),
            "{uri} {body}: found by its id"
        );
        assert_eq!(mock.stats().tasks_created, 1, "{uri} {body}");
    }
}

#[tokio::test(start_paused = true)]
async fn generated_external_ids_make_an_unknown_create_safe_to_repeat() {
    let tasks = Arc::new(Mutex::new(Vec::new()));
    let (server, log) = kling(ghost_kling(tasks.clone()));
    let client = generating(5).layer(server);
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

/// Two layers seeded alike (two runs of a reproducible test, two processes of a fleet) give
/// their creates different ids: an id names the task at Kling for the whole account.
#[tokio::test(start_paused = true)]
async fn layers_seeded_alike_generate_different_external_ids() {
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (server, log) = kling(|_: &Seen, _| Reply::Now(task("t1", None)));
        let client = generating(7).layer(server);
        send(&client, create(r#"{"prompt":"a cat"}"#))
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_str(&log.all()[0].body).unwrap();
        ids.push(body["external_task_id"].as_str().unwrap().to_owned());
    }
    assert!(ids[0].starts_with("kr-"), "{ids:?}");
    assert_ne!(ids[0], ids[1]);
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
    let client = generating(9).layer(server);
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

/// A create with a generated external id whose first attempt got a 5000; `builder` sets the
/// limit under test. Returns the error and the id the create carried.
async fn unresolved_generated_create(
    builder: kling_retry::RetryLayerBuilder,
    first: crate::support::Res,
) -> (kling_core::error::BoxError, crate::support::Log) {
    let first = std::sync::Mutex::new(Some(first));
    let (server, log) = kling(move |seen, _| {
        if seen.method == Method::POST
            && let Some(first) = first.lock().unwrap().take()
        {
            return Reply::Now(first);
        }
        Reply::Now(task("t1", None))
    });
    let client = builder
        .seed(3)
        .generate_external_ids(true)
        .build()
        .unwrap()
        .layer(server);
    let error = send(&client, create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap_err();
    (error, log)
}

/// The external id the first create carried.
fn sent_id(log: &crate::support::Log) -> String {
    let body: serde_json::Value = serde_json::from_str(&log.all()[0].body).unwrap();
    body["external_task_id"].as_str().unwrap().to_owned()
}

#[tokio::test(start_paused = true)]
async fn a_create_stopped_by_the_attempt_limit_before_its_lookup_is_unresolved_with_its_id() {
    let (error, log) =
        unresolved_generated_create(RetryLayer::builder().max_attempts(1), code(5000)).await;
    assert_eq!(log.len(), 1, "the lookup had no attempt left");
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::CreateUnresolved);
    assert!(failed.may_have_created());
    let id = sent_id(&log);
    assert!(id.starts_with("kr-"), "{id}");
    assert_eq!(failed.external_id(), Some(id.as_str()));
    assert_eq!(failed.code(), Some(kling_core::Code::InternalError));
    let text = error.to_string();
    assert!(
        text.starts_with(&format!(
            "create may have made a task that no lookup by its external id has ruled out \
             (external id {id}) after 1 attempt"
        )),
        "{text}"
    );
}

/// A retry budget that allows no retry at all: a bad hour's.
fn spent_budget() -> kling_retry::RetryBudget {
    kling_retry::RetryBudget::new(Duration::from_secs(10), 0, 0.0).unwrap()
}

/// A lookup resends nothing: a spent budget does not stop it and leave the create unresolved.
/// It settles the create; only the resend after "not found" draws from the budget.
#[tokio::test(start_paused = true)]
async fn a_spent_budget_does_not_stop_the_lookup_of_a_create_only_its_resend() {
    // The lookup finds the task the 5002 made: the caller gets it, one create sent.
    let (server, log) = kling(move |seen, _| {
        Reply::Now(if seen.method == Method::POST {
            code(5002)
        } else {
            let id = seen.uri.rsplit('/').next().unwrap().to_owned();
            task("t1", Some(&id))
        })
    });
    let client = RetryLayer::builder()
        .seed(3)
        .generate_external_ids(true)
        .budget(spent_budget())
        .build()
        .unwrap()
        .layer(server);
    let response = send(&client, create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap();
    let recovered = response.extensions().get::<Recovered>().expect("recovered");
    assert_eq!(recovered.task_id, "t1");
    assert_eq!(recovered.external_id, sent_id(&log));
    assert_eq!((log.count("POST", ""), log.len()), (1, 2));

    // The lookup finds nothing: the create is not sent again (the budget is spent), and the
    // error says so, naming the id to send it again with, and no task that may exist.
    let (server, log) = kling(by_method(|| code(5002), || code(1203)));
    let client = RetryLayer::builder()
        .seed(3)
        .generate_external_ids(true)
        .budget(spent_budget())
        .build()
        .unwrap()
        .layer(server);
    let error = send(&client, create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap_err();
    assert_eq!(
        (log.count("POST", ""), log.len()),
        (1, 2),
        "looked up, not resent"
    );
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::BudgetExhausted);
    assert!(!failed.may_have_created(), "the lookup ruled it out");
    assert_eq!(failed.external_id(), Some(sent_id(&log).as_str()));
}

/// A lookup whose connection was never made did not happen: it is still the create's one free
/// lookup, so a spent budget does not leave the create unresolved when the lookup that does go
/// out settles it. (It was counted as sent, so its second try drew from the spent budget and
/// the call ended `CreateUnresolved` with the task there to be found.)
#[tokio::test(start_paused = true)]
async fn a_lookup_never_sent_is_still_the_free_one() {
    let lookups = Arc::new(Mutex::new(0));
    let (server, log) = kling(move |seen, _| {
        if seen.method == Method::POST {
            return Reply::Now(code(5002));
        }
        let mut lookups = lookups.lock().unwrap();
        *lookups += 1;
        if *lookups == 1 {
            return Reply::Fail(crate::support::refused());
        }
        let id = seen.uri.rsplit('/').next().unwrap().to_owned();
        Reply::Now(task("t1", Some(&id)))
    });
    let client = RetryLayer::builder()
        .seed(3)
        .generate_external_ids(true)
        .budget(spent_budget())
        .build()
        .unwrap()
        .layer(server);
    let response = send(&client, create(r#"{"prompt":"a cat"}"#))
        .await
        .expect("the lookup that went out found the task");
    let recovered = response.extensions().get::<Recovered>().expect("recovered");
    assert_eq!(recovered.task_id, "t1");
    assert_eq!((log.count("POST", ""), log.count("GET", "")), (1, 2));
    // Sent again after its backoff, not after another settle time: the create's is past.
    let seen = log.all();
    assert!(seen[2].at - seen[1].at < Duration::from_secs(1), "{seen:?}");

    // A lookup that did go out and was reset counts as sent: its next try draws.
    let (server, log) = kling(move |seen, _| {
        Reply::Now(if seen.method == Method::POST {
            code(5002)
        } else {
            return Reply::Fail(crate::support::reset());
        })
    });
    let client = RetryLayer::builder()
        .seed(3)
        .generate_external_ids(true)
        .budget(spent_budget())
        .build()
        .unwrap()
        .layer(server);
    let error = send(&client, create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap_err();
    assert_eq!(log.len(), 2, "the create and one lookup");
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::CreateUnresolved);
}

/// A lookup that never leaves stays free of the budget whatever the count, so only the attempt
/// limit (and the deadline) bounds a client that refuses every one: the call ends there,
/// unresolved with its id, and does not try for ever.
#[tokio::test(start_paused = true)]
async fn lookups_that_never_leave_are_bounded_by_the_attempt_limit() {
    let (server, log) = kling(move |seen, _| {
        if seen.method == Method::POST {
            return Reply::Now(code(5002));
        }
        Reply::Fail(crate::support::refused())
    });
    let client = RetryLayer::builder()
        .seed(3)
        .generate_external_ids(true)
        .budget(spent_budget())
        .max_attempts(4)
        .build()
        .unwrap()
        .layer(server);
    let error = send(&client, create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap_err();
    assert_eq!((log.count("POST", ""), log.count("GET", "")), (1, 3));
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::CreateUnresolved);
    assert_eq!(failed.external_id(), Some(sent_id(&log).as_str()));
}

/// One free lookup per open create: a lookup throttled in its turn is sent again only as the
/// budget allows, and the create is left unresolved, with its id.
#[tokio::test(start_paused = true)]
async fn a_lookup_sent_again_draws_from_the_budget() {
    let (server, log) = kling(by_method(|| code(5002), || code(1302)));
    let client = RetryLayer::builder()
        .seed(3)
        .generate_external_ids(true)
        .budget(spent_budget())
        .build()
        .unwrap()
        .layer(server);
    let error = send(&client, create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap_err();
    assert_eq!(log.len(), 2, "the create and one lookup");
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::CreateUnresolved);
    assert_eq!(failed.external_id(), Some(sent_id(&log).as_str()));
}

/// A first create refused `1201` with the caller's id is looked up whatever the budget: were the
/// lookup skipped, the refusal would read "invalid parameter" while the task that id names
/// (made by an earlier call that ended unresolved) runs and is billed.
#[tokio::test(start_paused = true)]
async fn a_first_create_refused_1201_is_looked_up_on_a_spent_budget() {
    let (server, log) = kling(by_method(|| code(1201), || task("t1", Some("job-30"))));
    let client = RetryLayer::builder()
        .seed(1)
        .budget(spent_budget())
        .build()
        .unwrap()
        .layer(server);
    let response = send(&client, create(r#"{"external_task_id":"job-30"}"#))
        .await
        .unwrap();
    let recovered = response.extensions().get::<Recovered>().expect("recovered");
    assert_eq!(recovered.task_id, "t1");
    assert_eq!((log.count("POST", ""), log.count("GET", "job-30")), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_create_stopped_by_the_deadline_before_its_lookup_says_so_and_names_its_id() {
    let (error, log) = unresolved_generated_create(
        RetryLayer::builder()
            .deadline(Duration::from_secs(5))
            .backoff(kling_retry::Backoff::new().retry_after_jitter(Duration::ZERO)),
        crate::support::with_header(code(5000), "retry-after", "7"),
    )
    .await;
    assert_eq!(log.len(), 1);
    let late = error
        .downcast_ref::<kling_retry::error::DeadlineExceeded>()
        .expect("the resume error");
    assert!(late.may_have_created(), "the next step was a lookup");
    let id = sent_id(&log);
    assert_eq!(late.external_id(), Some(id.as_str()));
    let text = error.to_string();
    assert!(
        text.starts_with(&format!(
            "the server asked to wait 7s (Retry-After), and only 5s are left before the \
             deadline; create may have made a task that no lookup by its external id has ruled \
             out (external id {id}) after 1 attempt"
        )),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_query_past_the_deadline_names_no_create() {
    let (server, _log) =
        kling(|_, _| Reply::Now(crate::support::with_header(code(5000), "retry-after", "7")));
    let client = RetryLayer::builder()
        .seed(1)
        .deadline(Duration::from_secs(5))
        .build()
        .unwrap()
        .layer(server);
    let error = send(&client, crate::support::get("/v1/videos/text2video/t1"))
        .await
        .unwrap_err();
    let late = error
        .downcast_ref::<kling_retry::error::DeadlineExceeded>()
        .unwrap();
    assert!(!late.may_have_created());
    assert_eq!(late.external_id(), None);
}

#[tokio::test(start_paused = true)]
async fn a_lookup_refused_for_good_leaves_the_create_unresolved_with_its_id() {
    // 5000 on the create, then the lookup is refused (no permission for the query API).
    let (server, log) = kling(by_method(|| code(5000), || code(1103)));
    let error = send(
        &layer().layer(server),
        create(r#"{"external_task_id":"job-9"}"#),
    )
    .await
    .unwrap_err();
    assert_eq!(log.count("POST", "text2video"), 1);
    assert_eq!(log.count("GET", "text2video/job-9"), 1);
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::CreateUnresolved);
    assert_eq!(failed.external_id(), Some("job-9"));
    assert_eq!(failed.code(), Some(kling_core::Code::NoPermission));
}

#[tokio::test(start_paused = true)]
async fn an_error_from_below_on_a_lookup_leaves_the_create_unresolved_and_keeps_the_error() {
    /// What a limiter between this layer and the classify step returns (say, "the deadline
    /// would pass before a slot frees"): not an answer, and not retried.
    #[derive(Debug)]
    struct Refused;
    impl std::fmt::Display for Refused {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a limiter below refused the request")
        }
    }
    impl std::error::Error for Refused {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&kling_core::error::RefusedBeforeSending)
        }
    }

    let (server, log) = kling(|_, _| Reply::Now(code(5000)));
    // Creates reach the server; lookups are refused on the way.
    let below = tower::service_fn(move |request: crate::support::Req| {
        let mut server = server.clone();
        async move {
            if request.method() == Method::GET {
                return Err(Box::new(Refused) as kling_core::error::BoxError);
            }
            tower::ServiceExt::ready(&mut server).await?;
            tower::Service::call(&mut server, request).await
        }
    });
    let error = send(
        &layer().layer(below),
        create(r#"{"external_task_id":"job-10"}"#),
    )
    .await
    .unwrap_err();
    assert_eq!(log.len(), 1, "the lookup never reached the server");
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::CreateUnresolved);
    assert_eq!(failed.external_id(), Some("job-10"));
    assert!(failed.last().is::<Refused>());
    // The last request was refused before sending, but the first create may have made a task:
    // whoever reads the error without naming this crate's types must not send it again.
    assert_eq!(
        kling_core::SendState::of(&*error),
        kling_core::SendState::Unknown
    );
    assert!(kling_core::error::may_have_created(&*error));
    let attempts = std::error::Error::source(failed)
        .and_then(|source| source.downcast_ref::<kling_core::error::Attempts>())
        .expect("the requests counted");
    assert_eq!(attempts.sent(), 2);
}

/// The create got a 5000, the lookup by its generated id found nothing (1203), and the resend
/// was refused below before it left (a limiter): the caller gets the id the create must go
/// again with, never a bare refusal that leaves it to send the create without one.
#[tokio::test(start_paused = true)]
async fn a_resend_refused_below_after_a_lookup_found_nothing_names_the_external_id() {
    #[derive(Debug)]
    struct NoSlot;
    impl std::fmt::Display for NoSlot {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("no slot before the deadline")
        }
    }
    impl std::error::Error for NoSlot {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&kling_core::error::RefusedBeforeSending)
        }
    }

    let (server, log) = kling(by_method(|| code(5000), || code(1203)));
    let posts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let below = tower::service_fn(move |request: crate::support::Req| {
        let mut server = server.clone();
        let posts = posts.clone();
        async move {
            if request.method() == Method::POST
                && posts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1
            {
                return Err(Box::new(NoSlot) as kling_core::error::BoxError);
            }
            tower::ServiceExt::ready(&mut server).await?;
            tower::Service::call(&mut server, request).await
        }
    });
    let client = generating(3).layer(below);
    let error = send(&client, create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap_err();
    assert_eq!(log.len(), 2, "the create and its lookup reached the server");
    let failed = error
        .downcast_ref::<Failed>()
        .expect("a Failed, not a bare refusal");
    assert_eq!(failed.reason(), StopReason::NotRetryable);
    assert!(!failed.may_have_created(), "the lookup ruled the first out");
    assert_eq!(failed.external_id(), Some(sent_id(&log).as_str()));
    assert!(failed.last().is::<NoSlot>());
    assert_eq!(failed.attempts(), 3);
    assert!(!kling_core::error::may_have_created(&*error));
}

/// The first create fails with a 5000 before any task exists, the lookup finds nothing, the
/// create goes again and is refused with `1201` "duplicate external task id": the first one
/// landed after all. `second_lookup` answers the lookup that follows.
fn late_landing_kling(
    second_lookup: fn() -> crate::support::Res,
) -> impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static {
    move |seen, i| {
        Reply::Now(match (seen.method.clone(), i) {
            (Method::POST, 0) => code(5000),
            (Method::GET, 1) => code(1203),
            (Method::POST, _) => code(1201),
            _ => second_lookup(),
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_refused_resend_of_a_create_that_landed_late_returns_the_task_it_made() {
    let (server, log) = kling(late_landing_kling(|| task("t1", Some("job-11"))));
    let response = send(
        &layer().layer(server),
        create(r#"{"external_task_id":"job-11"}"#),
    )
    .await
    .unwrap();
    let recovered = response.extensions().get::<Recovered>().expect("recovered");
    assert_eq!(recovered.task_id, "t1");
    assert_eq!(recovered.external_id, "job-11");
    let seen: Vec<_> = log
        .all()
        .iter()
        .map(|s| (s.method.as_str().to_owned(), s.attempt))
        .collect();
    assert_eq!(
        seen,
        [
            ("POST".to_owned(), Some(1)),
            ("GET".to_owned(), Some(2)),
            ("POST".to_owned(), Some(3)),
            ("GET".to_owned(), Some(4)),
        ]
    );
    // The second lookup waits the settle time: the 1201 may be the answer to the duplicate id of
    // a task the first create made that a lookup at once would not find yet.
    let all = log.all();
    assert_eq!(all[3].at, all[2].at + Duration::from_secs(2));
}

/// The `1201` may be the answer to the duplicate id of a task the first create made (a `5000`
/// may be a ghost) that the lookups do not find yet: the create is left unresolved, naming its
/// id, with the refusal as its last answer, never reported as a refusal that made nothing.
#[tokio::test(start_paused = true)]
async fn a_refused_resend_whose_lookup_finds_nothing_is_left_unresolved() {
    let (server, log) = kling(late_landing_kling(|| code(1203)));
    let error = send(
        &layer().layer(server),
        create(r#"{"external_task_id":"job-12"}"#),
    )
    .await
    .unwrap_err();
    assert_eq!(log.count("POST", "text2video"), 2, "never a third create");
    assert_eq!(log.count("GET", "text2video/job-12"), 2);
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::CreateUnresolved);
    assert!(failed.may_have_created());
    assert_eq!(failed.code(), Some(kling_core::Code::InvalidParameter));
    assert_eq!(failed.external_id(), Some("job-12"));
}

#[tokio::test(start_paused = true)]
async fn the_lookup_after_a_refused_resend_counts_as_an_attempt() {
    let (server, log) = kling(late_landing_kling(|| task("t1", Some("job-13"))));
    let client = RetryLayer::builder()
        .seed(1)
        .max_attempts(3)
        .build()
        .unwrap()
        .layer(server);
    let error = send(&client, create(r#"{"external_task_id":"job-13"}"#))
        .await
        .unwrap_err();
    assert_eq!(log.len(), 3, "no attempt left for the second lookup");
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::CreateUnresolved);
    assert_eq!(failed.external_id(), Some("job-13"));
    assert_eq!(failed.code(), Some(kling_core::Code::InvalidParameter));
}

/// A Kling that makes a task for the first create it takes under an external id and refuses
/// every later create with that id `1201`, as Kling and kling-mock answer a duplicate
/// `external_task_id`. The first create's answer is lost (it comes after the per-attempt
/// timeout, 10 s, under the layer), and lookups see its task only `visible_in` after it arrived
/// (`None`: never, within the test). Returns the tasks made, by external id.
fn duplicate_refusing_kling(
    visible_in: Option<Duration>,
) -> (Made, impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) {
    let tasks = Made::default();
    let made = tasks.clone();
    let script = move |seen: &Seen, _: usize| {
        let mut tasks = made.lock().unwrap();
        if seen.method == Method::POST {
            let body: serde_json::Value = serde_json::from_str(&seen.body).unwrap();
            let ext = body["external_task_id"].as_str().unwrap().to_owned();
            if tasks.iter().any(|(made, _)| *made == ext) {
                return Reply::Now(code(1201));
            }
            let visible = visible_in.map_or_else(
                || seen.at + Duration::from_secs(86_400 * 365),
                |visible_in| seen.at + visible_in,
            );
            tasks.push((ext.clone(), visible));
            let answer = task(&format!("t{}", tasks.len()), Some(&ext));
            return Reply::Later(Duration::from_secs(60), answer);
        }
        let wanted = seen.uri.rsplit('/').next().unwrap();
        let found = tasks
            .iter()
            .position(|(ext, visible)| ext == wanted && *visible <= seen.at);
        Reply::Now(match found {
            Some(at) => task(&format!("t{}", at + 1), Some(wanted)),
            None => code(1203),
        })
    };
    (tasks, script)
}

/// A create whose first answer was lost (a timeout: the task may be made), looked up after the
/// settle time (not found yet), sent again with the same external id and refused `1201`: the
/// refusal may be the server's answer to the duplicate id of the task the first attempt made.
/// A lookup made at once proves nothing (the task may not be found by its id yet), so the layer
/// looks it up once the server had time to record it: found, the caller gets the task; still
/// not found, the call ends with the create unresolved, naming its id, never as a refusal that
/// made nothing (a caller who "fixes the job and sends it again" would bill the task twice).
/// With the caller's id and with one the layer generated.
#[tokio::test(start_paused = true)]
async fn a_duplicate_refusal_after_an_attempt_that_may_have_made_the_task_never_says_nothing_was_made()
 {
    for (visible_in, body, client) in [
        (
            Some(Duration::from_secs(13)),
            r#"{"external_task_id":"job-60"}"#,
            layer(),
        ),
        (None, r#"{"external_task_id":"job-61"}"#, layer()),
        (
            Some(Duration::from_secs(13)),
            r#"{"prompt":"cat"}"#,
            generating(60),
        ),
        (None, r#"{"prompt":"dog"}"#, generating(61)),
    ] {
        let case = format!("{body}, visible after {visible_in:?}");
        let (tasks, script) = duplicate_refusing_kling(visible_in);
        let (server, log) = kling(script);
        let client = client.layer(TimeoutLayer::new(Duration::from_secs(10)).layer(server));
        let result = send(&client, create(body)).await;
        let made = tasks.lock().unwrap().clone();
        assert_eq!(made.len(), 1, "{case}: one task, never two");
        let ext = made[0].0.clone();
        assert_eq!(
            log.count("POST", "text2video"),
            2,
            "{case}: never a third create"
        );
        match visible_in {
            Some(_) => {
                let response = result.unwrap_or_else(|error| panic!("{case}: {error}"));
                let recovered = response.extensions().get::<Recovered>().expect(&case);
                assert_eq!(recovered.task_id, "t1", "{case}");
                assert_eq!(recovered.external_id, ext, "{case}");
            }
            None => {
                let error = result.err().unwrap_or_else(|| panic!("{case}: no error"));
                let failed = error.downcast_ref::<Failed>().expect(&case);
                assert_eq!(failed.reason(), StopReason::CreateUnresolved, "{case}");
                assert!(failed.may_have_created(), "{case}");
                assert!(kling_core::error::may_have_created(&*error), "{case}");
                assert_eq!(failed.external_id(), Some(ext.as_str()), "{case}");
                assert_eq!(
                    failed.code(),
                    Some(kling_core::Code::InvalidParameter),
                    "{case}"
                );
            }
        }
        let seen = log.all();
        let last = seen.last().unwrap();
        assert_eq!(last.method, Method::GET, "{case}");
        let refused = seen[seen.len() - 2].at;
        assert!(
            last.at >= refused + Duration::from_secs(2),
            "{case}: the lookup after the 1201 went {:?} after it, not after the settle time",
            last.at - refused
        );
    }
}

/// The control: a `1201` on a first create (nothing before it may have made a task) with the
/// caller's id is looked up at once and, not found, stays a plain refusal that made nothing.
#[tokio::test(start_paused = true)]
async fn a_duplicate_refusal_of_a_first_create_is_looked_up_at_once_and_stands() {
    let (server, log) = kling(by_method(|| code(1201), || code(1203)));
    let client = layer().layer(TimeoutLayer::new(Duration::from_secs(10)).layer(server));
    let error = send(&client, create(r#"{"external_task_id":"job-62"}"#))
        .await
        .unwrap_err();
    let seen = log.all();
    assert_eq!(
        seen.iter()
            .map(|s| s.method.as_str().to_owned())
            .collect::<Vec<_>>(),
        ["POST", "GET"]
    );
    assert_eq!(seen[1].at, seen[0].at, "the lookup goes at once");
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::NotRetryable);
    assert!(!failed.may_have_created());
    assert!(!kling_core::error::may_have_created(&*error));
    assert_eq!(failed.external_id(), None);
    assert_eq!(failed.code(), Some(kling_core::Code::InvalidParameter));
}

#[tokio::test(start_paused = true)]
async fn a_refusal_of_a_first_create_is_returned_without_a_lookup() {
    // A refusal that is not about the request's parameters (1301: content) goes back as it is.
    let (server, log) = kling(|_, _| Reply::Now(code(1301)));
    let error = send(
        &layer().layer(server),
        create(r#"{"external_task_id":"job-14"}"#),
    )
    .await
    .unwrap_err();
    assert_eq!(log.len(), 1);
    let failed = error.downcast_ref::<Failed>().unwrap();
    assert_eq!(failed.reason(), StopReason::NotRetryable);
    assert_eq!(failed.external_id(), None);
}

/// A create answered with a code Kling does not document under HTTP 200 (final, yet it may have
/// made a task, as the task slots and a spend guard read it) is looked up by its id; without
/// one it ends as a create that may have happened, not as a plain refusal.
#[tokio::test(start_paused = true)]
async fn a_create_answered_an_unknown_code_under_200_is_looked_up_or_reported_unresolved() {
    let (server, log) = kling(by_method(
        || envelope(StatusCode::OK, 1999, "null"),
        || task("t1", Some("job-17")),
    ));
    let client = layer().layer(server);
    let response = send(&client, create(r#"{"external_task_id":"job-17"}"#))
        .await
        .unwrap();
    assert!(response.extensions().get::<Recovered>().is_some());
    assert_eq!(log.count("POST", "text2video"), 1);

    let error = send(&client, create(r#"{"prompt":"no id"}"#))
        .await
        .unwrap_err();
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::CreateMayHaveHappened);
    assert!(failed.may_have_created());
    assert!(kling_core::error::may_have_created(&*error));
    assert_eq!(log.count("POST", "text2video"), 2, "not sent again");
}

/// A create answered with an undocumented code (it may have made the task) is looked up only
/// once the server had time to record the task, as after a `5000`: read at once, the lookup's
/// "not found" returned the answer as a refusal that made nothing (`NotRetryable`), while the
/// task, found by its id a second later, ran and was billed.
#[tokio::test(start_paused = true)]
async fn a_create_answered_an_unknown_code_is_looked_up_once_its_task_can_be_found() {
    let (tasks, script) = lagging_kling(
        || envelope(StatusCode::OK, 1999, "null"),
        Duration::ZERO,
        Duration::from_secs(1),
    );
    let (server, log) = kling(script);
    let response = send(
        &layer().layer(server),
        create(r#"{"external_task_id":"job-43"}"#),
    )
    .await
    .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(tasks.lock().unwrap().len(), 1);
    let recovered = response.extensions().get::<Recovered>().expect("recovered");
    assert_eq!(recovered.task_id, "t1");
    let seen = log.all();
    assert_eq!(seen.len(), 2, "the create and one lookup");
    assert!(seen[1].at - seen[0].at >= Duration::from_secs(2));
}

/// A create answered with an undocumented code under HTTP 200 that carries an external id, whose
/// lookup cannot settle it (refused for good, or no attempt left to send it), is unresolved:
/// `CreateUnresolved`, naming the id to look it up by. It ended as `CreateMayHaveHappened`,
/// whose text says the create "has no external_task_id to look it up by" beside the id it has.
#[tokio::test(start_paused = true)]
async fn a_create_answered_an_unknown_code_whose_lookup_cannot_settle_it_is_unresolved() {
    for attempts in [5, 1] {
        let (server, log) = kling(by_method(
            || envelope(StatusCode::OK, 1999, "null"),
            || code(1103),
        ));
        let client = RetryLayer::builder()
            .seed(1)
            .max_attempts(attempts)
            .build()
            .unwrap()
            .layer(server);
        let error = send(&client, create(r#"{"external_task_id":"job-30"}"#))
            .await
            .unwrap_err();
        assert_eq!(log.count("POST", "text2video"), 1, "not sent again");
        let failed = error.downcast_ref::<Failed>().expect("a Failed");
        assert_eq!(failed.reason(), StopReason::CreateUnresolved, "{error}");
        assert!(failed.may_have_created());
        assert_eq!(failed.external_id(), Some("job-30"));
        assert!(
            !error.to_string().contains("no external_task_id"),
            "{attempts} attempts: {error}"
        );
    }
}

/// A create whose id this layer generated is fresh: its 1201 is a bad request, returned
/// without a lookup. And a caller's id whose lookup cannot be sent (one attempt allowed) leaves
/// the refusal standing, not a create to look up.
#[tokio::test(start_paused = true)]
async fn a_1201_is_not_looked_up_for_a_generated_id_nor_left_unresolved_when_the_lookup_cannot_go()
{
    let (server, log) = kling(|_, _| Reply::Now(code(1201)));
    let client = generating(1).layer(server);
    let error = send(&client, create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap_err();
    assert_eq!(log.len(), 1, "no lookup");
    let failed = error.downcast_ref::<Failed>().unwrap();
    assert_eq!(failed.reason(), StopReason::NotRetryable);

    let (server, log) = kling(|_, _| Reply::Now(code(1201)));
    let client = RetryLayer::builder()
        .seed(1)
        .max_attempts(1)
        .build()
        .unwrap()
        .layer(server);
    let error = send(&client, create(r#"{"external_task_id":"job-18"}"#))
        .await
        .unwrap_err();
    assert_eq!(log.len(), 1, "the lookup could not go");
    let failed = error.downcast_ref::<Failed>().unwrap();
    assert_eq!(failed.reason(), StopReason::NotRetryable);
    assert!(!failed.may_have_created());
}

/// A first create refused as a bad request (1201, as Kling may answer a duplicate external id:
/// the caller sending again a create whose earlier call ended unresolved) is looked up by its
/// id: found, the caller gets the task; not found, the refusal. Without an id, no lookup.
#[tokio::test(start_paused = true)]
async fn a_first_create_refused_1201_is_looked_up_by_its_external_id() {
    let (server, log) = kling(by_method(|| code(1201), || task("t1", Some("job-15"))));
    let client = layer().layer(server);
    let response = send(&client, create(r#"{"external_task_id":"job-15"}"#))
        .await
        .unwrap();
    let recovered = response.extensions().get::<Recovered>().expect("recovered");
    assert_eq!(recovered.task_id, "t1");
    assert_eq!(log.count("POST", "text2video"), 1, "never a second create");
    assert_eq!(log.count("GET", "text2video/job-15"), 1);

    let (server, log) = kling(by_method(|| code(1201), || code(1203)));
    let client = layer().layer(server);
    let error = send(&client, create(r#"{"external_task_id":"job-16"}"#))
        .await
        .unwrap_err();
    let failed = error.downcast_ref::<Failed>().unwrap();
    assert_eq!(failed.reason(), StopReason::NotRetryable);
    assert_eq!(failed.code(), Some(kling_core::Code::InvalidParameter));
    assert_eq!((log.count("POST", "text2video"), log.len()), (1, 2));

    let error = send(&client, create(r#"{"prompt":"no id"}"#))
        .await
        .unwrap_err();
    assert!(error.is::<Failed>(), "{error}");
    assert_eq!(log.len(), 3, "no lookup without an id");
}

/// A first create refused `1201` whose lookup (made in case the refusal was of a duplicate id)
/// cannot settle it: the refusal stands, and the caller gets it, with its code, message and
/// request id, not the lookup's failure as if the create had been refused for that (a `1103`
/// read "no permission", a `1302` "too fast", a limiter's refusal no code at all), nor a
/// `DeadlineExceeded` inviting it to send the refused create again later.
#[tokio::test(start_paused = true)]
async fn a_refusal_whose_lookup_cannot_settle_it_is_returned_as_the_refusal() {
    #[derive(Debug)]
    struct Refused;
    impl std::fmt::Display for Refused {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a limiter below refused the request")
        }
    }
    impl std::error::Error for Refused {}

    for lookup in ["1103", "1302", "1302 after 700 s", "refused below"] {
        let (server, log) = kling(move |seen, _| {
            Reply::Now(if seen.method == Method::POST {
                code(1201)
            } else if lookup == "1103" {
                code(1103)
            } else if lookup == "1302 after 700 s" {
                crate::support::with_header(code(1302), "retry-after", "700")
            } else {
                code(1302)
            })
        });
        let below = tower::service_fn(move |request: crate::support::Req| {
            let mut server = server.clone();
            async move {
                if request.method() == Method::GET && lookup == "refused below" {
                    return Err(Box::new(Refused) as kling_core::error::BoxError);
                }
                tower::ServiceExt::ready(&mut server).await?;
                tower::Service::call(&mut server, request).await
            }
        });
        let client = RetryLayer::builder()
            .seed(1)
            .max_attempts(3)
            .deadline(Duration::from_secs(60))
            .build()
            .unwrap()
            .layer(below);
        let error = send(&client, create(r#"{"external_task_id":"job-20"}"#))
            .await
            .unwrap_err();
        assert_eq!(log.count("POST", ""), 1, "{lookup}");
        let failed = error
            .downcast_ref::<Failed>()
            .unwrap_or_else(|| panic!("{lookup}: {error}"));
        assert_eq!(failed.reason(), StopReason::NotRetryable, "{lookup}");
        assert_eq!(
            failed.code(),
            Some(kling_core::Code::InvalidParameter),
            "{lookup}: {error}"
        );
        assert_eq!(failed.request_id(), Some("req-1201"), "{lookup}");
        assert!(!failed.may_have_created(), "{lookup}");
        assert!(
            error.to_string().contains("message 1201"),
            "{lookup}: {error}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_lookup_that_succeeds_without_a_readable_task_does_not_resend_the_create() {
    // Code 0 answers the lookup reads no task from: the create may exist, so it is not sent
    // again; the call stops unresolved, with the create's own failure.
    for (legacy, data) in [
        (true, r#"{"task_id":"t1"}"#),
        (true, "null"),
        (true, "[]"),
        (
            true,
            r#"{"task_id":"t1","task_status":"submitted","task_info":{"external_task_id":"other"}}"#,
        ),
        (false, "null"),
        (false, r#"{"id":"n1"}"#),
        (false, r#"[{"id":"n1"}]"#),
    ] {
        let (server, log) = kling(by_method(
            move || code(5000),
            move || envelope(StatusCode::OK, 0, data),
        ));
        let (uri, field) = if legacy {
            ("http://kling.test/v1/videos/text2video", "external_task_id")
        } else {
            ("http://kling.test/text-to-video/kling-3.0", "external_id")
        };
        let request = http::Request::post(uri)
            .body(http_body_util::Full::new(bytes::Bytes::from(format!(
                r#"{{"{field}":"job-15"}}"#
            ))))
            .unwrap();
        let error = send(&layer().layer(server), request).await.unwrap_err();
        assert_eq!(log.count("POST", ""), 1, "{data}");
        assert_eq!(log.count("GET", "job-15"), 1, "{data}");
        let failed = error.downcast_ref::<Failed>().expect("a Failed");
        assert_eq!(failed.reason(), StopReason::CreateUnresolved, "{data}");
        assert_eq!(failed.external_id(), Some("job-15"));
        assert_eq!(
            failed.code(),
            Some(kling_core::Code::InternalError),
            "{data}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_create_without_an_id_waits_out_maintenance_and_is_sent_again() {
    // 5001: the service refused the request during maintenance; nothing was created.
    let (server, log) =
        kling(|_, i| Reply::Now(if i == 0 { code(5001) } else { task("t1", None) }));
    let response = send(&layer().layer(server), create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap();
    assert_eq!(Outcome::of(&response).unwrap().task().unwrap().id, "t1");
    let seen = log.all();
    assert_eq!(log.count("POST", "text2video"), 2);
    assert_eq!(log.count("GET", ""), 0, "no lookup");
    assert!(
        seen[1].at - seen[0].at >= Duration::from_secs(5),
        "the maintenance backoff"
    );
}

#[tokio::test(start_paused = true)]
async fn a_create_without_an_id_after_a_503_page_without_an_envelope_is_not_sent_again() {
    // A 503 with no Kling envelope (a gateway's page) says nothing about what happened.
    let (server, log) = kling(|_, _| Reply::Now(html(503, "<html>down</html>")));
    let error = send(&layer().layer(server), create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap_err();
    assert_eq!(log.len(), 1);
    let failed = error.downcast_ref::<Failed>().unwrap();
    assert_eq!(failed.reason(), StopReason::CreateMayHaveHappened);
}

#[tokio::test(start_paused = true)]
async fn an_unrecognised_post_that_may_have_created_a_task_is_not_sent_again() {
    for failure in [
        || Reply::Now(code(5000)),
        || Reply::Fail(crate::support::reset()),
    ] {
        let (server, log) = kling(move |_, _| failure());
        let request = http::Request::post("http://kling.test/video-effects/kling-v1")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                br#"{"effect_scene":"hug","external_task_id":"job-16"}"#,
            )))
            .unwrap();
        let error = send(&layer().layer(server), request).await.unwrap_err();
        assert_eq!(log.len(), 1, "sent once");
        let failed = error.downcast_ref::<Failed>().expect("a Failed");
        assert_eq!(failed.reason(), StopReason::CreateMayHaveHappened);
        assert!(failed.may_have_created());
    }
}

/// A `POST` under Kling's legacy `/v1/videos` or `/v1/images` on an endpoint the router does
/// not know (a grouped create newer than this crate, as `avatar/image2video` and
/// `editing/expand` are grouped) is a possible create too: the router knows its generation,
/// not that it makes no task. Answered `5000` or reset, it was sent again: a second billed
/// task if the first was made.
#[tokio::test(start_paused = true)]
async fn an_unknown_legacy_post_that_may_have_created_a_task_is_not_sent_again() {
    for path in [
        "/v1/videos/storyboard/text2video",
        "/v1/images/retouch/upscale",
        "/v1/videos/text2video/extra",
    ] {
        let recognized = Recognized::from_parts(&Method::POST, &path.parse().unwrap(), b"{}");
        assert_eq!(recognized.kind, kling_core::RequestKind::Other, "{path}");
        assert!(recognized.generation.is_some(), "{path}");
        for failure in [
            || Reply::Now(code(5000)),
            || Reply::Fail(crate::support::reset()),
        ] {
            let (server, log) = kling(move |_, _| failure());
            let request = http::Request::post(format!("http://kling.test{path}"))
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    br#"{"prompt":"a cat","external_task_id":"job-17"}"#,
                )))
                .unwrap();
            let error = send(&layer().layer(server), request).await.unwrap_err();
            assert_eq!(log.len(), 1, "{path}: sent once");
            let failed = error.downcast_ref::<Failed>().expect("a Failed");
            assert_eq!(failed.reason(), StopReason::CreateMayHaveHappened, "{path}");
            assert!(failed.may_have_created(), "{path}");
        }
    }
}

/// An unrecognised `POST` is a possible create for every rule, the errors the policy does not
/// retry included: sent again after a `1302`, then failed below by an error that nothing marks
/// as never sent (a buffer whose worker died mid-request, say), it may have made a task, as a
/// recognised create does. It was returned as `NotRetryable`, reading as surely not made, so a
/// caller would send it again.
#[tokio::test(start_paused = true)]
async fn an_unrecognised_post_failed_below_after_a_retry_may_have_made_a_task() {
    #[derive(Debug)]
    struct WorkerDied;
    impl std::fmt::Display for WorkerDied {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("the worker died while the request was out")
        }
    }
    impl std::error::Error for WorkerDied {}

    let (server, log) = kling(|_, _| Reply::Now(code(1302)));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let below = tower::service_fn(move |request: crate::support::Req| {
        let mut server = server.clone();
        let calls = calls.clone();
        async move {
            if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                return Err(Box::new(WorkerDied) as kling_core::error::BoxError);
            }
            tower::ServiceExt::ready(&mut server).await?;
            tower::Service::call(&mut server, request).await
        }
    });
    let request = http::Request::post("http://kling.test/video-effects/kling-v1")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"effect_scene":"hug"}"#,
        )))
        .unwrap();
    let error = send(&layer().layer(below), request).await.unwrap_err();
    assert_eq!(
        log.len(),
        1,
        "the 1302 reached the server; the second failed below"
    );
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::CreateMayHaveHappened);
    assert!(failed.may_have_created());
    assert!(kling_core::error::may_have_created(&*error));
    assert!(failed.last().is::<WorkerDied>());

    // A `GET` the router does not know is no create: the same failure is returned as final.
    let (server, _log) = kling(|_, _| Reply::Now(code(1302)));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let below = tower::service_fn(move |request: crate::support::Req| {
        let mut server = server.clone();
        let calls = calls.clone();
        async move {
            if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                return Err(Box::new(WorkerDied) as kling_core::error::BoxError);
            }
            tower::ServiceExt::ready(&mut server).await?;
            tower::Service::call(&mut server, request).await
        }
    });
    let request = http::Request::get("http://kling.test/video-effects/kling-v1/t1")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let error = send(&layer().layer(below), request).await.unwrap_err();
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::NotRetryable);
    assert!(!failed.may_have_created());
}

/// A `POST` the router knows for no create is no possible create: Kling's endpoints that
/// answer at once with no task (`/v1/videos/identify-face`, `/v1/videos/image-recognize`).
/// Failed below after a retry, it was reported `CreateMayHaveHappened` (a caller would look
/// for a task that cannot exist); answered `5000`, it was not sent again, as a possible
/// create is not. Now both are as for any request that makes no task.
#[tokio::test(start_paused = true)]
async fn a_post_kling_answers_at_once_is_no_possible_create() {
    #[derive(Debug)]
    struct WorkerDied;
    impl std::fmt::Display for WorkerDied {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("the worker died while the request was out")
        }
    }
    impl std::error::Error for WorkerDied {}
    let post = |path: &str| {
        http::Request::post(format!("http://kling.test{path}"))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                br#"{"video_url":"https://v"}"#,
            )))
            .unwrap()
    };

    for path in ["/v1/videos/identify-face", "/v1/videos/image-recognize"] {
        let (server, log) = kling(|_, _| Reply::Now(code(1302)));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let below = tower::service_fn(move |request: crate::support::Req| {
            let mut server = server.clone();
            let calls = calls.clone();
            async move {
                if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                    return Err(Box::new(WorkerDied) as kling_core::error::BoxError);
                }
                tower::ServiceExt::ready(&mut server).await?;
                tower::Service::call(&mut server, request).await
            }
        });
        let error = send(&layer().layer(below), post(path)).await.unwrap_err();
        assert_eq!(log.len(), 1, "{path}");
        let failed = error.downcast_ref::<Failed>().expect("a Failed");
        assert_eq!(failed.reason(), StopReason::NotRetryable, "{path}");
        assert!(!failed.may_have_created(), "{path}");
        assert!(!kling_core::error::may_have_created(&*error), "{path}");

        // A 5000 is asked again, as for a query.
        let (server, log) = kling(|_, i| {
            Reply::Now(if i == 0 {
                code(5000)
            } else {
                envelope(StatusCode::OK, 0, r#"{"faces":[]}"#)
            })
        });
        let answer = send(&layer().layer(server), post(path)).await.unwrap();
        assert!(Outcome::of(&answer).unwrap().is_success(), "{path}");
        assert_eq!(log.len(), 2, "{path}");
    }
}

/// Which endpoints answer at once is the router's word ([`Recognized::answers_at_once`]), not
/// a second list here: a `POST` it marks so is asked again after a `5000`, as a query is, and
/// the same `POST` unmarked is a possible create, not sent again. With the two endpoints
/// listed in this crate too, an endpoint the router learned (here marked by hand, as the
/// router would) stayed a possible create.
#[tokio::test(start_paused = true)]
async fn which_posts_answer_at_once_is_the_routers_word() {
    let post = |marked: bool| {
        let mut request = http::Request::post("http://kling.test/v1/videos/face-sketch/detect")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                br#"{"video_url":"https://v"}"#,
            )))
            .unwrap();
        let recognized = Recognized::of_mut(&mut request);
        assert_eq!(recognized.kind, kling_core::RequestKind::Other);
        assert!(!recognized.answers_at_once, "unknown to the router");
        recognized.answers_at_once = marked;
        request
    };
    let flaky = || {
        kling(|_, i| {
            Reply::Now(if i == 0 {
                code(5000)
            } else {
                envelope(StatusCode::OK, 0, r#"{"faces":[]}"#)
            })
        })
    };

    let (server, log) = flaky();
    let answer = send(&layer().layer(server), post(true)).await.unwrap();
    assert!(Outcome::of(&answer).unwrap().is_success());
    assert_eq!(log.len(), 2, "asked again, as a query is");

    let (server, log) = flaky();
    let error = send(&layer().layer(server), post(false)).await.unwrap_err();
    assert_eq!(log.len(), 1, "a possible create is not sent again");
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::CreateMayHaveHappened);
}

/// A path the router reads as an endpoint that answers at once but that is written otherwise
/// (`//`, `%2F`, a `;` parameter, dot segments) stays a possible create: a server or proxy may
/// read it otherwise, so it is never sent again blindly.
#[tokio::test(start_paused = true)]
async fn an_endpoint_that_answers_at_once_written_otherwise_is_a_possible_create() {
    for path in [
        "/v1//videos/identify-face",
        "/v1/videos%2Fidentify-face",
        "/v1/videos/identify-face;v=2",
        "/v1/images/../videos/identify-face",
        "/v1/videos/./image-recognize",
    ] {
        let recognized = Recognized::from_parts(&Method::POST, &path.parse().unwrap(), b"{}");
        assert!(recognized.answers_at_once, "{path}: the router reads it so");
        let (server, log) = kling(|_, _| Reply::Now(code(5000)));
        let request = http::Request::post(format!("http://kling.test{path}"))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap();
        let error = send(&layer().layer(server), request).await.unwrap_err();
        assert_eq!(log.len(), 1, "{path}: sent once");
        let failed = error.downcast_ref::<Failed>().expect("a Failed");
        assert_eq!(failed.reason(), StopReason::CreateMayHaveHappened, "{path}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_unrecognised_post_refused_before_any_work_and_an_unrecognised_get_are_sent_again() {
    let (server, log) = kling(|_, i| {
        Reply::Now(match i {
            0 => code(1302),
            2 => code(5000),
            _ => task("t1", None),
        })
    });
    let client = layer().layer(server);
    let post = http::Request::post("http://kling.test/video-effects/kling-v1")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .unwrap();
    send(&client, post).await.unwrap();
    send(&client, crate::support::get("/v1/something/new"))
        .await
        .unwrap();
    assert_eq!(log.count("POST", "video-effects"), 2);
    assert_eq!(log.count("GET", "something/new"), 2);
}

/// A new-style create after a 5000, looked up by `external_id` `job-16`; the lookup answers
/// `data`, and a create sent again is taken as `n2`.
async fn new_style_lookup_answered(
    data: &'static str,
) -> (
    Result<crate::support::Res, kling_core::error::BoxError>,
    crate::support::Log,
) {
    let (server, log) = kling(move |seen, i| {
        Reply::Now(if i == 0 {
            code(5000)
        } else if seen.method == Method::GET {
            envelope(StatusCode::OK, 0, data)
        } else {
            envelope(
                StatusCode::OK,
                0,
                r#"{"id":"n2","status":"submitted","external_id":"job-16"}"#,
            )
        })
    });
    let request = http::Request::post("http://kling.test/text-to-video/kling-3.0")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"external_id":"job-16"}"#,
        )))
        .unwrap();
    (send(&layer().layer(server), request).await, log)
}

#[tokio::test(start_paused = true)]
async fn a_new_style_lookup_answered_an_empty_list_sends_the_create_again() {
    let (response, log) = new_style_lookup_answered("[]").await;
    assert!(Outcome::of(&response.unwrap()).unwrap().is_success());
    assert_eq!(log.count("POST", ""), 2);
    assert_eq!(log.count("GET", "job-16"), 1);
}

/// An answer to `GET /tasks?external_task_ids=job-16` that lists only other ids' tasks (a
/// server that ignored the filter, a page of the account's tasks) says nothing about this
/// create, which may exist: it is not sent again (it was, as if the list said "not found").
#[tokio::test(start_paused = true)]
async fn a_new_style_lookup_answered_with_other_tasks_does_not_send_the_create_again() {
    for data in [
        r#"[{"id":"n1","status":"submitted","external_id":"other"}]"#,
        r#"[{"id":"n1","status":"submitted","external_id":"other"},{"id":"n3","status":"failed","external_id":"more"}]"#,
        r#"[{"id":"n1","status":"submitted"},{"id":"n3","status":"failed"}]"#,
    ] {
        let (error, log) = new_style_lookup_answered(data).await;
        let error = error.unwrap_err();
        assert_eq!(log.count("POST", ""), 1, "never a second create: {data}");
        assert_eq!(log.count("GET", "job-16"), 1, "{data}");
        let failed = error.downcast_ref::<Failed>().expect("a Failed");
        assert_eq!(failed.reason(), StopReason::CreateUnresolved, "{data}");
        assert_eq!(failed.external_id(), Some("job-16"));
        assert_eq!(failed.code(), Some(kling_core::Code::InternalError));
    }
}

/// The task that names the create's id is the one recovered, not a task before it in the list
/// that names none (the caller was handed another create's task).
#[tokio::test(start_paused = true)]
async fn a_lookup_recovers_the_task_that_names_the_id_not_the_first_listed() {
    let (response, log) = new_style_lookup_answered(
        r#"[{"id":"n9","status":"succeeded"},{"id":"n1","status":"submitted","external_id":"job-16"}]"#,
    )
    .await;
    let response = response.unwrap();
    assert_eq!(log.count("POST", ""), 1);
    let recovered = response.extensions().get::<Recovered>().expect("recovered");
    assert_eq!(recovered.task_id, "n1");
    assert_eq!(recovered.external_id, "job-16");
}

/// A legacy lookup `GET {create path}/{id}` answered with a list (a page of the account's
/// tasks, not one task) recovers none of them: the create is left unresolved.
#[tokio::test(start_paused = true)]
async fn a_legacy_lookup_answered_with_a_list_page_recovers_no_task() {
    for data in [
        r#"[{"task_id":"t9","task_status":"succeed"}]"#,
        r#"[{"task_id":"t9","task_status":"succeed"},{"task_id":"t8","task_status":"failed"}]"#,
    ] {
        let (server, log) = kling(by_method(
            || code(5000),
            move || envelope(StatusCode::OK, 0, data),
        ));
        let error = send(
            &layer().layer(server),
            create(r#"{"external_task_id":"job-19"}"#),
        )
        .await
        .unwrap_err();
        assert_eq!(log.count("POST", ""), 1, "{data}");
        let failed = error.downcast_ref::<Failed>().expect("a Failed");
        assert_eq!(failed.reason(), StopReason::CreateUnresolved, "{data}");
        assert_eq!(failed.external_id(), Some("job-19"));
    }
}

/// A create the server took (HTTP 200) in an answer nobody can read: its task exists, so it is
/// neither sent again nor returned as a bare parse error, but as a create that may have
/// happened, with the id this layer wrote in (the caller's only way to find the task).
#[tokio::test(start_paused = true)]
async fn a_create_taken_in_an_unreadable_answer_reports_its_generated_id() {
    let (server, log) = kling(|_, _| Reply::Now(html(200, "<html>accepted</html>")));
    let client = generating(1).layer(server);
    let error = send(&client, create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap_err();
    assert_eq!(log.len(), 1, "not sent again, not looked up");
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::CreateMayHaveHappened);
    let id = failed.external_id().expect("the id written in");
    assert!(log.all()[0].body.contains(id), "{id}");
    assert!(kling_core::error::may_have_created(&*error));
    assert!(
        error.to_string().starts_with(
            "create may have made a task, not looked up by its external id (external id kr-"
        ),
        "{error}"
    );
}

/// A create that may have made a task and has an external id the layer cannot look it up by
/// (a new-style id with a comma: a batch query cannot name it) says so, with the id: its text
/// said it "has no external_task_id to look it up by" beside the id it had.
#[tokio::test(start_paused = true)]
async fn a_create_not_looked_up_by_the_id_it_has_says_so() {
    let (server, log) = kling(|_, _| Reply::Now(code(5000)));
    let request = http::Request::post("http://kling.test/text-to-video/kling-3.0")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"prompt":"x","external_id":"a,b"}"#,
        )))
        .unwrap();
    let error = send(&layer().layer(server), request).await.unwrap_err();
    assert_eq!(log.len(), 1, "not sent again, not looked up");
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::CreateMayHaveHappened);
    assert_eq!(failed.external_id(), Some("a,b"));
    assert_eq!(
        error.to_string(),
        "create may have made a task, not looked up by its external id (external id a,b) \
         after 1 attempt in 0ns (0ns backing off): kling error 5000 (internal error), http 500: \
         message 5000 (request_id req-5000)"
    );
}

/// A create on a long path (a gateway forwarding its callers' paths) keeps its outcomes now
/// that only the path's last cuts are tried as written (the unit test
/// `lookup::tests::a_long_path_tries_a_bounded_number_of_lookups` counts them): looked up
/// where every reading routes it, or reported with its id, not sent again.
#[tokio::test(start_paused = true)]
async fn a_create_on_a_long_path_is_looked_up_or_reported_as_before() {
    let prefix = "/a".repeat(6000);
    let (server, log) = kling(by_method(|| code(5000), || code(1203)));
    let client = RetryLayer::builder()
        .seed(1)
        .max_attempts(2)
        .build()
        .unwrap()
        .layer(server);
    let long = |path: &str| {
        http::Request::post(format!("http://kling.test{prefix}{path}"))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                br#"{"prompt":"x","external_id":"job"}"#,
            )))
            .unwrap()
    };
    // Readings that route the create to two base paths no one lookup is under.
    let error = send(&client, long("/text-to-video/text-to-video/m/x//../.."))
        .await
        .unwrap_err();
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::CreateMayHaveHappened);
    assert_eq!(failed.external_id(), Some("job"));
    assert_eq!(log.len(), 1, "not sent again, not looked up");
    // One every reading routes: looked up under the create's own base path.
    let error = send(&client, long("/text-to-video/kling-3.0"))
        .await
        .unwrap_err();
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::AttemptsExhausted, "{error}");
    let lookup = &log.all()[2];
    assert_eq!(lookup.method, Method::GET);
    assert_eq!(
        lookup.uri,
        format!("http://kling.test{prefix}/tasks?external_task_ids=job")
    );
}

/// A lookup that never answers ends at the call's deadline, not an hour later: the call says
/// its create may have made a task, with the id to find it by. (The deadline used to be read
/// only between attempts, so with no timeout under the layer the call waited for good.)
#[tokio::test(start_paused = true)]
async fn a_lookup_that_never_answers_ends_at_the_deadline_with_the_creates_id() {
    let (server, log) = kling(|seen, _| {
        if seen.method == Method::POST {
            Reply::Now(code(5000))
        } else {
            Reply::Later(Duration::from_secs(3600), task("t1", Some("job-1")))
        }
    });
    let client = RetryLayer::builder()
        .deadline(Duration::from_secs(30))
        .build()
        .unwrap()
        .layer(server);
    let start = tokio::time::Instant::now();
    let error = send(
        &client,
        create(r#"{"prompt":"a cat","external_task_id":"job-1"}"#),
    )
    .await
    .unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    assert_eq!(log.count("GET", "job-1"), 1, "the lookup went out");
    assert_eq!(log.count("POST", ""), 1, "the create was not sent again");
    assert!(kling_core::error::may_have_created(&*error), "{error}");
    let late = error
        .downcast_ref::<kling_retry::error::DeadlineExceeded>()
        .unwrap_or_else(|| panic!("{error}"));
    assert_eq!(late.external_id(), Some("job-1"));
}

/// A create whose first attempt may have made a task (a 5000), dropped by its caller while the
/// lookup by its generated external id is still out: the warning names that id, the only way
/// to find a task the caller never saw. A call dropped after a `1303` (nothing made), or after
/// it ended, warns of nothing.
#[tokio::test(start_paused = true)]
async fn a_call_dropped_before_its_create_was_resolved_names_the_external_id() {
    let (warnings, _guard) = crate::support::Warnings::capture();
    let (server, log) = kling(|seen, _| {
        if seen.method == Method::POST {
            Reply::Now(code(5000))
        } else {
            Reply::Later(Duration::from_secs(3600), task("t1", None))
        }
    });
    let client = generating(5).layer(server);
    let call = send(&client, create(r#"{"prompt":"a cat"}"#));
    assert!(
        tokio::time::timeout(Duration::from_secs(60), call)
            .await
            .is_err(),
        "the lookup is still out"
    );
    assert_eq!(
        log.count("GET", "text2video/kr-"),
        1,
        "dropped during the lookup"
    );
    let id = sent_id(&log);
    let all = warnings.all();
    assert_eq!(all.len(), 1, "{all:?}");
    assert!(all[0].contains(&format!("external_id=\"{id}\"")), "{all:?}");
    assert!(all[0].contains("may have made a task"), "{all:?}");

    // Nothing made: a 1303, dropped during the wait before the retry.
    let (warnings, _guard) = crate::support::Warnings::capture();
    let (server, _) = kling(|_, _| Reply::Now(code(1303)));
    let client = layer().layer(server);
    let call = send(&client, create(r#"{"external_task_id":"job-9"}"#));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), call)
            .await
            .is_err()
    );
    // Ended: a ghost create looked up and found.
    let tasks = Arc::new(Mutex::new(Vec::new()));
    let (server, _) = kling(ghost_kling(tasks));
    let client = layer().layer(server);
    let response = send(&client, create(r#"{"external_task_id":"job-10"}"#)).await;
    assert!(response.is_ok());
    assert!(warnings.all().is_empty(), "{:?}", warnings.all());
}

/// A create given a generated id, dropped by its caller while its first attempt is out (an
/// outer timeout): the task may be made, and the id the layer wrote in is the only way to find
/// it, so the warning names it. (It warned only from the first retry on, so this id was lost.)
/// Not when a layer below still holds the attempt back unsent (a create queued for a slot:
/// it made nothing), nor for the caller's own id (the caller has it), nor once answered.
#[tokio::test(start_paused = true)]
async fn a_first_attempt_dropped_in_flight_names_its_generated_id() {
    let (warnings, _guard) = crate::support::Warnings::capture();
    let hang = |_: &Seen, _| Reply::Later(Duration::from_secs(3600), task("t1", None));
    let (server, log) = kling(hang);
    let client = generating(5).layer(server);
    let call = send(&client, create(r#"{"prompt":"a cat"}"#));
    assert!(
        tokio::time::timeout(Duration::from_secs(60), call)
            .await
            .is_err()
    );
    assert_eq!(log.len(), 1);
    let id = sent_id(&log);
    let all = warnings.all();
    assert_eq!(all.len(), 1, "{all:?}");
    assert!(all[0].contains(&format!("external_id=\"{id}\"")), "{all:?}");
    assert!(all[0].contains("may have made a task"), "{all:?}");

    let (warnings, _guard) = crate::support::Warnings::capture();
    // Held below, unsent: a slots layer still waiting for a slot.
    let (server, log) = kling(hang);
    let queued = tower::service_fn(move |request: crate::support::Req| {
        kling_core::signals::SendWatch::held(&request);
        let _keep = server.clone();
        std::future::pending::<Result<crate::support::Res, kling_core::error::BoxError>>()
    });
    let client = generating(5).layer(queued);
    let call = send(&client, create(r#"{"prompt":"a cat"}"#));
    assert!(
        tokio::time::timeout(Duration::from_secs(60), call)
            .await
            .is_err()
    );
    assert_eq!(log.len(), 0, "never sent");
    // The caller's own id: it has it.
    let (server, _) = kling(hang);
    let client = layer().layer(server);
    let call = send(&client, create(r#"{"external_task_id":"job-12"}"#));
    assert!(
        tokio::time::timeout(Duration::from_secs(60), call)
            .await
            .is_err()
    );
    // Answered: nothing to warn of.
    let (server, _) = kling(|_, _| Reply::Now(task("t1", None)));
    send(
        &generating(5).layer(server),
        create(r#"{"prompt":"a cat"}"#),
    )
    .await
    .unwrap();
    assert!(warnings.all().is_empty(), "{:?}", warnings.all());
}

/// A create whose lookup found nothing is sent again: dropped while that create is out, the
/// call warns (it may make the task); dropped after that create was refused with a `1303`
/// (nothing made by any attempt), during the wait before the next, it does not.
#[tokio::test(start_paused = true)]
async fn a_call_dropped_while_its_create_is_sent_again_names_the_external_id() {
    for (second, wait, warned) in [
        (None, Duration::from_secs(60), true),
        // The lookup waits out the settle time (2 s), the resend follows it, and its 1303
        // waits at least 1 s more.
        (Some(1303), Duration::from_millis(2500), false),
    ] {
        let (warnings, _guard) = crate::support::Warnings::capture();
        let (server, log) = kling(move |seen, i| match (seen.method.clone(), i, second) {
            (Method::POST, 0, _) => Reply::Now(code(5000)),
            (Method::GET, _, _) => Reply::Now(code(1203)),
            (_, _, Some(refused)) => Reply::Now(code(refused)),
            _ => Reply::Later(Duration::from_secs(3600), task("t1", Some("job-11"))),
        });
        let client = layer().layer(server);
        let call = send(&client, create(r#"{"external_task_id":"job-11"}"#));
        assert!(tokio::time::timeout(wait, call).await.is_err());
        assert_eq!(log.count("POST", "text2video"), 2, "{second:?}");
        assert_eq!(log.count("GET", "text2video/job-11"), 1, "{second:?}");
        let all = warnings.all();
        if warned {
            assert_eq!(all.len(), 1, "{all:?}");
            assert!(all[0].contains("external_id=\"job-11\""), "{all:?}");
        } else {
            assert!(all.is_empty(), "{all:?}");
        }
    }
}

/// A create answered with a code Kling does not document, under HTTP 200 (it may have made
/// the task), is looked up: dropped while that lookup is out, the call names the create's
/// external id; ended by the deadline with the lookup still out, its error names it too.
#[tokio::test(start_paused = true)]
async fn a_create_whose_final_answer_may_have_made_a_task_is_named_while_its_lookup_is_out() {
    let script = |seen: &Seen, _: usize| {
        if seen.method == Method::POST {
            Reply::Now(envelope(StatusCode::OK, 4242, "null"))
        } else {
            Reply::Later(Duration::from_secs(3600), task("t1", Some("job-12")))
        }
    };
    let (warnings, _guard) = crate::support::Warnings::capture();
    let (server, log) = kling(script);
    let client = layer().layer(server);
    let call = send(&client, create(r#"{"external_task_id":"job-12"}"#));
    assert!(
        tokio::time::timeout(Duration::from_secs(60), call)
            .await
            .is_err()
    );
    assert_eq!(
        log.count("GET", "text2video/job-12"),
        1,
        "dropped during the lookup"
    );
    let all = warnings.all();
    assert_eq!(all.len(), 1, "{all:?}");
    assert!(all[0].contains("external_id=\"job-12\""), "{all:?}");

    let (server, _) = kling(script);
    let client = RetryLayer::builder()
        .seed(1)
        .deadline(Duration::from_secs(30))
        .build()
        .unwrap()
        .layer(server);
    let error = send(&client, create(r#"{"external_task_id":"job-12"}"#))
        .await
        .unwrap_err();
    let named = error
        .downcast_ref::<kling_retry::error::DeadlineExceeded>()
        .map(|late| late.external_id().map(str::to_owned))
        .or_else(|| {
            error
                .downcast_ref::<Failed>()
                .map(|failed| failed.external_id().map(str::to_owned))
        });
    assert_eq!(named, Some(Some("job-12".to_owned())), "{error}");
}

/// A proxy's 4xx page (here a 413) on a create given a generated id made nothing, as
/// `kling_core::error::may_have_created` reads it: it passes up as the page it is, not as an
/// unresolved create that keeps a spend guard's credit and a caller's worry for nothing.
#[tokio::test(start_paused = true)]
async fn a_proxys_4xx_page_on_a_generated_create_says_nothing_was_made() {
    let (server, log) =
        kling(|_, _| Reply::Now(html(413, "<html>413 Request Entity Too Large</html>")));
    let client = RetryLayer::builder()
        .seed(2)
        .generate_external_ids(true)
        .build()
        .unwrap()
        .layer(server);
    let error = send(&client, create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap_err();
    assert!(!kling_core::error::may_have_created(&*error), "{error}");
    assert!(
        error
            .downcast_ref::<Failed>()
            .is_none_or(|f| !f.may_have_created()),
        "{error}"
    );
    assert_eq!(log.len(), 1, "not sent again");
}

/// An error from below that the policy does not retry and nothing marks as never sent (a
/// client's own error reaching the layer without a classify step): the create may have
/// reached the server. A create sent again by the layer, or given a generated id the caller
/// never saw, ends unresolved with its id, not passed up as if nothing were made.
#[tokio::test(start_paused = true)]
async fn an_unmarked_error_on_a_resent_or_generated_create_names_its_id() {
    #[derive(Debug)]
    struct Lost;
    impl std::fmt::Display for Lost {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("the connection was lost")
        }
    }
    impl std::error::Error for Lost {}

    // `fail_from`: the index of the first create that meets the error (earlier ones get 1302).
    let client_with = |fail_from: usize, generate: bool| {
        let (server, log) = kling(|_, _| Reply::Now(code(1302)));
        let creates = Arc::new(Mutex::new(0));
        let below = tower::service_fn(move |request: crate::support::Req| {
            let mut server = server.clone();
            let creates = creates.clone();
            async move {
                let n = {
                    let mut creates = creates.lock().unwrap();
                    *creates += 1;
                    *creates - 1
                };
                if n >= fail_from {
                    return Err(Box::new(Lost) as kling_core::error::BoxError);
                }
                tower::ServiceExt::ready(&mut server).await?;
                tower::Service::call(&mut server, request).await
            }
        });
        let client = RetryLayer::builder()
            .seed(2)
            .generate_external_ids(generate)
            .build()
            .unwrap()
            .layer(below);
        (client, log)
    };

    // Sent again after a 1302, with the caller's id.
    let (client, _) = client_with(1, false);
    let error = send(&client, create(r#"{"external_task_id":"job-40"}"#))
        .await
        .unwrap_err();
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::CreateUnresolved, "{error}");
    assert!(failed.may_have_created());
    assert_eq!(failed.external_id(), Some("job-40"));
    assert!(failed.last().is::<Lost>());

    // A first attempt with a generated id: the id comes back with the error.
    let (client, _) = client_with(0, true);
    let error = send(&client, create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap_err();
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::CreateUnresolved, "{error}");
    assert!(failed.external_id().is_some_and(|id| id.starts_with("kr-")));

    // A first attempt with the caller's own id passes through unchanged; so does a query's.
    let (client, _) = client_with(0, false);
    let error = send(&client, create(r#"{"external_task_id":"job-41"}"#))
        .await
        .unwrap_err();
    assert!(error.is::<Lost>(), "{error}");
    let (client, _) = client_with(1, false);
    let error = send(&client, crate::support::get("/v1/videos/text2video/t1"))
        .await
        .unwrap_err();
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::NotRetryable);
    assert!(!failed.may_have_created());
}
