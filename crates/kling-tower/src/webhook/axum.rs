//! An axum route for Kling callbacks: verifies the signature, reads the task, hands it on.
//!
//! Answers `204 No Content` to a verified callback (after calling `on_task`), `200 OK` to a
//! replay of an accepted one without calling `on_task` again (a sender that re-delivers is
//! not told to keep trying), `401 Unauthorized` to a missing, stale or wrong signature, and
//! `400 Bad Request` to a verified body that reports no task.
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
            match verifier.verify(&headers, &body) {
                Ok(_) => match parse_task(&body) {
                    Some(task) => {
                        on_task(task);
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
