//! Bad input: malformed lines, missing credentials, impossible configuration.

use kling_mock::MockServer;

use crate::support::{finish, pro_mock, results, run_command, summary, temp_dir};

const JOBS: &str = "{\"id\":\"a\",\"prompt\":\"one\"}\n{\"id\":\"b\",\"prompt\":\"two\"}\n{\"prompt\": oops\n{\"id\":\"d\",\"prompt\":\"four\"}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_line_is_reported_with_its_number_skipped_and_counted() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("malformed");
    let jobs = dir.join("jobs.jsonl");
    // A byte order mark before line 1 (an editor's), and a line 5 that is not UTF-8.
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend_from_slice(JOBS.as_bytes());
    bytes.extend_from_slice(b"{\"id\":\"e\",\"prompt\":\"caf\xE9\"}\n");
    std::fs::write(&jobs, bytes).unwrap();
    let out = dir.join("out.jsonl");
    let output = finish(run_command(
        &jobs,
        &server.base_url(),
        &["-o", out.to_str().unwrap(), "--json"],
    ))
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("jobs.jsonl: line 3: not valid JSON"),
        "{stderr}"
    );
    assert!(
        stderr.contains("jobs.jsonl: line 5: not valid UTF-8"),
        "{stderr}"
    );
    assert!(stderr.contains("(skipped)"), "{stderr}");
    // The other jobs ran, but the file's jobs did not all: not a clean exit.
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(summary(&output)["skipped_lines"], 2);
    assert_eq!(summary(&output)["ok"], 3);
    let ids: Vec<String> = results(&out)
        .iter()
        .map(|l| l["job_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["a", "b", "d"]);
    assert_eq!(server.stats().tasks_created, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_refuses_the_file_and_sends_nothing() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("strict");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(&jobs, JOBS).unwrap();
    let output = finish(run_command(&jobs, &server.base_url(), &["--strict"])).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("line 3"), "{stderr}");
    assert!(stderr.contains("nothing was sent"), "{stderr}");
    assert_eq!(server.stats().requests_total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_credential_names_the_variable_to_set() {
    let dir = temp_dir("nokey");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(&jobs, "{\"prompt\":\"x\"}\n").unwrap();
    let mut cmd = run_command(&jobs, "http://127.0.0.1:9", &[]);
    cmd.env_remove("KLING_API_KEY");
    let output = finish(cmd).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("KLING_API_KEY"), "{stderr}");

    let mut cmd = run_command(&jobs, "http://127.0.0.1:9", &[]);
    cmd.env_remove("KLING_API_KEY")
        .env("KLING_ACCESS_KEY", "ak");
    let stderr = String::from_utf8_lossy(&finish(cmd).await.stderr).into_owned();
    assert!(stderr.contains("KLING_SECRET_KEY"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_names_the_field() {
    let dir = temp_dir("badconfig");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(&jobs, "{\"prompt\":\"x\"}\n").unwrap();
    let config = dir.join("kling.toml");
    std::fs::write(&config, "tier = \"pro\"\nslots = 0\n").unwrap();
    let output = finish({
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kling-batch"));
        cmd.arg("run")
            .arg(&jobs)
            .arg("--config")
            .arg(&config)
            .env("KLING_API_KEY", "k");
        cmd
    })
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("slots"), "{stderr}");

    // An option out of range names the option.
    let output = finish(run_command(&jobs, "http://127.0.0.1:9", &["--speed", "0"])).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--speed"), "{stderr}");
}
