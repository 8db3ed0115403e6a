//! Metrics, tracing spans and an in-process usage snapshot for kling-tower: see usage, queues
//! and every 429 before users notice.
//!
//! [`MetricsLayer`] goes outermost in the stack. Per logical call it records, through the
//! [`metrics`] facade (no exporter forced on you), a duration histogram named after
//! OpenTelemetry's `http.client.request.duration` (Prometheus-safe:
//! `http_client_request_duration_seconds`) labelled with request kind, pool, HTTP status and
//! Kling code and a counter of responses by code; it opens a `tracing` span with the kind, pool,
//! attempt, task id and Kling `request_id` (never a header, token or key). Its [`Monitor`]
//! keeps the usage picture in process: requests over the last minute against your quota, 429s
//! by code, created, finished and failed tasks, plus whatever the
//! rate limiter and slots layers report through [`SnapshotSource`]; it warns
//! (`tracing::warn!` and an optional hook) once each time usage passes a threshold (80%).
//!
//! The other layers record their own events (retries, budget, cooldowns, waits, slots) under
//! the names in [`kling_core::metrics`]; the README's table — also readable as data through
//! [`catalog`] — lists every metric, its type, labels, meaning and recording layer.
//!
//! ```
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use kling_core::ClassifyLayer;
//! use kling_metrics::{MetricsLayer, Monitor};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), kling_core::error::BoxError> {
//! // A client that always answers Kling's "parallel tasks over the limit".
//! let client = service_fn(|_req: http::Request<Full<Bytes>>| async {
//!     let body = r#"{"code":1303,"message":"parallel task over resource pack limit","request_id":"r1"}"#;
//!     http::Response::builder().status(429).body(Full::new(Bytes::from(body)))
//! });
//! let monitor = Monitor::builder()
//!     .rate_quota(60, Duration::from_secs(60)) // the Pro tier
//!     .build()?;
//! let stack = MetricsLayer::with_monitor(monitor.clone())
//!     .layer(ClassifyLayer::new().layer(client));
//!
//! let create = http::Request::post("/v1/videos/text2video")
//!     .body(Full::new(Bytes::from(r#"{"prompt":"a cat"}"#)))?;
//! let response = stack.oneshot(create).await?;
//! assert_eq!(response.status(), 429);
//!
//! let snapshot = monitor.snapshot();
//! assert_eq!(snapshot.rejections_of(1303), 1);
//! assert_eq!(snapshot.rate.requests, 1);
//! assert_eq!(snapshot.rate.percent().map(f64::round), Some(2.0)); // 1 of 60 per minute
//! # Ok(())
//! # }
//! ```
//!
//! # Recorders
//!
//! With no recorder installed the layer records nothing and skips the work only labels need
//! (it still keeps the [`Monitor`]'s usage and task counts). With the global recorder it
//! registers the duration histogram and response counter of each label combination once and
//! keeps the handles. A thread-local recorder (`metrics::with_local_recorder`, as in tests)
//! gets each call's metrics registered on it, as the facade's macros do. A global recorder
//! installed after the layer was built is used from the next call on (its first calls register
//! on each call, then the handles are kept); a call already in flight when it is installed is
//! not recorded. The facade's own no-op is told apart by its having no size, its histograms
//! never asking for their value, and its being a static: a zero-sized global recorder whose
//! histograms are no-ops (one forwarding only counters) sits in the box
//! `metrics::set_global_recorder` made for it, not in a static, and its counters are recorded.
//!
//! # Feature flags
//!
//! | feature | default | what it does |
//! |---|---|---|
//! | `prometheus` | no | the `prometheus` module: a recorder with the stack's buckets, `render`, and a `GET /metrics` `tower::Service` (no listener of its own) |
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88.

pub mod buckets;
pub mod catalog;
pub mod error;
pub mod future;
mod labels;
mod layer;
mod monitor;
#[cfg(feature = "prometheus")]
pub mod prometheus;
mod recorder;
mod route;
mod service;
mod snapshot;

pub use layer::MetricsLayer;
pub use monitor::{
    DEFAULT_HYSTERESIS, DEFAULT_MAX_TRACKED_TASKS, DEFAULT_TASK_LEASE, DEFAULT_USAGE_THRESHOLD,
    Monitor, MonitorBuilder,
};
pub use service::Metrics;
pub use snapshot::{
    PoolUsage, QueueDepth, RateUsage, Refresh, Resource, Snapshot, SnapshotSource, TaskCounts,
    UsageWarning,
};
