//! Fixtures: a scripted in-process Kling stand-in that records when each request reached it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use kling_core::{AccountId, BoxError};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

pub(crate) type Req = Request<Full<Bytes>>;
pub(crate) type Res = Response<Full<Bytes>>;

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub(crate) struct Hit {
    pub(crate) at: Instant,
    pub(crate) account: Option<String>,
    pub(crate) tag: String,
}

/// A canned answer.
#[derive(Clone, Debug)]
pub(crate) struct Reply {
    status: u16,
    code: i64,
    headers: Vec<(&'static str, String)>,
    /// A body other than an envelope of `code` (a proxy's page).
    page: Option<&'static str>,
}

impl Reply {
    pub(crate) fn ok() -> Self {
        Reply::status(200, 0)
    }

    pub(crate) fn throttled() -> Self {
        Reply::status(429, 1302)
    }

    pub(crate) fn status(status: u16, code: i64) -> Self {
        Reply {
            status,
            code,
            headers: Vec::new(),
            page: None,
        }
    }

    /// A page without a Kling envelope, as a proxy or gateway answers.
    pub(crate) fn page(status: u16, body: &'static str) -> Self {
        Reply {
            page: Some(body),
            ..Reply::status(status, 0)
        }
    }

    pub(crate) fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub(crate) fn to_response(&self) -> Res {
        let body = match self.page {
            Some(page) => page.to_owned(),
            None => format!(r#"{{"code":{},"message":"m","request_id":"r"}}"#, self.code),
        };
        let mut builder = Response::builder().status(self.status);
        for (name, value) in &self.headers {
            builder = builder.header(*name, value.as_str());
        }
        builder.body(Full::new(Bytes::from(body))).unwrap()
    }
}

/// The stand-in server: answers from a script (then success), after an optional latency.
#[derive(Clone, Default)]
pub(crate) struct Server {
    hits: Arc<Mutex<Vec<Hit>>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
    latency: Duration,
}

impl Server {
    pub(crate) fn new() -> Self {
        Server::default()
    }

    pub(crate) fn with_latency(latency: Duration) -> Self {
        Server {
            latency,
            ..Server::default()
        }
    }

    /// The next answers, in order.
    pub(crate) fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.script.lock().unwrap().extend(replies);
    }

    pub(crate) fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// The hits' tags, in arrival order.
    pub(crate) fn tags(&self) -> Vec<String> {
        self.hits().into_iter().map(|h| h.tag).collect()
    }

    /// Milliseconds since `start` at which each tag arrived.
    pub(crate) fn times_ms(&self, start: Instant) -> Vec<(String, u128)> {
        self.hits()
            .into_iter()
            .map(|h| (h.tag, (h.at - start).as_millis()))
            .collect()
    }

    pub(crate) fn service(
        &self,
    ) -> impl Service<Req, Response = Res, Error = BoxError, Future = impl Send + use<>>
    + Clone
    + Send
    + 'static
    + use<> {
        let server = self.clone();
        tower::service_fn(move |req: Req| {
            let server = server.clone();
            async move {
                let hit = Hit {
                    at: Instant::now(),
                    account: AccountId::of(&req).map(|a| a.to_string()),
                    tag: req
                        .headers()
                        .get("x-tag")
                        .map_or_else(String::new, |v| v.to_str().unwrap().to_owned()),
                };
                server.hits.lock().unwrap().push(hit);
                let reply = server
                    .script
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or_else(Reply::ok);
                if !server.latency.is_zero() {
                    tokio::time::sleep(server.latency).await;
                }
                Ok::<_, BoxError>(reply.to_response())
            }
        })
    }
}

/// A request tagged `tag`, for `account` (none: the shared key), to a legacy create path.
pub(crate) fn request(account: Option<&str>, tag: &str) -> Req {
    request_to("/v1/videos/text2video", account, tag)
}

pub(crate) fn request_to(path: &str, account: Option<&str>, tag: &str) -> Req {
    let method = if path.contains("account") {
        http::Method::GET
    } else {
        http::Method::POST
    };
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("x-tag", tag)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    if let Some(account) = account {
        req.extensions_mut().insert(AccountId::new(account));
    }
    req
}

/// A `/account/costs` request of account `a` tagged `tag`: one of the account class.
pub(crate) fn costs(tag: &str) -> Req {
    request_to("/account/costs", Some("a"), tag)
}

/// A builder of ten requests a second, of which the account class may take one.
pub(crate) fn class_gated() -> kling_ratelimit::Builder<kling_ratelimit::InProcess> {
    kling_ratelimit::GcraLayer::builder(kling_ratelimit::Quota::per_second(10.0)).class_quota(
        kling_core::RequestKind::Account,
        kling_ratelimit::Quota::per_second(1.0),
    )
}

/// Sends one request through a fresh clone of `service`.
pub(crate) async fn send<S>(service: &S, req: Req) -> Result<Res, BoxError>
where
    S: Service<Req, Response = Res, Error = BoxError> + Clone,
{
    service.clone().oneshot(req).await
}

/// Spawns one call and lets it run until it waits, so calls queue in spawn order.
pub(crate) async fn spawn_call<S>(
    service: &S,
    req: Req,
) -> tokio::task::JoinHandle<Result<Res, BoxError>>
where
    S: Service<Req, Response = Res, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    let handle = tokio::spawn(service.clone().oneshot(req));
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
    handle
}

pub(crate) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
