//! [`AttemptTimeoutLayer`]: a per-attempt timeout whose timer is armed only when the attempt
//! actually waits.
//!
//! tower's `Timeout` builds a `Sleep` for every call (a clock read, a runtime-handle clone, a
//! timer entry to tear down); an attempt answered at once — a cache, an in-memory client, a
//! mock — never needs one. This layer polls the attempt first and arms the timer on the first
//! poll that finds it pending, so the time counts from that poll (the stack's layers poll an
//! attempt in the same step that sends it). A late attempt fails with tower's own
//! [`Elapsed`], so code that recognises tower's timeout keeps
//! working.
//!
//! ```
//! use std::time::Duration;
//! use kling_tower::timeout::AttemptTimeoutLayer;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let stalled = service_fn(|_: ()| std::future::pending::<Result<(), std::convert::Infallible>>());
//! let service = AttemptTimeoutLayer::new(Duration::from_secs(30)).layer(stalled);
//! let error = service.oneshot(()).await.unwrap_err();
//! assert!(error.is::<tower::timeout::error::Elapsed>());
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use kling_core::BoxError;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::timeout::error::Elapsed;
use tower_layer::Layer;
use tower_service::Service;

/// Fails an attempt that takes longer than a timeout; see the [module docs](self).
#[derive(Clone, Copy, Debug)]
pub struct AttemptTimeoutLayer {
    timeout: Duration,
}

impl AttemptTimeoutLayer {
    /// A layer failing attempts still pending `timeout` after their first poll.
    pub fn new(timeout: Duration) -> Self {
        AttemptTimeoutLayer { timeout }
    }
}

impl<S> Layer<S> for AttemptTimeoutLayer {
    type Service = AttemptTimeout<S>;

    fn layer(&self, inner: S) -> AttemptTimeout<S> {
        AttemptTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The service [`AttemptTimeoutLayer`] builds.
#[derive(Clone, Debug)]
pub struct AttemptTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> AttemptTimeout<S> {
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

impl<S, R> Service<R> for AttemptTimeout<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(request),
            sleep: None,
            timeout: self.timeout,
        }
    }
}

pin_project! {
    /// The [`AttemptTimeout`] response future.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // Armed on the first pending poll; boxed, so the future of an attempt answered at once
        // is small for the layers above to move.
        sleep: Option<Pin<Box<Sleep>>>,
        timeout: Duration,
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        let timeout = *this.timeout;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Box::new(Elapsed::new()))),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::time::Instant;
    use tower::{ServiceExt, service_fn};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_ready_attempt_passes_and_a_slow_one_times_out_from_its_first_poll() {
        let calls = Arc::new(AtomicU32::new(0));
        let counter = Arc::clone(&calls);
        let service = AttemptTimeoutLayer::new(Duration::from_secs(5)).layer(service_fn(
            move |delay: u64| {
                counter.fetch_add(1, Ordering::Relaxed);
                async move {
                    tokio::time::sleep(Duration::from_secs(delay)).await;
                    Ok::<_, BoxError>(delay)
                }
            },
        ));
        assert_eq!(service.clone().oneshot(0).await.unwrap(), 0);
        assert_eq!(service.clone().oneshot(4).await.unwrap(), 4);
        let start = Instant::now();
        let error = service.clone().oneshot(6).await.unwrap_err();
        assert!(error.is::<Elapsed>(), "{error}");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(calls.load(Ordering::Relaxed), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_inner_error_passes_through() {
        let service = AttemptTimeoutLayer::new(Duration::from_secs(5))
            .layer(service_fn(|_: ()| async { Err::<(), _>("refused") }));
        let error = service.oneshot(()).await.unwrap_err();
        assert_eq!(error.to_string(), "refused");
    }
}
