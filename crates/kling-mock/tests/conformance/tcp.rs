//! The mock over real TCP: real time, sped up, short.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use hmac::{Hmac, KeyInit as _, Mac as _};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kling_mock::{MockConfig, MockServer, Stats};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Delivery, hook_receiver};

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// 100 s tasks at speed 1000: 100 ms real.
fn fast() -> MockConfig {
    MockConfig::default()
        .no_rate_limit()
        .speed(1000.0)
        .task_duration(Duration::from_secs(100), Duration::from_secs(100))
}

async fn send(client: &HttpClient, method: &str, url: String, body: Option<Value>) -> (u16, Value) {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", "Bearer tcp-key")
        .header("content-type", "application/json")
        .body(Full::new(
            body.map(|b| Bytes::from(b.to_string())).unwrap_or_default(),
        ))
        .unwrap();
    let resp = client.request(req).await.expect("response");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).expect("json"))
}

#[tokio::test]
async fn the_server_starts_on_a_free_port_and_a_task_round_trips() {
    let server = MockServer::start(fast()).await.unwrap();
    assert!(server.base_url().starts_with("http://127.0.0.1:"));
    assert_ne!(server.addr().port(), 0);
    let base = server.base_url();
    let c = client();
    let (status, created) = send(
        &c,
        "POST",
        format!("{base}/v1/videos/text2video"),
        Some(json!({"prompt": "x"})),
    )
    .await;
    assert_eq!(status, 200);
    let id = created["data"]["task_id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (_, q) = send(&c, "GET", format!("{base}/v1/videos/text2video/{id}"), None).await;
    assert_eq!(q["data"]["task_status"], "succeed");
    let (status, err) = send(&c, "GET", format!("{base}/nope"), None).await;
    assert_eq!((status, err["code"].as_i64()), (404, Some(1202)));

    // Stats over HTTP, without auth.
    let req = Request::get(format!("{base}/__mock/stats"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let body = c
        .request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let stats: Stats = serde_json::from_slice(&body).unwrap();
    assert_eq!(stats.requests_total, 3);
    assert_eq!(stats.tasks_created, 1);
    assert_eq!(stats.tasks_finished, 1);
    assert_eq!(stats.responses_by_code["1202"], 1);
    assert_eq!(server.stats().requests_total, 3);
    server.shutdown().await;
}

#[tokio::test]
async fn an_oversized_body_over_tcp_is_1200() {
    let server = MockServer::start(fast().max_body_bytes(16)).await.unwrap();
    let (status, err) = send(
        &client(),
        "POST",
        format!("{}/v1/videos/text2video", server.base_url()),
        Some(json!({"prompt": "a prompt longer than sixteen bytes"})),
    )
    .await;
    assert_eq!((status, err["code"].as_i64()), (400, Some(1200)));
    assert!(err.get("data").is_none());
}

/// Sends one POST whose body is over a 16-byte bound on a raw socket; the bytes answered.
async fn send_oversized(server: &MockServer) -> Vec<u8> {
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    let body = r#"{"prompt":"a prompt longer than sixteen bytes"}"#;
    let head = format!(
        "POST /v1/videos/text2video HTTP/1.1\r\nhost: x\r\nauthorization: Bearer k\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    // The drop fault closes the connection; a response keeps it open (keep-alive) until the
    // timeout, so only the bytes read so far count.
    let _ = tokio::time::timeout(Duration::from_millis(500), stream.read_to_end(&mut buf)).await;
    buf
}

/// Over TCP an oversized body meets the fault injector as every other request does, and as it
/// does in process: at a drop rate of 1.0 the connection closes without a response, counted
/// as dropped (the server answered it 1200 without drawing a fault).
#[tokio::test]
async fn a_drop_fault_applies_to_an_oversized_body_over_tcp() {
    let server = MockServer::start(fast().max_body_bytes(16).drop_rate(1.0))
        .await
        .unwrap();
    let answered = send_oversized(&server).await;
    assert!(
        answered.is_empty(),
        "no response: {}",
        String::from_utf8_lossy(&answered)
    );
    let stats = server.stats();
    assert_eq!(stats.requests_total, 1);
    assert_eq!(stats.connections_dropped, 1);
    assert!(stats.responses_by_code.is_empty(), "{stats:?}");
    server.shutdown().await;
}

/// The same with the 5xx fault: an oversized body is answered 5000/5001/5002, not 1200.
#[tokio::test]
async fn a_server_error_fault_applies_to_an_oversized_body_over_tcp() {
    let server = MockServer::start(fast().max_body_bytes(16).fault_rate(1.0))
        .await
        .unwrap();
    let answered = String::from_utf8_lossy(&send_oversized(&server).await).into_owned();
    assert!(answered.starts_with("HTTP/1.1 5"), "{answered}");
    let stats = server.stats();
    assert_eq!(stats.requests_total, 1);
    assert_eq!(stats.responses("1200"), 0, "{stats:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_dropped_connection_fault_really_closes_the_connection() {
    let server = MockServer::start(fast().drop_rate(1.0)).await.unwrap();
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    stream
        .write_all(b"GET /account/costs HTTP/1.1\r\nhost: x\r\nauthorization: Bearer k\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "no response bytes: {read:?} {buf:?}"
    );
    assert_eq!(server.stats().connections_dropped, 1);
}

/// Over TCP a slow answer's create is made when the request arrives: a client that hangs up
/// before the answer (its timeout) leaves the task made, billed, as a real server does. hyper
/// drops the service's future when the client goes away, and the mock slept before handling,
/// so no task was made. The answer itself, never sent, is not counted by its code.
#[tokio::test]
async fn a_slow_answer_over_tcp_makes_its_task_though_the_client_hangs_up() {
    // 500 s of API time at speed 1000: half a second of real time.
    let server = MockServer::start(fast().slow(1.0, Duration::from_secs(500)))
        .await
        .unwrap();
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    let body = r#"{"prompt":"x","external_task_id":"slow-tcp"}"#;
    let head = format!(
        "POST /v1/videos/text2video HTTP/1.1\r\nhost: x\r\nauthorization: Bearer k\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while server.stats().requests_total == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The client gives up before the answer.
    drop(stream);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let stats = server.stats();
    assert_eq!(stats.requests_total, 1);
    assert_eq!(stats.tasks_created, 1, "made on arrival: {stats:?}");
    assert!(stats.responses_by_code.is_empty(), "{stats:?}");
    server.shutdown().await;
}

/// A client that opens a connection and sends half a header is cut off once the header read
/// timeout passes: it held the connection (and its task) for good. A whole request on the same
/// server is answered (the control), and the timeout is configurable and validated.
#[tokio::test]
async fn a_connection_that_sends_half_a_header_is_closed_after_the_timeout() {
    let config = fast().header_read_timeout(Duration::from_millis(200));
    let server = MockServer::start(config).await.unwrap();
    let mut half = TcpStream::connect(server.addr()).await.unwrap();
    half.write_all(b"GET /__mock/stats HTTP/1.1\r\nHost: mock\r\nX-Half: ")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(10), half.read(&mut buf))
        .await
        .expect("the server closed the connection");
    // Closed (EOF or a reset), whatever hyper answers first.
    if let Ok(n) = read {
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(150), "{waited:?}");

    let mut whole = TcpStream::connect(server.addr()).await.unwrap();
    whole
        .write_all(b"GET /__mock/stats HTTP/1.1\r\nHost: mock\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    whole.read_to_end(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");

    // An idle keep-alive connection waits for its next header: it is closed the same way.
    let mut idle = TcpStream::connect(server.addr()).await.unwrap();
    idle.write_all(b"GET /nope HTTP/1.1\r\nHost: mock\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut answer))
        .await
        .expect("the idle connection was closed");
    assert!(closed.is_ok(), "{closed:?}");
    assert!(answer.starts_with(b"HTTP/1.1 "), "{answer:?}");

    assert_eq!(
        MockConfig::default().header_read_timeout,
        Some(kling_mock::DEFAULT_HEADER_READ_TIMEOUT)
    );
    let zero = MockServer::start(fast().header_read_timeout(Duration::ZERO)).await;
    let error = zero.expect_err("a zero timeout is refused");
    assert!(error.to_string().contains("header_read_timeout"), "{error}");
}

/// A client that sends a whole header and half its body is cut off once the header read
/// timeout passes again: it held the connection (its task and up to `max_body_bytes` of
/// buffer) for good, as the half header did before. A whole request is still answered.
#[tokio::test]
async fn a_connection_that_sends_half_a_body_is_closed_after_the_timeout() {
    let config = fast().header_read_timeout(Duration::from_millis(200));
    let server = MockServer::start(config).await.unwrap();
    let mut half = TcpStream::connect(server.addr()).await.unwrap();
    half.write_all(
        b"POST /v1/videos/text2video HTTP/1.1\r\nHost: mock\r\nAuthorization: Bearer k\r\n\
          Content-Length: 100\r\n\r\n{\"prompt\"",
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), half.read_to_end(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed without an answer: {read:?} {:?}",
        String::from_utf8_lossy(&buf)
    );
    assert!(started.elapsed() >= Duration::from_millis(150));
    let stats = server.stats();
    assert_eq!(
        (stats.requests_total, stats.tasks_created),
        (0, 0),
        "{stats:?}"
    );

    let (status, _) = send(
        &client(),
        "POST",
        format!("{}/v1/videos/text2video", server.base_url()),
        Some(json!({"prompt": "x"})),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_server_stops_when_shut_down() {
    let server = MockServer::start(fast()).await.unwrap();
    let addr = server.addr();
    server.shutdown().await;
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn callbacks_are_delivered_signed_at_each_status_change() {
    let key = b"callback-key-bytes";
    let secret = format!("whsec_{}", STANDARD.encode(key));
    let (base, mut rx) = hook_receiver().await;
    let hook = format!("{base}/hook");

    let server = MockServer::start(fast().callback_secret(secret))
        .await
        .unwrap();
    let (status, _) = send(
        &client(),
        "POST",
        format!("{}/v1/videos/text2video", server.base_url()),
        Some(json!({"prompt": "x", "callback_url": hook, "external_task_id": "cb-1"})),
    )
    .await;
    assert_eq!(status, 200);

    let mut statuses = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let Delivery {
            path,
            headers,
            body,
        } = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("callback in time")
            .expect("callback");
        assert_eq!(path, "/hook");
        let id = headers["webhook-id"].to_str().unwrap().to_owned();
        let ts = headers["webhook-timestamp"].to_str().unwrap().to_owned();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(ts.parse::<u64>().unwrap().abs_diff(now) < 300);
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(&body);
        let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
        assert_eq!(headers["webhook-signature"].to_str().unwrap(), expected);
        let task: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(task["task_info"]["external_task_id"], "cb-1");
        statuses.push(task["task_status"].as_str().unwrap().to_owned());
        ids.push(id);
    }
    assert_eq!(statuses, ["processing", "succeed"]);
    assert_ne!(ids[0], ids[1], "webhook-id is unique per message");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.stats().callbacks_sent < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.stats().callbacks_sent, 2);
    assert_eq!(server.stats().callbacks_failed, 0);
}

/// During a key rotation a callback carries one signature per secret, space-separated, the
/// main secret's first (Standard Webhooks; KLING_API.md "Callbacks"). Only one was ever sent,
/// so a verifier that read the header as a single signature passed against the mock.
#[tokio::test]
async fn during_a_key_rotation_a_callback_carries_a_signature_per_secret() {
    let new_key = b"the-new-key";
    let (base, mut rx) = hook_receiver().await;
    let config = fast()
        .callback_secret(format!("whsec_{}", STANDARD.encode(new_key)))
        .callback_rotated_secret("the-old-key");
    let server = MockServer::start(config).await.unwrap();
    let (status, _) = send(
        &client(),
        "POST",
        format!("{}/text-to-video/kling-3.0", server.base_url()),
        Some(json!({"prompt": "x", "options": {"callback_url": format!("{base}/hook")}})),
    )
    .await;
    assert_eq!(status, 200);
    let Delivery { headers, body, .. } = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("callback in time")
        .expect("callback");
    let id = headers["webhook-id"].to_str().unwrap();
    let ts = headers["webhook-timestamp"].to_str().unwrap();
    let expected: Vec<String> = [&new_key[..], b"the-old-key"]
        .iter()
        .map(|key| {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
            mac.update(format!("{id}.{ts}.").as_bytes());
            mac.update(&body);
            format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
        })
        .collect();
    assert_eq!(
        headers["webhook-signature"].to_str().unwrap(),
        expected.join(" ")
    );
}

#[tokio::test]
async fn result_urls_point_at_the_server_which_serves_the_files() {
    let server = MockServer::start(fast()).await.unwrap();
    let base = server.base_url();
    let c = client();
    let (_, created) = send(
        &c,
        "POST",
        format!("{base}/v1/images/generations"),
        Some(json!({"prompt": "x", "n": 2})),
    )
    .await;
    let id = created["data"]["task_id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (_, q) = send(
        &c,
        "GET",
        format!("{base}/v1/images/generations/{id}"),
        None,
    )
    .await;
    let images = q["data"]["task_result"]["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let url = images[1]["url"].as_str().unwrap();
    assert_eq!(url, format!("{base}/__mock/files/{id}/1.png"));
    let fetch = |url: String| {
        let c = c.clone();
        async move {
            let resp = c
                .request(Request::get(url).body(Full::new(Bytes::new())).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            resp.into_body().collect().await.unwrap().to_bytes()
        }
    };
    let first = fetch(url.to_owned()).await;
    assert_eq!(first.len(), 4096);
    assert_eq!(first, kling_mock::file_bytes(&format!("{id}/1.png")));
    assert_eq!(
        fetch(url.to_owned()).await,
        first,
        "the same bytes every time"
    );

    // An in-process mock keeps the non-resolvable host unless told otherwise (a trailing
    // slash on the base it is told is not doubled).
    for (config, base) in [
        (fast(), "https://mock.klingai.invalid/outputs"),
        (
            fast().files_base_url("http://files.example/out/"),
            "http://files.example/out",
        ),
    ] {
        let caller = crate::support::Caller::new(config);
        let created = caller
            .post("/v1/images/generations", json!({"prompt": "x", "n": 2}))
            .await;
        let id = created.data()["task_id"].as_str().unwrap().to_owned();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let q = caller.get(&format!("/v1/images/generations/{id}")).await;
        let urls: Vec<&str> = q.data()["task_result"]["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|image| image["url"].as_str().unwrap())
            .collect();
        assert_eq!(
            urls,
            [format!("{base}/{id}/0.png"), format!("{base}/{id}/1.png")],
            "{q:?}"
        );
    }
}
