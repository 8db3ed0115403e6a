//! Attempts, the deadline, the budget, and the signals passed down.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use kling_core::Code;
use kling_core::metrics::RETRIES;
use kling_core::signals::Deadline;
use kling_retry::error::{DeadlineExceeded, Failed, StopReason};
use kling_retry::{Backoff, RetryBudget, RetryLayer};
use tokio::time::Instant;
use tower::Layer;

use crate::support::{Counters, Reply, code, get, kling, send, task, with_header};

#[tokio::test(start_paused = true)]
async fn max_attempts_bounds_the_requests() {
    // Without a deadline nothing else bounds a run of 1302s: the attempt limit does.
    let (server, log) = kling(|_, _| Reply::Now(code(1302)));
    let client = RetryLayer::builder()
        .seed(1)
        .max_attempts(3)
        .no_deadline()
        .build()
        .unwrap()
        .layer(server);
    let call = send(&client, get("/v1/videos/text2video/t1"));
    let error = tokio::time::timeout(Duration::from_secs(3600), call)
        .await
        .expect("the attempt limit ends the call")
        .unwrap_err();
    assert_eq!(log.len(), 3);
    let failed = error.downcast_ref::<Failed>().unwrap();
    assert_eq!(failed.reason(), StopReason::AttemptsExhausted);
    assert_eq!(failed.attempts(), 3);
    assert_eq!(failed.code(), Some(Code::RateLimited));
    assert!(
        failed.waited() >= Duration::from_secs(2),
        "two throttled backoffs of ≥ 1 s"
    );
}

/// A 1302 refuses the request before any work because the account went too fast: which call
/// it lands on is luck (behind a task-slots layer a refused create also queues again for a
/// slot, its attempts hours apart). A call with a deadline retries a run of them longer than
/// the attempt limit; its other failures still count against the limit.
#[tokio::test(start_paused = true)]
async fn a_run_of_1302s_longer_than_the_attempt_limit_ends_in_success() {
    let (server, log) = kling(|_, i| Reply::Now(if i < 8 { code(1302) } else { task("t", None) }));
    let client = RetryLayer::builder()
        .seed(1)
        .max_attempts(3)
        .build()
        .unwrap()
        .layer(server);
    let start = Instant::now();
    send(&client, get("/v1/videos/text2video/t"))
        .await
        .expect("the query gets through after eight 1302s");
    assert_eq!(log.len(), 9);
    // Still backed off, at least the 1 s floor each time: never a burst against the API.
    assert!(start.elapsed() >= Duration::from_secs(8));

    // 1302s do not hide other failures from the limit: two 1302s, then 5000s, ends after
    // three attempts that were not throttled.
    let (server, log) = kling(|_, i| Reply::Now(code(if i < 2 { 1302 } else { 5000 })));
    let client = RetryLayer::builder()
        .seed(1)
        .max_attempts(3)
        .build()
        .unwrap()
        .layer(server);
    let error = send(&client, get("/v1/videos/text2video/t"))
        .await
        .unwrap_err();
    let failed = error.downcast_ref::<Failed>().unwrap();
    assert_eq!(failed.reason(), StopReason::AttemptsExhausted);
    assert_eq!(log.len(), 5);

    // `max_attempts(1)` is still no retry at all.
    let (server, log) = kling(|_, _| Reply::Now(code(1302)));
    let client = RetryLayer::builder()
        .seed(1)
        .max_attempts(1)
        .build()
        .unwrap()
        .layer(server);
    let error = send(&client, get("/v1/videos/text2video/t"))
        .await
        .unwrap_err();
    assert_eq!(
        error.downcast_ref::<Failed>().unwrap().reason(),
        StopReason::AttemptsExhausted
    );
    assert_eq!(log.len(), 1);
}

/// A run of 1302s is still bounded by the deadline: the call ends there, not before.
#[tokio::test(start_paused = true)]
async fn a_run_of_1302s_ends_at_the_deadline() {
    let (server, log) = kling(|_, _| Reply::Now(code(1302)));
    let client = RetryLayer::builder()
        .seed(1)
        .max_attempts(3)
        .deadline(Duration::from_secs(120))
        .build()
        .unwrap()
        .layer(server);
    let start = Instant::now();
    let error = send(&client, get("/v1/videos/text2video/t"))
        .await
        .unwrap_err();
    assert!(error.is::<DeadlineExceeded>(), "{error}");
    assert!(log.len() > 3, "{} attempts", log.len());
    assert!(start.elapsed() <= Duration::from_secs(120));
}

#[tokio::test(start_paused = true)]
async fn every_attempt_carries_its_number_and_the_deadline() {
    let (server, log) = kling(|_, i| Reply::Now(if i < 2 { code(5000) } else { task("t", None) }));
    let client = RetryLayer::builder()
        .seed(1)
        .deadline(Duration::from_secs(60))
        .build()
        .unwrap()
        .layer(server);
    let start = Instant::now();
    send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap();
    let seen = log.all();
    assert_eq!(
        seen.iter().map(|s| s.attempt).collect::<Vec<_>>(),
        vec![Some(1), Some(2), Some(3)]
    );
    for s in &seen {
        assert_eq!(s.deadline, Some(start + Duration::from_secs(60)));
    }
}

#[tokio::test(start_paused = true)]
async fn an_earlier_deadline_on_the_request_is_kept() {
    let (server, log) = kling(|_, _| Reply::Now(task("t", None)));
    let client = RetryLayer::new().layer(server);
    let mut request = get("/v1/videos/text2video/t1");
    let early = Instant::now() + Duration::from_secs(3);
    request.extensions_mut().insert(Deadline(early));
    send(&client, request).await.unwrap();
    assert_eq!(log.all()[0].deadline, Some(early));
}

#[tokio::test(start_paused = true)]
async fn a_hint_longer_than_the_deadline_returns_the_resume_error_at_once() {
    let (server, log) = kling(|_, _| Reply::Now(with_header(code(1302), "retry-after", "7")));
    let client = RetryLayer::builder()
        .seed(1)
        .deadline(Duration::from_secs(5))
        .backoff(Backoff::new().retry_after_jitter(Duration::ZERO))
        .build()
        .unwrap()
        .layer(server);
    let start = Instant::now();
    let error = send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap_err();
    assert_eq!(Instant::now(), start, "returned at once, no sleeping");
    assert_eq!(log.len(), 1);
    let late = error
        .downcast_ref::<DeadlineExceeded>()
        .expect("the resume error");
    assert_eq!(late.resume_at(), start + Duration::from_secs(7));
    assert_eq!(late.retry_after(), Duration::from_secs(7));
    assert_eq!(late.deadline(), start + Duration::from_secs(5));
    assert_eq!(late.code(), Some(Code::RateLimited));
    assert_eq!(late.request_id(), Some("req-1302"));
    assert_eq!(
        error.to_string(),
        "the server asked to wait 7s (Retry-After), and only 5s are left before the \
         deadline after 1 attempt in 0ns (0ns backing off): kling error 1302 (requests too \
         fast), http 429: message 1302 (request_id req-1302)"
    );
    assert_eq!(late.asked(), Some(Duration::from_secs(7)));
}

/// A `Retry-After` longer than the deadline allows ends the call at once whatever the clamp
/// (`max_retry_after`, 2 min) would have made of it, in both forms: clamped, a 5-minute wait
/// against a 3-minute deadline was retried after 2 minutes, sooner than the server asked.
#[tokio::test(start_paused = true)]
async fn a_hint_past_the_deadline_ends_the_call_even_when_over_the_clamp_in_both_forms() {
    let date = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    for form in ["seconds", "http-date"] {
        let (server, log) = kling(move |_, _| {
            let res = code(1302);
            Reply::Now(if form == "seconds" {
                with_header(res, "retry-after", "300")
            } else {
                let res = with_header(res, "date", &httpdate::fmt_http_date(date));
                let later = date + Duration::from_secs(300);
                with_header(res, "retry-after", &httpdate::fmt_http_date(later))
            })
        });
        let client = RetryLayer::builder()
            .seed(1)
            .deadline(Duration::from_secs(180))
            .build()
            .unwrap()
            .layer(server);
        let start = Instant::now();
        let error = send(&client, get("/v1/videos/text2video/t1"))
            .await
            .unwrap_err();
        assert_eq!(Instant::now(), start, "{form}: returned at once");
        assert_eq!(log.len(), 1, "{form}: no early retry");
        let late = error
            .downcast_ref::<DeadlineExceeded>()
            .unwrap_or_else(|| panic!("{form}: {error}"));
        assert_eq!(late.asked(), Some(Duration::from_secs(300)), "{form}");
        assert_eq!(late.resume_at(), start + Duration::from_secs(300), "{form}");
        assert!(
            error.to_string().starts_with(
                "the server asked to wait 300s (Retry-After), and only 180s are left \
                 before the deadline"
            ),
            "{form}: {error}"
        );
    }
}

/// A `Retry-After` that fits before the deadline is waited out even when the upward jitter
/// would carry the retry to the deadline: the jitter is dropped, not the call.
#[tokio::test(start_paused = true)]
async fn a_hint_that_fits_before_the_deadline_is_not_given_up_for_its_jitter() {
    for seed in 0..10 {
        let (server, log) = kling(|_, i| {
            Reply::Now(if i == 0 {
                with_header(code(1302), "retry-after", "7")
            } else {
                task("t1", None)
            })
        });
        let client = RetryLayer::builder()
            .seed(seed)
            .deadline(Duration::from_millis(7_010))
            .backoff(Backoff::new().retry_after_jitter(Duration::from_secs(1)))
            .build()
            .unwrap()
            .layer(server);
        send(&client, get("/v1/videos/text2video/t1"))
            .await
            .unwrap_or_else(|error| panic!("seed {seed}: {error}"));
        let seen = log.all();
        assert_eq!(
            seen[1].at - seen[0].at,
            Duration::from_secs(7),
            "seed {seed}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_deadline_counts_time_spent_below() {
    // Each attempt takes 4 s below the layer (a slow server, a wait in a limiter): the second,
    // sent after a second's backoff, is still out at the 8.5 s deadline, and given up there
    // rather than waited for until 9 s.
    let (server, log) = kling(|_, _| Reply::Later(Duration::from_secs(4), code(1302)));
    let client = RetryLayer::builder()
        .seed(1)
        .deadline(Duration::from_millis(8_500))
        .build()
        .unwrap()
        .layer(server);
    let error = send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap_err();
    let late = error
        .downcast_ref::<DeadlineExceeded>()
        .expect("the resume error");
    assert_eq!(log.len(), 2);
    assert!(late.elapsed() >= Duration::from_millis(8_500), "{late}");
    assert!(late.elapsed() < Duration::from_secs(9), "{late}");
    assert_eq!(late.attempts(), 2);
}

/// A service below that takes the first attempt and is then never ready again (a full queue
/// that never drains, say): the retry waits in `poll_ready`, and the deadline ends the call
/// there, with the first attempt's failure, rather than holding it for ever.
#[tokio::test(start_paused = true)]
async fn a_retry_the_service_below_never_takes_ends_at_the_deadline() {
    use Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::task::{Context, Poll};

    #[derive(Clone)]
    struct ReadyOnce<S> {
        inner: S,
        calls: Arc<AtomicU32>,
    }
    impl<S: tower::Service<crate::support::Req>> tower::Service<crate::support::Req> for ReadyOnce<S> {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
            if self.calls.load(Ordering::Relaxed) > 0 {
                return Poll::Pending;
            }
            self.inner.poll_ready(cx)
        }
        fn call(&mut self, request: crate::support::Req) -> S::Future {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.inner.call(request)
        }
    }

    let (server, log) = kling(|_, _| Reply::Now(code(5000)));
    let below = ReadyOnce {
        inner: server,
        calls: Arc::new(AtomicU32::new(0)),
    };
    let client = RetryLayer::builder()
        .seed(1)
        .deadline(Duration::from_secs(30))
        .build()
        .unwrap()
        .layer(below);
    let start = Instant::now();
    let call = send(&client, get("/v1/videos/text2video/t1"));
    let error = tokio::time::timeout(Duration::from_secs(3600), call)
        .await
        .expect("the deadline ends the call")
        .unwrap_err();
    let late = error
        .downcast_ref::<DeadlineExceeded>()
        .unwrap_or_else(|| panic!("{error}"));
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    assert_eq!(log.len(), 1, "the retry never went out");
    assert_eq!(late.attempts(), 1);
    assert!(!late.may_have_created());
    assert!(late.to_string().contains("5000"), "{late}");
    assert!(
        late.to_string()
            .starts_with("deadline reached before the call could end after 1 attempt"),
        "{late}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_budget_stops_a_retry_storm() {
    // A failing API: every request gets a 5000. 100 logical queries, 5 attempts allowed each.
    let storm = |budget: RetryBudget| async move {
        let (server, log) = kling(|_, _| Reply::Now(code(5000)));
        let client = RetryLayer::builder()
            .seed(9)
            .max_attempts(5)
            .budget(budget)
            .build()
            .unwrap()
            .layer(server);
        let mut exhausted = 0;
        let calls: Vec<_> = (0..100)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move {
                    send(&client, get(&format!("/v1/videos/text2video/{i}"))).await
                })
            })
            .collect();
        for call in calls {
            let error = call.await.unwrap().unwrap_err();
            let failed = error.downcast_ref::<Failed>().unwrap();
            if failed.reason() == StopReason::BudgetExhausted {
                exhausted += 1;
            }
        }
        (log.len(), exhausted)
    };
    // Budget: 20 % of requests plus 1 retry per second over a 10 s window.
    let (requests, exhausted) =
        storm(RetryBudget::new(Duration::from_secs(10), 1, 0.2).unwrap()).await;
    assert!(
        requests <= 100 + 20 + 10,
        "{requests} requests for 100 calls"
    );
    assert!(exhausted >= 70, "{exhausted} calls stopped by the budget");
    // Negative control: without a budget every call uses all 5 attempts.
    let (requests, exhausted) = storm(RetryBudget::unlimited()).await;
    assert_eq!(requests, 500);
    assert_eq!(exhausted, 0);
}

#[tokio::test(start_paused = true)]
async fn clones_and_services_of_one_layer_share_the_budget() {
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0).unwrap();
    let layer = RetryLayer::builder()
        .seed(1)
        .budget(budget.clone())
        .build()
        .unwrap();
    let (ok, _) = kling(|_, _| Reply::Now(task("t", None)));
    let (flaky, _) = kling(|_, i| Reply::Now(if i == 0 { code(5000) } else { task("t", None) }));
    let a = layer.layer(ok);
    let b = layer.layer(flaky);
    // Two calls through clones of one service deposit two retries' worth...
    send(&a, get("/v1/videos/text2video/1")).await.unwrap();
    send(&a, get("/v1/videos/text2video/2")).await.unwrap();
    assert_eq!(budget.remaining(), 2);
    assert_eq!(layer.budget().remaining(), 2);
    // ...and a retry by another service of the same layer draws from the same budget.
    send(&b, get("/v1/videos/text2video/3")).await.unwrap();
    assert_eq!(budget.remaining(), 3 - 1);
}

#[test]
fn invalid_configuration_names_the_field() {
    let err = RetryLayer::builder().max_attempts(0).build().unwrap_err();
    assert_eq!(err.field(), "max_attempts");
    assert_eq!(
        err.to_string(),
        "invalid retry configuration: `max_attempts` must be at least 1"
    );
    let err = RetryLayer::builder()
        .deadline(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "deadline");
    let err = RetryLayer::builder()
        .backoff(Backoff::new().throttle_base(Duration::ZERO))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "backoff.throttle_base");
    // A year's wait no server asked for: above every `Retry-After`, before every lookup, or
    // before every retry of a kind.
    let year = Duration::from_secs(365 * 86_400);
    for (backoff, field) in [
        (
            Backoff::new().retry_after_jitter(year),
            "backoff.retry_after_jitter",
        ),
        (Backoff::new().lookup_settle(year), "backoff.lookup_settle"),
        (Backoff::new().throttle_base(year), "backoff.throttle_base"),
        (
            Backoff::new().transient_base(year),
            "backoff.transient_base",
        ),
        (
            Backoff::new().maintenance_base(year),
            "backoff.maintenance_base",
        ),
    ] {
        let err = RetryLayer::builder().backoff(backoff).build().unwrap_err();
        assert_eq!(err.field(), field);
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_call_sends_nothing_more() {
    let (server, log) = kling(|_, _| Reply::Now(code(1302)));
    let client = RetryLayer::builder().seed(1).build().unwrap().layer(server);
    let mut call = tokio_test::task::spawn(send(&client, get("/v1/videos/text2video/t1")));
    // The first attempt got its 1302; the call now sleeps before the retry.
    tokio_test::assert_pending!(call.poll());
    assert_eq!(log.len(), 1);
    drop(call);
    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(log.len(), 1, "a dropped call never retries");
}

/// A service below ready for the first call, then not until `until`.
#[derive(Clone)]
struct ReadyAt<S> {
    inner: S,
    calls: Arc<AtomicU32>,
    until: Instant,
    sleep: Option<Arc<std::sync::Mutex<Pin<Box<tokio::time::Sleep>>>>>,
}
impl<S: tower::Service<crate::support::Req>> tower::Service<crate::support::Req> for ReadyAt<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        if self.calls.load(Ordering::Relaxed) > 0 {
            let until = self.until;
            let sleep = self.sleep.get_or_insert_with(|| {
                Arc::new(std::sync::Mutex::new(Box::pin(tokio::time::sleep_until(
                    until,
                ))))
            });
            if sleep.lock().unwrap().as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        self.inner.poll_ready(cx)
    }
    fn call(&mut self, request: crate::support::Req) -> S::Future {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.call(request)
    }
}

impl<S> ReadyAt<S> {
    fn new(inner: S, until: Instant) -> Self {
        ReadyAt {
            inner,
            calls: Arc::new(AtomicU32::new(0)),
            until,
            sleep: None,
        }
    }
}

/// A retry that could start only at the deadline itself is not sent: a request out at the
/// deadline is given up there at once, so it would be sent only to be abandoned — and a create
/// abandoned so "may have made a task", though the `1302` before it made none.
#[tokio::test(start_paused = true)]
async fn a_retry_due_at_the_deadline_itself_is_not_sent() {
    let (server, log) = kling(|_, i| {
        if i == 0 {
            Reply::Now(with_header(code(1302), "retry-after", "5"))
        } else {
            Reply::Later(Duration::from_millis(50), task("t1", None))
        }
    });
    let client = RetryLayer::builder()
        .seed(1)
        .deadline(Duration::from_secs(5))
        .backoff(Backoff::new().retry_after_jitter(Duration::ZERO))
        .build()
        .unwrap()
        .layer(server);
    let start = Instant::now();
    let error = send(
        &client,
        crate::support::create(r#"{"prompt":"a cat","model_name":"kling-v1"}"#),
    )
    .await
    .unwrap_err();
    let late = error
        .downcast_ref::<DeadlineExceeded>()
        .unwrap_or_else(|| panic!("{error}"));
    assert_eq!(log.len(), 1, "nothing sent at the deadline");
    assert_eq!(start.elapsed(), Duration::ZERO, "returned at once");
    assert_eq!(late.resume_at(), start + Duration::from_secs(5));
    assert!(!late.may_have_created(), "the 1302 made nothing");
    assert_eq!(late.code(), Some(Code::RateLimited));
}

/// A service below that becomes ready only at the deadline does not get the retry: it would
/// be given up as soon as it is sent.
#[tokio::test(start_paused = true)]
async fn a_retry_the_service_below_takes_only_at_the_deadline_is_not_sent() {
    let (server, log) = kling(|_, i| {
        if i == 0 {
            Reply::Now(code(1302))
        } else {
            Reply::Later(Duration::from_millis(50), task("t1", None))
        }
    });
    let start = Instant::now();
    let below = ReadyAt::new(server, start + Duration::from_secs(30));
    let client = RetryLayer::builder()
        .seed(1)
        .deadline(Duration::from_secs(30))
        .build()
        .unwrap()
        .layer(below);
    let error = send(
        &client,
        crate::support::create(r#"{"prompt":"a cat","model_name":"kling-v1"}"#),
    )
    .await
    .unwrap_err();
    let late = error
        .downcast_ref::<DeadlineExceeded>()
        .unwrap_or_else(|| panic!("{error}"));
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    assert_eq!(log.len(), 1, "the retry never went out");
    assert!(!late.may_have_created(), "the 1302 made nothing");
    assert_eq!(late.code(), Some(Code::RateLimited));
}

/// A backoff whose floor fits before the deadline is drawn from what fits: its jitter spreads
/// callers and is not worth giving the call up for. Drawn from the whole range, a throttled
/// retry with 1.5 s left (range 1–2 s) gave the call up about half the time, saying "next
/// retry in 1.8s would pass the deadline" with 1.5 s to go; a transient one (0–200 ms) with
/// 100 ms left did so too, though a retry could go at once.
#[tokio::test(start_paused = true)]
async fn a_backoff_whose_floor_fits_before_the_deadline_is_not_given_up_for_its_jitter() {
    for (first, left, floor) in [(1302, 1_500, 1_000), (5000, 100, 0)] {
        for seed in 0..20 {
            let (server, log) = kling(move |_, i| {
                Reply::Now(if i == 0 {
                    code(first)
                } else {
                    task("t1", None)
                })
            });
            let client = RetryLayer::builder()
                .seed(seed)
                .deadline(Duration::from_millis(left))
                .build()
                .unwrap()
                .layer(server);
            send(&client, get("/v1/videos/text2video/t1"))
                .await
                .unwrap_or_else(|error| panic!("{first}, seed {seed}: {error}"));
            let seen = log.all();
            let gap = seen[1].at - seen[0].at;
            assert!(
                gap >= Duration::from_millis(floor) && gap < Duration::from_millis(left),
                "{first}, seed {seed}: {gap:?}"
            );
        }
    }
    // A floor that does not fit ends the call at once, resuming at the floor (not at a draw
    // above it).
    let (server, log) = kling(|_, _| Reply::Now(code(1302)));
    let client = RetryLayer::builder()
        .seed(3)
        .deadline(Duration::from_millis(900))
        .build()
        .unwrap()
        .layer(server);
    let start = Instant::now();
    let error = send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap_err();
    let late = error
        .downcast_ref::<DeadlineExceeded>()
        .unwrap_or_else(|| panic!("{error}"));
    assert_eq!(log.len(), 1);
    assert_eq!(start.elapsed(), Duration::ZERO, "returned at once");
    assert_eq!(late.resume_at(), start + Duration::from_secs(1));
}

/// A retry the call never sends gives its share of the budget back: dropped during its backoff
/// (a caller's timeout shorter than a throttled wait), or not sent because the deadline came
/// first. Each such call spent a retry that never went out, so callers timing out during
/// backoffs drained the budget shared with every other call, whose retries it then refused.
#[tokio::test(start_paused = true)]
async fn a_retry_never_sent_gives_its_budget_back() {
    // Ten retries per 10 s window, whatever the traffic.
    let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.0).unwrap();
    let one = || kling(|_, i| Reply::Now(if i == 0 { code(1302) } else { task("t1", None) }));
    let layer = RetryLayer::builder()
        .seed(1)
        .budget(budget.clone())
        .build()
        .unwrap();
    let full = budget.remaining();
    assert!(full >= 1);
    // Dropped during the backoff (≥ 1 s after a 1302): its retry never went out.
    for _ in 0..full + 2 {
        let (server, log) = one();
        let client = layer.layer(server);
        let call = send(&client, get("/v1/videos/text2video/t1"));
        assert!(
            tokio::time::timeout(Duration::from_millis(100), call)
                .await
                .is_err()
        );
        assert_eq!(log.len(), 1);
        assert_eq!(budget.remaining(), full, "given back");
    }
    // Its retry due past the deadline: not sent, nothing spent.
    let (server, log) = kling(|_, _| Reply::Now(code(1302)));
    let client = RetryLayer::builder()
        .seed(1)
        .budget(budget.clone())
        .deadline(Duration::from_secs(30))
        .build()
        .unwrap()
        .layer(ReadyAt::new(
            server,
            Instant::now() + Duration::from_secs(60),
        ));
    let error = send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap_err();
    assert!(error.is::<DeadlineExceeded>(), "{error}");
    assert_eq!(log.len(), 1);
    assert_eq!(budget.remaining(), full, "given back");
    // And a retry that is sent keeps it.
    let (server, log) = one();
    send(&layer.layer(server), get("/v1/videos/text2video/t1"))
        .await
        .unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(budget.remaining(), full - 1, "spent");
}

/// `kling_retries_total` counts a retry when it is sent, not when it is scheduled: counted at
/// scheduling, a retry the caller dropped during its backoff (a caller's timeout shorter than a
/// throttled wait) or one the deadline ended before it went out counted too, and dashboards
/// over-reported retries exactly when callers timed out.
#[tokio::test(start_paused = true)]
async fn a_retry_is_counted_when_it_is_sent() {
    let (counters, _guard) = Counters::capture();
    let one = || kling(|_, i| Reply::Now(if i == 0 { code(1302) } else { task("t1", None) }));
    let layer = RetryLayer::builder().seed(1).build().unwrap();
    // Dropped during the backoff (≥ 1 s after a 1302).
    let (server, log) = one();
    let client = layer.layer(server);
    let call = send(&client, get("/v1/videos/text2video/t1"));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), call)
            .await
            .is_err()
    );
    assert_eq!(log.len(), 1);
    assert_eq!(counters.total(RETRIES), 0, "dropped during the backoff");
    // The service below not ready before the deadline (30 s), or ready only at it: the retry
    // is not sent.
    for ready in [60, 30] {
        let (server, log) = one();
        let client = RetryLayer::builder()
            .seed(1)
            .deadline(Duration::from_secs(30))
            .build()
            .unwrap()
            .layer(ReadyAt::new(
                server,
                Instant::now() + Duration::from_secs(ready),
            ));
        let error = send(&client, get("/v1/videos/text2video/t1"))
            .await
            .unwrap_err();
        assert!(error.is::<DeadlineExceeded>(), "{error}");
        assert_eq!(log.len(), 1);
        assert_eq!(counters.total(RETRIES), 0, "ready at {ready} s: not sent");
    }
    // Sent: counted once, with its reason.
    let (server, log) = one();
    send(&layer.layer(server), get("/v1/videos/text2video/t1"))
        .await
        .unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(
        counters.series(RETRIES),
        BTreeMap::from([(format!("{RETRIES}{{kind=query,reason=throttled}}"), 1)])
    );
}

/// Each retry sent is counted once, under the reason it was sent for: a create reset after
/// sending is looked up (`lookup`), found missing and sent again (`not_found`), refused a
/// connection and sent again (`transient`): three retries, three counts.
#[tokio::test(start_paused = true)]
async fn every_retry_sent_is_counted_once_with_its_reason() {
    let (counters, _guard) = Counters::capture();
    let (server, log) = kling(|seen, i| match (seen.method.as_str(), i) {
        ("POST", 0) => Reply::Fail(crate::support::reset()),
        ("POST", 2) => Reply::Fail(crate::support::refused()),
        ("GET", _) => Reply::Now(code(1203)),
        _ => Reply::Now(task("t1", Some("job-4"))),
    });
    let client = RetryLayer::builder().seed(1).build().unwrap().layer(server);
    send(
        &client,
        crate::support::create(r#"{"external_task_id":"job-4"}"#),
    )
    .await
    .unwrap();
    assert_eq!(log.len(), 4);
    let series = |reason: &str| format!("{RETRIES}{{kind=create,reason={reason}}}");
    assert_eq!(
        counters.series(RETRIES),
        BTreeMap::from([
            (series("lookup"), 1),
            (series("not_found"), 1),
            (series("transient"), 1),
        ])
    );
}

/// A source whose every draw is the top of its range.
#[derive(Debug)]
struct Top;

impl kling_retry::RandomSource for Top {
    fn next_u64(&self) -> u64 {
        u64::MAX
    }
}

/// tokio fires timers on whole milliseconds, so a retry drawn for the last one before the
/// deadline would wake at the deadline and not be sent (the call ending `DeadlineExceeded`
/// with its backoff's floor well inside it): the draw stops a millisecond short of it.
#[tokio::test(start_paused = true)]
async fn a_retry_drawn_near_the_deadline_wakes_before_it_and_is_sent() {
    let (server, log) = kling(|_, index| {
        Reply::Now(if index == 0 {
            code(5000)
        } else {
            task("t1", None)
        })
    });
    let client = RetryLayer::builder()
        .rng(Top)
        .backoff(Backoff::new().transient_base(Duration::from_millis(500)))
        .deadline(Duration::from_millis(200))
        .build()
        .unwrap()
        .layer(server);
    let start = Instant::now();
    let response = send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(
        kling_core::Outcome::of(&response).unwrap().code(),
        Code::Success
    );
    let seen = log.all();
    assert_eq!(seen.len(), 2, "retried once");
    let after = seen[1].at - start;
    assert!(
        after >= Duration::from_millis(198) && after < Duration::from_millis(200),
        "the retry went {after:?} after the start"
    );
}
