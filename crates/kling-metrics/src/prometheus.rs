//! Prometheus exposition: a recorder with the stack's buckets, a render function and a small
//! `tower::Service` answering `GET` with the text format, to mount at `/metrics` (feature
//! `prometheus`).
//!
//! No HTTP listener of its own: mount [`MetricsEndpoint`] in the app's router (axum:
//! `Router::new().route_service("/metrics", endpoint)`), or call [`MetricsEndpoint::render`].
//!
//! ```
//! use http_body_util::BodyExt;
//! use kling_metrics::prometheus;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // `prometheus::install()` installs it globally; a local recorder keeps this example contained.
//! let recorder = prometheus::builder().build_recorder();
//! let endpoint = prometheus::MetricsEndpoint::new(recorder.handle());
//! metrics::with_local_recorder(&recorder, || {
//!     metrics::counter!(kling_core::metrics::RESPONSES, "kind" => "create", "code" => "1303")
//!         .increment(1);
//! });
//!
//! let request = http::Request::get("/metrics").body(()).unwrap();
//! let response = endpoint.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), 200);
//! let text = response.into_body().collect().await.unwrap().to_bytes();
//! let text = std::str::from_utf8(&text).unwrap();
//! assert!(text.contains(r#"kling_responses_total{kind="create",code="1303"} 1"#));
//! # }
//! ```

use std::convert::Infallible;
use std::fmt;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use kling_core::metrics as names;
use tower_service::Service;

pub use metrics_exporter_prometheus::{
    BuildError, Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::{Monitor, buckets, catalog};

/// The content type of the Prometheus text exposition format.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A [`PrometheusBuilder`] with the stack's histogram buckets ([`crate::buckets`]).
///
/// Add global labels or other settings, then `install_recorder()` or `build_recorder()`.
pub fn builder() -> PrometheusBuilder {
    let with = |builder: PrometheusBuilder, name: &str, values: &[f64]| {
        builder
            .set_buckets_for_metric(Matcher::Full(name.to_owned()), values)
            .expect("the bucket lists are not empty")
    };
    let builder = with(
        PrometheusBuilder::new(),
        names::REQUEST_DURATION,
        buckets::REQUEST_DURATION,
    );
    let builder = with(builder, names::RATELIMIT_WAIT, buckets::WAIT);
    let builder = with(builder, names::SLOTS_WAIT, buckets::WAIT);
    with(builder, names::TASK_LIFETIME, buckets::TASK_LIFETIME)
}

/// Installs the [`builder`]'s recorder as the global `metrics` recorder, registers every
/// metric's description ([`catalog::describe`]), and returns the endpoint that renders it.
///
/// Fails if a global recorder is already installed.
///
/// Histograms are drained on each render; a process that is never scraped should call
/// [`PrometheusHandle::run_upkeep`] now and then.
pub fn install() -> Result<MetricsEndpoint, BuildError> {
    let handle = builder().install_recorder()?;
    catalog::describe();
    Ok(MetricsEndpoint::new(handle))
}

/// Answers `GET` (and `HEAD`) with the Prometheus text format, `405` otherwise; mount it at
/// `/metrics`. It answers whatever path it is mounted at.
///
/// With [`MetricsEndpoint::with_monitor`], each scrape also takes a [`Monitor::snapshot`], so
/// pool usage warnings are checked at least as often as Prometheus scrapes.
///
/// # Clone
///
/// Clones render the same recorder (the handle is shared).
#[derive(Clone)]
pub struct MetricsEndpoint {
    handle: PrometheusHandle,
    monitor: Option<Monitor>,
}

impl fmt::Debug for MetricsEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsEndpoint")
            .field("monitor", &self.monitor)
            .finish_non_exhaustive()
    }
}

impl MetricsEndpoint {
    /// An endpoint rendering `handle`'s recorder.
    pub fn new(handle: PrometheusHandle) -> Self {
        MetricsEndpoint {
            handle,
            monitor: None,
        }
    }

    /// Checks `monitor`'s usage on every scrape.
    pub fn with_monitor(mut self, monitor: Monitor) -> Self {
        self.monitor = Some(monitor);
        self
    }

    /// The handle of the recorder.
    pub fn handle(&self) -> &PrometheusHandle {
        &self.handle
    }

    /// The exposition text, as served.
    pub fn render(&self) -> String {
        if let Some(monitor) = &self.monitor {
            monitor.snapshot();
        }
        self.handle.render()
    }
}

impl<B> Service<Request<B>> for MetricsEndpoint {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Full<Bytes>>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let method = request.method();
        let mut response = if method == Method::GET || method == Method::HEAD {
            let body = if method == Method::GET {
                Bytes::from(self.render())
            } else {
                Bytes::new()
            };
            let mut response = Response::new(Full::new(body));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_TEXT));
            response
        } else {
            let mut response = Response::new(Full::new(Bytes::from_static(
                b"method not allowed: use GET\n",
            )));
            *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            response
        };
        response.headers_mut().insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        ready(Ok(response))
    }
}
