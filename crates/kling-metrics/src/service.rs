//! [`Metrics`]: the service.

use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use kling_core::error::BoxError;
use kling_core::signals::Attempt;
use kling_core::{PeekBody, RequestKind};
use tokio::time::Instant;
use tower_service::Service;
use tracing::field::Empty;

use crate::future::ResponseFuture;
use crate::recorder::{self, Target};
use crate::route;
use crate::{Monitor, labels};

/// Measures each call and reports it through the `metrics` facade, a `tracing` span and its
/// [`Monitor`]. See [`MetricsLayer`](crate::MetricsLayer) and the crate docs.
///
/// Only passes through: it never changes a request or a response. Its error is the inner
/// error as a [`BoxError`] (the stack's error type), so it can read a Kling code out of an
/// error that carries a [`kling_core::error::ApiError`].
///
/// # Clone
///
/// Clones share the [`Monitor`].
#[derive(Clone, Debug)]
pub struct Metrics<S> {
    inner: S,
    monitor: Monitor,
}

impl<S> Metrics<S> {
    /// Wraps `inner`, reporting to `monitor`.
    pub fn new(inner: S, monitor: Monitor) -> Self {
        Metrics { inner, monitor }
    }

    /// The monitor.
    pub fn monitor(&self) -> &Monitor {
        &self.monitor
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for Metrics<S>
where
    S: Service<Request<B>, Response = Response<Full<Bytes>>>,
    S::Error: Into<BoxError>,
    B: PeekBody,
{
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The call's only clock read when a classify step timed the response (its arrival is
        // the call's end, see `ResponseFuture`).
        let start = Instant::now();
        let target = recorder::target();
        // The kind and pool from the path (or a cached recognition): no allocation, and the
        // layers below recognise the request when they need more. Only what tracks tasks when
        // nothing records the labels: whether it is a create (always a POST).
        let labelled = target != Target::Nothing
            || self.monitor.records_task_metrics()
            || tracing::level_enabled!(tracing::Level::INFO);
        let (kind, pool) = if labelled {
            let (kind, pool) = route::of(&request);
            (kind, labels::pool(pool))
        } else if request.method() == Method::POST {
            (route::kind_of_post(&request), labels::NO_POOL)
        } else {
            (RequestKind::Other, labels::NO_POOL)
        };
        // Only what the request *is*: never its headers, URI query or body. The field values
        // are only computed when the span is enabled.
        let span = tracing::info_span!(
            target: "kling_metrics",
            "kling.request",
            kind = kind.as_str(),
            pool = (!pool.as_str().is_empty()).then(|| display(pool.as_str())),
            attempt = Attempt::of(&request),
            status = Empty,
            code = Empty,
            request_id = Empty,
            task_id = Empty,
            wait_rate_limit_s = Empty,
            wait_slots_s = Empty,
        );
        self.monitor.note_requests(start, 1);
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        ResponseFuture::new(
            future,
            span,
            start,
            kind,
            pool,
            self.monitor.clone(),
            target,
        )
    }
}
