//! `kling-batch demo --json` on its default settings (Pro, 100 jobs, 60×): the README's first
//! command. It takes about 30 s of real time: the demo's own length.

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_demo_completes_every_job_unrefused_and_near_the_bound() {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kling-batch"));
    cmd.args(["demo", "--json"]).kill_on_drop(true);
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
    for code in ["1302", "1303"] {
        assert!(
            server["responses_by_code"].get(code).is_none(),
            "{code}: {s}"
        );
    }
    assert_eq!(s["bound_basis"], "mock");
    let efficiency = s["efficiency"].as_f64().unwrap();
    assert!(efficiency >= 0.9, "efficiency {efficiency}: {s}");
    assert!(s["makespan_secs"].as_f64().unwrap() < 60.0);
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
        "--speed",
        "100",
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
