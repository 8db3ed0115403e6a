//! The [`Retry`] service.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use kling_core::error::BoxError;
use kling_core::signals::Attempt;
use tokio::time::Instant;
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
/// random source; each clone owns a clone of the inner service, and a small handle of its own
/// (one allocation per clone): each call's future counts a reference on its clone's handle, so
/// tasks that each call their own clone never write to one shared count.
///
/// Retries go through a clone of the inner service kept aside at the first call (and shared by
/// clones), so a call that succeeds at once clones no service: a clone per call costs the
/// stack below's reference counts twice, on cache lines every task touches.
pub struct Retry<S, P = KlingPolicy> {
    inner: S,
    handle: Arc<Handle<S, P>>,
}

/// What the calls of one `Retry` clone share: one reference count per call, written only by
/// the task calling that clone (a count every clone shared would move between worker threads'
/// caches on every call and every drop, tens of nanoseconds each).
///
/// Aligned to two cache lines, so that neither that count nor what the calls read here shares
/// a line with another clone's handle or another allocation.
#[repr(align(128))]
pub(crate) struct Handle<S, P> {
    pub(crate) shared: Arc<Shared<P>>,
    /// The service retries are cloned from, kept at the first call of any clone. Behind a
    /// mutex, taken only to clone it, so the future is `Send` whenever `S` is (no `Sync`
    /// needed).
    spare: Arc<OnceLock<Mutex<S>>>,
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
        let handle = Arc::new(Handle {
            shared,
            spare: Arc::new(OnceLock::new()),
        });
        Retry { inner, handle }
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
            handle: Arc::new(Handle {
                shared: Arc::clone(&self.handle.shared),
                spare: Arc::clone(&self.handle.spare),
            }),
        }
    }
}

impl<S: fmt::Debug, P: fmt::Debug> fmt::Debug for Retry<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("config", &self.handle.shared)
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
        let handle = &*self.handle;
        let shared = &*handle.shared;
        let now = Instant::now();
        shared.budget.deposit_at(now);
        let own = shared.deadline.and_then(|d| now.checked_add(d));
        // Deadline and first attempt set before the copy: each retry sets its own anew.
        let deadline = Attempt::begin(&mut request, 1, own);
        let spliced = if shared.generate_external_ids && request.method() == Method::POST {
            lookup::add_generated_id(&mut request, &*shared.rng)
        } else {
            None
        };
        // `poll_ready` readied `self.inner`: it sends the first attempt. A retry sends through a
        // clone of the spare (readied first), kept once for every call.
        if handle.spare.get().is_none() {
            let _ = handle.spare.set(Mutex::new(self.inner.clone()));
        }
        let handle = Arc::clone(&self.handle);
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
    async fn a_call_counts_a_reference_on_its_own_clone_only() {
        let mut service = RetryLayer::builder()
            .seed(3)
            .build()
            .unwrap()
            .layer(NotSync::default());
        let clone = service.clone();
        assert!(!Arc::ptr_eq(&service.handle, &clone.handle));
        assert!(Arc::ptr_eq(&service.handle.shared, &clone.handle.shared));
        assert!(Arc::ptr_eq(&service.handle.spare, &clone.handle.spare));
        let request = Request::get("/v1/videos/text2video/t1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let future = service.ready().await.unwrap().call(request);
        assert_eq!(Arc::strong_count(&service.handle), 2, "the future's");
        assert_eq!(Arc::strong_count(&clone.handle), 1, "untouched");
        // The spare kept by the first call serves the clone's retries too.
        assert!(clone.handle.spare.get().is_some());
        future.await.unwrap();
        assert_eq!(Arc::strong_count(&service.handle), 1);
    }

    #[test]
    fn the_future_is_one_pointer_and_the_shared_count_has_its_own_lines() {
        let mut service = RetryLayer::new().layer(NotSync::default());
        let future = service.call(Request::new(Full::new(Bytes::new())));
        assert_unpin(&future);
        assert_eq!(std::mem::size_of_val(&future), std::mem::size_of::<usize>());
        // The `Arc`'s counts sit before the handle, 128 bytes (two cache lines) away.
        assert!(std::mem::align_of::<Handle<NotSync, KlingPolicy>>() >= 128);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_goes_through_the_spare_and_the_future_needs_no_sync_service() {
        let inner = NotSync::default();
        let calls = Arc::clone(&inner.calls);
        let mut service = RetryLayer::builder().seed(3).build().unwrap().layer(inner);
        let clone = service.clone();
        assert!(clone.handle.spare.get().is_none(), "kept at the first call");
        let request = Request::get("/v1/videos/text2video/t1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let future = service.ready().await.unwrap().call(request);
        assert_send(&future);
        assert!(clone.handle.spare.get().is_some(), "shared by clones");
        let response = future.await.unwrap();
        assert!(Outcome::of(&response).unwrap().is_success());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
