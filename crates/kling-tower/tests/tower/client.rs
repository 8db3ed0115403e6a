//! The clients' connections must open in time, TLS handshake included: a server that accepts
//! and never answers fails the request as never sent (a create may be repeated), not as an
//! attempt that timed out after it may have been sent. What happens once the request left (a
//! reset, a stalled or oversized body) is maybe sent, and ends at the attempt timeout or at the
//! body limit.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use kling_core::ClassifyLayer;
use kling_core::error::SendState;
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};

/// A server on loopback that accepts connections and never says a word (its TLS handshake
/// never starts), with its address.
async fn silent_server() -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    (format!("https://{address}"), held)
}

fn create(base: &str) -> Request<Full<Bytes>> {
    Request::post(format!("{base}/v1/videos/text2video"))
        .body(Full::new(Bytes::from_static(br#"{"prompt":"x"}"#)))
        .unwrap()
}

#[tokio::test]
async fn a_handshake_that_never_comes_is_a_connect_error_never_sent() {
    let (base, server) = silent_server().await;
    let client =
        kling_tower::client::https_client_with_connect_timeout(Duration::from_millis(300)).unwrap();
    let service = ClassifyLayer::new().layer(client);
    let answered = tokio::time::timeout(Duration::from_secs(10), service.oneshot(create(&base)))
        .await
        .expect("the connect timeout bounds the TLS handshake too");
    let error = answered.unwrap_err();
    assert_eq!(SendState::of(&*error), SendState::NotSent, "{error}");
    server.abort();
}

#[cfg(feature = "reqwest")]
#[tokio::test]
async fn reqwest_reports_a_handshake_that_never_comes_as_never_sent() {
    use kling_tower::client::ReqwestService;

    let (base, server) = silent_server().await;
    kling_tower::client::install_ring_provider();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let service = ClassifyLayer::new().layer(ReqwestService::new(client));
    let answered = tokio::time::timeout(Duration::from_secs(10), service.oneshot(create(&base)))
        .await
        .expect("reqwest's connect timeout bounds the TLS handshake too");
    let error = answered.unwrap_err();
    assert_eq!(SendState::of(&*error), SendState::NotSent, "{error}");
    server.abort();
}

/// reqwest quotes the URL in its errors; a proxy's credentials in it stay out of them (errors
/// end up in logs).
#[cfg(feature = "reqwest")]
#[tokio::test]
async fn reqwest_errors_do_not_quote_credentials_in_the_url() {
    use kling_tower::client::ReqwestService;

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = closed.local_addr().unwrap();
    drop(closed);
    let service = ClassifyLayer::new().layer(ReqwestService::new_client().unwrap());
    let mut request = create(&format!("http://user:hunter2@{address}"));
    *request.uri_mut() =
        format!("http://user:hunter2@{address}/tasks?external_task_ids=job-secret-7")
            .parse()
            .unwrap();
    let error = service.oneshot(request).await.unwrap_err();
    let mut chain = Vec::new();
    let mut link: Option<&(dyn std::error::Error + 'static)> = Some(&*error);
    while let Some(e) = link {
        chain.push(e.to_string());
        link = e.source();
    }
    let chain = chain.join(": ");
    assert!(!chain.contains("hunter2"), "{chain}");
    assert!(!chain.contains("user:"), "{chain}");
    assert!(
        !chain.contains("job-secret-7"),
        "the query stays out too: {chain}"
    );
    assert_eq!(SendState::of(&*error), SendState::NotSent, "{chain}");
}

/// A stack whose attempt timeout (2 s) is shorter than the clients' default connect timeout
/// (10 s), over a client built with the stack's own `connect_timeout_duration`: a connection
/// that never opens is a create never sent, and holds no slot. With the default connect
/// timeout, the attempt timed out first and the create counted as maybe sent, its slot kept for
/// the task lease.
#[tokio::test]
async fn under_a_short_attempt_timeout_the_stacks_connect_timeout_keeps_a_stalled_create_unsent() {
    use kling_tower::{Credentials, KlingLayer, StackConfig, Tier};

    let (base, server) = silent_server().await;
    let config = StackConfig::preset(Tier::Pro)
        .attempt_timeout(Duration::from_secs(2))
        .retry_max_attempts(1);
    assert!(config.connect_timeout_duration() < config.attempt_timeout_duration());
    let kling = KlingLayer::builder(config.clone(), Credentials::api_key("k").unwrap())
        .base_url(&base)
        .build()
        .unwrap();
    let client =
        kling_tower::client::https_client_with_connect_timeout(config.connect_timeout_duration())
            .unwrap();
    let stack = kling.layer(client);
    let error = tokio::time::timeout(Duration::from_secs(10), stack.oneshot(create(&base)))
        .await
        .expect("the connect timeout ends it")
        .unwrap_err();
    assert_eq!(SendState::of(&*error), SendState::NotSent, "{error}");
    let snapshot = kling.slots().snapshot().await.unwrap();
    assert!(
        snapshot.pools().iter().all(|p| p.in_use == 0),
        "{snapshot:?}"
    );
    server.abort();
}

/// A create answered with a redirect is the answer: reqwest's client from `new_client` does not
/// send it again as a `GET` elsewhere.
#[cfg(feature = "reqwest")]
#[tokio::test]
async fn reqwest_new_client_follows_no_redirect() {
    use kling_tower::client::ReqwestService;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let server = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buffer = vec![0; 4096];
            let n = socket.read(&mut buffer).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&buffer[..n]).to_string();
            log.lock()
                .unwrap()
                .push(head.lines().next().unwrap_or_default().to_owned());
            let answer = "HTTP/1.1 302 Found\r\nlocation: /elsewhere\r\ncontent-length: 0\r\n\
                          connection: close\r\n\r\n";
            let _ = socket.write_all(answer.as_bytes()).await;
        }
    });
    let service = ReqwestService::new_client().unwrap();
    let response = service
        .oneshot(create(&format!("http://{address}")))
        .await
        .unwrap();
    assert_eq!(response.status(), 302);
    assert_eq!(
        *seen.lock().unwrap(),
        vec!["POST /v1/videos/text2video HTTP/1.1".to_owned()]
    );
    server.abort();
}

/// How a test server treats a request it has read in full.
#[derive(Clone, Copy)]
enum Answer {
    /// Resets the connection without a word.
    Reset,
    /// Sends the head and part of a 100-byte body, then nothing more.
    Stall,
    /// Sends a chunked body that never ends.
    Endless,
    /// Declares a body larger than any limit.
    Declared,
}

/// A server on loopback that reads each request in full (head and `content-length` body) and
/// then answers as `answer` says; with its `http://` base.
async fn answering(answer: Answer) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut read = Vec::new();
                let mut buffer = [0; 4096];
                loop {
                    let n = socket.read(&mut buffer).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    read.extend_from_slice(&buffer[..n]);
                    let text = String::from_utf8_lossy(&read).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|l| l.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if read.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                match answer {
                    Answer::Reset => {
                        socket.set_zero_linger().unwrap();
                        drop(socket);
                    }
                    Answer::Stall => {
                        let head = "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"code\":0,";
                        let _ = socket.write_all(head.as_bytes()).await;
                        std::future::pending::<()>().await;
                    }
                    Answer::Endless => {
                        let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                        let _ = socket.write_all(head.as_bytes()).await;
                        let chunk = format!("400\r\n{}\r\n", " ".repeat(0x400));
                        while socket.write_all(chunk.as_bytes()).await.is_ok() {}
                    }
                    Answer::Declared => {
                        let head = "HTTP/1.1 200 OK\r\ncontent-length: 99999999999\r\n\r\n{";
                        let _ = socket.write_all(head.as_bytes()).await;
                        std::future::pending::<()>().await;
                    }
                }
            });
        }
    });
    format!("http://{address}")
}

/// Through the stack's attempt: timeout, classify, over `client`.
async fn attempt<C>(client: C, base: &str) -> kling_core::BoxError
where
    C: tower::Service<Request<Full<Bytes>>> + Send + 'static,
    kling_core::Classify<C>: tower::Service<
            Request<Full<Bytes>>,
            Response = http::Response<Full<Bytes>>,
            Error = kling_core::BoxError,
        >,
{
    use kling_tower::timeout::AttemptTimeoutLayer;
    let service = AttemptTimeoutLayer::new(Duration::from_secs(2))
        .layer(ClassifyLayer::new().max_body_bytes(64 * 1024).layer(client));
    tokio::time::timeout(Duration::from_secs(10), service.oneshot(create(base)))
        .await
        .expect("ends")
        .unwrap_err()
}

/// What the attempt's error must be for each answer: its send state and its kind.
fn check(client: &str, answer: Answer, error: &kling_core::BoxError) {
    use kling_core::error::BodyTooLarge;

    let text = format!("{client}: {error}");
    assert_eq!(SendState::of(&**error), SendState::Unknown, "{text}");
    let large = || {
        let mut link: Option<&(dyn std::error::Error + 'static)> = Some(&**error);
        while let Some(e) = link {
            if let Some(large) = e.downcast_ref::<BodyTooLarge>() {
                return Some(large.limit());
            }
            link = e.source();
        }
        None
    };
    match answer {
        Answer::Reset => assert!(
            !error.is::<tower::timeout::error::Elapsed>() && large().is_none(),
            "reported as the reset it is: {text}"
        ),
        Answer::Stall => assert!(
            error.is::<tower::timeout::error::Elapsed>(),
            "the attempt timeout covers the body: {text}"
        ),
        Answer::Endless | Answer::Declared => {
            assert_eq!(large(), Some(64 * 1024), "{text}");
            assert!(text.contains("65536-byte limit"), "{text}");
        }
    }
}

const ANSWERS: [Answer; 4] = [
    Answer::Reset,
    Answer::Stall,
    Answer::Endless,
    Answer::Declared,
];

/// Over hyper-util, real sockets: a connection reset once the request was written is "maybe
/// sent" (a create must be looked up, not repeated); a body that stalls midway fails at the
/// attempt timeout; a body that never ends, or declares more than the limit, fails with an
/// error naming the limit as soon as it passes it (not at the timeout, after buffering it).
#[tokio::test]
async fn hyper_reports_what_happens_after_the_request_left() {
    for answer in ANSWERS {
        let base = answering(answer).await;
        let client = kling_tower::client::https_client().unwrap();
        check("hyper", answer, &attempt(client, &base).await);
    }
}

/// The same over reqwest.
#[cfg(feature = "reqwest")]
#[tokio::test]
async fn reqwest_reports_what_happens_after_the_request_left() {
    for answer in ANSWERS {
        let base = answering(answer).await;
        let client = kling_tower::client::ReqwestService::new_client().unwrap();
        check("reqwest", answer, &attempt(client, &base).await);
    }
}

/// A hand-composed stack with no base URL layer hands the client a relative URI. hyper-util's
/// client fails it before sending anything, but with an error that is no connect error: it read
/// as maybe sent, so the retry layer and the task slots took a create that made nothing for one
/// that may have made a task. It is never sent, and its error quotes no query.
#[tokio::test]
async fn a_relative_uri_sent_straight_to_the_https_client_is_never_sent() {
    let service = ClassifyLayer::new().layer(kling_tower::client::https_client().unwrap());
    let mut request = create("");
    *request.uri_mut() = "/v1/videos/text2video?external_task_ids=job-secret-7"
        .parse()
        .unwrap();
    let error = service.oneshot(request).await.unwrap_err();
    assert_eq!(SendState::of(&*error), SendState::NotSent, "{error}");
    assert!(!kling_core::error::may_have_created(&*error), "{error}");
    let shown = error.to_string();
    assert!(shown.contains("/v1/videos/text2video"), "{shown}");
    assert!(!shown.contains("job-secret-7"), "{shown}");
}

/// A loopback server answering every request with a Kling envelope, its base URL, and how many
/// connections it has taken.
async fn counting_server() -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let server = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let mut buffer = [0; 4096];
            let _ = socket.read(&mut buffer).await;
            let body = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t1","task_status":"submitted"}}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(answer.as_bytes()).await;
        }
    });
    (base, connections, server)
}

/// An HTTP/2 request to the HTTP/1.1 client `https_client` builds: hyper-util connects, then
/// refuses it unsent with an error that is no connect error, which read as maybe sent (a create
/// that made nothing held its slot for the task lease). It is refused as never sent, before any
/// connection opens; the same request as HTTP/1.1 is sent (the control).
#[tokio::test]
async fn an_http2_request_to_the_http1_client_is_never_sent() {
    use std::sync::atomic::Ordering;

    let (base, connections, server) = counting_server().await;
    let service = ClassifyLayer::new().layer(kling_tower::client::https_client().unwrap());
    let mut request = create(&base);
    *request.version_mut() = http::Version::HTTP_2;
    let error = service.clone().oneshot(request).await.unwrap_err();
    assert_eq!(SendState::of(&*error), SendState::NotSent, "{error}");
    assert!(!kling_core::error::may_have_created(&*error), "{error}");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "no connection opened"
    );

    let response = service.oneshot(create(&base)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    server.abort();
}

/// `HttpsClient::new` hands an HTTP/2 request to a client of one's own, which may speak it;
/// when the connection is HTTP/1.1 (here a client that speaks nothing else, over `http://`),
/// hyper-util refuses it once connected and before writing it, with `UserUnsupportedVersion`,
/// which read as maybe sent. It fails as never sent.
#[tokio::test]
async fn an_http2_request_an_own_client_cannot_send_on_its_connection_is_never_sent() {
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;
    use kling_tower::client::{ConnectTimeout, HttpsClient};

    let (base, _, server) = counting_server().await;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .unwrap()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let client = Client::builder(TokioExecutor::new())
        .build(ConnectTimeout::new(connector, Duration::from_secs(5)));
    let service = ClassifyLayer::new().layer(HttpsClient::new(client));
    let mut request = create(&base);
    *request.version_mut() = http::Version::HTTP_2;
    let error = service.clone().oneshot(request).await.unwrap_err();
    assert_eq!(SendState::of(&*error), SendState::NotSent, "{error:?}");
    assert!(!kling_core::error::may_have_created(&*error), "{error:?}");

    let response = service.oneshot(create(&base)).await.unwrap();
    assert_eq!(response.status(), 200);
    server.abort();
}

/// The same HTTP/2 request through a bare hyper-util client (no [`HttpsClient`] around it,
/// under the classify step alone): kling-core reads hyper-util's refusal of its version as
/// never sent (`SendState::of`), as it reads its connect errors.
#[tokio::test]
async fn an_http2_request_a_bare_hyper_util_client_cannot_send_reads_as_never_sent() {
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    let (base, _, server) = counting_server().await;
    let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let service = ClassifyLayer::new().layer(client);
    let mut request = create(&base);
    *request.version_mut() = http::Version::HTTP_2;
    let error = service.clone().oneshot(request).await.unwrap_err();
    assert_eq!(SendState::of(&*error), SendState::NotSent, "{error:?}");
    assert!(!kling_core::error::may_have_created(&*error), "{error:?}");
    let response = service.oneshot(create(&base)).await.unwrap();
    assert_eq!(response.status(), 200);
    server.abort();
}

/// The same through the stack's retry layer, hand-composed without a base URL layer: a create
/// never sent fails as never sent, not as a create that may have made a task, and at once
/// (every attempt would be refused alike: it was tried until its attempts ran out, backing off
/// between them). So does an HTTP/2 request to the HTTP/1.1 client.
#[tokio::test(start_paused = true)]
async fn a_hand_composed_stack_without_a_base_url_reports_a_relative_create_as_never_sent() {
    use kling_tower::retry::RetryLayer;

    let retry = RetryLayer::builder().max_attempts(5).build().unwrap();
    let service =
        retry.layer(ClassifyLayer::new().layer(kling_tower::client::https_client().unwrap()));
    let mut http2 = create("http://127.0.0.1:9");
    *http2.version_mut() = http::Version::HTTP_2;
    for request in [create(""), http2] {
        let started = tokio::time::Instant::now();
        let error = service.clone().oneshot(request).await.unwrap_err();
        assert_eq!(SendState::of(&*error), SendState::NotSent, "{error}");
        assert!(!kling_core::error::may_have_created(&*error), "{error}");
        assert!(kling_core::error::will_recur(&*error), "{error}");
        assert_eq!(started.elapsed(), Duration::ZERO, "no backoff: {error}");
    }
}

/// reqwest refuses a relative URI, and a scheme other than `http` or `https`, before sending:
/// both are never sent (the scheme's error was a builder error, which read as maybe sent).
#[cfg(feature = "reqwest")]
#[tokio::test]
async fn reqwest_reports_a_request_it_refuses_before_sending_as_never_sent() {
    use kling_tower::client::ReqwestService;

    let service = ClassifyLayer::new().layer(ReqwestService::new_client().unwrap());
    for uri in [
        "/v1/videos/text2video",
        "ftp://127.0.0.1/v1/videos/text2video",
    ] {
        let mut request = create("");
        *request.uri_mut() = uri.parse().unwrap();
        let error = service.clone().oneshot(request).await.unwrap_err();
        assert_eq!(SendState::of(&*error), SendState::NotSent, "{uri}: {error}");
        assert!(kling_core::error::will_recur(&*error), "{uri}: {error}");
    }
}

/// Through the retry layer, reqwest's refusals fail at once: each attempt would meet them again.
#[cfg(feature = "reqwest")]
#[tokio::test(start_paused = true)]
async fn reqwest_refusals_are_not_retried() {
    use kling_tower::client::ReqwestService;
    use kling_tower::retry::RetryLayer;

    let retry = RetryLayer::builder().max_attempts(5).build().unwrap();
    let service = retry.layer(ClassifyLayer::new().layer(ReqwestService::new_client().unwrap()));
    for uri in [
        "/v1/videos/text2video",
        "ftp://127.0.0.1/v1/videos/text2video",
    ] {
        let mut request = create("");
        *request.uri_mut() = uri.parse().unwrap();
        let started = tokio::time::Instant::now();
        let error = service.clone().oneshot(request).await.unwrap_err();
        assert_eq!(SendState::of(&*error), SendState::NotSent, "{uri}: {error}");
        assert_eq!(started.elapsed(), Duration::ZERO, "{uri}: {error}");
    }
}
