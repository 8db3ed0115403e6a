use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use kling_core::{
    AccountId, BoxError, Classify, ClassifyLayer, Code, Outcome, TaskReport, TaskStatus,
};
use kling_mock::{MockConfig, MockKling, Preset, Switches};
use kling_tower::error::FollowError;
use kling_tower::follow::{FollowPolicy, Follower, TaskRef};
use kling_tower::{Credentials, KlingLayer, StackConfig, Tier};
use tokio::time::Instant;
use tower::{Layer, ServiceBuilder, ServiceExt};

use crate::support::request;

fn mock(min: u64, max: u64) -> MockKling {
    MockKling::new(
        MockConfig::preset(Preset::Pro)
            .no_rate_limit()
            .task_duration(Duration::from_secs(min), Duration::from_secs(max)),
    )
    .unwrap()
}

async fn create(service: &Classify<MockKling>, path: &str) -> TaskReport {
    create_with(service, path, r#"{"prompt":"a cat"}"#).await
}

/// A create of `body` at `path`: the task it made.
async fn create_with(service: &Classify<MockKling>, path: &str, body: &str) -> TaskReport {
    let mut req = request("POST", path, body);
    req.headers_mut()
        .insert("authorization", "Bearer key".parse().unwrap());
    let response = service.clone().oneshot(req).await.unwrap();
    let outcome = Outcome::of(&response).unwrap();
    assert!(outcome.is_success(), "{:?}", outcome.to_result());
    outcome.task().unwrap().clone()
}

/// `n` new-style tasks created on `service`.
async fn create_new_style(service: &Classify<MockKling>, n: usize) -> Vec<TaskRef> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let task = create(service, "/text-to-video/kling-3.0").await;
        tasks.push(TaskRef::from_report("/text-to-video/kling-3.0", &task));
    }
    tasks
}

/// A service that answers from `inner`, logging every request's URI.
type Logged = tower::util::BoxCloneSyncService<
    http::Request<Full<Bytes>>,
    http::Response<Full<Bytes>>,
    BoxError,
>;

/// `inner` behind a step that logs every request's URI.
fn logging_uris(inner: Classify<MockKling>) -> (Logged, Arc<Mutex<Vec<String>>>) {
    let uris: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = uris.clone();
    let service = ServiceBuilder::new()
        .map_request(move |req: http::Request<Full<Bytes>>| {
            log.lock().unwrap().push(req.uri().to_string());
            req
        })
        .map_err(Into::<BoxError>::into)
        .service(inner);
    (Logged::new(service), uris)
}

fn follower<S>(service: S, policy: FollowPolicy) -> Follower<S>
where
    S: tower::Service<http::Request<Full<Bytes>>, Response = http::Response<Full<Bytes>>> + Clone,
    S::Error: Into<BoxError>,
{
    Follower::new(service, policy)
        .unwrap()
        .with_header("authorization", "Bearer key")
        .unwrap()
}

/// Checks that a follow ran out of time: its task never ended.
fn assert_ran_out<T: std::fmt::Debug>(result: &Result<T, FollowError>) {
    assert!(
        matches!(result, Err(FollowError::DeadlineExceeded { .. })),
        "{result:?}"
    );
}

/// A server of task lists by task ids that reports every id of a query as processing, or only
/// the first (a page limit) unless `all`; it first hands `seen` the time since `start` and the
/// query's ids.
fn reporting_processing(
    start: Instant,
    all: bool,
    seen: impl Fn(Duration, &str) + Send + Sync + 'static,
) -> impl tower::Service<
    http::Request<Full<Bytes>>,
    Response = http::Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl std::future::Future<Output = Answer> + Send,
> + Clone
+ Send
+ 'static {
    let seen = Arc::new(seen);
    tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let uri = req.uri().to_string();
        let ids = uri.strip_prefix("/tasks?task_ids=").unwrap();
        seen(start.elapsed(), ids);
        let answered = if all { ids.split(',').count() } else { 1 };
        let reports: Vec<String> = ids
            .split(',')
            .take(answered)
            .map(|id| format!(r#"{{"id":"{id}","status":"processing"}}"#))
            .collect();
        let body = format!(r#"{{"code":0,"data":[{}]}}"#, reports.join(","));
        async move { Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from(body)))) }
    })
}

/// Follows task `a` on a clone of `one` from `start` and `b` on `one` from `b_at` after it, and
/// checks that both ran out of time.
async fn follow_a_then_b<S>(one: Follower<S>, start: Instant, b_at: Duration, b: TaskRef)
where
    S: tower::Service<http::Request<Full<Bytes>>, Response = http::Response<Full<Bytes>>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    let other = one.clone();
    let a = tokio::spawn(async move { other.follow(TaskRef::new_style("a")).await });
    tokio::time::sleep_until(start + b_at).await;
    let b = one.follow(b).await;
    for result in [a.await.unwrap(), b] {
        assert_ran_out(&result);
    }
}

/// A server's answer to a query.
type Answer = Result<http::Response<Full<Bytes>>, BoxError>;

/// When (since a start) each task id was asked about.
type AskedAbout = Arc<Mutex<HashMap<String, Vec<Duration>>>>;

/// A log of when each task id was asked about, and the `seen` for [`reporting_processing`]
/// that fills it.
fn each_id_asked() -> (AskedAbout, impl Fn(Duration, &str) + Send + Sync + 'static) {
    let asked: AskedAbout = Arc::default();
    let log = asked.clone();
    let note = move |at, ids: &str| {
        let mut log = log.lock().unwrap();
        for id in ids.split(',') {
            log.entry(id.to_owned()).or_default().push(at);
        }
    };
    (asked, note)
}

#[test]
fn query_interval_grows_with_age_and_errors_back_off() {
    let p = FollowPolicy::new();
    assert_eq!(p.interval(Duration::ZERO), Duration::from_secs(2));
    assert_eq!(p.interval(Duration::from_secs(60)), Duration::from_secs(12));
    assert_eq!(
        p.interval(Duration::from_secs(3600)),
        Duration::from_secs(30)
    );
    assert_eq!(p.backoff(1), Duration::from_secs(1));
    assert_eq!(p.backoff(3), Duration::from_secs(4));
    assert_eq!(p.backoff(30), Duration::from_secs(60));
    let fast = FollowPolicy::new().speed(10.0);
    assert_eq!(
        fast.interval(Duration::from_secs(6)),
        Duration::from_millis(1200)
    );
    let err = FollowPolicy::new().batch_size(0).validate().unwrap_err();
    assert_eq!(err.field(), "follow.batch_size");
    let err = FollowPolicy::new()
        .interval_bounds(Duration::from_secs(5), Duration::from_secs(1))
        .validate()
        .unwrap_err();
    assert_eq!(err.field(), "follow.max_interval");
}

/// A policy whose bounds are the other way round is refused by `validate`, but asking it for
/// an interval first (it is public) panicked in `Duration::clamp`: the upper bound wins.
#[test]
fn an_unvalidated_policy_with_reversed_bounds_gives_an_interval_without_panicking() {
    let reversed =
        FollowPolicy::new().interval_bounds(Duration::from_secs(5), Duration::from_secs(1));
    assert_eq!(
        reversed.interval(Duration::from_secs(60)),
        Duration::from_secs(1)
    );
}

/// "No deadline" or "callbacks only" written as `Duration::MAX` passed validation, and the
/// first `follow` then panicked adding it to an instant. Every duration is capped at a year.
#[test]
fn a_policy_with_an_unbounded_duration_is_refused_naming_the_field() {
    let max = Duration::MAX;
    let year = kling_tower::preset::MAX_DURATION;
    let cases = [
        (FollowPolicy::new().deadline(max), "follow.deadline"),
        (
            FollowPolicy::new().callbacks_first(max),
            "follow.callback_interval",
        ),
        (FollowPolicy::new().first_query(max), "follow.first_query"),
        (
            FollowPolicy::new().interval_bounds(max, max),
            "follow.min_interval",
        ),
        (
            FollowPolicy::new().interval_bounds(Duration::from_secs(2), max),
            "follow.max_interval",
        ),
        (
            FollowPolicy::new().error_backoff(max, max),
            "follow.error_backoff",
        ),
        (
            FollowPolicy::new().error_backoff(Duration::from_secs(1), max),
            "follow.max_error_backoff",
        ),
        // The cap holds after the speed factor too: a year at half speed is two.
        (
            FollowPolicy::new().deadline(year).speed(0.5),
            "follow.deadline",
        ),
    ];
    for (policy, field) in cases {
        let err = Follower::new(mock(60, 60), policy.clone()).unwrap_err();
        assert_eq!(err.field(), field, "{policy:?}");
        assert!(err.to_string().contains("at most a year"), "{err}");
    }
    let longest = FollowPolicy::new()
        .deadline(year)
        .error_backoff(year, year)
        .callbacks_first(year);
    longest.validate().unwrap();
}

/// A deadline not above the shortest interval leaves a follow one query, sent as it starts (a
/// shortest interval before the deadline is at or before the task's creation), before the task
/// can have ended: it passed validation, and every such follow ended `DeadlineExceeded`. It is
/// refused naming `follow.deadline` and the bound, in API time, at any speed; just above
/// passes.
#[test]
fn a_deadline_not_above_the_shortest_interval_is_refused_naming_it() {
    let secs = Duration::from_secs;
    let refused = [
        FollowPolicy::new().deadline(Duration::from_millis(1_500)),
        FollowPolicy::new().deadline(secs(2)),
        FollowPolicy::new().deadline(secs(2)).speed(10.0),
        FollowPolicy::new()
            .interval_bounds(secs(60), secs(60))
            .deadline(secs(30)),
        FollowPolicy::new()
            .deadline(secs(1))
            .callbacks_first(secs(120)),
    ];
    for policy in refused {
        let err = Follower::new(mock(60, 60), policy.clone()).unwrap_err();
        assert_eq!(err.field(), "follow.deadline", "{policy:?}");
        let message = err.to_string();
        assert!(message.contains("above min_interval"), "{message}");
    }
    let err = FollowPolicy::new()
        .deadline(secs(2))
        .validate()
        .unwrap_err();
    assert!(err.to_string().contains("(2s)"), "{err}");
    // Just above the shortest interval, and a minute with a minute between queries plus one.
    FollowPolicy::new()
        .deadline(Duration::from_millis(2_001))
        .validate()
        .unwrap();
    FollowPolicy::new()
        .interval_bounds(secs(60), secs(60))
        .deadline(secs(61))
        .validate()
        .unwrap();
}

/// The deadline check holds for the policy that runs, divided by its speed: there a margin of
/// a few nanoseconds rounds away (2 s + 1 ns and 2 s are both 666.666667 ms at speed 3), and
/// such a follow queried once, as the task started, as one with a deadline of 2 s did. It
/// passed validation at that speed; at speed 1, where the margin stays, it passes still, and
/// so does a margin the speed keeps (2 s + 1 ms at speed 1000).
#[test]
fn a_deadline_that_rounds_to_the_shortest_interval_at_its_speed_is_refused() {
    let just_above = Duration::from_secs(2) + Duration::from_nanos(1);
    for speed in [3.0, 30.0, 1000.0] {
        let policy = FollowPolicy::new().deadline(just_above).speed(speed);
        let err = Follower::new(mock(60, 60), policy).unwrap_err();
        assert_eq!(err.field(), "follow.deadline", "speed {speed}");
        let message = err.to_string();
        assert!(message.contains("above min_interval (2s)"), "{message}");
        assert!(message.contains("divided by the speed"), "{message}");
    }
    FollowPolicy::new().deadline(just_above).validate().unwrap();
    FollowPolicy::new()
        .deadline(Duration::from_millis(2_001))
        .speed(1000.0)
        .validate()
        .unwrap();
}

/// A last query slack beyond a year is refused, naming it, as every other duration is.
#[test]
fn a_last_query_slack_beyond_a_year_is_refused_naming_it() {
    let year = kling_tower::preset::MAX_DURATION;
    for slack in [Duration::MAX, year + Duration::from_secs(1)] {
        let policy = FollowPolicy::new().last_query_slack(slack);
        let err = Follower::new(mock(60, 60), policy).unwrap_err();
        assert_eq!(err.field(), "follow.last_query_slack");
        assert!(err.to_string().contains("at most a year"), "{err}");
    }
    // Below the safety interval, the bound with callbacks (which a year-long slack must be
    // under).
    FollowPolicy::new()
        .deadline(year)
        .callbacks_first(year)
        .last_query_slack(year - Duration::from_secs(1))
        .validate()
        .unwrap();
}

/// A last query slack at or above the longest interval (which applies at the last query's age
/// with the default 30-minute deadline; the safety interval with `callbacks_first`) is refused,
/// naming it and the bound: an answer always comes within that before the last query and
/// stands for it, so such a slack dropped almost every last query.
/// Just below it (and any slack under the safety interval with callbacks, whatever the longest
/// interval) passes.
#[test]
fn a_last_query_slack_not_below_the_longest_interval_is_refused_naming_the_bound() {
    let secs = Duration::from_secs;
    let refused = [
        (
            FollowPolicy::new().last_query_slack(secs(30)),
            "max_interval",
        ),
        (
            FollowPolicy::new()
                .interval_bounds(secs(2), secs(10))
                .last_query_slack(secs(25)),
            "max_interval",
        ),
        (
            FollowPolicy::new().last_query_slack(secs(30)).speed(4.0),
            "max_interval",
        ),
        (
            FollowPolicy::new()
                .callbacks_first(secs(20))
                .last_query_slack(secs(20)),
            "callback_interval",
        ),
    ];
    for (policy, bound) in refused {
        let err = Follower::new(mock(60, 60), policy.clone()).unwrap_err();
        assert_eq!(err.field(), "follow.last_query_slack", "{policy:?}");
        assert!(err.to_string().contains(bound), "{err}");
    }
    let accepted = [
        FollowPolicy::new().last_query_slack(secs(29)),
        FollowPolicy::new()
            .callbacks_first(secs(60))
            .last_query_slack(secs(40)),
    ];
    for policy in accepted {
        policy.validate().unwrap();
    }
}

/// The bound is the longest a last answer can come before the last query: the interval at the
/// age whose next query falls at the last query, not `max_interval`, nor the interval at the
/// last query's own age. With a 60 s deadline (age factor 0.2, last query at 58 s) that is the
/// interval at 48.33 s, 9.67 s: every answer that leaves the last query to come does so from
/// within 9.67 s of it, so a 10 s slack (passed against 11.6 s, the interval at 58 s) dropped
/// every last query, and a 25 s one (passed against `max_interval`) too; a small age factor or
/// `min_interval` bound it alike. The error names the field and the bound, in API time (the
/// speed factor changes neither). Just below it passes.
#[test]
fn a_last_query_slack_not_below_the_longest_gap_before_the_last_query_is_refused() {
    let secs = Duration::from_secs;
    let short = FollowPolicy::new().deadline(secs(60));
    let bound = "9.666666667s";
    let refused = [
        (short.clone().last_query_slack(secs(25)), bound),
        (short.clone().last_query_slack(secs(10)), bound),
        (short.clone().last_query_slack(secs(10)).speed(4.0), bound),
        (
            FollowPolicy::new()
                .age_factor(0.001)
                .last_query_slack(secs(3)),
            "2s",
        ),
    ];
    for (policy, bound) in refused {
        let err = Follower::new(mock(60, 60), policy.clone()).unwrap_err();
        assert_eq!(err.field(), "follow.last_query_slack", "{policy:?}");
        let message = err.to_string();
        assert!(message.contains(&format!("below {bound}")), "{message}");
    }
    short
        .last_query_slack(Duration::from_millis(9_600))
        .validate()
        .unwrap();
}

/// The bound is what the follow does: tasks followed from ages 40 s to 58 s (every 0.1 s, a
/// call each, 60 s deadline, a 9.6 s slack just below the 9.67 s bound) have their last answer
/// before the last query within 9.67 s of it, and those answered more than the slack before it
/// (followed from 48.34 s to 48.4 s of age) are still asked at 58 s: a slack under the bound
/// keeps some last queries.
#[tokio::test(start_paused = true)]
async fn the_last_answer_before_the_last_query_comes_within_the_slack_bound() {
    let start = Instant::now();
    let (asked, note) = each_id_asked();
    let service = reporting_processing(start, true, note);
    let policy = FollowPolicy::new()
        .deadline(Duration::from_secs(60))
        .last_query_slack(Duration::from_millis(9_600));
    // A follower each: no task rides in another's batch.
    let mut calls = Vec::new();
    for tenth in 400..580u64 {
        let one = follower(service.clone(), policy.clone());
        let age = Duration::from_millis(tenth * 100);
        let task = TaskRef::new_style(format!("t{tenth}")).created_at(start - age);
        calls.push(tokio::spawn(async move { one.follow(task).await }));
    }
    for call in calls {
        let result = call.await.unwrap();
        assert_ran_out(&result);
    }
    let bound = 58.0 * 0.2 / 1.2;
    let mut kept = Vec::new();
    for (id, times) in asked.lock().unwrap().iter() {
        let age_at = |at: &Duration| {
            let followed_at: f64 = id[1..].parse::<f64>().unwrap() / 10.0;
            followed_at + at.as_secs_f64()
        };
        let ages: Vec<f64> = times.iter().map(age_at).collect();
        let before_last = match ages[..] {
            [.., before, last] if (last - 58.0).abs() < 0.01 => {
                kept.push(id.clone());
                before
            }
            [.., last] => last,
            [] => unreachable!(),
        };
        assert!(58.0 - before_last < bound, "{id}: {ages:?}");
    }
    kept.sort();
    assert!(!kept.is_empty() && kept.len() < 10, "{kept:?}");
}

/// With `callbacks_first`, a safety interval below `min_interval` is refused naming it and
/// the bound: the safety net would poll more often than polling itself may, against the
/// shortest interval that keeps a task's queries apart. At the bound (or with a lower
/// `min_interval`) it passes, at any speed.
#[test]
fn a_safety_interval_below_the_shortest_interval_is_refused_naming_the_bound() {
    let ms = Duration::from_millis;
    for policy in [
        FollowPolicy::new().callbacks_first(ms(1_999)),
        FollowPolicy::new().callbacks_first(ms(500)).speed(4.0),
        FollowPolicy::new()
            .interval_bounds(ms(5_000), ms(30_000))
            .callbacks_first(ms(4_000)),
    ] {
        let err = Follower::new(mock(60, 60), policy.clone()).unwrap_err();
        assert_eq!(err.field(), "follow.callback_interval", "{policy:?}");
        assert!(err.to_string().contains("at least min_interval"), "{err}");
    }
    let err = FollowPolicy::new()
        .callbacks_first(ms(1_000))
        .validate()
        .unwrap_err();
    assert!(err.to_string().contains("(2s)"), "{err}");
    for policy in [
        FollowPolicy::new().callbacks_first(ms(2_000)),
        FollowPolicy::new()
            .interval_bounds(ms(500), ms(30_000))
            .callbacks_first(ms(1_000))
            .speed(4.0),
    ] {
        policy.validate().unwrap();
    }
}

/// A year is the longest policy: following with it works, and a task's creation time far in
/// the future (an instant whose sum with the first wait does not exist) does not panic either.
#[tokio::test(start_paused = true)]
async fn the_longest_policy_and_the_latest_creation_time_follow_without_panicking() {
    let year = kling_tower::preset::MAX_DURATION;
    let mock = mock(60, 60);
    let service = ClassifyLayer::new().layer(mock.clone());
    let task = create(&service, "/text-to-video/kling-3.0").await;
    let other_task = create(&service, "/text-to-video/kling-3.0").await;
    let other = other_task.clone();
    let follower = follower(
        service,
        FollowPolicy::new().deadline(year).callbacks_first(year),
    );
    let mut report = task.clone();
    report.status = TaskStatus::Succeeded;

    // The latest instant there is, to a second.
    let mut latest = Instant::now();
    let mut step = Duration::from_secs(u64::MAX / 2);
    while step >= Duration::from_secs(1) {
        match latest.checked_add(step) {
            Some(later) => latest = later,
            None => step /= 2,
        }
    }
    assert!(latest.checked_add(year).is_none());
    let late = TaskRef::from_report("/text-to-video/kling-3.0", &task).created_at(latest);

    follower.deliver(report.clone());
    let done = follower.follow(late).await.unwrap();
    assert_eq!(done.status, TaskStatus::Succeeded);

    // Another task (the first one's report stays on the board a year, the first wait).
    let mut report = other;
    report.status = TaskStatus::Succeeded;
    let delivering = follower.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(61)).await;
        delivering.deliver(report);
    });
    let start = Instant::now();
    let done = follower
        .follow(TaskRef::from_report(
            "/text-to-video/kling-3.0",
            &other_task,
        ))
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Succeeded);
    assert_eq!(start.elapsed(), Duration::from_secs(61));
}

#[tokio::test(start_paused = true)]
async fn follows_a_legacy_task_until_it_succeeds() {
    let mock = mock(60, 120);
    let service = ClassifyLayer::new().layer(mock.clone());
    let task = create(&service, "/v1/videos/text2video").await;
    let start = Instant::now();
    let done = follower(service, FollowPolicy::new())
        .follow(TaskRef::from_report("/v1/videos/text2video", &task))
        .await
        .unwrap();
    assert_eq!(done.id, task.id);
    assert_eq!(done.status, TaskStatus::Succeeded);
    assert!(!done.urls.is_empty());
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(60) && took <= Duration::from_secs(150),
        "{took:?}"
    );
    let queries = mock.stats().requests_total - 1;
    // 5 s, then age × 0.2 between 2 s and 30 s: a handful of queries, not one a second.
    assert!((3..=15).contains(&queries), "{queries} queries");
}

#[tokio::test(start_paused = true)]
async fn many_new_style_tasks_are_followed_with_batch_queries() {
    let mock = mock(60, 300);
    let classify = ClassifyLayer::new().layer(mock.clone());
    let tasks = create_new_style(&classify, 5).await;
    let (service, uris) = logging_uris(classify);
    let results = follower(service, FollowPolicy::new().batch_size(3))
        .follow_many(tasks.clone())
        .await;
    assert_eq!(results.len(), tasks.len(), "one result per task");
    for (task, result) in tasks.iter().zip(&results) {
        let report = result.as_ref().unwrap();
        assert_eq!(report.id, task.id());
        assert_eq!(report.status, TaskStatus::Succeeded);
    }
    let uris = uris.lock().unwrap();
    assert!(
        uris.iter().all(|u| u.starts_with("/tasks?task_ids=")),
        "{uris:?}"
    );
    // The first round asks about all five in two batches (3 + 2).
    assert_eq!(uris[0].matches(',').count(), 2, "{uris:?}");
    assert_eq!(uris[1].matches(',').count(), 1, "{uris:?}");
    // Far fewer queries than five tasks queried one by one would need.
    assert!(uris.len() <= 40, "{} queries", uris.len());
}

#[tokio::test(start_paused = true)]
async fn a_task_that_outlives_its_deadline_fails_with_its_last_status() {
    let mock = mock(3600, 3600);
    let service = ClassifyLayer::new().layer(mock);
    let task = create(&service, "/v1/videos/text2video").await;
    let start = Instant::now();
    let err = follower(
        service,
        FollowPolicy::new().deadline(Duration::from_secs(600)),
    )
    .follow(TaskRef::from_report("/v1/videos/text2video", &task))
    .await
    .unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(600));
    match err {
        FollowError::DeadlineExceeded { last_status, .. } => {
            assert_eq!(last_status.as_deref(), Some("processing"));
        }
        other => panic!("{other}"),
    }
}

/// A query the layers below hold past the deadline (a rate wait, a retry's backoff: here an
/// answer that takes ten minutes) does not keep the follow going: it ends at its deadline.
#[tokio::test(start_paused = true)]
async fn a_query_still_unanswered_at_the_deadline_ends_the_follow_on_time() {
    let slow = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_secs(600)).await;
        let body = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t1","task_status":"processing"}}"#;
        Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from_static(
            body.as_bytes(),
        ))))
    });
    let start = Instant::now();
    let err = follower(slow, FollowPolicy::new().deadline(Duration::from_secs(60)))
        .follow(TaskRef::new_style("t1"))
        .await
        .unwrap_err();
    assert!(matches!(err, FollowError::DeadlineExceeded { .. }), "{err}");
    assert_eq!(start.elapsed(), Duration::from_secs(60));
}

/// `kling.follow_policy()` is already at the stack's speed; a duration set on it afterwards is
/// API time like any other (it was taken as real time: at speed 10, a 600 s deadline lasted
/// 600 s, ten times the API time asked for), and a second `speed` replaces the first rather
/// than dividing again.
#[tokio::test(start_paused = true)]
async fn durations_set_after_the_speed_factor_are_api_time_too() {
    let secs = Duration::from_secs;
    let set = |p: FollowPolicy| {
        p.interval_bounds(secs(4), secs(40))
            .error_backoff(secs(2), secs(20))
    };
    assert_eq!(
        set(FollowPolicy::new()).speed(10.0),
        set(FollowPolicy::new().speed(10.0))
    );
    let after = set(FollowPolicy::new().speed(10.0));
    assert_eq!(after.interval(Duration::ZERO), Duration::from_millis(400));
    assert_eq!(after.interval(secs(3600)), secs(4));
    assert_eq!(after.backoff(1), Duration::from_millis(200));
    assert_eq!(after.backoff(30), secs(2));
    let twice = FollowPolicy::new().speed(10.0).speed(10.0);
    assert_eq!(
        twice.interval(secs(3600)),
        secs(3),
        "30 s at 10x, not at 100x"
    );

    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Pro).speed(10.0),
        Credentials::api_key("key").unwrap(),
    )
    .unwrap();
    let running = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
        let body = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t1","task_status":"processing"}}"#;
        Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from_static(
            body.as_bytes(),
        ))))
    });
    let policy = kling.follow_policy().deadline(secs(600));
    let start = Instant::now();
    let err = Follower::new(running, policy)
        .unwrap()
        .follow(TaskRef::legacy("/v1/videos/text2video", "t1"))
        .await
        .unwrap_err();
    let FollowError::DeadlineExceeded { deadline, .. } = err else {
        panic!("{err}")
    };
    assert_eq!((start.elapsed(), deadline), (secs(60), secs(60)));
}

#[tokio::test(start_paused = true)]
async fn an_unknown_task_fails_with_the_api_error() {
    let service = ClassifyLayer::new().layer(mock(60, 60));
    let err = follower(service, FollowPolicy::new())
        .follow(TaskRef::legacy("/v1/videos/text2video", "nope"))
        .await
        .unwrap_err();
    match &err {
        FollowError::Api { error, task_id } => {
            assert_eq!(error.code(), Code::NotFound);
            assert_eq!(task_id, "nope");
        }
        other => panic!("{other}"),
    }
    let invalid = follower(
        ClassifyLayer::new().layer(mock(60, 60)),
        FollowPolicy::new(),
    )
    .follow(TaskRef::new_style("a,b"))
    .await
    .unwrap_err();
    assert!(
        matches!(invalid, FollowError::InvalidTask { .. }),
        "{invalid}"
    );
}

#[tokio::test(start_paused = true)]
async fn failed_queries_back_off_and_following_goes_on() {
    let mock = mock(30, 30);
    let classify = ClassifyLayer::new().layer(mock.clone());
    let task = create(&classify, "/v1/videos/text2video").await;
    // The first three queries fail in transport.
    let failures = Arc::new(AtomicUsize::new(3));
    let start = Instant::now();
    let at: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let log = at.clone();
    let service = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let classify = classify.clone();
        let failures = failures.clone();
        log.lock().unwrap().push(start.elapsed());
        async move {
            if failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err::<http::Response<Full<Bytes>>, BoxError>("connection reset".into());
            }
            classify.oneshot(req).await
        }
    });
    let done = follower(service, FollowPolicy::new())
        .follow(TaskRef::from_report("/v1/videos/text2video", &task))
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Succeeded);
    // Queries at 5 s (fails), 6 s (fails), 8 s (fails), 12 s: the backoff doubled.
    let at = at.lock().unwrap();
    let secs: Vec<u64> = at.iter().take(4).map(Duration::as_secs).collect();
    assert_eq!(secs, vec![5, 6, 8, 12]);
    assert!(start.elapsed() >= Duration::from_secs(30));
    assert_eq!(mock.stats().requests_total, 1 + at.len() as u64 - 3);
}

#[tokio::test(start_paused = true)]
async fn with_callbacks_first_a_delivered_report_ends_the_wait_without_queries() {
    let mock = mock(60, 60);
    let service = ClassifyLayer::new().layer(mock.clone());
    let task = create(&service, "/text-to-video/kling-3.0").await;
    let follower = follower(
        service,
        FollowPolicy::new().callbacks_first(Duration::from_secs(600)),
    );
    let delivering = follower.clone();
    let mut report = task.clone();
    report.status = TaskStatus::Succeeded;
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(61)).await;
        delivering.deliver(report);
    });
    let start = Instant::now();
    let done = follower
        .follow(TaskRef::from_report("/text-to-video/kling-3.0", &task))
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Succeeded);
    assert_eq!(start.elapsed(), Duration::from_secs(61));
    assert_eq!(mock.stats().requests_total, 1, "only the create");
}

/// Follows `task` through the Pro stack over `mock`, with `credentials`: the error, and how long
/// following took.
async fn follow_through_the_stack(
    mock: &MockKling,
    credentials: Credentials,
    task: TaskRef,
) -> (Result<TaskReport, FollowError>, Duration) {
    let kling = KlingLayer::new(StackConfig::preset(Tier::Pro), credentials).unwrap();
    let service = kling.layer(mock.clone());
    let follower = kling.follower(service, kling.follow_policy()).unwrap();
    let start = Instant::now();
    let result = follower.follow(task).await;
    (result, start.elapsed())
}

#[tokio::test(start_paused = true)]
async fn through_the_stack_an_answer_no_retry_can_change_ends_following_at_once() {
    let mock = MockKling::new(
        MockConfig::preset(Preset::Pro)
            .api_key("key")
            .access_key("ak", "sk")
            .task_duration(Duration::from_secs(600), Duration::from_secs(600)),
    )
    .unwrap();
    let key = || Credentials::api_key("key").unwrap();
    let expect_api = |(result, took): (Result<TaskReport, FollowError>, Duration), code| {
        match result {
            Err(FollowError::Api { error, .. }) => assert_eq!(error.code(), code),
            other => panic!("{code:?}: {other:?}"),
        }
        // The first query, 5 s after following starts, is the only one.
        assert_eq!(took, Duration::from_secs(5), "{code:?}");
    };

    // 1203: a task the account does not have.
    let unknown = TaskRef::legacy("/v1/videos/text2video", "nope");
    expect_api(
        follow_through_the_stack(&mock, key(), unknown.clone()).await,
        Code::NotFound,
    );

    // 1000: a token signed with the wrong secret.
    let wrong = Credentials::access_key("ak", "not-the-secret").unwrap();
    expect_api(
        follow_through_the_stack(&mock, wrong, unknown).await,
        Code::AuthFailed,
    );

    // 1101: a running task of an account that has fallen into arrears.
    let mut create = request("POST", "/v1/videos/text2video", r#"{"prompt":"a cat"}"#);
    create
        .headers_mut()
        .insert("authorization", "Bearer key".parse().unwrap());
    let created = ClassifyLayer::new()
        .layer(mock.clone())
        .oneshot(create)
        .await;
    let task = Outcome::of(&created.unwrap())
        .unwrap()
        .task()
        .unwrap()
        .clone();
    mock.set_switches(Switches::new().arrears(true));
    let queries = mock.stats().requests_total;
    expect_api(
        follow_through_the_stack(
            &mock,
            key(),
            TaskRef::from_report("/v1/videos/text2video", &task),
        )
        .await,
        Code::AccountInArrears,
    );
    assert_eq!(mock.stats().requests_total, queries + 1, "one query");
}

#[tokio::test(start_paused = true)]
async fn through_the_stack_queries_the_retry_layer_gave_up_on_back_off_until_the_deadline() {
    // Every answer is a 5xx: the retry layer gives up on each query, and the follower keeps
    // trying until the task's deadline instead of failing at the first.
    let mock = MockKling::new(
        MockConfig::preset(Preset::Pro)
            .api_key("key")
            .fault_rate(1.0)
            .seed(7),
    )
    .unwrap();
    let kling = KlingLayer::builder(
        StackConfig::preset(Tier::Pro),
        Credentials::api_key("key").unwrap(),
    )
    .seed(7)
    .build()
    .unwrap();
    // When each of the follower's queries entered the stack and when its answer (here, the
    // retry layer's giving up) came back; the retry layer's own attempts are below, not here.
    let start = Instant::now();
    let queries: Arc<Mutex<Vec<(Duration, Duration)>>> = Arc::default();
    let log = queries.clone();
    let stack = kling.layer(mock.clone());
    let service = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let (stack, log) = (stack.clone(), log.clone());
        async move {
            let began = start.elapsed();
            let answer = stack.oneshot(req).await;
            log.lock().unwrap().push((began, start.elapsed()));
            answer
        }
    });
    let deadline = Duration::from_secs(600);
    let policy = kling.follow_policy().deadline(deadline);
    let follower = kling.follower(service, policy.clone()).unwrap();
    let err = follower
        .follow(TaskRef::legacy("/v1/videos/text2video", "t-1"))
        .await
        .unwrap_err();
    assert!(matches!(err, FollowError::DeadlineExceeded { .. }), "{err}");
    let queries = queries.lock().unwrap();
    // Enough queries for the backoff to reach its 60 s cap (the 7th wait).
    assert!(queries.len() > 8, "it kept querying: {queries:?}");
    assert!(
        mock.stats().requests_total > queries.len() as u64,
        "the retry layer retried each query"
    );
    // Between one query's end and the next, the follower waited its error backoff: 1 s, 2 s,
    // 4 s ... up to 60 s (time is paused: exact).
    for (n, pair) in queries.windows(2).enumerate() {
        let waited = pair[1].0 - pair[0].1;
        assert_eq!(waited, policy.backoff(n as u32 + 1), "{queries:?}");
    }
    assert_eq!(policy.backoff(7), Duration::from_secs(60));
    assert_eq!(policy.backoff(8), Duration::from_secs(60));
    // It gave up at the deadline exactly, not before and not after (a query still in flight
    // then is dropped): the last query began before it.
    let (last_began, _) = *queries.last().unwrap();
    assert!(last_began < deadline, "{queries:?}");
    assert_eq!(start.elapsed(), deadline, "{queries:?}");
}

/// Twelve new-style tasks, each followed by a call of its own: on clones of one follower
/// (`share`) or on a follower each. The queries the service saw; every follow must end with
/// its task succeeded.
async fn follow_twelve_apart(share: bool) -> Vec<String> {
    let mock = MockKling::new(
        MockConfig::preset(Preset::Pro)
            .no_rate_limit()
            .slots(12)
            .task_duration(Duration::from_secs(60), Duration::from_secs(300)),
    )
    .unwrap();
    let classify = ClassifyLayer::new().layer(mock.clone());
    let tasks = create_new_style(&classify, 12).await;
    let (service, uris) = logging_uris(classify);
    let one = follower(service.clone(), FollowPolicy::new());
    let follows: Vec<_> = tasks
        .into_iter()
        .map(|task| {
            let follower = if share {
                one.clone()
            } else {
                follower(service.clone(), FollowPolicy::new())
            };
            tokio::spawn(async move { (task.id().to_owned(), follower.follow(task).await) })
        })
        .collect();
    for follow in follows {
        let (id, result) = follow.await.unwrap();
        let report = result.unwrap();
        assert_eq!(report.id, id);
        assert_eq!(report.status, TaskStatus::Succeeded);
    }
    let uris = uris.lock().unwrap().clone();
    assert!(
        uris.iter().all(|u| u.starts_with("/tasks?task_ids=")),
        "{uris:?}"
    );
    uris
}

#[tokio::test(start_paused = true)]
async fn separate_follow_calls_of_one_follower_share_batch_queries() {
    let shared = follow_twelve_apart(true).await;
    // Control: a follower of its own for each call, so no call's query carries another's task.
    let apart = follow_twelve_apart(false).await;
    // The first round asks about all twelve at once.
    assert_eq!(shared[0].matches(',').count(), 11, "{shared:?}");
    assert!(
        shared.len() * 4 <= apart.len(),
        "{} queries shared against {} apart",
        shared.len(),
        apart.len()
    );
}

/// The call sending a batch for everyone is dropped while its query hangs: another call
/// sends the next batch, and its task is followed to the end.
#[tokio::test(start_paused = true)]
async fn a_call_dropped_while_sending_the_batch_leaves_the_next_to_another() {
    let classify = ClassifyLayer::new().layer(mock(60, 60));
    let a = create(&classify, "/text-to-video/kling-3.0").await;
    let b = create(&classify, "/text-to-video/kling-3.0").await;
    let one = follower(first_query_hangs(classify), FollowPolicy::new());
    let start = Instant::now();
    let sender = tokio::spawn({
        let one = one.clone();
        async move { one.follow(TaskRef::new_style(a.id)).await }
    });
    // `a`'s first query goes out at 5 s, for `a` alone, and hangs.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let waiter = tokio::spawn(async move { one.follow(TaskRef::new_style(b.id)).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    sender.abort();
    let done = waiter.await.unwrap().unwrap();
    assert_eq!(done.status, TaskStatus::Succeeded);
    assert!(
        start.elapsed() < Duration::from_secs(120),
        "{:?}",
        start.elapsed()
    );
}

/// A clone sent as another account asks about its own tasks only: a batch carries one
/// account's tasks.
#[tokio::test(start_paused = true)]
async fn clones_of_other_accounts_send_batches_of_their_own() {
    let classify = ClassifyLayer::new().layer(mock(60, 60));
    let a = create(&classify, "/text-to-video/kling-3.0").await;
    let b = create(&classify, "/text-to-video/kling-3.0").await;
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let log = seen.clone();
    let service = ServiceBuilder::new()
        .map_request(move |req: http::Request<Full<Bytes>>| {
            let account = AccountId::of(&req).map(|a| a.as_str().to_owned());
            log.lock()
                .unwrap()
                .push((account.unwrap_or_default(), req.uri().to_string()));
            req
        })
        .service(classify);
    let base = follower(service, FollowPolicy::new());
    let (first, second) = (
        base.clone().with_account(AccountId::new("first")),
        base.with_account(AccountId::new("second")),
    );
    let (done_a, done_b) = tokio::join!(
        first.follow(TaskRef::new_style(a.id.clone())),
        second.follow(TaskRef::new_style(b.id.clone())),
    );
    assert_eq!(done_a.unwrap().status, TaskStatus::Succeeded);
    assert_eq!(done_b.unwrap().status, TaskStatus::Succeeded);
    let seen = seen.lock().unwrap();
    assert!(!seen.is_empty());
    for (account, uri) in seen.iter() {
        let expected = if account == "first" { &a.id } else { &b.id };
        assert_eq!(uri, &format!("/tasks?task_ids={expected}"), "{seen:?}");
    }
}

/// A service whose first query never answers; the rest go to `classify`.
fn first_query_hangs(
    classify: Classify<MockKling>,
) -> impl tower::Service<
    http::Request<Full<Bytes>>,
    Response = http::Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Send,
> + Clone {
    let first = Arc::new(AtomicUsize::new(0));
    tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let classify = classify.clone();
        let n = first.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                std::future::pending::<()>().await;
            }
            classify.oneshot(req).await
        }
    })
}

/// The call sending a batch for everyone is kept but its query hangs: the other call's task
/// waits for that answer only four times the policy's longest interval (120 s), then is asked
/// about again, and its follow ends then, not at its deadline.
#[tokio::test(start_paused = true)]
async fn a_batch_query_that_hangs_holds_other_calls_up_for_four_longest_intervals_at_most() {
    let classify = ClassifyLayer::new().layer(mock(60, 60));
    let a = create(&classify, "/text-to-video/kling-3.0").await;
    let b = create(&classify, "/text-to-video/kling-3.0").await;
    let one = follower(first_query_hangs(classify), FollowPolicy::new());
    let start = Instant::now();
    let (sender, waiter) = (one.clone(), one);
    let hung = tokio::spawn(async move { sender.follow(TaskRef::new_style(a.id)).await });
    tokio::task::yield_now().await;
    let done = waiter
        .follow(TaskRef::new_style(b.id))
        .await
        .expect("followed to its end");
    assert_eq!(done.status, TaskStatus::Succeeded);
    // The task ends at 60 s; the next query about it, after the 120 s takeover, at 125 s.
    assert!(
        start.elapsed() < Duration::from_secs(130),
        "{:?}",
        start.elapsed()
    );
    hung.abort();
}

/// A call whose own task's deadline comes first ends at it, even while it is sending a batch
/// query that also asks about another call's task with a later deadline.
#[tokio::test(start_paused = true)]
async fn a_sending_call_ends_at_its_own_deadline() {
    let classify = ClassifyLayer::new().layer(mock(3600, 3600));
    let a = create(&classify, "/text-to-video/kling-3.0").await;
    let b = create(&classify, "/text-to-video/kling-3.0").await;
    let policy = FollowPolicy::new().deadline(Duration::from_secs(60));
    let one = follower(first_query_hangs(classify), policy);
    let start = Instant::now();
    // `b`, 56 s from its deadline, is due in 1 s; `a` is due at once, 5 s from its deadline,
    // and its call asks about both (`b` is due soon), in a query that hangs.
    let b = TaskRef::new_style(b.id).created_at(start - Duration::from_secs(4));
    let a = TaskRef::new_style(a.id).created_at(start - Duration::from_secs(55));
    let other = one.clone();
    let waiting = tokio::spawn(async move { other.follow(b).await });
    tokio::task::yield_now().await;
    let sending = tokio::spawn(async move { (one.follow(a).await, Instant::now()) });
    let (result, ended) = sending.await.unwrap();
    let err = result.unwrap_err();
    assert!(matches!(err, FollowError::DeadlineExceeded { .. }), "{err}");
    assert_eq!(ended - start, Duration::from_secs(5));
    waiting.abort();
}

/// An unknown id followed beside other calls' tasks still ends with Kling's `1203` at once: a
/// batch answer that leaves it out has it asked about alone.
#[tokio::test(start_paused = true)]
async fn an_unknown_id_in_a_shared_batch_still_ends_with_1203() {
    let classify = ClassifyLayer::new().layer(mock(3600, 3600));
    let known = create(&classify, "/text-to-video/kling-3.0").await;
    let one = follower(classify, FollowPolicy::new());
    let start = Instant::now();
    let other = one.clone();
    let running = tokio::spawn(async move { other.follow(TaskRef::new_style(known.id)).await });
    tokio::task::yield_now().await;
    let err = one
        .follow(TaskRef::new_style("nosuchtask"))
        .await
        .unwrap_err();
    match &err {
        FollowError::Api { error, task_id } => {
            assert_eq!(error.code(), Code::NotFound);
            assert_eq!(task_id, "nosuchtask");
        }
        other => panic!("{other}"),
    }
    assert!(
        start.elapsed() <= Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    running.abort();
}

/// The sending call's own query hangs. Another call takes the batch over after the takeover
/// time and its answer reports the sender's task still running: the sender stops waiting on
/// its hung query and asks again, and follows its task to the end.
#[tokio::test(start_paused = true)]
async fn a_sending_call_whose_query_hangs_asks_again_once_another_call_has_answered() {
    let classify = ClassifyLayer::new().layer(mock(200, 200));
    let start = Instant::now();
    let b = create(&classify, "/text-to-video/kling-3.0").await; // ends at 200 s
    tokio::time::sleep(Duration::from_secs(140)).await;
    let a = create(&classify, "/text-to-video/kling-3.0").await; // ends at 340 s
    let one = follower(first_query_hangs(classify), FollowPolicy::new());
    let sender = one.clone();
    // `a`'s call asks first (at 145 s), about `b` too (due at 146 s), and that query hangs.
    let sending = tokio::spawn(async move {
        (
            sender.follow(TaskRef::new_style(a.id)).await,
            Instant::now(),
        )
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let waiting = tokio::spawn(async move { one.follow(TaskRef::new_style(b.id)).await });
    // At 265 s the other call takes over: `b` has ended, `a` runs on.
    assert_eq!(
        waiting.await.unwrap().unwrap().status,
        TaskStatus::Succeeded
    );
    let (result, ended) = sending.await.unwrap();
    assert_eq!(result.unwrap().status, TaskStatus::Succeeded);
    assert!(
        ended - start < Duration::from_secs(400),
        "{:?}",
        ended - start
    );
}

/// A batch Kling refuses with `1203` (one id in it is unknown) has each of its tasks asked
/// about alone; a task an answer then reports rides in batches again.
#[tokio::test(start_paused = true)]
async fn tasks_asked_about_alone_ride_in_batches_again_once_reported() {
    let classify = ClassifyLayer::new().layer(mock(120, 120));
    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(create(&classify, "/text-to-video/kling-3.0").await);
    }
    let uris: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = uris.clone();
    let service = ServiceBuilder::new()
        .map_request(move |mut req: http::Request<Full<Bytes>>| {
            let uri = req.uri().to_string();
            // As Kling may: a batch with an unknown id is refused whole with `1203`.
            if uri.contains(',') && uri.contains("nosuchtask") {
                *req.uri_mut() = "/tasks?task_ids=nosuchtask".parse().unwrap();
            }
            log.lock().unwrap().push(uri);
            req
        })
        .service(classify);
    let one = follower(service, FollowPolicy::new());
    let follows: Vec<_> = tasks
        .into_iter()
        .map(|task| {
            let follower = one.clone();
            tokio::spawn(async move { follower.follow(TaskRef::new_style(task.id)).await })
        })
        .collect();
    let err = one
        .follow(TaskRef::new_style("nosuchtask"))
        .await
        .unwrap_err();
    assert!(matches!(err, FollowError::Api { .. }), "{err}");
    for follow in follows {
        assert_eq!(follow.await.unwrap().unwrap().status, TaskStatus::Succeeded);
    }
    let uris = uris.lock().unwrap();
    let refused = uris
        .iter()
        .position(|u| u.contains("nosuchtask"))
        .expect("the batch with the unknown id");
    assert!(
        uris[refused + 1..]
            .iter()
            .any(|u| u.matches(',').count() == 2),
        "the three known tasks share a batch again: {uris:?}"
    );
}

/// An answer to a shared batch with an undocumented code (final, by kling-core's reading) does
/// not fail every task of every call in it: each is asked about alone, as after a `1203`.
#[tokio::test(start_paused = true)]
async fn an_odd_final_answer_to_a_batch_has_each_task_asked_about_alone() {
    let classify = ClassifyLayer::new().layer(mock(60, 60));
    let tasks = create_new_style(&classify, 2).await;
    let batches = Arc::new(AtomicUsize::new(0));
    let count = batches.clone();
    let service = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let classify = classify.clone();
        let count = count.clone();
        async move {
            if req.uri().to_string().contains(',') && count.fetch_add(1, Ordering::SeqCst) == 0 {
                let odd = r#"{"code":9999,"message":"odd","request_id":"r"}"#;
                return Ok(crate::support::envelope(200, odd));
            }
            classify.oneshot(req).await
        }
    });
    let results = follower(service, FollowPolicy::new())
        .follow_many(tasks)
        .await;
    assert!(batches.load(Ordering::SeqCst) >= 1, "a batch was asked");
    for result in results {
        assert_eq!(result.unwrap().status, TaskStatus::Succeeded);
    }
}

/// Counts the polls of the future it wraps.
struct Counted<F> {
    future: std::pin::Pin<Box<F>>,
    polls: Arc<AtomicUsize>,
}

impl<F: std::future::Future> std::future::Future for Counted<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.polls.fetch_add(1, Ordering::Relaxed);
        self.future.as_mut().poll(cx)
    }
}

/// Many calls of one follower, one task each, over queries that take 50–300 ms: an answer
/// wakes the calls whose tasks it asked about (at most a batch, 50), not every call. Waking all
/// of them, as before, polled 400 such calls 62,620 times over 158 queries (396 a query, one
/// per call); now it is some 95 a query, whatever the number of calls.
#[tokio::test(start_paused = true)]
async fn a_batch_answer_wakes_only_the_calls_it_concerns() {
    let n = 400;
    let classify = ClassifyLayer::new().layer(
        MockKling::new(
            MockConfig::preset(Preset::Pro)
                .no_rate_limit()
                .slots(n)
                .task_duration(Duration::from_secs(60), Duration::from_secs(300)),
        )
        .unwrap(),
    );
    let tasks = create_new_style(&classify, n as usize).await;
    let sent = Arc::new(AtomicUsize::new(0));
    let count = sent.clone();
    let slow = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let classify = classify.clone();
        let k = count.fetch_add(1, Ordering::Relaxed) as u64;
        async move {
            tokio::time::sleep(Duration::from_millis(50 + (k * 37) % 250)).await;
            classify.oneshot(req).await
        }
    });
    let one = follower(slow, FollowPolicy::new());
    let polls = Arc::new(AtomicUsize::new(0));
    let follows: Vec<_> = tasks
        .into_iter()
        .map(|task| {
            let follower = one.clone();
            tokio::spawn(Counted {
                future: Box::pin(async move { follower.follow(task).await }),
                polls: polls.clone(),
            })
        })
        .collect();
    for follow in follows {
        assert_eq!(follow.await.unwrap().unwrap().status, TaskStatus::Succeeded);
    }
    let (polls, queries) = (polls.load(Ordering::Relaxed), sent.load(Ordering::Relaxed));
    assert!(
        polls < 150 * queries,
        "{polls} polls of {n} calls over {queries} queries"
    );
}

#[test]
fn a_batch_size_beyond_what_kling_takes_is_refused() {
    for size in [0, 501] {
        let err = Follower::new(mock(60, 60), FollowPolicy::new().batch_size(size)).unwrap_err();
        assert_eq!(err.field(), "follow.batch_size");
    }
    assert!(
        Follower::new(
            mock(60, 60),
            FollowPolicy::new().batch_size(kling_tower::follow::MAX_BATCH_SIZE)
        )
        .is_ok()
    );
}

/// Two calls follow one task, relying on callbacks: a report delivered once ends both at once
/// (the board gives a report out once, so the second used to wait for its safety query).
#[tokio::test(start_paused = true)]
async fn a_delivered_report_ends_every_call_following_that_task() {
    let classify = ClassifyLayer::new().layer(mock(3600, 3600));
    let task = create(&classify, "/text-to-video/kling-3.0").await;
    let one = follower(
        classify,
        FollowPolicy::new().callbacks_first(Duration::from_secs(120)),
    );
    let start = Instant::now();
    let (first, second) = (one.clone(), one.clone());
    let (id1, id2) = (task.id.clone(), task.id.clone());
    let a = tokio::spawn(async move { first.follow(TaskRef::new_style(id1)).await });
    let b = tokio::spawn(async move { second.follow(TaskRef::new_style(id2)).await });
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut done = task.clone();
    done.status = TaskStatus::Succeeded;
    one.deliver(done);
    for follow in [a, b] {
        assert_eq!(follow.await.unwrap().unwrap().status, TaskStatus::Succeeded);
    }
    assert_eq!(start.elapsed(), Duration::from_secs(10));
}

/// A report delivered to one clone ends the calls of every clone following that task, also
/// clones given an account or a header of their own (whose batch queries go apart): none waits
/// for its safety query.
#[tokio::test(start_paused = true)]
async fn a_report_delivered_to_one_clone_ends_every_clones_calls_on_that_task() {
    let classify = ClassifyLayer::new().layer(mock(3600, 3600));
    let task = create(&classify, "/text-to-video/kling-3.0").await;
    let other = create(&classify, "/text-to-video/kling-3.0").await;
    let base = follower(
        classify,
        FollowPolicy::new().callbacks_first(Duration::from_secs(120)),
    );
    let clones = [
        base.clone(),
        base.clone().with_account(AccountId::new("team-a")),
        base.clone().with_account(AccountId::new("team-b")),
        base.clone()
            .with_header("x-team", "c")
            .unwrap()
            .with_account(AccountId::new("team-c")),
    ];
    let start = Instant::now();
    let follows: Vec<_> = clones
        .iter()
        .map(|clone| {
            let (clone, id) = (clone.clone(), task.id.clone());
            tokio::spawn(async move { clone.follow(TaskRef::new_style(id)).await })
        })
        .collect();
    // Another task, followed by one of them: not ended by the report.
    let waiting = {
        let (clone, id) = (clones[1].clone(), other.id.clone());
        tokio::spawn(async move { clone.follow(TaskRef::new_style(id)).await })
    };
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut done = task.clone();
    done.status = TaskStatus::Succeeded;
    // Delivered through a clone of its own (as a callback route holds one).
    base.clone().deliver(done);
    for follow in follows {
        assert_eq!(follow.await.unwrap().unwrap().status, TaskStatus::Succeeded);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!waiting.is_finished());
    waiting.abort();
}

/// A query's answer that a task ended, to a clone with batches of its own, ends the calls of
/// the other clones following that task at once, as a delivered report does: they slept until
/// their next query, up to the longest interval later. A call starting then finds it too.
#[tokio::test(start_paused = true)]
async fn an_answer_to_one_clone_ends_every_clones_calls_on_that_task() {
    let classify = ClassifyLayer::new().layer(mock(62, 62));
    let task = create(&classify, "/text-to-video/kling-3.0").await;
    let policy = FollowPolicy::new()
        .first_query(Duration::from_secs(1))
        .interval_bounds(Duration::from_secs(30), Duration::from_secs(30));
    let base = follower(classify, policy);
    // A clone with a header of its own: its queries, and their answers, go apart.
    let apart = base.clone().with_header("x-team", "g").unwrap();
    let start = Instant::now();
    let follow = |follower: &Follower<_>| {
        let (follower, id) = (follower.clone(), task.id.clone());
        tokio::spawn(async move {
            let done = follower.follow(TaskRef::new_style(id)).await;
            (done, Instant::now())
        })
    };
    // Asks at 1 s, 31 s, 61 s (running: the task ends at 62 s), then 91 s.
    let waiting = follow(&base);
    tokio::time::sleep(Duration::from_secs(33)).await;
    // Asks at 34 s and 64 s, when the task has ended.
    let (done, at) = follow(&apart).await.unwrap();
    assert_eq!(done.unwrap().status, TaskStatus::Succeeded);
    assert_eq!(at - start, Duration::from_secs(64));
    // The call that was waiting for its next query ended with that answer.
    let (done, at) = waiting.await.unwrap();
    assert_eq!(done.unwrap().status, TaskStatus::Succeeded);
    assert_eq!(
        at - start,
        Duration::from_secs(64),
        "not at its next query (91 s)"
    );
    // A call of the first follower starting now finds the end on the board at once.
    let (done, at) = follow(&base).await.unwrap();
    assert_eq!(done.unwrap().status, TaskStatus::Succeeded);
    assert_eq!(at - start, Duration::from_secs(64));
}

/// The same for a legacy task (each call keeps its legacy tasks to itself): one delivered
/// report ends both calls, not only the first to look.
#[tokio::test(start_paused = true)]
async fn a_delivered_report_ends_every_call_following_that_legacy_task() {
    let classify = ClassifyLayer::new().layer(mock(3600, 3600));
    let task = create(&classify, "/v1/videos/text2video").await;
    let one = follower(
        classify,
        FollowPolicy::new().callbacks_first(Duration::from_secs(120)),
    );
    let start = Instant::now();
    let follows: Vec<_> = (0..2)
        .map(|_| {
            let (follower, id) = (one.clone(), task.id.clone());
            tokio::spawn(async move {
                follower
                    .follow(TaskRef::legacy("/v1/videos/text2video", id))
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut done = task.clone();
    done.status = TaskStatus::Succeeded;
    one.deliver(done);
    for follow in follows {
        assert_eq!(follow.await.unwrap().unwrap().status, TaskStatus::Succeeded);
    }
    assert_eq!(start.elapsed(), Duration::from_secs(10));
}

/// A query's answer that a legacy task ended ends the other calls following it at once, as a
/// batch answer does for a new-style task: they slept until their next query, and sent it.
#[tokio::test(start_paused = true)]
async fn an_answer_that_a_legacy_task_ended_ends_the_other_calls_following_it() {
    let classify = ClassifyLayer::new().layer(mock(62, 62));
    let task = create(&classify, "/v1/videos/text2video").await;
    let (logged, uris) = logging_uris(classify);
    let policy = FollowPolicy::new()
        .first_query(Duration::from_secs(1))
        .interval_bounds(Duration::from_secs(30), Duration::from_secs(30));
    let one = follower(logged, policy);
    let start = Instant::now();
    let follow = || {
        let (follower, id) = (one.clone(), task.id.clone());
        tokio::spawn(async move {
            let done = follower
                .follow(TaskRef::legacy("/v1/videos/text2video", id))
                .await;
            (done, Instant::now())
        })
    };
    // Asks at 1 s, 31 s, 61 s (running: the task ends at 62 s), then 91 s.
    let waiting = follow();
    tokio::time::sleep(Duration::from_secs(33)).await;
    // Asks at 34 s and 64 s, when the task has ended.
    let (done, at) = follow().await.unwrap();
    assert_eq!(done.unwrap().status, TaskStatus::Succeeded);
    assert_eq!(at - start, Duration::from_secs(64));
    let (done, at) = waiting.await.unwrap();
    assert_eq!(done.unwrap().status, TaskStatus::Succeeded);
    assert_eq!(
        at - start,
        Duration::from_secs(64),
        "not at its next query (91 s)"
    );
    assert_eq!(uris.lock().unwrap().len(), 5, "{:?}", uris.lock().unwrap());
}

/// Counts a query's future dropped before it answered (the count is let go on an answer).
struct DropCount(Option<Arc<AtomicUsize>>);

impl Drop for DropCount {
    fn drop(&mut self) {
        if let Some(count) = &self.0 {
            count.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A service whose first two queries wait forever (as at a rate limiter, for as long as a
/// test looks), counting the queries sent and those dropped unanswered.
fn two_queries_wait(
    classify: Classify<MockKling>,
    sent: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
) -> impl tower::Service<
    http::Request<Full<Bytes>>,
    Response = http::Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let classify = classify.clone();
        let n = sent.fetch_add(1, Ordering::SeqCst);
        let mut guard = DropCount(Some(dropped.clone()));
        async move {
            if n < 2 {
                std::future::pending::<()>().await;
            }
            let answer = classify.oneshot(req).await;
            guard.0.take();
            answer
        }
    })
}

/// Two calls following one task over [`two_queries_wait`]: the first asked at 5 s, and its
/// query waits; the later call starts at 6 s.
struct Two {
    first: tokio::task::JoinHandle<Result<TaskReport, FollowError>>,
    later: tokio::task::JoinHandle<Result<TaskReport, FollowError>>,
    sent: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

async fn two_calls_on_one_task() -> Two {
    let classify = ClassifyLayer::new().layer(mock(3600, 3600));
    let x = create(&classify, "/text-to-video/kling-3.0").await;
    let (sent, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let service = two_queries_wait(classify, sent.clone(), dropped.clone());
    let one = follower(service, FollowPolicy::new());
    let spawn_follow = |follower: Follower<_>, id: String| {
        tokio::spawn(async move { follower.follow(TaskRef::new_style(id)).await })
    };
    let first = spawn_follow(one.clone(), x.id.clone());
    tokio::time::sleep(Duration::from_secs(6)).await;
    let later = spawn_follow(one, x.id);
    Two {
        first,
        later,
        sent,
        dropped,
    }
}

/// A call that starts following a task while a query about it is on its way waits for that
/// answer: it sends no second query, and when it is dropped the first call's query (which may
/// only be waiting its turn at a rate limiter) goes on.
#[tokio::test(start_paused = true)]
async fn a_later_call_on_the_same_task_waits_for_the_query_on_its_way() {
    let Two {
        first: a,
        later: g,
        sent,
        dropped,
    } = two_calls_on_one_task().await;
    tokio::time::sleep(Duration::from_secs(6)).await; // `g`'s task due at 11 s
    g.abort();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(sent.load(Ordering::SeqCst), 1, "no second query");
    assert_eq!(dropped.load(Ordering::SeqCst), 0, "the first goes on");
    a.abort();
}

/// The sending call's query waits past the takeover time; another call takes the task over
/// and is dropped before its answer. The sending call keeps waiting for its own query (which
/// may only be waiting its turn): nothing but another call's answer makes it send anew.
#[tokio::test(start_paused = true)]
async fn a_takeover_dropped_unanswered_leaves_the_sending_call_waiting() {
    let Two {
        first: a,
        later: g,
        sent,
        dropped,
    } = two_calls_on_one_task().await;
    // At 125 s the takeover time has passed: `g` asks again.
    tokio::time::sleep(Duration::from_secs(124)).await;
    assert_eq!(sent.load(Ordering::SeqCst), 2, "the takeover's query");
    g.abort();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(sent.load(Ordering::SeqCst), 2, "no third query");
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "only the takeover's query went"
    );
    a.abort();
}

/// A legacy create's body carrying the external id `job-7`.
const JOB_7: &str = r#"{"prompt":"a cat","external_task_id":"job-7"}"#;

/// A legacy task followed by its external id (`GET {create path}/{external id}`, as a caller
/// whose create's answer was lost knows it): the report names the task under its own id and
/// the external id under `task_info`, and the follow ends with it rather than polling to the
/// deadline.
#[tokio::test(start_paused = true)]
async fn a_legacy_task_followed_by_its_external_id_ends() {
    let service = ClassifyLayer::new().layer(mock(60, 60));
    let task_id = create_with(&service, "/v1/videos/text2video", JOB_7)
        .await
        .id;
    let start = Instant::now();
    let done = follower(service, FollowPolicy::new())
        .follow(TaskRef::legacy("/v1/videos/text2video", "job-7"))
        .await
        .unwrap();
    assert_eq!(done.id, task_id);
    assert_eq!(done.external_id.as_deref(), Some("job-7"));
    assert!(done.status.is_terminal());
    assert!(
        start.elapsed() < Duration::from_secs(120),
        "{:?}",
        start.elapsed()
    );
}

/// A callback ends the follow of a legacy task followed by its external id: the report names
/// the task by its task id, and the external id under `task_info`. A callback names no create
/// path, so the follow asks its own path once, at once, and ends with its answer.
#[tokio::test(start_paused = true)]
async fn a_callback_ends_a_legacy_task_followed_by_its_external_id() {
    let mock = mock(60, 60);
    let service = ClassifyLayer::new().layer(mock.clone());
    let mut report = create_with(&service, "/v1/videos/text2video", JOB_7).await;
    assert_eq!(report.external_id.as_deref(), Some("job-7"));
    report.status = TaskStatus::Succeeded;
    let follower = follower(
        service,
        FollowPolicy::new().callbacks_first(Duration::from_secs(600)),
    );
    let delivering = follower.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(61)).await;
        delivering.deliver(report);
    });
    let start = Instant::now();
    let done = follower
        .follow(TaskRef::legacy("/v1/videos/text2video", "job-7"))
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Succeeded);
    assert_eq!(start.elapsed(), Duration::from_secs(61));
    assert_eq!(mock.stats().requests_total, 2, "the create and one query");
}

/// External ids are unique per create path (the mock's rule; KLING_API.md: a legacy task is
/// looked up at `{create path}/{external id}`), and a callback names no path. A follow of
/// `job-7` on `/v1/videos/text2video` is not ended by a callback for `job-7` of
/// `/v1/images/generations` in the same account (it ended with the image, the video still
/// running): the follow asks its own path at once, learns its own task's id from the answer,
/// and then ends at once with the callback for that task, without asking again.
#[tokio::test(start_paused = true)]
async fn a_callback_for_another_paths_task_with_the_same_external_id_does_not_end_a_follow() {
    let mock = mock(60, 60);
    let service = ClassifyLayer::new().layer(mock.clone());
    let video = create_with(&service, "/v1/videos/text2video", JOB_7).await;
    let image = create_with(&service, "/v1/images/generations", JOB_7).await;
    assert_ne!(video.id, image.id);
    let (service, uris) = logging_uris(service);
    let follower = follower(
        service,
        FollowPolicy::new().callbacks_first(Duration::from_secs(600)),
    );
    let delivering = follower.clone();
    let (mut image_done, mut video_done) = (image.clone(), video.clone());
    image_done.status = TaskStatus::Succeeded;
    video_done.status = TaskStatus::Succeeded;
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(10)).await;
        delivering.deliver(image_done);
        tokio::time::sleep(Duration::from_secs(51)).await;
        delivering.deliver(video_done);
    });
    let start = Instant::now();
    let done = follower
        .follow(TaskRef::legacy("/v1/videos/text2video", "job-7"))
        .await
        .unwrap();
    assert_eq!(done.id, video.id, "the video's report, not the image's");
    assert_eq!(start.elapsed(), Duration::from_secs(61));
    assert_eq!(
        uris.lock().unwrap().clone(),
        ["/v1/videos/text2video/job-7"],
        "one query, at the image's callback"
    );
}

/// A callback found by the external id a legacy follow knows makes it ask its path at once,
/// once per report: a query that fails then backs off as any other, rather than being sent
/// again whenever the call looks at the board (here at each of the other tasks' callbacks).
/// The backoff after 73 s falls after the deadline: no query brought forward to before it
/// (the backoff spares a failing server).
#[tokio::test(start_paused = true)]
async fn a_callback_found_by_external_id_alone_makes_one_query_at_once_then_backs_off() {
    let start = Instant::now();
    let sent: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let log = sent.clone();
    let service = tower::service_fn(move |_req: http::Request<Full<Bytes>>| {
        let mut sent = log.lock().unwrap();
        sent.push(start.elapsed());
        assert!(sent.len() < 20, "queries sent at every look: {sent:?}");
        async { Err::<http::Response<Full<Bytes>>, BoxError>("connection reset".into()) }
    });
    let follower = follower(
        service,
        FollowPolicy::new()
            .callbacks_first(Duration::from_secs(600))
            .deadline(Duration::from_secs(100)),
    );
    let delivering = follower.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let callback = br#"{"task_id":"another","task_status":"succeed","task_info":{"external_task_id":"job-7"}}"#;
        let report = kling_core::Envelope::parse_callback(callback)
            .unwrap()
            .remove(0);
        delivering.deliver(report);
        for i in 0..30 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let callback = format!(r#"{{"task_id":"other-{i}","task_status":"succeed"}}"#);
            let other = kling_core::Envelope::parse_callback(callback.as_bytes())
                .unwrap()
                .remove(0);
            delivering.deliver(other);
        }
    });
    let error = follower
        .follow(TaskRef::legacy("/v1/videos/text2video", "job-7"))
        .await
        .unwrap_err();
    assert!(
        matches!(error, FollowError::DeadlineExceeded { .. }),
        "{error:?}"
    );
    let secs: Vec<u64> = sent.lock().unwrap().iter().map(Duration::as_secs).collect();
    assert_eq!(secs, [10, 11, 13, 17, 25, 41, 73]);
}

/// A call that starts following a task at the moment a delivered report is handed to the calls
/// already following it (here: at the same instant, right after) finds the report, on the same
/// follower and on a clone with batches of its own: handing the report out took it off the
/// board, so such a call waited for its safety query (120 s) and sent it.
#[tokio::test(start_paused = true)]
async fn a_call_starting_as_a_delivered_report_is_handed_out_finds_it() {
    let mock = mock(3600, 3600);
    let classify = ClassifyLayer::new().layer(mock.clone());
    let task = create(&classify, "/text-to-video/kling-3.0").await;
    let one = follower(
        classify,
        FollowPolicy::new().callbacks_first(Duration::from_secs(120)),
    );
    let first = {
        let (follower, id) = (one.clone(), task.id.clone());
        tokio::spawn(async move { follower.follow(TaskRef::new_style(id)).await })
    };
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut done = task.clone();
    done.status = TaskStatus::Succeeded;
    one.deliver(done);
    let start = Instant::now();
    let apart = one.clone().with_account(AccountId::new("team-a"));
    let (same, other) = tokio::join!(
        one.follow(TaskRef::new_style(task.id.clone())),
        apart.follow(TaskRef::new_style(task.id.clone())),
    );
    assert_eq!(same.unwrap().status, TaskStatus::Succeeded);
    assert_eq!(other.unwrap().status, TaskStatus::Succeeded);
    assert_eq!(first.await.unwrap().unwrap().status, TaskStatus::Succeeded);
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(mock.stats().requests_total, 1, "only the create");
}

/// A report delivered while nobody follows its task, then two calls that start following it
/// together: both end with it (the first to look took it off the board, and the other waited
/// for its safety query).
#[tokio::test(start_paused = true)]
async fn calls_starting_together_after_a_delivery_all_find_the_report() {
    let mock = mock(3600, 3600);
    let classify = ClassifyLayer::new().layer(mock.clone());
    let task = create(&classify, "/text-to-video/kling-3.0").await;
    let one = follower(
        classify,
        FollowPolicy::new().callbacks_first(Duration::from_secs(120)),
    );
    let mut done = task.clone();
    done.status = TaskStatus::Succeeded;
    one.deliver(done);
    let start = Instant::now();
    let (a, b) = tokio::join!(
        one.follow(TaskRef::new_style(task.id.clone())),
        one.follow(TaskRef::new_style(task.id.clone())),
    );
    assert_eq!(a.unwrap().status, TaskStatus::Succeeded);
    assert_eq!(b.unwrap().status, TaskStatus::Succeeded);
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(mock.stats().requests_total, 1, "only the create");
}

/// A call that starts following a task as another call's query reports it ended finds that
/// report, new-style and legacy: it waited for a first query of its own (5 s) and sent it.
#[tokio::test(start_paused = true)]
async fn a_call_starting_as_a_query_reports_the_task_ended_finds_the_report() {
    for path in ["/text-to-video/kling-3.0", "/v1/videos/text2video"] {
        let classify = ClassifyLayer::new().layer(mock(2, 2));
        let task = create(&classify, path).await;
        let (service, uris) = logging_uris(classify);
        let one = follower(service, FollowPolicy::new());
        let task = TaskRef::from_report(path, &task);
        let first = one.follow(task.clone()).await.unwrap();
        assert_eq!(first.status, TaskStatus::Succeeded, "{path}");
        let queries = uris.lock().unwrap().len();
        let start = Instant::now();
        let later = one.follow(task).await.unwrap();
        assert_eq!(later, first, "{path}");
        assert_eq!(start.elapsed(), Duration::ZERO, "{path}");
        assert_eq!(
            uris.lock().unwrap().len(),
            queries,
            "{path}: no query of its own"
        );
    }
}

/// External ids are unique per account only (and perhaps per create path). A legacy task
/// followed by its external id `job-7` ends, its report answered to a query; within the while
/// such a report stays on the board, a clone with another account follows its own running
/// task by `job-7`, and so does a call of the same account on another create path: neither
/// may end with the first task's report (the caller would take a running task for finished,
/// another task's for its own). Each asks, and ends with its own task.
#[tokio::test(start_paused = true)]
async fn an_external_id_answered_to_one_follow_does_not_end_another_tasks_follow() {
    let start = Instant::now();
    let service = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let account = AccountId::of(&req).map(|a| a.as_str().to_owned());
        let path = req.uri().path().to_owned();
        async move {
            let running = start.elapsed() < Duration::from_secs(60);
            let (id, status) = match (account.as_deref(), path.as_str()) {
                (Some("team-a"), "/v1/images/generations/job-7") => ("a-image", "succeed"),
                (Some("team-a"), "/v1/videos/image2video/job-7") if running => {
                    ("a-video", "processing")
                }
                (Some("team-a"), "/v1/videos/image2video/job-7") => ("a-video", "succeed"),
                (Some("team-b"), "/v1/images/generations/job-7") if running => {
                    ("b-image", "processing")
                }
                (Some("team-b"), "/v1/images/generations/job-7") => ("b-image", "succeed"),
                other => panic!("an unexpected query: {other:?}"),
            };
            let body = format!(
                r#"{{"code":0,"message":"SUCCEED","request_id":"r","data":{{"task_id":"{id}","task_status":"{status}","task_info":{{"external_task_id":"job-7"}}}}}}"#
            );
            Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from(body))))
        }
    });
    let base = follower(service, FollowPolicy::new());
    let team_a = base.clone().with_account(AccountId::new("team-a"));
    let team_b = base.clone().with_account(AccountId::new("team-b"));
    let done = team_a
        .follow(TaskRef::legacy("/v1/images/generations", "job-7"))
        .await
        .unwrap();
    assert_eq!(done.id, "a-image");
    let (video, other) = tokio::join!(
        team_a.follow(TaskRef::legacy("/v1/videos/image2video", "job-7")),
        team_b.follow(TaskRef::legacy("/v1/images/generations", "job-7")),
    );
    // The same account's task on the other path, and team-b's own task: not `a-image`.
    assert_eq!(
        (video.unwrap().id.as_str(), other.unwrap().id.as_str()),
        ("a-video", "b-image")
    );
    assert!(start.elapsed() >= Duration::from_secs(60));
}

/// External ids are unique per account at most: a callback for team-a's task `job-7`, delivered
/// to team-a's clone before any call took it, does not end team-b's follow of its own running
/// task by `job-7` (it asks, and finds its own task running), while a follow by `job-7` of
/// another team-a clone asks its path at once (the callback names none) and ends.
#[tokio::test(start_paused = true)]
async fn a_callback_ends_follows_by_its_external_id_of_its_own_account_only() {
    // The account and path of each query sent.
    type Queries = Arc<Mutex<Vec<(Option<String>, String)>>>;
    let queries: Queries = Arc::default();
    let log = queries.clone();
    let service = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let account = AccountId::of(&req).map(|a| a.as_str().to_owned());
        let path = req.uri().path().to_owned();
        log.lock().unwrap().push((account.clone(), path.clone()));
        async move {
            let (id, status) = match (account.as_deref(), path.as_str()) {
                (Some("team-b"), "/v1/videos/text2video/job-7") => ("b-video", "processing"),
                (Some("team-a"), "/v1/videos/text2video/job-7") => ("a-video", "succeed"),
                other => panic!("an unexpected query: {other:?}"),
            };
            let body = format!(
                r#"{{"code":0,"message":"SUCCEED","request_id":"r","data":{{"task_id":"{id}","task_status":"{status}","task_info":{{"external_task_id":"job-7"}}}}}}"#
            );
            Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from(body))))
        }
    });
    let base = follower(
        service,
        FollowPolicy::new().callbacks_first(Duration::from_secs(120)),
    );
    let team_a = base.clone().with_account(AccountId::new("team-a"));
    let team_b = base.clone().with_account(AccountId::new("team-b"));
    let callback = br#"{"task_id":"a-video","task_status":"succeed","task_info":{"external_task_id":"job-7"}}"#;
    let report = kling_core::Envelope::parse_callback(callback)
        .unwrap()
        .remove(0);
    assert_eq!(report.external_id.as_deref(), Some("job-7"));
    // As a callback route holding team-a's follower hands it over.
    team_a.deliver(report);
    let start = Instant::now();
    let other = {
        let team_b = team_b.clone();
        tokio::spawn(async move {
            team_b
                .follow(TaskRef::legacy("/v1/videos/text2video", "job-7"))
                .await
        })
    };
    // team-b's task runs: its follow waits for the safety query, then goes on waiting.
    tokio::time::sleep(Duration::from_secs(121)).await;
    assert!(
        !other.is_finished(),
        "team-b's follow ended with team-a's report"
    );
    assert_eq!(
        queries.lock().unwrap().clone(),
        [(
            Some("team-b".to_owned()),
            "/v1/videos/text2video/job-7".to_owned()
        )]
    );
    other.abort();
    // The same account, another clone: asks its path at once, and ends.
    let start_a = Instant::now();
    let same = base
        .clone()
        .with_account(AccountId::new("team-a"))
        .follow(TaskRef::legacy("/v1/videos/text2video", "job-7"))
        .await
        .unwrap();
    assert_eq!(same.id, "a-video");
    assert_eq!(start_a.elapsed(), Duration::ZERO);
    assert_eq!(
        queries.lock().unwrap()[1..],
        [(
            Some("team-a".to_owned()),
            "/v1/videos/text2video/job-7".to_owned()
        )]
    );
    assert!(start.elapsed() >= Duration::from_secs(121));
}

/// A follower over a gateway given no account (built with `Follower::new`, not
/// `KlingLayer::follower`): the gateway refuses each query before sending it, and no retry
/// changes that. The follow ends at its first query naming why, not silently at the
/// 30-minute deadline; the same follower given the account follows the task to its end.
#[tokio::test(start_paused = true)]
async fn a_query_the_service_can_never_send_ends_following_at_once() {
    use kling_tower::gateway::GatewayLayer;

    let gateway = GatewayLayer::builder()
        .account(
            "a",
            KlingLayer::builder(
                StackConfig::preset(Tier::Pro),
                Credentials::api_key("key-a").unwrap(),
            ),
        )
        .build()
        .unwrap();
    let mock = MockKling::new(
        MockConfig::preset(Preset::Pro)
            .api_key_for("key-a", "a")
            .task_duration(Duration::from_secs(30), Duration::from_secs(30)),
    )
    .unwrap();
    let service = gateway.layer(mock);
    let mut create = request("POST", "/text-to-video/kling-3.0", r#"{"prompt":"a cat"}"#);
    create.extensions_mut().insert(AccountId::new("a"));
    let response = service.clone().oneshot(create).await.unwrap();
    let task = Outcome::of(&response).unwrap().task().unwrap().clone();
    let task = TaskRef::from_report("/text-to-video/kling-3.0", &task);

    let no_account = Follower::new(service.clone(), FollowPolicy::new()).unwrap();
    let start = Instant::now();
    let err = no_account.follow(task.clone()).await.unwrap_err();
    assert!(
        matches!(&err, FollowError::Unsendable { reason, .. } if reason.contains("account")),
        "{err}"
    );
    assert_eq!(err.task_id(), task.id());
    // At its first query (5 s), not at the deadline.
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    // A legacy task's query: the same.
    let legacy = no_account
        .follow(TaskRef::legacy("/v1/videos/text2video", "t1"))
        .await
        .unwrap_err();
    assert!(matches!(legacy, FollowError::Unsendable { .. }), "{legacy}");

    let with_account = no_account.with_account(AccountId::new("a"));
    // A legacy path no URI holds, or at another origin than the base URL's: the same.
    for path in [
        "/v1/videos/text 2video",
        "https://elsewhere.example/v1/videos/text2video",
    ] {
        let err = with_account
            .follow(TaskRef::legacy(path, "t1"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, FollowError::Unsendable { .. }),
            "{path}: {err}"
        );
    }
    let done = with_account.follow(task).await.unwrap();
    assert_eq!(done.status, TaskStatus::Succeeded);
}

/// A follower over a hand-composed stack with no base URL layer: the client refuses each
/// relative query before sending it, as it will every other (`NotSent::for_good`, or
/// hyper-util's own refusal), and a retry layer returns that at once. The follow ends at its
/// first query naming why (`FollowError::Unsendable`), not silently at the 30-minute deadline;
/// with a retry layer and without, new-style and legacy alike.
#[cfg(feature = "hyper")]
#[tokio::test(start_paused = true)]
async fn a_query_the_client_refuses_for_good_ends_following_at_once() {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use kling_tower::retry::RetryLayer;

    /// A boxed query service, for followers over stacks of different types.
    type Boxed = tower::util::BoxCloneSyncService<
        http::Request<Full<Bytes>>,
        http::Response<Full<Bytes>>,
        BoxError,
    >;

    let https = ClassifyLayer::new().layer(kling_tower::client::https_client().unwrap());
    let raw = ClassifyLayer::new()
        .layer(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
    let retry = RetryLayer::builder().max_attempts(5).build().unwrap();
    let boxed = |service| Follower::new(service, FollowPolicy::new()).unwrap();
    let followers: [(Follower<Boxed>, &str); 3] = [
        (
            boxed(Boxed::new(https.clone().map_err(Into::into))),
            "BaseUrlLayer",
        ),
        (boxed(Boxed::new(retry.layer(https))), "BaseUrlLayer"),
        (boxed(Boxed::new(raw.map_err(Into::into))), "AbsoluteUri"),
    ];
    for (follower, why) in followers {
        for task in [
            TaskRef::new_style("t1"),
            TaskRef::legacy("/v1/videos/text2video", "t1"),
        ] {
            let start = Instant::now();
            let err = follower.follow(task).await.unwrap_err();
            assert!(
                matches!(&err, FollowError::Unsendable { reason, .. } if reason.contains(why)),
                "{err}"
            );
            // At its first query (5 s), not at the deadline.
            assert_eq!(start.elapsed(), Duration::from_secs(5), "{err}");
        }
    }
}

/// A new-style create's body carrying the external id `ext`.
fn with_external_id(ext: &str) -> String {
    format!(r#"{{"prompt":"a cat","external_id":"{ext}"}}"#)
}

/// A new-style task known by its external id alone (its create's answer lost) is followed with
/// `GET /tasks?external_task_ids=…` to its end: the report names its task id. A call that
/// then follows the task by that id finds the report, as after a query by task id.
#[tokio::test(start_paused = true)]
async fn a_new_style_task_followed_by_its_external_id_ends_with_its_report() {
    let classify = ClassifyLayer::new().layer(mock(60, 60));
    let task = create_with(
        &classify,
        "/text-to-video/kling-3.0",
        &with_external_id("job-7"),
    )
    .await;
    let (service, uris) = logging_uris(classify);
    let one = follower(service, FollowPolicy::new());
    let start = Instant::now();
    let done = one
        .follow(TaskRef::new_style_external("job-7"))
        .await
        .unwrap();
    let ended = Instant::now();
    let again = one
        .follow(TaskRef::new_style(task.id.clone()))
        .await
        .unwrap();
    assert_eq!(again, done);
    assert_eq!(ended.elapsed(), Duration::ZERO, "no query of its own");
    assert_eq!(done.id, task.id, "its task id, now known to the caller");
    assert_eq!(done.external_id.as_deref(), Some("job-7"));
    assert_eq!(done.status, TaskStatus::Succeeded);
    assert!(
        start.elapsed() < Duration::from_secs(120),
        "{:?}",
        start.elapsed()
    );
    let uris = uris.lock().unwrap();
    assert!(
        uris.iter().all(|u| u == "/tasks?external_task_ids=job-7"),
        "{uris:?}"
    );
}

/// Tasks followed by task id and by external id, in one call and in two, are asked about in
/// batch queries of one kind each (Kling takes no mix): the first round is two queries, one of
/// each kind, and each task ends with its own report.
#[tokio::test(start_paused = true)]
async fn task_ids_and_external_ids_are_asked_about_in_separate_batches() {
    let classify = ClassifyLayer::new().layer(mock(60, 60));
    let path = "/text-to-video/kling-3.0";
    let a = create_with(&classify, path, &with_external_id("job-a")).await;
    let b = create(&classify, path).await;
    let c = create_with(&classify, path, &with_external_id("job-c")).await;
    let d = create(&classify, path).await;
    let (service, uris) = logging_uris(classify);
    let one = follower(service, FollowPolicy::new());
    let other = one.clone();
    let d_id = d.id.clone();
    let apart = tokio::spawn(async move { other.follow(TaskRef::new_style(d_id)).await });
    let results = one
        .follow_many(vec![
            TaskRef::new_style_external("job-a"),
            TaskRef::new_style(b.id.clone()),
            TaskRef::new_style_external("job-c"),
        ])
        .await;
    let ids: Vec<String> = results.into_iter().map(|r| r.unwrap().id).collect();
    assert_eq!(ids, [a.id.clone(), b.id.clone(), c.id.clone()]);
    assert_eq!(apart.await.unwrap().unwrap().id, d.id);
    let uris = uris.lock().unwrap();
    for uri in uris.iter() {
        let by_id = uri.contains("task_ids=") && !uri.contains("external_task_ids=");
        let by_external = uri.starts_with("/tasks?external_task_ids=job-");
        assert!(
            by_id != by_external && !(by_external && uri.contains(&b.id)),
            "{uri} mixes, in {uris:?}"
        );
    }
    let mut first_round: Vec<&str> = uris.iter().take(2).map(String::as_str).collect();
    first_round.sort_unstable();
    let by_ids = format!("/tasks?task_ids={},{}", b.id, d.id);
    let by_ids_other = format!("/tasks?task_ids={},{}", d.id, b.id);
    assert_eq!(
        first_round[0], "/tasks?external_task_ids=job-a,job-c",
        "{uris:?}"
    );
    assert!(
        first_round[1] == by_ids || first_round[1] == by_ids_other,
        "{uris:?}"
    );
}

/// An external id that would need escaping in a query (or is empty) is refused at once, as
/// such a task id is, and nothing is sent.
#[tokio::test(start_paused = true)]
async fn an_external_id_that_needs_escaping_is_refused_as_a_task_id_is() {
    let mock = mock(60, 60);
    let one = follower(
        ClassifyLayer::new().layer(mock.clone()),
        FollowPolicy::new(),
    );
    let start = Instant::now();
    for id in ["a,b", "job 7", "x&task_ids=y", "job#1", ""] {
        for task in [TaskRef::new_style(id), TaskRef::new_style_external(id)] {
            let err = one.follow(task).await.unwrap_err();
            assert!(
                matches!(&err, FollowError::InvalidTask { task_id, .. } if task_id == id),
                "{id:?}: {err}"
            );
        }
    }
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(mock.stats().requests_total, 0, "nothing sent");
}

/// An external id no task carries yet (its create still on its way, or not listed yet) is not
/// declared gone at the `1203` that a task id meets: it is asked about again, and the follow
/// ends with the task once it appears; one that never appears ends at the deadline.
#[tokio::test(start_paused = true)]
async fn an_external_id_not_listed_yet_is_asked_about_until_its_task_appears() {
    let classify = ClassifyLayer::new().layer(mock(30, 30));
    let one = follower(
        classify.clone(),
        FollowPolicy::new().deadline(Duration::from_secs(300)),
    );
    let start = Instant::now();
    let following = {
        let one = one.clone();
        tokio::spawn(async move { one.follow(TaskRef::new_style_external("late")).await })
    };
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(!following.is_finished(), "not ended by the first 1203s");
    let task = create_with(
        &classify,
        "/text-to-video/kling-3.0",
        &with_external_id("late"),
    )
    .await;
    let done = following.await.unwrap().unwrap();
    assert_eq!((done.id, done.status), (task.id, TaskStatus::Succeeded));
    assert!(
        start.elapsed() < Duration::from_secs(80),
        "{:?}",
        start.elapsed()
    );

    let start = Instant::now();
    let err = one
        .follow(TaskRef::new_style_external("never"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, FollowError::DeadlineExceeded { task_id, last_status: None, .. } if task_id == "never"),
        "{err}"
    );
    assert_eq!(start.elapsed(), Duration::from_secs(300));
}

/// Once an answer has named the task id of a task followed by its external id, a delivered
/// report of that task ends the follow at once, as for a task followed by its id; before
/// (an unknown task id), it is no other task's report.
#[tokio::test(start_paused = true)]
async fn a_delivered_report_ends_a_follow_by_external_id_once_its_task_id_is_known() {
    let mock = mock(3600, 3600);
    let classify = ClassifyLayer::new().layer(mock.clone());
    let task = create_with(
        &classify,
        "/text-to-video/kling-3.0",
        &with_external_id("job-7"),
    )
    .await;
    let one = follower(
        classify,
        FollowPolicy::new().interval_bounds(Duration::from_secs(60), Duration::from_secs(60)),
    );
    let start = Instant::now();
    let following = {
        let one = one.clone();
        tokio::spawn(async move { one.follow(TaskRef::new_style_external("job-7")).await })
    };
    // Its first query (5 s) names its task id; its next would be at 65 s.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut done = task.clone();
    done.status = TaskStatus::Succeeded;
    one.deliver(done);
    let report = following.await.unwrap().unwrap();
    assert_eq!((report.id, report.status), (task.id, TaskStatus::Succeeded));
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    assert_eq!(mock.stats().requests_total, 2, "the create and one query");
}

/// A delivered new-style report carrying the external id a call follows ends that call at
/// once, before any answer has named its task id (it waited for its own query, up to the
/// interval after its first), whether the report came before the call started or during it;
/// one delivered to another account's follower does not.
#[tokio::test(start_paused = true)]
async fn a_delivered_report_ends_a_follow_by_external_id_before_its_task_id_is_known() {
    let mock = mock(3600, 3600);
    let classify = ClassifyLayer::new().layer(mock.clone());
    let task = create_with(
        &classify,
        "/text-to-video/kling-3.0",
        &with_external_id("job-7"),
    )
    .await;
    let policy =
        FollowPolicy::new().interval_bounds(Duration::from_secs(60), Duration::from_secs(60));
    let one = follower(classify, policy).with_account(AccountId::new("team-a"));
    let other = one.clone().with_account(AccountId::new("team-b"));
    let start = Instant::now();
    let following = {
        let one = one.clone();
        tokio::spawn(async move { one.follow(TaskRef::new_style_external("job-7")).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut done = task.clone();
    done.status = TaskStatus::Succeeded;
    done.external_id = Some("job-7".to_owned());
    other.deliver(done.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!following.is_finished(), "another account's report");
    one.deliver(done.clone());
    let report = following.await.unwrap().unwrap();
    assert_eq!((report.id, report.status), (task.id, TaskStatus::Succeeded));
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(mock.stats().requests_total, 1, "the create, no query");

    // Delivered before a call starts: found on the board.
    let mut second = done;
    second.id = "n-2".to_owned();
    second.external_id = Some("job-8".to_owned());
    one.deliver(second);
    let report = one
        .follow(TaskRef::new_style_external("job-8"))
        .await
        .unwrap();
    assert_eq!(report.id, "n-2");
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(mock.stats().requests_total, 1, "no query");
}

/// Through the stack: a new-style create whose answer was lost keeps its slot under its
/// external id (nothing else frees it, even once the task has ended). Followed by that
/// external id, the query that sees the task's end frees the slot.
#[tokio::test(start_paused = true)]
async fn through_the_stack_a_follow_by_external_id_frees_the_slot_of_a_lost_create() {
    let mock = MockKling::new(
        MockConfig::preset(Preset::Enterprise)
            .no_rate_limit()
            .unlimited_credits()
            .task_duration(Duration::from_secs(60), Duration::from_secs(60)),
    )
    .unwrap();
    // The create is carried out, and its answer lost on the way back.
    let inner = mock.clone();
    let lossy = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let inner = inner.clone();
        async move {
            let create = req.method() == http::Method::POST;
            let answer = inner.oneshot(req).await.map_err(BoxError::from)?;
            if create {
                return Err::<http::Response<Full<Bytes>>, BoxError>("connection reset".into());
            }
            Ok(answer)
        }
    });
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Free).retry_max_attempts(1),
        Credentials::api_key("k").unwrap(),
    )
    .unwrap();
    let service = kling.layer(lossy);
    let in_use = || kling.snapshot().pool("video:kling-3.0").unwrap().in_use;
    let create = request(
        "POST",
        "/text-to-video/kling-3.0",
        &with_external_id("job-7"),
    );
    assert!(
        service.clone().oneshot(create).await.is_err(),
        "the answer was lost"
    );
    assert_eq!(mock.stats().tasks_created, 1);
    assert_eq!(in_use(), 1);
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(in_use(), 1, "held until something sees the task end");

    let follower = kling.follower(service, kling.follow_policy()).unwrap();
    let done = follower
        .follow(TaskRef::new_style_external("job-7"))
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Succeeded);
    assert_eq!(done.external_id.as_deref(), Some("job-7"));
    assert_eq!(in_use(), 0, "freed by the query that saw its end");
}

/// An external id that reads as another task's id is not that task. Followed by it (in the
/// same call as a follow of that task by its id, in other calls, and on a clone with batches
/// of its own) while that task ends, a follow by external id ends with none of what ends the
/// follows by task id (the external id's own `1203`, their query's answer, the report kept for
/// later calls): it asks about its own id until the deadline.
#[tokio::test(start_paused = true)]
async fn an_external_id_that_reads_as_another_tasks_id_is_not_that_task() {
    let classify = ClassifyLayer::new().layer(mock(20, 20));
    let task = create(&classify, "/text-to-video/kling-3.0").await;
    let (service, uris) = logging_uris(classify);
    let one = follower(
        service,
        FollowPolicy::new().deadline(Duration::from_secs(60)),
    );
    let apart = one.clone().with_header("x-apart", "1").unwrap();
    let start = Instant::now();
    let by_external = |follower: &Follower<_>| {
        let (follower, id) = (follower.clone(), task.id.clone());
        tokio::spawn(async move { follower.follow(TaskRef::new_style_external(id)).await })
    };
    let (same, other) = (by_external(&one), by_external(&apart));
    // The external id asked about first: its `1203` is no answer about the task id.
    let both = {
        let (one, id) = (one.clone(), task.id.clone());
        tokio::spawn(async move {
            one.follow_many(vec![
                TaskRef::new_style_external(id.clone()),
                TaskRef::new_style(id),
            ])
            .await
        })
    };
    tokio::task::yield_now().await;
    let done = one
        .follow(TaskRef::new_style(task.id.clone()))
        .await
        .unwrap();
    assert_eq!(done.id, task.id);
    // A later call finds the report kept for it, and hands it to the calls following the task.
    let kept = one
        .follow(TaskRef::new_style(task.id.clone()))
        .await
        .unwrap();
    assert_eq!(kept, done);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(
        !same.is_finished() && !other.is_finished(),
        "not ended by that task's end"
    );
    for result in [same.await.unwrap(), other.await.unwrap()] {
        assert!(
            matches!(&result, Err(FollowError::DeadlineExceeded { .. })),
            "{result:?}"
        );
    }
    assert_eq!(start.elapsed(), Duration::from_secs(60));
    let results = both.await.unwrap();
    assert_eq!(results[1].as_ref().unwrap().id, task.id);
    assert!(
        matches!(&results[0], Err(FollowError::DeadlineExceeded { .. })),
        "{:?}",
        results[0]
    );
    let external = format!("/tasks?external_task_ids={}", task.id);
    assert!(
        uris.lock().unwrap().contains(&external),
        "asked about by external id"
    );
}

/// A query by external id on its way (here it hangs) does not hold up another call's follow of
/// a task whose id reads the same: that is another query, sent when its task is due, not one
/// to wait for up to the takeover time (120 s).
#[tokio::test(start_paused = true)]
async fn a_query_by_external_id_holds_up_no_follow_of_the_same_string_as_a_task_id() {
    let classify = ClassifyLayer::new().layer(mock(60, 60));
    let task = create(&classify, "/text-to-video/kling-3.0").await;
    // Queries by external id never answer.
    let service = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let classify = classify.clone();
        async move {
            if req.uri().to_string().contains("external_task_ids=") {
                std::future::pending::<()>().await;
            }
            classify.oneshot(req).await
        }
    });
    let one = follower(service, FollowPolicy::new());
    let start = Instant::now();
    let hung = {
        let (one, id) = (one.clone(), task.id.clone());
        tokio::spawn(async move { one.follow(TaskRef::new_style_external(id)).await })
    };
    tokio::task::yield_now().await;
    let done = one
        .follow(TaskRef::new_style(task.id.clone()))
        .await
        .unwrap();
    assert_eq!((done.id, done.status), (task.id, TaskStatus::Succeeded));
    // The task ends at 60 s, seen by a query within the interval (12 s at that age).
    assert!(
        start.elapsed() <= Duration::from_secs(72),
        "{:?}",
        start.elapsed()
    );
    hung.abort();
}

/// In one call, the `1203` a query by external id meets is no answer about a task id that
/// reads the same (the external id asked about first), nor is that task's answer one about
/// the external id.
#[tokio::test(start_paused = true)]
async fn a_1203_by_external_id_does_not_end_the_follow_of_a_task_id_that_reads_the_same() {
    let classify = ClassifyLayer::new().layer(mock(20, 20));
    let task = create(&classify, "/text-to-video/kling-3.0").await;
    let one = follower(
        classify,
        FollowPolicy::new().deadline(Duration::from_secs(60)),
    );
    let results = one
        .follow_many(vec![
            TaskRef::new_style_external(task.id.clone()),
            TaskRef::new_style(task.id.clone()),
        ])
        .await;
    assert_eq!(results[1].as_ref().unwrap().id, task.id);
    assert!(
        matches!(&results[0], Err(FollowError::DeadlineExceeded { .. })),
        "{:?}",
        results[0]
    );
}

/// A task followed once its deadline has passed (its `created_at` that long ago) is asked
/// about once before the follow gives up: it ended DeadlineExceeded at once, unasked, when
/// the task had succeeded long before.
#[tokio::test(start_paused = true)]
async fn a_task_past_its_deadline_when_following_starts_is_asked_about_once() {
    let mock = mock(60, 60);
    let service = ClassifyLayer::new().layer(mock.clone());
    let ended = create(&service, "/v1/videos/text2video").await;
    let created = Instant::now();
    tokio::time::advance(Duration::from_secs(31 * 60)).await;
    let before = mock.stats().requests_total;
    let done = follower(service.clone(), FollowPolicy::new())
        .follow(TaskRef::from_report("/v1/videos/text2video", &ended).created_at(created))
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Succeeded);
    assert_eq!(mock.stats().requests_total - before, 1);

    // One still running: one query, then the follow gives up within the longest interval.
    let long = MockKling::new(
        MockConfig::preset(Preset::Pro)
            .no_rate_limit()
            .task_duration(Duration::from_secs(7200), Duration::from_secs(7200)),
    )
    .unwrap();
    let service = ClassifyLayer::new().layer(long.clone());
    let running = create(&service, "/text-to-video/kling-3.0").await;
    let created = Instant::now();
    tokio::time::advance(Duration::from_secs(31 * 60)).await;
    let before = long.stats().requests_total;
    let start = Instant::now();
    let err = follower(service, FollowPolicy::new())
        .follow(TaskRef::from_report("/text-to-video/kling-3.0", &running).created_at(created))
        .await
        .unwrap_err();
    match err {
        FollowError::DeadlineExceeded { last_status, .. } => {
            assert_eq!(last_status.as_deref(), Some("processing"));
        }
        other => panic!("{other}"),
    }
    assert_eq!(long.stats().requests_total - before, 1);
    assert_eq!(start.elapsed(), Duration::from_secs(30));
}

/// How many queries one task followed alone from its start until `deadline` takes under
/// `policy` (without `callbacks_first`) when every answer is "still running": its first
/// query, then one per interval, and a last one a shortest interval before the deadline
/// unless one was answered within a shortest interval before that.
fn queries_until(policy: &FollowPolicy, first: Duration, deadline: Duration) -> usize {
    // The shortest interval: the one at age 0.
    let shortest = policy.interval(Duration::ZERO);
    let last_call = deadline - shortest;
    let (mut at, mut queries) = (first.min(last_call), 0);
    while at < deadline {
        queries += 1;
        let next = at + policy.interval(at);
        at = if next > last_call && at + shortest <= last_call {
            last_call
        } else {
            next
        };
    }
    queries
}

/// 20 external ids no create carries and one real task created with the external id `real`
/// (ending `run` seconds after its create), all followed by external id in one call with a
/// 600 s deadline against the mock: each result, and every query's URI.
async fn twenty_unknown_external_ids_and_a_real_one(
    run: u64,
) -> (Vec<Result<TaskReport, FollowError>>, Vec<String>) {
    let classify = ClassifyLayer::new().layer(mock(run, run));
    let task = create_with(
        &classify,
        "/text-to-video/kling-3.0",
        &with_external_id("real"),
    )
    .await;
    let (service, uris) = logging_uris(classify);
    let one = follower(
        service,
        FollowPolicy::new().deadline(Duration::from_secs(600)),
    );
    let mut tasks: Vec<TaskRef> = (0..20)
        .map(|i| TaskRef::new_style_external(format!("lost-{i}")))
        .collect();
    tasks.insert(7, TaskRef::new_style_external("real"));
    let results = one.follow_many(tasks).await;
    let done = results[7].as_ref().unwrap();
    assert_eq!((&done.id, &done.status), (&task.id, &TaskStatus::Succeeded));
    for (i, result) in results.iter().enumerate().filter(|(i, _)| *i != 7) {
        assert!(
            matches!(
                result,
                Err(FollowError::DeadlineExceeded {
                    last_status: None,
                    ..
                })
            ),
            "{i}: {result:?}"
        );
    }
    let uris = uris.lock().unwrap().clone();
    (results, uris)
}

/// External ids no answer lists are asked about in batches for the whole deadline, not alone:
/// once one left out of a successful batch answer has met `1203` alone (one query), a batch
/// answer that leaves one out says what a lone `1203` says ("not listed yet"), and the mock,
/// seen leaving them out, refuses a batch with `1203` only when it lists none of its ids.
/// Asked about alone from the first answer on, 20 such ids beside one real task took 674
/// queries in 600 s (692 with the real task ending at 550 s); with a lone `1203` sending them
/// back into batches only, 413 (53). Batched, they take no more than one task followed alone,
/// which the policy gives (its first query at 5 s, then one per interval, and the last one at
/// 598 s: 34), and that one.
#[tokio::test(start_paused = true)]
async fn external_ids_no_answer_lists_stay_in_batches() {
    let batched = queries_until(
        &FollowPolicy::new(),
        Duration::from_secs(5),
        Duration::from_secs(600),
    );
    // The real task ends early (the lost ids then alone in their batches) and late.
    for run in [60, 550] {
        let (_, uris) = twenty_unknown_external_ids_and_a_real_one(run).await;
        assert!(
            uris.len() <= batched + 1,
            "ran {run} s: {} queries, batched {batched}: {uris:?}",
            uris.len()
        );
        let alone: Vec<&String> = uris.iter().filter(|u| !u.contains(',')).collect();
        assert_eq!(alone.len(), 1, "ran {run} s: one lone query: {uris:?}");
        assert!(
            uris.iter()
                .filter(|u| u.contains(','))
                .all(|u| u.contains("lost-0,") && u.contains("lost-19")),
            "ran {run} s: every batch asks about every lost id: {uris:?}"
        );
    }
}

/// A batch of external ids refused whole with `1203`, as Kling may refuse one with an id it
/// does not list (not the mock's way): each id is asked about alone once, the real one is
/// found, and those that meet `1203` alone go back into one batch, not alone for ever.
#[tokio::test(start_paused = true)]
async fn external_ids_refused_in_a_batch_are_asked_alone_once_then_batched_again() {
    let classify = ClassifyLayer::new().layer(mock(20, 20));
    let task = create_with(
        &classify,
        "/text-to-video/kling-3.0",
        &with_external_id("real"),
    )
    .await;
    let uris: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = uris.clone();
    let service = ServiceBuilder::new()
        .map_request(move |mut req: http::Request<Full<Bytes>>| {
            let uri = req.uri().to_string();
            if uri.contains(',') && uri.contains("lost-") {
                *req.uri_mut() = "/tasks?external_task_ids=lost-0".parse().unwrap();
            }
            log.lock().unwrap().push(uri);
            req
        })
        .service(classify);
    let one = follower(
        service,
        FollowPolicy::new().deadline(Duration::from_secs(60)),
    );
    let results = one
        .follow_many(vec![
            TaskRef::new_style_external("lost-0"),
            TaskRef::new_style_external("real"),
            TaskRef::new_style_external("lost-1"),
        ])
        .await;
    assert_eq!(results[1].as_ref().unwrap().id, task.id);
    for result in [&results[0], &results[2]] {
        assert_ran_out(result);
    }
    let uris = uris.lock().unwrap();
    let by = |ids: &str| format!("/tasks?external_task_ids={ids}");
    assert_eq!(uris[0], by("lost-0,real,lost-1"), "{uris:?}");
    let mut alone: Vec<&str> = uris[1..4].iter().map(String::as_str).collect();
    alone.sort_unstable();
    assert_eq!(alone, [by("lost-0"), by("lost-1"), by("real")], "{uris:?}");
    assert_eq!(uris[4], by("lost-0,real,lost-1"), "batched again: {uris:?}");
    // Refused again and again: never asked about alone twice in a row.
    let mut last_alone: HashMap<&str, bool> = HashMap::new();
    for uri in uris.iter() {
        let ids = uri.trim_start_matches("/tasks?external_task_ids=");
        let alone = !ids.contains(',');
        for id in ids.split(',') {
            let before = last_alone.insert(id, alone).unwrap_or(false);
            assert!(!(alone && before), "{id} alone twice in a row: {uris:?}");
        }
    }
    assert!(uris.len() > 8, "refused more than once: {uris:?}");
}

/// With `callbacks_first`, a task past its deadline when following starts is asked about at
/// once too: its first query waited for the safety interval from its creation, past the
/// longest interval the follow then had left, so it ended `DeadlineExceeded` unasked.
#[tokio::test(start_paused = true)]
async fn a_task_past_its_deadline_is_asked_about_at_once_with_callbacks_first() {
    let mock = mock(10, 10);
    let service = ClassifyLayer::new().layer(mock.clone());
    let ended = create(&service, "/text-to-video/kling-3.0").await;
    let created = Instant::now();
    tokio::time::advance(Duration::from_secs(70)).await;
    let before = mock.stats().requests_total;
    let start = Instant::now();
    let policy = FollowPolicy::new()
        .deadline(Duration::from_secs(60))
        .callbacks_first(Duration::from_secs(120));
    let done = follower(service, policy)
        .follow(TaskRef::from_report("/text-to-video/kling-3.0", &ended).created_at(created))
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Succeeded);
    assert_eq!(mock.stats().requests_total - before, 1);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

/// A batch answer that leaves an external id out for another reason than not listing it (here
/// a server that answers one report per query, as a page limit would) no longer teaches the
/// follower that the server lists what it finds: on a server that refuses a whole batch with
/// `1203` for one unknown id, the real tasks batched with one were settled "not listed yet"
/// at each refusal and never asked alone, and ended `DeadlineExceeded` though they had
/// succeeded. An id left out is asked about alone until a lone `1203` confirms the server
/// leaves out only what it does not list.
#[tokio::test(start_paused = true)]
async fn a_batch_answer_leaving_a_real_external_id_out_does_not_starve_it_after_a_refusal() {
    let classify = ClassifyLayer::new().layer(mock(40, 40));
    for ext in ["real-a", "real-b"] {
        create_with(
            &classify,
            "/text-to-video/kling-3.0",
            &with_external_id(ext),
        )
        .await;
    }
    let uris: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = uris.clone();
    let service = ServiceBuilder::new()
        .map_request(move |mut req: http::Request<Full<Bytes>>| {
            let uri = req.uri().to_string();
            if let Some(ids) = uri.strip_prefix("/tasks?external_task_ids=")
                && ids.contains(',')
            {
                // One unknown id refuses the batch; otherwise one report per answer.
                let first = if ids.contains("lost-") {
                    "lost-0"
                } else {
                    ids.split(',').next().unwrap()
                };
                *req.uri_mut() = format!("/tasks?external_task_ids={first}").parse().unwrap();
            }
            log.lock().unwrap().push(uri);
            req
        })
        .service(classify);
    let one = follower(
        service,
        FollowPolicy::new().deadline(Duration::from_secs(120)),
    );
    // All three of one age: once in one batch, due together.
    let start = Instant::now();
    let other = one.clone();
    let lost = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let lost = TaskRef::new_style_external("lost-0").created_at(start);
        other.follow(lost).await
    });
    let results = one
        .follow_many(vec![
            TaskRef::new_style_external("real-a").created_at(start),
            TaskRef::new_style_external("real-b").created_at(start),
        ])
        .await;
    let uris = uris.lock().unwrap().clone();
    for result in &results {
        let done = result.as_ref().unwrap_or_else(|e| panic!("{e}: {uris:?}"));
        assert_eq!(done.status, TaskStatus::Succeeded);
    }
    assert!(
        uris.iter()
            .any(|u| u.contains("lost-0,") || u.contains(",lost-0")),
        "the unknown id shared batches: {uris:?}"
    );
    let lost = lost.await.unwrap();
    assert!(
        matches!(lost, Err(FollowError::DeadlineExceeded { .. })),
        "{lost:?}"
    );
}

/// An external id a batch answer leaves out for another reason than not listing it (a server
/// that answers one report per query, as a page limit would) is asked about alone, as a task
/// id is: settled "not listed yet" in batches, it was never seen while the task listed first
/// ran (both ended `DeadlineExceeded` here, the second never reported).
#[tokio::test(start_paused = true)]
async fn an_external_id_a_batch_answer_leaves_out_is_asked_about_alone_until_it_is_listed() {
    let classify = ClassifyLayer::new().layer(mock(600, 600));
    for ext in ["real-a", "real-b"] {
        create_with(
            &classify,
            "/text-to-video/kling-3.0",
            &with_external_id(ext),
        )
        .await;
    }
    let service = ServiceBuilder::new()
        .map_request(move |mut req: http::Request<Full<Bytes>>| {
            let uri = req.uri().to_string();
            if let Some(ids) = uri.strip_prefix("/tasks?external_task_ids=")
                && let Some((first, _)) = ids.split_once(',')
            {
                *req.uri_mut() = format!("/tasks?external_task_ids={first}").parse().unwrap();
            }
            req
        })
        .service(classify);
    let one = follower(
        service,
        FollowPolicy::new().deadline(Duration::from_secs(60)),
    );
    let results = one
        .follow_many(vec![
            TaskRef::new_style_external("real-a"),
            TaskRef::new_style_external("real-b"),
        ])
        .await;
    for result in &results {
        assert!(
            matches!(
                result,
                Err(FollowError::DeadlineExceeded {
                    last_status: Some(_),
                    ..
                })
            ),
            "seen not ended: {result:?}"
        );
    }
}

/// With `callbacks_first`, a fresh task whose deadline is shorter than the safety interval is
/// asked about once, a shortest interval (2 s) before its deadline: its first query waited the
/// safety interval, past the deadline, so a task that had succeeded (its callback lost) ended
/// `DeadlineExceeded` unasked. Legacy (queried by its call) and new-style (batched) alike.
#[tokio::test(start_paused = true)]
async fn with_callbacks_first_a_deadline_within_the_safety_interval_is_asked_about_before_it() {
    let mock = mock(30, 30);
    let service = ClassifyLayer::new().layer(mock.clone());
    let legacy = create(&service, "/v1/videos/text2video").await;
    let new_style = create(&service, "/text-to-video/kling-3.0").await;
    let before = mock.stats().requests_total;
    let start = Instant::now();
    let policy = FollowPolicy::new()
        .deadline(Duration::from_secs(60))
        .callbacks_first(Duration::from_secs(120));
    let results = follower(service, policy)
        .follow_many(vec![
            TaskRef::from_report("/v1/videos/text2video", &legacy),
            TaskRef::from_report("/text-to-video/kling-3.0", &new_style),
        ])
        .await;
    for result in results {
        assert_eq!(result.unwrap().status, TaskStatus::Succeeded);
    }
    assert_eq!(mock.stats().requests_total - before, 2, "one query each");
    assert_eq!(start.elapsed(), Duration::from_secs(58));
}

/// A policy whose interval is the task's age (2 s to 50 s), first query at 5 s: queries at 5,
/// 10, 20, 40, 80, 130 and 180 s, the next one at 230 s.
fn age_policy(deadline: u64) -> FollowPolicy {
    FollowPolicy::new()
        .interval_bounds(Duration::from_secs(2), Duration::from_secs(50))
        .age_factor(1.0)
        .deadline(Duration::from_secs(deadline))
}

/// A task whose next query falls after its deadline is asked about once more, a shortest
/// interval before the deadline (it ended `DeadlineExceeded` though it had succeeded 13 s
/// before): here a task ending at 185 s, deadline 200 s, last regular query at 180 s. Three
/// calls' tasks of one age share that last query, as every other (not a query each), and a
/// legacy task gets its own.
#[tokio::test(start_paused = true)]
async fn a_task_whose_next_query_falls_after_its_deadline_is_asked_about_just_before_it() {
    let classify = ClassifyLayer::new().layer(mock(185, 185));
    let tasks = create_new_style(&classify, 3).await;
    let legacy = create(&classify, "/v1/videos/text2video").await;
    let (service, uris) = logging_uris(classify);
    let one = follower(service, age_policy(200));
    let start = Instant::now();
    let calls: Vec<_> = tasks
        .into_iter()
        .map(|task| {
            let one = one.clone();
            tokio::spawn(async move { one.follow(task).await })
        })
        .collect();
    let done = one
        .follow(TaskRef::from_report("/v1/videos/text2video", &legacy))
        .await;
    assert_eq!(done.unwrap().status, TaskStatus::Succeeded);
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().status, TaskStatus::Succeeded);
    }
    assert_eq!(start.elapsed(), Duration::from_secs(198));
    let uris = uris.lock().unwrap();
    let (batches, legacy): (Vec<&String>, Vec<&String>) =
        uris.iter().partition(|u| u.starts_with("/tasks?"));
    assert_eq!(batches.len(), 8, "seven and the last: {uris:?}");
    assert!(
        batches.iter().all(|u| u.matches(',').count() == 2),
        "{uris:?}"
    );
    assert_eq!(legacy.len(), 8, "{uris:?}");
}

/// The last query before the deadline is not sent when a query was answered within a
/// shortest interval before it (here at 180 s, the deadline at 183 s): queries stay a shortest
/// interval apart at least.
#[tokio::test(start_paused = true)]
async fn a_task_answered_just_before_its_last_query_is_not_asked_again() {
    let classify = ClassifyLayer::new().layer(mock(185, 185));
    let task = create(&classify, "/text-to-video/kling-3.0").await;
    let (service, uris) = logging_uris(classify);
    let start = Instant::now();
    let err = follower(service, age_policy(183))
        .follow(TaskRef::from_report("/text-to-video/kling-3.0", &task))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, FollowError::DeadlineExceeded { last_status: Some(s), .. } if s == "processing"),
        "{err}"
    );
    assert_eq!(start.elapsed(), Duration::from_secs(183));
    let uris = uris.lock().unwrap();
    assert_eq!(uris.len(), 7, "{uris:?}");
}

/// An external id left out of a batch answer and asked about alone that gets a successful
/// answer listing no task (code 0, where the mock answers `1203`) goes back into batches, as
/// one that meets `1203` alone: it stayed alone, one query per interval each, until the
/// deadline (47 lone queries in 120 s here). It also shows the server leaves out what it does not
/// list, as a lone `1203` does: the other id left out goes back too, unasked alone, and a
/// `1203` to a batch of them later sends none back alone.
#[tokio::test(start_paused = true)]
async fn an_external_id_a_lone_query_answers_with_no_task_goes_back_into_batches() {
    let classify = ClassifyLayer::new().layer(mock(60, 60));
    let task = create_with(
        &classify,
        "/text-to-video/kling-3.0",
        &with_external_id("real"),
    )
    .await;
    let (logged, uris) = logging_uris(classify);
    let service = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let logged = logged.clone();
        async move {
            let uri = req.uri().to_string();
            let lone_lost = uri
                .strip_prefix("/tasks?external_task_ids=lost-")
                .is_some_and(|rest| !rest.contains(','));
            let response = logged.oneshot(req).await?;
            if !lone_lost {
                return Ok::<_, BoxError>(response);
            }
            let body = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":[]}"#;
            Ok(http::Response::new(Full::new(Bytes::from_static(
                body.as_bytes(),
            ))))
        }
    });
    let results = follower(
        service,
        FollowPolicy::new().deadline(Duration::from_secs(120)),
    )
    .follow_many(vec![
        TaskRef::new_style_external("lost-0"),
        TaskRef::new_style_external("real"),
        TaskRef::new_style_external("lost-1"),
    ])
    .await;
    assert_eq!(results[1].as_ref().unwrap().id, task.id);
    for result in [&results[0], &results[2]] {
        assert_ran_out(result);
    }
    let uris = uris.lock().unwrap();
    let by = |ids: &str| format!("/tasks?external_task_ids={ids}");
    assert_eq!(uris[0], by("lost-0,real,lost-1"), "{uris:?}");
    // The first answer alone sends both back: one left out, the other not listed either.
    assert!(
        uris[1] == by("lost-0") || uris[1] == by("lost-1"),
        "{uris:?}"
    );
    assert!(uris[2..].iter().all(|u| u.contains(',')), "{uris:?}");
    assert!(uris.len() > 10, "followed to the deadline: {uris:?}");
}

/// An external id asked about alone because its batch was refused (here with `1203`, the
/// mock's answer to an id it does not list, as Kling may refuse a batch) that gets a
/// successful answer listing no task goes back into batches too: it stayed alone.
#[tokio::test(start_paused = true)]
async fn an_external_id_alone_after_a_refused_batch_goes_back_at_an_answer_listing_none() {
    let classify = ClassifyLayer::new().layer(mock(20, 20));
    let task = create_with(
        &classify,
        "/text-to-video/kling-3.0",
        &with_external_id("real"),
    )
    .await;
    let uris: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = uris.clone();
    let service = tower::service_fn(move |mut req: http::Request<Full<Bytes>>| {
        let classify = classify.clone();
        let uri = req.uri().to_string();
        log.lock().unwrap().push(uri.clone());
        async move {
            let lost = uri.contains("lost-");
            if lost && !uri.contains(',') {
                let body = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":[]}"#;
                return Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from_static(
                    body.as_bytes(),
                ))));
            }
            if lost {
                // Refused whole for the ids it does not list.
                *req.uri_mut() = "/tasks?external_task_ids=lost-0".parse().unwrap();
            }
            classify.oneshot(req).await
        }
    });
    let results = follower(
        service,
        FollowPolicy::new().deadline(Duration::from_secs(60)),
    )
    .follow_many(vec![
        TaskRef::new_style_external("lost-0"),
        TaskRef::new_style_external("real"),
        TaskRef::new_style_external("lost-1"),
    ])
    .await;
    assert_eq!(results[1].as_ref().unwrap().id, task.id);
    let uris = uris.lock().unwrap();
    let by = |ids: &str| format!("/tasks?external_task_ids={ids}");
    assert_eq!(uris[4], by("lost-0,real,lost-1"), "batched again: {uris:?}");
    let mut last_alone: HashMap<&str, bool> = HashMap::new();
    for uri in uris.iter() {
        let ids = uri.trim_start_matches("/tasks?external_task_ids=");
        let alone = !ids.contains(',');
        for id in ids.split(',') {
            let before = last_alone.insert(id, alone).unwrap_or(false);
            assert!(!(alone && before), "{id} alone twice in a row: {uris:?}");
        }
    }
}

/// A server that fails every query is asked about each task no sooner than the error backoff
/// allows (1 s doubling to 60 s), up to the deadline: a retry that falls after the deadline is
/// not brought forward to a last query. Brought forward, each task's last call (a shortest
/// interval before its own deadline) was a query of its own, unbatched: 100 tasks created 1 s
/// apart with a 600 s deadline took 177 queries of a failing server, 82 with the backoff kept.
#[tokio::test(start_paused = true)]
async fn a_failing_server_is_not_asked_sooner_than_the_backoff_near_the_deadline() {
    let start = Instant::now();
    let sent: Arc<Mutex<Vec<(Duration, String)>>> = Arc::default();
    let log = sent.clone();
    let service = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        log.lock()
            .unwrap()
            .push((start.elapsed(), req.uri().to_string()));
        async { Err::<http::Response<Full<Bytes>>, BoxError>("connection reset".into()) }
    });
    let tasks: Vec<TaskRef> = (0..10u64)
        .map(|i| {
            TaskRef::new_style(format!("t{i}")).created_at(start - Duration::from_secs(3 * (9 - i)))
        })
        .collect();
    let policy = FollowPolicy::new().deadline(Duration::from_secs(300));
    let results = follower(service, policy.clone()).follow_many(tasks).await;
    for result in &results {
        assert_ran_out(result);
    }
    let sent = sent.lock().unwrap();
    let mut asked: HashMap<String, Vec<Duration>> = HashMap::new();
    for (at, uri) in sent.iter() {
        let ids = uri.strip_prefix("/tasks?task_ids=").unwrap();
        for id in ids.split(',') {
            asked.entry(id.to_owned()).or_default().push(*at);
        }
    }
    assert_eq!(asked.len(), 10, "{sent:?}");
    for (id, times) in &asked {
        for (failures, pair) in times.windows(2).enumerate() {
            let backoff = policy.backoff(failures as u32 + 1);
            assert!(
                pair[1] - pair[0] >= backoff,
                "{id} asked {:?} after failure {}, backoff {backoff:?}: {sent:?}",
                pair[1] - pair[0],
                failures + 1
            );
        }
    }
}

/// Queries as a server saw them: when each came, and the ids it asked about.
type Sent = Vec<(Duration, Vec<String>)>;

/// What [`last_queries_scenario`] saw: every query, and each task's follow.
struct LastQueries {
    sent: Sent,
    tasks: Vec<Followed>,
}

/// A task of [`last_queries_scenario`]: its id, deadline, whether it ends, and its result.
struct Followed {
    id: String,
    deadline: Duration,
    ends: bool,
    result: Result<TaskReport, FollowError>,
}

/// Sixty new-style tasks created a second apart, each followed by a call of its own on clones of
/// one follower (as the batch tool does) with a 300 s deadline, through an in-memory server
/// that reports each task processing until its end: even ones end 13 s before their deadline
/// (after their last regular query, before their last query at the latest slack), odd ones
/// never.
async fn last_queries_scenario(policy: FollowPolicy) -> LastQueries {
    const TASKS: u64 = 60;
    let deadline = Duration::from_secs(300);
    let start = Instant::now();
    let created = |i: u64| Duration::from_secs(i);
    let ends: HashMap<String, Duration> = (0..TASKS)
        .filter(|i| i % 2 == 0)
        .map(|i| {
            (
                format!("t{i}"),
                created(i) + deadline - Duration::from_secs(13),
            )
        })
        .collect();
    let sent: Arc<Mutex<Sent>> = Arc::default();
    let log = sent.clone();
    let service = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let at = start.elapsed();
        let ids: Vec<String> = req
            .uri()
            .to_string()
            .strip_prefix("/tasks?task_ids=")
            .expect("a batch query by task ids")
            .split(',')
            .map(str::to_owned)
            .collect();
        let reports: Vec<String> = ids
            .iter()
            .map(|id| {
                let ended = ends.get(id).is_some_and(|end| *end <= at);
                let status = if ended { "succeeded" } else { "processing" };
                format!(r#"{{"id":"{id}","status":"{status}"}}"#)
            })
            .collect();
        log.lock().unwrap().push((at, ids));
        let body = format!(
            r#"{{"code":0,"message":"SUCCEED","request_id":"r","data":[{}]}}"#,
            reports.join(",")
        );
        async move { Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from(body)))) }
    });
    let one = follower(service, policy.deadline(deadline));
    let mut calls = Vec::new();
    for i in 0..TASKS {
        tokio::time::sleep_until(start + created(i)).await;
        let one = one.clone();
        let id = format!("t{i}");
        calls.push(tokio::spawn(async move {
            one.follow(TaskRef::new_style(id)).await
        }));
    }
    let mut tasks = Vec::new();
    for (i, call) in (0..TASKS).zip(calls) {
        let id = format!("t{i}");
        tasks.push(Followed {
            id,
            deadline: created(i) + deadline,
            ends: i % 2 == 0,
            result: call.await.unwrap(),
        });
    }
    let sent = sent.lock().unwrap().clone();
    LastQueries { sent, tasks }
}

/// The last queries of tasks whose deadlines are spread over a window ride in the batch
/// queries sent anyway, up to a slack of 10 s before they are due: 152 queries here, where
/// the control (no slack, the default) sends each last query at its own time, and takes
/// 164. Every task is still asked about within the slack (at least a shortest
/// interval, as any task due that soon rides in a batch) and a shortest interval before its
/// deadline, so each that ended by then ends with its report, and none is asked about twice
/// within a shortest interval.
#[tokio::test(start_paused = true)]
async fn last_queries_before_spread_deadlines_ride_in_batches() {
    let slack = Duration::from_secs(10);
    let lead = Duration::from_secs(2);
    let with_slack = last_queries_scenario(FollowPolicy::new().last_query_slack(slack)).await;
    let without = last_queries_scenario(FollowPolicy::new()).await;
    for (run, slack) in [(&with_slack, slack), (&without, Duration::ZERO)] {
        let mut asked: HashMap<&str, Vec<Duration>> = HashMap::new();
        for (at, ids) in &run.sent {
            for id in ids {
                asked.entry(id).or_default().push(*at);
            }
        }
        for Followed {
            id,
            deadline,
            ends,
            result,
        } in &run.tasks
        {
            let times = &asked[id.as_str()];
            for pair in times.windows(2) {
                assert!(pair[1] - pair[0] >= lead, "{id} asked at {times:?}");
            }
            let last = *times.last().unwrap();
            assert!(last <= *deadline - lead, "{id} asked at {times:?}");
            match (ends, result) {
                (true, Ok(report)) => assert_eq!(report.status, TaskStatus::Succeeded),
                (false, Err(FollowError::DeadlineExceeded { .. })) => {
                    assert!(
                        last >= *deadline - lead - slack.max(lead),
                        "{id} not asked near its deadline {deadline:?}: {times:?}"
                    );
                }
                _ => panic!("{id}: {result:?}"),
            }
        }
    }
    let (batched, alone) = (with_slack.sent.len(), without.sent.len());
    assert!(
        batched * 100 <= alone * 95,
        "{batched} queries against {alone}: not 5% fewer"
    );
}

/// Task `a` followed from the start and task `b`, created 60 s before, followed from `b_at`
/// (due at once), on clones of one follower with [`age_policy`], a 93 s deadline and `slack`,
/// through an in-memory server that reports every task processing: when each was asked about.
async fn last_query_beside_a_late_call(
    b_at: Duration,
    slack: Duration,
) -> HashMap<String, Vec<Duration>> {
    let start = Instant::now();
    let (asked, note) = each_id_asked();
    let service = reporting_processing(start, true, note);
    let one = follower(service, age_policy(93).last_query_slack(slack));
    let b = TaskRef::new_style("b").created_at(start + b_at - Duration::from_secs(60));
    follow_a_then_b(one, start, b_at, b).await;
    asked.lock().unwrap().clone()
}

/// A batch takes a task's last query along ahead of its time only a shortest interval after
/// its last answer: here `a` is answered at 80 s and its last query is due at 91 s. A batch
/// sent at 81.5 s (a call starting on a task already due) leaves it out, as it took it along
/// 1.5 s after its previous query; one sent at 82 s takes it along, and it is not asked again.
#[tokio::test(start_paused = true)]
async fn a_last_query_rides_in_a_batch_no_sooner_than_a_shortest_interval_after_an_answer() {
    let secs = Duration::from_secs_f64;
    let regular: Vec<Duration> = [5.0, 10.0, 20.0, 40.0, 80.0].map(secs).to_vec();
    let early = last_query_beside_a_late_call(secs(81.5), secs(10.0)).await;
    assert_eq!(early["a"], [regular.clone(), vec![secs(91.0)]].concat());
    assert_eq!(early["b"], [secs(81.5), secs(112.5)]);
    let riding = last_query_beside_a_late_call(secs(82.0), secs(10.0)).await;
    assert_eq!(riding["a"], [regular, vec![secs(82.0)]].concat());
    assert_eq!(riding["b"], [secs(82.0), secs(113.0)]);
}

/// With no slack, a last query still rides in a batch sent within a shortest interval before
/// it, as any task due that soon: `a`'s, due at 91 s (deadline 93 s), rides in `b`'s first
/// query at 89.5 s and is not asked again, its last answer 3.5 s before its deadline (two
/// shortest intervals at most, as its docs say); a batch at 88.5 s leaves it to its time.
#[tokio::test(start_paused = true)]
async fn with_no_slack_a_last_query_rides_in_a_batch_within_a_shortest_interval_of_it() {
    let secs = Duration::from_secs_f64;
    let regular: Vec<Duration> = [5.0, 10.0, 20.0, 40.0, 80.0].map(secs).to_vec();
    let riding = last_query_beside_a_late_call(secs(89.5), Duration::ZERO).await;
    assert_eq!(riding["a"], [regular.clone(), vec![secs(89.5)]].concat());
    assert_eq!(riding["b"], [secs(89.5), secs(120.5)]);
    let apart = last_query_beside_a_late_call(secs(88.5), Duration::ZERO).await;
    assert_eq!(apart["a"], [regular, vec![secs(91.0)]].concat());
    assert_eq!(apart["b"], [secs(88.5), secs(119.5)]);
}

/// External ids `x1` (never listed) and `x2` (listed from 5.5 s, ended at 6 s), created as
/// following starts and followed by one call with a 19 s deadline (last call at 17 s), an
/// interval of the task's age, and `slack`, through a server that leaves out of a batch answer
/// what it does not list and answers a lone query about `x1` with `1203` after 9 s: the result
/// for `x2`, and when each query came with the ids it asked about.
async fn left_out_beside_a_slow_lone_1203(
    slack: Duration,
) -> (Result<TaskReport, FollowError>, Vec<(Duration, String)>) {
    let start = Instant::now();
    let sent: Arc<Mutex<Vec<(Duration, String)>>> = Arc::default();
    let log = sent.clone();
    let service = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let at = start.elapsed();
        let uri = req.uri().to_string();
        let ids = uri
            .strip_prefix("/tasks?external_task_ids=")
            .unwrap()
            .to_owned();
        log.lock().unwrap().push((at, ids.clone()));
        async move {
            let listed: Vec<String> = ids
                .split(',')
                .filter(|id| *id == "x2" && at >= Duration::from_millis(5_500))
                .map(|id| {
                    let status = if at >= Duration::from_secs(6) {
                        "succeeded"
                    } else {
                        "processing"
                    };
                    format!(r#"{{"id":"t-{id}","external_id":"{id}","status":"{status}"}}"#)
                })
                .collect();
            let body = if ids == "x1" {
                tokio::time::sleep(Duration::from_secs(9)).await;
                r#"{"code":1203,"message":"not found","request_id":"r"}"#.to_owned()
            } else {
                format!(
                    r#"{{"code":0,"message":"SUCCEED","request_id":"r","data":[{}]}}"#,
                    listed.join(",")
                )
            };
            Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from(body))))
        }
    });
    let policy = FollowPolicy::new()
        .interval_bounds(Duration::from_secs(2), Duration::from_secs(30))
        .age_factor(1.0)
        .deadline(Duration::from_secs(19))
        .last_query_slack(slack);
    let one = follower(service, policy);
    let mut results = one
        .follow_many(vec![
            TaskRef::new_style_external("x1"),
            TaskRef::new_style_external("x2"),
        ])
        .await;
    let sent = sent.lock().unwrap().clone();
    (results.remove(1), sent)
}

/// An external id left out of a batch answer at 5 s, waiting to be asked about alone while a
/// lone query about another takes 9 s to meet its `1203`, is put back into batches at 14 s,
/// within the slack before its last call (17 s): its last answer is still the one at 5 s,
/// outside the slack, so its last call stays. It ended at 6 s, 13 s before its deadline, more
/// than the slack and a shortest interval: it ends with its report, asked about at 17 s (it
/// ended `DeadlineExceeded`, never asked again, as if the `1203` were its own answer). `x1`,
/// whose `1203` at 14 s is within the slack, is not asked again; with no slack (the control)
/// both are, at 17 s.
#[tokio::test(start_paused = true)]
async fn an_id_put_back_into_batches_within_the_slack_keeps_its_last_call() {
    let secs = Duration::from_secs;
    for (slack, last) in [(secs(8), "x2"), (Duration::ZERO, "x1,x2")] {
        let (x2, sent) = left_out_beside_a_slow_lone_1203(slack).await;
        let expected =
            [("x1,x2", 5), ("x1", 5), (last, 17)].map(|(ids, at)| (secs(at), ids.to_owned()));
        assert_eq!(sent, expected, "slack {slack:?}");
        let x2 = x2.unwrap();
        assert_eq!((&*x2.id, x2.status), ("t-x2", TaskStatus::Succeeded));
    }
}

/// What kind of task a random schedule follows.
#[derive(Clone, Copy, Debug, PartialEq)]
enum RandomKind {
    NewStyle,
    External,
    Legacy,
    Unknown,
}

/// One task of a random schedule: who follows it, when, and how it goes on the server.
#[derive(Clone, Debug)]
struct RandomTask {
    id: String,
    kind: RandomKind,
    /// When its call starts, from the scenario's start.
    follow_at: Duration,
    /// Its age when its call starts (created that long before).
    age: Duration,
    /// When it ends on the server, if it does; an external id is listed from `listed`.
    end: Option<Duration>,
    listed: Duration,
    /// 0: the base follower, 1: a clone, 2: a clone with another account.
    clone: usize,
    /// Its end is delivered as a callback too (at its end).
    delivered: bool,
}

/// A small deterministic generator (no dependency for it).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// `count` tasks of every kind, followed within 2 minutes, drawn from `seed`, for a policy with
/// `deadline` (seconds).
fn random_tasks(seed: u64, count: usize, deadline: u64) -> Vec<RandomTask> {
    let mut rng = Lcg(seed);
    (0..count)
        .map(|i| {
            let kind = match rng.below(20) {
                0..=12 => RandomKind::NewStyle,
                13..=15 => RandomKind::External,
                16..=18 => RandomKind::Legacy,
                _ => RandomKind::Unknown,
            };
            let follow_at = Duration::from_millis(rng.below(120_000));
            // Mostly young, some past their deadline when following starts.
            let age = match rng.below(10) {
                0 => Duration::from_secs(deadline + rng.below(100)),
                1 | 2 => Duration::from_millis(rng.below(deadline * 1000)),
                _ => Duration::from_millis(rng.below(5_000)),
            };
            let created = follow_at.saturating_sub(age);
            let end = (rng.below(3) != 0)
                .then(|| created + Duration::from_millis(rng.below((deadline + 30) * 1000)));
            RandomTask {
                id: format!("{}{i}", ["n", "x", "l", "u"][kind as usize]),
                kind,
                follow_at,
                age,
                end,
                listed: created + Duration::from_millis(rng.below(20_000)),
                clone: rng.below(3) as usize,
                delivered: rng.below(2) == 0,
            }
        })
        .collect()
}

/// A report parsed from a new-style answer body (a test cannot build one).
fn parsed_report(json: &str) -> TaskReport {
    let body = format!(r#"{{"code":0,"message":"SUCCEED","request_id":"r","data":[{json}]}}"#);
    let mut response = http::Response::new(Full::new(Bytes::from(body)));
    Outcome::ensure(&mut response).unwrap().tasks()[0].clone()
}

/// A query of a random schedule: when, as which account, its URI, and the ids its answer
/// tells about (those it lists, or every id asked at a `1203`; a task a batch answer leaves
/// out was asked about but not answered).
type ScheduleQuery = (Duration, String, String, Vec<String>);

/// Every query (when, account, URI) and every follow's end (its id, when, the result as text) of
/// `tasks` followed with `policy` through an in-memory server: new-style tasks as they are (at
/// most `page` of them in an answer by task ids, as a page limit would: the others are left
/// out, and asked about alone), external ids once listed (a batch answer leaves out the
/// others, a lone query meets `1203`), legacy tasks at their path, unknown ids never.
async fn random_schedule_log(
    policy: FollowPolicy,
    tasks: Vec<RandomTask>,
    page: usize,
) -> (Vec<ScheduleQuery>, Vec<(String, Duration, String)>) {
    let start = Instant::now();
    let by_id: HashMap<String, RandomTask> =
        tasks.iter().map(|t| (t.id.clone(), t.clone())).collect();
    let queries: Arc<Mutex<Vec<ScheduleQuery>>> = Arc::default();
    let log = queries.clone();
    let service = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let at = start.elapsed();
        let uri = req.uri().to_string();
        let account = AccountId::of(&req)
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let status = |t: &RandomTask, legacy: bool| {
            let ended = t.end.is_some_and(|end| end <= at);
            match (ended, legacy) {
                (true, true) => "succeed",
                (true, false) => "succeeded",
                (false, _) => "processing",
            }
        };
        let (asked, listed): (Vec<&str>, Vec<&RandomTask>) =
            if let Some(ids) = uri.strip_prefix("/tasks?task_ids=") {
                let asked: Vec<&str> = ids.split(',').collect();
                let listed = (asked.iter().filter_map(|id| by_id.get(*id)))
                    .filter(|t| t.kind == RandomKind::NewStyle)
                    .take(page)
                    .collect();
                (asked, listed)
            } else if let Some(ids) = uri.strip_prefix("/tasks?external_task_ids=") {
                let asked: Vec<&str> = ids.split(',').collect();
                let listed = (asked.iter().filter_map(|id| by_id.get(*id)))
                    .filter(|t| t.kind == RandomKind::External && t.listed <= at)
                    .collect();
                (asked, listed)
            } else {
                (Vec::new(), Vec::new())
            };
        // What the answer tells about: the tasks it lists, or every id asked at a `1203`.
        let answered: Vec<String> = if listed.is_empty() {
            asked.iter().map(|id| (*id).to_owned()).collect()
        } else {
            listed.iter().map(|t| t.id.clone()).collect()
        };
        let body: Vec<String> = listed
            .iter()
            .map(|t| match t.kind {
                RandomKind::External => format!(
                    r#"{{"id":"T{}","external_id":"{}","status":"{}"}}"#,
                    t.id,
                    t.id,
                    status(t, false)
                ),
                _ => format!(r#"{{"id":"{}","status":"{}"}}"#, t.id, status(t, false)),
            })
            .collect();
        if !uri.starts_with("/tasks?") {
            let id = uri.rsplit('/').next().unwrap();
            log.lock()
                .unwrap()
                .push((at, account, uri.clone(), vec![id.to_owned()]));
            let t = &by_id[id];
            let legacy = format!(
                r#"{{"code":0,"message":"SUCCEED","request_id":"r","data":{{"task_id":"{id}","task_status":"{}"}}}}"#,
                status(t, true)
            );
            return std::future::ready(Ok::<_, BoxError>(http::Response::new(Full::new(
                Bytes::from(legacy),
            ))));
        }
        log.lock()
            .unwrap()
            .push((at, account, uri.clone(), answered));
        let body = if body.is_empty() {
            r#"{"code":1203,"message":"not found","request_id":"r"}"#.to_owned()
        } else {
            format!(
                r#"{{"code":0,"message":"SUCCEED","request_id":"r","data":[{}]}}"#,
                body.join(",")
            )
        };
        std::future::ready(Ok::<_, BoxError>(http::Response::new(Full::new(
            Bytes::from(body),
        ))))
    });
    let base = follower(service, policy);
    let followers = [
        base.clone(),
        base.clone(),
        base.clone().with_account(AccountId::new("other")),
    ];
    let mut calls = Vec::new();
    for t in tasks {
        let one = followers[t.clone].clone();
        calls.push(tokio::spawn(async move {
            tokio::time::sleep_until(start + t.follow_at).await;
            let created = Instant::now()
                .checked_sub(t.age)
                .unwrap_or_else(Instant::now);
            let task = match t.kind {
                RandomKind::NewStyle | RandomKind::Unknown => TaskRef::new_style(t.id.clone()),
                RandomKind::External => TaskRef::new_style_external(t.id.clone()),
                RandomKind::Legacy => TaskRef::legacy("/v1/videos/text2video", t.id.clone()),
            };
            if t.delivered
                && t.kind == RandomKind::NewStyle
                && let Some(end) = t.end
            {
                let delivering = one.clone();
                let report = parsed_report(&format!(r#"{{"id":"{}","status":"succeeded"}}"#, t.id));
                tokio::spawn(async move {
                    tokio::time::sleep_until(start + end.max(t.follow_at)).await;
                    delivering.deliver(report);
                });
            }
            let result = one.follow(task.created_at(created)).await;
            let result = match result {
                Ok(report) => format!("ok {} {:?}", report.id, report.status),
                Err(FollowError::DeadlineExceeded { last_status, .. }) => {
                    format!("deadline {last_status:?}")
                }
                Err(FollowError::Api { error, .. }) => format!("api {:?}", error.code()),
                Err(other) => format!("other {other}"),
            };
            (t.id, start.elapsed(), result)
        }));
    }
    let mut ends = Vec::new();
    for call in calls {
        ends.push(call.await.unwrap());
    }
    let queries = queries.lock().unwrap().clone();
    (queries, ends)
}

/// Checks, for `tasks` followed with a deadline of `deadline`, a shortest interval of `lead`
/// and a last query slack of `slack` (real time), as `queries` and `ends` tell: no task is asked
/// about more than `lead` before its first query (a task due that soon rides in a batch sent
/// anyway); with a slack, its last answer comes `lead` after the one before at least; every
/// task that ends `DeadlineExceeded` was answered about within `slack` (at least `lead`) before
/// its last call; every task that ended more than `slack` and `lead` before its deadline (or was
/// delivered) ends with its report. The failures, as text.
fn random_schedule_faults(
    tasks: &[RandomTask],
    queries: &[ScheduleQuery],
    ends: &[(String, Duration, String)],
    (deadline, lead, slack, first): (Duration, Duration, Duration, Duration),
) -> Vec<String> {
    // When each task was asked about, and when an answer told about it: a batch answer that
    // left it out (a page limit) told nothing, and is not counted as one.
    let mut asked: HashMap<&str, Vec<Duration>> = HashMap::new();
    let mut answered: HashMap<&str, Vec<Duration>> = HashMap::new();
    for (at, _, uri, told) in queries {
        let ids = match uri.split_once('=') {
            Some((_, ids)) => ids,
            None => uri.rsplit('/').next().unwrap(),
        };
        for id in ids.split(',') {
            asked.entry(id).or_default().push(*at);
        }
        for id in told {
            answered.entry(id.as_str()).or_default().push(*at);
        }
    }
    let ended: HashMap<&str, &str> = ends
        .iter()
        .map(|(id, _, r)| (id.as_str(), r.as_str()))
        .collect();
    let mut faults = Vec::new();
    for t in tasks.iter().filter(|t| t.kind != RandomKind::Unknown) {
        let times = asked.get(t.id.as_str()).cloned().unwrap_or_default();
        let told = answered.get(t.id.as_str()).cloned().unwrap_or_default();
        let result = ended[t.id.as_str()];
        // Seconds from the scenario's start (a task may be created before it).
        let secs = |d: Duration| d.as_secs_f64();
        let created = secs(t.follow_at) - secs(t.age);
        let follow_at = secs(t.follow_at);
        let (deadline, lead, slack, first) = (secs(deadline), secs(lead), secs(slack), secs(first));
        let past = created + deadline <= follow_at;
        let last_call = if past {
            follow_at
        } else {
            (created + deadline - lead).max(follow_at)
        };
        let first_at = follow_at.max(created + first).min(last_call);
        let times: Vec<f64> = times.iter().map(|d| secs(*d)).collect();
        let told: Vec<f64> = told.iter().map(|d| secs(*d)).collect();
        // The last answer (the one a slack moves) comes a shortest interval after the one
        // before at least. (Earlier ones may not: a task due within a shortest interval rides
        // in a batch sent anyway, also one just answered.)
        if slack > 0.0
            && let [.., before, last] = told[..]
            && last - before < lead - 1e-6
            && result.starts_with("deadline")
        {
            faults.push(format!(
                "{} last answered within {lead}s of the one before: {told:?} (asked at \
                 {times:?})",
                t.id
            ));
        }
        if let Some(at) = times.first()
            && *at + lead < first_at - 1e-6
        {
            faults.push(format!(
                "{} asked at {at:?}, first query at {first_at:?}",
                t.id
            ));
        }
        let delivered = t.delivered
            && t.kind == RandomKind::NewStyle
            && t.end.is_some_and(|end| secs(end) <= created + deadline);
        let ended_in_time = t.end.is_some_and(|end| {
            if past {
                secs(end) <= follow_at
            } else {
                secs(end) + slack.max(lead) + lead < created + deadline - 1e-6
            }
        });
        if (ended_in_time || delivered) && !result.starts_with("ok") {
            faults.push(format!(
                "{} ended at {:?}, deadline {:?}, asked at {times:?}: {result}",
                t.id,
                t.end,
                created + deadline
            ));
        }
        if result.starts_with("deadline")
            && !told
                .last()
                .is_some_and(|last| *last + slack.max(lead) >= last_call - 1e-6)
        {
            faults.push(format!(
                "{} last call {last_call} not answered near it: {told:?} (asked at {times:?})",
                t.id
            ));
        }
    }
    faults
}

/// One random schedule of [`random_tasks`] drawn from `seed` (300 s deadline, durations divided
/// by `speed`), followed with a `slack_secs` last query slack (and a 60 s safety interval with
/// `callbacks`) through [`random_schedule_log`]'s server answering at most `page` tasks by task
/// id: the faults [`random_schedule_faults`] finds, and how many queries it took.
async fn random_schedule_run(
    seed: u64,
    slack_secs: u64,
    speed: f64,
    callbacks: bool,
    page: usize,
) -> (Vec<String>, usize) {
    let deadline = 300;
    let tasks: Vec<RandomTask> = random_tasks(seed, 60, deadline)
        .into_iter()
        .map(|t| RandomTask {
            follow_at: t.follow_at.div_f64(speed),
            age: t.age.div_f64(speed),
            end: t.end.map(|e| e.div_f64(speed)),
            listed: t.listed.div_f64(speed),
            ..t
        })
        .collect();
    let policy = FollowPolicy::new()
        .deadline(Duration::from_secs(deadline))
        .last_query_slack(Duration::from_secs(slack_secs))
        .speed(speed);
    let policy = if callbacks {
        policy.callbacks_first(Duration::from_secs(60))
    } else {
        policy
    };
    let (queries, ends) = random_schedule_log(policy, tasks.clone(), page).await;
    let real = |secs: u64| Duration::from_secs(secs).div_f64(speed);
    let first = if callbacks { 60 } else { 5 };
    let timing = (real(deadline), real(2), real(slack_secs), real(first));
    let faults = random_schedule_faults(&tasks, &queries, &ends, timing)
        .into_iter()
        .map(|fault| {
            format!(
                "seed {seed}, slack {slack_secs} s, speed {speed}, callbacks {callbacks}, \
                 page {page}: {fault}"
            )
        })
        .collect();
    (faults, queries.len())
}

/// With a last query slack, random schedules (60 tasks each: new-style, external ids listed a
/// while after their create, legacy and unknown ones; some created past their deadline; on
/// clones, one of another account; some ends delivered) keep the follower's promises: no task
/// asked about before its first query, nor left without an answer within the slack (at least
/// a shortest interval) before its last call, its last query a shortest interval after the one
/// before; none that ended more than the slack and a shortest interval before its deadline
/// ends `DeadlineExceeded`. So at speed 4 (durations a quarter), with `callbacks_first`, and
/// with no slack; the slack takes fewer queries. The control, a run with a 25 s slack checked
/// as if it had none, breaks them.
#[tokio::test(start_paused = true)]
async fn random_schedules_with_a_last_query_slack_keep_the_follow_promises() {
    let mut faults = Vec::new();
    let mut queries_by_slack: HashMap<u64, usize> = HashMap::new();
    for seed in 1..=8u64 {
        for slack_secs in [0u64, 10, 25] {
            for (speed, callbacks) in [(1.0, false), (4.0, false), (1.0, true)] {
                let (run_faults, queries) =
                    random_schedule_run(seed, slack_secs, speed, callbacks, usize::MAX).await;
                if speed == 1.0 && !callbacks {
                    *queries_by_slack.entry(slack_secs).or_default() += queries;
                }
                faults.extend(run_faults);
            }
        }
    }
    assert!(faults.is_empty(), "{}", faults.join("\n"));
    assert!(
        queries_by_slack[&10] < queries_by_slack[&0]
            && queries_by_slack[&25] < queries_by_slack[&10],
        "{queries_by_slack:?}"
    );

    let tasks = random_tasks(1, 60, 300);
    let policy = FollowPolicy::new()
        .deadline(Duration::from_secs(300))
        .last_query_slack(Duration::from_secs(25));
    let (queries, ends) = random_schedule_log(policy, tasks.clone(), usize::MAX).await;
    let secs = Duration::from_secs;
    let timing = (secs(300), secs(2), Duration::ZERO, secs(5));
    assert!(!random_schedule_faults(&tasks, &queries, &ends, timing).is_empty());
}

/// On a server that answers one or two tasks per batch query (a page limit: the others are
/// left out; those due are asked about alone at once, those riding along keep their time),
/// random schedules keep the same promises. The checker counts the answers that told about a
/// task, not every query that named it: a batch answer that left a task out told nothing
/// about it (counted as an answer, it made some 350 faults here, "n14 last asked within 2s of
/// the one before: [.., 197.399, 205.524, 205.524]"; merging it with a lone query at the same
/// instant held only where no rate limiter delays the lone one).
#[tokio::test(start_paused = true)]
async fn random_schedules_on_a_server_that_pages_batch_answers_keep_the_follow_promises() {
    let mut faults = Vec::new();
    for seed in 1..=4u64 {
        for slack_secs in [0u64, 10, 25] {
            for (speed, callbacks) in [(1.0, false), (4.0, false), (1.0, true)] {
                for page in [1, 2] {
                    let (run_faults, _) =
                        random_schedule_run(seed, slack_secs, speed, callbacks, page).await;
                    faults.extend(run_faults);
                }
            }
        }
    }
    assert!(faults.is_empty(), "{}", faults.join("\n"));
}

/// An external id backing off from failed lone queries keeps its backoff when another id's lone
/// `1203` puts the ids left out back into batches: `x2`, left out at 5 s with `x1` and asked
/// about alone, meets a server error at 5, 6, 8 and 12 s (next try at 20 s); `x1`'s lone `1203`
/// at 14 s put `x2` back on an interval from then and asked about it at 16.8 s, bringing the
/// retry forward, which the backoff exists to prevent.
#[tokio::test(start_paused = true)]
async fn an_id_put_back_into_batches_keeps_its_backoff() {
    let start = Instant::now();
    let sent: Arc<Mutex<Vec<(Duration, String)>>> = Arc::default();
    let log = sent.clone();
    let service = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let uri = req.uri().to_string();
        let ids = uri
            .strip_prefix("/tasks?external_task_ids=")
            .unwrap()
            .to_owned();
        log.lock().unwrap().push((start.elapsed(), ids.clone()));
        async move {
            let (status, body) = match ids.as_str() {
                "x1" => {
                    tokio::time::sleep(Duration::from_secs(9)).await;
                    (
                        404,
                        r#"{"code":1203,"message":"not found","request_id":"r"}"#,
                    )
                }
                "x2" => (
                    500,
                    r#"{"code":5000,"message":"internal","request_id":"r"}"#,
                ),
                _ => (
                    200,
                    r#"{"code":0,"message":"SUCCEED","request_id":"r","data":[]}"#,
                ),
            };
            let mut response = http::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
            Ok::<_, BoxError>(response)
        }
    });
    let one = follower(
        service,
        FollowPolicy::new().deadline(Duration::from_secs(30)),
    );
    let other = one.clone();
    let x1 = tokio::spawn(async move { other.follow(TaskRef::new_style_external("x1")).await });
    let x2 = one.follow(TaskRef::new_style_external("x2")).await;
    assert!(
        matches!(x2, Err(FollowError::DeadlineExceeded { .. })),
        "{x2:?}"
    );
    x1.await.unwrap().unwrap_err();
    let sent = sent.lock().unwrap().clone();
    let x2_times: Vec<Duration> = sent
        .iter()
        .filter(|(_, ids)| ids.split(',').any(|id| id == "x2"))
        .map(|(at, _)| *at)
        .collect();
    let secs = Duration::from_secs;
    assert_eq!(x2_times[..6], [5, 5, 6, 8, 12, 20].map(secs), "{sent:?}");
}

/// A random schedule in paused time is the same run after run: the same queries (when, as
/// which account, with the ids in the same order) and the same ends, byte for byte, on a
/// server that answers every task and on one that pages its batch answers (which tasks a page
/// holds follows the order the ids are asked in). The follower's batches followed the order
/// of a hash map with a random hasher: runs of one seed differed by a few queries.
#[tokio::test(start_paused = true)]
async fn a_random_schedule_runs_the_same_every_time() {
    for page in [usize::MAX, 1] {
        let mut logs = Vec::new();
        for _ in 0..4 {
            let tasks = random_tasks(3, 60, 300);
            let policy = FollowPolicy::new()
                .deadline(Duration::from_secs(300))
                .last_query_slack(Duration::from_secs(10));
            let (queries, ends) = random_schedule_log(policy, tasks, page).await;
            assert!(queries.len() > 100, "{}", queries.len());
            logs.push(format!("{queries:?}\n{ends:?}"));
        }
        for log in &logs[1..] {
            assert!(*log == logs[0], "page {page}: runs of one seed differ");
        }
    }
}

/// `a` and `b` followed from 0 s and `b_at` by calls of their own (first queries due 5 s
/// after), each 12 s, through a server that answers only the first task of a batch by task ids
/// (a page limit): when each query came, with its ids.
async fn two_calls_beside_a_page_limit(b_at: Duration) -> Vec<(Duration, String)> {
    let start = Instant::now();
    let sent: Arc<Mutex<Vec<(Duration, String)>>> = Arc::default();
    let log = sent.clone();
    let service = reporting_processing(start, false, move |at, ids| {
        log.lock().unwrap().push((at, ids.to_owned()));
    });
    let one = follower(
        service,
        FollowPolicy::new().deadline(Duration::from_secs(12)),
    );
    follow_a_then_b(one, start, b_at, TaskRef::new_style("b")).await;
    sent.lock().unwrap().clone()
}

/// A task that rides in a batch before its time and is left out of the answer (a page limit)
/// keeps its time: the answer told nothing about it, and riding is to cost no request. `b`,
/// due at 6 s, rode in `a`'s batch at 5 s, was left out, and was asked about alone at once: a
/// second request at 5 s (through a stack, charged to the rate limiter like any other) and an
/// answer a second early, then both tasks were due together and the same came again at every
/// batch. Here each task is asked about at its time, first in its own call's batch. A task that
/// was due when left out is still asked about alone at once: `a`, followed with `b` (both due
/// at 5 s), left out of `b`'s batch.
#[tokio::test(start_paused = true)]
async fn a_task_left_out_of_a_batch_it_rode_in_keeps_its_time() {
    let secs = Duration::from_secs;
    let riding = two_calls_beside_a_page_limit(secs(1)).await;
    let expected: Vec<(Duration, String)> = (5..=12)
        .map(|at| (secs(at), if at % 2 == 1 { "a,b" } else { "b,a" }.to_owned()))
        .collect();
    assert_eq!(riding, expected);
    let due = two_calls_beside_a_page_limit(Duration::ZERO).await;
    assert_eq!(
        due[..2],
        [(secs(5), "b,a".to_owned()), (secs(5), "a".to_owned())],
        "{due:?}"
    );
}
