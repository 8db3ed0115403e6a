//! The [`Retry`] service.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use kling_core::call_clock;
use kling_core::error::BoxError;
use kling_core::lanes::Lanes;
use kling_core::signals::Attempt;
use tower_service::Service;

use crate::body::ReplayBody;
use crate::future::ResponseFuture;
use crate::layer::{RetryLayer, Shared};
use crate::lookup;
use crate::policy::{KlingPolicy, Policy};

/// Retries a Kling request by its [`Outcome`](kling_core::Outcome). See the [crate docs](crate).
///
/// # Clone
///
/// Clones share the layer's configuration, its [`RetryBudget`](crate::RetryBudget) and its
/// random source; each clone owns a clone of the inner service. Each call's future counts a
/// reference on its thread's lane ([`kling_core::lanes`]), so the threads of a runtime never
/// write one shared count per call.
///
/// Retries go through a clone of the inner service kept aside at the first call (and shared by
/// clones), so a call that succeeds at once clones no service: a clone per call costs the
/// stack below's reference counts twice, on cache lines every task touches.
pub struct Retry<S, P = KlingPolicy> {
    inner: S,
    lanes: Arc<Lanes<Handle<S, P>>>,
}

/// What every call of a `Retry` and its clones reads, held once per lane: a future's reference
/// count is its thread's lane's (a count every call shared would move between worker threads'
/// caches on every call and every drop, tens of nanoseconds each).
pub(crate) struct Handle<S, P> {
    pub(crate) shared: Arc<Shared<P>>,
    /// The service retries are cloned from, kept at the first call of any clone. Behind a
    /// mutex, taken only to clone it, so the future is `Send` whenever `S` is (no `Sync`
    /// needed).
    spare: Arc<OnceLock<Mutex<S>>>,
}

impl<S, P> Clone for Handle<S, P> {
    fn clone(&self) -> Self {
        Handle {
            shared: Arc::clone(&self.shared),
            spare: Arc::clone(&self.spare),
        }
    }
}

impl<S: Clone, P> Handle<S, P> {
    /// A service for a retry: a clone of the spare.
    pub(crate) fn service(&self) -> S {
        let spare = self
            .spare
            .get()
            .expect("the first call kept a spare service");
        spare.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl<S> Retry<S> {
    /// Wraps `inner` with the default [`RetryLayer`].
    pub fn new(inner: S) -> Self {
        tower_layer::Layer::layer(&RetryLayer::new(), inner)
    }
}

impl<S, P> Retry<S, P> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<P>>) -> Self {
        let lanes = Arc::new(Lanes::new(Handle {
            shared,
            spare: Arc::new(OnceLock::new()),
        }));
        Retry { inner, lanes }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    ///
    /// Retries go through a clone of the service taken at the first call: a change made here
    /// after that reaches first attempts only.
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
            lanes: Arc::clone(&self.lanes),
        }
    }
}

impl<S: fmt::Debug, P: fmt::Debug> fmt::Debug for Retry<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("config", &self.lanes.get().shared)
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
        // The call's clock reading, shared with the layers above and below (`call_clock`).
        let (now, _scope) = call_clock::enter();
        // The future's reference, on this thread's lane (one thread-local read serves both).
        let handle = self.lanes.lane();
        let shared = &*handle.shared;
        shared.budget.deposit_at(now);
        let own = shared.deadline.and_then(|d| now.checked_add(d));
        // Deadline and first attempt set before the copy: each retry sets its own anew.
        let deadline = Attempt::begin(&mut request, 1, own);
        let spliced = if shared.generate_external_ids && request.method() == Method::POST {
            lookup::add_generated_id(&mut request, &*shared.ids)
        } else {
            None
        };
        // `poll_ready` readied `self.inner`: it sends the first attempt. A retry sends through a
        // clone of the spare (readied first), kept once for every call.
        if handle.spare.get().is_none() {
            let _ = handle.spare.set(Mutex::new(self.inner.clone()));
        }
        // A create given an id the caller never saw is watched (the template copies the watch
        // with the signals), so that a call dropped while its first attempt is out knows
        // whether a layer below still held it back unsent (and warns, naming the id, only when
        // not). A layer above (metrics) has usually put one there already.
        if spliced.is_some() {
            kling_core::signals::SendWatch::ensure(&mut request);
        }
        let prepared = ResponseFuture::prepare(handle, &request, now, deadline, spliced);
        ResponseFuture::send(prepared, self.inner.call(request))
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

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::convert::Infallible;
    use std::future::{Ready, ready};

    use kling_core::Outcome;
    use tokio::time::Instant;
    use tower::ServiceExt;
    use tower_layer::Layer;

    use super::*;

    /// A service that may move between threads but not be shared by them (as tower's
    /// `BoxCloneService` is), answering a 1302 first and a success after.
    #[derive(Clone, Default)]
    struct NotSync {
        calls: Arc<std::sync::atomic::AtomicUsize>,
        _not_sync: Cell<()>,
    }

    impl Service<Request<Full<Bytes>>> for NotSync {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
            let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let body = if n == 0 {
                r#"{"code":1302,"message":"too fast","request_id":"r0"}"#
            } else {
                r#"{"code":0,"message":"SUCCEED","request_id":"r1","data":{}}"#
            };
            ready(Ok(Response::new(Full::new(Bytes::from_static(
                body.as_bytes(),
            )))))
        }
    }

    fn assert_send<T: Send>(_: &T) {}

    fn assert_unpin<T: Unpin>(_: &T) {}

    #[tokio::test(start_paused = true)]
    async fn a_call_counts_a_reference_on_its_threads_lane_only() {
        let mut service = RetryLayer::builder()
            .seed(3)
            .build()
            .unwrap()
            .layer(NotSync::default());
        let clone = service.clone();
        assert!(
            Arc::ptr_eq(&service.lanes, &clone.lanes),
            "clones share lanes"
        );
        let lane = service.lanes.lane();
        let before = Arc::strong_count(&lane);
        let request = Request::get("/v1/videos/text2video/t1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let future = service.ready().await.unwrap().call(request);
        assert_eq!(Arc::strong_count(&lane), before + 1, "the future's");
        // The spare kept by the first call serves the clone's retries too.
        assert!(clone.lanes.get().spare.get().is_some());
        future.await.unwrap();
        assert_eq!(Arc::strong_count(&lane), before);
    }

    #[test]
    fn the_future_is_one_pointer() {
        let mut service = RetryLayer::new().layer(NotSync::default());
        let future = service.call(Request::new(Full::new(Bytes::new())));
        assert_unpin(&future);
        assert_eq!(std::mem::size_of_val(&future), std::mem::size_of::<usize>());
    }

    /// Records the deadline each request reaches the service with, answering a success.
    #[derive(Clone, Default)]
    struct Deadlines(Arc<Mutex<Vec<Option<Instant>>>>);

    impl Service<Request<Full<Bytes>>> for Deadlines {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
            let deadline = kling_core::signals::Deadline::of(&request);
            self.0.lock().unwrap().push(deadline);
            ready(Ok(Response::new(Full::new(Bytes::from_static(
                br#"{"code":0,"message":"SUCCEED","request_id":"r1","data":{}}"#,
            )))))
        }
    }

    /// Real time (not paused): the clock moves while the calling layer works.
    #[tokio::test]
    async fn a_call_inside_another_layers_call_counts_its_deadline_from_that_reading() {
        let total = std::time::Duration::from_secs(60);
        let seen = Deadlines::default();
        let mut service = RetryLayer::builder()
            .deadline(total)
            .build()
            .unwrap()
            .layer(seen.clone());
        let request = || {
            Request::get("/v1/videos/text2video/t1")
                .body(Full::new(Bytes::new()))
                .unwrap()
        };
        // A layer above read the clock, then worked 5 ms before calling this one.
        service.ready().await.unwrap();
        let (above, future) = call_clock::scoped(|above| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            (above, service.call(request()))
        });
        future.await.unwrap();
        // Called on its own, it reads the clock itself: 5 ms of work before count.
        service.ready().await.unwrap();
        let before = Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(5));
        service.call(request()).await.unwrap();
        let seen = seen.0.lock().unwrap().clone();
        assert_eq!(seen[0], Some(above + total), "the enclosing call's reading");
        assert!(seen[1].unwrap() >= before + total + std::time::Duration::from_millis(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_goes_through_the_spare_and_the_future_needs_no_sync_service() {
        let inner = NotSync::default();
        let calls = Arc::clone(&inner.calls);
        let mut service = RetryLayer::builder().seed(3).build().unwrap().layer(inner);
        let clone = service.clone();
        assert!(
            clone.lanes.get().spare.get().is_none(),
            "kept at the first call"
        );
        let request = Request::get("/v1/videos/text2video/t1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let future = service.ready().await.unwrap().call(request);
        assert_send(&future);
        assert!(clone.lanes.get().spare.get().is_some(), "shared by clones");
        let response = future.await.unwrap();
        assert!(Outcome::of(&response).unwrap().is_success());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
