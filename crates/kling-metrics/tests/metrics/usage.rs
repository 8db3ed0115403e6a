//! The Monitor: rate usage over the last window, warnings once per crossing, sources, attempts,
//! tasks ended by callbacks.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use kling_core::metrics::{LABEL_POOL, LABEL_STATUS, TASKS_FINISHED};
use kling_core::signals::{Attempt, Waited};
use kling_core::{ClassifyLayer, TaskStatus};
use kling_metrics::{
    MetricsLayer, Monitor, PoolUsage, QueueDepth, Resource, Snapshot, UsageWarning,
};
use tokio::time::advance;
use tower::{Layer, Service, ServiceExt};

use crate::support::{Capture, Recording, Value, answering, request};

const OK: &str = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":null}"#;

fn recorder_of(
    warnings: &Arc<Mutex<Vec<UsageWarning>>>,
) -> impl Fn(&UsageWarning) + Send + Sync + 'static {
    let warnings = warnings.clone();
    move |w: &UsageWarning| warnings.lock().unwrap().push(w.clone())
}

#[tokio::test(start_paused = true)]
async fn the_rate_warning_fires_once_per_crossing_and_rearms_below_the_hysteresis() {
    let capture = Capture::default();
    let _tracing = tracing::subscriber::set_default(capture.clone());
    let warnings = Arc::new(Mutex::new(Vec::new()));
    let monitor = Monitor::builder()
        .rate_quota(10, Duration::from_secs(60))
        .on_usage_warning(recorder_of(&warnings))
        .build()
        .unwrap();
    assert_eq!(monitor.usage_threshold(), 0.8);
    let mut stack = MetricsLayer::with_monitor(monitor.clone())
        .layer(ClassifyLayer::new().layer(answering(200, OK)));
    let mut send = async || {
        let req = request("GET", "/v1/videos/text2video/1", "", "k");
        stack.ready().await.unwrap().call(req).await.unwrap();
        advance(Duration::from_secs(1)).await;
    };

    for _ in 0..7 {
        send().await;
    }
    assert!(
        warnings.lock().unwrap().is_empty(),
        "70% is below the threshold"
    );
    send().await;
    {
        let warnings = warnings.lock().unwrap();
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].resource, Resource::RateQuota);
        assert_eq!((warnings[0].usage, warnings[0].threshold), (0.8, 0.8));
    }
    send().await;
    send().await;
    assert_eq!(monitor.snapshot().rate.percent(), Some(100.0));
    assert_eq!(warnings.lock().unwrap().len(), 1, "once per crossing");

    // A minute later the window is empty; the next request re-arms the warning.
    advance(Duration::from_secs(60)).await;
    assert_eq!(monitor.snapshot().rate.requests, 0);
    for _ in 0..7 {
        send().await;
    }
    assert_eq!(warnings.lock().unwrap().len(), 1);
    send().await;
    assert_eq!(warnings.lock().unwrap().len(), 2);

    let events = capture.events();
    let warned: Vec<_> = events
        .iter()
        .filter(|e| e.field("message") == Some("usage passed the warning threshold"))
        .collect();
    assert_eq!(warned.len(), 2);
    assert_eq!(warned[0].level, "WARN");
    assert_eq!(warned[0].field("resource"), Some("rate quota"));
    assert_eq!(warned[0].field("usage"), Some("0.8"));
    assert_eq!(
        events
            .iter()
            .filter(|e| e.field("message") == Some("usage fell back below the warning threshold"))
            .count(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn pool_warnings_come_from_sources_once_per_crossing() {
    let warnings = Arc::new(Mutex::new(Vec::new()));
    let monitor = Monitor::builder()
        .usage_threshold(0.8)
        .hysteresis(0.1)
        .on_usage_warning(recorder_of(&warnings))
        .build()
        .unwrap();
    let in_use = Arc::new(AtomicU32::new(3));
    let source = in_use.clone();
    monitor.add_source(move |s: &mut Snapshot| {
        s.pools.push(
            PoolUsage::new("video", source.load(Ordering::Relaxed), 5, 2).with_account("acct"),
        );
        s.queues.push(QueueDepth::new("ratelimit:acct", 4));
    });

    let usage_at = |n: u32| {
        in_use.store(n, Ordering::Relaxed);
        monitor.snapshot()
    };
    let snapshot = usage_at(3);
    assert_eq!(snapshot.pool("video").unwrap().waiters, 2);
    assert_eq!(snapshot.queues, [QueueDepth::new("ratelimit:acct", 4)]);
    assert!(warnings.lock().unwrap().is_empty());
    usage_at(4);
    usage_at(4);
    usage_at(5);
    assert_eq!(warnings.lock().unwrap().len(), 1);
    // 0.75 is not below 0.8 - 0.1: still armed off.
    usage_at(4);
    usage_at(3);
    assert_eq!(warnings.lock().unwrap().len(), 1);
    usage_at(4);
    let warnings = warnings.lock().unwrap();
    assert_eq!(warnings.len(), 2);
    assert_eq!(
        warnings[1].resource,
        Resource::Slots {
            account: Some("acct".into()),
            pool: "video".into()
        }
    );
    assert_eq!(
        warnings[1].to_string(),
        "video slots of account acct at 80% (warning threshold 80%)"
    );
}

/// A pool's warning is re-armed by a report under the hysteresis, and also by a report with
/// capacity 0 or by the pool's absence from a snapshot (its source stopped reporting it): the
/// next crossing warns again.
#[tokio::test(start_paused = true)]
async fn a_pool_reported_idle_empty_or_not_at_all_warns_again_at_its_next_crossing() {
    // What the source reports: in use, capacity; `u32::MAX` in use: not reported.
    const ABSENT: u32 = u32::MAX;
    for between in [(0, 5), (0, 0), (5, 0), (ABSENT, 5)] {
        let warnings = Arc::new(Mutex::new(Vec::new()));
        let monitor = Monitor::builder()
            .on_usage_warning(recorder_of(&warnings))
            .build()
            .unwrap();
        let report = Arc::new(Mutex::new((5, 5)));
        let source = Arc::clone(&report);
        monitor.add_source(move |s: &mut Snapshot| {
            let (in_use, capacity) = *source.lock().unwrap();
            if in_use != ABSENT {
                s.pools
                    .push(PoolUsage::new("video:kling-3.0", in_use, capacity, 0));
            }
        });
        let report_at = |state| {
            *report.lock().unwrap() = state;
            monitor.snapshot();
            warnings.lock().unwrap().len()
        };
        assert_eq!(report_at((5, 5)), 1, "{between:?}");
        assert_eq!(report_at((5, 5)), 1, "once per crossing: {between:?}");
        report_at(between);
        assert_eq!(report_at((5, 5)), 2, "after {between:?}");
    }
}

/// Two stacks sharing one monitor, each with its own slots, report the same (account, pool):
/// one near full, one idle. The pool is judged on the fuller report, so its warning fires once,
/// not once per snapshot (the idle report re-arming it each time).
#[tokio::test(start_paused = true)]
async fn a_pool_two_sources_report_warns_once_on_the_fuller_report() {
    let warnings = Arc::new(Mutex::new(Vec::new()));
    let monitor = Monitor::builder()
        .on_usage_warning(recorder_of(&warnings))
        .build()
        .unwrap();
    monitor.add_source(|s: &mut Snapshot| {
        s.pools
            .push(PoolUsage::new("video", 4, 5, 0).with_account("acct"));
    });
    monitor.add_source(|s: &mut Snapshot| {
        s.pools
            .push(PoolUsage::new("video", 0, 5, 0).with_account("acct"));
    });
    for _ in 0..5 {
        let snapshot = monitor.snapshot();
        assert_eq!(snapshot.pools.len(), 2, "the snapshot keeps both reports");
    }
    let warnings = warnings.lock().unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].usage, 0.8);
    assert_eq!(
        warnings[0].resource,
        Resource::Slots {
            account: Some("acct".into()),
            pool: "video".into()
        }
    );
}

#[tokio::test(start_paused = true)]
async fn attempts_reported_below_count_against_the_quota_and_show_in_the_span() {
    let capture = Capture::default();
    let _tracing = tracing::subscriber::set_default(capture.clone());
    let monitor = Monitor::builder()
        .rate_quota(60, Duration::from_secs(60))
        .build()
        .unwrap();
    // What a retry layer below reports: the third attempt answered, after waits.
    let retried = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
        let mut response = http::Response::new(Full::new(Bytes::from_static(OK.as_bytes())));
        response.extensions_mut().insert(Attempt(3));
        response.extensions_mut().insert(Waited {
            rate_limit: Duration::from_millis(1500),
            slots: Duration::from_secs(2),
        });
        Ok::<_, kling_core::error::BoxError>(response)
    });
    let stack = MetricsLayer::with_monitor(monitor.clone()).layer(retried);
    let mut req = request("POST", "/text-to-video/kling-3.0", r#"{"prompt":"x"}"#, "k");
    req.extensions_mut().insert(Attempt(1));
    stack.oneshot(req).await.unwrap();

    assert_eq!(monitor.snapshot().rate.requests, 3);
    let span = &capture.spans()[0];
    assert_eq!(span.field("pool"), Some("video:kling-3.0"));
    assert_eq!(
        span.fields.iter().filter(|(n, _)| n == "attempt").count(),
        2
    );
    assert_eq!(span.field("attempt"), Some("3"));
    assert_eq!(span.field("wait_rate_limit_s"), Some("1.5"));
    assert_eq!(span.field("wait_slots_s"), Some("2.0"));
}

/// A call counts against the rate when it is answered, not when it starts (a create that waits
/// minutes for a slot is sent at the end of its wait), and a call refused before it left counts
/// nothing: Kling never saw it.
#[tokio::test(start_paused = true)]
async fn requests_count_when_answered_and_refusals_before_sending_count_none() {
    #[derive(Debug)]
    struct NoSlotInTime;
    impl std::fmt::Display for NoSlotInTime {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("no slot in time")
        }
    }
    impl std::error::Error for NoSlotInTime {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&kling_core::error::RefusedBeforeSending)
        }
    }

    let monitor = Monitor::builder()
        .rate_quota(60, Duration::from_secs(60))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let below = tower::service_fn(move |_req: http::Request<Full<Bytes>>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            match n {
                // Waits five minutes (for a slot), then is sent and answered.
                0 => {
                    tokio::time::sleep(Duration::from_secs(300)).await;
                    Ok(http::Response::new(Full::new(Bytes::from_static(
                        OK.as_bytes(),
                    ))))
                }
                1 => Err::<_, kling_core::error::BoxError>(Box::new(NoSlotInTime)),
                // Reset after it was sent: it may have reached Kling.
                _ => Err(
                    Box::new(kling_core::error::Transport::new(std::io::Error::from(
                        std::io::ErrorKind::ConnectionReset,
                    ))) as kling_core::error::BoxError,
                ),
            }
        }
    });
    let stack = MetricsLayer::with_monitor(monitor.clone()).layer(below);
    let waiting = tokio::spawn(stack.clone().oneshot(request(
        "POST",
        "/v1/videos/text2video",
        r#"{"prompt":"x"}"#,
        "k",
    )));
    advance(Duration::from_secs(30)).await;
    assert_eq!(monitor.snapshot().rate.requests, 0, "waiting, not sent");
    advance(Duration::from_secs(270)).await;
    waiting.await.unwrap().unwrap();
    assert_eq!(monitor.snapshot().rate.requests, 1, "sent when answered");

    let refused = stack
        .clone()
        .oneshot(request("GET", "/v1/videos/text2video/t-1", "", "k"))
        .await
        .unwrap_err();
    assert!(refused.is::<NoSlotInTime>());
    assert_eq!(
        monitor.snapshot().rate.requests,
        1,
        "refused before sending"
    );
    let reset = stack
        .oneshot(request("GET", "/v1/videos/text2video/t-1", "", "k"))
        .await
        .unwrap_err();
    assert_eq!(
        kling_core::SendState::of(&*reset),
        kling_core::SendState::Unknown
    );
    assert_eq!(
        monitor.snapshot().rate.requests,
        2,
        "may have reached Kling"
    );
}

/// A call a retry layer gave up on counts every request it reports sending
/// (`kling_core::error::Attempts`), less a last one refused before it left.
#[tokio::test(start_paused = true)]
async fn a_failed_call_counts_the_requests_its_retries_sent() {
    use kling_core::error::{Attempts, BoxError, RefusedBeforeSending};

    let monitor = Monitor::builder()
        .rate_quota(60, Duration::from_secs(60))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let retried = tower::service_fn(move |_req: http::Request<Full<Bytes>>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            let error: BoxError = if n == 0 {
                Box::new(Attempts::new(6, false, "code 5000 six times"))
            } else {
                Box::new(Attempts::new(3, true, RefusedBeforeSending))
            };
            Err::<http::Response<Full<Bytes>>, _>(error)
        }
    });
    let stack = MetricsLayer::with_monitor(monitor.clone()).layer(retried);
    let query = || request("GET", "/v1/videos/text2video/t-1", "", "k");
    stack.clone().oneshot(query()).await.unwrap_err();
    assert_eq!(monitor.snapshot().rate.requests, 6);
    stack.oneshot(query()).await.unwrap_err();
    assert_eq!(
        monitor.snapshot().rate.requests,
        8,
        "the last of three never left"
    );
}

/// A retry layer's report (`Attempts`) that an adapter wrapped in an `io::Error` or an `Arc`
/// (whose `source` skips what they wrap) is read as kling-core reads a chain: the call counts
/// the six requests it sent, not one, and its span says the sixth attempt ended it.
#[tokio::test(start_paused = true)]
async fn a_retry_report_wrapped_by_an_adapter_counts_every_request_it_sent() {
    use kling_core::error::{Attempts, BoxError};

    let capture = Capture::default();
    let _tracing = tracing::subscriber::set_default(capture.clone());
    let monitor = Monitor::builder()
        .rate_quota(60, Duration::from_secs(60))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let retried = tower::service_fn(move |_req: http::Request<Full<Bytes>>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            let report = Attempts::new(6, false, "code 5000 six times");
            let error: BoxError = if n == 0 {
                Box::new(std::io::Error::other(report))
            } else {
                let shared: Arc<dyn std::error::Error + Send + Sync> = Arc::new(report);
                Box::new(shared)
            };
            Err::<http::Response<Full<Bytes>>, _>(error)
        }
    });
    let stack = MetricsLayer::with_monitor(monitor.clone()).layer(retried);
    let query = || request("GET", "/v1/videos/text2video/t-1", "", "k");
    stack.clone().oneshot(query()).await.unwrap_err();
    assert_eq!(monitor.snapshot().rate.requests, 6, "in an io::Error");
    stack.oneshot(query()).await.unwrap_err();
    assert_eq!(monitor.snapshot().rate.requests, 12, "in an Arc");
    let attempts: Vec<_> = capture
        .spans()
        .into_iter()
        .filter(|span| span.name == "kling.request")
        .map(|span| span.field("attempt").map(str::to_owned))
        .collect();
    assert_eq!(attempts, [Some("6".to_owned()), Some("6".to_owned())]);
}

/// A failed call's span says which attempt ended it, as a successful call's does: the number
/// of requests a retry layer's error reports (`kling_core::error::Attempts`), its last one
/// refused before it left or not, a Kling error inside or not. An error with no such report
/// leaves the request's own `attempt`.
#[tokio::test(start_paused = true)]
async fn a_failed_calls_span_records_the_attempt_that_ended_it() {
    use kling_core::error::{ApiError, Attempts, BoxError, RefusedBeforeSending};

    let capture = Capture::default();
    let _tracing = tracing::subscriber::set_default(capture.clone());
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let retried = tower::service_fn(move |_req: http::Request<Full<Bytes>>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            let error: BoxError = match n {
                0 => Box::new(Attempts::new(4, false, "code 5000 four times")),
                1 => Box::new(Attempts::new(3, true, RefusedBeforeSending)),
                2 => {
                    let outcome = kling_core::Outcome::parse(
                        http::StatusCode::TOO_MANY_REQUESTS,
                        &http::HeaderMap::new(),
                        br#"{"code":1302,"message":"rate limit","request_id":"r2"}"#,
                        tokio::time::Instant::now(),
                    )
                    .unwrap();
                    Box::new(Attempts::new(2, false, ApiError::from_outcome(&outcome)))
                }
                _ => "connection reset".into(),
            };
            Err::<http::Response<Full<Bytes>>, _>(error)
        }
    });
    let stack = MetricsLayer::new().layer(retried);
    for _ in 0..4 {
        let mut req = request("GET", "/v1/videos/text2video/t-1", "", "k");
        req.extensions_mut().insert(Attempt(1));
        stack.clone().oneshot(req).await.unwrap_err();
    }

    let spans: Vec<_> = capture
        .spans()
        .into_iter()
        .filter(|span| span.name == "kling.request")
        .collect();
    let fields =
        |name: &str| -> Vec<Option<&str>> { spans.iter().map(|span| span.field(name)).collect() };
    assert_eq!(
        fields("attempt"),
        [Some("4"), Some("3"), Some("2"), Some("1")]
    );
    // The second ended in a local refusal after two requests went out: they reached Kling,
    // so not `refused` (which says none left).
    assert_eq!(
        fields("code"),
        [Some("error"), Some("error"), Some("1302"), Some("error")]
    );
}

/// A create whose future is dropped before its answer (a caller's timeout) counts its request
/// when it may have left, as Kling counts it: not while a layer below holds it back unsent (a
/// slot's wait: `SendWatch::held`), once a layer handed it on toward Kling
/// (`SendWatch::handed`), and when no layer reported on it (sent as soon as called). A future
/// never polled sent nothing; one dropped after its answer was counted then, not again. The
/// same whether a classify step under the layer that holds it back counts it (the stack's
/// order) or the metrics layer does (no classify step).
#[tokio::test(start_paused = true)]
async fn a_create_dropped_after_it_left_counts_and_one_held_back_unsent_does_not() {
    use kling_core::signals::SendWatch;
    use tokio::time::timeout;

    const CREATED: &str = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t-drop","task_status":"submitted"}}"#;
    for classified in [false, true] {
        let monitor = Monitor::builder()
            .rate_quota(60, Duration::from_secs(60))
            .build()
            .unwrap();
        // Kling answers ten seconds after a create is sent.
        let kling = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, kling_core::error::BoxError>(http::Response::new(Full::new(
                Bytes::from_static(CREATED.as_bytes()),
            )))
        });
        // What the task slots do above it: hold the create back for five minutes, then hand
        // it on. A create to `/text-to-video/direct` is sent at once.
        let below = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
            let slots = !req.uri().path().ends_with("/direct");
            if slots {
                SendWatch::held(&req);
            }
            async move {
                if slots {
                    tokio::time::sleep(Duration::from_secs(300)).await;
                    SendWatch::handed(&req);
                }
                if classified {
                    ClassifyLayer::new().layer(kling).oneshot(req).await
                } else {
                    kling.oneshot(req).await
                }
            }
        });
        let stack = MetricsLayer::with_monitor(monitor.clone()).layer(below);
        let create = |path: &str| request("POST", path, r#"{"prompt":"x"}"#, "k");
        let requests = || monitor.snapshot().rate.requests;

        // Dropped while it waits for its slot: Kling never saw it.
        let waited = timeout(
            Duration::from_secs(100),
            stack.clone().oneshot(create("/v1/videos/text2video")),
        );
        assert!(waited.await.is_err(), "timed out");
        assert_eq!(requests(), 0, "held back unsent ({classified})");

        // Dropped after its slot was granted, while Kling works on it.
        let sent = timeout(
            Duration::from_secs(305),
            stack.clone().oneshot(create("/v1/videos/text2video")),
        );
        assert!(sent.await.is_err(), "timed out");
        assert_eq!(requests(), 1, "handed on toward Kling ({classified})");

        // No layer below reported on it: it left when called.
        let direct = timeout(
            Duration::from_secs(5),
            stack.clone().oneshot(create("/text-to-video/direct")),
        );
        assert!(direct.await.is_err(), "timed out");
        assert_eq!(requests(), 2, "sent at once ({classified})");

        // Never polled: never sent.
        let mut service = stack.clone();
        let unpolled = service
            .ready()
            .await
            .unwrap()
            .call(create("/text-to-video/direct"));
        drop(unpolled);
        assert_eq!(requests(), 2, "never polled ({classified})");

        // Answered, then dropped: counted once, when answered.
        let mut answered = Box::pin(stack.oneshot(create("/text-to-video/direct")));
        assert!(futures_poll(answered.as_mut()).is_none());
        advance(Duration::from_secs(10)).await;
        let response = std::future::poll_fn(|cx| answered.as_mut().poll(cx)).await;
        assert!(response.is_ok());
        drop(answered);
        assert_eq!(requests(), 3, "once, when answered ({classified})");
    }
}

/// A call dropped while a panic unwinds (its stack panicked, and the thread owning the
/// future unwinds) counts nothing: counting could fire the rate warning, and a hook that
/// panicked then would abort the process.
#[tokio::test(start_paused = true)]
async fn a_create_dropped_while_a_panic_unwinds_counts_nothing() {
    let monitor = Monitor::builder()
        .rate_quota(1, Duration::from_secs(60))
        .on_usage_warning(|_| panic!("the warning hook"))
        .build()
        .unwrap();
    let mut polls = 0;
    let below = tower::service_fn(move |_req: http::Request<Full<Bytes>>| {
        std::future::poll_fn(move |_| {
            polls += 1;
            if polls == 2 {
                panic!("a layer below");
            }
            std::task::Poll::<Result<http::Response<Full<Bytes>>, kling_core::error::BoxError>>::Pending
        })
    });
    let mut stack = MetricsLayer::with_monitor(monitor.clone()).layer(below);
    let create = request("POST", "/v1/videos/text2video", "{}", "k");
    let call = stack.ready().await.unwrap().call(create);
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let mut call = Box::pin(call);
        assert!(futures_poll(call.as_mut()).is_none(), "sent, pending");
        futures_poll(call.as_mut())
    }));
    assert!(unwound.is_err());
    assert_eq!(monitor.snapshot().rate.requests, 0);
}

/// Polls `future` once; `None` while it is pending.
fn futures_poll<F: std::future::Future>(future: std::pin::Pin<&mut F>) -> Option<F::Output> {
    let waker = std::task::Waker::noop();
    match future.poll(&mut std::task::Context::from_waker(waker)) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

/// With no classify step below to count requests as they are sent, the attempts a layer below
/// reports count whatever else the response carries: beside the outcome alone (the layer skips
/// the lookup only when the outcome is the one extension), and on a response with no envelope
/// (no outcome attached).
#[tokio::test(start_paused = true)]
async fn attempts_count_beside_the_outcome_alone_and_on_a_response_with_no_envelope() {
    for (status, body, classified) in [
        (200, OK, true),
        (200, OK, false),
        (502, "<html>bad gateway</html>", false),
    ] {
        let monitor = Monitor::builder()
            .rate_quota(60, Duration::from_secs(60))
            .build()
            .unwrap();
        let retried = tower::service_fn(move |_req: http::Request<Full<Bytes>>| async move {
            let mut response = http::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
            if classified {
                // The outcome attached first, as a classify step would.
                kling_core::Outcome::ensure(&mut response).unwrap();
            }
            response.extensions_mut().insert(Attempt(3));
            Ok::<_, kling_core::error::BoxError>(response)
        });
        let req = request("GET", "/v1/videos/text2video/t-1", "", "k");
        let stack = MetricsLayer::with_monitor(monitor.clone()).layer(retried);
        let _ = stack.oneshot(req).await;
        assert_eq!(monitor.snapshot().rate.requests, 3, "{status} {classified}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_task_end_reported_by_a_callback_is_counted_once() {
    let recording = Recording::start();
    let created = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t-1","task_status":"submitted"}}"#;
    let monitor = Monitor::builder()
        .record_task_metrics(true)
        .build()
        .unwrap();
    let stack = MetricsLayer::with_monitor(monitor.clone())
        .layer(ClassifyLayer::new().layer(answering(200, created)));
    let req = request("POST", "/v1/images/generations", r#"{"n":3}"#, "k");
    stack.oneshot(req).await.unwrap();
    assert_eq!(monitor.snapshot().tasks.running, 1);

    advance(Duration::from_secs(90)).await;
    assert!(!monitor.task_finished("t-1", &TaskStatus::Processing));
    assert!(monitor.task_finished("t-1", &TaskStatus::Failed));
    assert!(
        !monitor.task_finished("t-1", &TaskStatus::Failed),
        "counted once"
    );
    assert!(!monitor.task_finished("unknown", &TaskStatus::Succeeded));

    let tasks = monitor.snapshot().tasks;
    assert_eq!(
        (tasks.created, tasks.finished, tasks.failed, tasks.running),
        (1, 1, 1, 0)
    );
    let recorded = recording.take();
    let series = (
        TASKS_FINISHED.to_owned(),
        vec![
            (LABEL_POOL.to_owned(), "image".to_owned()),
            (LABEL_STATUS.to_owned(), "failed".to_owned()),
        ],
    );
    assert_eq!(recorded[&series].1, Value::Counter(1));
    let lifetime = (
        kling_core::metrics::TASK_LIFETIME.to_owned(),
        series.1.clone(),
    );
    assert_eq!(recorded[&lifetime].1, Value::Histogram(vec![90.0]));
}

/// A task followed only by callbacks, running five leases long: each "processing" report
/// renews its lease, so it is never counted expired, and its real end is counted.
#[tokio::test(start_paused = true)]
async fn callbacks_reporting_a_task_running_renew_its_lease_and_its_end_is_counted() {
    let created = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t-1","task_status":"submitted"}}"#;
    let monitor = Monitor::builder()
        .task_lease(Duration::from_secs(60))
        .build()
        .unwrap();
    let stack = MetricsLayer::with_monitor(monitor.clone())
        .layer(ClassifyLayer::new().layer(answering(200, created)));
    let req = request("POST", "/v1/videos/text2video", "{}", "k");
    stack.oneshot(req).await.unwrap();
    for _ in 0..10 {
        advance(Duration::from_secs(40)).await;
        assert!(monitor.task_reported("t-1", &TaskStatus::Processing));
        let tasks = monitor.snapshot().tasks;
        assert_eq!((tasks.running, tasks.expired), (1, 0));
    }
    assert!(!monitor.task_reported("unknown", &TaskStatus::Processing));
    advance(Duration::from_secs(40)).await;
    assert!(monitor.task_reported("t-1", &TaskStatus::Failed));
    assert!(!monitor.task_reported("t-1", &TaskStatus::Failed), "once");
    let tasks = monitor.snapshot().tasks;
    assert_eq!(
        (tasks.created, tasks.failed, tasks.expired, tasks.running),
        (1, 1, 0, 0)
    );
}

/// With `record_task_metrics`, a task whose lease ran out is recorded as ended with
/// `status="expired"` (as the task slots record it), whether a snapshot or a create that found
/// no free place noticed it first.
#[tokio::test(start_paused = true)]
async fn a_task_whose_lease_ran_out_is_recorded_as_expired() {
    let recording = Recording::start();
    let created = |id: &'static str| match id {
        "t-1" => {
            r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t-1","task_status":"submitted"}}"#
        }
        _ => {
            r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t-2","task_status":"submitted"}}"#
        }
    };
    let expired = |pool: &str| {
        [TASKS_FINISHED, kling_core::metrics::TASK_LIFETIME].map(|name| {
            (
                name.to_owned(),
                vec![
                    (LABEL_POOL.to_owned(), pool.to_owned()),
                    (LABEL_STATUS.to_owned(), "expired".to_owned()),
                ],
            )
        })
    };
    for noticed_by_snapshot in [true, false] {
        let monitor = Monitor::builder()
            .record_task_metrics(true)
            .task_lease(Duration::from_secs(60))
            .max_tracked_tasks(1)
            .build()
            .unwrap();
        let create = |id| {
            MetricsLayer::with_monitor(monitor.clone())
                .layer(ClassifyLayer::new().layer(answering(200, created(id))))
                .oneshot(request("POST", "/v1/videos/text2video", "{}", "k"))
        };
        create("t-1").await.unwrap();
        recording.take();
        advance(Duration::from_secs(180)).await;
        if noticed_by_snapshot {
            let tasks = monitor.snapshot().tasks;
            assert_eq!((tasks.created, tasks.expired, tasks.running), (1, 1, 0));
        } else {
            // The only place is t-1's: the create sweeps for expired tasks to free it.
            create("t-2").await.unwrap();
            let tasks = monitor.snapshot().tasks;
            assert_eq!((tasks.created, tasks.expired, tasks.running), (2, 1, 1));
        }
        let recorded = recording.take();
        let [finished, lifetime] = expired("video");
        assert_eq!(
            recorded.get(&finished).map(|(_, v)| v),
            Some(&Value::Counter(1)),
            "noticed by snapshot: {noticed_by_snapshot}, {recorded:?}"
        );
        assert_eq!(recorded[&lifetime].1, Value::Histogram(vec![180.0]));
        // Nothing else ended.
        let ends = recorded
            .keys()
            .filter(|(name, _)| name == TASKS_FINISHED)
            .count();
        assert_eq!(ends, 1, "{recorded:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn task_metrics_are_left_to_the_slots_layer_unless_asked_for() {
    let recording = Recording::start();
    let created = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t-2","task_status":"submitted"}}"#;
    let layer = MetricsLayer::new();
    let monitor = layer.monitor().clone();
    let stack = layer.layer(ClassifyLayer::new().layer(answering(200, created)));
    stack
        .oneshot(request("POST", "/v1/videos/text2video", "{}", "k"))
        .await
        .unwrap();
    assert!(monitor.task_finished("t-2", &TaskStatus::Succeeded));
    // The snapshot still counts the task...
    assert_eq!(monitor.snapshot().tasks.finished, 1);
    // ...but the metrics are the slots layer's, by default.
    let recorded = recording.take();
    assert!(
        recorded
            .keys()
            .all(|(name, _)| name != TASKS_FINISHED && name != kling_core::metrics::TASK_LIFETIME),
        "{recorded:?}"
    );
}
