//! An HTTPS hyper-util client on rustls (`ring`, webpki roots).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kling_core::BoxError;
use tower_service::Service;

/// The client [`https_client`] builds.
pub type HttpsClient = Client<ConnectTimeout<HttpsConnector<HttpConnector>>, Full<Bytes>>;

/// A hyper-util client for `https://` (rustls with `ring`, Mozilla's roots from webpki-roots,
/// HTTP/1.1) that also speaks plain `http://`, for the mock and local proxies. A connection
/// that takes longer than [`DEFAULT_CONNECT_TIMEOUT`](super::DEFAULT_CONNECT_TIMEOUT) to open (TCP connect and TLS handshake)
/// fails as a connect error. It reads no proxy variables (`HTTPS_PROXY`, …): it connects to the
/// host itself; behind a proxy, use [`ReqwestService`](crate::client) (feature `reqwest`).
///
/// Put `kling_core::ClassifyLayer` over it; its connect errors read as "never sent". Under a
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
    Ok(Client::builder(TokioExecutor::new()).build(ConnectTimeout::new(connector, connect)))
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
