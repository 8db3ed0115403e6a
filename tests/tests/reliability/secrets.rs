//! Keys, secrets, tokens and each JWT segment never appear in `Debug`, `Display`, logs, spans,
//! metric labels or error messages.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use kling_core::error::BoxError;
use kling_core::{ClassifyLayer, Outcome};
use kling_metrics::MetricsLayer;
use kling_mock::{MockConfig, MockKling, Preset};
use kling_tower::auth::{AuthLayer, Credentials};
use kling_tower::webhook::WebhookVerifier;
use metrics_util::debugging::DebuggingRecorder;
use tower::util::BoxCloneService;
use tower::{Layer, ServiceExt, service_fn};

use crate::support::{self, Opts, request};

const API_KEY: &str = "sk-live-api-key-0123456789abcdef";
const ACCESS_KEY: &str = "ak-secrets-test";
const SECRET_KEY: &str = "secret-key-never-to-be-shown-42";
const WEBHOOK_SECRET: &str = "whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM=";

/// Asserts `text` holds none of `secrets`.
fn assert_clean(what: &str, text: &str, secrets: &[String]) {
    for secret in secrets {
        assert!(
            !text.contains(secret.as_str()),
            "{what} shows a secret ({secret}):\n{text}"
        );
    }
}

/// A token and each of its three segments.
fn jwt_parts(token: &str) -> Vec<String> {
    let mut parts = vec![token.to_owned()];
    parts.extend(token.split('.').map(str::to_owned));
    parts
}

#[test]
fn credentials_and_layers_never_show_a_key_in_debug() {
    let secrets = vec![API_KEY.to_owned(), SECRET_KEY.to_owned()];
    let api = Credentials::api_key(API_KEY).unwrap();
    let jwt = Credentials::access_key(ACCESS_KEY, SECRET_KEY).unwrap();
    for text in [
        format!("{api:?}"),
        format!("{jwt:?}"),
        format!("{:?}", AuthLayer::new(api.clone())),
        format!("{:?}", AuthLayer::new(jwt.clone())),
        format!("{:?}", AuthLayer::new(jwt.clone()).layer(())),
        format!("{:?}", api.account_id()),
        format!("{:?}", WebhookVerifier::new(WEBHOOK_SECRET).unwrap()),
    ] {
        assert_clean("Debug", &text, &secrets);
        assert_clean("Debug", &text, &["c2VjcmV0LWtleS1mb3ItdGVzdHM".to_owned()]);
    }
}

#[test]
fn configuration_errors_name_the_field_not_the_value() {
    let lookup = |name: &str| match name {
        "KLING_API_KEY" => Some(format!("{API_KEY}\n")),
        _ => None,
    };
    // A key with a control character inside cannot go into a header.
    let bad = format!("{API_KEY}\u{7}x");
    let error = Credentials::api_key(bad.clone()).unwrap_err();
    assert_eq!(error.field(), "api_key");
    assert_clean("error", &error.to_string(), &[bad, API_KEY.to_owned()]);
    assert!(
        Credentials::from_lookup(lookup).is_ok(),
        "surrounding whitespace is trimmed"
    );
    let error = Credentials::from_lookup(|name| {
        (name == "KLING_ACCESS_KEY").then(|| ACCESS_KEY.to_owned())
    })
    .unwrap_err();
    assert_eq!(error.field(), "KLING_SECRET_KEY");
}

#[tokio::test(start_paused = true)]
async fn jwts_are_marked_sensitive_so_request_debug_never_shows_them() {
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let record = seen.clone();
    let inner = service_fn(move |req: Request<Full<Bytes>>| {
        let header = req.headers()["authorization"].to_str().unwrap().to_owned();
        record.lock().unwrap().push((header, format!("{req:?}")));
        async {
            let body = r#"{"code":0,"message":"SUCCEED","request_id":"r"}"#;
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(body))))
        }
    });
    for credentials in [
        Credentials::access_key(ACCESS_KEY, SECRET_KEY).unwrap(),
        Credentials::api_key(API_KEY).unwrap(),
    ] {
        let auth = AuthLayer::new(credentials).layer(inner.clone());
        auth.oneshot(Request::new(Full::new(Bytes::new())))
            .await
            .unwrap();
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    for (header, debug) in seen.iter() {
        let token = header.strip_prefix("Bearer ").unwrap();
        assert_clean("request Debug", debug, &jwt_parts(token));
        assert!(debug.contains("Sensitive"), "{debug}");
    }
}

/// A `tracing` subscriber that writes every span's and event's fields into one string.
#[derive(Clone, Default)]
struct Capture {
    text: Arc<Mutex<String>>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
}

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut text = self.text.lock().unwrap();
        let _ = write!(text, "\nspan {}:", span.metadata().name());
        span.record(&mut Fields(&mut text));
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        tracing::span::Id::from_u64(id)
    }

    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut text = self.text.lock().unwrap();
        text.push_str("\nrecord:");
        values.record(&mut Fields(&mut text));
    }

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut text = self.text.lock().unwrap();
        let _ = write!(text, "\nevent {}:", event.metadata().target());
        event.record(&mut Fields(&mut text));
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn secrets_never_reach_logs_spans_metric_labels_or_errors() {
    let capture = Capture::default();
    let _tracing = tracing::subscriber::set_default(capture.clone());
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);

    // The mock checks JWTs, and a fifth of its answers are 5xx (retried).
    let mock = MockKling::new(
        MockConfig::preset(Preset::Pro)
            .access_key(ACCESS_KEY, SECRET_KEY)
            .fault_rate(0.2)
            .seed(3),
    )
    .unwrap();
    // Every token that leaves, so the test knows what must not show anywhere.
    let tokens: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut opts = Opts::new(1.0);
    opts.credentials = Credentials::access_key(ACCESS_KEY, SECRET_KEY).unwrap();
    opts.max_attempts = 3;
    let (svc, _handles) = support::stack(spied(mock, &tokens), &opts);
    let svc = BoxCloneService::new(MetricsLayer::new().layer(svc));

    // A second account whose secret is wrong: every answer is an auth failure.
    let wrong =
        MockKling::new(MockConfig::preset(Preset::Pro).access_key(ACCESS_KEY, "right")).unwrap();
    let mut wrong_opts = Opts::new(1.0);
    wrong_opts.credentials = Credentials::access_key(ACCESS_KEY, SECRET_KEY).unwrap();
    let (wrong_svc, _) = support::stack(spied(wrong, &tokens), &wrong_opts);
    let wrong_svc = BoxCloneService::new(MetricsLayer::new().layer(wrong_svc));

    // A third whose clock is an hour ahead: every token it sees has expired (1004), so the
    // auth layer signs each call's token afresh and sends it once more. (Token lifetimes run on
    // the wall clock, which paused time does not stop: a mock only a little ahead would see no
    // token expire in the few milliseconds this test takes.)
    let expired = MockKling::new(
        MockConfig::preset(Preset::Pro)
            .access_key(ACCESS_KEY, SECRET_KEY)
            .clock_offset_secs(3600),
    )
    .unwrap();
    let (expired_svc, expired_handles) = support::stack(spied(expired, &tokens), &opts);
    let expired_svc = BoxCloneService::new(MetricsLayer::new().layer(expired_svc));

    let mut texts = Vec::new();
    for i in 0..40 {
        let create = request(
            Method::POST,
            "/v1/videos/text2video",
            &format!(r#"{{"prompt":"p{i}","external_task_id":"s-{i}"}}"#),
        );
        match svc.clone().oneshot(create).await {
            Ok(response) => {
                let outcome = Outcome::of(&response).unwrap();
                texts.push(format!("{response:?} {outcome:?}"));
                if let Err(e) = outcome.to_result() {
                    texts.push(format!("{e} {e:?}"));
                }
            }
            Err(e) => texts.push(format!("{e} {e:?}")),
        }
        for service in [&wrong_svc, &expired_svc] {
            let query = request(Method::GET, "/v1/videos/text2video/s-0", "");
            if let Err(e) = service.clone().oneshot(query).await {
                texts.push(format!("{e} {e:?}"));
            }
        }
        tokio::time::advance(std::time::Duration::from_secs(2)).await;
    }
    let tokens = tokens.lock().unwrap().clone();
    // The expired account's calls were each signed afresh after their 1004.
    assert!(
        expired_handles.auth.tokens_signed() >= 40,
        "signed {} times",
        expired_handles.auth.tokens_signed()
    );
    let mut secrets = vec![SECRET_KEY.to_owned()];
    let mut distinct: Vec<&String> = tokens.iter().collect();
    distinct.sort();
    distinct.dedup();
    for token in distinct {
        secrets.extend(
            jwt_parts(token)
                .into_iter()
                .skip(1)
                .filter(|p| p.len() > 40),
        );
        secrets.push(token.clone());
    }
    let errors = texts.join("\n");
    for code in ["kling error 1000", "kling error 1004"] {
        assert!(errors.contains(code), "{code} was seen: {errors}");
    }
    assert_clean("errors", &errors, &secrets);
    let logs = capture.text.lock().unwrap().clone();
    assert!(logs.contains("span"), "spans were recorded: {logs}");
    assert_clean("logs and spans", &logs, &secrets);
    let mut labels = String::new();
    for (key, ..) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let _ = write!(labels, "\n{}", key.name());
        for label in key.labels() {
            let _ = write!(labels, " {}={}", label.key(), label.value());
        }
    }
    assert!(!labels.is_empty(), "metrics were recorded");
    assert_clean("metric labels", &labels, &secrets);
}

/// The classify step over `mock`, recording each token that goes out into `tokens`.
fn spied(mock: MockKling, tokens: &Arc<Mutex<Vec<String>>>) -> support::Svc {
    let record = tokens.clone();
    let spy = service_fn(move |req: Request<Full<Bytes>>| {
        if let Some(value) = req.headers().get("authorization") {
            let token = value.to_str().unwrap().trim_start_matches("Bearer ");
            record.lock().unwrap().push(token.to_owned());
        }
        mock.clone().oneshot(req)
    });
    BoxCloneService::new(ClassifyLayer::new().layer(spy))
}

#[tokio::test(start_paused = true)]
async fn an_api_key_never_reaches_metric_labels_or_errors() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    // The mock knows another key: every call is refused with an auth error.
    let mock = MockKling::new(MockConfig::preset(Preset::Pro).api_key("the-right-key")).unwrap();
    let mut opts = Opts::new(1.0);
    opts.credentials = Credentials::api_key(API_KEY).unwrap();
    let (svc, _handles) = support::stack(support::mock_client(mock, 64 * 1024), &opts);
    let svc = MetricsLayer::new().layer(svc);
    let mut texts = String::new();
    for path in ["/v1/videos/text2video", "/v1/videos/text2video/t"] {
        let method = if path.ends_with('t') {
            Method::GET
        } else {
            Method::POST
        };
        let error = svc
            .clone()
            .oneshot(request(method, path, r#"{"prompt":"x"}"#))
            .await
            .unwrap_err();
        let _ = write!(texts, "{error} {error:?}");
    }
    assert!(texts.contains("kling error 100"), "{texts}");
    assert_clean("errors", &texts, &[API_KEY.to_owned()]);
    let metrics = snapshotter.snapshot().into_vec();
    // Without a metric recorded, the check below would hold of an empty list.
    assert!(!metrics.is_empty(), "metrics were recorded");
    let labels = format!("{metrics:?}");
    assert_clean("metric labels", &labels, &[API_KEY.to_owned()]);
}
