//! Shared helpers.

use bytes::Bytes;
use http_body_util::Full;
use kling_core::Outcome;
use kling_mock::{MockConfig, MockKling, Preset};
use kling_tower::{Credentials, KlingLayer, StackConfig, Tier};
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
    let response = service.oneshot(legacy_create("a cat")).await.unwrap();
    assert!(Outcome::of(&response).unwrap().is_success());
    response
}

/// A legacy video create of `prompt`: an endpoint that takes an access key pair's JWT too.
pub(crate) fn legacy_create(prompt: &str) -> http::Request<Full<Bytes>> {
    let body = serde_json::json!({ "prompt": prompt }).to_string();
    request("POST", "/v1/videos/text2video", &body)
}

/// A new-style video create of `prompt`: an endpoint that takes only an API key.
pub(crate) fn new_style_create(prompt: &str) -> http::Request<Full<Bytes>> {
    let body = serde_json::json!({ "prompt": prompt }).to_string();
    request("POST", "/text-to-video/kling-3.0", &body)
}

/// A Pro mock that knows the access key pair `ak`/`sk`, and a Pro stack signing with that
/// pair: the credentials a new-style endpoint refuses.
pub(crate) fn pro_stack_on_a_key_pair() -> (MockKling, KlingLayer) {
    let mock = MockKling::new(MockConfig::preset(Preset::Pro).access_key("ak", "sk")).unwrap();
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Pro),
        Credentials::access_key("ak", "sk").unwrap(),
    )
    .unwrap();
    (mock, kling)
}
