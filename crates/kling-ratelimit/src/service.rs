//! The [`Gcra`] service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use kling_core::{AccountId, BoxError, PeekBody, Recognized};
use tower_service::Service;

use crate::backend::{Backend, BucketKey, InProcess};
use crate::future::ResponseFuture;
use crate::layer::Shared;

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
    shared: Arc<Shared<Bk>>,
}

impl<S, Bk> Gcra<S, Bk> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<Bk>>) -> Self {
        Gcra { inner, shared }
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
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, Bk: fmt::Debug> fmt::Debug for Gcra<S, Bk> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gcra")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .finish()
    }
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
        let by_class = !self.shared.classes.is_empty();
        // The kind, when classes need it, is read with the account: one lookup where a layer
        // above recognised the request (the stack's case).
        let (account, cached_kind) = match &self.shared.key_fn {
            Some(key_fn) => {
                let (parts, body) = request.into_parts();
                let account = key_fn(&parts);
                request = Request::from_parts(parts, body);
                (account, None)
            }
            None if by_class => {
                let (recognized, account) = Recognized::cached_with_account(&request);
                (
                    account.cloned(),
                    recognized.map(|recognized| recognized.kind),
                )
            }
            None => (AccountId::of(&request).cloned(), None),
        };
        let class_key = if !by_class {
            None
        } else {
            let kind = match cached_kind {
                Some(kind) => kind,
                None => Recognized::of(&mut request).kind,
            };
            self.shared
                .classes
                .iter()
                .any(|(k, _)| *k == kind)
                .then(|| BucketKey::class(account.clone(), kind))
        };
        ResponseFuture::new(
            Arc::clone(&self.shared),
            BucketKey::account(account),
            class_key,
            &mut self.inner,
            request,
        )
    }
}
