//! Mistyped models cannot use up the model pools labelled by name: a model takes one of the
//! places only once an answer shows its pool exists. Its own test binary: the places are
//! counted for the whole process (and shared with the slot gauges).

use std::collections::BTreeSet;

use bytes::Bytes;
use http_body_util::Full;
use kling_core::error::BoxError;
use kling_core::metrics::{MODEL_POOL_LABELS, REQUEST_DURATION, model_pool_label};
use kling_core::{ClassifyLayer, Product};
use kling_metrics::MetricsLayer;
use metrics_util::debugging::DebuggingRecorder;
use tower::{Layer, ServiceExt, service_fn};

const CREATED: &str = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t1","task_status":"submitted"}}"#;
const NOT_FOUND: &str = r#"{"code":1203,"message":"model not found","request_id":"r"}"#;
const INVALID: &str = r#"{"code":1201,"message":"invalid parameter","request_id":"r"}"#;
const THROTTLED: &str = r#"{"code":1302,"message":"too fast","request_id":"r"}"#;

#[tokio::test(start_paused = true)]
async fn mistyped_models_refused_by_kling_or_locally_leave_the_named_places_to_real_ones() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    // Kling knows one model; a path with `refused` never leaves this process.
    let client = service_fn(|req: http::Request<Full<Bytes>>| async move {
        let path = req.uri().path();
        let (status, body) = if path.ends_with("/kling-3.0") {
            (200, CREATED)
        } else if path.ends_with("/kling-2.6") {
            (429, THROTTLED)
        } else if path.contains("refused") {
            return Err::<http::Response<Full<Bytes>>, BoxError>("connection refused".into());
        } else if path.contains("invalid") {
            (400, INVALID)
        } else {
            (404, NOT_FOUND)
        };
        Ok(http::Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap())
    });
    let stack = MetricsLayer::new().layer(ClassifyLayer::new().layer(client));
    let create = |model: String| {
        http::Request::post(format!("/text-to-video/{model}"))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    for n in 0..MODEL_POOL_LABELS {
        for kind in ["mistyped", "invalid", "refused"] {
            let _ = stack.clone().oneshot(create(format!("{kind}-{n}"))).await;
        }
    }
    stack
        .clone()
        .oneshot(create("kling-3.0".into()))
        .await
        .unwrap();
    // A model the task slots gave a place (they do when they grant a create its slots) is
    // labelled by its name here too, though its answer (a 1302) does not show its pool.
    model_pool_label(Product::Video, "kling-2.6");
    let _ = stack.clone().oneshot(create("kling-2.6".into())).await;

    let pools: BTreeSet<(String, String)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == REQUEST_DURATION)
        .map(|(key, ..)| {
            let label = |name: &str| {
                let mut labels = key.key().labels();
                labels.find(|l| l.key() == name).unwrap().value().to_owned()
            };
            (label("pool"), label("status"))
        })
        .collect();
    let expected = [
        ("video:kling-3.0", "200"),
        ("video:kling-2.6", "429"),
        ("video:other", "400"),
        ("video:other", "404"),
        ("video:other", "error"),
    ]
    .into_iter()
    .map(|(pool, status)| (pool.to_owned(), status.to_owned()))
    .collect();
    assert_eq!(pools, expected);
    // The slot gauges read the same table: the real model has its name there too, and the
    // other places are still free.
    assert_eq!(
        model_pool_label(Product::Video, "kling-3.0").0,
        "video:kling-3.0"
    );
    for n in 2..MODEL_POOL_LABELS {
        let (label, at) = model_pool_label(Product::Image, &format!("real-{n}"));
        assert!(at.is_some(), "{label} found no place");
    }
}
