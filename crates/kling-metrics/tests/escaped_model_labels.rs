//! One model is one `pool` label however its path writes its name. Its own test binary: the
//! model pool places are counted for the whole process (another test fills them).

use bytes::Bytes;
use http_body_util::Full;
use kling_core::metrics::{REQUEST_DURATION, pool_label};
use kling_core::{ClassifyLayer, Recognized};
use kling_metrics::MetricsLayer;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::{Layer, ServiceExt, service_fn};

const CREATED: &str = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t-esc","task_status":"submitted"}}"#;

/// A model named with escapes in its path (`kling%2D9.9`) is the model the server reads, and
/// the one kling-core's recognition (which kling-concurrency's pools and slot gauges use)
/// names: its calls are labelled `video:kling-9.9`, as the plain path's and a cached
/// recognition's are.
#[tokio::test(start_paused = true)]
async fn an_escaped_model_is_labelled_as_the_server_and_the_slots_name_it() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let client = service_fn(|_req: http::Request<Full<Bytes>>| async {
        Ok::<_, kling_core::error::BoxError>(http::Response::new(Full::new(Bytes::from_static(
            CREATED.as_bytes(),
        ))))
    });
    let stack = MetricsLayer::new().layer(ClassifyLayer::new().layer(client));
    let create = |path: &str| {
        http::Request::post(path)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    for path in [
        "/text-to-video/kling-9.9",
        "/text-to-video/kling%2D9.9",
        "/text-to-video/kling%2d9%2E9",
    ] {
        stack.clone().oneshot(create(path)).await.unwrap();
    }
    // As the stack's entry caches it for every layer below.
    let mut cached = create("/text-to-video/kling%2D9.9");
    let recognized = Recognized::of(&mut cached).clone();
    assert_eq!(pool_label(recognized.pool.as_ref()), "video:kling-9.9");
    stack.oneshot(cached).await.unwrap();

    let pools: Vec<(String, usize)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == REQUEST_DURATION)
        .map(|(key, _, _, value)| {
            let pool = key.key().labels().find(|l| l.key() == "pool").unwrap();
            let DebugValue::Histogram(samples) = value else {
                panic!("{value:?}")
            };
            (pool.value().to_owned(), samples.len())
        })
        .collect();
    assert_eq!(pools, [("video:kling-9.9".to_owned(), 4)]);
}
