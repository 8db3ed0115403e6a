//! What is retried and what is not, decided from the Outcome.

use std::time::Duration;

use http::StatusCode;
use kling_core::Code;
use kling_core::signals::SlotGated;
use kling_retry::error::{Failed, StopReason};
use kling_retry::{RetryLayer, TokenDropped};
use tokio::time::Instant;
use tower::Layer;

use crate::support::{Reply, Res, code, create, get, kling, refused, reset, send, task};

fn layer() -> RetryLayer {
    RetryLayer::builder().seed(1).build().unwrap()
}

#[tokio::test(start_paused = true)]
async fn no_retry_after_1102_exactly_one_request_reaches_the_server() {
    let (server, log) = kling(|_, _| Reply::Now(code(1102)));
    let client = layer().layer(server);
    let error = send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap_err();
    assert_eq!(log.len(), 1);
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.reason(), StopReason::NotRetryable);
    assert_eq!(failed.code(), Some(Code::ResourcePackExhausted));
    assert_eq!(failed.status(), Some(StatusCode::TOO_MANY_REQUESTS));
    assert_eq!(failed.message(), Some("message 1102"));
    assert_eq!(failed.request_id(), Some("req-1102"));
    assert_eq!(failed.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn never_retried_codes_return_at_once() {
    let codes = [
        1000, 1001, 1002, 1003, 1004, 1100, 1101, 1102, 1103, 1200, 1201, 1202, 1203, 1300, 1301,
        1304,
    ];
    for c in codes {
        let (server, log) = kling(move |_, _| Reply::Now(code(c)));
        let client = layer().layer(server);
        let started = Instant::now();
        let error = send(&client, get("/v1/videos/text2video/t1"))
            .await
            .unwrap_err();
        assert_eq!(log.len(), 1, "code {c} was retried");
        assert_eq!(Instant::now(), started, "code {c} waited");
        let failed = error.downcast_ref::<Failed>().expect("a Failed");
        assert_eq!(failed.code(), Some(Code::from_i64(c)));
        assert_eq!(failed.reason(), StopReason::NotRetryable);
    }
}

/// A refusal of the token (1003/1004) from an auth layer that dropped it and left the resend
/// to the retry layer.
fn token_dropped(c: i64) -> Res {
    let mut response = code(c);
    response.extensions_mut().insert(TokenDropped);
    response
}

#[tokio::test(start_paused = true)]
async fn a_dropped_token_is_sent_again_at_once_and_a_second_refusal_is_final() {
    for c in [1003, 1004] {
        let (server, log) = kling(move |_, _| Reply::Now(token_dropped(c)));
        let client = layer().layer(server);
        let started = Instant::now();
        let error = send(&client, create(r#"{"prompt":"cat"}"#))
            .await
            .unwrap_err();
        assert_eq!(Instant::now(), started, "code {c} waited");
        let attempts: Vec<_> = log.all().iter().map(|s| s.attempt).collect();
        assert_eq!(attempts, [Some(1), Some(2)], "code {c}: resent once");
        let failed = error.downcast_ref::<Failed>().expect("a Failed");
        assert_eq!(failed.code(), Some(Code::from_i64(c)));
        assert_eq!(failed.reason(), StopReason::NotRetryable);
        assert_eq!(failed.attempts(), 2);
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_token_is_resent_even_past_the_attempt_limit() {
    let (server, log) = kling(|_, i| {
        Reply::Now(if i == 0 {
            token_dropped(1004)
        } else {
            task("t1", None)
        })
    });
    let client = RetryLayer::builder()
        .seed(1)
        .max_attempts(1)
        .build()
        .unwrap()
        .layer(server);
    let response = send(&client, create(r#"{"prompt":"cat"}"#)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(log.count("POST", "text2video"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_token_is_resent_once_per_call_not_once_per_attempt() {
    let (server, log) = kling(|_, i| {
        Reply::Now(match i {
            1 => code(1302),
            _ => token_dropped(1004),
        })
    });
    let client = layer().layer(server);
    let error = send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap_err();
    assert_eq!(log.len(), 3, "1004, resent; 1302, retried; 1004 is final");
    let failed = error.downcast_ref::<Failed>().expect("a Failed");
    assert_eq!(failed.code(), Some(Code::TokenExpired));
    assert_eq!(failed.reason(), StopReason::NotRetryable);
}

#[tokio::test(start_paused = true)]
async fn a_retried_request_carries_the_callers_headers_account_and_extensions() {
    #[derive(Clone)]
    struct Tag;
    // Each call: a 1302, then a success.
    let (server, log) = kling(|_, i| {
        Reply::Now(if i % 2 == 0 {
            code(1302)
        } else {
            task("t1", None)
        })
    });
    let client = layer().layer(server);
    for foreign in [false, true] {
        let mut request = create(r#"{"prompt":"cat"}"#);
        request
            .headers_mut()
            .append("x-trace", "1".parse().unwrap());
        request
            .headers_mut()
            .append("x-trace", "2".parse().unwrap());
        kling_core::AccountId::set_if_absent(&mut request, &kling_core::AccountId::new("acct"));
        if foreign {
            request.extensions_mut().insert(Tag);
        }
        let expected = request.headers().clone();
        send(&client, request).await.unwrap();
        let seen = log.all();
        let (first, retried) = (&seen[seen.len() - 2], &seen[seen.len() - 1]);
        assert_eq!(retried.attempt, Some(2));
        for attempt in [first, retried] {
            assert_eq!(attempt.headers, expected, "foreign extension: {foreign}");
            assert_eq!(attempt.account.as_deref(), Some("acct"));
            assert_eq!(attempt.body, r#"{"prompt":"cat"}"#);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn rate_limits_and_server_faults_are_retried_until_success() {
    for c in [1302, 5000, 5001, 5002] {
        let (server, log) =
            kling(move |_, i| Reply::Now(if i == 0 { code(c) } else { task("t1", None) }));
        let client = layer().layer(server);
        let response = send(&client, get("/v1/videos/text2video/t1"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(log.len(), 2, "code {c}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_connection_refused_before_sending_is_retried_even_for_a_create() {
    let (server, log) = kling(|_, i| {
        if i == 0 {
            Reply::Fail(refused())
        } else {
            Reply::Now(task("t1", None))
        }
    });
    let client = layer().layer(server);
    let response = send(&client, crate::support::create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(log.count("POST", "/v1/videos/text2video"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_reset_after_sending_is_retried_for_a_query() {
    let (server, log) = kling(|_, i| {
        if i == 0 {
            Reply::Fail(reset())
        } else {
            Reply::Now(task("t1", None))
        }
    });
    let client = layer().layer(server);
    send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap();
    assert_eq!(log.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_1303_marked_slot_gated_is_retried_at_once_without_spending_budget() {
    let (server, log) = kling(|_, i| {
        Reply::Now(if i == 0 {
            let mut res = code(1303);
            res.extensions_mut().insert(SlotGated);
            res
        } else {
            task("t1", None)
        })
    });
    let budget = kling_retry::RetryBudget::new(Duration::from_secs(10), 0, 0.0).unwrap();
    let client = RetryLayer::builder()
        .seed(1)
        .budget(budget)
        .build()
        .unwrap()
        .layer(server);
    send(&client, crate::support::create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap();
    let seen = log.all();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].at, seen[0].at, "no backoff of its own");
}

/// An account whose slot count is set too high meets several 1303s in a row: each one the
/// slots layer below holds until a slot frees is waiting, not a failed attempt, so the create
/// goes on past the attempt limit (the deadline bounds it); an ungated 1303 still counts.
#[tokio::test(start_paused = true)]
async fn slot_gated_1303s_do_not_use_up_the_attempts() {
    let gated = |i: usize| {
        Reply::Now(if i < 8 {
            let mut res = code(1303);
            res.extensions_mut().insert(SlotGated);
            res
        } else {
            task("t1", None)
        })
    };
    let (server, log) = kling(move |_, i| gated(i));
    let client = RetryLayer::builder()
        .seed(1)
        .max_attempts(3)
        .build()
        .unwrap()
        .layer(server);
    let response = send(&client, crate::support::create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap();
    assert_eq!(log.len(), 9);
    assert_eq!(
        response
            .extensions()
            .get::<kling_core::signals::Attempt>()
            .map(|a| a.0),
        Some(9)
    );

    let (server, log) = kling(|_, i| Reply::Now(if i < 8 { code(1303) } else { task("t1", None) }));
    let client = RetryLayer::builder()
        .seed(1)
        .max_attempts(3)
        .build()
        .unwrap()
        .layer(server);
    let error = send(&client, crate::support::create(r#"{"prompt":"a cat"}"#))
        .await
        .unwrap_err();
    assert_eq!(log.len(), 3, "{error}");
}

#[tokio::test(start_paused = true)]
async fn a_1303_without_a_slots_layer_backs_off_at_least_a_second() {
    for seed in 0..20 {
        let (server, log) =
            kling(|_, i| Reply::Now(if i == 0 { code(1303) } else { task("t1", None) }));
        let client = RetryLayer::builder()
            .seed(seed)
            .build()
            .unwrap()
            .layer(server);
        send(&client, crate::support::create(r#"{"prompt":"a cat"}"#))
            .await
            .unwrap();
        let seen = log.all();
        let gap = seen[1].at - seen[0].at;
        assert!(gap >= Duration::from_secs(1), "seed {seed}: {gap:?}");
        assert!(gap <= Duration::from_secs(2), "seed {seed}: {gap:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_malformed_gateway_page_with_a_5xx_is_retried_and_a_malformed_200_is_not() {
    let html = |status: u16| crate::support::html(status, "<html>bad gateway</html>");
    let (server, log) =
        kling(move |_, i| Reply::Now(if i == 0 { html(502) } else { task("t1", None) }));
    send(&layer().layer(server), get("/v1/videos/text2video/t1"))
        .await
        .unwrap();
    assert_eq!(log.len(), 2);

    let (server, log) = kling(move |_, _| Reply::Now(html(200)));
    let error = send(&layer().layer(server), get("/v1/videos/text2video/t1"))
        .await
        .unwrap_err();
    assert_eq!(log.len(), 1);
    assert!(
        error.is::<kling_core::error::MalformedResponse>(),
        "{error}"
    );
}

/// A limiter's own error, as a layer below would return it.
#[derive(Debug)]
struct WouldPassDeadline;

impl std::fmt::Display for WouldPassDeadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("waiting would pass the deadline")
    }
}

impl std::error::Error for WouldPassDeadline {}

#[tokio::test(start_paused = true)]
async fn errors_from_below_that_are_not_retryable_pass_through_unchanged() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // A limiter below the retry layer refusing to wait past the deadline.
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let limiter = tower::service_fn(move |_req: crate::support::Req| {
        counted.fetch_add(1, Ordering::SeqCst);
        async {
            Err::<crate::support::Res, _>(kling_core::error::BoxError::from(WouldPassDeadline))
        }
    });
    let client = layer().layer(limiter);
    let error = send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap_err();
    assert!(error.is::<WouldPassDeadline>(), "{error}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A layer under the classify step that refuses the request (a base URL refusing another
/// origin) is not retried: the classify step reports it as a transport error that never left,
/// but the same request would only be refused again.
#[tokio::test(start_paused = true)]
async fn a_refusal_under_the_classify_step_is_not_retried() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug)]
    struct OtherHost;
    impl std::fmt::Display for OtherHost {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("refused: another host")
        }
    }
    impl std::error::Error for OtherHost {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&kling_core::error::RefusedBeforeSending)
        }
    }

    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let below = tower::service_fn(move |_req: crate::support::Req| {
        counted.fetch_add(1, Ordering::SeqCst);
        async {
            Err::<crate::support::Res, _>(kling_core::error::BoxError::from(
                kling_core::error::Transport::new(OtherHost),
            ))
        }
    });
    let error = send(&layer().layer(below), get("/v1/videos/text2video/t1"))
        .await
        .unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "{error}");
    assert!(error.is::<kling_core::error::Transport>(), "{error}");
}

#[tokio::test(start_paused = true)]
async fn a_final_error_reads_as_one_line_with_everything_support_needs() {
    let (server, _log) = kling(|_, i| Reply::Now(if i < 2 { code(5000) } else { code(1201) }));
    let client = layer().layer(server);
    let error = send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(!text.contains('\n'), "{text}");
    assert!(
        text.starts_with("not retryable after 3 attempts in "),
        "{text}"
    );
    assert!(
        text.ends_with(
            "kling error 1201 (invalid parameter), http 400: message 1201 (request_id req-1201)"
        ),
        "{text}"
    );
    let failed = error.downcast_ref::<Failed>().unwrap();
    assert_eq!(failed.attempts(), 3);
    assert!(failed.waited() > Duration::ZERO);
    assert_eq!(
        failed.elapsed(),
        failed.waited(),
        "paused time: all of it was backing off"
    );
    // The source is the requests' account, whose source is the last answer.
    let source = std::error::Error::source(failed).unwrap();
    let attempts = source
        .downcast_ref::<kling_core::error::Attempts>()
        .unwrap();
    assert_eq!(attempts.sent(), 3);
    assert!(!attempts.may_have_created());
    assert!(source.source().unwrap().is::<kling_core::error::ApiError>());
    assert!(failed.last().is::<kling_core::error::ApiError>());
}

#[tokio::test(start_paused = true)]
async fn a_custom_policy_decides_instead() {
    use kling_retry::{Attempted, CreateState, DelayKind, KlingPolicy, Policy, Verdict};

    /// Also retries 1201 (say, a proxy that garbles bodies now and then).
    #[derive(Debug)]
    struct Also1201;
    impl Policy for Also1201 {
        fn judge(&self, attempted: Attempted<'_>) -> Verdict {
            match attempted {
                Attempted::Response(_, outcome) if outcome.code() == Code::InvalidParameter => {
                    Verdict::Retry {
                        delay: DelayKind::Transient,
                        create: CreateState::NotCreated,
                    }
                }
                other => KlingPolicy.judge(other),
            }
        }
    }
    let (server, log) =
        kling(|_, i| Reply::Now(if i == 0 { code(1201) } else { task("t1", None) }));
    let client = RetryLayer::builder()
        .policy(Also1201)
        .seed(3)
        .build()
        .unwrap()
        .layer(server);
    send(&client, get("/v1/videos/text2video/t1"))
        .await
        .unwrap();
    assert_eq!(log.len(), 2);
}
