//! An axum route for Kling callbacks: verifies the signature, reads the task, hands it on.
//!
//! Answers `204 No Content` to a verified callback once `on_task` has handled it, `200 OK` to a
//! replay of an accepted one without calling `on_task` again (a sender that re-delivers is
//! not told to keep trying), `401 Unauthorized` to a missing, stale or wrong signature,
//! `400 Bad Request` to a verified body that reports no task, and `503 Service Unavailable`
//! when `on_task` fails (its error is logged at `warn`), so that the sender delivers it again.
//!
//! `on_task` is async and fallible: the route awaits it before answering, so a slot is freed
//! (say with [`KlingLayer::on_task`](crate::KlingLayer::on_task), which may wait for Redis)
//! before Kling is told the callback arrived, and a failure is retried by Kling rather than
//! lost. A message's id is remembered once `on_task` has succeeded: if it fails or panics, the
//! sender's next delivery of the message is handled, not taken for a replay. Two deliveries
//! of one message at the same time may both reach `on_task`, which must therefore be
//! idempotent per task (KLING_API.md: confirm a callback with a query).
//!
//! ```
//! use axum::Router;
//! use kling_tower::webhook::{WebhookVerifier, axum::callback_route};
//!
//! let verifier = WebhookVerifier::new("whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM=")?;
//! let app: Router = Router::new().route(
//!     "/kling/callback",
//!     callback_route(verifier, |task| async move {
//!         println!("task {} is {}", task.id, task.status);
//!         Ok::<_, std::convert::Infallible>(())
//!     }),
//! );
//! # let _ = app;
//! # Ok::<(), kling_tower::error::ConfigError>(())
//! ```

use std::fmt;
use std::future::Future;

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{MethodRouter, post};
use kling_core::TaskReport;

use super::{WebhookVerifier, parse_task};
use crate::error::WebhookErrorKind;

/// The largest callback body the route reads (256 KiB); a larger one is answered
/// `413 Payload Too Large` unread. A task report is a few kilobytes.
pub const CALLBACK_BODY_LIMIT: usize = 256 * 1024;

/// A `POST` route that verifies callbacks with `verifier` and awaits `on_task` with each task;
/// an error from it answers `503` (see the [module docs](self)).
///
/// The route bounds its own body at [`CALLBACK_BODY_LIMIT`], whatever limit the router sets
/// (a router that lifts axum's default for uploads does not lift it here).
pub fn callback_route<F, Fut, E, St>(verifier: WebhookVerifier, on_task: F) -> MethodRouter<St>
where
    F: Fn(TaskReport) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: fmt::Display + Send + 'static,
    St: Clone + Send + Sync + 'static,
{
    post(move |headers: HeaderMap, body: Bytes| {
        let verifier = verifier.clone();
        let on_task = on_task.clone();
        async move {
            match verifier.verify_unrecorded(&headers, &body) {
                Ok(verified) => match parse_task(&body) {
                    Some(task) => {
                        let id = task.id.clone();
                        if let Err(e) = on_task(task).await {
                            tracing::warn!(
                                task_id = id.as_str(),
                                error = %e,
                                "callback not handled; the sender will deliver it again"
                            );
                            return StatusCode::SERVICE_UNAVAILABLE;
                        }
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
    .layer(DefaultBodyLimit::max(CALLBACK_BODY_LIMIT))
}
