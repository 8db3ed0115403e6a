//! Small helpers: send a request to the in-process mock and parse the envelope.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kling_mock::{MockConfig, MockKling};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower_service::Service;

/// A parsed reply.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Value,
}

impl Reply {
    pub(crate) fn code(&self) -> i64 {
        self.body["code"].as_i64().expect("code is a number")
    }

    /// Asserts an error envelope: status, code, message, request_id, and no `data`.
    #[track_caller]
    pub(crate) fn assert_error(&self, status: u16, code: i64) {
        assert_eq!(self.status.as_u16(), status, "status of {:?}", self.body);
        assert_eq!(self.code(), code, "code of {:?}", self.body);
        assert!(self.body["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(
            self.body["request_id"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert!(
            self.body.get("data").is_none(),
            "error carries data: {:?}",
            self.body
        );
        assert_eq!(self.headers["content-type"], "application/json");
    }

    /// Asserts a success envelope and returns `data`.
    #[track_caller]
    pub(crate) fn data(&self) -> &Value {
        assert_eq!(self.status, StatusCode::OK, "body {:?}", self.body);
        assert_eq!(self.code(), 0, "body {:?}", self.body);
        assert_eq!(self.body["message"], "SUCCEED");
        assert!(
            self.body["request_id"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        &self.body["data"]
    }
}

/// A caller of the in-process mock with one bearer key.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) mock: MockKling,
    pub(crate) auth: Option<String>,
}

pub(crate) fn mock(config: MockConfig) -> MockKling {
    MockKling::new(config).expect("valid config")
}

impl Caller {
    pub(crate) fn new(config: MockConfig) -> Self {
        Caller {
            mock: mock(config),
            auth: Some("Bearer test-key".into()),
        }
    }

    pub(crate) fn with_key(&self, key: &str) -> Self {
        Caller {
            mock: self.mock.clone(),
            auth: Some(format!("Bearer {key}")),
        }
    }

    pub(crate) fn without_auth(&self) -> Self {
        Caller {
            mock: self.mock.clone(),
            auth: None,
        }
    }

    pub(crate) async fn raw(&self, method: Method, path: &str, body: Bytes) -> Reply {
        let mut builder = Request::builder().method(method).uri(path);
        if let Some(auth) = &self.auth {
            builder = builder.header("authorization", auth);
        }
        let req = builder.body(Full::new(body)).expect("request");
        let resp = self.mock.clone().call(req).await.expect("not dropped");
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub(crate) async fn post(&self, path: &str, body: Value) -> Reply {
        self.raw(Method::POST, path, Bytes::from(body.to_string()))
            .await
    }

    pub(crate) async fn get(&self, path: &str) -> Reply {
        self.raw(Method::GET, path, Bytes::new()).await
    }
}

/// The default test config: Pro slots, no request-rate limit, fixed 100 s tasks.
pub(crate) fn quiet() -> MockConfig {
    MockConfig::default()
        .no_rate_limit()
        .task_duration(secs(100), secs(100))
}

pub(crate) fn secs(s: u64) -> std::time::Duration {
    std::time::Duration::from_secs(s)
}

pub(crate) async fn advance(s: u64) {
    tokio::time::advance(secs(s)).await;
}

/// Percent-encodes every byte outside RFC 3986's unreserved set (for a path segment or a query
/// value).
pub(crate) fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One callback as its receiver saw it.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) path: String,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// A callback receiver on 127.0.0.1 (real sockets: use it in real-time tests): its base URL
/// (`http://127.0.0.1:PORT`) and every POST it gets, answered 200.
pub(crate) async fn hook_receiver() -> (String, mpsc::UnboundedReceiver<Delivery>) {
    let (tx, rx) = mpsc::unbounded_channel::<Delivery>();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let _ = tx.send(Delivery {
                            path: parts.uri.path().to_owned(),
                            headers: parts.headers,
                            body,
                        });
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (base, rx)
}
