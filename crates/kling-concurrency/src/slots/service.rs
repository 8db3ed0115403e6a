//! [`TaskSlots`].

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use kling_core::error::BoxError;
use kling_core::lanes::Lanes;
use kling_core::signals::{CreateHalts, HaltGate, SendWatch};
use kling_core::{ApiGeneration, PeekBody, Pool, PoolScope, Recognized, RequestKind};
use tokio::time::Instant;
use tower_service::Service;

use super::future::{Held, ResponseFuture, Waiting, attempt_watch};
use super::layer::Settings;
use crate::backend::{CreatePath, InProcess, SlotBackend, SlotKey};
use crate::id::SmallId;

/// Holds a create until its pool has slots for it, keeps the slots for the task's server-side
/// life, and releases them when a query, list, callback or lease says the task ended.
///
/// Queries and lists pass through, and the tasks their responses report update the slots;
/// everything else passes through untouched. See the [module docs](crate::slots).
///
/// # Clone
///
/// Clones share the backend (every slot, lease, halt and capacity) and clone the inner service.
/// A response future references its thread's lane of the backend ([`kling_core::lanes`]), so
/// the threads of a runtime never write one shared reference count per request.
pub struct TaskSlots<S, B = InProcess> {
    inner: S,
    /// The backend, one copy per lane: a response future references its thread's.
    backend: Arc<Lanes<B>>,
    /// The backend's halts ([`SlotBackend::create_halts`]), one copy per lane: each create's
    /// [`HaltGate`] references its thread's.
    halts: Option<Arc<Lanes<Arc<CreateHalts>>>>,
    settings: Arc<Settings>,
}

impl<S: Clone, B: Clone> Clone for TaskSlots<S, B> {
    fn clone(&self) -> Self {
        TaskSlots {
            inner: self.inner.clone(),
            backend: Arc::clone(&self.backend),
            halts: self.halts.clone(),
            settings: self.settings.clone(),
        }
    }
}

impl<S: fmt::Debug, B: fmt::Debug> fmt::Debug for TaskSlots<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskSlots")
            .field("inner", &self.inner)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl<S, B: SlotBackend> TaskSlots<S, B> {
    pub(crate) fn new(inner: S, backend: B, settings: Arc<Settings>) -> Self {
        TaskSlots {
            inner,
            halts: backend
                .create_halts()
                .map(|halts| Arc::new(Lanes::new(halts))),
            backend: Arc::new(Lanes::new(backend)),
            settings,
        }
    }
}

impl<S: Clone, B> TaskSlots<S, B> {
    /// Gives back what the inner service reserved below in `poll_ready` (an in-flight bound's
    /// place), for a create `call` does not hand to it: the service is replaced by a clone,
    /// which starts unreserved (the next call readies it again, as tower asks anyway). Kept
    /// until the next call instead, the place would be held by a service nobody may call
    /// again, and could be the one a waiting create needs once granted: a caller awaiting
    /// that create would wait for good.
    fn unready(&mut self) {
        let fresh = self.inner.clone();
        drop(std::mem::replace(&mut self.inner, fresh));
    }
}

impl<S, B> TaskSlots<S, B> {
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

/// What `call` does with a request, read from its recognition (owned, so the request is free
/// again).
enum Route {
    Create {
        weight: u32,
        pool: Pool,
        external: Option<SmallId>,
        new_style: bool,
    },
    Query {
        /// Whether a "not found" can mean a create held under an external id never happened.
        by_external: bool,
        new_style: bool,
    },
    List {
        new_style: bool,
    },
    Other,
}

impl Route {
    fn of(recognized: &Recognized, scope: PoolScope) -> Self {
        let new_style = recognized.generation == Some(ApiGeneration::New);
        match (recognized.kind, &recognized.pool) {
            (RequestKind::Create, Some(pool)) => Route::Create {
                weight: recognized.weight.max(1),
                pool: scope.apply(pool.clone()),
                external: recognized.external_id.as_deref().map(SmallId::new),
                new_style,
            },
            (RequestKind::Query, _) => Route::Query {
                by_external: recognized.generation == Some(ApiGeneration::Legacy)
                    || !recognized.external_ids.is_empty(),
                new_style,
            },
            (RequestKind::List, _) => Route::List { new_style },
            _ => Route::Other,
        }
    }
}

/// The create path a create with an external id is sent to (where its external id is
/// unique: see [`CreatePath`]); none is needed for one without (nothing finds it by an
/// external id).
pub(crate) fn create_path(new_style: bool, external: bool, path: &str) -> CreatePath {
    match (external, new_style) {
        (false, _) => CreatePath::UNKNOWN,
        (true, true) => CreatePath::NEW_STYLE,
        (true, false) => CreatePath::legacy(path),
    }
}

impl<S, B, ReqB> Service<Request<ReqB>> for TaskSlots<S, B>
where
    S: Service<Request<ReqB>, Response = Response<Full<Bytes>>> + Clone,
    S::Error: Into<BoxError>,
    B: SlotBackend,
    ReqB: PeekBody,
{
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ReqB, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Nothing is reserved here: how many slots a create needs, and where, depends on the
        // request; the wait happens in the response future.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<ReqB>) -> Self::Future {
        // One lookup when a layer above recognised the request already (the stack's case).
        // The account is read with it (one lookup for both): a create's slots are the
        // account's, and a query's reports find external ids within it.
        let read_account;
        let (route, account) = match Recognized::cached_with_account(&request) {
            (Some(recognized), account) => {
                (Route::of(recognized, self.settings.pool_scope), account)
            }
            (None, account) => {
                // Copied out before the request is recognised (a copy for an interned account,
                // such as the stack's), rather than looked up again after.
                read_account = account.cloned();
                let route = Route::of(Recognized::of(&mut request), self.settings.pool_scope);
                (route, read_account.as_ref())
            }
        };
        // (Cloned where it is kept: a copy, not a reference count, for an interned account,
        // such as the stack's and the configured default.)
        let account = account.unwrap_or(&self.settings.default_account);
        let (weight, pool, external, new_style) = match route {
            Route::Create {
                weight,
                pool,
                external,
                new_style,
            } => (weight, pool, external, new_style),
            Route::Query {
                by_external,
                new_style,
            } => {
                // A lookup by external id (the retry layer's, before it sends a create again)
                // that finds nothing gives back what is held under that id: keep what it asked
                // (a reference count) where a "not found" can mean that.
                let asked = by_external
                    .then(|| request.uri().path_and_query().cloned())
                    .flatten();
                let account = account.clone();
                let path = if new_style {
                    CreatePath::NEW_STYLE
                } else {
                    CreatePath::UNKNOWN
                };
                return ResponseFuture::observe(
                    self.inner.call(request),
                    self.backend.lane(),
                    self.settings.lease,
                    asked,
                    account,
                    (path, false),
                );
            }
            Route::List { new_style } => {
                let account = account.clone();
                // A legacy list (`GET {create path}?pageNum=…`) is of its path's tasks only:
                // one it names by external id is no other path's create.
                let path = if new_style {
                    CreatePath::NEW_STYLE
                } else {
                    CreatePath::legacy(request.uri().path())
                };
                return ResponseFuture::observe(
                    self.inner.call(request),
                    self.backend.lane(),
                    self.settings.lease,
                    None,
                    account,
                    (path, true),
                );
            }
            Route::Other => return ResponseFuture::pass(self.inner.call(request)),
        };
        let path = create_path(new_style, external.is_some(), request.uri().path());
        // Stamped before the grant: a halt of the account after it, while a layer below holds
        // the create back, has the classify step refuse the create unsent.
        let gate = self
            .halts
            .as_ref()
            .map(|halts| HaltGate::new(halts.lane(), account.clone()));
        // The fast path: free slots and nobody ahead are granted here, so the create goes
        // straight to the service that was made ready; no waker is needed (a create that waits
        // is polled again with the caller's).
        match self
            .backend
            .get()
            .acquire_now(SlotKey::new(account.clone(), pool), weight)
        {
            Ok(Ok(reservation)) => {
                // The grant is plain data: should the service below panic in `call`, no future
                // was made to send the create, and its slots go back rather than be lost.
                let mut unwinding = GiveBackOnUnwind {
                    backend: self.backend.get(),
                    reservation: Some(reservation),
                };
                // Read if the caller drops the create: a layer below (the rate limiter) that
                // holds it back unsent says so here, and its slots then go back.
                let watch = attempt_watch(&mut request, false, gate);
                let future = self.inner.call(request);
                let reservation = unwinding.reservation.take().expect("taken once");
                ResponseFuture::create(
                    future,
                    Held {
                        reservation,
                        backend: self.backend.lane(),
                        lease: self.settings.lease,
                        external,
                        path,
                        waited: Duration::ZERO,
                        watch,
                    },
                )
            }
            Ok(Err(error)) => {
                self.unready();
                ResponseFuture::failed(error.into_box())
            }
            Err(acquire) => {
                // Held back unsent: a layer above that reserved something for the create (the
                // spend guard's estimate) gives it back if the caller drops it here. (This
                // layer's own watch is made once the slots are granted: a waiter's bookkeeping
                // stays as small as it was.)
                SendWatch::held(&request);
                // The gate waits in the request's signals, not beside it.
                if let Some(gate) = gate {
                    HaltGate::set(&mut request, gate);
                }
                // The create waits with a clone of the inner service, unreserved, and readies
                // it once granted; what the service `poll_ready` readied reserved below is
                // given back now, as it may be the very place the create needs then.
                self.unready();
                ResponseFuture::wait(Box::new(Waiting {
                    acquire,
                    inner: Some(self.inner.clone()),
                    request: Some(request),
                    backend: self.backend.lane(),
                    lease: self.settings.lease,
                    sleep: None,
                    since: Instant::now(),
                    scope: self.settings.pool_scope,
                }))
            }
        }
    }
}

/// Gives a grant back when dropped still holding it: while the service below's `call` runs
/// (a panic there unwinds through it).
struct GiveBackOnUnwind<'a, B: SlotBackend> {
    backend: &'a B,
    reservation: Option<crate::backend::Reservation>,
}

impl<B: SlotBackend> Drop for GiveBackOnUnwind<'_, B> {
    fn drop(&mut self) {
        if let Some(reservation) = self.reservation.take() {
            drop(
                self.backend
                    .apply_unread(crate::backend::SlotOp::GiveBack(reservation)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use http_body_util::Full;
    use tower::{Layer, ServiceExt, service_fn};

    use super::*;
    use crate::{SlotsConfig, TaskSlotsLayer};

    /// A create answered with a new task each time.
    fn server() -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl Send,
    > + Clone {
        let next = Arc::new(AtomicU32::new(0));
        service_fn(move |_: Request<Full<Bytes>>| {
            let id = next.fetch_add(1, Ordering::SeqCst);
            let body = format!(
                r#"{{"code":0,"message":"SUCCEED","request_id":"r","data":{{"task_id":"t{id}","task_status":"submitted"}}}}"#
            );
            std::future::ready(Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(
                body,
            )))))
        })
    }

    fn create() -> Request<Full<Bytes>> {
        Request::post("/v1/videos/text2video")
            .body(Full::new(Bytes::from_static(br#"{"prompt":"a cat"}"#)))
            .unwrap()
    }

    async fn send<S>(svc: &mut TaskSlots<S>)
    where
        S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>> + Clone,
        S::Error: Into<BoxError>,
    {
        svc.ready().await.unwrap().call(create()).await.unwrap();
    }

    /// Clones share the backend's lanes (no allocation per clone), a pending create counts a
    /// reference on its thread's lane only, and every clone counts in the same slots.
    #[tokio::test]
    async fn clones_share_the_lanes_and_the_slots() {
        let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap();
        let mut first = layer.layer(server());
        let mut clone = first.clone();
        assert!(Arc::ptr_eq(&first.backend, &clone.backend));
        let lane = first.backend.lane();
        let before = Arc::strong_count(&lane);
        let pending = clone.ready().await.unwrap().call(create());
        assert_eq!(Arc::strong_count(&lane), before + 1, "the future's");
        pending.await.unwrap();
        assert_eq!(Arc::strong_count(&lane), before, "settled");
        let mut grandchild = clone.clone();
        send(&mut clone).await;
        send(&mut first).await;
        send(&mut grandchild).await;
        send(&mut first).await;
        let snapshot = handle.snapshot().await.unwrap();
        let pool = &snapshot.pools()[0];
        assert_eq!(
            (pool.in_use, pool.tasks),
            (5, 5),
            "one backend for every clone"
        );
        // Full: a sixth create waits, whichever clone sends it.
        let mut sixth = tokio_test::task::spawn(grandchild.ready().await.unwrap().call(create()));
        assert!(sixth.poll().is_pending());
    }
}
