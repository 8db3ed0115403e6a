//! Shared helpers.

use bytes::Bytes;
use http_body_util::Full;
use kling_core::Outcome;
use tower::ServiceExt;

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

/// Sends one legacy video create (`a cat`) through `service` and checks Kling accepted it:
/// the accepted create several tests need before what they look at.
pub(crate) async fn accepted_create<S>(service: S) -> http::Response<Full<Bytes>>
where
    S: tower::Service<http::Request<Full<Bytes>>, Response = http::Response<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    let response = service
        .oneshot(request(
            "POST",
            "/v1/videos/text2video",
            r#"{"prompt":"a cat"}"#,
        ))
        .await
        .unwrap();
    assert!(Outcome::of(&response).unwrap().is_success());
    response
}
