//! [`ReqwestService`]: a `reqwest::Client` as a `tower::Service<http::Request<_>>`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response};
use kling_core::error::NotSent;
use kling_core::{BoxError, PeekBody};
use pin_project_lite::pin_project;
use tower_service::Service;

type Pending = <reqwest::Client as Service<reqwest::Request>>::Future;

/// A `reqwest::Client` as a `Service<http::Request<B>>` whose responses carry reqwest's body,
/// which `kling_core::ClassifyLayer` reads (bounded) into `Response<Full<Bytes>>`.
///
/// A failed connect becomes a [`NotSent`] error, so the layers above know a create surely did
/// not happen; other reqwest errors pass as they are (the request may have been sent).
///
/// Build the client with [`ReqwestService::new_client`], or install the `ring` provider
/// ([`install_ring_provider`](super::install_ring_provider)) before building your own.
///
/// # Clone
///
/// Clones share reqwest's connection pool.
#[derive(Clone, Debug)]
pub struct ReqwestService {
    client: reqwest::Client,
}

impl ReqwestService {
    /// Wraps a client.
    pub fn new(client: reqwest::Client) -> Self {
        ReqwestService { client }
    }

    /// A default reqwest client on rustls with the `ring` provider, whose connections must
    /// open (TCP connect and TLS handshake) within
    /// [`DEFAULT_CONNECT_TIMEOUT`](super::DEFAULT_CONNECT_TIMEOUT): a host that never answers
    /// then fails as a connect error ([`NotSent`]) rather than as a timed-out attempt, which
    /// the stack must treat as maybe sent. It follows no redirect (see
    /// [`new_client_with_connect_timeout`](Self::new_client_with_connect_timeout)). A client of
    /// your own should set `connect_timeout` and `redirect(Policy::none())` too.
    pub fn new_client() -> Result<Self, reqwest::Error> {
        ReqwestService::new_client_with_connect_timeout(super::DEFAULT_CONNECT_TIMEOUT)
    }

    /// [`new_client`](Self::new_client) whose connections give up opening after `connect`:
    /// under a stack whose attempt timeout is short, its
    /// [`StackConfig::connect_timeout_duration`](crate::StackConfig::connect_timeout_duration).
    ///
    /// No redirect is followed: reqwest would send a create answered `302` again as a `GET`
    /// (or a `307` to an address no layer checked), and the stack must see the answer Kling
    /// gave.
    pub fn new_client_with_connect_timeout(connect: Duration) -> Result<Self, reqwest::Error> {
        super::install_ring_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(connect)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(ReqwestService::new(client))
    }

    /// The client.
    pub fn get_ref(&self) -> &reqwest::Client {
        &self.client
    }

    /// Unwraps the client.
    pub fn into_inner(self) -> reqwest::Client {
        self.client
    }
}

impl<B: PeekBody> Service<Request<B>> for ReqwestService {
    type Response = Response<reqwest::Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> ResponseFuture {
        let request = request.map(|body| body.peek_bytes());
        match reqwest::Request::try_from(request) {
            Ok(request) => ResponseFuture {
                state: State::Sending {
                    future: self.client.call(request),
                },
            },
            Err(e) => ResponseFuture {
                state: State::Failed {
                    error: Some(Box::new(NotSent::new(e))),
                },
            },
        }
    }
}

/// `error` with its URL cut to scheme, host and path: reqwest's message quotes the URL, errors
/// end up in logs, and a URL may carry a user name and password (a proxy's, in a base URL) and
/// a query (task and external ids), which the stack's logs never show.
fn without_credentials(mut error: reqwest::Error) -> reqwest::Error {
    if let Some(url) = error.url_mut() {
        if !url.username().is_empty() || url.password().is_some() {
            let _ = url.set_password(None);
            let _ = url.set_username("");
        }
        url.set_query(None);
    }
    error
}

pin_project! {
    /// The [`ReqwestService`] response future.
    pub struct ResponseFuture {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        Sending { #[pin] future: Pending },
        Failed { error: Option<BoxError> },
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<reqwest::Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Sending { future } => match ready!(future.poll(cx)) {
                Ok(response) => Poll::Ready(Ok(response.into())),
                Err(e) if e.is_connect() => {
                    Poll::Ready(Err(Box::new(NotSent::new(without_credentials(e)))))
                }
                Err(e) => Poll::Ready(Err(Box::new(without_credentials(e)))),
            },
            StateProj::Failed { error } => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| "polled after completion".into()))),
        }
    }
}
