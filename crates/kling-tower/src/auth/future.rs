//! The [`Auth`](super::Auth) response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use kling_core::headers::HeaderCopy;
use kling_core::signals::ExtensionsCopy;
use kling_core::{BoxError, Code, Disposition, Outcome};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::{Shared, TokenDropped};

/// What a second attempt needs: the request as first sent, a clone of the inner service and
/// the token generation the server refused.
pub(crate) struct Retry<S, B> {
    /// Method, URI, version and body.
    request: Request<B>,
    /// The headers, until the resend puts them back: a few are copied without allocating, on
    /// every JWT request.
    headers: Option<HeaderCopy>,
    service: S,
    shared: Arc<Shared>,
    generation: u64,
    /// The request's extensions as the first attempt carried them, for the resend: its
    /// signals alone when they are all it holds (no allocation; the stack's usual case), else
    /// a copy of the map. The layers below read them as for the first attempt: a metrics
    /// layer's send counter (the server counts the resend against the rate), the create's
    /// send watch and halt gate (a create whose account was halted since its slots were
    /// granted is not sent again), the deadline.
    extensions: ExtensionsCopy,
}

impl<S, B: Clone> Retry<S, B> {
    /// A copy of `request` (method, URI, version, headers, body and extensions), filled in
    /// place in its box.
    pub(crate) fn new(
        request: &Request<B>,
        service: S,
        shared: Arc<Shared>,
        generation: u64,
    ) -> Box<Self> {
        let mut retry = Box::new(Retry {
            request: Request::new(request.body().clone()),
            headers: Some(HeaderCopy::of(request.headers())),
            service,
            shared,
            generation,
            extensions: ExtensionsCopy::of(request.extensions()),
        });
        let copy = &mut retry.request;
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        retry
    }
}

impl<S, B> Retry<S, B> {
    /// Puts the headers back, with `authorization` in place of the refused token.
    fn restore(&mut self, authorization: HeaderValue) {
        if let Some(headers) = self.headers.take() {
            *self.request.headers_mut() = headers.into_map();
        }
        self.request
            .headers_mut()
            .insert(AUTHORIZATION, authorization);
    }
}

/// What a refusal (1003/1004) leads to.
pub(crate) enum Refusal<S, B> {
    /// Nothing: an API key cannot be refreshed.
    Pass,
    /// Sign afresh and send the attempt once more. Boxed: only a JWT that this layer resends
    /// needs it, and the future stays small for the layers above to move.
    Resend(Box<Retry<S, B>>),
    /// Drop the refused token and mark the response [`TokenDropped`]; a retry layer above
    /// resends.
    Drop {
        owner: super::local::Owner,
        generation: u64,
    },
}

pin_project! {
    /// Sends the attempt; on 1003/1004 with a JWT, signs a fresh token and sends it once more
    /// (or leaves the resend to a retry layer above).
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future>,
        refusal: Refusal<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Failed { error: Option<BoxError> },
        First { #[pin] future: F },
        AwaitReady,
        Second { #[pin] future: F },
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn new(future: S::Future, refusal: Refusal<S, B>) -> Self {
        ResponseFuture {
            state: State::First { future },
            refusal,
        }
    }

    pub(crate) fn failed(error: BoxError) -> Self {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
            refusal: Refusal::Pass,
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("can_resign", &matches!(self.refusal, Refusal::Resend(_)))
            .field(
                "drops_refused_token",
                &matches!(self.refusal, Refusal::Drop { .. }),
            )
            .finish_non_exhaustive()
    }
}

impl<S, B> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<Full<Bytes>>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<Full<Bytes>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Failed { error } => {
                    let error = error
                        .take()
                        .unwrap_or_else(|| "polled after completion".into());
                    return Poll::Ready(Err(error));
                }
                StateProj::First { future } => {
                    // An API key's attempt: the inner answer as it comes, not moved through
                    // the refusal check.
                    if let Refusal::Pass = this.refusal {
                        return future.poll(cx).map_err(Into::into);
                    }
                    let mut response = ready!(future.poll(cx)).map_err(Into::into)?;
                    let retry = match this.refusal {
                        Refusal::Pass => return Poll::Ready(Ok(response)),
                        Refusal::Resend(retry) => retry,
                        Refusal::Drop { owner, generation } => {
                            if let Some(early) = refused(&mut response) {
                                // Gone with its layer: no cache left to drop the token from.
                                if let Some(shared) = owner.upgrade() {
                                    shared.invalidate(*generation, early);
                                }
                                response.extensions_mut().insert(TokenDropped);
                            }
                            return Poll::Ready(Ok(response));
                        }
                    };
                    let Some(early) = refused(&mut response) else {
                        return Poll::Ready(Ok(response));
                    };
                    let (header, _) = retry
                        .shared
                        .resign(retry.generation, early)
                        .map_err(|e| Box::new(e) as BoxError)?;
                    retry.restore(header);
                    this.state.set(State::AwaitReady);
                }
                StateProj::AwaitReady => {
                    let Refusal::Resend(retry) = this.refusal else {
                        this.state.set(State::Failed { error: None });
                        continue;
                    };
                    ready!(retry.service.poll_ready(cx)).map_err(Into::into)?;
                    let Refusal::Resend(retry) = std::mem::replace(this.refusal, Refusal::Pass)
                    else {
                        continue;
                    };
                    let Retry {
                        mut service,
                        mut request,
                        extensions,
                        ..
                    } = *retry;
                    extensions.restore_into(&mut request);
                    let future = service.call(request);
                    this.state.set(State::Second { future });
                }
                StateProj::Second { future } => {
                    return future.poll(cx).map_err(Into::into);
                }
            }
        }
    }
}

/// Whether the server refused the token (1003/1004), and if so whether as not yet valid
/// (1003). Read in place when a classify step attached the outcome (no clone of it: a
/// reference count), else parsed and attached.
fn refused(response: &mut Response<Full<Bytes>>) -> Option<bool> {
    let judge = |outcome: &Outcome| {
        (outcome.disposition() == Disposition::Resign)
            .then(|| outcome.code() == Code::TokenNotYetValid)
    };
    if let Some(outcome) = Outcome::of(response) {
        return judge(outcome);
    }
    Outcome::ensure(response)
        .ok()
        .and_then(|outcome| judge(&outcome))
}
