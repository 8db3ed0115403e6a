//! Two runs of one account at once, sharing its limits through Redis (`--redis`, feature
//! `redis`), against one mock that enforces the Pro tier's limits. The runs' jobs are named
//! apart, so they never share a job id (nor an external id).

use kling_mock::{MockServer, Stats as MockStats};
use kling_redis::testing::RedisServer;

use crate::support::{finish, pro_mock, results, run_command, summary, temp_dir, write_jobs_named};

/// Runs two processes of 30 jobs each on one account at once (sharing `redis`, if given);
/// with `all_succeed`, checks every job of both succeeded. Returns the mock's counts, and what
/// both runs wrote on stderr (a Redis that stopped answering is warned about there: shown
/// when a check fails, as the reason a run paced alone).
async fn two_runs(
    name: &str,
    redis: Option<&RedisServer>,
    all_succeed: bool,
) -> (MockStats, String) {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let mut runs = Vec::new();
    for run in ["a", "b"] {
        let dir = temp_dir(&format!("{name}-{run}"));
        let jobs = write_jobs_named(&dir, run, 30);
        let out = dir.join("out.jsonl");
        let mut extra = vec![
            "--json".to_owned(),
            "-o".to_owned(),
            out.to_str().unwrap().to_owned(),
        ];
        if let Some(redis) = redis {
            extra.extend(["--redis".to_owned(), redis.url()]);
            extra.extend(["--redis-prefix".to_owned(), name.to_owned()]);
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let command = run_command(&jobs, &server.base_url(), &extra);
        runs.push((tokio::spawn(finish(command)), out));
    }
    let mut stderr = String::new();
    for (run, out) in runs {
        let output = run.await.unwrap();
        stderr.push_str(&String::from_utf8_lossy(&output.stderr));
        if !all_succeed {
            continue;
        }
        assert_eq!(
            output.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(summary(&output)["ok"], 30);
        assert_eq!(results(&out).len(), 30);
    }
    (server.stats(), stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runs_sharing_redis_never_exceed_the_accounts_slots() {
    let Some(redis) = RedisServer::start_or_skip().expect("CI=true requires a redis-server") else {
        return;
    };
    let (stats, stderr) = two_runs("shared", Some(&redis), true).await;
    assert_eq!(stats.tasks_created, 60, "{stats:?}");
    assert_eq!(stats.duplicate_external_ids, 0, "{stats:?}");
    // No create over the account's 5 slots (the mock refuses a sixth, so this is the check,
    // not its peak), and no request over its rate the pacing could have prevented: a request
    // held back on a loaded machine can reach the mock early once, which the retry layer
    // absorbs (kling-tower's e2e allows the same one); a pacing fault meets a dozen or more
    // (the control below).
    assert_eq!(stats.responses("1303"), 0, "{stats:?}\n{stderr}");
    assert!(stats.responses("1302") <= 1, "{stats:?}\n{stderr}");

    // The control: the same two runs, each counting the account's slots and rate as its own,
    // are refused. They mostly recover through the retry layer, paying for it in 429s (3–7
    // 1303s and 17–36 1302s in three runs), but on a loaded machine a job can run out of
    // attempts (a CI run saw one run exit 1): only the refusals are the control's point. Each
    // kind is asserted on its own, and the 1302s well above the one the shared runs may meet.
    let (stats, _) = two_runs("apart", None, false).await;
    assert!(stats.responses("1303") >= 1, "{stats:?}");
    assert!(stats.responses("1302") >= 10, "{stats:?}");
}

#[tokio::test]
async fn an_unusable_redis_url_is_refused_before_anything_is_sent() {
    let dir = temp_dir("bad-redis");
    let jobs = write_jobs_named(&dir, "x", 1);
    // A password in the URL is not echoed.
    let output = finish(run_command(
        &jobs,
        "http://127.0.0.1:9",
        &["--redis", "redis://:hunter2@127.0.0.1:1/"],
    ))
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--redis"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}
