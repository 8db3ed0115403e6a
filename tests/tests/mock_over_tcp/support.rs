//! The real client every test uses: hyper-util's legacy client under kling-core's classify step.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use hmac::{KeyInit, Mac};
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kling_core::error::BoxError;
use kling_core::{Classify, ClassifyLayer, Outcome};
use tower::{Layer, ServiceExt};

pub(crate) type Http = Classify<Client<HttpConnector, Full<Bytes>>>;

pub(crate) fn client() -> Http {
    ClassifyLayer::new().layer(Client::builder(TokioExecutor::new()).build_http())
}

/// Sends one request and returns the response with its outcome.
pub(crate) async fn send(
    http: &Http,
    method: Method,
    url: String,
    bearer: &str,
    body: &str,
) -> Result<(Response<Full<Bytes>>, Outcome), BoxError> {
    let request = Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", format!("Bearer {bearer}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))?;
    let response = http.clone().oneshot(request).await?;
    let outcome = Outcome::of(&response).expect("classified").clone();
    Ok((response, outcome))
}

/// Polls a legacy task until it ends, or fails the test after `limit`.
pub(crate) async fn wait_until_ended(
    http: &Http,
    base: &str,
    path: &str,
    id: &str,
    limit: Duration,
) {
    let start = std::time::Instant::now();
    loop {
        let (_, outcome) = send(http, Method::GET, format!("{base}{path}/{id}"), "k", "")
            .await
            .unwrap();
        if outcome.task().is_some_and(|t| t.status.is_terminal()) {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "task {id} did not end within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HS256 JWT as Kling's legacy auth expects, signed by hand (the mock is checked against an
/// implementation that is not its own).
pub(crate) fn jwt(access_key: &str, secret_key: &str, nbf_offset: i64, exp_offset: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims =
        serde_json::json!({"iss": access_key, "nbf": now + nbf_offset, "exp": now + exp_offset});
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret_key.as_bytes()).unwrap();
    mac.update(format!("{header}.{claims}").as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{header}.{claims}.{signature}")
}
