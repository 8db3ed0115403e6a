//! Retry-After in both forms, jitter only upward, and the backoff without a hint.

use std::future::Future;
use std::time::{Duration, SystemTime};

use kling_core::ClassifyLayer;
use kling_core::error::BoxError;
use kling_retry::error::{Failed, StopReason};
use kling_retry::{Backoff, RetryLayer};
use tower::Layer;

use crate::support::{
    Log, Reply, Req, Res, code, get, kling, kling_under, send, task, with_header,
};

const JITTER: Duration = Duration::from_millis(300);

fn layer(seed: u64) -> RetryLayer {
    RetryLayer::builder()
        .seed(seed)
        .backoff(Backoff::new().retry_after_jitter(JITTER))
        .build()
        .unwrap()
}

/// Checks that the retry's `gap` fell within `wait` and `wait` plus the jitter.
fn assert_within_the_jitter(gap: Duration, wait: Duration, what: &str) {
    assert!(gap >= wait, "{what}{gap:?} is early");
    assert!(gap <= wait + JITTER, "{what}{gap:?} is late");
}

/// Checks, over ten seeds, that a call answered `first` and then a task is retried after 7 s
/// to 7 s plus the jitter.
async fn retried_7_seconds_after(first: fn() -> Res) {
    for seed in 0..10 {
        let (server, log) = first_then_task(ClassifyLayer::new(), first);
        send(&layer(seed).layer(server), get("/v1/videos/text2video/t1"))
            .await
            .unwrap();
        let seen = log.all();
        let gap = seen[1].at - seen[0].at;
        assert_within_the_jitter(gap, Duration::from_secs(7), &format!("seed {seed}: "));
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_of_7_seconds_delays_by_7_to_7_plus_the_jitter() {
    retried_7_seconds_after(|| with_header(code(1302), "retry-after", "7")).await;
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_http_date_of_7_seconds_delays_the_same() {
    // The date is read against the response's own Date header, so the local clock does not
    // matter; whole seconds keep the HTTP-date exact.
    retried_7_seconds_after(|| throttled_until(Duration::from_secs(7))).await;
}

/// A `Retry-After` over `max_retry_after` is not waited out, nor cut short: a retry sent
/// sooner than the server asked (the clamp did that) only meets another refusal. The call
/// ends at once, naming the wait asked for and the limit, with `retry_after` for the caller.
#[tokio::test(start_paused = true)]
async fn a_retry_after_over_the_maximum_ends_the_call_instead_of_retrying_early() {
    let backoff = Backoff::new()
        .retry_after_jitter(Duration::ZERO)
        .max_retry_after(Duration::from_secs(30));
    let (server, log) = first_then_task(ClassifyLayer::new(), || {
        with_header(code(5001), "retry-after", "86400")
    });
    let client = RetryLayer::builder()
        .seed(1)
        .deadline(Duration::from_secs(86_400 * 2))
        .backoff(backoff)
        .build()
        .unwrap()
        .layer(server);
    let start = tokio::time::Instant::now();
    let error = send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap_err();
    assert_eq!(tokio::time::Instant::now(), start, "no wait");
    assert_eq!(log.len(), 1, "no early retry");
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::RetryAfterTooLong);
    assert_eq!(failed.retry_after(), Some(Duration::from_secs(86_400)));
    assert!(
        error.to_string().starts_with(
            "the server asked to wait longer than this layer waits (Retry-After 86400s or more, \
             the longest kling-core reads; max_retry_after 30s) after 1 attempt"
        ),
        "{error}"
    );
}

/// A `max_retry_after` of three days, above kling-core's one-day ceiling on `Retry-After`.
fn three_day_limit() -> Backoff {
    Backoff::new().max_retry_after(Duration::from_secs(3 * 86_400))
}

/// A layer under [`three_day_limit`], with `deadline` or none.
fn under_three_days(deadline: Option<Duration>) -> RetryLayer {
    let builder = RetryLayer::builder().seed(1).backoff(three_day_limit());
    let builder = match deadline {
        Some(deadline) => builder.deadline(deadline),
        None => builder.no_deadline(),
    };
    builder.build().unwrap()
}

/// A 1302 whose `Retry-After` is an HTTP-date `wait` after the answer's own `Date`.
fn throttled_until(wait: Duration) -> Res {
    let date = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let res = with_header(code(1302), "date", &httpdate::fmt_http_date(date));
    with_header(res, "retry-after", &httpdate::fmt_http_date(date + wait))
}

/// Sends one call through `client` and checks that it ended at once, after its one request,
/// because the hint stands at kling-core's ceiling; returns the error for what else to check.
async fn ends_at_the_ceiling<S>(client: &S, log: &Log, form: &str) -> BoxError
where
    S: tower::Service<Req, Response = Res, Error = BoxError> + Clone,
{
    let start = tokio::time::Instant::now();
    let error = send(client, get("/v1/videos/text2video/t1"))
        .await
        .expect_err(form);
    assert_eq!(tokio::time::Instant::now(), start, "{form}: no wait");
    assert_eq!(log.len(), 1, "{form}: no retry a day early");
    let failed = error.downcast_ref::<Failed>().expect(form);
    assert_eq!(failed.reason(), StopReason::RetryAfterTooLong, "{form}");
    assert!(
        error.to_string().contains(
            "(Retry-After 86400s or more, the longest kling-core reads; \
             max_retry_after 259200s)"
        ),
        "{form}: {error}"
    );
    error
}

/// The negative control: a 1302 asking for `seconds` under the ceiling and the three-day
/// limit is waited out, and the call then succeeds.
async fn waits_out_a_retry_after_of(seconds: u64) {
    let (server, log) = first_then_task(ClassifyLayer::new(), move || {
        with_header(code(1302), "retry-after", &seconds.to_string())
    });
    let client = under_three_days(None).layer(server);
    send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap();
    let seen = log.all();
    assert!(seen[1].at - seen[0].at >= Duration::from_secs(seconds));
}

/// kling-core reads a `Retry-After` of more than a day as a day (`MAX_RETRY_AFTER`): with a
/// `max_retry_after` above a day, a wait of two days (either form) was retried after one, a
/// day sooner than the server asked, and again every day until the attempts ran out. A hint
/// at that ceiling is a lower bound: the call ends at once, saying so. Negative control: a
/// 12-hour wait under the same limit is waited out.
#[tokio::test(start_paused = true)]
async fn a_retry_after_longer_than_a_day_is_not_cut_to_a_day() {
    let two_days = Duration::from_secs(2 * 86_400);
    for (form, deadline) in [
        ("seconds", None),
        ("http-date", None),
        ("seconds", Some(Duration::from_secs(30 * 86_400))),
    ] {
        let (server, log) = first_then_task(ClassifyLayer::new(), move || match form {
            "seconds" => with_header(code(1302), "retry-after", "172800"),
            _ => throttled_until(two_days),
        });
        let client = under_three_days(deadline).layer(server);
        ends_at_the_ceiling(&client, &log, form).await;
    }
    // Past a deadline, the error does not give the ceiling as the wait asked for.
    let (server, log) = kling(|_, _| Reply::Now(with_header(code(1302), "retry-after", "172800")));
    let client = RetryLayer::builder().seed(1).build().unwrap().layer(server);
    let error = send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap_err();
    assert_eq!(log.len(), 1);
    let late = error
        .downcast_ref::<kling_retry::error::DeadlineExceeded>()
        .unwrap_or_else(|| panic!("{error}"));
    assert_eq!(late.asked(), Some(Duration::from_secs(86_400)));
    assert!(
        error
            .to_string()
            .starts_with("the server asked to wait 86400s or more (Retry-After), and only 600s"),
        "{error}"
    );
    // A wait under a day, under the limit, is waited out.
    waits_out_a_retry_after_of(43_200).await;
}

/// At kling-core's ceiling exactly — `Retry-After: 86400`, an HTTP-date a day after the
/// answer's `Date`, a decimal rounded up to it — the wait may be a day or longer: kling-core
/// reads any longer one the same. The call ends, and the message does not say the server asked
/// for longer than the ceiling (it may have asked for exactly a day). A second under the
/// ceiling is waited out under a limit of three days.
#[tokio::test(start_paused = true)]
async fn a_retry_after_at_the_ceiling_exactly_ends_the_call_as_a_lower_bound() {
    for form in ["86400", "http-date", "86399.5"] {
        let (server, log) = first_then_task(ClassifyLayer::new(), move || match form {
            "http-date" => throttled_until(Duration::from_secs(86_400)),
            seconds => with_header(code(1302), "retry-after", seconds),
        });
        let client = under_three_days(None).layer(server);
        let error = ends_at_the_ceiling(&client, &log, form).await;
        let failed = error.downcast_ref::<Failed>().expect(form);
        assert_eq!(failed.retry_after(), Some(Duration::from_secs(86_400)));
    }
    waits_out_a_retry_after_of(86_399).await;
}

/// A `Retry-After` under the maximum overrides even a 5xx's backoff, exactly.
#[tokio::test(start_paused = true)]
async fn a_retry_after_overrides_even_a_5xx_backoff() {
    let backoff = Backoff::new()
        .retry_after_jitter(Duration::ZERO)
        .max_retry_after(Duration::from_secs(30));
    let (server, log) = first_then_task(ClassifyLayer::new(), || {
        with_header(code(5001), "retry-after", "30")
    });
    let client = RetryLayer::builder()
        .seed(1)
        .backoff(backoff)
        .build()
        .unwrap()
        .layer(server);
    send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap();
    let seen = log.all();
    assert_eq!(seen[1].at - seen[0].at, Duration::from_secs(30));
}

/// A `Retry-After` sooner than the kind's own floor (`0`, or a date already past) does not
/// send retries in a burst: a 1302 still waits at least a second, a 5001 its maintenance wait.
#[tokio::test(start_paused = true)]
async fn a_retry_after_of_zero_still_waits_the_kinds_floor() {
    let mut gaps = std::collections::BTreeSet::new();
    for (refusal, floor) in [(1302, 1), (5001, 5)] {
        for seed in 0..10 {
            let (server, log) = kling(move |_, i| {
                Reply::Now(if i < 3 {
                    with_header(code(refusal), "retry-after", "0")
                } else {
                    task("t1", None)
                })
            });
            send(&layer(seed).layer(server), get("/v1/videos/text2video/t1"))
                .await
                .unwrap();
            let seen = log.all();
            for retry in 1..=3 {
                let gap = seen[retry].at - seen[retry - 1].at;
                assert!(
                    gap >= Duration::from_secs(floor),
                    "{refusal}, seed {seed}, retry {retry}: {gap:?}"
                );
                assert!(
                    gap <= Duration::from_secs(floor) + JITTER,
                    "{refusal}, seed {seed}, retry {retry}: {gap:?}"
                );
                gaps.insert(gap);
            }
        }
    }
    // The jitter is drawn over the floor: the retries of many callers spread.
    assert!(gaps.len() > 20, "{} distinct gaps", gaps.len());
}

/// The floor holds under a `max_retry_after` set below it: the hint, raised to the floor, was
/// clamped to `max_retry_after`, so a `Retry-After: 0` on a 5001 sent the retry after 2 s where
/// no header waits the 5 s maintenance floor.
#[tokio::test(start_paused = true)]
async fn a_retry_after_under_a_low_max_retry_after_still_waits_the_kinds_floor() {
    let backoff = Backoff::new()
        .throttle_base(Duration::from_secs(3))
        .max_retry_after(Duration::from_secs(2))
        .retry_after_jitter(JITTER);
    for (refusal, floor, hint) in [(1302, 3, "0"), (5001, 5, "0"), (5001, 5, "1")] {
        for seed in 0..10 {
            let (server, log) = kling(move |_, i| {
                Reply::Now(if i < 1 {
                    with_header(code(refusal), "retry-after", hint)
                } else {
                    task("t1", None)
                })
            });
            let client = RetryLayer::builder()
                .seed(seed)
                .backoff(backoff)
                .build()
                .unwrap()
                .layer(server);
            send(&client, get("/v1/videos/text2video/t1"))
                .await
                .unwrap();
            let seen = log.all();
            let gap = seen[1].at - seen[0].at;
            assert!(
                gap >= Duration::from_secs(floor) && gap <= Duration::from_secs(floor) + JITTER,
                "{refusal}, Retry-After {hint}, seed {seed}: {gap:?}"
            );
        }
    }
}

/// A `max_retry_after` below the default jitter (half a second) builds: the layer raises a
/// `1302`'s `Retry-After: 0` to the 1 s floor and spreads the retries over the jitter above
/// it, as documented for a limit below the floor (it was refused as a jitter above the limit).
#[tokio::test(start_paused = true)]
async fn a_max_retry_after_below_the_default_jitter_still_spreads_retries_over_the_floor() {
    let jitter = Duration::from_millis(500);
    let mut gaps = Vec::new();
    for seed in 0..10 {
        let (server, log) = kling(|_, i| {
            Reply::Now(if i < 1 {
                with_header(code(1302), "retry-after", "0")
            } else {
                task("t1", None)
            })
        });
        let client = RetryLayer::builder()
            .seed(seed)
            .backoff(Backoff::new().max_retry_after(Duration::from_millis(100)))
            .build()
            .unwrap()
            .layer(server);
        send(&client, get("/v1/videos/text2video/t1"))
            .await
            .unwrap();
        let seen = log.all();
        let gap = seen[1].at - seen[0].at;
        let floor = Duration::from_secs(1);
        assert!(
            gap >= floor && gap <= floor + jitter,
            "seed {seed}: {gap:?}"
        );
        gaps.push(gap);
    }
    gaps.sort();
    gaps.dedup();
    assert!(gaps.len() > 5, "the jitter spreads the retries: {gaps:?}");
}

#[tokio::test(start_paused = true)]
async fn throttled_retries_wait_at_least_a_second_and_transient_ones_use_full_jitter() {
    let backoff = Backoff::new();
    for seed in 0..10 {
        let (server, log) =
            kling(|_, i| Reply::Now(if i < 3 { code(1302) } else { task("t", None) }));
        let client = RetryLayer::builder()
            .seed(seed)
            .backoff(backoff)
            .build()
            .unwrap()
            .layer(server);
        send(&client, get("/v1/videos/text2video/t1"))
            .await
            .unwrap();
        let seen = log.all();
        for retry in 1..=3u32 {
            let gap = seen[retry as usize].at - seen[retry as usize - 1].at;
            let (low, high) = backoff.bounds(kling_retry::DelayKind::Throttled, retry);
            assert!(low >= Duration::from_secs(1));
            assert!(
                gap >= low && gap <= high,
                "retry {retry}: {gap:?} not in {low:?}..={high:?}"
            );
        }

        let (server, log) =
            kling(|_, i| Reply::Now(if i < 3 { code(5000) } else { task("t", None) }));
        let client = RetryLayer::builder()
            .seed(seed)
            .backoff(backoff)
            .build()
            .unwrap()
            .layer(server);
        send(&client, get("/v1/videos/text2video/t1"))
            .await
            .unwrap();
        let seen = log.all();
        for retry in 1..=3u32 {
            let gap = seen[retry as usize].at - seen[retry as usize - 1].at;
            let (low, high) = backoff.bounds(kling_retry::DelayKind::Transient, retry);
            assert_eq!(low, Duration::ZERO);
            assert_eq!(high, Duration::from_millis(200) * (1 << (retry - 1)));
            assert!(gap <= high, "retry {retry}: {gap:?} over {high:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_same_seed_gives_the_same_delays() {
    let mut runs = Vec::new();
    for _ in 0..2 {
        let (server, log) =
            kling(|_, i| Reply::Now(if i < 3 { code(5002) } else { task("t", None) }));
        let client = RetryLayer::builder()
            .seed(42)
            .build()
            .unwrap()
            .layer(server);
        let start = tokio::time::Instant::now();
        send(&client, get("/v1/videos/text2video/t1"))
            .await
            .unwrap();
        runs.push(log.all().iter().map(|s| s.at - start).collect::<Vec<_>>());
    }
    assert_eq!(runs[0], runs[1]);
}

/// A page a proxy or gateway answers with instead of a Kling envelope.
fn page(status: u16, retry_after: &str) -> crate::support::Res {
    let res = crate::support::html(status, "<html><body>try again later</body></html>");
    with_header(res, "retry-after", retry_after)
}

#[tokio::test(start_paused = true)]
async fn a_proxy_page_s_retry_after_is_honoured_like_kling_s_own() {
    // A 503 page asking for 60 s: the maintenance backoff alone would come back within 10 s.
    let (server, log) = first_then_task(ClassifyLayer::new(), || page(503, "60"));
    send(&layer(3).layer(server), get("/v1/videos/text2video/t1"))
        .await
        .unwrap();
    let seen = log.all();
    let gap = seen[1].at - seen[0].at;
    assert_within_the_jitter(gap, Duration::from_secs(60), "");
}

#[tokio::test(start_paused = true)]
async fn a_proxy_s_429_page_is_throttled_and_a_create_behind_it_is_sent_again() {
    // Turned away before it was handled: nothing was made, so even a create without an
    // external id goes again, after the page's Retry-After.
    let (server, log) = first_then_task(ClassifyLayer::new(), || page(429, "5"));
    let client = RetryLayer::builder()
        .seed(3)
        .generate_external_ids(false)
        .backoff(Backoff::new().retry_after_jitter(JITTER))
        .build()
        .unwrap()
        .layer(server);
    send(&client, crate::support::create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap();
    let seen = log.all();
    assert_eq!(seen.len(), 2, "the create and its one resend");
    assert!(seen.iter().all(|s| s.method == http::Method::POST));
    let gap = seen[1].at - seen[0].at;
    assert_within_the_jitter(gap, Duration::from_secs(5), "");
}

/// A call that runs out of attempts on a throttled answer (one without a deadline: with one,
/// 1302s are outside the attempt limit) tells the caller how long the server asked it to wait,
/// so that it does not come straight back.
#[tokio::test(start_paused = true)]
async fn a_call_out_of_attempts_reports_the_last_retry_after() {
    let (server, _log) = kling(|_, _| Reply::Now(with_header(code(1302), "retry-after", "30")));
    let client = RetryLayer::builder()
        .seed(1)
        .max_attempts(2)
        .no_deadline()
        .build()
        .unwrap()
        .layer(server);
    let error = send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap_err();
    let failed = error
        .downcast_ref::<kling_retry::error::Failed>()
        .expect("a Failed");
    assert_eq!(
        failed.reason(),
        kling_retry::error::StopReason::AttemptsExhausted
    );
    assert_eq!(failed.retry_after(), Some(Duration::from_secs(30)));
    assert_eq!(
        failed.api_error().unwrap().retry_after(),
        Some(Duration::from_secs(30))
    );
}

/// A proxy's 429 page (no Kling envelope) is throttled like a `1302`: a call that runs out of
/// attempts on one reports its `Retry-After` as well, so the caller does not come straight back.
#[tokio::test(start_paused = true)]
async fn a_call_out_of_attempts_on_a_proxy_page_reports_its_retry_after() {
    let (server, _log) = kling(|_, _| Reply::Now(page(429, "30")));
    let client = RetryLayer::builder()
        .seed(1)
        .max_attempts(2)
        .no_deadline()
        .build()
        .unwrap()
        .layer(server);
    let error = send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap_err();
    let failed = error
        .downcast_ref::<kling_retry::error::Failed>()
        .expect("a Failed");
    assert_eq!(
        failed.reason(),
        kling_retry::error::StopReason::AttemptsExhausted
    );
    assert!(failed.api_error().is_none(), "a page, not a Kling answer");
    assert_eq!(failed.retry_after(), Some(Duration::from_secs(30)));
}

/// The classify step's body limit under [`large_page`]: a task answer fits, the page does not.
const BODY_LIMIT: usize = 160;

/// A 429 page over [`BODY_LIMIT`] with a `Retry-After` of `retry_after`; with `declared`, its
/// `Content-Length` says it is too long before the body is read.
fn large_page(retry_after: &str, declared: bool) -> Res {
    let body = "<html><body>too many requests</body></html>".repeat(8);
    assert!(body.len() > BODY_LIMIT);
    let length = body.len().to_string();
    let res = http::Response::builder()
        .status(429)
        .header("content-type", "text/html")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let res = with_header(res, "retry-after", retry_after);
    if declared {
        with_header(res, "content-length", &length)
    } else {
        res
    }
}

/// A server under `classify` answering `first` and then a task.
fn first_then_task(
    classify: ClassifyLayer,
    first: impl Fn() -> Res + Send + Sync + 'static,
) -> (
    impl tower::Service<
        Req,
        Response = Res,
        Error = BoxError,
        Future = impl Future<Output = Result<Res, BoxError>> + Send,
    > + Clone
    + Send
    + 'static,
    Log,
) {
    kling_under(classify, move |_, i| {
        Reply::Now(if i == 0 { first() } else { task("t1", None) })
    })
}

/// A classify step that reads at most [`BODY_LIMIT`] bytes.
fn small_limit() -> ClassifyLayer {
    ClassifyLayer::new().max_body_bytes(BODY_LIMIT)
}

/// A 429 page too long to read keeps its `Retry-After`: the retry goes out when the server
/// said, as after a page that can be read, not after the throttled backoff's 1 to 2 s.
#[tokio::test(start_paused = true)]
async fn a_429_page_too_long_to_read_is_retried_after_its_retry_after() {
    for declared in [false, true] {
        let (server, log) = first_then_task(small_limit(), move || large_page("7", declared));
        let client = RetryLayer::builder()
            .seed(1)
            .backoff(Backoff::new().retry_after_jitter(Duration::ZERO))
            .build()
            .unwrap()
            .layer(server);
        send(&client, get("/v1/videos/text2video/t1"))
            .await
            .unwrap();
        let seen = log.all();
        assert_eq!(seen.len(), 2, "declared {declared}");
        let gap = seen[1].at - seen[0].at;
        assert_eq!(gap, Duration::from_secs(7), "declared {declared}");
    }
}

/// The `Retry-After` of a page too long to read is bound as a readable page's is: over
/// `max_retry_after` it ends the call, past the deadline it ends it naming the deadline, and a
/// call out of attempts reports it; none sends a retry sooner than asked.
#[tokio::test(start_paused = true)]
async fn a_429_page_too_long_to_read_keeps_the_retry_after_limits() {
    let start = tokio::time::Instant::now();
    let (server, log) = first_then_task(small_limit(), || large_page("300", false));
    let client = RetryLayer::builder()
        .seed(1)
        .deadline(Duration::from_secs(600))
        .backoff(Backoff::new().max_retry_after(Duration::from_secs(30)))
        .build()
        .unwrap()
        .layer(server);
    let error = send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap_err();
    assert_eq!(tokio::time::Instant::now(), start, "no wait");
    assert_eq!(log.len(), 1, "no early retry");
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::RetryAfterTooLong, "{error}");
    assert_eq!(failed.retry_after(), Some(Duration::from_secs(300)));

    let (server, log) = first_then_task(small_limit(), || large_page("300", true));
    let client = RetryLayer::builder()
        .seed(1)
        .deadline(Duration::from_secs(180))
        .build()
        .unwrap()
        .layer(server);
    let error = send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap_err();
    assert_eq!(tokio::time::Instant::now(), start, "no wait");
    assert_eq!(log.len(), 1, "no early retry");
    let late = error
        .downcast_ref::<kling_retry::error::DeadlineExceeded>()
        .unwrap_or_else(|| panic!("{error}"));
    assert_eq!(late.asked(), Some(Duration::from_secs(300)));
    assert_eq!(late.resume_at(), start + Duration::from_secs(300));

    let (server, log) = kling_under(small_limit(), |_, _| Reply::Now(large_page("30", false)));
    let client = RetryLayer::builder()
        .seed(1)
        .max_attempts(2)
        .no_deadline()
        .backoff(Backoff::new().retry_after_jitter(Duration::ZERO))
        .build()
        .unwrap()
        .layer(server);
    let error = send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap_err();
    let seen = log.all();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].at - seen[0].at, Duration::from_secs(30));
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::AttemptsExhausted);
    assert_eq!(failed.retry_after(), Some(Duration::from_secs(30)));
}

/// A run of slot-gated 1303s (each held in the slots layer, outside the attempt limit) does not
/// double the backoff of a 5000 that follows: its wait is drawn as a first retry's (full jitter
/// up to the 200 ms base), not the maximum after ten doublings.
#[tokio::test(start_paused = true)]
async fn slot_gated_retries_do_not_lengthen_a_later_backoff() {
    for seed in 0..10 {
        let (server, log) = kling(|_, i| {
            Reply::Now(match i {
                0..10 => {
                    let mut res = code(1303);
                    res.extensions_mut().insert(kling_core::signals::SlotGated);
                    res
                }
                10 => code(5000),
                _ => task("t1", None),
            })
        });
        let client = RetryLayer::builder()
            .seed(seed)
            .build()
            .unwrap()
            .layer(server);
        send(&client, get("/v1/videos/text2video/t1"))
            .await
            .unwrap();
        let seen = log.all();
        let gap = seen[11].at - seen[10].at;
        assert!(gap <= Duration::from_millis(200), "seed {seed}: {gap:?}");
    }
}

/// Many calls through one layer refused at the same instant do not come back in lock-step:
/// each draws its own jitter from the layer's one random source, so their retries spread over
/// the backoff's range (1 to 2 s after a `1302`, 0 to 200 ms after a `5000`) instead of
/// arriving together as a second burst. Unseeded too: a layer's default source is shared.
#[tokio::test(start_paused = true)]
async fn many_calls_refused_together_retry_spread_not_in_lock_step() {
    const CALLS: usize = 100;
    for (refusal, low, high) in [
        (1302, Duration::from_secs(1), Duration::from_secs(2)),
        (5000, Duration::ZERO, Duration::from_millis(200)),
    ] {
        for seeded in [true, false] {
            // Each call's first request is refused; every later one succeeds.
            let refused =
                std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
            let (server, log) = kling(move |seen, _| {
                let first = refused.lock().unwrap().insert(seen.uri.clone());
                Reply::Now(if first {
                    code(refusal)
                } else {
                    task("t", None)
                })
            });
            // (The default budget would stop most of them: 30 retries for 100 calls.)
            let builder = RetryLayer::builder().budget(kling_retry::RetryBudget::unlimited());
            let builder = if seeded { builder.seed(5) } else { builder };
            let client = builder.build().unwrap().layer(server);
            let start = tokio::time::Instant::now();
            let calls: Vec<_> = (0..CALLS)
                .map(|n| {
                    let client = client.clone();
                    tokio::spawn(async move {
                        send(&client, get(&format!("/v1/videos/text2video/t{n}"))).await
                    })
                })
                .collect();
            for call in calls {
                call.await.unwrap().unwrap();
            }
            let seen = log.all();
            assert_eq!(seen.len(), 2 * CALLS);
            assert!(
                seen[..CALLS].iter().all(|s| s.at == start),
                "refused together"
            );
            let retries: Vec<Duration> = seen[CALLS..].iter().map(|s| s.at - start).collect();
            assert!(
                retries.iter().all(|&at| at >= low && at <= high),
                "{refusal}: {retries:?}"
            );
            // Timers fire on whole milliseconds: a few calls may share one, never a crowd (over
            // 12 of 100 draws in one of 200 milliseconds: less than once in 10^10 runs).
            let mut per_instant = std::collections::BTreeMap::new();
            for at in &retries {
                *per_instant.entry(*at).or_insert(0usize) += 1;
            }
            let crowd = per_instant.values().max().copied().unwrap_or(0);
            assert!(
                crowd <= 12,
                "{refusal} (seeded {seeded}): {crowd} at one instant"
            );
            // Spread over the range: each tenth of it holds about a tenth of the retries. (The
            // bounds leave the unseeded run, whose draws differ each time, negligible odds of
            // failing: a tenth holds over 35 of 100 uniform draws, or four tenths none, far
            // less than once in a billion runs.)
            let span = (high - low).as_nanos();
            let mut tenths = [0usize; 10];
            for at in &retries {
                let tenth = ((at.as_nanos() - low.as_nanos()) * 10 / span).min(9) as usize;
                tenths[tenth] += 1;
            }
            assert!(
                tenths.iter().all(|&n| n <= 35) && tenths.iter().filter(|&&n| n > 0).count() >= 7,
                "{refusal} (seeded {seeded}): {tenths:?}"
            );
        }
    }
}
