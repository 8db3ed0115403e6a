//! An axum route for Kling callbacks: verifies the signature, reads the task, hands it on.
//!
//! Answers `204 No Content` to a verified callback once `on_task` has handled each task it
//! reports, `200 OK` to a replay of an accepted one without calling `on_task` again (a sender
//! that re-delivers is not told to keep trying), `401 Unauthorized` to a missing, stale or
//! wrong signature (also on an accepted message's id: the signature is checked first),
//! `400 Bad Request` to a verified body that reports no task (not JSON, or no task id and
//! status), with the reason as its text and in a `warn` event (it names fields, never quotes a
//! value of the body), `413 Payload Too Large` to a body over [`CALLBACK_BODY_LIMIT`] (with or
//! without a `Content-Length`), and `503 Service Unavailable` when `on_task` fails (its error is
//! logged at `warn`), so that the sender delivers it again. Other methods get axum's `405`; the
//! path is the router's.
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
use axum::response::IntoResponse;
use axum::routing::{MethodRouter, post};
use kling_core::{Envelope, TaskReport};

use super::WebhookVerifier;
use crate::error::WebhookErrorKind;

/// The largest callback body the route reads (256 KiB); a larger one is answered
/// `413 Payload Too Large` unread. A task report is a few kilobytes.
pub const CALLBACK_BODY_LIMIT: usize = 256 * 1024;

/// A `POST` route that verifies callbacks with `verifier` and awaits `on_task` with each task
/// the body reports, in order (Kling posts one; a proxy may batch several); an error from it
/// answers `503` at once, and the sender's next delivery hands every task over again (see the
/// [module docs](self)).
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
                Ok(verified) => {
                    let tasks = match Envelope::read_callback(&body) {
                        Ok(tasks) => tasks,
                        // Why, in the log and the answer (it names fields, never a value of
                        // the body), for whoever set up the sender.
                        Err(why) => {
                            tracing::warn!(reason = %why, "callback names no task; answered 400");
                            return (StatusCode::BAD_REQUEST, why.to_string()).into_response();
                        }
                    };
                    // Every task the body reports (Kling posts one; a proxy may batch them).
                    for task in tasks {
                        let id = task.id.clone();
                        if let Err(e) = on_task(task).await {
                            tracing::warn!(
                                task_id = id.as_str(),
                                error = %e,
                                "callback not handled; the sender will deliver it again"
                            );
                            return StatusCode::SERVICE_UNAVAILABLE.into_response();
                        }
                    }
                    // Remembered once handled (a concurrent delivery may have been first).
                    let _ = verifier.record(&verified);
                    StatusCode::NO_CONTENT.into_response()
                }
                Err(e) if e.kind() == WebhookErrorKind::Replayed => StatusCode::OK.into_response(),
                Err(_) => StatusCode::UNAUTHORIZED.into_response(),
            }
        }
    })
    .layer(DefaultBodyLimit::max(CALLBACK_BODY_LIMIT))
}
