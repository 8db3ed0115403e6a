//! Calls that end in an error, or in a body that is no envelope, are labelled by what is known.

use std::fmt;

use bytes::Bytes;
use http_body_util::Full;
use kling_core::error::{ApiError, BoxError};
use kling_core::metrics::{REQUEST_DURATION, RESPONSES};
use kling_core::{ClassifyLayer, Outcome};
use kling_metrics::MetricsLayer;
use tower::{Layer, ServiceExt};

use crate::support::{Recording, Value, answering, request};

/// An error whose cause is a Kling error, as the retry layer's "gave up" error is.
#[derive(Debug)]
struct GaveUp(ApiError);

impl fmt::Display for GaveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gave up: {}", self.0)
    }
}

impl std::error::Error for GaveUp {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

type Labels = Vec<(String, String)>;

/// The labels of the one duration series recorded, and the one response code.
fn labels_of_the_call(recording: &Recording) -> (Labels, Labels) {
    let recorded = recording.take();
    let mut duration = recorded.iter().filter(|((n, _), _)| n == REQUEST_DURATION);
    let ((_, labels), (_, value)) = duration.next().expect("a duration");
    assert!(duration.next().is_none());
    assert!(matches!(value, Value::Histogram(h) if h.len() == 1));
    let mut responses = recorded.iter().filter(|((n, _), _)| n == RESPONSES);
    let ((_, response_labels), (_, count)) = responses.next().expect("a response count");
    assert_eq!(*count, Value::Counter(1));
    (labels.clone(), response_labels.clone())
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<_> = items
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    v.sort();
    v
}

#[tokio::test(start_paused = true)]
async fn a_kling_error_inside_an_error_is_labelled_with_its_code() {
    let recording = Recording::start();
    let layer = MetricsLayer::new();
    let monitor = layer.monitor().clone();
    let failing = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
        let outcome = Outcome::parse(
            http::StatusCode::TOO_MANY_REQUESTS,
            &http::HeaderMap::new(),
            br#"{"code":1102,"message":"resource pack exhausted","request_id":"r9"}"#,
            tokio::time::Instant::now(),
        )
        .unwrap();
        Err::<http::Response<Full<Bytes>>, BoxError>(Box::new(GaveUp(ApiError::from_outcome(
            &outcome,
        ))))
    });
    let error = layer
        .layer(failing)
        .oneshot(request("POST", "/v1/videos/text2video", "{}", "k"))
        .await
        .unwrap_err();
    assert!(error.is::<GaveUp>(), "the error passes through unchanged");

    let (duration, response) = labels_of_the_call(&recording);
    assert_eq!(
        duration,
        pairs(&[
            ("kind", "create"),
            ("pool", "video"),
            ("status", "429"),
            ("code", "1102")
        ])
    );
    assert_eq!(response, pairs(&[("kind", "create"), ("code", "1102")]));
    assert_eq!(monitor.snapshot().rejections_of(1102), 1);
}

/// A Kling error an adapter wrapped in an `io::Error` (whose `source` skips what it wraps) is
/// still read by its code, as the retry layer and the slots read it: it was labelled `error`
/// and no rejection was counted.
#[tokio::test(start_paused = true)]
async fn a_kling_error_wrapped_in_an_io_error_is_labelled_with_its_code() {
    let recording = Recording::start();
    let layer = MetricsLayer::new();
    let monitor = layer.monitor().clone();
    let failing = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
        let outcome = Outcome::parse(
            http::StatusCode::TOO_MANY_REQUESTS,
            &http::HeaderMap::new(),
            br#"{"code":1302,"message":"rate","request_id":"r9"}"#,
            tokio::time::Instant::now(),
        )
        .unwrap();
        Err::<http::Response<Full<Bytes>>, BoxError>(Box::new(std::io::Error::other(
            ApiError::from_outcome(&outcome),
        )))
    });
    layer
        .layer(failing)
        .oneshot(request("POST", "/v1/videos/text2video", "{}", "k"))
        .await
        .unwrap_err();
    let (_, response) = labels_of_the_call(&recording);
    assert_eq!(response, pairs(&[("kind", "create"), ("code", "1302")]));
    assert_eq!(monitor.snapshot().rejections_of(1302), 1);
}

#[tokio::test(start_paused = true)]
async fn a_transport_error_is_labelled_error() {
    let recording = Recording::start();
    let failing = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
        Err::<http::Response<Full<Bytes>>, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ))
    });
    let error = MetricsLayer::new()
        .layer(failing)
        .oneshot(request("GET", "/tasks?task_ids=a,b", "", "k"))
        .await
        .unwrap_err();
    assert!(error.is::<std::io::Error>());
    let (duration, response) = labels_of_the_call(&recording);
    assert_eq!(
        duration,
        pairs(&[
            ("kind", "query"),
            ("pool", ""),
            ("status", "error"),
            ("code", "error")
        ])
    );
    assert_eq!(response, pairs(&[("kind", "query"), ("code", "error")]));
}

/// A local refusal: its source names kling-core's marker, as every layer's refusals do
/// (kling-ratelimit's `QueueFull`, the slots' deadline, a spend guard).
#[derive(Debug)]
struct QueueFull;

impl fmt::Display for QueueFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("queue full")
    }
}

impl std::error::Error for QueueFull {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&kling_core::error::RefusedBeforeSending)
    }
}

/// A call a layer refused before sending it (a full queue, a local deadline, the spend guard)
/// is labelled `code="refused"`, also inside an adapter's `io::Error`: it was `error`, as a
/// network failure is, so a dashboard could not tell "the API failed us" from "we held back".
/// Its span says `refused` too; a transport error stays `error` (above).
#[tokio::test(start_paused = true)]
async fn a_call_refused_before_sending_is_labelled_refused() {
    use crate::support::Capture;

    let capture = Capture::default();
    let _tracing = tracing::subscriber::set_default(capture.clone());
    let recording = Recording::start();
    for wrapped in [false, true] {
        let failing = tower::service_fn(move |_req: http::Request<Full<Bytes>>| async move {
            let error: BoxError = if wrapped {
                Box::new(std::io::Error::other(QueueFull))
            } else {
                Box::new(QueueFull)
            };
            Err::<http::Response<Full<Bytes>>, BoxError>(error)
        });
        MetricsLayer::new()
            .layer(failing)
            .oneshot(request("POST", "/v1/videos/text2video", "{}", "k"))
            .await
            .unwrap_err();
        let (duration, response) = labels_of_the_call(&recording);
        assert_eq!(
            duration,
            pairs(&[
                ("kind", "create"),
                ("pool", "video"),
                ("status", "error"),
                ("code", "refused")
            ]),
            "wrapped: {wrapped}"
        );
        assert_eq!(response, pairs(&[("kind", "create"), ("code", "refused")]));
    }
    let codes: Vec<_> = capture
        .spans()
        .into_iter()
        .filter(|span| span.name == "kling.request")
        .map(|span| span.field("code").map(str::to_owned))
        .collect();
    assert_eq!(
        codes,
        [Some("refused".to_owned()), Some("refused".to_owned())]
    );
}

/// A retried call whose last attempt a layer refused after earlier ones reached Kling (two
/// 5000s, then a full queue; a create that may have made a task) is `error`, not `refused`:
/// the API failed it first, and `refused` would say no request left. Its requests still
/// count; a retry report of one refused attempt (none sent) is `refused`, through an `Arc` too.
#[tokio::test(start_paused = true)]
async fn a_retried_call_that_reached_kling_is_not_labelled_refused() {
    use std::sync::Arc;

    use kling_core::error::Attempts;

    let recording = Recording::start();
    for (sent, may_have_created, shared, code, requests) in [
        (3, true, false, "error", 2),
        (3, false, true, "error", 2),
        (1, false, false, "refused", 0),
        (1, false, true, "refused", 0),
    ] {
        let layer = MetricsLayer::new();
        let monitor = layer.monitor().clone();
        let failing = tower::service_fn(move |_req: http::Request<Full<Bytes>>| async move {
            let report = Attempts::new(sent, may_have_created, QueueFull);
            let error: BoxError = if shared {
                let shared: Arc<dyn std::error::Error + Send + Sync> = Arc::new(report);
                Box::new(shared)
            } else {
                Box::new(report)
            };
            Err::<http::Response<Full<Bytes>>, BoxError>(error)
        });
        layer
            .layer(failing)
            .oneshot(request("POST", "/v1/videos/text2video", "{}", "k"))
            .await
            .unwrap_err();
        let (_, response) = labels_of_the_call(&recording);
        assert_eq!(
            response,
            pairs(&[("kind", "create"), ("code", code)]),
            "{sent} sent, shared: {shared}"
        );
        assert_eq!(monitor.snapshot().rate.requests, requests);
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_that_is_no_envelope_is_labelled_malformed() {
    // Without the classify step: the layer parses the buffered body itself.
    let recording = Recording::start();
    let response = MetricsLayer::new()
        .layer(answering(502, "<html>bad gateway</html>"))
        .oneshot(request("POST", "/tasks", "{}", "k"))
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let (duration, _) = labels_of_the_call(&recording);
    assert_eq!(
        duration,
        pairs(&[
            ("kind", "list"),
            ("pool", ""),
            ("status", "502"),
            ("code", "malformed")
        ])
    );

    // With it: the classify step's typed error.
    let error = MetricsLayer::new()
        .layer(ClassifyLayer::new().layer(answering(502, "<html>bad gateway</html>")))
        .oneshot(request("GET", "/healthz", "", "k"))
        .await
        .unwrap_err();
    assert!(error.is::<kling_core::error::MalformedResponse>());
    let (duration, _) = labels_of_the_call(&recording);
    assert_eq!(
        duration,
        pairs(&[
            ("kind", "other"),
            ("pool", ""),
            ("status", "502"),
            ("code", "malformed")
        ])
    );
}

/// A proxy's own 429 page carries no Kling code, but it is a 429 all the same: the snapshot
/// counts it apart, in the total, whether the classify step turned it into an error or the
/// layer read it itself; a 502 page is no rejection.
#[tokio::test(start_paused = true)]
async fn a_429_page_with_no_envelope_counts_as_a_rejection_without_code() {
    let page = "<html>429 Too Many Requests</html>";
    let monitor = kling_metrics::Monitor::builder().build().unwrap();
    let bare = MetricsLayer::with_monitor(monitor.clone()).layer(answering(429, page));
    let response = bare
        .oneshot(request("POST", "/v1/videos/text2video", "{}", "k"))
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let classified = MetricsLayer::with_monitor(monitor.clone())
        .layer(ClassifyLayer::new().layer(answering(429, page)));
    classified
        .oneshot(request("GET", "/v1/videos/text2video/t1", "", "k"))
        .await
        .unwrap_err();
    let gateway = MetricsLayer::with_monitor(monitor.clone())
        .layer(ClassifyLayer::new().layer(answering(502, page)));
    gateway
        .oneshot(request("GET", "/v1/videos/text2video/t1", "", "k"))
        .await
        .unwrap_err();
    let snapshot = monitor.snapshot();
    assert_eq!(snapshot.rejections_without_code, 2);
    assert!(snapshot.rejections.is_empty(), "{:?}", snapshot.rejections);
    assert_eq!(snapshot.rejections_total(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_envelope_without_classify_is_parsed_once_and_left_for_the_caller() {
    let recording = Recording::start();
    let response = MetricsLayer::new()
        .layer(answering(
            429,
            r#"{"code":1303,"message":"busy","request_id":"q"}"#,
        ))
        .oneshot(request(
            "POST",
            "/v1/images/kolors-virtual-try-on",
            "{}",
            "k",
        ))
        .await
        .unwrap();
    assert_eq!(Outcome::of(&response).unwrap().request_id(), Some("q"));
    let (duration, _) = labels_of_the_call(&recording);
    assert_eq!(
        duration,
        pairs(&[
            ("kind", "create"),
            ("pool", "try-on"),
            ("status", "429"),
            ("code", "1303")
        ])
    );
}

/// Past the models and the undocumented codes a process labels by name, the series share
/// `video:other` and `other`, so an upstream or a caller cannot make new series without end;
/// the span, which makes no series, keeps the model and the code.
#[tokio::test(start_paused = true)]
async fn past_the_labelled_models_and_codes_series_share_other_and_the_span_keeps_both() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};

    use kling_core::Product;
    use kling_core::metrics::{MODEL_POOL_LABELS, model_pool_label};

    use crate::support::Capture;

    let recording = Recording::start();
    let capture = Capture::default();
    let _tracing = tracing::subscriber::set_default(capture.clone());
    // Fill the model labels (other tests of this process may have named some already).
    for n in 0..MODEL_POOL_LABELS {
        model_pool_label(Product::Video, &format!("filler-{n}"));
    }
    // Each answer carries a new undocumented code.
    let codes = Arc::new(AtomicI64::new(900_000));
    let next = Arc::clone(&codes);
    let client = tower::service_fn(move |_req: http::Request<Full<Bytes>>| {
        let code = next.fetch_add(1, Ordering::Relaxed);
        let body = format!(r#"{{"code":{code},"message":"new","request_id":"r{code}"}}"#);
        async move {
            Ok::<_, BoxError>(
                http::Response::builder()
                    .status(400)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap(),
            )
        }
    });
    let service = MetricsLayer::new().layer(ClassifyLayer::new().layer(client));
    for _ in 0..40 {
        let create = request("POST", "/text-to-video/past-the-table", "{}", "k");
        service.clone().oneshot(create).await.unwrap();
    }

    let recorded = recording.take();
    let label = |labels: &Labels, name: &str| {
        labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let durations: Vec<&Labels> = recorded
        .keys()
        .filter(|(n, _)| n == REQUEST_DURATION)
        .map(|(_, labels)| labels)
        .collect();
    assert!(!durations.is_empty());
    for labels in &durations {
        assert_eq!(label(labels, "pool"), "video:other");
    }
    let codes: std::collections::BTreeSet<String> =
        durations.iter().map(|l| label(l, "code")).collect();
    assert!(codes.contains("other"), "{codes:?}");
    assert!(
        codes.len() <= 33,
        "{} code labels for 40 codes",
        codes.len()
    );

    let span = capture
        .spans()
        .into_iter()
        .rfind(|s| s.name == "kling.request")
        .expect("a span");
    assert_eq!(span.field("pool"), Some("video:past-the-table"));
    assert_eq!(span.field("code"), Some("900039"));
}

/// Past the uncommon HTTP statuses a process labels by number, the series share the status
/// `other`: a proxy answering statuses at random (any of 100 to 999) cannot make new series
/// without end; the span, which makes no series, keeps the status.
#[tokio::test(start_paused = true)]
async fn past_the_labelled_uncommon_statuses_series_share_other_and_the_span_keeps_it() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU16, Ordering};

    use crate::support::Capture;

    let recording = Recording::start();
    let capture = Capture::default();
    let _tracing = tracing::subscriber::set_default(capture.clone());
    // Each answer comes with a new status, none of them common.
    let statuses = Arc::new(AtomicU16::new(600));
    let next = Arc::clone(&statuses);
    let client = tower::service_fn(move |_req: http::Request<Full<Bytes>>| {
        let status = next.fetch_add(1, Ordering::Relaxed);
        let body = r#"{"code":5000,"message":"internal","request_id":"r"}"#;
        async move {
            Ok::<_, BoxError>(
                http::Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::from_static(body.as_bytes())))
                    .unwrap(),
            )
        }
    });
    let service = MetricsLayer::new().layer(ClassifyLayer::new().layer(client));
    for _ in 0..100 {
        let query = request("GET", "/v1/videos/text2video/1", "", "k");
        service.clone().oneshot(query).await.unwrap();
    }

    let recorded = recording.take();
    let statuses: std::collections::BTreeSet<String> = recorded
        .keys()
        .filter(|(n, _)| n == REQUEST_DURATION)
        .flat_map(|(_, labels)| labels.iter().filter(|(n, _)| n == "status"))
        .map(|(_, v)| v.clone())
        .collect();
    assert!(statuses.contains("other"), "{statuses:?}");
    assert!(
        statuses.len() <= 33,
        "{} status labels for 100 statuses: {statuses:?}",
        statuses.len()
    );

    let span = capture
        .spans()
        .into_iter()
        .rfind(|s| s.name == "kling.request")
        .expect("a span");
    assert_eq!(span.field("status"), Some("699"));
}

/// Each of Kling's six 429 codes lands in its own count of the snapshot and under its own
/// `code` label, whether it came with HTTP 429 or with another status (a gateway rewriting
/// it, a 200 carrying the code: the README's "429s by code" query selects by code, so the
/// snapshot counts by code too); a code that is no 429 code is no rejection unless its status
/// is 429.
#[tokio::test(start_paused = true)]
async fn every_429_code_is_counted_under_its_code_whatever_the_status() {
    let recording = Recording::start();
    let codes = [1100, 1101, 1102, 1302, 1303, 1304];
    for status in [429, 200, 503] {
        let monitor = kling_metrics::Monitor::builder().build().unwrap();
        for (n, code) in codes.iter().enumerate() {
            let body: &'static str = Box::leak(
                format!(r#"{{"code":{code},"message":"no","request_id":"r{n}"}}"#).into_boxed_str(),
            );
            // Classified (an error or a response, as the classify step makes it) and not.
            let classified = MetricsLayer::with_monitor(monitor.clone())
                .layer(ClassifyLayer::new().layer(answering(status, body)));
            let _ = classified
                .oneshot(request("POST", "/v1/videos/text2video", "{}", "k"))
                .await;
            let (_, response) = labels_of_the_call(&recording);
            assert_eq!(
                response,
                pairs(&[("kind", "create"), ("code", &code.to_string())])
            );
            let bare = MetricsLayer::with_monitor(monitor.clone()).layer(answering(status, body));
            let _ = bare
                .oneshot(request("GET", "/v1/videos/text2video/t1", "", "k"))
                .await;
            let (_, response) = labels_of_the_call(&recording);
            assert_eq!(
                response,
                pairs(&[("kind", "query"), ("code", &code.to_string())])
            );
        }
        // A 1201 is a 429 only when it came as one.
        let body = r#"{"code":1201,"message":"no","request_id":"x"}"#;
        let _ = MetricsLayer::with_monitor(monitor.clone())
            .layer(answering(status, body))
            .oneshot(request("GET", "/v1/videos/text2video/t1", "", "k"))
            .await;
        recording.take();
        let snapshot = monitor.snapshot();
        for code in codes {
            assert_eq!(snapshot.rejections_of(code), 2, "{code} with HTTP {status}");
        }
        assert_eq!(
            snapshot.rejections_of(1201),
            u64::from(status == 429),
            "HTTP {status}"
        );
        assert_eq!(snapshot.rejections_without_code, 0);
    }
}

/// An HTTP 429 whose body says code 0 and names a task counts once: as the task it made, not
/// as a rejection too. The code decides, as kling-core's disposition (which the retry and
/// slots layers read) makes it a success; a 1303 under 429 is a rejection and makes no task.
#[tokio::test(start_paused = true)]
async fn a_429_with_code_0_and_a_task_is_a_created_task_and_no_rejection() {
    let created = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t-429","task_status":"submitted"}}"#;
    let refused = r#"{"code":1303,"message":"no","request_id":"r"}"#;
    let monitor = kling_metrics::Monitor::builder().build().unwrap();
    let classified = MetricsLayer::with_monitor(monitor.clone())
        .layer(ClassifyLayer::new().layer(answering(429, created)));
    let response = classified
        .oneshot(request("POST", "/v1/videos/text2video", "{}", "k"))
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let snapshot = monitor.snapshot();
    assert_eq!(snapshot.rejections_total(), 0, "{snapshot:?}");
    assert_eq!(snapshot.rejections_of(0), 0);
    assert_eq!((snapshot.tasks.created, snapshot.tasks.running), (1, 1));

    // Bare (no classify step), and the control: a 1303 is a rejection, no task.
    let other = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t-430","task_status":"submitted"}}"#;
    let bare = MetricsLayer::with_monitor(monitor.clone()).layer(answering(429, other));
    let _ = bare
        .oneshot(request("POST", "/v1/videos/text2video", "{}", "k"))
        .await;
    let _ = MetricsLayer::with_monitor(monitor.clone())
        .layer(ClassifyLayer::new().layer(answering(429, refused)))
        .oneshot(request("POST", "/v1/videos/text2video", "{}", "k"))
        .await;
    let snapshot = monitor.snapshot();
    assert_eq!(snapshot.rejections_total(), 1, "{snapshot:?}");
    assert_eq!(snapshot.rejections_of(1303), 1);
    assert_eq!((snapshot.tasks.created, snapshot.tasks.running), (2, 2));
}

/// A call its caller dropped (a timeout around the stack, a cancelled job) is often the
/// slowest of all: its duration up to the drop is recorded, with `status="error"` and
/// `code="cancelled"`, and it counts among the responses, so the histogram's tail and the
/// response counts see it. A future dropped before it was ever polled made no call and records
/// nothing; one dropped after its answer was recorded once, when answered.
#[tokio::test(start_paused = true)]
async fn a_call_its_caller_dropped_is_recorded_as_cancelled() {
    use std::time::Duration;

    use tower::Service;

    use crate::support::Capture;

    const CREATED: &str = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t-c","task_status":"submitted"}}"#;
    let recording = Recording::start();
    let capture = Capture::default();
    let _tracing = tracing::subscriber::set_default(capture.clone());
    // Kling answers ten minutes after a create is sent.
    let slow = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_secs(600)).await;
        Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from_static(
            CREATED.as_bytes(),
        ))))
    });
    let stack = MetricsLayer::new().layer(ClassifyLayer::new().layer(slow));
    let create = || request("POST", "/v1/videos/text2video", "{}", "k");

    let cut_short = tokio::time::timeout(Duration::from_secs(5), stack.clone().oneshot(create()));
    assert!(cut_short.await.is_err(), "timed out");
    let recorded = recording.take();
    let labels = pairs(&[
        ("kind", "create"),
        ("pool", "video"),
        ("status", "error"),
        ("code", "cancelled"),
    ]);
    let duration = recorded.get(&(REQUEST_DURATION.to_owned(), labels));
    assert_eq!(
        duration.map(|(_, value)| value),
        Some(&Value::Histogram(vec![5.0])),
        "{recorded:?}"
    );
    let responses = (
        RESPONSES.to_owned(),
        pairs(&[("kind", "create"), ("code", "cancelled")]),
    );
    assert_eq!(
        recorded.get(&responses).map(|(_, value)| value),
        Some(&Value::Counter(1))
    );
    let span = capture
        .spans()
        .into_iter()
        .find(|span| span.name == "kling.request")
        .expect("a span");
    assert_eq!(
        (span.field("status"), span.field("code")),
        (Some("error"), Some("cancelled"))
    );

    // Never polled: no call was made.
    let mut service = stack.clone();
    let unpolled = service.ready().await.unwrap().call(create());
    drop(unpolled);
    assert!(recording.take().is_empty(), "never polled");

    // Answered, then dropped: recorded once, as answered.
    let answered = tokio::time::timeout(Duration::from_secs(601), stack.oneshot(create()));
    assert!(answered.await.is_ok());
    let recorded = recording.take();
    let durations: Vec<_> = recorded
        .iter()
        .filter(|((name, _), _)| name == REQUEST_DURATION)
        .collect();
    assert_eq!(durations.len(), 1, "{recorded:?}");
    assert!(
        durations[0]
            .0
            .1
            .contains(&("code".to_owned(), "0".to_owned())),
        "{durations:?}"
    );
}

/// Every final 429 is logged once with its code, whether its answer ended the call or a retry
/// layer gave up on it and the call ended in its error (the stack's usual way for a 1302 or a
/// 1303): that `WARN` had only the error's text (`3 requests sent` for a bare report), and the
/// span's `code` is recorded after it, so a log line held no `code`, `http_status` or
/// `request_id` to filter or alert on.
#[tokio::test(start_paused = true)]
async fn every_final_429_is_logged_once_with_its_code_answered_or_given_up() {
    use crate::support::Capture;

    const ANSWERS: [&str; 6] = [
        r#"{"code":1100,"message":"account abnormal","request_id":"r1100"}"#,
        r#"{"code":1101,"message":"account in arrears","request_id":"r1101"}"#,
        r#"{"code":1102,"message":"resource pack exhausted","request_id":"r1102"}"#,
        r#"{"code":1302,"message":"too fast for Bearer ak-s3cr3t","request_id":"r1302"}"#,
        r#"{"code":1303,"message":"parallel task over resource pack limit","request_id":"r1303"}"#,
        r#"{"code":1304,"message":"ip whitelist","request_id":"r1304"}"#,
    ];
    let _recording = Recording::start();
    for body in ANSWERS {
        let code = &body[8..12];
        for given_up in [false, true] {
            let capture = Capture::default();
            let _tracing = tracing::subscriber::set_default(capture.clone());
            let result = if given_up {
                let failing = tower::service_fn(move |_req: http::Request<Full<Bytes>>| async {
                    let outcome = Outcome::parse(
                        http::StatusCode::TOO_MANY_REQUESTS,
                        &http::HeaderMap::new(),
                        body.as_bytes(),
                        tokio::time::Instant::now(),
                    )
                    .unwrap();
                    // The retry layer's report: three attempts, the last answered so.
                    let report = kling_core::error::Attempts::new(
                        3,
                        false,
                        ApiError::from_outcome(&outcome),
                    );
                    Err::<http::Response<Full<Bytes>>, BoxError>(Box::new(report))
                });
                MetricsLayer::new()
                    .layer(failing)
                    .oneshot(request("POST", "/v1/videos/text2video", "{}", "k"))
                    .await
                    .map(drop)
            } else {
                MetricsLayer::new()
                    .layer(ClassifyLayer::new().layer(answering(429, body)))
                    .oneshot(request("POST", "/v1/videos/text2video", "{}", "k"))
                    .await
                    .map(drop)
            };
            assert_eq!(result.is_err(), given_up);
            let warnings: Vec<_> = capture
                .events()
                .into_iter()
                .filter(|event| event.level == "WARN" && event.target == "kling_metrics")
                .collect();
            assert_eq!(
                warnings.len(),
                1,
                "{code}, given up: {given_up}: {warnings:?}"
            );
            let warning = &warnings[0];
            assert_eq!(warning.field("message"), Some("kling call failed"));
            assert_eq!(
                (
                    warning.field("code"),
                    warning.field("http_status"),
                    warning.field("request_id"),
                ),
                (Some(code), Some("429"), Some(&*format!("r{code}"))),
                "given up: {given_up}: {warning:?}"
            );
            assert!(
                warning
                    .field("kling_message")
                    .is_some_and(|m| !m.is_empty()),
                "{warning:?}"
            );
            // The answer's text is redacted in either path.
            assert!(!capture.all_text().contains("s3cr3t"), "{warning:?}");
        }
    }
}

/// Each way a call ends logs at most one event, as the README says: an error with no Kling
/// answer (a refusal, a transport error) one "kling call failed" with the error and no
/// `code` nor `http_status`; a gateway's page one "kling call failed" with `http_status` alone
/// when a classify step made it an error, else one "kling call answered with no envelope"; a
/// call its caller dropped none (the caller gave up: the metrics say
/// `cancelled`), where the same call left to end logs its answer's one.
#[tokio::test(start_paused = true)]
async fn every_call_logs_at_most_one_event_and_a_dropped_one_none() {
    use std::time::Duration;

    use crate::support::Capture;

    const SLOT_FULL: &str =
        r#"{"code":1303,"message":"parallel task over resource pack limit","request_id":"r1303"}"#;
    let _recording = Recording::start();
    let create = || request("POST", "/v1/videos/text2video", "{}", "k");
    // The events of `kling_metrics` one call logged.
    async fn events_of<F>(call: F) -> Vec<crate::support::Captured>
    where
        F: std::future::Future,
    {
        let capture = Capture::default();
        let _tracing = tracing::subscriber::set_default(capture.clone());
        call.await;
        capture
            .events()
            .into_iter()
            .filter(|event| event.target == "kling_metrics")
            .collect()
    }
    let refused = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
        Err::<http::Response<Full<Bytes>>, BoxError>(Box::new(QueueFull))
    });
    let transport = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
        Err::<http::Response<Full<Bytes>>, BoxError>(Box::new(std::io::Error::other("reset")))
    });
    for (service, text) in [
        (
            MetricsLayer::new().layer(refused).boxed_clone(),
            "queue full",
        ),
        (MetricsLayer::new().layer(transport).boxed_clone(), "reset"),
    ] {
        let events = events_of(service.oneshot(create())).await;
        assert_eq!(events.len(), 1, "{text}: {events:?}");
        let event = &events[0];
        assert_eq!(event.level, "WARN");
        assert_eq!(event.field("message"), Some("kling call failed"));
        assert_eq!(event.field("error"), Some(text));
        assert_eq!(
            (event.field("code"), event.field("http_status")),
            (None, None)
        );
    }
    // A gateway's page: an error over a classify step, an answer without one.
    let gateway = MetricsLayer::new().layer(ClassifyLayer::new().layer(answering(502, "<html>")));
    let events = events_of(gateway.oneshot(create())).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].field("message"), Some("kling call failed"));
    assert_eq!(
        (events[0].field("code"), events[0].field("http_status")),
        (None, Some("502"))
    );
    let gateway = MetricsLayer::new().layer(answering(502, "<html>"));
    let events = events_of(gateway.oneshot(create())).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        events[0].field("message"),
        Some("kling call answered with no envelope")
    );
    // Kling answers a minute after the create is sent.
    let slow = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let response = http::Response::builder()
            .status(429)
            .body(Full::new(Bytes::from_static(SLOT_FULL.as_bytes())))
            .unwrap();
        Ok::<_, BoxError>(response)
    });
    let stack = MetricsLayer::new().layer(ClassifyLayer::new().layer(slow));
    let cut_short = tokio::time::timeout(Duration::from_secs(5), stack.clone().oneshot(create()));
    let events = events_of(async { assert!(cut_short.await.is_err()) }).await;
    assert!(events.is_empty(), "{events:?}");
    let events = events_of(stack.oneshot(create())).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].field("code"), Some("1303"));
}
