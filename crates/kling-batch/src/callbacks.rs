//! The callback listener (`--callback-listen ADDR`): Kling posts task changes to it, and a
//! terminal one ends that task's follow at once. A body may report several tasks (an array,
//! or an envelope whose `data` holds several, as a proxy batching callbacks may post): each
//! is taken.
//!
//! With a secret (`--callback-secret`, or `KLING_WEBHOOK_SECRET`) a callback must carry a
//! valid Standard-Webhooks signature (401 otherwise) and is trusted as it is: it frees the
//! task's slots and ends its follow. Without one, a callback is only a hint: the task is
//! queried through the stack, and the query's answer is what counts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use kling_tower::WebhookVerifier;
use kling_tower::error::WebhookErrorKind;
use kling_tower::webhook::parse_tasks;
use tokio::net::TcpListener;

use crate::error::SetupError;
use crate::run::Engine;

/// The path the listener answers on, whatever the callback URL (and the default URL's path).
pub const CALLBACK_PATH: &str = "/kling/callback";

/// The path of a callback URL given by the user (`--callback-url`), for the listener to serve
/// besides [`CALLBACK_PATH`]: a reverse proxy may forward `https://example.com/hooks/kling`
/// to the listener unchanged, or rewrite it to [`CALLBACK_PATH`].
///
/// Refuses (naming `--callback-url`) a URL Kling could not post to: one that is not an
/// absolute `http` or `https` URL with a host.
///
/// ```
/// use kling_batch::callbacks::callback_path;
///
/// assert_eq!(callback_path("https://example.com/hooks/kling?k=1").unwrap(), "/hooks/kling");
/// assert_eq!(callback_path("http://10.0.0.5:8787").unwrap(), "/");
/// assert!(callback_path("example.com/hooks").is_err());
/// ```
pub fn callback_path(url: &str) -> Result<String, SetupError> {
    // Named without its user info, query or fragment: this goes to stderr and CI logs.
    let (shown, cut) = crate::error::shown_url(url);
    let refuse = |why: &str| {
        SetupError::new(
            "--callback-url",
            format!(
                "`{shown}`{} {why}; give the public URL Kling should post callbacks to",
                if cut {
                    " (its user info, query and fragment not shown)"
                } else {
                    ""
                }
            ),
        )
    };
    let uri: Uri = url
        .parse()
        .map_err(|_| refuse("is not a URL Kling can post to"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(refuse("is not an http:// or https:// URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(refuse("has no host"));
    }
    Ok(match uri.path() {
        "" => "/".to_owned(),
        path => path.to_owned(),
    })
}

/// The router of the callback listener, on [`CALLBACK_PATH`].
pub fn router(engine: Arc<Engine>, verifier: Option<WebhookVerifier>) -> Router {
    router_at(engine, verifier, CALLBACK_PATH)
}

/// The router of the callback listener, on `path` (the callback URL's, see
/// [`callback_path`]) and on [`CALLBACK_PATH`]. A post to any other path is answered `404`,
/// and the first one is reported on stderr: callbacks that never arrive would otherwise leave
/// the run to its slower queries without a word.
pub fn router_at(engine: Arc<Engine>, verifier: Option<WebhookVerifier>, path: &str) -> Router {
    let path: Arc<str> = path.into();
    let warned = Arc::new(AtomicBool::new(false));
    // Matched by hand rather than as a route: any path the user gives is served as it is.
    Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let engine = engine.clone();
            let verifier = verifier.clone();
            let path = path.clone();
            let warned = warned.clone();
            async move {
                if uri.path() != &*path && uri.path() != CALLBACK_PATH {
                    if method == Method::POST && !warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            path = %uri.path(),
                            serves = %path,
                            "a post to the callback listener on a path it does not serve was \
                             answered 404 (check --callback-url and the proxy's path)"
                        );
                    }
                    return StatusCode::NOT_FOUND;
                }
                if method != Method::POST {
                    return StatusCode::METHOD_NOT_ALLOWED;
                }
                // Every task of the body (Kling posts one; a proxy may batch several). A signed
                // body's id is remembered once it is known to report a task: one that reports
                // none is answered 400 again when delivered again, not 200 as a replay.
                let tasks = match &verifier {
                    Some(verifier) => match verifier.verify_tasks(&headers, &body) {
                        Ok(tasks) => tasks,
                        Err(e) if e.kind() == WebhookErrorKind::Replayed => return StatusCode::OK,
                        Err(_) => return StatusCode::UNAUTHORIZED,
                    },
                    None => parse_tasks(&body).unwrap_or_default(),
                };
                if tasks.is_empty() {
                    return StatusCode::BAD_REQUEST;
                }
                if tasks.iter().any(|task| task.status.is_terminal()) {
                    let trusted = verifier.is_some();
                    tokio::spawn(async move { engine.on_callback(&body, tasks, trusted).await });
                }
                StatusCode::NO_CONTENT
            }
        },
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

#[cfg(test)]
mod tests {
    use http::Request;
    use kling_tower::{Credentials, StackConfig, Tier};
    use tower::ServiceExt as _;

    use super::*;
    use crate::journal::Journal;
    use crate::run::{RunOptions, default_follow_policy};
    use crate::stack::Stack;

    fn engine() -> Arc<Engine> {
        let stack = Stack::new(
            StackConfig::preset(Tier::Pro),
            Credentials::api_key("key").unwrap(),
            "http://127.0.0.1:9",
        )
        .unwrap();
        let journal = Journal::open_in_memory().unwrap();
        Engine::new(stack, journal, RunOptions::new(default_follow_policy(1.0))).unwrap()
    }

    async fn post(router: &Router, path: &str) -> StatusCode {
        let body = r#"{"task_id":"860000000000000001","task_status":"processing"}"#;
        let request = Request::post(path)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body))
            .unwrap();
        router.clone().oneshot(request).await.unwrap().status()
    }

    /// The callback URL's path is served, as is the default one; any other path is not.
    #[tokio::test]
    async fn the_listener_serves_the_callback_urls_path_and_the_default_one() {
        let path = callback_path("https://example.com/hooks/kling?token=1").unwrap();
        assert_eq!(path, "/hooks/kling");
        let router = router_at(engine(), None, &path);
        assert_eq!(post(&router, "/hooks/kling").await, StatusCode::NO_CONTENT);
        assert_eq!(
            post(&router, "/hooks/kling?token=1").await,
            StatusCode::NO_CONTENT
        );
        assert_eq!(post(&router, CALLBACK_PATH).await, StatusCode::NO_CONTENT);
        assert_eq!(post(&router, "/hooks").await, StatusCode::NOT_FOUND);
        assert_eq!(post(&router, "/").await, StatusCode::NOT_FOUND);

        // A path axum would read as a pattern is served as it is.
        let router = router_at(engine(), None, "/hooks/{kind}/*rest");
        assert_eq!(
            post(&router, "/hooks/{kind}/*rest").await,
            StatusCode::NO_CONTENT
        );
        assert_eq!(post(&router, "/hooks/video/x").await, StatusCode::NOT_FOUND);
        let default = super::router(engine(), None);
        assert_eq!(post(&default, CALLBACK_PATH).await, StatusCode::NO_CONTENT);
    }

    #[test]
    fn a_callback_url_kling_cannot_post_to_is_refused() {
        for url in [
            "example.com/hooks",
            "ftp://example.com/x",
            "/hooks/kling",
            "http://",
        ] {
            let error = callback_path(url).unwrap_err();
            assert_eq!(error.field(), "--callback-url", "{url}");
        }
        assert_eq!(callback_path("http://10.0.0.5:8787").unwrap(), "/");
    }

    /// A refused callback URL is named without its user info, query or fragment: one that
    /// could not be read as a URL (a space in its token, no scheme) was echoed whole on
    /// stderr, password and token included.
    #[test]
    fn a_refused_callback_url_is_named_without_its_password_or_token() {
        for (url, named) in [
            (
                "https://u:CBPASS@cb.example/h?t=CB TOKEN",
                "`https://cb.example/h`",
            ),
            ("cb.example/hooks?t=CBTOKEN", "`cb.example/hooks`"),
            ("u:CBPASS@cb.example/hooks#CBTOKEN", "`cb.example/hooks`"),
            (
                "ftp://u:CBPASS@cb.example/x?t=CBTOKEN",
                "`ftp://cb.example/x`",
            ),
        ] {
            let text = callback_path(url).unwrap_err().to_string();
            assert!(
                !text.contains("CBPASS") && !text.contains("TOKEN"),
                "{url}: {text}"
            );
            assert!(text.contains(named), "{url}: {text}");
        }
        // Nothing cut, nothing said of it.
        let text = callback_path("example.com/hooks").unwrap_err().to_string();
        assert!(text.contains("`example.com/hooks` is not"), "{text}");
    }
}
