//! Whole runs: everything completes, nothing is refused, credits running out.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use kling_mock::MockServer;

use crate::support::{
    bare_client, finish, in_state, pro_mock, results, run_command, summary, temp_dir, write_jobs,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_jobs_on_pro_all_complete_without_a_refused_create() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("sixty");
    let jobs = write_jobs(&dir, 60);
    let out = dir.join("out.jsonl");
    let output = finish(run_command(
        &jobs,
        &server.base_url(),
        &[
            "--json",
            "-o",
            out.to_str().unwrap(),
            "--callback-listen",
            "127.0.0.1:0",
        ],
    ))
    .await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let lines = results(&out);
    assert_eq!(lines.len(), 60);
    assert_eq!(in_state(&lines, "succeeded").len(), 60);
    assert!(
        lines
            .iter()
            .all(|l| l["urls"].as_array().is_some_and(|u| u.len() == 1))
    );
    let s = summary(&output);
    assert_eq!((s["jobs"].as_u64(), s["ok"].as_u64()), (Some(60), Some(60)));
    assert_eq!(s["creates"], 60);

    let stats = server.stats();
    assert_eq!(stats.tasks_created, 60);
    assert_eq!(stats.duplicate_external_ids, 0);
    // The slot limit's check (the mock refuses a sixth task, so its peak never shows more).
    assert_eq!(stats.responses_by_code.get("1303"), None, "{stats:?}");
    assert!(stats.callbacks_sent > 0, "the run listened for callbacks");
}

/// The sixty creates of the run above, at once from a bare client (no stack) on a mock of
/// `config`: the mock's counts.
async fn sixty_bare_creates(config: kling_mock::MockConfig) -> kling_mock::Stats {
    let server = MockServer::start(config).await.unwrap();
    let client = bare_client();
    let mut sends = Vec::new();
    for i in 0..60 {
        let request = Request::post(format!("{}/v1/videos/text2video", server.base_url()))
            .header("authorization", "Bearer test-key")
            .body(Full::new(Bytes::from(format!(
                "{{\"prompt\":\"shot {i}\"}}"
            ))))
            .unwrap();
        sends.push(client.request(request));
    }
    for send in sends {
        send.await.unwrap();
    }
    server.stats()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_sixty_creates_from_a_bare_client_are_refused() {
    // Negative control: the mock enforces Pro's limits, so a client without the stack is
    // refused: on the same settings by the rate (a burst of one), which the mock checks
    // first, ...
    let stats = sixty_bare_creates(pro_mock()).await;
    assert!(stats.responses("1302") >= 50, "{stats:?}");
    // ... and, with the rate check off so that creates reach them, by the five slots.
    let stats = sixty_bare_creates(pro_mock().no_rate_limit()).await;
    assert!(stats.responses("1303") >= 50, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_credits_run_out_creates_stop_and_the_rest_are_not_submitted() {
    let server = MockServer::start(pro_mock().credits(12.0)).await.unwrap();
    let dir = temp_dir("credits");
    let jobs = write_jobs(&dir, 60);
    let out = dir.join("out.jsonl");
    let output = finish(run_command(
        &jobs,
        &server.base_url(),
        &["--json", "-o", out.to_str().unwrap()],
    ))
    .await;
    assert_eq!(output.status.code(), Some(1), "not every job ran");

    let stats = server.stats();
    assert_eq!(stats.creates_after_1102, 0, "{stats:?}");
    assert_eq!(stats.tasks_created, 12);
    assert_eq!(
        stats.responses_by_code.get("1102"),
        Some(&1),
        "one create saw 1102, no more"
    );

    let lines = results(&out);
    assert_eq!(in_state(&lines, "succeeded").len(), 12);
    let rest = in_state(&lines, "not_submitted");
    assert_eq!(rest.len(), 48);
    assert!(rest.iter().all(|l| l["error"]["code"] == 1102), "{rest:?}");
    assert!(rest.iter().all(|l| l.get("task_id").is_none()));
    let s = summary(&output);
    assert_eq!(s["not_submitted"], 48);
    assert_eq!(s["rejections_429"]["1102"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_answered_5000_after_the_task_was_made_are_not_paid_twice() {
    // A third of the creates are "ghosts": the mock creates and bills the task, then answers
    // 5000. The stack looks each one up by its external id instead of creating it again.
    let server = MockServer::start(pro_mock().ghost_create_rate(0.3).seed(7))
        .await
        .unwrap();
    let dir = temp_dir("ghosts");
    let jobs = write_jobs(&dir, 20);
    let out = dir.join("out.jsonl");
    let output = finish(run_command(
        &jobs,
        &server.base_url(),
        &["-o", out.to_str().unwrap()],
    ))
    .await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stats = server.stats();
    // Ghosts answer 5000 and 5002 in turn.
    assert!(
        stats.responses("5000") + stats.responses("5002") >= 2,
        "{stats:?}"
    );
    assert_eq!(
        (stats.tasks_created, stats.duplicate_external_ids),
        (20, 0),
        "{stats:?}"
    );
    assert_eq!(in_state(&results(&out), "succeeded").len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_and_new_style_jobs_run_side_by_side_in_their_own_pools() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("mixed");
    let jobs = dir.join("jobs.jsonl");
    let text: String = (1..=16)
        .map(|i| {
            if i % 2 == 0 {
                format!("{{\"id\":{i},\"prompt\":\"new {i}\",\"endpoint\":\"/text-to-video/kling-3.0\"}}\n")
            } else {
                format!("{{\"id\":{i},\"prompt\":\"legacy {i}\"}}\n")
            }
        })
        .collect();
    std::fs::write(&jobs, text).unwrap();
    let out = dir.join("out.jsonl");
    let output = finish(run_command(
        &jobs,
        &server.base_url(),
        &["-o", out.to_str().unwrap()],
    ))
    .await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stats = server.stats();
    assert_eq!(stats.tasks_created, 16);
    assert!(stats.max_concurrent["video"] <= 5);
    assert!(stats.max_concurrent["video:kling-3.0"] <= 5);
    assert_eq!(stats.responses_by_code.get("1303"), None, "{stats:?}");
    let lines = results(&out);
    assert_eq!(in_state(&lines, "succeeded").len(), 16);
    assert!(
        lines[1]["urls"][0]
            .as_str()
            .unwrap()
            .contains("/__mock/files/")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_error_while_following_keeps_the_jobs_created_and_a_rerun_finishes_them() {
    use std::time::Duration;

    use kling_mock::{MockConfig, Preset, Switches};

    // Tasks of 60–120 s (0.6–1.2 s real): the account falls into arrears while they run.
    let server = MockServer::start(MockConfig::preset(Preset::Pro).speed(crate::support::SPEED))
        .await
        .unwrap();
    let dir = temp_dir("arrears");
    let jobs = write_jobs(&dir, 3);
    let journal = dir.join("journal.sqlite");
    let out = dir.join("out.jsonl");
    let args = [
        "--journal",
        journal.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--json",
    ];
    let run = run_command(&jobs, &server.base_url(), &args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        while server.stats().tasks_created < 3 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the run creates its tasks");
    server.mock().set_switches(Switches::new().arrears(true));
    let output = tokio::time::timeout(Duration::from_secs(60), run.wait_with_output())
        .await
        .expect("the run ends")
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The queries said nothing about the tasks, which run on: the jobs stay `created`.
    let lines = results(&out);
    assert_eq!(in_state(&lines, "created").len(), 3, "{lines:?}");
    assert!(
        lines.iter().all(|l| l["error"]["code"] == 1101),
        "{lines:?}"
    );
    let s = summary(&output);
    assert_eq!(s["unfinished"], 3, "{s}");
    assert_eq!(
        s["unfinished_by_reason"]["1101 account in arrears"], 3,
        "{s}"
    );

    // Paid up: the next run follows the same tasks to their end and creates nothing.
    server.mock().set_switches(Switches::new());
    let output = finish(run_command(&jobs, &server.base_url(), &args)).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let after = results(&out);
    assert_eq!(in_state(&after, "succeeded").len(), 3, "{after:?}");
    for (before, after) in lines.iter().zip(&after) {
        assert_eq!(before["task_id"], after["task_id"]);
    }
    assert_eq!(server.stats().tasks_created, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_api_key_halts_the_run_after_one_create_and_a_rerun_with_the_right_key_finishes() {
    // The most common first-run mistake: a key the account (or the region) does not know.
    // Kling answers 1002 and the retry layer says nothing was made: no lookup, no job left
    // of unknown outcome, and no second create to be refused the same way.
    let server = MockServer::start(pro_mock().api_key("right-key"))
        .await
        .unwrap();
    let dir = temp_dir("wrong-key");
    let jobs = write_jobs(&dir, 6);
    let journal = dir.join("journal.sqlite");
    let out = dir.join("out.jsonl");
    let args = [
        "--journal",
        journal.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--json",
    ];
    let mut wrong = run_command(&jobs, &server.base_url(), &args);
    wrong.env("KLING_API_KEY", "wrong-key");
    let output = finish(wrong).await;
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stats = server.stats();
    assert_eq!(stats.requests_total, 1, "one create, no lookup: {stats:?}");
    assert_eq!(stats.responses_by_code.get("1002"), Some(&1), "{stats:?}");

    let lines = results(&out);
    let not_submitted = in_state(&lines, "not_submitted");
    assert_eq!(not_submitted.len(), 6, "{lines:?}");
    assert!(
        not_submitted.iter().all(|l| l["error"]["code"] == 1002),
        "{lines:?}"
    );
    let s = summary(&output);
    assert_eq!(s["unknown"], 0, "{s}");
    assert_eq!(s["not_submitted"], 6, "{s}");
    assert_eq!(s["not_submitted_by_reason"]["1002 invalid key"], 6, "{s}");
    assert_eq!(s["requests"], 1, "{s}");

    // The key fixed, the next run creates every job once.
    let mut right = run_command(&jobs, &server.base_url(), &args);
    right.env("KLING_API_KEY", "right-key");
    let output = finish(right).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(in_state(&results(&out), "succeeded").len(), 6);
    let stats = server.stats();
    assert_eq!(
        (stats.tasks_created, stats.duplicate_external_ids),
        (6, 0),
        "{stats:?}"
    );
}

/// `--callback-url` with a path of its own (a reverse proxy forwarding `/hooks/kling` as it
/// is): the listener serves that path, and every callback is taken. It served only
/// `/kling/callback`, so each callback met a 404 and the run silently fell back on queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_to_the_path_of_the_callback_url_are_taken() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("callback-path");
    let jobs = write_jobs(&dir, 6);
    let out = dir.join("out.jsonl");
    // A free port for the listener (taken back at once; nothing else here binds one).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{addr}/hooks/kling");
    let listen = addr.to_string();
    let output = finish(run_command(
        &jobs,
        &server.base_url(),
        &[
            "--json",
            "-o",
            out.to_str().unwrap(),
            "--callback-listen",
            &listen,
            "--callback-url",
            &url,
        ],
    ))
    .await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(in_state(&results(&out), "succeeded").len(), 6);
    let stats = server.stats();
    assert!(stats.callbacks_sent > 0, "{stats:?}");
    assert_eq!(
        stats.callbacks_failed, 0,
        "every callback was taken: {stats:?}"
    );
}
