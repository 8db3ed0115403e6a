//! The classify step: read the response body (bounded), parse the envelope once, and attach the
//! [`Outcome`](crate::Outcome) to the response.
//!
//! It sits right above the HTTP client, under the per-attempt timeout, so a stalled body counts
//! against the attempt. Everything above it works on `Response<Full<Bytes>>` and reads the
//! `Outcome` from the extensions instead of parsing again.
//!
//! # Errors
//!
//! The service's error is a [`BoxError`] holding one of:
//! - [`Transport`]: the client failed; it says whether the request
//!   was sent ([`SendState`](crate::error::SendState)), and a body that broke off mid-read
//!   counts as sent;
//! - [`BodyTooLarge`](crate::error::BodyTooLarge): the body passed the limit (it is not read
//!   past it);
//! - [`MalformedResponse`](crate::error::MalformedResponse): not a Kling envelope;
//! - a refusal of a create whose account was halted since its slots were granted (see below);
//! - an error from below passed up as it is when it already says what happened: one of the
//!   three above (a second classify step below, say), or a refusal made before sending (its
//!   source chain names [`RefusedBeforeSending`](crate::error::RefusedBeforeSending): a base
//!   URL refusing another origin), which a retry layer must not take for a connection that
//!   never opened and try again.
//!
//! # Creates of a halted account
//!
//! A create whose signals carry a [`HaltGate`](crate::signals::HaltGate) (a task-slots layer
//! above puts one there when it grants the create's slots) is not sent when its account was
//! halted after a `1102` since the grant and is halted still: the step fails it with the slots
//! layer's refusal (never sent, so not retried, and no task can exist) without calling the
//! client. So a create that waited below the slots, in a rate limiter's queue, while another
//! create's `1102` came back does not go out after it.
//!
//! # Counting what is sent
//!
//! A request whose signals carry a [`SendCounter`] (a metrics layer above puts one there) is
//! counted through it once, at the instant this step passed it to the client, when the step
//! knows it reached Kling or may have: its answer arrived, it failed other than surely unsent,
//! or the step's future was dropped after it was polled (a timeout, a caller that gave up).
//! Below the retry and auth layers, this step sees every request that goes to the wire; put it
//! there (as kling-tower's stack does). A step above a retry layer takes the counter before the
//! retry layer copies the request, so it counts the call's first request only, at the call's
//! start; a layer between the metrics layer and this step that sends a copy of a request
//! without its extensions carries the counter over ([`SendCounter::of`], then
//! [`SendCounter::set`]), or that copy goes uncounted. The outcome it attaches to an answer
//! says whether it counted that answer's request
//! ([`Outcome::counted_as_sent`](crate::Outcome::counted_as_sent)), so that a layer above
//! can tell it from an answer that passed no classify step.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use kling_core::{ClassifyLayer, Code, Outcome};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), kling_core::error::BoxError> {
//! let client = service_fn(|_req: http::Request<Full<Bytes>>| async {
//!     let body = r#"{"code":1303,"message":"parallel task over resource pack limit","request_id":"r1"}"#;
//!     let response = http::Response::builder().status(429).body(Full::new(Bytes::from(body)))?;
//!     Ok::<_, http::Error>(response)
//! });
//! let classify = ClassifyLayer::new().layer(client);
//! let response = classify.oneshot(http::Request::new(Full::new(Bytes::new()))).await?;
//! let outcome = Outcome::of(&response).expect("attached by the classify step");
//! assert_eq!(outcome.code(), Code::ParallelTaskLimit);
//! assert_eq!(outcome.request_id(), Some("r1"));
//! # Ok(())
//! # }
//! ```

pub mod future;

use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::Full;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::{BoxError, Transport};
use crate::signals::SendCounter;

/// The default limit on a response body: Kling answers are small JSON, and a 500-task list page
/// stays well under it.
pub const DEFAULT_MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// Applies [`Classify`] to a service. See the [module docs](self).
#[derive(Clone, Copy, Debug)]
pub struct ClassifyLayer {
    max_body_bytes: usize,
}

impl ClassifyLayer {
    /// A classify layer with the default body limit ([`DEFAULT_MAX_BODY_BYTES`]).
    pub fn new() -> Self {
        ClassifyLayer {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }

    /// Sets the largest response body read; a longer one is an error.
    pub fn max_body_bytes(mut self, limit: usize) -> Self {
        self.max_body_bytes = limit;
        self
    }
}

impl Default for ClassifyLayer {
    fn default() -> Self {
        ClassifyLayer::new()
    }
}

impl<S> Layer<S> for ClassifyLayer {
    type Service = Classify<S>;

    fn layer(&self, inner: S) -> Classify<S> {
        Classify {
            inner,
            max_body_bytes: self.max_body_bytes,
        }
    }
}

/// Reads each response body (bounded) and attaches its [`Outcome`](crate::Outcome).
///
/// See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Classify<S> {
    inner: S,
    max_body_bytes: usize,
}

impl<S> Classify<S> {
    /// Wraps `inner` with the default body limit.
    pub fn new(inner: S) -> Self {
        ClassifyLayer::new().layer(inner)
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

impl<S, ReqB, ResB> Service<Request<ReqB>> for Classify<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Body,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = future::ResponseFuture<S::Future, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Transport::from_below)
    }

    /// Inlined, as it was while it only wrapped the client's future: out of line, the request
    /// and the future are copied through it (four `memcpy`s a request).
    #[inline(always)]
    fn call(&mut self, mut request: Request<ReqB>) -> Self::Future {
        match SendCounter::take_unless_halted(&mut request) {
            Ok(counter) => {
                future::ResponseFuture::new(self.inner.call(request), self.max_body_bytes, counter)
            }
            Err(refusal) => future::ResponseFuture::refused(refusal, self.max_body_bytes),
        }
    }
}
