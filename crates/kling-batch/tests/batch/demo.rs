//! `kling-batch demo --json` on its default settings (Pro, 100 jobs, 60×): the README's first
//! command. It takes about 30 s of real time: the demo's own length. How near the bound it
//! finishes is a speed target, shown in paused time by kling-bench's goodput, not here.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use kling_mock::{MockConfig, MockServer, Preset};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_demo_completes_every_job_without_a_slot_refusal() {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kling-batch"));
    // A base URL set for `run` in the environment does not send the demo anywhere but its
    // own mock (nothing listens on port 9).
    cmd.args(["demo", "--json"])
        .env("KLING_BASE_URL", "http://127.0.0.1:9")
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("the demo finishes within about a minute")
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let s = crate::support::summary(&output);
    assert_eq!(
        (s["jobs"].as_u64(), s["ok"].as_u64()),
        (Some(100), Some(100)),
        "{s}"
    );
    let server = &s["server"];
    assert_eq!(server["tasks_created"], 100);
    assert_eq!(server["duplicate_external_ids"], 0);
    assert!(server["responses_by_code"].get("1303").is_none(), "{s}");
    // The demo paces requests with a 5 ms real-time margin (`demo::JITTER_MARGIN`); on a
    // machine loaded enough to hold one request back longer than that on its way to the
    // mock, the next can reach it early and meet a 1302, which the retry layer absorbs. On a
    // quiet machine there are none (the README's run); without the stack's pacing, 6 in 106.
    // The zero-429 targets are checked exactly in paused time (kling-bench's goodput).
    let rate_refusals = server["responses_by_code"]
        .get("1302")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let requests = s["requests"].as_u64().unwrap();
    assert!(
        rate_refusals * 100 < 3 * requests,
        "{rate_refusals} 1302s in {requests} requests: {s}"
    );
    assert_eq!(s["retries"].as_u64(), Some(rate_refusals), "{s}");
    assert_eq!(s["bound_basis"], "mock");

    // Negative control: the demo's 100 creates at once from a bare client, on the demo's mock
    // settings (Pro at 60×) without the rate check, which answers before the slots are looked
    // at and would turn all but one into 1302s: the five slots refuse the rest with 1303.
    let server = MockServer::start(MockConfig::preset(Preset::Pro).speed(60.0).no_rate_limit())
        .await
        .unwrap();
    let client = crate::support::bare_client();
    let creates: Vec<_> = (0..100)
        .map(|i| {
            let request =
                http::Request::post(format!("{}/v1/videos/text2video", server.base_url()))
                    .header("authorization", "Bearer kling-batch-demo")
                    .body(Full::new(Bytes::from(format!(
                        r#"{{"prompt":"shot {i}"}}"#
                    ))))
                    .unwrap();
            client.request(request)
        })
        .collect();
    for create in creates {
        create.await.unwrap();
    }
    let stats = server.stats();
    let slot_refusals = stats.responses("1303");
    assert!(slot_refusals >= 50, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demo_serves_prometheus_metrics_while_it_runs() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kling-batch"));
    cmd.args([
        "demo",
        "--json",
        "--jobs",
        "15",
        // Some 6 s of run to scrape in: at 100 (3 s) a loaded machine once let it end unseen.
        "--speed",
        "50",
        "--metrics-addr",
    ])
    .arg(format!("127.0.0.1:{port}"))
    .stdout(std::process::Stdio::piped())
    .kill_on_drop(true);
    let child = cmd.spawn().unwrap();
    let client = crate::support::bare_client();
    let scraped = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let request = http::Request::get(format!("http://127.0.0.1:{port}/metrics"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            if let Ok(response) = client.request(request).await {
                let body = http_body_util::BodyExt::collect(response.into_body())
                    .await
                    .unwrap();
                let text = String::from_utf8(body.to_bytes().to_vec()).unwrap();
                if text.contains("kling_responses_total") {
                    return text;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("metrics are served while the demo runs");
    assert!(scraped.contains("code=\"0\""), "{scraped}");
    let output = child.wait_with_output().await.unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(crate::support::summary(&output)["ok"], 15);
}
