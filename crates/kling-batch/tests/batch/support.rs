//! Shared fixtures: a temporary directory, a jobs file, the binary, the results.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kling_mock::{MockConfig, Preset};
use serde_json::Value;

/// The speed factor of these tests: a minute of Kling in 0.6 s.
pub(crate) const SPEED: f64 = 100.0;

/// The mock of these tests: Pro, sped up, tasks of 20–40 s (0.2–0.4 s real).
pub(crate) fn pro_mock() -> MockConfig {
    MockConfig::preset(Preset::Pro)
        .speed(SPEED)
        .task_duration(Duration::from_secs(20), Duration::from_secs(40))
}

/// A fresh directory for one test.
pub(crate) fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kling-batch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `n` text-to-video jobs (`job-1` …) to `dir/jobs.jsonl`.
pub(crate) fn write_jobs(dir: &Path, n: usize) -> PathBuf {
    write_jobs_named(dir, "job", n)
}

/// Writes `n` text-to-video jobs `{name}-1` … to `dir/jobs.jsonl`.
pub(crate) fn write_jobs_named(dir: &Path, name: &str, n: usize) -> PathBuf {
    let text: String = (1..=n)
        .map(|i| format!("{{\"id\":\"{name}-{i}\",\"prompt\":\"shot {i}\"}}\n"))
        .collect();
    let path = dir.join("jobs.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

/// `kling-batch run JOBS` against `base_url` at the test speed, Pro tier; `extra` args added.
pub(crate) fn run_command(jobs: &Path, base_url: &str, extra: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kling-batch"));
    cmd.arg("run")
        .arg(jobs)
        .args(["--base-url", base_url, "--tier", "pro", "--quiet"])
        .args(["--speed", &SPEED.to_string()])
        .args(extra)
        .env("KLING_API_KEY", "test-key")
        // Real-time jitter does not speed up: keep a few ms between requests at the mock.
        .env("KLING_HEADROOM", "0.3")
        .env_remove("KLING_ACCESS_KEY")
        .env_remove("KLING_SECRET_KEY")
        .env_remove("KLING_TIER")
        .env_remove("KLING_SPEED")
        .kill_on_drop(true);
    cmd
}

/// Runs a command to the end (at most 60 s).
pub(crate) async fn finish(mut cmd: tokio::process::Command) -> Output {
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the run ends within a minute")
        .expect("the binary runs")
}

/// Waits until the mock has created at least `n` tasks.
pub(crate) async fn until_created(server: &kling_mock::MockServer, n: u64) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while server.stats().tasks_created < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the run creates tasks");
}

/// The output JSONL's lines.
pub(crate) fn results(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The lines of `results` in `state`.
pub(crate) fn in_state<'a>(results: &'a [Value], state: &str) -> Vec<&'a Value> {
    results.iter().filter(|r| r["state"] == state).collect()
}

/// The `--json` summary a run printed on stdout.
pub(crate) fn summary(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "stdout is one JSON object ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// A bare hyper-util client: no stack.
pub(crate) fn bare_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}
