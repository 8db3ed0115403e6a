//! The Prometheus helper: the stack's buckets, descriptions, and the `/metrics` service.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use kling_core::ClassifyLayer;
use kling_metrics::prometheus::{self, CONTENT_TYPE_TEXT, MetricsEndpoint};
use kling_metrics::{MetricsLayer, Monitor, PoolUsage, Snapshot, catalog};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tower::{Layer, ServiceExt};

use crate::support::{answering, request};

async fn body_text(response: http::Response<Full<Bytes>>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_prometheus_recorder_renders_the_stack_buckets_and_descriptions() {
    let recorder = prometheus::builder().build_recorder();
    let endpoint = MetricsEndpoint::new(recorder.handle());
    let _guard = metrics::set_default_local_recorder(&recorder);
    catalog::describe();

    let ok = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t","task_status":"submitted"}}"#;
    MetricsLayer::new()
        .layer(ClassifyLayer::new().layer(answering(200, ok)))
        .oneshot(request("POST", "/v1/videos/text2video", "{}", "k"))
        .await
        .unwrap();

    let text = endpoint.render();
    let series = r#"kind="create",pool="video",status="200",code="0""#;
    for le in ["0.005", "1", "600", "+Inf"] {
        let line = format!("http_client_request_duration_seconds_bucket{{{series},le=\"{le}\"}} 1");
        assert!(text.contains(&line), "no `{line}` in:\n{text}");
    }
    assert!(text.contains("# TYPE http_client_request_duration_seconds histogram"));
    assert!(text.contains(r#"kling_responses_total{kind="create",code="0"} 1"#));
    let help = catalog::find(kling_core::metrics::RESPONSES)
        .unwrap()
        .meaning;
    assert!(
        text.contains(&format!("# HELP kling_responses_total {help}")),
        "{text}"
    );
}

#[tokio::test]
async fn the_endpoint_answers_get_and_head_and_refuses_other_methods() {
    let recorder = prometheus::builder().build_recorder();
    metrics::with_local_recorder(&recorder, || {
        metrics::gauge!(kling_core::metrics::SLOTS_IN_USE, "account" => "a", "pool" => "video")
            .set(3.0);
    });
    let scrapes = Arc::new(AtomicUsize::new(0));
    let monitor = Monitor::default();
    let counted = scrapes.clone();
    monitor.add_source(move |s: &mut Snapshot| {
        counted.fetch_add(1, Ordering::Relaxed);
        s.pools.push(PoolUsage::new("video", 3, 5, 0));
    });
    let endpoint = MetricsEndpoint::new(recorder.handle()).with_monitor(monitor);

    let get = endpoint
        .clone()
        .oneshot(http::Request::get("/metrics").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(get.status(), 200);
    assert_eq!(get.headers()["content-type"], CONTENT_TYPE_TEXT);
    assert!(
        body_text(get)
            .await
            .contains(r#"kling_slots_in_use{account="a",pool="video"} 3"#)
    );
    assert_eq!(
        scrapes.load(Ordering::Relaxed),
        1,
        "a scrape takes a snapshot"
    );

    let head = endpoint
        .clone()
        .oneshot(http::Request::head("/metrics").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert!(body_text(head).await.is_empty());

    let post = endpoint
        .oneshot(http::Request::post("/metrics").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(post.status(), 405);
    assert_eq!(post.headers()["allow"], "GET, HEAD");
}
