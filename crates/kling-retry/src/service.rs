//! The [`Retry`] service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use kling_core::error::BoxError;
use kling_core::signals::{Attempt, Deadline};
use tokio::time::Instant;
use tower_service::Service;

use crate::body::ReplayBody;
use crate::future::ResponseFuture;
use crate::layer::{RetryLayer, Shared};
use crate::lookup;
use crate::policy::{KlingPolicy, Policy};
use crate::template::Template;

/// Retries a Kling request by its [`Outcome`](kling_core::Outcome). See the [crate docs](crate).
///
/// # Clone
///
/// Clones share the layer's configuration, its [`RetryBudget`](crate::RetryBudget) and its
/// random source; each clone owns a clone of the inner service.
pub struct Retry<S, P = KlingPolicy> {
    inner: S,
    shared: Arc<Shared<P>>,
}

impl<S> Retry<S> {
    /// Wraps `inner` with the default [`RetryLayer`].
    pub fn new(inner: S) -> Self {
        tower_layer::Layer::layer(&RetryLayer::new(), inner)
    }
}

impl<S, P> Retry<S, P> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<P>>) -> Self {
        Retry { inner, shared }
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

impl<S: Clone, P> Clone for Retry<S, P> {
    fn clone(&self) -> Self {
        Retry {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, P: fmt::Debug> fmt::Debug for Retry<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("config", &self.shared)
            .finish()
    }
}

impl<S, B, P> Service<Request<B>> for Retry<S, P>
where
    S: Service<Request<B>, Response = Response<Full<Bytes>>> + Clone,
    S::Error: Into<BoxError>,
    B: ReplayBody,
    P: Policy,
{
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, P>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let shared = &*self.shared;
        let now = Instant::now();
        shared.budget.deposit_at(now);
        let own = shared.deadline.and_then(|d| now.checked_add(d));
        let deadline = match (Deadline::of(&request), own) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if shared.generate_external_ids && request.method() == Method::POST {
            lookup::add_generated_id(&mut request, &*shared.rng);
        }
        let template = Template::new(&request);
        if let Some(deadline) = deadline {
            Deadline::set(&mut request, deadline);
        }
        Attempt::set(&mut request, 1);
        // `poll_ready` readied `self.inner`: it sends the first attempt, and the future keeps a
        // clone (readied again before any retry) instead of swapping the two.
        let service = self.inner.clone();
        ResponseFuture::new(
            self.inner.call(request),
            service,
            template,
            Arc::clone(&self.shared),
            now,
            deadline,
        )
    }
}

/// A copy of a request to send again (the body clones cheaply, see [`ReplayBody`]).
pub(crate) fn clone_request<B: Clone>(request: &Request<B>) -> Request<B> {
    let mut copy = Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    copy
}
