//! Once every model pool label is given, the layer labels a model's calls as the slot gauges
//! label its pool (`kling_core::metrics::pool_label`): by name when the model has a place,
//! `{product}:other` when not. Its own test binary: the places are counted for the whole
//! process.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use kling_core::metrics::{MODEL_POOL_LABELS, REQUEST_DURATION, pool_label};
use kling_core::{ClassifyLayer, Pool, Product};
use kling_metrics::MetricsLayer;
use metrics_util::debugging::DebuggingRecorder;
use tower::{Layer, ServiceExt, service_fn};

const CREATED: &str = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t1","task_status":"submitted"}}"#;
const RATE_LIMITED: &str = r#"{"code":1302,"message":"rate limit","request_id":"r"}"#;

/// The label the task slots give a video model's pool when they grant it slots.
fn slot_label(model: &str) -> &'static str {
    pool_label(Some(&Pool::with_model(Product::Video, Arc::from(model))))
}

/// A create for `model`.
fn create(model: &str) -> http::Request<Full<Bytes>> {
    http::Request::post(format!("/text-to-video/{model}"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn past_the_named_model_pools_a_model_is_labelled_as_the_slot_gauges_label_it() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    // The task slots label a model's pool when they grant a create its slots, before this
    // layer sees an answer: here they give every place but the last.
    for n in 0..MODEL_POOL_LABELS - 1 {
        assert_eq!(
            slot_label(&format!("slots-{n}")),
            format!("video:slots-{n}")
        );
    }
    // Kling accepts every create but those of `slots-4`, `slots-5` and `busy`, answered 1302
    // (which shows no pool), `slots-5` after a second.
    let client = service_fn(|req: http::Request<Full<Bytes>>| async move {
        let model = req.uri().path().rsplit('/').next().unwrap().to_owned();
        if model == "slots-5" {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let (status, body) = match model.as_str() {
            "slots-4" | "slots-5" | "busy" => (429, RATE_LIMITED),
            _ => (200, CREATED),
        };
        Ok::<_, kling_core::error::BoxError>(
            http::Response::builder()
                .status(status)
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap(),
        )
    });
    let stack = MetricsLayer::new().layer(ClassifyLayer::new().layer(client));
    // A call to a model the slots named, answered once this layer has found the table full.
    let waiting = tokio::spawn(stack.clone().oneshot(create("slots-5")));
    tokio::task::yield_now().await;
    // An accepted model takes the last place: this layer finds the table full.
    stack.clone().oneshot(create("last")).await.unwrap();
    assert_eq!(slot_label("past"), "video:other");
    waiting.await.unwrap().unwrap();
    // Models the slots named, answered with a code that shows no pool, and accepted; then
    // models with no place.
    for model in ["slots-4", "slots-3", "slots-3", "past", "busy"] {
        stack.clone().oneshot(create(model)).await.unwrap();
    }

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
    let expected: BTreeSet<(String, String)> = [
        ("last", "200"),
        ("slots-5", "429"),
        ("slots-4", "429"),
        ("slots-3", "200"),
        ("past", "200"),
        ("busy", "429"),
    ]
    .into_iter()
    .map(|(model, status)| (slot_label(model).to_owned(), status.to_owned()))
    .collect();
    assert_eq!(pools, expected);
    assert_eq!(expected.len(), 6, "{expected:?}");
    assert!(expected.contains(&("video:other".to_owned(), "429".to_owned())));
}
