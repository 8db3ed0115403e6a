//! A batch is a queue: a job that waits long for a free slot is still sent.

use std::time::Duration;

use kling_batch::jobs::parse_jobs;
use kling_batch::journal::{JobState, Journal};
use kling_batch::run::{Engine, RunOptions, default_follow_policy};
use kling_batch::stack::Stack;
use kling_mock::{MockConfig, MockServer, Preset};
use kling_tower::{Credentials, StackConfig, Tier};

/// A minute of Kling in 60 ms.
const FAST: f64 = 1000.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_free_tier_jobs_queued_behind_long_tasks_all_run() {
    // One slot, tasks of 15–20 minutes: the third job waits 30–40 minutes for its slot, far
    // past the preset's 10-minute retry deadline.
    let server = MockServer::start(
        MockConfig::preset(Preset::Free)
            .speed(FAST)
            .task_duration(Duration::from_secs(15 * 60), Duration::from_secs(20 * 60)),
    )
    .await
    .unwrap();
    let config = StackConfig::preset(Tier::Free).speed(FAST);
    assert_eq!(config.retry_deadline_duration(), Duration::from_millis(600));
    let stack = Stack::new(
        config,
        Credentials::api_key("test-key").unwrap(),
        &server.base_url(),
    )
    .unwrap();
    let (jobs, _) = parse_jobs(
        "{\"id\":\"a\",\"prompt\":\"one\"}\n{\"id\":\"b\",\"prompt\":\"two\"}\n{\"id\":\"c\",\"prompt\":\"three\"}\n",
    );
    let engine = Engine::new(
        stack,
        Journal::open_in_memory().unwrap(),
        RunOptions::new(default_follow_policy(FAST)),
    )
    .unwrap();
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let report = tokio::time::timeout(Duration::from_secs(30), engine.run(&jobs, stop))
        .await
        .expect("the run ends")
        .unwrap();

    let states: Vec<(&str, JobState)> = report
        .records
        .iter()
        .map(|r| (r.job_id.as_str(), r.state))
        .collect();
    assert_eq!(
        states,
        [
            ("a", JobState::Succeeded),
            ("b", JobState::Succeeded),
            ("c", JobState::Succeeded)
        ],
        "{report:?}"
    );
    let stats = server.stats();
    assert_eq!(stats.tasks_created, 3);
    assert_eq!(stats.responses_by_code.get("1303"), None, "{stats:?}");
    // Each waited in turn: the run took at least the three tasks one after another.
    assert!(
        report.makespan >= Duration::from_secs_f64(3.0 * 15.0 * 60.0 / FAST),
        "{:?}",
        report.makespan
    );
}
