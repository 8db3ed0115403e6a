//! A global recorder installed after the layer was built, and after calls went through with no
//! recorder at all, records every later call exactly once: the first ones through a
//! registration per call, then through handles registered once. Its own test binary: a global
//! recorder is for the whole process.

use bytes::Bytes;
use http_body_util::Full;
use kling_core::ClassifyLayer;
use kling_core::error::BoxError;
use kling_core::metrics::{REQUEST_DURATION, RESPONSES};
use kling_metrics::MetricsLayer;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tower::{Layer, ServiceExt, service_fn};

const OK: &str = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":null}"#;

/// The responses counted and durations recorded since the last snapshot.
fn recorded(snapshotter: &Snapshotter) -> (u64, usize) {
    let (mut responses, mut durations) = (0, 0);
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        match (key.key().name(), value) {
            (RESPONSES, DebugValue::Counter(n)) => responses += n,
            (REQUEST_DURATION, DebugValue::Histogram(samples)) => durations += samples.len(),
            _ => {}
        }
    }
    (responses, durations)
}

#[tokio::test]
async fn a_recorder_installed_later_records_every_later_call_once() -> Result<(), BoxError> {
    let client = service_fn(|_req: http::Request<Full<Bytes>>| async {
        Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from_static(
            OK.as_bytes(),
        ))))
    });
    let stack = MetricsLayer::new().layer(ClassifyLayer::new().layer(client));
    let query = || {
        http::Request::get("/v1/videos/text2video/1")
            .body(Full::new(Bytes::new()))
            .expect("a request")
    };
    for _ in 0..3 {
        stack.clone().oneshot(query()).await?;
    }
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install()?;
    // A snapshot takes what the debugging recorder holds: the counts are summed here.
    let (mut responses, mut durations) = (0, 0);
    for n in 1..=50 {
        stack.clone().oneshot(query()).await?;
        let (counted, taken) = recorded(&snapshotter);
        responses += counted;
        durations += taken;
        assert_eq!((responses, durations), (n, n as usize), "call {n}");
    }
    Ok(())
}
