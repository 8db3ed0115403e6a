use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::AUTHORIZATION;
use http_body_util::Full;
use kling_core::signals::TokenDropped;
use kling_core::{AccountId, ClassifyLayer, Code, Outcome, SendState};
use kling_mock::{MockConfig, MockKling, Preset};
use kling_retry::error::{Failed, StopReason};
use kling_tower::auth::{ApiKeyRequired, AuthLayer, Credentials};
use kling_tower::base_url::OtherOrigin;
use kling_tower::clock::TokioWallClock;
use kling_tower::{KlingLayer, StackConfig, Tier};
use tower::{Layer, Service, ServiceExt, service_fn};

use crate::support::{
    accepted_create, envelope, legacy_create, new_style_create, pro_stack_on_a_key_pair, request,
};

/// 2024-01-01T00:00:00Z.
const T0: u64 = 1_704_067_200;

fn claims(header: &http::HeaderValue) -> serde_json::Value {
    let token = header.to_str().unwrap().strip_prefix("Bearer ").unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let head: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[0])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(head["alg"], "HS256");
    assert_eq!(head["typ"], "JWT");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap()
}

/// A service recording each `Authorization` it sees and answering from `answer`.
type Seen = Arc<Mutex<Vec<http::HeaderValue>>>;

type Inner = tower::util::BoxCloneService<
    http::Request<Full<Bytes>>,
    http::Response<Full<Bytes>>,
    std::convert::Infallible,
>;

fn recorder(
    answer: impl Fn(usize) -> (u16, &'static str) + Clone + Send + Sync + 'static,
) -> (Seen, Inner) {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let svc = service_fn(move |req: http::Request<Full<Bytes>>| {
        let log = log.clone();
        let answer = answer.clone();
        async move {
            let n = {
                let mut log = log.lock().unwrap();
                log.push(req.headers()[AUTHORIZATION].clone());
                log.len()
            };
            let (status, body) = answer(n);
            Ok::<_, std::convert::Infallible>(envelope(status, body))
        }
    });
    (seen, tower::util::BoxCloneService::new(svc))
}

const OK: &str = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":null}"#;
const EXPIRED: &str = r#"{"code":1004,"message":"token expired","request_id":"r"}"#;

#[tokio::test(start_paused = true)]
async fn jwt_claims_are_iss_exp_and_nbf() {
    let layer = AuthLayer::new(Credentials::access_key("ak-1", "sk-1").unwrap())
        .with_clock(TokioWallClock::starting_at(Duration::from_secs(T0)));
    let c = claims(&layer.authorization().unwrap());
    assert_eq!(c["iss"], "ak-1");
    assert_eq!(c["exp"], T0 + 1800);
    assert_eq!(c["nbf"], T0 - 5);
    assert_eq!(layer.tokens_signed(), 1);
}

#[tokio::test(start_paused = true)]
async fn token_is_cached_then_renewed_before_it_expires() {
    let layer = AuthLayer::new(Credentials::access_key("ak", "sk").unwrap())
        .with_clock(TokioWallClock::starting_at(Duration::from_secs(T0)))
        .renew_before(Duration::from_secs(300))
        .unwrap();
    let (seen, inner) = recorder(|_| (200, OK));
    let svc = layer.layer(inner);
    svc.clone()
        .oneshot(request("GET", "/v1/videos/text2video/1", ""))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(1499)).await;
    svc.clone()
        .oneshot(request("GET", "/v1/videos/text2video/1", ""))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    svc.clone()
        .oneshot(request("GET", "/v1/videos/text2video/1", ""))
        .await
        .unwrap();

    let seen = seen.lock().unwrap();
    assert_eq!(seen[0], seen[1], "cached for 1499 s");
    assert_ne!(seen[1], seen[2], "renewed 300 s before exp");
    assert_eq!(claims(&seen[2])["exp"], T0 + 1500 + 1800);
    assert_eq!(layer.tokens_signed(), 2);
}

#[tokio::test(start_paused = true)]
async fn token_expired_answer_triggers_exactly_one_resign_and_retry() {
    let clock = TokioWallClock::starting_at(Duration::from_secs(T0));
    let layer = AuthLayer::new(Credentials::access_key("ak", "sk").unwrap()).with_clock(clock);
    // The server refuses the first token it sees and accepts any other.
    let (seen, inner) = recorder(|n| if n == 1 { (401, EXPIRED) } else { (200, OK) });
    let svc = ClassifyLayer::new().layer(inner);
    let svc = layer.layer(svc);
    tokio::time::advance(Duration::from_secs(10)).await;
    layer.authorization().unwrap(); // signs at T0 + 10
    tokio::time::advance(Duration::from_secs(60)).await;
    let response = svc
        .clone()
        .oneshot(request(
            "POST",
            "/v1/videos/text2video",
            r#"{"prompt":"x"}"#,
        ))
        .await
        .unwrap();
    assert_eq!(Outcome::of(&response).unwrap().code(), Code::Success);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one retry");
    assert_ne!(seen[0], seen[1], "with a fresh token");
    assert_eq!(claims(&seen[1])["exp"], T0 + 70 + 1800);
    assert_eq!(layer.tokens_signed(), 2);
}

/// The server counts the auth layer's own resend against the rate like any request: a metrics
/// layer above that counts requests as they are sent sees both (the resend carries its
/// counter).
#[tokio::test(start_paused = true)]
async fn a_resend_after_a_refusal_counts_in_the_metrics_layers_rate_window() {
    let clock = TokioWallClock::starting_at(Duration::from_secs(T0));
    let layer = AuthLayer::new(Credentials::access_key("ak", "sk").unwrap())
        .with_clock(clock)
        .resend_on_refusal(true);
    let (seen, inner) = recorder(|n| if n == 1 { (401, EXPIRED) } else { (200, OK) });
    let monitor = kling_metrics::Monitor::builder()
        .rate_quota(60, Duration::from_secs(60))
        .build()
        .unwrap();
    let svc = kling_metrics::MetricsLayer::with_monitor(monitor.clone())
        .layer(layer.layer(ClassifyLayer::new().layer(inner)));
    // With the signals a stack's entry puts on every request.
    let mut create = request("POST", "/v1/videos/text2video", r#"{"prompt":"x"}"#);
    kling_core::Recognized::of_with_account(&mut create, &AccountId::new("acct"));
    let response = svc.oneshot(create).await.unwrap();
    assert_eq!(Outcome::of(&response).unwrap().code(), Code::Success);
    assert_eq!(seen.lock().unwrap().len(), 2, "one resend");
    assert_eq!(monitor.snapshot().rate.requests, 2, "both counted");
}

/// Without a classify step below, the layer reads the refusal from the body itself, in both
/// modes.
#[tokio::test(start_paused = true)]
async fn a_refusal_is_recognised_without_a_classify_step() {
    for resend in [true, false] {
        let clock = TokioWallClock::starting_at(Duration::from_secs(T0));
        let layer = AuthLayer::new(Credentials::access_key("ak", "sk").unwrap())
            .with_clock(clock)
            .resend_on_refusal(resend);
        let (seen, inner) = recorder(|n| if n == 1 { (401, EXPIRED) } else { (200, OK) });
        let svc = layer.layer(inner);
        let response = svc
            .oneshot(request("GET", "/v1/videos/text2video/t1", ""))
            .await
            .unwrap();
        let seen = seen.lock().unwrap().len();
        if resend {
            assert_eq!(response.status(), 200);
            assert_eq!(seen, 2, "sent once more");
        } else {
            assert_eq!(Outcome::of(&response).unwrap().code(), Code::TokenExpired);
            assert!(response.extensions().get::<TokenDropped>().is_some());
            assert_eq!(seen, 1);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_resent_copy_carries_every_header_and_only_a_fresh_token() {
    for extra in [1, 9] {
        let layer = AuthLayer::new(Credentials::access_key("ak", "sk").unwrap());
        let seen: Arc<Mutex<Vec<http::HeaderMap>>> = Arc::default();
        let log = seen.clone();
        let inner = service_fn(move |req: http::Request<Full<Bytes>>| {
            let n = {
                let mut log = log.lock().unwrap();
                log.push(req.headers().clone());
                log.len()
            };
            let (status, body) = if n == 1 { (401, EXPIRED) } else { (200, OK) };
            async move { Ok::<_, std::convert::Infallible>(envelope(status, body)) }
        });
        let svc = layer.layer(ClassifyLayer::new().layer(inner));
        let mut req = request("POST", "/v1/videos/text2video", r#"{"prompt":"x"}"#);
        req.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        for i in 0..extra {
            req.headers_mut()
                .append("x-trace", i.to_string().parse().unwrap());
        }
        let sent = req.headers().clone();
        svc.oneshot(req).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2);
        for attempt in &seen {
            let mut without_token = attempt.clone();
            assert_eq!(without_token.get_all(AUTHORIZATION).iter().count(), 1);
            without_token.remove(AUTHORIZATION);
            assert_eq!(without_token, sent, "{extra} extra headers");
        }
        assert_eq!(layer.tokens_signed(), 2, "signed afresh");
    }
}

#[tokio::test(start_paused = true)]
async fn a_second_refusal_is_returned_not_retried_again() {
    let layer = AuthLayer::new(Credentials::access_key("ak", "sk").unwrap());
    let (seen, inner) = recorder(|_| (401, EXPIRED));
    let svc = layer.layer(ClassifyLayer::new().layer(inner));
    let response = svc
        .oneshot(request("GET", "/v1/videos/text2video/a", ""))
        .await
        .unwrap();
    assert_eq!(Outcome::of(&response).unwrap().code(), Code::TokenExpired);
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn without_resend_a_refusal_drops_the_token_and_is_marked_for_the_retry_layer() {
    let layer = AuthLayer::new(Credentials::access_key("ak", "sk").unwrap())
        .with_clock(TokioWallClock::starting_at(Duration::from_secs(T0)))
        .resend_on_refusal(false);
    let (seen, inner) = recorder(|n| if n == 1 { (401, EXPIRED) } else { (200, OK) });
    let svc = layer.layer(ClassifyLayer::new().layer(inner));
    let response = svc
        .clone()
        .oneshot(request("GET", "/v1/videos/text2video/a", ""))
        .await
        .unwrap();
    assert_eq!(Outcome::of(&response).unwrap().code(), Code::TokenExpired);
    assert!(response.extensions().get::<TokenDropped>().is_some());
    assert_eq!(seen.lock().unwrap().len(), 1, "not resent here");
    assert_eq!(layer.tokens_signed(), 1);

    tokio::time::advance(Duration::from_secs(1)).await;
    let response = svc
        .oneshot(request("GET", "/v1/videos/text2video/a", ""))
        .await
        .unwrap();
    assert_eq!(Outcome::of(&response).unwrap().code(), Code::Success);
    assert!(response.extensions().get::<TokenDropped>().is_none());
    let seen = seen.lock().unwrap().clone();
    assert_ne!(seen[0], seen[1], "the next request is signed afresh");
    assert_eq!(claims(&seen[1])["exp"], T0 + 1 + 1800);
    assert_eq!(layer.tokens_signed(), 2);
}

#[tokio::test(start_paused = true)]
async fn without_resend_a_token_signed_since_the_refusal_is_kept() {
    let layer = AuthLayer::new(Credentials::access_key("ak", "sk").unwrap())
        .with_clock(TokioWallClock::starting_at(Duration::from_secs(T0)))
        .resend_on_refusal(false);
    let (seen, inner) = recorder(|n| if n == 1 { (401, EXPIRED) } else { (200, OK) });
    let svc = layer.layer(ClassifyLayer::new().layer(inner));
    // Request A carries generation 1; before its refusal arrives, the token is renewed
    // (generation 2) for request B.
    let a = svc.clone().ready_oneshot().await.unwrap().call(request(
        "GET",
        "/v1/videos/text2video/a",
        "",
    ));
    tokio::time::advance(Duration::from_secs(1500)).await;
    let b = svc.clone().ready_oneshot().await.unwrap().call(request(
        "GET",
        "/v1/videos/text2video/b",
        "",
    ));
    assert_eq!(layer.tokens_signed(), 2);
    let a = a.await.unwrap();
    assert!(a.extensions().get::<TokenDropped>().is_some());
    b.await.unwrap();
    svc.oneshot(request("GET", "/v1/videos/text2video/c", ""))
        .await
        .unwrap();
    assert_eq!(layer.tokens_signed(), 2, "generation 2 was kept");
    let seen = seen.lock().unwrap();
    assert_ne!(seen[0], seen[1]);
    assert_eq!(seen[1], seen[2]);
}

/// A request's `Authorization` and attempt number.
type TokenAndAttempt = (http::HeaderValue, Option<u32>);

#[tokio::test(start_paused = true)]
async fn through_the_stack_a_1004_is_signed_afresh_and_sent_once_more() {
    // Records each request's token and attempt number: the retry layer, not the auth layer,
    // sends the second (the auth layer's copy would carry no attempt number).
    let seen: Arc<Mutex<Vec<TokenAndAttempt>>> = Arc::default();
    let log = seen.clone();
    let inner = service_fn(move |req: http::Request<Full<Bytes>>| {
        let n = {
            let mut log = log.lock().unwrap();
            log.push((
                req.headers()[AUTHORIZATION].clone(),
                kling_core::signals::Attempt::of(&req),
            ));
            log.len()
        };
        let (status, body) = if n == 1 { (401, EXPIRED) } else { (200, OK) };
        async move { Ok::<_, std::convert::Infallible>(envelope(status, body)) }
    });
    let auth = AuthLayer::new(Credentials::access_key("ak", "sk").unwrap())
        .with_clock(TokioWallClock::starting_at(Duration::from_secs(T0)));
    let kling = KlingLayer::builder(
        StackConfig::preset(Tier::Pro),
        Credentials::access_key("ak", "sk").unwrap(),
    )
    .auth(auth.clone())
    .build()
    .unwrap();
    let svc = kling.layer(inner);
    let response = svc
        .oneshot(request(
            "POST",
            "/v1/videos/text2video",
            r#"{"prompt":"x"}"#,
        ))
        .await
        .unwrap();
    assert_eq!(Outcome::of(&response).unwrap().code(), Code::Success);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one resend");
    assert_ne!(seen[0].0, seen[1].0, "with a fresh token");
    assert_eq!(
        (seen[0].1, seen[1].1),
        (Some(1), Some(2)),
        "sent by the retry layer"
    );
    assert_eq!(auth.tokens_signed(), 2);
}

#[tokio::test(start_paused = true)]
async fn through_the_stack_a_second_1004_is_returned() {
    let (seen, inner) = recorder(|_| (401, EXPIRED));
    let auth = AuthLayer::new(Credentials::access_key("ak", "sk").unwrap())
        .with_clock(TokioWallClock::starting_at(Duration::from_secs(T0)));
    let kling = KlingLayer::builder(
        StackConfig::preset(Tier::Pro),
        Credentials::access_key("ak", "sk").unwrap(),
    )
    .auth(auth.clone())
    .build()
    .unwrap();
    let error = kling
        .layer(inner)
        .oneshot(request(
            "POST",
            "/v1/videos/text2video",
            r#"{"prompt":"x"}"#,
        ))
        .await
        .unwrap_err();
    let failed = error.downcast_ref::<Failed>().expect("a final kling error");
    assert_eq!(failed.code(), Some(Code::TokenExpired));
    assert_eq!(failed.reason(), StopReason::NotRetryable);
    assert_eq!(failed.attempts(), 2);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "sent twice, not more");
    assert_ne!(seen[0], seen[1], "the second with a fresh token");
    assert_eq!(auth.tokens_signed(), 2);
}

#[tokio::test(start_paused = true)]
async fn through_the_stack_a_skewed_mock_sees_exactly_two_attempts() {
    let mock = MockKling::new(
        MockConfig::preset(Preset::Pro)
            .access_key("ak", "sk")
            .clock_offset_secs(2000),
    )
    .unwrap();
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Pro),
        Credentials::access_key("ak", "sk").unwrap(),
    )
    .unwrap();
    let error = kling
        .layer(mock.clone())
        .oneshot(request(
            "POST",
            "/v1/videos/text2video",
            r#"{"prompt":"a cat"}"#,
        ))
        .await
        .unwrap_err();
    let failed = error.downcast_ref::<Failed>().expect("a final kling error");
    assert_eq!(failed.code(), Some(Code::TokenExpired));
    let stats = mock.stats();
    assert_eq!(stats.requests_total, 2);
    assert_eq!(stats.responses_by_code.get("1004"), Some(&2));
    assert_eq!(stats.tasks_created, 0);
    assert_eq!(kling.auth().tokens_signed(), 2);
}

/// A server whose clock is 12 s behind this one answers 1003 to a token with `nbf` = now − 5 s,
/// and to every token signed afresh the same way. The 1003 sets `nbf` further back, so after
/// the first call the tokens are accepted; before, no call ever was.
#[tokio::test(start_paused = true)]
async fn through_the_stack_a_server_clock_behind_is_caught_up_with_after_one_call() {
    let mock = MockKling::new(
        MockConfig::preset(Preset::Pro)
            .access_key("ak", "sk")
            .clock_offset_secs(-12)
            .no_rate_limit(),
    )
    .unwrap();
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Pro).slots(10),
        Credentials::access_key("ak", "sk").unwrap(),
    )
    .unwrap();
    let stack = kling.layer(mock.clone());
    let mut created = 0;
    for _ in 0..5 {
        let create = request("POST", "/v1/videos/text2video", r#"{"prompt":"a cat"}"#);
        if let Ok(response) = stack.clone().oneshot(create).await {
            created += usize::from(Outcome::of(&response).unwrap().is_success());
        }
    }
    assert!(created >= 4, "{created} of 5 calls created their task");
    let stats = mock.stats();
    assert!(
        stats.responses_by_code.get("1003").copied().unwrap_or(0) <= 2,
        "{:?}",
        stats.responses_by_code
    );
}

/// A skew of a minute through the layer alone (which re-sends a refused attempt itself): the
/// first request's re-sent attempt goes through, and every request after it at once. Before,
/// `nbf`'s margin doubled from 5 s at each 1003, and the first four calls failed with theirs.
#[tokio::test(start_paused = true)]
async fn a_server_clock_behind_pushes_nbf_back_until_tokens_are_accepted() {
    let mock = MockKling::new(
        MockConfig::preset(Preset::Pro)
            .access_key("ak", "sk")
            .clock_offset_secs(-60)
            .no_rate_limit()
            .slots(10),
    )
    .unwrap();
    let layer = AuthLayer::new(Credentials::access_key("ak", "sk").unwrap());
    let svc = layer.layer(ClassifyLayer::new().layer(mock.clone()));
    let mut codes = Vec::new();
    for _ in 0..5 {
        let create = request("POST", "/v1/videos/text2video", r#"{"prompt":"a cat"}"#);
        let response = svc.clone().oneshot(create).await.unwrap();
        codes.push(Outcome::of(&response).unwrap().code());
    }
    assert!(codes.iter().all(|c| *c == Code::Success), "{codes:?}");
    assert_eq!(mock.stats().tasks_created, 5);
    assert_eq!(mock.stats().responses_by_code.get("1003"), Some(&1));
}

#[tokio::test(start_paused = true)]
async fn mock_accepts_the_signed_token_and_counts_the_access_key_account() {
    let mock = MockKling::new(MockConfig::preset(Preset::Pro).access_key("ak-9", "sk-9")).unwrap();
    let layer = AuthLayer::new(Credentials::access_key("ak-9", "sk-9").unwrap());
    // The access key's digest, never the key: the id is a metric label and a Redis key.
    let id = layer.account_id().clone();
    assert!(
        id.as_str().starts_with("ak-") && id.as_str().len() == 15,
        "{id}"
    );
    assert_ne!(id.as_str(), "ak-9");
    assert_eq!(
        id,
        Credentials::access_key("ak-9", "other")
            .unwrap()
            .account_id()
    );
    assert_ne!(
        id,
        Credentials::access_key("ak-8", "sk-9")
            .unwrap()
            .account_id()
    );
    let svc = layer.layer(ClassifyLayer::new().layer(mock.clone()));
    accepted_create(svc).await;
    assert_eq!(mock.in_use("ak-9", "video"), 1);
    assert_eq!(mock.stats().requests_total, 1);
}

#[tokio::test(start_paused = true)]
async fn mock_with_a_skewed_clock_sees_exactly_two_attempts() {
    // The mock's clock runs 2000 s ahead: every token it sees has expired.
    let mock = MockKling::new(
        MockConfig::preset(Preset::Pro)
            .access_key("ak", "sk")
            .clock_offset_secs(2000),
    )
    .unwrap();
    let layer = AuthLayer::new(Credentials::access_key("ak", "sk").unwrap());
    let svc = layer.layer(ClassifyLayer::new().layer(mock.clone()));
    let response = svc
        .oneshot(request(
            "POST",
            "/v1/videos/text2video",
            r#"{"prompt":"a cat"}"#,
        ))
        .await
        .unwrap();
    assert_eq!(Outcome::of(&response).unwrap().code(), Code::TokenExpired);
    let stats = mock.stats();
    assert_eq!(stats.requests_total, 2);
    assert_eq!(stats.responses_by_code.get("1004"), Some(&2));
    assert_eq!(stats.tasks_created, 0);
    assert_eq!(layer.tokens_signed(), 2);
}

#[tokio::test(start_paused = true)]
async fn api_key_is_sent_as_is_and_never_retried() {
    let credentials = Credentials::api_key("kling-key-123").unwrap();
    let layer = AuthLayer::new(credentials.clone());
    let (seen, inner) = recorder(|_| (401, EXPIRED));
    let svc = layer.layer(ClassifyLayer::new().layer(inner));
    let response = svc
        .oneshot(request("GET", "/tasks?task_ids=a", ""))
        .await
        .unwrap();
    assert_eq!(Outcome::of(&response).unwrap().code(), Code::TokenExpired);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0], "Bearer kling-key-123");
    assert_eq!(layer.tokens_signed(), 0);
    let id = credentials.account_id();
    assert!(
        id.as_str().starts_with("key-") && id.as_str().len() == 16,
        "{id}"
    );
    assert!(!id.as_str().contains("kling-key"));
}

/// A request whose absolute URI names another scheme, host or port than the stack's base URL
/// (a result file on a CDN, a URL someone else chose) gets none of the stack's credentials: it
/// is refused before it is sent, the client never sees it, and the refusal comes back as it
/// is, not retried as a connection that never opened.
#[tokio::test(start_paused = true)]
async fn credentials_are_never_sent_to_another_host() {
    let (seen, inner) = recorder(|_| (200, OK));
    let kling = KlingLayer::builder(
        StackConfig::preset(Tier::Pro),
        Credentials::api_key("k").unwrap(),
    )
    .build()
    .unwrap();
    let svc = kling.layer(inner);
    for uri in [
        "http://cdn.example/a.mp4",
        "https://cdn.example/a.mp4",
        "http://api-singapore.klingai.com/tasks?task_ids=a",
        "https://api-singapore.klingai.com:8443/tasks?task_ids=a",
    ] {
        let error = svc
            .clone()
            .oneshot(request("GET", uri, ""))
            .await
            .unwrap_err();
        let refused = error
            .downcast_ref::<OtherOrigin>()
            .unwrap_or_else(|| panic!("{uri}: {error}"));
        assert_eq!(refused.base(), "https://api-singapore.klingai.com:443");
        assert_eq!(SendState::of(&*error), SendState::NotSent);
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "the client saw none of them"
    );
    // The base's own origin, relative or absolute, gets them.
    for uri in [
        "/tasks?task_ids=a",
        "https://api-singapore.klingai.com/tasks?task_ids=b",
    ] {
        svc.clone().oneshot(request("GET", uri, "")).await.unwrap();
    }
    assert_eq!(*seen.lock().unwrap(), ["Bearer k", "Bearer k"]);
}

#[tokio::test(start_paused = true)]
async fn account_id_is_set_unless_the_request_has_one() {
    let layer = AuthLayer::new(Credentials::access_key("ak-acct", "sk").unwrap());
    let accounts: Arc<Mutex<Vec<Option<AccountId>>>> = Arc::default();
    let log = accounts.clone();
    let inner = service_fn(move |req: http::Request<Full<Bytes>>| {
        log.lock().unwrap().push(AccountId::of(&req).cloned());
        async { Ok::<_, std::convert::Infallible>(envelope(200, OK)) }
    });
    let svc = layer.layer(inner);
    svc.clone().oneshot(request("GET", "/x", "")).await.unwrap();
    let mut own = request("GET", "/x", "");
    own.extensions_mut().insert(AccountId::new("tenant-7"));
    svc.oneshot(own).await.unwrap();
    let accounts = accounts.lock().unwrap();
    assert_eq!(
        accounts[0].as_ref().unwrap(),
        &Credentials::access_key("ak-acct", "sk")
            .unwrap()
            .account_id()
    );
    assert_eq!(accounts[1].as_ref().unwrap().as_str(), "tenant-7");
}

#[test]
fn credentials_are_redacted_and_checked() {
    let c = Credentials::access_key("ak-visible", "super-secret-value").unwrap();
    let text = format!("{c:?} {:?}", AuthLayer::new(c.clone()));
    assert!(!text.contains("super-secret-value"), "{text}");
    // Nor the access key: the account shown is its digest.
    assert!(!text.contains("ak-visible"), "{text}");
    assert!(text.contains(c.account_id().as_str()), "{text}");
    let c = Credentials::api_key("sk-live-abcdef").unwrap();
    assert!(!format!("{c:?}").contains("sk-live-abcdef"));

    assert_eq!(Credentials::api_key("  ").unwrap_err().field(), "api_key");
    assert_eq!(
        Credentials::api_key("bad\nkey").unwrap_err().field(),
        "api_key"
    );
    assert_eq!(
        Credentials::access_key("", "s").unwrap_err().field(),
        "access_key"
    );
    assert_eq!(
        Credentials::access_key("a", "").unwrap_err().field(),
        "secret_key"
    );
    let err = AuthLayer::new(c)
        .renew_before(Duration::from_secs(1800))
        .unwrap_err();
    assert_eq!(err.field(), "renew_before");

    let lookup = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    };
    assert!(Credentials::from_lookup(lookup(&[("KLING_API_KEY", "k")])).is_ok());
    let jwt = Credentials::from_lookup(lookup(&[
        ("KLING_ACCESS_KEY", "a"),
        ("KLING_SECRET_KEY", "s"),
    ]));
    assert!(jwt.unwrap().is_jwt());
    let err = Credentials::from_lookup(lookup(&[("KLING_ACCESS_KEY", "a")])).unwrap_err();
    assert_eq!(err.field(), "KLING_SECRET_KEY");
    assert_eq!(
        Credentials::from_lookup(lookup(&[])).unwrap_err().field(),
        "KLING_API_KEY"
    );
}

/// Credentials read from variables: a blank `KLING_API_KEY` (a compose file's
/// `${KLING_API_KEY}` where it is unset) leaves the access key pair to be used, and an error
/// names the variable that is missing.
#[test]
fn credentials_from_variables_skip_a_blank_api_key_and_name_the_missing_one() {
    let lookup = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    };
    let jwt = Credentials::from_lookup(lookup(&[
        ("KLING_API_KEY", ""),
        ("KLING_ACCESS_KEY", "a"),
        ("KLING_SECRET_KEY", "s"),
    ]))
    .unwrap();
    assert!(jwt.is_jwt());
    assert_eq!(
        jwt.account_id(),
        Credentials::access_key("a", "s").unwrap().account_id()
    );
    let blank = Credentials::from_lookup(lookup(&[("KLING_API_KEY", " ")])).unwrap_err();
    assert_eq!(blank.field(), "KLING_API_KEY");
    let err = Credentials::from_lookup(lookup(&[("KLING_SECRET_KEY", "s")])).unwrap_err();
    assert_eq!(err.field(), "KLING_ACCESS_KEY", "{err}");
}

/// Blank `KLING_ACCESS_KEY` and `KLING_SECRET_KEY` count as unset too, as a blank
/// `KLING_API_KEY` does and as the preset's variables do: the error says no credentials are
/// set, naming `KLING_API_KEY`, not "`KLING_ACCESS_KEY` must not be empty".
#[test]
fn blank_access_and_secret_keys_count_as_unset() {
    let lookup = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    };
    let err = Credentials::from_lookup(lookup(&[
        ("KLING_API_KEY", ""),
        ("KLING_ACCESS_KEY", ""),
        ("KLING_SECRET_KEY", " "),
    ]))
    .unwrap_err();
    assert_eq!(err.field(), "KLING_API_KEY", "{err}");
    let err = Credentials::from_lookup(lookup(&[
        ("KLING_ACCESS_KEY", "a"),
        ("KLING_SECRET_KEY", ""),
    ]))
    .unwrap_err();
    assert_eq!(err.field(), "KLING_SECRET_KEY", "{err}");
    assert!(err.reason().contains("must be set with"), "{err}");
    let key = Credentials::from_lookup(lookup(&[
        ("KLING_API_KEY", "k"),
        ("KLING_ACCESS_KEY", ""),
        ("KLING_SECRET_KEY", ""),
    ]))
    .unwrap();
    assert!(!key.is_jwt());
}

/// The resend carries the first attempt's signals, so a create whose account was halted (a
/// `1102`) while its first attempt waited for the refused token's answer is not sent again:
/// the classify step below refuses it unsent, as it refuses a create granted before a halt.
#[tokio::test(start_paused = true)]
async fn a_resend_after_a_refusal_is_not_sent_once_its_account_was_halted() {
    const ARREARS: &str = r#"{"code":1102,"message":"account in arrears","request_id":"r"}"#;
    let clock = TokioWallClock::starting_at(Duration::from_secs(T0));
    let auth = AuthLayer::new(Credentials::access_key("ak", "sk").unwrap())
        .with_clock(clock)
        .resend_on_refusal(true);
    let release = Arc::new(tokio::sync::Notify::new());
    let bodies: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let inner = {
        let (release, bodies) = (release.clone(), bodies.clone());
        service_fn(move |req: http::Request<Full<Bytes>>| {
            let (release, bodies) = (release.clone(), bodies.clone());
            async move {
                let body = http_body_util::BodyExt::collect(req.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                let sent = {
                    let mut bodies = bodies.lock().unwrap();
                    bodies.push(body.clone());
                    bodies.len()
                };
                if sent == 1 {
                    // The first create's token is refused, once the other's 1102 is in.
                    release.notified().await;
                    Ok::<_, std::convert::Infallible>(envelope(401, EXPIRED))
                } else {
                    Ok(envelope(429, ARREARS))
                }
            }
        })
    };
    let (slots, _handle) =
        kling_concurrency::TaskSlotsLayer::pair(kling_concurrency::SlotsConfig::new(2)).unwrap();
    let svc = slots.layer(auth.layer(ClassifyLayer::new().layer(inner)));
    let first = tokio::spawn(svc.clone().oneshot(request(
        "POST",
        "/v1/videos/text2video",
        r#"{"prompt":"first"}"#,
    )));
    tokio::task::yield_now().await;
    assert_eq!(bodies.lock().unwrap().len(), 1, "the first create is out");
    let second = svc
        .oneshot(request(
            "POST",
            "/v1/videos/text2video",
            r#"{"prompt":"second"}"#,
        ))
        .await
        .unwrap();
    assert_eq!(
        Outcome::of(&second).unwrap().code(),
        Code::ResourcePackExhausted
    );
    release.notify_one();
    let error = match first.await.unwrap() {
        Ok(response) => panic!("sent again: {:?}", Outcome::of(&response)),
        Err(error) => error,
    };
    assert!(
        !kling_core::error::may_have_created(&*error),
        "refused before it was sent again: {error}"
    );
    assert_eq!(
        bodies.lock().unwrap().len(),
        2,
        "no resend after the 1102: {error}"
    );
}

/// The error `error`'s chain names as [`ApiKeyRequired`], if any.
fn api_key_required<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a ApiKeyRequired> {
    kling_core::error::chain(error).find_map(|link| link.downcast_ref::<ApiKeyRequired>())
}

/// KLING_API.md "Auth": new-style endpoints take only an API key. An access key pair's JWT
/// there is refused by the layer itself, naming the endpoint and the fix, before a token is
/// signed or anything reaches the service below; legacy endpoints and `/account/costs` (of no
/// generation) still take it. The fix is what holds for the path: a create may go to a legacy
/// create path (`/v1/...`) instead, but a new-style task is queried and listed at `/tasks`
/// alone (a legacy path knows legacy tasks only), so there only the API key is offered: the
/// message offered the legacy path for every one.
#[tokio::test(start_paused = true)]
async fn a_jwt_on_a_new_style_endpoint_is_refused_before_it_is_sent() {
    let layer = AuthLayer::new(Credentials::access_key("ak", "sk").unwrap());
    let (seen, inner) = recorder(|_| (200, OK));
    let svc = layer.layer(ClassifyLayer::new().layer(inner));
    for (method, uri, path, legacy_hint) in [
        (
            "POST",
            "/text-to-video/kling-3.0",
            "/text-to-video/kling-3.0",
            true,
        ),
        ("GET", "/tasks?task_ids=a", "/tasks", false),
        // No ids (read as a list or an empty query: the API key alone either way).
        ("GET", "/tasks", "/tasks", false),
        ("POST", "/tasks", "/tasks", false),
    ] {
        let body = if method == "POST" {
            r#"{"prompt":"x"}"#
        } else {
            ""
        };
        let error = svc
            .clone()
            .oneshot(request(method, uri, body))
            .await
            .unwrap_err();
        let refused = api_key_required(&*error).unwrap_or_else(|| panic!("{uri}: {error}"));
        assert_eq!(refused.path(), path);
        let text = error.to_string();
        for part in [path, "API key", "Credentials::api_key", "KLING_API_KEY"] {
            assert!(text.contains(part), "{part}: {text}");
        }
        assert_eq!(text.contains("/v1/"), legacy_hint, "{text}");
        if !legacy_hint {
            assert!(text.contains("new-style tasks"), "{text}");
        }
        assert_eq!(SendState::of(&*error), SendState::NotSent);
        assert!(kling_core::error::refused_before_sending(&*error));
        assert!(kling_core::error::will_recur(&*error), "not worth a retry");
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "nothing reached the service"
    );
    assert_eq!(layer.tokens_signed(), 0, "no token signed for them");

    // The same credentials on a legacy create and on `/account/costs`: signed and sent.
    for (method, uri, body) in [
        ("POST", "/v1/videos/text2video", r#"{"prompt":"x"}"#),
        ("GET", "/account/costs", ""),
    ] {
        let response = svc.clone().oneshot(request(method, uri, body)).await;
        assert!(response.is_ok(), "{uri}: {:?}", response.err());
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|header| claims(header)["iss"] == "ak"));
    assert_eq!(layer.tokens_signed(), 1);
}

/// An API key is the credential new-style endpoints take: it passes on each of them as is.
#[tokio::test(start_paused = true)]
async fn an_api_key_passes_on_new_style_endpoints() {
    let layer = AuthLayer::new(Credentials::api_key("new-style-key").unwrap());
    let (seen, inner) = recorder(|_| (200, OK));
    let svc = layer.layer(ClassifyLayer::new().layer(inner));
    for (method, uri) in [
        ("POST", "/text-to-video/kling-3.0"),
        ("GET", "/tasks?task_ids=a"),
        ("POST", "/tasks"),
    ] {
        svc.clone()
            .oneshot(request(method, uri, r#"{"prompt":"x"}"#))
            .await
            .unwrap();
    }
    assert_eq!(*seen.lock().unwrap(), ["Bearer new-style-key"; 3]);
}

/// Through the whole stack on a mock with the same access key pair: a new-style create fails
/// with the local error at once (no retry, no backoff), offering a legacy create path (a
/// `/tasks` query is offered the API key alone), and the mock sees no request, while a
/// legacy create and `/account/costs` go through. The negative control shows what the check
/// spares: the layer's own JWT, sent by hand to the same mock on the same path, is 401 1000.
#[tokio::test(start_paused = true)]
async fn through_the_stack_a_jwt_new_style_create_fails_locally_and_the_mock_sees_nothing() {
    const T2V_NEW: &str = "/text-to-video/kling-3.0";
    let (mock, kling) = pro_stack_on_a_key_pair();
    let stack = kling.layer(mock.clone());
    let started = tokio::time::Instant::now();
    let error = stack
        .clone()
        .oneshot(new_style_create("a cat"))
        .await
        .unwrap_err();
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "no retry waited: {error}"
    );
    let refused = api_key_required(&*error).unwrap_or_else(|| panic!("{error}"));
    assert_eq!(refused.path(), T2V_NEW);
    assert!(!kling_core::error::may_have_created(&*error));
    assert!(
        error.to_string().contains("/v1/"),
        "a legacy create: {error}"
    );
    // A query, refused at the stack's entry as well: the API key alone is offered.
    let query = stack
        .clone()
        .oneshot(request("GET", "/tasks?task_ids=a", ""))
        .await
        .unwrap_err();
    assert_eq!(api_key_required(&*query).map(|r| r.path()), Some("/tasks"));
    assert!(!query.to_string().contains("/v1/"), "{query}");
    assert_eq!(mock.stats().requests_total, 0, "nothing was sent");
    assert_eq!(kling.snapshot().rate.requests, 0, "nor counted as sent");
    assert_eq!(kling.auth().tokens_signed(), 0);
    let pool = kling.snapshot().pool("video:kling-3.0").cloned();
    assert_eq!(pool.map(|pool| pool.in_use), None, "the slots never saw it");

    // The same pair on a legacy create and `/account/costs`, through the same stack.
    accepted_create(stack.clone()).await;
    let costs = stack
        .clone()
        .oneshot(request("GET", "/account/costs", ""))
        .await
        .unwrap();
    assert!(Outcome::of(&costs).unwrap().is_success());
    assert_eq!(mock.stats().requests_total, 2);

    // Negative control: the stack's JWT, sent by hand to the new-style path, is refused.
    let mut by_hand = new_style_create("a cat");
    let token = kling.auth().authorization().unwrap();
    by_hand.headers_mut().insert(AUTHORIZATION, token);
    let response = ClassifyLayer::new()
        .layer(mock.clone())
        .oneshot(by_hand)
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(Outcome::of(&response).unwrap().code(), Code::AuthFailed);
    let stats = mock.stats();
    assert_eq!((stats.requests_total, stats.tasks_created), (3, 1));
}

/// The stack refuses such a request at its entry, above the rate limiter and the slots: it
/// takes no turn of the pace (which every other request of the account would wait for) and
/// holds no slot. Between two legacy creates a pacing interval apart, the refused new-style
/// create answers at once, and the second legacy create goes one interval after the first,
/// not two (refused below the rate limiter, it waited for a turn and pushed the next one on).
#[tokio::test(start_paused = true)]
async fn the_stack_refuses_a_jwt_new_style_create_before_it_takes_a_rate_turn() {
    let (mock, kling) = pro_stack_on_a_key_pair();
    let interval = StackConfig::preset(Tier::Pro).pacing_interval();
    let interval = interval.expect("the Pro preset paces");
    let stack = kling.layer(mock.clone());
    let started = tokio::time::Instant::now();
    accepted_create(stack.clone()).await;
    let error = stack
        .clone()
        .oneshot(new_style_create("a dog"))
        .await
        .unwrap_err();
    assert!(api_key_required(&*error).is_some(), "{error}");
    assert_eq!(started.elapsed(), Duration::ZERO, "refused without a wait");
    assert_eq!(
        kling.snapshot().pool("video:kling-3.0").map(|p| p.in_use),
        None
    );
    accepted_create(stack.clone()).await;
    assert!(
        started.elapsed() <= interval,
        "the second create waited {:?}, past one interval ({interval:?})",
        started.elapsed()
    );
    assert_eq!(mock.stats().requests_total, 2);
}

/// A follower on access-key credentials asked to follow a new-style task ends at once with the
/// local refusal (its queries go to `/tasks`, which takes only an API key) rather than backing
/// off and asking again until the task's deadline: the refusal is one every query meets again.
#[tokio::test(start_paused = true)]
async fn a_follower_with_a_jwt_ends_a_new_style_follow_at_once() {
    let (mock, kling) = pro_stack_on_a_key_pair();
    let follower = kling
        .follower(kling.layer(mock.clone()), kling.follow_policy())
        .unwrap();
    let started = tokio::time::Instant::now();
    let error = follower
        .follow(kling_tower::TaskRef::new_style("860000000000000001"))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(error, kling_tower::error::FollowError::Unsendable { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("KLING_API_KEY"), "{error}");
    assert!(took <= Duration::from_secs(5), "{took:?}: {error}");
    assert_eq!(mock.stats().requests_total, 0);
}

/// A request that names no new-style endpoint is sent with the JWT, for the server's 404
/// (code 1202), which an API key meets too, rather than refused as needing an API key, which
/// would send the user after the wrong fix: another method on `/tasks`, and a model that no
/// server routes (a dot segment, which normalizing removes; a `%2F`, which decoding splits).
/// The mock agrees: it answers each 1202, not 401. The negative control is the same layer
/// refusing `GET` and `POST /tasks` and a create of `kling-3.0` locally.
#[tokio::test(start_paused = true)]
async fn a_request_naming_no_new_style_endpoint_is_sent_for_the_servers_404() {
    let config = MockConfig::preset(Preset::Pro).no_rate_limit();
    let mock = MockKling::new(config.access_key("ak", "sk")).unwrap();
    let layer = AuthLayer::new(Credentials::access_key("ak", "sk").unwrap());
    let svc = layer.layer(ClassifyLayer::new().layer(mock.clone()));
    let sent = [
        ("PUT", "/tasks"),
        ("DELETE", "/tasks"),
        ("PATCH", "/tasks"),
        ("POST", "/text-to-video/.."),
        ("POST", "/text-to-video/%2E%2E"),
        ("POST", "/text-to-video/kling%2F3.0"),
    ];
    for (method, uri) in sent {
        let response = svc
            .clone()
            .oneshot(request(method, uri, "{}"))
            .await
            .unwrap_or_else(|error| panic!("{method} {uri}: {error}"));
        assert_eq!(response.status(), 404, "{method} {uri}");
        assert_eq!(Outcome::of(&response).unwrap().code(), Code::WrongMethod);
    }
    assert_eq!(mock.stats().requests_total, sent.len() as u64);
    assert_eq!(mock.stats().tasks_created, 0);
    // Negative control: the endpoints are refused before sending.
    for (method, uri) in [
        ("GET", "/tasks"),
        ("POST", "/tasks"),
        ("POST", "/text-to-video/kling-3.0"),
    ] {
        let error = svc
            .clone()
            .oneshot(request(method, uri, "{}"))
            .await
            .unwrap_err();
        assert!(
            api_key_required(&*error).is_some(),
            "{method} {uri}: {error}"
        );
    }
    assert_eq!(mock.stats().requests_total, sent.len() as u64);
}

/// `AuthLayer::check_endpoint`, for a stack's entry, refuses what the layer refuses (an access
/// key pair on a new-style create, query or list) and nothing else: a legacy request,
/// `/account/costs`, another method on `/tasks`, and every request of an API key pass.
#[tokio::test(start_paused = true)]
async fn check_endpoint_refuses_what_the_layer_refuses() {
    let pair = AuthLayer::new(Credentials::access_key("ak", "sk").unwrap());
    let key = AuthLayer::new(Credentials::api_key("new-style-key").unwrap());
    let refused = [
        ("POST", "/text-to-video/kling-3.0"),
        ("GET", "/tasks?task_ids=a"),
        ("POST", "/tasks"),
    ];
    let passed = [
        ("POST", "/v1/videos/text2video"),
        ("GET", "/v1/videos/text2video/a"),
        ("GET", "/account/costs"),
        ("PUT", "/tasks"),
    ];
    for (method, uri) in refused {
        let error = pair
            .check_endpoint(&request(method, uri, "{}"))
            .unwrap_err();
        assert_eq!(error.path(), uri.split('?').next().unwrap());
        assert!(
            key.check_endpoint(&request(method, uri, "{}")).is_ok(),
            "{uri}"
        );
    }
    for (method, uri) in passed {
        assert!(
            pair.check_endpoint(&request(method, uri, "{}")).is_ok(),
            "{method} {uri}"
        );
        assert!(
            key.check_endpoint(&request(method, uri, "{}")).is_ok(),
            "{uri}"
        );
    }
    assert_eq!(pair.tokens_signed(), 0, "checking signs nothing");
}

/// A draining stack with an access key pair refuses a new-style create with
/// `ApiKeyRequired`, not `Draining`: it could never be sent, drained or not, and that error
/// names the fix. A legacy create is refused `Draining` (the control), and neither is sent
/// or left in flight.
#[tokio::test(start_paused = true)]
async fn a_draining_stack_refuses_a_jwt_new_style_create_as_needing_an_api_key() {
    let (mock, kling) = pro_stack_on_a_key_pair();
    let stack = kling.layer(mock.clone());
    kling.drain().await;
    let error = stack
        .clone()
        .oneshot(new_style_create("a dog"))
        .await
        .unwrap_err();
    assert!(api_key_required(&*error).is_some(), "{error}");
    let error = stack.oneshot(legacy_create("a dog")).await.unwrap_err();
    assert!(error.is::<kling_tower::error::Draining>(), "{error}");
    assert_eq!(kling.drain_handle().in_flight(), 0);
    assert_eq!(mock.stats().requests_total, 0);
}
