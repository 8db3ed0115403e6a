//! An axum route for Kling callbacks: verifies the signature, reads the task, hands it on.
//!
//! Answers `204 No Content` to a verified callback (after calling `on_task`), `200 OK` to a
//! replay of an accepted one without calling `on_task` again (a sender that re-delivers is
//! not told to keep trying), `401 Unauthorized` to a missing, stale or wrong signature, and
//! `400 Bad Request` to a verified body that reports no task.
//!
//! A message's id is remembered once `on_task` has returned: if it panics, the sender gets an
//! error and its next delivery of the message is handled, not taken for a replay. Two
//! deliveries of one message at the same time may both reach `on_task`, which must therefore
//! be idempotent per task (KLING_API.md: confirm a callback with a query).
//!
//! ```
//! use axum::Router;
//! use kling_tower::webhook::{WebhookVerifier, axum::callback_route};
//!
//! let verifier = WebhookVerifier::new("whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM=")?;
//! let app: Router = Router::new().route(
//!     "/kling/callback",
//!     callback_route(verifier, |task| println!("task {} is {}", task.id, task.status)),
//! );
//! # let _ = app;
//! # Ok::<(), kling_tower::error::ConfigError>(())
//! ```

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{MethodRouter, post};
use kling_core::TaskReport;

use super::{WebhookVerifier, parse_task};
use crate::error::WebhookErrorKind;

/// A `POST` route that verifies callbacks with `verifier` and passes each task to `on_task`.
pub fn callback_route<F, St>(verifier: WebhookVerifier, on_task: F) -> MethodRouter<St>
where
    F: Fn(TaskReport) + Clone + Send + Sync + 'static,
    St: Clone + Send + Sync + 'static,
{
    post(move |headers: HeaderMap, body: Bytes| {
        let verifier = verifier.clone();
        let on_task = on_task.clone();
        async move {
            match verifier.verify_unrecorded(&headers, &body) {
                Ok(verified) => match parse_task(&body) {
                    Some(task) => {
                        on_task(task);
                        // Remembered once handled (a concurrent delivery may have been first).
                        let _ = verifier.record(&verified);
                        StatusCode::NO_CONTENT
                    }
                    None => StatusCode::BAD_REQUEST,
                },
                Err(e) if e.kind() == WebhookErrorKind::Replayed => StatusCode::OK,
                Err(_) => StatusCode::UNAUTHORIZED,
            }
        }
    })
}
