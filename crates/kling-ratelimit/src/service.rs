//! The [`Gcra`] service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use kling_core::{AccountId, BoxError, PeekBody, Recognized, RequestKind};
use tower_service::Service;

use crate::backend::{Backend, BucketKey, InProcess};
use crate::future::{Direct, ResponseFuture};
use crate::layer::{Lane, Lanes, Mode, Shared, shared_of};

/// Paces requests by GCRA per key, waiting (FIFO) or rejecting. See the [crate docs](crate).
///
/// `poll_ready` only asks the inner service: the wait depends on the request's key, so it
/// happens in the response future, which then calls the inner service that was made ready.
///
/// # Clone
///
/// Clones share the limiter (quotas, queues, cooldowns, adaptive state, backend) with each
/// other and with the [`GcraLayer`](crate::GcraLayer) they came from; the inner service is
/// cloned.
pub struct Gcra<S, Bk = InProcess> {
    inner: S,
    lanes: Arc<Lanes<Bk>>,
}

impl<S, Bk> Gcra<S, Bk> {
    pub(crate) fn from_lanes(inner: S, lanes: Arc<Lanes<Bk>>) -> Self {
        Gcra { inner, lanes }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming this one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, Bk> Clone for Gcra<S, Bk> {
    fn clone(&self) -> Self {
        Gcra {
            inner: self.inner.clone(),
            lanes: Arc::clone(&self.lanes),
        }
    }
}

impl<S: fmt::Debug, Bk: fmt::Debug> fmt::Debug for Gcra<S, Bk> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gcra")
            .field("inner", &self.inner)
            .field("shared", self.lanes.get())
            .finish()
    }
}

/// Decides and calls: directly when nothing queues (the class gate first, when the request
/// has one, then the account's), else through the gate. A macro rather than a function: the
/// request and the inner future stay in `call`'s frame instead of being copied into a callee's
/// arguments (callgrind on `kling-bench profile GcraLayer 20000`: two ~250-byte copies per
/// request this way, three with an inlined function, four before).
macro_rules! respond {
    ($gcra:expr, $lane:expr, $account_key:expr, $class_key:expr, $request:expr) => {{
        let (gcra, lane) = ($gcra, $lane);
        let (account_key, mut class_key) = ($account_key, $class_key);
        let shared = &**shared_of(&lane);
        let mut pending = None;
        // Reject mode: the class's turn and the account's at once, or neither, where the
        // backend can (an answer still to come is the account gate's).
        if shared.mode == Mode::Reject
            && let Some(key) = &class_key
            && let Some(both) =
                ResponseFuture::<S, B, Bk>::direct_class_and_account(shared, key, &account_key)
        {
            match both {
                Direct::Admitted(sent_at) => {
                    return ResponseFuture::calling(
                        lane,
                        account_key,
                        sent_at,
                        gcra.inner.call($request),
                    );
                }
                Direct::Failed(error) => {
                    return ResponseFuture::failed(lane, account_key, error);
                }
                Direct::Gate(answer) => {
                    pending = answer;
                    class_key = None;
                }
            }
        }
        if pending.is_none() && (shared.mode == Mode::Reject || shared.queues.is_idle()) {
            // A class admitted here has passed its gate: the account's is asked next, directly
            // or (on any other answer) through the gate without the class.
            if let Some(key) = &class_key {
                let policy = shared.policy_for(key);
                match ResponseFuture::<S, B, Bk>::direct(shared, key, &policy) {
                    // Sent through the gate while its class keeps a record of its sends (one
                    // went late): the gate holds the send until the class quota allows it.
                    // (One atomic read while no class keeps one; else a look at its own.)
                    Direct::Admitted(at)
                        if shared.queues.keeps_class_sends()
                            && shared.queues.class_sends_running(key, policy.quota, at) =>
                    {
                        return ResponseFuture::gated(
                            lane,
                            account_key,
                            None,
                            None,
                            &mut gcra.inner,
                            $request,
                        );
                    }
                    Direct::Admitted(_) => class_key = None,
                    Direct::Failed(error) => {
                        return ResponseFuture::failed(lane, account_key, error);
                    }
                    Direct::Gate(answer) => pending = answer,
                }
            }
            if class_key.is_none() {
                match ResponseFuture::<S, B, Bk>::direct(
                    shared,
                    &account_key,
                    &shared.account_policy(),
                ) {
                    Direct::Admitted(sent_at) => {
                        return ResponseFuture::calling(
                            lane,
                            account_key,
                            sent_at,
                            gcra.inner.call($request),
                        );
                    }
                    Direct::Failed(error) => {
                        return ResponseFuture::failed(lane, account_key, error);
                    }
                    Direct::Gate(answer) => pending = answer,
                }
            }
        }
        ResponseFuture::gated(
            lane,
            account_key,
            class_key,
            pending,
            &mut gcra.inner,
            $request,
        )
    }};
}

impl<S, B, Bk> Service<Request<B>> for Gcra<S, Bk>
where
    S: Service<Request<B>, Response = Response<Full<Bytes>>> + Clone,
    S::Error: Into<BoxError>,
    B: PeekBody,
    Bk: Backend,
{
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, Bk>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // The thread's lane, taken once: the future holds it, and the shared state is read
        // through it (each `Lanes::get` is a thread-local lookup).
        let lane = self.lanes.lane();
        let shared = &**shared_of(&lane);
        if shared.key_fn.is_some() {
            return self.call_with_key_fn(lane, request);
        }
        let account_key;
        let class_key;
        if shared.classes.is_empty() {
            account_key = BucketKey::account(AccountId::of(&request).cloned());
            class_key = None;
        } else {
            // The kind is read with the account: one lookup where a layer above recognised
            // the request (the stack's case).
            let (recognized, account) = Recognized::cached_with_account(&request);
            let (account, cached_kind) = (account.cloned(), recognized.map(|r| r.kind));
            class_key = class_key_of(shared, &account, cached_kind, &mut request);
            account_key = BucketKey::account(account);
        }
        respond!(self, lane, account_key, class_key, request)
    }
}

/// The class key of a request of `account`, when its kind has a class quota.
fn class_key_of<B: PeekBody, Bk>(
    shared: &Shared<Bk>,
    account: &Option<AccountId>,
    cached_kind: Option<RequestKind>,
    request: &mut Request<B>,
) -> Option<BucketKey> {
    let classes = &shared.classes;
    if classes.is_empty() {
        return None;
    }
    let kind = match cached_kind {
        Some(kind) => kind,
        None => Recognized::of(request).kind,
    };
    classes
        .iter()
        .any(|(k, _)| *k == kind)
        .then(|| BucketKey::class(account.clone(), kind))
}

impl<S, Bk> Gcra<S, Bk> {
    /// [`Service::call`] with a key function: out of the usual path, so that taking the
    /// request apart and back together costs the usual path no copy of it.
    #[inline(never)]
    fn call_with_key_fn<B>(
        &mut self,
        lane: Arc<Lane<Bk>>,
        request: Request<B>,
    ) -> ResponseFuture<S, B, Bk>
    where
        S: Service<Request<B>, Response = Response<Full<Bytes>>> + Clone,
        S::Error: Into<BoxError>,
        B: PeekBody,
        Bk: Backend,
    {
        let shared = &**shared_of(&lane);
        let key_fn = shared.key_fn.as_ref().expect("called with a key fn");
        let (parts, body) = request.into_parts();
        let account = key_fn(&parts);
        let mut request = Request::from_parts(parts, body);
        let class_key = class_key_of(shared, &account, None, &mut request);
        respond!(self, lane, BucketKey::account(account), class_key, request)
    }
}
