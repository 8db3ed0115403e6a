//! The [`Auth`](super::Auth) response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{Request, Response};
use http_body_util::Full;
use kling_core::{BoxError, Disposition, Outcome};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::Shared;

/// What a second attempt needs: the request as first sent, a clone of the inner service and
/// the token generation the server refused.
pub(crate) struct Retry<S, B> {
    pub(crate) request: Request<B>,
    pub(crate) service: S,
    pub(crate) shared: Arc<Shared>,
    pub(crate) generation: u64,
}

pin_project! {
    /// Sends the attempt; on 1003/1004 with a JWT, signs a fresh token and sends it once more.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future>,
        // Boxed: only a JWT needs it, and an API key's future stays small for the layers
        // above to move.
        retry: Option<Box<Retry<S, B>>>,
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
    pub(crate) fn new(future: S::Future, retry: Option<Box<Retry<S, B>>>) -> Self {
        ResponseFuture {
            state: State::First { future },
            retry,
        }
    }

    pub(crate) fn failed(error: BoxError) -> Self {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
            retry: None,
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("can_resign", &self.retry.is_some())
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
                    let mut response = ready!(future.poll(cx)).map_err(Into::into)?;
                    let Some(retry) = this.retry.as_mut() else {
                        return Poll::Ready(Ok(response));
                    };
                    let resign = Outcome::ensure(&mut response)
                        .is_ok_and(|o| o.disposition() == Disposition::Resign);
                    if !resign {
                        return Poll::Ready(Ok(response));
                    }
                    let (header, _) = retry
                        .shared
                        .resign(retry.generation)
                        .map_err(|e| Box::new(e) as BoxError)?;
                    retry.request.headers_mut().insert(AUTHORIZATION, header);
                    this.state.set(State::AwaitReady);
                }
                StateProj::AwaitReady => {
                    let Some(retry) = this.retry.as_mut() else {
                        this.state.set(State::Failed { error: None });
                        continue;
                    };
                    ready!(retry.service.poll_ready(cx)).map_err(Into::into)?;
                    let Some(retry) = this.retry.take() else {
                        continue;
                    };
                    let Retry {
                        mut service,
                        request,
                        ..
                    } = *retry;
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
