//! [`ReqwestService`]: a `reqwest::Client` as a `tower::Service<http::Request<_>>`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response};
use kling_core::error::NotSent;
use kling_core::{BoxError, PeekBody};
use pin_project_lite::pin_project;
use tower_service::Service;

type Pending = <reqwest::Client as Service<reqwest::Request>>::Future;

/// A `reqwest::Client` as a `Service<http::Request<B>>` whose responses carry reqwest's body,
/// which `kling_core::ClassifyLayer` reads (bounded) into `Response<Full<Bytes>>`.
///
/// A failed connect, and a request reqwest refuses before sending it (a relative URI, sent with
/// no [`BaseUrlLayer`](crate::BaseUrlLayer) under the stack, or a scheme other than `http` and
/// `https`), becomes a [`NotSent`] error, so the layers above know a create surely did not
/// happen (a refusal marked [`NotSent::for_good`]: every attempt would meet it, so the retry
/// layer returns it at once); other reqwest errors pass as they are (the request may have been sent). One of
/// those is never sent too, and read so by kling-core's `SendState::of` in its chain:
/// hyper-util's refusal of an HTTP version the connection does not speak (an HTTP/2 request
/// over HTTP/1.1, [`kling_core::error::refused_version`]).
///
/// Build the client with [`ReqwestService::new_client`], or install the `ring` provider
/// ([`install_ring_provider`](super::install_ring_provider)) before building your own.
///
/// # Clone
///
/// Clones share reqwest's connection pool.
#[derive(Clone, Debug)]
pub struct ReqwestService {
    client: reqwest::Client,
}

impl ReqwestService {
    /// Wraps a client.
    pub fn new(client: reqwest::Client) -> Self {
        ReqwestService { client }
    }

    /// A default reqwest client on rustls with the `ring` provider, whose connections must
    /// open (TCP connect and TLS handshake) within
    /// [`DEFAULT_CONNECT_TIMEOUT`](super::DEFAULT_CONNECT_TIMEOUT): a host that never answers
    /// then fails as a connect error ([`NotSent`]) rather than as a timed-out attempt, which
    /// the stack must treat as maybe sent. It follows no redirect and sends nothing for a
    /// loopback host through a proxy (see
    /// [`new_client_with_connect_timeout`](Self::new_client_with_connect_timeout)). A client of
    /// your own should set `connect_timeout` and `redirect(Policy::none())` too, and keep
    /// loopback hosts out of its proxies (`NO_PROXY=localhost,127.0.0.0/8,::1`, or
    /// `no_proxy()`).
    ///
    /// It trusts the system's root certificates, not built-in ones: where the system has none
    /// (a `scratch` image; on Linux, no CA bundle and no `SSL_CERT_FILE`), building it fails
    /// with "No CA certificates were loaded from the system".
    pub fn new_client() -> Result<Self, reqwest::Error> {
        ReqwestService::new_client_with_connect_timeout(super::DEFAULT_CONNECT_TIMEOUT)
    }

    /// [`new_client`](Self::new_client) whose connections give up opening after `connect`:
    /// under a stack whose attempt timeout is short, its
    /// [`StackConfig::connect_timeout_duration`](crate::StackConfig::connect_timeout_duration).
    ///
    /// No redirect is followed: reqwest would send a create answered `302` again as a `GET`
    /// (or a `307` to an address no layer checked), and the stack must see the answer Kling
    /// gave.
    ///
    /// The proxy variables are read as reqwest reads them (`HTTPS_PROXY`, `HTTP_PROXY`,
    /// `ALL_PROXY`, `NO_PROXY`, in upper or lower case; none under CGI), except that a loopback
    /// host (`localhost`, `127.0.0.0/8`, `::1`: the mock, a local proxy) is always reached
    /// directly: a plain `http://` request to it, with the stack's credentials, would otherwise
    /// cross the network to the proxy in cleartext.
    pub fn new_client_with_connect_timeout(connect: Duration) -> Result<Self, reqwest::Error> {
        ReqwestService::build(connect, |name| std::env::var(name).ok())
    }

    /// [`new_client_with_connect_timeout`](Self::new_client_with_connect_timeout) with the
    /// proxy variables read through `lookup`.
    fn build(
        connect: Duration,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, reqwest::Error> {
        super::install_ring_provider();
        let builder = reqwest::Client::builder()
            .connect_timeout(connect)
            .redirect(reqwest::redirect::Policy::none());
        let client = with_env_proxies(builder, lookup).build()?;
        Ok(ReqwestService::new(client))
    }

    /// The client.
    pub fn get_ref(&self) -> &reqwest::Client {
        &self.client
    }

    /// Unwraps the client.
    pub fn into_inner(self) -> reqwest::Client {
        self.client
    }
}

impl<B: PeekBody> Service<Request<B>> for ReqwestService {
    type Response = Response<reqwest::Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> ResponseFuture {
        let request = request.map(|body| body.peek_bytes());
        match reqwest::Request::try_from(request) {
            Ok(request) => ResponseFuture {
                state: State::Sending {
                    future: self.client.call(request),
                },
            },
            Err(e) => ResponseFuture {
                state: State::Failed {
                    error: Some(Box::new(NotSent::for_good(e))),
                },
            },
        }
    }
}

/// The hosts no proxy is used for, beside those `NO_PROXY` names: loopback, in every form the
/// base URL layer accepts plain `http://` to (`localhost` with or without its final dot,
/// `127.0.0.0/8`, `::1`, and `127.0.0.0/8` mapped into IPv6), because such a request does not
/// leave the machine; a proxy from `HTTP_PROXY` would take it, `Authorization` header and all,
/// across the network.
const LOOPBACK: &str = "localhost,localhost.,127.0.0.0/8,::1,::ffff:127.0.0.0/104";

/// `builder` with the proxies of the environment as reqwest's own reading of it would set them
/// (hyper-util's `Matcher::from_env`: `HTTPS_PROXY` for `https://`, `HTTP_PROXY` for
/// `http://`, else `ALL_PROXY`; `NO_PROXY`; none at all under CGI, where `HTTP_PROXY` may come
/// from a request's `Proxy` header; an unusable value is skipped), and [`LOOPBACK`] hosts never
/// proxied.
fn with_env_proxies(
    builder: reqwest::ClientBuilder,
    lookup: impl Fn(&str) -> Option<String>,
) -> reqwest::ClientBuilder {
    let mut builder = builder.no_proxy();
    if lookup("REQUEST_METHOD").is_some() {
        return builder;
    }
    let first = |names: [&str; 2]| names.into_iter().find_map(&lookup);
    let no_proxy = first(["NO_PROXY", "no_proxy"]).unwrap_or_default();
    let direct = reqwest::NoProxy::from_string(&format!("{no_proxy},{LOOPBACK}"));
    type Make = fn(String) -> reqwest::Result<reqwest::Proxy>;
    let proxies: [([&str; 2], Make); 3] = [
        (["HTTPS_PROXY", "https_proxy"], reqwest::Proxy::https),
        (["HTTP_PROXY", "http_proxy"], reqwest::Proxy::http),
        (["ALL_PROXY", "all_proxy"], reqwest::Proxy::all),
    ];
    for (names, make) in proxies {
        let Some(url) = first(names).filter(|url| !url.trim().is_empty()) else {
            continue;
        };
        if let Ok(proxy) = make(url) {
            builder = builder.proxy(proxy.no_proxy(direct.clone()));
        }
    }
    builder
}

/// `error` with its URL cut to scheme, host and path: reqwest's message quotes the URL, errors
/// end up in logs, and a URL may carry a user name and password (a proxy's, in a base URL) and
/// a query (task and external ids), which the stack's logs never show.
fn without_credentials(mut error: reqwest::Error) -> reqwest::Error {
    if let Some(url) = error.url_mut() {
        if !url.username().is_empty() || url.password().is_some() {
            let _ = url.set_password(None);
            let _ = url.set_username("");
        }
        url.set_query(None);
    }
    error
}

pin_project! {
    /// The [`ReqwestService`] response future.
    pub struct ResponseFuture {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        Sending { #[pin] future: Pending },
        Failed { error: Option<BoxError> },
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<reqwest::Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Sending { future } => match ready!(future.poll(cx)) {
                Ok(response) => Poll::Ready(Ok(response.into())),
                // A builder error is reqwest refusing the request before sending it (a scheme
                // other than `http` or `https`, a URL no URI holds), as it will every time.
                Err(e) if e.is_builder() => {
                    Poll::Ready(Err(Box::new(NotSent::for_good(without_credentials(e)))))
                }
                Err(e) if e.is_connect() => {
                    Poll::Ready(Err(Box::new(NotSent::new(without_credentials(e)))))
                }
                Err(e) => Poll::Ready(Err(Box::new(without_credentials(e)))),
            },
            StateProj::Failed { error } => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| "polled after completion".into()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::Full;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tower::ServiceExt;

    use super::*;

    /// A server on loopback that notes each request's first line and whether it carried an
    /// `Authorization` header, and answers `answer`; with its port.
    async fn noting(answer: &'static str) -> (u16, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut read = Vec::new();
                let mut buffer = [0; 4096];
                while !read.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buffer).await {
                        Ok(n) if n > 0 => read.extend_from_slice(&buffer[..n]),
                        _ => break,
                    }
                }
                let head = String::from_utf8_lossy(&read).to_ascii_lowercase();
                let line = head.lines().next().unwrap_or_default().to_owned();
                let authorized = head.contains("\r\nauthorization: bearer key-7");
                log.lock()
                    .unwrap()
                    .push(format!("{line} auth={authorized}"));
                let _ = socket.write_all(answer.as_bytes()).await;
            }
        });
        (port, seen)
    }

    fn create(url: &str) -> Request<Full<Bytes>> {
        Request::post(url)
            .header("authorization", "Bearer key-7")
            .body(Full::new(Bytes::from_static(br#"{"prompt":"x"}"#)))
            .unwrap()
    }

    /// With every proxy variable pointing at a proxy, a request to a loopback host (the mock, a
    /// local proxy; the only hosts plain `http://` may go to) still goes straight there: its
    /// `Authorization` header never reaches the proxy. Requests to other hosts still go
    /// through the proxy (the control: the variables are read).
    #[tokio::test]
    async fn a_proxy_from_the_environment_never_carries_a_loopback_request() {
        const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";
        const BAD_GATEWAY: &str =
            "HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        let (mock, at_mock) = noting(OK).await;
        let (proxy, at_proxy) = noting(BAD_GATEWAY).await;
        let proxy_url = format!("http://127.0.0.1:{proxy}");
        let variables = move |name: &str| {
            ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"]
                .contains(&name)
                .then(|| proxy_url.clone())
        };
        let service = ReqwestService::build(Duration::from_secs(5), variables).unwrap();

        for host in ["127.0.0.1", "localhost"] {
            let url = format!("http://{host}:{mock}/v1/videos/text2video");
            let response = service.clone().oneshot(create(&url)).await.unwrap();
            assert_eq!(response.status(), 200, "{host}");
        }
        assert_eq!(
            *at_mock.lock().unwrap(),
            vec!["post /v1/videos/text2video http/1.1 auth=true"; 2]
        );
        // The other loopback forms the base URL layer accepts: reached directly too, or not at
        // all (a machine without IPv6, a resolver that does not know `localhost.`), never
        // through the proxy.
        for host in ["127.0.0.2", "[::1]", "[::ffff:127.0.0.1]", "localhost."] {
            let url = format!("http://{host}:{mock}/v1/videos/text2video");
            let _ = service.clone().oneshot(create(&url)).await;
            assert!(at_proxy.lock().unwrap().is_empty(), "{host}");
        }

        let elsewhere = service
            .clone()
            .oneshot(create("http://kling.invalid/v1/videos/text2video"))
            .await
            .unwrap();
        assert_eq!(elsewhere.status(), 502);
        let tunnel = service
            .oneshot(create(
                "https://api-singapore.klingai.com/v1/videos/text2video",
            ))
            .await;
        assert!(tunnel.is_err(), "the proxy refused the tunnel");
        assert_eq!(
            *at_proxy.lock().unwrap(),
            vec![
                "post http://kling.invalid/v1/videos/text2video http/1.1 auth=true".to_owned(),
                "connect api-singapore.klingai.com:443 http/1.1 auth=false".to_owned(),
            ],
            "only the requests to other hosts went through the proxy"
        );
    }
}
