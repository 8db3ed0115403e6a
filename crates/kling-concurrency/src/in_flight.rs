//! [`InFlightLayer`]: a plain FIFO limit on HTTP requests in flight, shared by every service it
//! makes and their clones.
//!
//! This is not how Kling counts (see [`TaskSlotsLayer`](crate::TaskSlotsLayer)); it is for users
//! who also want to bound open connections or requests. It is tower's
//! [`ConcurrencyLimit`] over one shared, fair (FIFO) tokio
//! semaphore: capacity is reserved in `poll_ready`, moved into the future by `call` and given
//! back when the response future completes or is dropped; a clone starts unreserved. Unlike
//! tower's `ConcurrencyLimitLayer`, every service this layer makes draws from the same limit.
//!
//! ```
//! use kling_concurrency::InFlightLayer;
//! use tower::{Layer, Service, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let layer = InFlightLayer::new(2).unwrap();
//! let echo = service_fn(|x: u32| async move { Ok::<_, std::convert::Infallible>(x) });
//! let mut a = layer.layer(echo);
//! let mut b = layer.layer(echo);
//! let fa = a.ready().await.unwrap().call(1);
//! let fb = b.ready().await.unwrap().call(2);
//! assert_eq!(layer.in_flight(), 2);
//! assert_eq!(fa.await.unwrap() + fb.await.unwrap(), 3);
//! assert_eq!(layer.in_flight(), 0);
//! # }
//! ```

use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
use tower::limit::ConcurrencyLimit;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::ConfigError;

/// Applies [`InFlight`] to services; every service it makes shares one limit. See the
/// [module docs](self).
///
/// # Clone
///
/// Clones share the limit (one semaphore behind an `Arc`).
#[derive(Clone, Debug)]
pub struct InFlightLayer {
    semaphore: Arc<Semaphore>,
    max: usize,
}

impl InFlightLayer {
    /// At most `max` requests in flight at once, across every service made by this layer.
    pub fn new(max: usize) -> Result<Self, ConfigError> {
        if max == 0 {
            return Err(ConfigError::new("max_in_flight", "must be at least 1"));
        }
        if max > Semaphore::MAX_PERMITS {
            return Err(ConfigError::new("max_in_flight", "is too large"));
        }
        Ok(InFlightLayer {
            semaphore: Arc::new(Semaphore::new(max)),
            max,
        })
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Requests in flight (or reserved by a ready service) now.
    pub fn in_flight(&self) -> usize {
        self.max - self.semaphore.available_permits()
    }
}

impl<S> Layer<S> for InFlightLayer {
    type Service = InFlight<S>;

    fn layer(&self, inner: S) -> InFlight<S> {
        InFlight {
            inner: ConcurrencyLimit::with_semaphore(inner, self.semaphore.clone()),
        }
    }
}

/// Limits requests in flight; see [`InFlightLayer`].
///
/// # Clone
///
/// Clones share the limit and start without a reservation.
#[derive(Clone, Debug)]
pub struct InFlight<S> {
    inner: ConcurrencyLimit<S>,
}

impl<S> InFlight<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        self.inner.get_mut()
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner.into_inner()
    }
}

impl<S, Request> Service<Request> for InFlight<S>
where
    S: Service<Request>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tower::limit::concurrency::future::ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        self.inner.call(request)
    }
}
