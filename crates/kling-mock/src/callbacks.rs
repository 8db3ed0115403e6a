//! Callback delivery: a POST of the bare task object at each status change, optionally signed the
//! Standard-Webhooks way.
//!
//! Each task with a callback URL gets one spawned tokio task that sleeps until the switch to
//! `processing`, posts, sleeps until the end, posts. Failures are counted, never retried: Kling
//! documents no retries, so clients must confirm with a query.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use hmac::{Hmac, KeyInit as _, Mac as _};
use http::{HeaderValue, Method, Request, header};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;
use tokio::time::Instant;

use crate::handlers::CallbackJob;
use crate::service::Shared;

/// How long one delivery may take before it counts as failed.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub(crate) fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

static MESSAGE_SEQ: AtomicU64 = AtomicU64::new(1);

/// The Standard-Webhooks signature header value `v1,<base64>` for one message.
///
/// The key is the base64-decoded part after `whsec_` when the secret has that prefix (falling back
/// to the raw bytes if it does not decode), else the raw secret bytes.
pub fn sign_webhook(secret: &str, id: &str, timestamp: u64, body: &[u8]) -> String {
    let key = match secret.strip_prefix("whsec_") {
        Some(b64) => STANDARD
            .decode(b64)
            .unwrap_or_else(|_| b64.as_bytes().to_vec()),
        None => secret.as_bytes().to_vec(),
    };
    let mut mac = match Hmac::<Sha256>::new_from_slice(&key) {
        Ok(mac) => mac,
        // HMAC accepts keys of any length; this arm only satisfies the type.
        Err(_) => return "v1,".to_owned(),
    };
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// Spawns the delivery task of one created task.
pub(crate) fn spawn(shared: Arc<Shared>, job: CallbackJob) {
    tokio::spawn(async move {
        let task = &job.task;
        let mut moments = Vec::with_capacity(2);
        if task.processing_at < task.end {
            moments.push(task.processing_at);
        }
        moments.push(task.end);
        for at in moments {
            tokio::time::sleep_until(at).await;
            let ok = deliver(&shared, &job, at).await;
            let mut state = shared.lock();
            if ok {
                state.stats.callbacks_sent += 1;
            } else {
                state.stats.callbacks_failed += 1;
            }
        }
    });
}

async fn deliver(shared: &Shared, job: &CallbackJob, at: Instant) -> bool {
    let body = Bytes::from(job.task.to_json(&shared.clock, at).to_string());
    let mut req = Request::new(Full::new(body.clone()));
    *req.method_mut() = Method::POST;
    let Ok(uri) = job.url.parse::<http::Uri>() else {
        return false;
    };
    *req.uri_mut() = uri;
    let headers = req.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(secret) = &shared.config.callback_secret {
        let id = format!(
            "msg_{}_{}",
            job.task.id,
            MESSAGE_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let timestamp = shared.clock.unix(Instant::now()).as_secs();
        // One signature per secret during a rotation, space-separated (Standard Webhooks).
        let signature = std::iter::once(secret)
            .chain(&shared.config.callback_rotated_secrets)
            .map(|secret| sign_webhook(secret, &id, timestamp, &body))
            .collect::<Vec<_>>()
            .join(" ");
        for (name, value) in [
            ("webhook-id", id),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", signature),
        ] {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(name, v);
            }
        }
    }
    let client = shared.client.get_or_init(client);
    match tokio::time::timeout(DELIVERY_TIMEOUT, client.request(req)).await {
        Ok(Ok(resp)) => resp.status().is_success(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whsec_secret_is_the_base64_of_the_key() {
        let raw = sign_webhook("key-bytes", "msg_1", 1_700_000_000, b"{}");
        let prefixed = sign_webhook(
            &format!("whsec_{}", STANDARD.encode("key-bytes")),
            "msg_1",
            1_700_000_000,
            b"{}",
        );
        assert_eq!(raw, prefixed);
        assert!(raw.starts_with("v1,"));
        assert_ne!(
            raw,
            sign_webhook("key-bytes", "msg_2", 1_700_000_000, b"{}")
        );
    }
}
