//! [`DrainLayer`]: graceful drain — stop admitting new creates, let what is in flight finish,
//! then return.
//!
//! While the gate is open every request passes, counted in flight until its response future
//! completes or is dropped. [`DrainHandle::drain`] closes the gate: from then on a create fails
//! at once with [`Draining`] (it is never sent), while queries, lists and every request already
//! in flight go on; `drain` returns once nothing is in flight. Tasks being followed count too:
//! a [`Follower`](crate::follow::Follower) given the handle
//! ([`with_drain`](crate::follow::Follower::with_drain)) holds a [`DrainGuard`] for each
//! `follow`, so a drain waits for the tasks it follows to end (their queries still pass).
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use kling_tower::drain::DrainLayer;
//! use kling_tower::error::Draining;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), kling_core::BoxError> {
//! let client = service_fn(|_req: http::Request<Full<Bytes>>| async {
//!     Ok::<_, kling_core::BoxError>(http::Response::new(Full::new(Bytes::new())))
//! });
//! let (layer, handle) = DrainLayer::pair();
//! let service = layer.layer(client);
//! handle.drain().await; // nothing in flight: returns at once
//!
//! let create = http::Request::post("/v1/videos/text2video")
//!     .body(Full::new(Bytes::from(r#"{"prompt":"a cat"}"#)))?;
//! let refused = service.clone().oneshot(create).await.unwrap_err();
//! assert!(refused.is::<Draining>());
//! // Queries still pass: a caller may still follow the tasks it created.
//! let query = http::Request::get("/v1/videos/text2video/t1").body(Full::new(Bytes::new()))?;
//! assert!(service.oneshot(query).await.is_ok());
//! # Ok(())
//! # }
//! ```
//!
//! # Position
//!
//! Under the metrics layer (a refused create is counted) and above everything that waits: a
//! create refused here holds no slot, no rate-limit turn and no budget.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use http::{Method, Request};
use kling_core::{BoxError, PeekBody, Recognized};
use pin_project_lite::pin_project;
use tokio::sync::Notify;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::Draining;

#[derive(Debug, Default)]
struct Gate {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

impl Gate {
    fn enter(self: &Arc<Self>) -> DrainGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        DrainGuard { gate: self.clone() }
    }
}

/// Counts one piece of work as in flight until dropped; a drain waits for it.
///
/// From [`DrainHandle::track`]; the [`Drain`] service holds one per request.
pub struct DrainGuard {
    gate: Arc<Gate>,
}

impl fmt::Debug for DrainGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainGuard").finish_non_exhaustive()
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if self.gate.in_flight.fetch_sub(1, Ordering::AcqRel) == 1
            && self.gate.draining.load(Ordering::Acquire)
        {
            self.gate.idle.notify_waiters();
        }
    }
}

/// Closes the gate and waits for what is in flight. See the [module docs](self).
///
/// # Clone
///
/// Clones control the same gate as the [`DrainLayer`] and every service it built.
#[derive(Clone, Debug)]
pub struct DrainHandle {
    gate: Arc<Gate>,
}

impl DrainHandle {
    /// Stops admitting creates, then waits until nothing is in flight (requests, and work
    /// held by [`DrainGuard`]s such as followed tasks).
    ///
    /// Wrap it in `tokio::time::timeout` to bound the wait.
    pub async fn drain(&self) {
        self.gate.draining.store(true, Ordering::Release);
        loop {
            let idle = self.gate.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.gate.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Stops admitting creates without waiting.
    pub fn close(&self) {
        self.gate.draining.store(true, Ordering::Release);
    }

    /// Admits creates again.
    pub fn reopen(&self) {
        self.gate.draining.store(false, Ordering::Release);
    }

    /// Whether creates are refused.
    pub fn is_draining(&self) -> bool {
        self.gate.draining.load(Ordering::Acquire)
    }

    /// Requests and guards in flight now.
    pub fn in_flight(&self) -> usize {
        self.gate.in_flight.load(Ordering::Acquire)
    }

    /// Counts a piece of work (e.g. following a task) as in flight until the guard drops.
    pub fn track(&self) -> DrainGuard {
        self.gate.enter()
    }
}

/// Applies [`Drain`] to a service. See the [module docs](self).
///
/// # Clone
///
/// Clones, the services they build and the [`DrainHandle`] share one gate.
#[derive(Clone, Debug, Default)]
pub struct DrainLayer {
    gate: Arc<Gate>,
}

impl DrainLayer {
    /// An open gate.
    pub fn new() -> Self {
        DrainLayer::default()
    }

    /// An open gate and its handle.
    pub fn pair() -> (DrainLayer, DrainHandle) {
        let layer = DrainLayer::new();
        let handle = layer.handle();
        (layer, handle)
    }

    /// A handle on this gate.
    pub fn handle(&self) -> DrainHandle {
        DrainHandle {
            gate: self.gate.clone(),
        }
    }
}

impl<S> Layer<S> for DrainLayer {
    type Service = Drain<S>;

    fn layer(&self, inner: S) -> Drain<S> {
        Drain {
            inner,
            gate: self.gate.clone(),
        }
    }
}

/// Refuses creates while draining and counts requests in flight. See the [module docs](self).
///
/// # Clone
///
/// Clones share the gate of the [`DrainLayer`] that built them.
#[derive(Clone)]
pub struct Drain<S> {
    inner: S,
    gate: Arc<Gate>,
}

impl<S: fmt::Debug> fmt::Debug for Drain<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drain")
            .field("inner", &self.inner)
            .field("draining", &self.gate.draining.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<S> Drain<S> {
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

impl<S, B> Service<Request<B>> for Drain<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
    B: PeekBody,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if self.gate.draining.load(Ordering::Acquire)
            && request.method() == Method::POST
            && Recognized::of(&mut request).is_create()
        {
            return ResponseFuture {
                state: State::Refused {
                    error: Some(Draining::new(request.uri().path())),
                },
            };
        }
        let guard = self.gate.enter();
        ResponseFuture {
            state: State::Admitted {
                future: self.inner.call(request),
                guard: Some(guard),
            },
        }
    }
}

pin_project! {
    /// The [`Drain`] response future: the inner future with its in-flight guard, or a refused
    /// create.
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Admitted { #[pin] future: F, guard: Option<DrainGuard> },
        Refused { error: Option<Draining> },
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Admitted { future, guard } => {
                let output = ready!(future.poll(cx));
                drop(guard.take());
                Poll::Ready(output.map_err(Into::into))
            }
            StateProj::Refused { error } => Poll::Ready(Err(match error.take() {
                Some(e) => Box::new(e),
                None => "drain future polled after completion".into(),
            })),
        }
    }
}
