//! A proxy, gateway or WAF in front of Kling answering with a page of its own (no Kling
//! envelope): the run's stack reads each such answer once, as the kling-tower stack does.
//! And a server answering with a code Kling does not document.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;
use kling_batch::stack::Stack;
use kling_core::error::MalformedResponse;
use kling_tower::{Credentials, StackConfig, Tier};
use tower::ServiceExt as _;

use crate::support::{finish, in_state, results, run_command, summary, temp_dir, write_jobs};

/// What the server was sent: when, the method, the path and query.
type Log = Arc<Mutex<Vec<(Instant, Method, String)>>>;

/// A Kling answer to a create.
const CREATED: &str = r#"{"code":0,"message":"SUCCEED","request_id":"r1","data":{"task_id":"t1","task_status":"submitted"}}"#;

/// A server on loopback answering request `n` (from 1) with `answer(n)`, logging each one.
async fn serve(
    answer: impl Fn(usize) -> axum::response::Response + Clone + Send + Sync + 'static,
) -> (String, Log) {
    let log: Log = Arc::default();
    let seen = log.clone();
    let count = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let seen = seen.clone();
        let answer = answer.clone();
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            seen.lock().unwrap().push((
                Instant::now(),
                request.method().clone(),
                request.uri().to_string(),
            ));
            answer(n)
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), log)
}

/// A proxy's HTML page with `status`, and a `Retry-After` when given.
fn page(status: StatusCode, retry_after: Option<&'static str>) -> axum::response::Response {
    let html = format!("<html><body><h1>{status}</h1><hr>nginx</body></html>");
    let mut response = (status, axum::response::Html(html)).into_response();
    if let Some(after) = retry_after {
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static(after));
    }
    response
}

fn create() -> Request<Full<Bytes>> {
    Request::post("/v1/videos/text2video")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(br#"{"prompt":"a cat"}"#)))
        .unwrap()
}

fn stack(base_url: &str) -> Stack {
    Stack::new(
        StackConfig::preset(Tier::Pro),
        Credentials::api_key("test-key").unwrap(),
        base_url,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_404_page_on_a_create_costs_one_request_and_reads_as_a_malformed_response() {
    let (base, log) = serve(|_| page(StatusCode::NOT_FOUND, None)).await;
    let stack = stack(&base);
    let err = stack.service().oneshot(create()).await.unwrap_err();

    let sent = log.lock().unwrap().clone();
    assert_eq!(sent.len(), 1, "only the create, no lookup: {sent:?}");
    assert_eq!(sent[0].1, Method::POST);
    let page = err
        .downcast_ref::<MalformedResponse>()
        .unwrap_or_else(|| panic!("a MalformedResponse, not a transport failure: {err}"));
    assert_eq!(page.status(), StatusCode::NOT_FOUND);
    assert_eq!(stack.attempts().requests(), 1);
    assert_eq!(stack.attempts().pages().get(&404), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_429_page_is_sent_again_after_its_retry_after_and_never_looked_up() {
    let (base, log) = serve(|n| {
        if n == 1 {
            page(StatusCode::TOO_MANY_REQUESTS, Some("1"))
        } else {
            (StatusCode::OK, CREATED).into_response()
        }
    })
    .await;
    let stack = stack(&base);
    let response = stack.service().oneshot(create()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let sent = log.lock().unwrap().clone();
    let methods: Vec<&Method> = sent.iter().map(|(_, m, _)| m).collect();
    assert_eq!(methods, [Method::POST, Method::POST], "{sent:?}");
    let waited = sent[1].0.duration_since(sent[0].0);
    assert!(waited >= Duration::from_millis(950), "{waited:?}");
    assert_eq!(stack.attempts().requests(), 2);
    assert_eq!(stack.attempts().of(0), 1);
    assert_eq!(stack.attempts().pages().get(&429), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_behind_a_proxy_answering_404_sends_each_create_once_and_leaves_no_job_unknown() {
    let (base, log) = serve(|_| page(StatusCode::NOT_FOUND, None)).await;
    let dir = temp_dir("proxy-404");
    let jobs = write_jobs(&dir, 2);
    let out = dir.join("out.jsonl");
    let output = finish(run_command(
        &jobs,
        &base,
        &["--json", "-o", out.to_str().unwrap()],
    ))
    .await;
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let sent = log.lock().unwrap().clone();
    assert!(
        sent.len() == 2 && sent.iter().all(|(_, m, _)| m == Method::POST),
        "one create per job, no lookup: {sent:?}"
    );

    // Nothing was made: each job is not submitted (the next run sends it again), saying why.
    let lines = results(&out);
    let not_submitted = in_state(&lines, "not_submitted");
    assert_eq!(not_submitted.len(), 2, "{lines:?}");
    for line in not_submitted {
        let message = line["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("http 404"), "{line}");
    }
    let s = summary(&output);
    assert_eq!(s["unknown"], 0, "{s}");
    assert_eq!(s["requests"], 2, "{s}");
    assert_eq!(s["pages_by_status"]["404"], 2, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_refused_with_an_undocumented_code_and_a_4xx_fails_its_job_after_one_lookup() {
    // A Kling envelope with a code KLING_API.md does not list, under HTTP 400: kling-core
    // reads it as made nothing and final, so once the lookup finds nothing the job has
    // failed, as for a documented refusal, rather than being sent again by the next run.
    let (base, log) = serve(|n| {
        if n == 1 {
            let body = r#"{"code":1999,"message":"refused","request_id":"r1"}"#;
            (StatusCode::BAD_REQUEST, body).into_response()
        } else {
            let body = r#"{"code":1203,"message":"task not found","request_id":"r2"}"#;
            (StatusCode::NOT_FOUND, body).into_response()
        }
    })
    .await;
    let dir = temp_dir("unknown-code-4xx");
    let jobs = write_jobs(&dir, 1);
    let out = dir.join("out.jsonl");
    let output = finish(run_command(
        &jobs,
        &base,
        &["--json", "-o", out.to_str().unwrap()],
    ))
    .await;
    let sent = log.lock().unwrap().clone();
    let methods: Vec<&Method> = sent.iter().map(|(_, m, _)| m).collect();
    assert_eq!(methods, [Method::POST, Method::GET], "{sent:?}");

    let lines = results(&out);
    let failed = in_state(&lines, "failed");
    assert_eq!(failed.len(), 1, "{lines:?}");
    assert_eq!(failed[0]["error"]["code"], 1999, "{}", failed[0]);
    let s = summary(&output);
    assert_eq!(s["unknown"], 0, "{s}");
}
