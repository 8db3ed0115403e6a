//! The callback listener (`--callback-listen ADDR`): Kling posts task changes to it, and a
//! terminal one ends that task's follow at once.
//!
//! With a secret (`--callback-secret`, or `KLING_WEBHOOK_SECRET`) a callback must carry a
//! valid Standard-Webhooks signature (401 otherwise) and is trusted as it is: it frees the
//! task's slots and ends its follow. Without one, a callback is only a hint: the task is
//! queried through the stack, and the query's answer is what counts.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use kling_tower::WebhookVerifier;
use kling_tower::error::WebhookErrorKind;
use kling_tower::webhook::parse_task;
use tokio::net::TcpListener;

use crate::run::Engine;

/// The path the listener answers on.
pub const CALLBACK_PATH: &str = "/kling/callback";

/// The router of the callback listener.
pub fn router(engine: Arc<Engine>, verifier: Option<WebhookVerifier>) -> Router {
    Router::new().route(
        CALLBACK_PATH,
        post(move |headers: HeaderMap, body: Bytes| {
            let engine = engine.clone();
            let verifier = verifier.clone();
            async move {
                if let Some(verifier) = &verifier {
                    match verifier.verify(&headers, &body) {
                        Ok(_) => {}
                        Err(e) if e.kind() == WebhookErrorKind::Replayed => return StatusCode::OK,
                        Err(_) => return StatusCode::UNAUTHORIZED,
                    }
                }
                let Some(task) = parse_task(&body) else {
                    return StatusCode::BAD_REQUEST;
                };
                if task.status.is_terminal() {
                    let trusted = verifier.is_some();
                    tokio::spawn(async move { engine.on_callback(&body, task, trusted).await });
                }
                StatusCode::NO_CONTENT
            }
        }),
    )
}

/// Binds a listener (port 0 picks a free one; read it back with `local_addr`).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `router` on `listener` until the returned task is aborted.
pub fn spawn(listener: TcpListener, router: Router) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::warn!(error = %e, "listener stopped");
        }
    })
}
