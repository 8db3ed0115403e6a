//! An HTTPS hyper-util client on rustls (`ring`, webpki roots).

use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Uri, Version};
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::TokioExecutor;
use kling_core::BoxError;
use kling_core::error::NotSent;
use pin_project_lite::pin_project;
use tower_service::Service;

/// The hyper-util client [`https_client`] builds on.
pub type HyperClient = Client<ConnectTimeout<HttpsConnector<HttpConnector>>, Full<Bytes>>;

/// hyper-util's response: its body is hyper's `Incoming`.
type HyperResponse = <HyperClient as Service<Request<Full<Bytes>>>>::Response;

/// The client [`https_client`] builds: a hyper-util client (it derefs to one, [`HyperClient`])
/// whose `Service` refuses a request hyper-util cannot send as never sent.
///
/// hyper-util's client fails a request whose URI is relative (`/v1/videos/text2video`, sent
/// with no [`BaseUrlLayer`](crate::BaseUrlLayer) under the stack) or whose HTTP version it does
/// not speak (HTTP/2, to the HTTP/1.1 client [`https_client`] builds: refused once connected)
/// before sending anything, with an error that is no connect error, which the retry
/// layer and the task slots must read as "maybe sent": a create that surely made nothing held
/// its slot for the task lease. This `Service` fails such a request with a [`NotSent`] error
/// ([`NotSent::for_good`]: the retry layer returns it at once, as every attempt would meet it),
/// naming its path (never its query), without handing it to hyper-util (an HTTP/2 request
/// handed to a client of one's own, [`HttpsClient::new`], that hyper-util refuses once
/// connected on an HTTP/1.1 connection reads as never sent by kling-core's `SendState::of`:
/// [`kling_core::error::refused_version`]). Calls through the
/// hyper-util client itself (`client.request(..)`, by deref) are hyper-util's as they are.
///
/// # Clone
///
/// Clones share hyper-util's connection pool.
#[derive(Clone, Debug)]
pub struct HttpsClient {
    client: HyperClient,
    /// Whether the client may speak HTTP/2: not the one [`https_client`] builds (HTTP/1.1
    /// only), whose pool refuses an HTTP/2 request once connected, with no connect error.
    http2: bool,
}

impl HttpsClient {
    /// Wraps a hyper-util client (which may speak HTTP/2: requests of that version are handed
    /// to it).
    pub fn new(client: HyperClient) -> Self {
        HttpsClient {
            client,
            http2: true,
        }
    }

    /// The hyper-util client.
    pub fn get_ref(&self) -> &HyperClient {
        &self.client
    }

    /// Unwraps the hyper-util client.
    pub fn into_inner(self) -> HyperClient {
        self.client
    }
}

impl Deref for HttpsClient {
    type Target = HyperClient;

    fn deref(&self) -> &HyperClient {
        &self.client
    }
}

impl Service<Request<Full<Bytes>>> for HttpsClient {
    type Response = HyperResponse;
    type Error = BoxError;
    type Future = HttpsResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Service::<Request<Full<Bytes>>>::poll_ready(&mut self.client, cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> HttpsResponseFuture {
        let state = match unsendable(&request, self.http2) {
            Some(reason) => State::Refused {
                error: Some(Box::new(NotSent::for_good(reason))),
            },
            None => State::Sending {
                future: self.client.request(request),
            },
        };
        HttpsResponseFuture { state }
    }
}

/// Why hyper-util's client would refuse `request` before sending it, if it would: a URI
/// without scheme and host (a `CONNECT` may name the host alone), or an HTTP version it does
/// not speak (HTTP/2 unless `http2`). The message names the URI's path, not its query (task
/// and external ids, which the stack's logs never show).
fn unsendable<B>(request: &Request<B>, http2: bool) -> Option<String> {
    let uri = request.uri();
    let connect = request.method() == Method::CONNECT;
    let absolute = uri.scheme().is_some() || connect;
    if !(absolute && uri.authority().is_some()) {
        return Some(format!(
            "the hyper-util client sends absolute URIs only (`https://host/path`), not `{}`: put \
             a BaseUrlLayer under the stack",
            uri.path()
        ));
    }
    let version = request.version();
    let spoken = version == Version::HTTP_11
        || (version == Version::HTTP_2 && http2)
        || (version == Version::HTTP_10 && !connect);
    (!spoken).then(|| format!("the hyper-util client does not send {version:?} requests"))
}

pin_project! {
    /// The [`HttpsClient`] response future.
    pub struct HttpsResponseFuture {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        Sending { #[pin] future: ResponseFuture },
        Refused { error: Option<BoxError> },
    }
}

impl fmt::Debug for HttpsResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpsResponseFuture")
            .finish_non_exhaustive()
    }
}

impl Future for HttpsResponseFuture {
    type Output = Result<HyperResponse, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Sending { future } => future.poll(cx).map_err(Into::into),
            StateProj::Refused { error } => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| "polled after completion".into()))),
        }
    }
}

/// A hyper-util client for `https://` (rustls with `ring`, Mozilla's roots from webpki-roots,
/// HTTP/1.1) that also speaks plain `http://`, for the mock and local proxies. A connection
/// that takes longer than [`DEFAULT_CONNECT_TIMEOUT`](super::DEFAULT_CONNECT_TIMEOUT) to open (TCP connect and TLS handshake)
/// fails as a connect error. It reads no proxy variables (`HTTPS_PROXY`, …): it connects to the
/// host itself; behind a proxy, use [`ReqwestService`](crate::client) (feature `reqwest`).
///
/// Put `kling_core::ClassifyLayer` over it; its connect errors, and requests it cannot send
/// (a relative URI, an HTTP/2 request: see [`HttpsClient`]), read as "never sent". Under a
/// stack whose attempt timeout is 10 s or less (a short one, or a speed factor), use
/// [`https_client_with_connect_timeout`] with the stack's
/// [`StackConfig::connect_timeout_duration`](crate::StackConfig::connect_timeout_duration):
/// a connection still opening when the attempt times out counts as maybe sent.
pub fn https_client() -> Result<HttpsClient, rustls::Error> {
    https_client_with_connect_timeout(super::DEFAULT_CONNECT_TIMEOUT)
}

/// [`https_client`] whose connections give up opening after `connect` (TCP connect and TLS
/// handshake together).
pub fn https_client_with_connect_timeout(connect: Duration) -> Result<HttpsClient, rustls::Error> {
    let mut http = HttpConnector::new();
    // The HTTPS connector takes `https://` URIs, which the plain connector refuses otherwise.
    http.enforce_http(false);
    let connector = HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let client =
        Client::builder(TokioExecutor::new()).build(ConnectTimeout::new(connector, connect));
    Ok(HttpsClient {
        client,
        http2: false,
    })
}

/// A connector whose connections must open within a time limit, TLS handshake included
/// (hyper-util's own connect timeout covers the TCP connect only, so a server that accepts
/// and then never answers the handshake would hold a request until the attempt timeout).
///
/// A connection that takes longer fails with an [`io::ErrorKind::TimedOut`](std::io::ErrorKind)
/// error, which hyper-util reports as a connect error.
#[derive(Clone)]
pub struct ConnectTimeout<C> {
    inner: C,
    limit: Duration,
}

impl<C> ConnectTimeout<C> {
    /// `inner`, whose connections must open within `limit`.
    pub fn new(inner: C, limit: Duration) -> Self {
        ConnectTimeout { inner, limit }
    }
}

impl<C> fmt::Debug for ConnectTimeout<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectTimeout")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl<C> Service<Uri> for ConnectTimeout<C>
where
    C: Service<Uri>,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    // Boxed: one allocation per new connection, not per request.
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let limit = self.limit;
        Box::pin(async move {
            match tokio::time::timeout(limit, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connection not open after {limit:?}"),
                )) as BoxError),
            }
        })
    }
}
