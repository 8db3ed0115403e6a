//! Shared helpers.

use bytes::Bytes;
use http_body_util::Full;

/// A request with a JSON (or empty) body.
pub(crate) fn request(method: &str, uri: &str, body: &str) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("valid request")
}

/// A Kling envelope response.
pub(crate) fn envelope(status: u16, body: &str) -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(status)
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("valid response")
}
