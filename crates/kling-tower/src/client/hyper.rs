//! An HTTPS hyper-util client on rustls (`ring`, webpki roots).

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The client [`https_client`] builds.
pub type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A hyper-util client for `https://` (rustls with `ring`, Mozilla's roots from webpki-roots,
/// HTTP/1.1) that also speaks plain `http://`, for the mock and local proxies.
///
/// Put `kling_core::ClassifyLayer` over it; its connect errors read as "never sent".
pub fn https_client() -> Result<HttpsClient, rustls::Error> {
    build(None)
}

/// [`https_client`] whose TCP connects give up after `connect`: a host that never accepts
/// fails then, not after the system's own timeout (minutes). For a caller that bounds each
/// step of a request (result downloads, say).
pub fn https_client_with_connect_timeout(
    connect: std::time::Duration,
) -> Result<HttpsClient, rustls::Error> {
    build(Some(connect))
}

fn build(connect: Option<std::time::Duration>) -> Result<HttpsClient, rustls::Error> {
    let mut http = HttpConnector::new();
    // The HTTPS connector takes `https://` URIs, which the plain connector refuses otherwise.
    http.enforce_http(false);
    http.set_connect_timeout(connect);
    let connector = HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}
