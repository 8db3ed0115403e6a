//! A zero-sized global recorder whose gauges and histograms are no-ops (a forwarder that keeps
//! only counters, in statics) is not taken for the facade's no-op: every call's response is
//! counted. Its own test binary: a global recorder is for the whole process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use kling_core::ClassifyLayer;
use kling_core::error::BoxError;
use kling_core::metrics::RESPONSES;
use kling_metrics::MetricsLayer;
use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use tower::{Layer, ServiceExt, service_fn};

const OK: &str = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":null}"#;

/// Responses counted by the recorder below.
static RESPONSES_SEEN: AtomicU64 = AtomicU64::new(0);

/// Adds to [`RESPONSES_SEEN`].
struct ResponsesSeen;

impl CounterFn for ResponsesSeen {
    fn increment(&self, value: u64) {
        RESPONSES_SEEN.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, _value: u64) {}
}

/// A recorder of no size that keeps only the responses counter.
struct CountersOnly;

impl Recorder for CountersOnly {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() == RESPONSES {
            Counter::from_arc(Arc::new(ResponsesSeen))
        } else {
            Counter::noop()
        }
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[tokio::test]
async fn a_zero_sized_global_recorder_with_no_op_histograms_counts_every_response()
-> Result<(), BoxError> {
    assert_eq!(std::mem::size_of::<CountersOnly>(), 0);
    metrics::set_global_recorder(CountersOnly)?;
    let client = service_fn(|_req: http::Request<Full<Bytes>>| async {
        Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from_static(
            OK.as_bytes(),
        ))))
    });
    let stack = MetricsLayer::new().layer(ClassifyLayer::new().layer(client));
    for n in 1..=10 {
        let query = http::Request::get("/v1/videos/text2video/1").body(Full::new(Bytes::new()))?;
        stack.clone().oneshot(query).await?;
        assert_eq!(RESPONSES_SEEN.load(Ordering::Relaxed), n, "call {n}");
    }
    Ok(())
}
