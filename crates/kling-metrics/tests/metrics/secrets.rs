//! No span, event or metric label ever carries the API key, the secret, the JWT or a piece of it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit as _, Mac as _};
use kling_core::{AccountId, ClassifyLayer};
use kling_metrics::{MetricsLayer, Monitor};
use kling_mock::{MockConfig, MockKling, Preset};
use sha2::Sha256;
use tower::{Layer, Service, ServiceExt};

use crate::support::{Capture, Recording, request};

const API_KEY: &str = "ak-live-9f8e7d6c5b4a39281706";
const ACCESS_KEY: &str = "access-0b1c2d3e4f5a6978";
const SECRET_KEY: &str = "secret-zz11yy22xx33ww44vv55";

/// An HS256 JWT as Kling's legacy auth wants it.
fn sign_jwt(access: &str, secret: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD
        .encode(serde_json::json!({"iss": access, "exp": now + 1800, "nbf": now - 5}).to_string());
    let signed = format!("{header}.{claims}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(signed.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signed}.{signature}")
}

/// The secrets found in `text`.
fn leaks<'a>(text: &str, secrets: &[&'a str]) -> Vec<&'a str> {
    secrets
        .iter()
        .copied()
        .filter(|secret| text.contains(secret))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn no_span_event_or_label_contains_a_key_secret_or_token() {
    let capture = Capture::default();
    let _tracing = tracing::subscriber::set_default(capture.clone());
    let recording = Recording::start();

    let jwt = sign_jwt(ACCESS_KEY, SECRET_KEY);
    let segments: Vec<&str> = jwt.split('.').collect();
    assert_eq!(segments.len(), 3);
    let mut secrets = vec![API_KEY, ACCESS_KEY, SECRET_KEY, jwt.as_str()];
    secrets.extend(&segments);

    let mock = MockKling::new(
        MockConfig::preset(Preset::Free)
            .no_rate_limit()
            .access_key(ACCESS_KEY, SECRET_KEY)
            // Both credentials share the access key's account (the mock keys JWTs by `iss`).
            .api_key(API_KEY)
            .credits(1.0),
    )
    .unwrap();
    let monitor = Monitor::builder()
        .rate_quota(2, Duration::from_secs(60))
        .build()
        .unwrap();
    let mut stack =
        MetricsLayer::with_monitor(monitor.clone()).layer(ClassifyLayer::new().layer(mock));

    let mut send = async |method: &str, uri: &str, body: &str, bearer: &str| {
        let mut req = request(method, uri, body, bearer);
        req.extensions_mut().insert(AccountId::new("acct-7"));
        let response = stack.ready().await.unwrap().call(req).await.unwrap();
        kling_core::Outcome::of(&response).unwrap().clone()
    };
    let created = send("POST", "/v1/videos/text2video", r#"{"prompt":"a"}"#, &jwt).await;
    assert!(created.is_success(), "{}", created.message());
    let task = created.task().unwrap().id.clone();
    let refused = send(
        "POST",
        "/v1/videos/text2video",
        r#"{"prompt":"b"}"#,
        API_KEY,
    )
    .await;
    assert_eq!(refused.code().as_i64(), 1102);
    let queried = send("GET", &format!("/v1/videos/text2video/{task}"), "", &jwt).await;
    assert!(queried.is_success());
    let wrong = send("GET", "/v1/videos/text2video/x", "", "not-a-valid-key").await;
    assert_eq!(wrong.code().as_i64(), 1002);
    // Four requests against a quota of two: the usage warning fired too.
    monitor.snapshot();

    // The capture saw what the layer records...
    let spans = capture.spans();
    assert_eq!(spans.len(), 4);
    assert_eq!(spans[0].name, "kling.request");
    assert_eq!(spans[0].field("kind"), Some("create"));
    assert_eq!(spans[0].field("pool"), Some("video"));
    assert_eq!(spans[0].field("task_id"), Some(task.as_str()));
    assert_eq!(spans[0].field("request_id"), created.request_id());
    assert_eq!(spans[1].field("code"), Some("1102"));
    let events = capture.events();
    assert!(
        events
            .iter()
            .any(|e| e.level == "WARN" && e.field("code") == Some("1102"))
    );
    assert!(
        events
            .iter()
            .any(|e| e.field("message") == Some("usage passed the warning threshold"))
    );
    let labels: String = recording
        .take()
        .keys()
        .map(|(name, labels)| format!("{name} {labels:?}\n"))
        .collect();
    assert!(labels.contains("1102"));

    // ...and none of it holds a secret.
    let text = capture.all_text();
    assert_eq!(
        leaks(&text, &secrets),
        Vec::<&str>::new(),
        "in spans/events:\n{text}"
    );
    assert_eq!(
        leaks(&labels, &secrets),
        Vec::<&str>::new(),
        "in labels:\n{labels}"
    );
    let snapshot = format!("{:?} {:?}", monitor.snapshot(), monitor);
    assert_eq!(leaks(&snapshot, &secrets), Vec::<&str>::new());

    // The check itself finds a leak where there is one.
    let leaky = Capture::default();
    tracing::subscriber::with_default(leaky.clone(), || {
        tracing::info!(authorization = %format!("Bearer {}", jwt), "oops");
    });
    assert_eq!(leaks(&leaky.all_text(), &secrets).len(), 4); // the JWT and its three segments
}

/// A client error quoting the request it failed to send, its `Authorization` header
/// included: the layer's `WARN` names the failure, not the credential.
#[tokio::test(start_paused = true)]
async fn a_client_error_quoting_the_credential_leaks_nothing() {
    let capture = Capture::default();
    let _tracing = tracing::subscriber::set_default(capture.clone());
    let jwt = sign_jwt(ACCESS_KEY, SECRET_KEY);
    let mut secrets = vec![API_KEY, jwt.as_str()];
    secrets.extend(jwt.split('.'));
    for quoted in [
        format!(r#"{{"authorization": "Bearer {API_KEY}"}}"#),
        format!("authorization: bearer {jwt}"),
        format!("token {jwt} refused"),
    ] {
        let message = format!("client error: could not send {quoted}: connection reset");
        let client = tower::service_fn(
            move |_req: http::Request<http_body_util::Full<bytes::Bytes>>| {
                let message = message.clone();
                async move {
                    Err::<http::Response<http_body_util::Full<bytes::Bytes>>, kling_core::BoxError>(
                        message.into(),
                    )
                }
            },
        );
        let stack = MetricsLayer::new().layer(ClassifyLayer::new().layer(client));
        let req = request("POST", "/v1/videos/text2video", "{}", API_KEY);
        assert!(stack.oneshot(req).await.is_err());
    }
    let warned: Vec<_> = capture
        .events()
        .into_iter()
        .filter(|e| e.level == "WARN")
        .map(|e| e.field("error").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(warned.len(), 3, "{warned:?}");
    assert!(
        warned.iter().all(|e| e.contains("connection reset")),
        "{warned:?}"
    );
    let text = capture.all_text();
    assert_eq!(leaks(&text, &secrets), Vec::<&str>::new(), "{text}");
}

/// The same, with the credential joined to other text: a JWT in a query or a path, or ending a
/// sentence; a key holding punctuation after `Bearer`; a proxy's password in a URL.
#[tokio::test(start_paused = true)]
async fn a_client_error_quoting_the_credential_inside_other_text_leaks_nothing() {
    let capture = Capture::default();
    let _tracing = tracing::subscriber::set_default(capture.clone());
    let jwt = sign_jwt(ACCESS_KEY, SECRET_KEY);
    let key_with_punctuation = "ak:live!9f8e7d6c5b4a";
    let mut secrets = vec![
        jwt.as_str(),
        key_with_punctuation,
        "live!9f8e7d6c5b4a",
        SECRET_KEY,
    ];
    secrets.extend(jwt.split('.'));
    for quoted in [
        format!("https://gateway/cb?token={jwt}&a=b"),
        format!("https://gateway/session/{jwt}/renew"),
        format!("token {jwt}."),
        format!("authorization: Bearer {key_with_punctuation}"),
        format!("url (https://proxy-user:{SECRET_KEY}@proxy:8080/v1/videos/text2video)"),
    ] {
        let message = format!("client error: could not send {quoted}: connection reset");
        let client = tower::service_fn(
            move |_req: http::Request<http_body_util::Full<bytes::Bytes>>| {
                let message = message.clone();
                async move {
                    Err::<http::Response<http_body_util::Full<bytes::Bytes>>, kling_core::BoxError>(
                        message.into(),
                    )
                }
            },
        );
        let stack = MetricsLayer::new().layer(ClassifyLayer::new().layer(client));
        let req = request("POST", "/v1/videos/text2video", "{}", API_KEY);
        assert!(stack.oneshot(req).await.is_err());
    }
    let warned = capture
        .events()
        .into_iter()
        .filter(|e| e.level == "WARN")
        .count();
    assert_eq!(warned, 5);
    let text = capture.all_text();
    assert_eq!(leaks(&text, &secrets), Vec::<&str>::new(), "{text}");
}

/// An answer whose message quotes the credential (a gateway echoing the header it refused):
/// the `WARN` of the failed call keeps the message's words, not the credential, as it does
/// when the same answer ends the call as an error.
#[tokio::test(start_paused = true)]
async fn an_answer_quoting_the_credential_in_its_message_leaks_nothing() {
    let capture = Capture::default();
    let _tracing = tracing::subscriber::set_default(capture.clone());
    let jwt = sign_jwt(ACCESS_KEY, SECRET_KEY);
    let mut secrets = vec![API_KEY, jwt.as_str()];
    secrets.extend(jwt.split('.'));
    for quoted in [format!("Bearer {API_KEY}"), format!("token {jwt}")] {
        let body = format!(
            r#"{{"code":1004,"message":"authorization {quoted} is invalid","request_id":"r1"}}"#
        );
        let client = tower::service_fn(
            move |_req: http::Request<http_body_util::Full<bytes::Bytes>>| {
                let body = body.clone();
                async move {
                    Ok::<_, kling_core::BoxError>(
                        http::Response::builder()
                            .status(401)
                            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                            .unwrap(),
                    )
                }
            },
        );
        let stack = MetricsLayer::new().layer(ClassifyLayer::new().layer(client));
        let req = request("GET", "/v1/videos/text2video/1", "", API_KEY);
        let response = stack.oneshot(req).await.unwrap();
        assert_eq!(response.status(), 401);
    }
    let warned: Vec<_> = capture
        .events()
        .into_iter()
        .filter(|e| e.level == "WARN")
        .map(|e| {
            // One `message`, the event's own: the answer's text has a field of its own name
            // (two `message` fields made a JSON line with a duplicate key).
            let messages: Vec<_> = e.fields.iter().filter(|(n, _)| n == "message").collect();
            assert_eq!(messages.len(), 1, "{:?}", e.fields);
            assert_eq!(e.field("message"), Some("kling call failed"));
            e.field("kling_message").unwrap_or_default().to_owned()
        })
        .collect();
    assert_eq!(
        warned,
        [
            "authorization Bearer [redacted] is invalid",
            "authorization token [redacted] is invalid"
        ],
    );
    let text = capture.all_text();
    assert_eq!(leaks(&text, &secrets), Vec::<&str>::new(), "{text}");
}

/// An answer that is no envelope because a field quotes the credential (a gateway putting the
/// header it refused in `code`), read by this layer with no classify step below: the `WARN`
/// "kling call answered with no envelope" gives the parser's reason, which names what was wrong
/// and where; kling-core's reason quotes no value, and this layer redacts it as it does every
/// other warning, so a credential in the body reaches no log either way.
#[tokio::test(start_paused = true)]
async fn an_answer_that_is_no_envelope_quoting_the_credential_leaks_nothing() {
    let capture = Capture::default();
    let _tracing = tracing::subscriber::set_default(capture.clone());
    let jwt = sign_jwt(ACCESS_KEY, SECRET_KEY);
    let mut secrets = vec![API_KEY, jwt.as_str()];
    secrets.extend(jwt.split('.'));
    for quoted in [format!("Bearer {API_KEY}"), format!("token {jwt}")] {
        let body = format!(r#"{{"code":"{quoted}","message":"unauthorized"}}"#);
        let client = tower::service_fn(
            move |_req: http::Request<http_body_util::Full<bytes::Bytes>>| {
                let body = body.clone();
                async move {
                    Ok::<_, kling_core::BoxError>(
                        http::Response::builder()
                            .status(401)
                            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                            .unwrap(),
                    )
                }
            },
        );
        let stack = MetricsLayer::new().layer(client);
        let req = request("GET", "/v1/videos/text2video/1", "", API_KEY);
        let response = stack.oneshot(req).await.unwrap();
        assert_eq!(response.status(), 401);
    }
    let reasons: Vec<_> = capture
        .events()
        .into_iter()
        .filter(|e| e.field("message") == Some("kling call answered with no envelope"))
        .map(|e| e.field("reason").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    for reason in &reasons {
        // The reason's words are kept: what was wrong and where.
        assert!(reason.contains("expected"), "{reason}");
    }
    let text = capture.all_text();
    assert_eq!(leaks(&text, &secrets), Vec::<&str>::new(), "{text}");
}

/// The `WARN`s' `kling_message` or `error` fields `capture` holds after two calls through
/// the metrics and classify layers: one answered `400` with `body`, one failed with
/// `error` as the client's error text.
async fn warnings_of_a_refusal_and_an_error(
    capture: &Capture,
    body: String,
    error: String,
) -> Vec<String> {
    let answering = tower::service_fn(
        move |_req: http::Request<http_body_util::Full<bytes::Bytes>>| {
            let body = body.clone();
            async move {
                Ok::<_, kling_core::BoxError>(
                    http::Response::builder()
                        .status(400)
                        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                        .unwrap(),
                )
            }
        },
    );
    let stack = MetricsLayer::new().layer(ClassifyLayer::new().layer(answering));
    let req = request("POST", "/v1/videos/image2video", "{}", API_KEY);
    assert_eq!(stack.oneshot(req).await.unwrap().status(), 400);

    let failing = tower::service_fn(
        move |_req: http::Request<http_body_util::Full<bytes::Bytes>>| {
            let error = error.clone();
            async move {
                Err::<http::Response<http_body_util::Full<bytes::Bytes>>, kling_core::BoxError>(
                    error.into(),
                )
            }
        },
    );
    let stack = MetricsLayer::new().layer(ClassifyLayer::new().layer(failing));
    let req = request("POST", "/v1/videos/text2video", "{}", API_KEY);
    assert!(stack.oneshot(req).await.is_err());

    capture
        .events()
        .into_iter()
        .filter(|e| e.level == "WARN")
        .map(|e| {
            e.field("kling_message")
                .or(e.field("error"))
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// A URL's query may be its credential: a presigned image URL (`X-Amz-Signature`), a callback
/// with `?sig=`, an endpoint with `?api_key=`. An answer's message or a client's error quoting
/// one (Kling refusing an `image_url` it could not read, reqwest naming the URL it failed to
/// reach) is logged with the URL up to its path, the query `[redacted]`: it was logged whole,
/// handing whoever reads the logs the private object the URL signs for.
#[tokio::test(start_paused = true)]
async fn a_signed_url_quoted_by_an_answer_or_an_error_leaks_nothing() {
    let capture = Capture::default();
    let _tracing = tracing::subscriber::set_default(capture.clone());
    let signature = "5f2a9c0d7e31b4a8c6d2e0f19a7b3c5d";
    let credential = "AKIAEXAMPLE1234";
    let signed = format!(
        "https://bucket.s3.amazonaws.com/in/cat.png?X-Amz-Credential={credential}&X-Amz-Signature={signature}#f"
    );
    let body = format!(
        r#"{{"code":1201,"message":"image_url {signed} could not be read","request_id":"r1"}}"#
    );
    let message = format!(
        "error sending request for url (https://gw.example/v1/videos/text2video?api_key={API_KEY}): reset"
    );
    let warned = warnings_of_a_refusal_and_an_error(&capture, body, message).await;
    assert_eq!(
        warned,
        [
            "image_url https://bucket.s3.amazonaws.com/in/cat.png?[redacted] could not be read"
                .to_owned(),
            "request failed after it was sent: error sending request for url \
             (https://gw.example/v1/videos/text2video?[redacted]): reset"
                .to_owned(),
        ],
    );
    let text = capture.all_text();
    let secrets = [signature, credential, API_KEY];
    assert_eq!(leaks(&text, &secrets), Vec::<&str>::new(), "{text}");
}

/// An answer's message or an error's text of a megabyte (a broken proxy's page, a hostile
/// upstream: words, a URL with a password across the 4 KiB mark, then `://` after `://`) is
/// logged cut: the `WARN` shows its first 4 KiB at most, redacted, and how many bytes it left
/// out, and the URL the cut falls in is left out whole, its password with it. The redaction
/// read the rest of such a text again from each `://`: minutes of a runtime worker.
#[tokio::test(start_paused = true)]
async fn a_long_message_is_logged_cut_and_leaks_nothing_across_the_cut() {
    let capture = Capture::default();
    let _tracing = tracing::subscriber::set_default(capture.clone());
    let password = "QQQQQQQQQQQQ";
    let message = format!(
        "{}https://user:{password}@proxy.example/v1 {}",
        // The password from byte 4093 on: the cut at 4096 falls in it.
        "refused ".repeat(510),
        "://".repeat(1024 * 1024 / 3),
    );
    let body = format!(r#"{{"code":1201,"message":"{message}","request_id":"r1"}}"#);
    let warned = warnings_of_a_refusal_and_an_error(&capture, body, message).await;
    assert_eq!(warned.len(), 2, "{warned:?}");
    // Not one `Q` of the password: the cut fell in it.
    let text = capture.all_text();
    assert!(!text.contains('Q'), "{}", &text[..text.len().min(8192)]);
    for shown in &warned {
        assert!(shown.len() <= 4096 + 32, "{}", shown.len());
        assert!(shown.contains("refused refused "), "{shown}");
        let (kept, count) = shown.rsplit_once(" [").unwrap();
        assert!(kept.ends_with("refused"), "{kept}");
        let left_out: usize = count
            .strip_suffix(" bytes left out]")
            .unwrap()
            .parse()
            .unwrap();
        assert!(left_out > 1024 * 1024, "{count}");
    }
}
