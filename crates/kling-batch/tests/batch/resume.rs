//! A run killed midway (SIGKILL) or stopped (Ctrl-C), then run again on the same journal.

use std::time::Duration;

use kling_batch::journal::{JobState, Journal};
use kling_mock::MockServer;

use crate::support::{
    finish, in_state, pro_mock, results, run_command, temp_dir, until_created, write_jobs,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_resumes_and_creates_nothing_twice() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("killed");
    let jobs = write_jobs(&dir, 60);
    let journal = dir.join("journal.sqlite");
    let out = dir.join("out.jsonl");
    let args = [
        "--journal",
        journal.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];

    let mut first = run_command(&jobs, &server.base_url(), &args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    until_created(&server, 20).await;
    first.kill().await.unwrap(); // SIGKILL: no cleanup at all
    let created_before = server.stats().tasks_created;
    assert!(
        created_before < 60,
        "killed midway, after {created_before} creates"
    );
    assert!(
        !out.exists(),
        "the killed run never got to write its results"
    );

    let second = finish(run_command(&jobs, &server.base_url(), &args)).await;
    assert_eq!(
        second.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let stats = server.stats();
    assert_eq!(stats.duplicate_external_ids, 0, "{stats:?}");
    assert_eq!(stats.tasks_created, 60, "{stats:?}");
    assert!(
        stats.max_concurrent["video"] <= 5,
        "the resumed run adopted the running tasks' slots"
    );
    let lines = results(&out);
    assert_eq!(in_state(&lines, "succeeded").len(), 60);

    // The journal holds every step; jobs created by the first run were never created again.
    let journal = Journal::open(&journal).unwrap();
    let records = journal.records().unwrap();
    assert!(records.iter().all(|r| r.state == JobState::Succeeded));
    let creates: usize = records
        .iter()
        .map(|r| {
            journal
                .transitions(&r.job_id)
                .unwrap()
                .iter()
                .filter(|s| *s == "created")
                .count()
        })
        .sum();
    assert_eq!(creates, 60, "each job entered `created` exactly once");
}

/// A killed run's journal copied without its `-wal` (or cut to 0 bytes) is refused by the
/// run pointed at it, naming the file and what is wrong, and nothing is sent: it read as a
/// new journal, and the resume created every job again, each billed twice. The journal with
/// its `-wal` resumes and creates none twice; closed by its run, it stands alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_runs_journal_without_its_wal_or_emptied_is_refused_and_nothing_is_sent() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("nowal");
    let jobs = write_jobs(&dir, 30);
    let journal = dir.join("journal.sqlite");
    let out = dir.join("out.jsonl");
    let args = |journal: &std::path::Path| {
        [
            "--journal".to_owned(),
            journal.to_str().unwrap().to_owned(),
            "-o".to_owned(),
            out.to_str().unwrap().to_owned(),
        ]
    };
    let run = |journal: &std::path::Path| {
        let args = args(journal);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_command(&jobs, &server.base_url(), &args)
    };
    let mut first = run(&journal)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    until_created(&server, 10).await;
    first.kill().await.unwrap();
    first.wait().await.unwrap();
    let wal = dir.join("journal.sqlite-wal");
    assert!(wal.exists(), "a killed run leaves its -wal");
    let copy = dir.join("copy.sqlite");
    std::fs::copy(&journal, &copy).unwrap();
    let empty = dir.join("empty.sqlite");
    std::fs::write(&empty, b"").unwrap();
    let sent = server.stats().requests_total;
    for (path, named, what) in [
        (&copy, "copy.sqlite-wal", "write-ahead log is missing"),
        (&empty, "empty.sqlite", "empty (0 bytes)"),
    ] {
        let output = finish(run(path)).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("--journal"), "{stderr}");
        assert!(stderr.contains(named), "{stderr}");
        assert!(stderr.contains(what), "{stderr}");
        assert_eq!(
            server.stats().requests_total,
            sent,
            "nothing was sent: {stderr}"
        );
    }
    // With its `-wal`, the journal resumes the run: nothing created twice.
    let second = finish(run(&journal)).await;
    assert_eq!(
        second.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let stats = server.stats();
    assert_eq!(stats.duplicate_external_ids, 0, "{stats:?}");
    assert_eq!(stats.tasks_created, 30, "{stats:?}");
    // Closed by its run, the journal needs no `-wal`: a copy of it resumes, sending nothing.
    assert!(!wal.exists(), "the run closed the journal");
    std::fs::copy(&journal, &copy).unwrap();
    let third = finish(run(&copy)).await;
    assert_eq!(
        third.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&third.stderr)
    );
    assert_eq!(server.stats().tasks_created, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_creating_exits_cleanly_and_a_rerun_finishes() {
    a_stop_signal_stops_creating_exits_cleanly_and_a_rerun_finishes("-INT").await;
}

/// SIGTERM (`docker stop`, systemd, `timeout`) stops a run as Ctrl-C does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_creating_exits_cleanly_and_a_rerun_finishes() {
    a_stop_signal_stops_creating_exits_cleanly_and_a_rerun_finishes("-TERM").await;
}

/// Sends `signal` (a `kill` option) to a run that has created 10 of its 60 jobs: it stops
/// creating, exits 130 with every job in its results, and a rerun finishes the rest.
async fn a_stop_signal_stops_creating_exits_cleanly_and_a_rerun_finishes(signal: &str) {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir(&format!("stop{signal}"));
    let jobs = write_jobs(&dir, 60);
    let journal = dir.join("journal.sqlite");
    let out = dir.join("out.jsonl");
    let args = [
        "--journal",
        journal.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--json",
    ];

    let first = run_command(&jobs, &server.base_url(), &args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    until_created(&server, 10).await;
    let pid = first.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let output = tokio::time::timeout(Duration::from_secs(20), first.wait_with_output())
        .await
        .expect("the run stops soon after ctrl-c")
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let created = server.stats().tasks_created;
    assert!(created < 60, "{created}");

    // The results of the stopped run: nothing lost, the rest not submitted.
    let lines = results(&out);
    assert_eq!(lines.len(), 60);
    let submitted = lines.iter().filter(|l| l["task_id"].is_string()).count() as u64;
    assert_eq!(
        submitted, created,
        "every task the mock made is in the results"
    );
    assert!(!in_state(&lines, "not_submitted").is_empty());
    let summary = crate::support::summary(&output);
    assert_eq!(summary["interrupted"], true);
    let n = |key: &str| summary[key].as_u64().unwrap();
    assert_eq!(n("ok") + n("unfinished"), created, "{summary}");
    assert_eq!(n("not_submitted"), 60 - created, "{summary}");

    let second = finish(run_command(&jobs, &server.base_url(), &args)).await;
    assert_eq!(
        second.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let stats = server.stats();
    assert_eq!(
        (stats.tasks_created, stats.duplicate_external_ids),
        (60, 0),
        "{stats:?}"
    );
    assert_eq!(in_state(&results(&out), "succeeded").len(), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_of_unknown_outcome_is_looked_up_before_anything_is_created() {
    use bytes::Bytes;
    use http::Request;
    use http_body_util::Full;
    use kling_batch::jobs::parse_jobs;
    use kling_batch::journal::Update;
    use kling_batch::run::{Engine, RunOptions, default_follow_policy};
    use kling_batch::stack::Stack;
    use kling_tower::{Credentials, StackConfig, Tier};

    use crate::support::SPEED;

    let server = MockServer::start(pro_mock()).await.unwrap();
    let (jobs, _) = parse_jobs(
        "{\"id\":\"sent\",\"prompt\":\"a\"}\n{\"id\":\"lost\",\"prompt\":\"b\"}\n{\"id\":\"new\",\"prompt\":\"c\",\"endpoint\":\"/text-to-video/kling-3.0\"}\n",
    );
    let journal = Journal::open_in_memory().unwrap();
    journal.register(&jobs).unwrap();
    // A previous process marked all three `creating`, and only the first and third reached
    // Kling before it died.
    for job in ["sent", "lost", "new"] {
        journal
            .transition(job, JobState::Creating, Update::default())
            .unwrap();
    }
    let client = crate::support::bare_client();
    for (path, field, job) in [
        ("/v1/videos/text2video", "external_task_id", "sent"),
        ("/text-to-video/kling-3.0", "external_id", "new"),
    ] {
        let body = format!(
            "{{\"prompt\":\"x\",\"{field}\":\"{}\"}}",
            journal.external_id_for(job)
        );
        let request = Request::post(format!("{}{path}", server.base_url()))
            .header("authorization", "Bearer test-key")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        assert_eq!(client.request(request).await.unwrap().status(), 200);
        // Kept apart by more than the Pro rate's 10 ms at this speed.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    let config = StackConfig::preset(Tier::Pro).speed(SPEED).headroom(0.3);
    let stack = Stack::new(
        config,
        Credentials::api_key("test-key").unwrap(),
        &server.base_url(),
    )
    .unwrap();
    let engine = Engine::new(
        stack,
        journal.clone(),
        RunOptions::new(default_follow_policy(SPEED)),
    )
    .unwrap();
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let report = tokio::time::timeout(Duration::from_secs(30), engine.run(&jobs, stop))
        .await
        .unwrap()
        .unwrap();

    assert!(
        report
            .records
            .iter()
            .all(|r| r.state == JobState::Succeeded),
        "{report:?}"
    );
    assert_eq!(
        report.creates, 1,
        "only the job that never reached Kling was created"
    );
    let stats = server.stats();
    assert_eq!(
        (stats.tasks_created, stats.duplicate_external_ids),
        (3, 0),
        "{stats:?}"
    );
    assert_eq!(
        journal.transitions("sent").unwrap(),
        ["queued", "creating", "created", "succeeded"]
    );
    assert_eq!(
        journal.transitions("lost").unwrap(),
        [
            "queued",
            "creating",
            "queued",
            "creating",
            "created",
            "succeeded"
        ]
    );
}

/// `prompt → (job id, task id)` from a results file and the jobs file it came from.
fn tasks_by_prompt(
    jobs: &std::path::Path,
    out: &std::path::Path,
) -> std::collections::BTreeMap<String, (String, String)> {
    let text = std::fs::read_to_string(jobs).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    results(out)
        .iter()
        .map(|r| {
            let line = r["line"].as_u64().unwrap() as usize;
            let job: serde_json::Value = serde_json::from_str(lines[line - 1]).unwrap();
            (
                job["prompt"].as_str().unwrap().to_owned(),
                (
                    r["job_id"].as_str().unwrap().to_owned(),
                    r["task_id"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_without_ids_keep_their_state_when_lines_are_added_or_reordered() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("edited");
    let jobs = dir.join("jobs.jsonl");
    let prompts = ["a cat", "a dog", "a fox", "an owl"];
    let text: String = prompts
        .iter()
        .map(|p| format!("{{\"prompt\":\"{p}\"}}\n"))
        .collect();
    std::fs::write(&jobs, &text).unwrap();
    let journal = dir.join("journal.sqlite");
    let out = dir.join("out.jsonl");
    let args = [
        "--journal",
        journal.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    let first = finish(run_command(&jobs, &server.base_url(), &args)).await;
    assert_eq!(first.status.code(), Some(0));
    let before = tasks_by_prompt(&jobs, &out);
    assert_eq!(before.len(), 4);

    // A comment on top, a blank line, the lines reordered.
    let mut lines: Vec<&str> = text.lines().collect();
    lines.reverse();
    std::fs::write(&jobs, format!("# my shots\n\n{}\n", lines.join("\n"))).unwrap();
    let second = finish(run_command(&jobs, &server.base_url(), &args)).await;
    assert_eq!(
        second.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(
        tasks_by_prompt(&jobs, &out),
        before,
        "every prompt keeps its own id and task"
    );
    let stats = server.stats();
    assert_eq!(
        stats.tasks_created, 4,
        "nothing was created again: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_edited_under_its_id_is_refused_by_name_and_nothing_is_sent() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("edited-id");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(
        &jobs,
        "{\"id\":\"cat\",\"prompt\":\"a cat\"}\n{\"id\":\"dog\",\"prompt\":\"a dog\"}\n",
    )
    .unwrap();
    let journal = dir.join("journal.sqlite");
    let args = ["--journal", journal.to_str().unwrap()];
    let first = finish(run_command(&jobs, &server.base_url(), &args)).await;
    assert_eq!(first.status.code(), Some(0));
    let requests = server.stats().requests_total;

    std::fs::write(
        &jobs,
        "{\"id\":\"cat\",\"prompt\":\"a black cat\"}\n{\"id\":\"dog\",\"prompt\":\"a dog\"}\n{\"id\":\"owl\",\"prompt\":\"an owl\"}\n",
    )
    .unwrap();
    let second = finish(run_command(&jobs, &server.base_url(), &args)).await;
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("`cat` (line 1)"), "{stderr}");
    assert!(!stderr.contains("`dog`"), "{stderr}");
    assert!(stderr.contains("nothing was sent"), "{stderr}");
    assert_eq!(server.stats().requests_total, requests, "nothing was sent");
    let journal = Journal::open(&journal).unwrap();
    assert_eq!(journal.record("owl").unwrap(), None, "nothing was recorded");
    assert_eq!(
        journal.record("cat").unwrap().unwrap().state,
        JobState::Succeeded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_of_unknown_outcome_cost_one_refused_request_when_the_key_is_wrong() {
    use kling_batch::jobs::parse_jobs;
    use kling_batch::journal::Update;
    use kling_batch::run::{Engine, RunOptions, default_follow_policy};
    use kling_batch::stack::Stack;
    use kling_tower::{Credentials, StackConfig, Tier};

    use crate::support::SPEED;

    let server = MockServer::start(pro_mock().api_key("right-key"))
        .await
        .unwrap();
    let (jobs, _) = parse_jobs(
        "{\"id\":\"a\",\"prompt\":\"a\"}\n{\"id\":\"b\",\"prompt\":\"b\"}\n{\"id\":\"c\",\"prompt\":\"c\"}\n{\"id\":\"d\",\"prompt\":\"d\"}\n",
    );
    let journal = Journal::open_in_memory().unwrap();
    journal.register(&jobs).unwrap();
    // An earlier run left three creates of unknown outcome.
    for job in ["a", "b", "c"] {
        journal
            .transition(job, JobState::Creating, Update::default())
            .unwrap();
    }
    let config = StackConfig::preset(Tier::Pro).speed(SPEED).headroom(0.3);
    let stack = Stack::new(
        config,
        Credentials::api_key("wrong-key").unwrap(),
        &server.base_url(),
    )
    .unwrap();
    let engine = Engine::new(
        stack,
        journal.clone(),
        RunOptions::new(default_follow_policy(SPEED)),
    )
    .unwrap();
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let report = tokio::time::timeout(Duration::from_secs(30), engine.run(&jobs, stop))
        .await
        .unwrap()
        .unwrap();

    // The listing of running tasks is refused with 1002: every lookup would be too, and
    // nothing is created.
    let stats = server.stats();
    assert_eq!(stats.requests_total, 1, "{stats:?}");
    assert_eq!(stats.responses_by_code.get("1002"), Some(&1), "{stats:?}");
    assert_eq!(report.creates, 0);
    let states: Vec<JobState> = report.records.iter().map(|r| r.state).collect();
    assert_eq!(
        states,
        [
            JobState::Creating,
            JobState::Creating,
            JobState::Creating,
            JobState::NotSubmitted
        ],
        "{report:?}"
    );
    let d = &report.records[3];
    assert_eq!(d.error.as_ref().map(|e| e.code), Some(1002), "{d:?}");
}

/// A journal write that fails after creates were sent (here: an image job's move to
/// `created`, as a full disk would fail it) stops the run at once, the video pool's creates
/// too, with status 3, not 2 ("nothing was sent"), saying that jobs may have been created and
/// to run again on the same journal; that rerun, the cause gone, finishes every job and
/// creates none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_that_fails_after_creates_were_sent_exits_3_and_a_rerun_creates_none_twice() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("journal-fails");
    let jobs = write_jobs(&dir, 20);
    let mut text = std::fs::read_to_string(&jobs).unwrap();
    text.insert_str(
        0,
        "{\"id\":\"foxes\",\"prompt\":\"foxes\",\"endpoint\":\"/v1/images/generations\"}\n",
    );
    std::fs::write(&jobs, text).unwrap();
    let journal = dir.join("journal.sqlite");
    let out = dir.join("out.jsonl");
    drop(Journal::open(&journal).unwrap());
    let db = rusqlite::Connection::open(&journal).unwrap();
    db.execute_batch(
        "CREATE TRIGGER fail_created BEFORE UPDATE ON jobs \
         WHEN NEW.state = 'created' AND NEW.endpoint LIKE '/v1/images/%' \
         BEGIN SELECT RAISE(ABORT, 'disk full (test)'); END;",
    )
    .unwrap();
    drop(db);
    let args = [
        "--journal",
        journal.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--json",
    ];

    let first = finish(run_command(&jobs, &server.base_url(), &args)).await;
    let stderr = String::from_utf8_lossy(&first.stderr);
    let created = server.stats().tasks_created;
    assert!(
        created >= 1,
        "the image job was created and billed: {stderr}"
    );
    assert_eq!(first.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("disk full (test)"), "{stderr}");
    assert!(
        stderr.contains("jobs may have been created and billed"),
        "{stderr}"
    );
    assert!(stderr.contains("run again on the same journal"), "{stderr}");
    assert!(stderr.contains(journal.to_str().unwrap()), "{stderr}");
    assert!(!stderr.contains("nothing was sent"), "{stderr}");
    // The 20 video jobs take at least four rounds of the Pro tier's 5 slots: the run stopped
    // creating them when the journal failed.
    assert!(created < 21, "the run stopped at the failure: {created}");

    let db = rusqlite::Connection::open(&journal).unwrap();
    db.execute_batch("DROP TRIGGER fail_created;").unwrap();
    drop(db);
    let second = finish(run_command(&jobs, &server.base_url(), &args)).await;
    assert_eq!(
        second.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let stats = server.stats();
    assert_eq!(stats.tasks_created, 21, "{stats:?}");
    assert_eq!(stats.duplicate_external_ids, 0, "{stats:?}");
    assert_eq!(in_state(&results(&out), "succeeded").len(), 21);
}

/// A journal write that fails while a task's end or its downloaded files are recorded (a full
/// disk) stops the run with status 3 and says what to do, as one that fails at a create does:
/// it was only logged, the run went on creating, and exited 1 with the job shown `created`
/// (or its files missing) and no word that the journal could not keep up. Each rerun on the
/// same journal, the cause gone, follows the task again or records the file already on disk,
/// and none creates a task twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_that_fails_at_a_tasks_end_or_its_files_exits_3_and_a_rerun_finishes() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("journal-fails-at-end");
    let jobs = write_jobs(&dir, 8);
    let journal = dir.join("journal.sqlite");
    let out = dir.join("out.jsonl");
    let files = dir.join("files");
    let args = [
        "--journal",
        journal.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--download",
        files.to_str().unwrap(),
        "--json",
    ];
    let sql = |sql: &str| {
        let db = rusqlite::Connection::open(&journal).unwrap();
        db.execute_batch(sql).unwrap();
    };
    let state = |job: &str| {
        Journal::open(&journal)
            .unwrap()
            .record(job)
            .unwrap()
            .unwrap()
    };
    let stopped_by_the_journal = |output: &std::process::Output| {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(3), "{stderr}");
        assert!(stderr.contains("disk full (test)"), "{stderr}");
        assert!(stderr.contains("run again on the same journal"), "{stderr}");
        assert!(stderr.contains(journal.to_str().unwrap()), "{stderr}");
    };
    drop(Journal::open(&journal).unwrap());

    // A task's end cannot be recorded.
    sql("CREATE TRIGGER fail_end BEFORE UPDATE ON jobs \
         WHEN NEW.state = 'succeeded' AND NEW.job_id = 'job-3' \
         BEGIN SELECT RAISE(ABORT, 'disk full (test)'); END;");
    let first = finish(run_command(&jobs, &server.base_url(), &args)).await;
    stopped_by_the_journal(&first);
    assert_eq!(state("job-3").state, JobState::Created);

    // Its files cannot be recorded.
    sql("DROP TRIGGER fail_end; \
         CREATE TRIGGER fail_files BEFORE UPDATE ON jobs \
         WHEN NEW.files <> OLD.files AND NEW.job_id = 'job-3' \
         BEGIN SELECT RAISE(ABORT, 'disk full (test)'); END;");
    let second = finish(run_command(&jobs, &server.base_url(), &args)).await;
    stopped_by_the_journal(&second);
    let record = state("job-3");
    assert_eq!(record.state, JobState::Succeeded);
    assert!(record.files.is_empty(), "{record:?}");

    sql("DROP TRIGGER fail_files;");
    let third = finish(run_command(&jobs, &server.base_url(), &args)).await;
    assert_eq!(
        third.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&third.stderr)
    );
    let lines = results(&out);
    assert_eq!(in_state(&lines, "succeeded").len(), 8);
    for line in &lines {
        let files = line["files"].as_array().unwrap();
        assert_eq!(files.len(), 1, "{line}");
        assert!(std::path::Path::new(files[0].as_str().unwrap()).exists());
    }
    let stats = server.stats();
    assert_eq!(stats.tasks_created, 8, "{stats:?}");
    assert_eq!(stats.duplicate_external_ids, 0, "{stats:?}");
}

/// A journal named `file:x.db` is that file, not a URI SQLite reads (`x.db`, or with
/// `file::memory:` a journal in memory that no rerun finds): a rerun on it resumes, sending
/// nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_named_like_a_uri_is_a_file_of_that_name() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("uri-journal");
    let jobs = write_jobs(&dir, 2);
    let run = || {
        let mut cmd = run_command(&jobs, &server.base_url(), &["--journal", "file:x.db"]);
        // The name as a user gives it: relative to the working directory.
        cmd.current_dir(&dir);
        finish(cmd)
    };
    let output = run().await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(dir.join("file:x.db").is_file(), "{stderr}");
    assert!(!dir.join("x.db").exists(), "{stderr}");
    let journal = Journal::open(dir.join("file:x.db")).unwrap();
    assert_eq!(journal.records().unwrap().len(), 2);
    drop(journal);
    let output = run().await;
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(server.stats().tasks_created, 2, "the rerun resumed");
}

/// A proxy on loopback in front of `mock` (whose tasks are listed by external id only
/// `listed_after` after their create): a create is carried out, its answer lost (the
/// connection cut mid-body), and a lookup by external id of a task made less than
/// `listed_after` ago is answered as Kling answers an id it does not know, `answer_after`
/// after it came in.
async fn lossy_lagging_proxy(
    mock: String,
    listed_after: Duration,
    answer_after: Duration,
) -> String {
    use axum::body::Body;
    use http_body_util::BodyExt as _;

    let made: std::sync::Arc<std::sync::Mutex<Vec<(String, std::time::Instant)>>> =
        std::sync::Arc::default();
    let client = crate::support::bare_client();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let (made, client, mock) = (made.clone(), client.clone(), mock.clone());
        async move {
            let (parts, body) = request.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let mut path = parts.uri.path().to_owned();
            let create = parts.method == http::Method::POST;
            let mut lookup = false;
            if create {
                let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let id = json["external_task_id"].as_str().unwrap().to_owned();
                made.lock().unwrap().push((id, std::time::Instant::now()));
            } else {
                let made = made.lock().unwrap();
                let asked = made
                    .iter()
                    .find(|(id, _)| path.ends_with(&format!("/{id}")));
                lookup = asked.is_some();
                if asked.is_some_and(|(_, at)| at.elapsed() < listed_after) {
                    // Not listed yet: asked for an id the mock does not know.
                    path.push_str("-unlisted");
                }
            }
            let mut forward = http::Request::builder()
                .method(parts.method.clone())
                .uri(format!("{mock}{path}"));
            for (name, value) in &parts.headers {
                if name != http::header::HOST {
                    forward = forward.header(name, value);
                }
            }
            let answer = client
                .request(forward.body(http_body_util::Full::new(body)).unwrap())
                .await
                .unwrap();
            let (parts, body) = answer.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            if lookup {
                tokio::time::sleep(answer_after).await;
            }
            if create {
                // Made and billed; the answer is cut off on its way back.
                let cut = futures_util::stream::iter([
                    Ok(body.slice(..body.len() / 2)),
                    Err(std::io::Error::other("connection reset")),
                ]);
                return http::Response::from_parts(parts, Body::from_stream(cut));
            }
            http::Response::from_parts(parts, Body::from(body))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// A create whose answer is lost, of a task Kling lists by its external id only a moment
/// later: the lookup right after finds nothing. That proved nothing: the job was recorded
/// `not_submitted`, and the next run sent it again without a second lookup (a duplicate
/// external id, which Kling may bill as a second task). It stays of unknown outcome, and a
/// resumed run looks it up again once the lookup settle has passed since: found, followed,
/// one task made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_create_not_yet_listed_is_looked_up_again_on_resume_never_sent_twice() {
    use kling_batch::jobs::parse_jobs;
    use kling_batch::run::{Engine, RunOptions, default_follow_policy};
    use kling_batch::stack::Stack;
    use kling_tower::{Credentials, StackConfig, Tier};

    use crate::support::SPEED;

    let server = MockServer::start(pro_mock()).await.unwrap();
    let listed_after = Duration::from_millis(300);
    let proxy = lossy_lagging_proxy(server.base_url(), listed_after, Duration::ZERO).await;
    let (jobs, _) = parse_jobs("{\"id\":\"cat\",\"prompt\":\"a cat\"}\n");
    let journal = Journal::open_in_memory().unwrap();
    // The default settle, 60 s of API time at the test speed: longer than the task takes to
    // be listed.
    let settle = kling_batch::run::LOOKUP_SETTLE.div_f64(SPEED);
    assert!(settle > listed_after);
    let run = |journal: Journal| {
        let jobs = jobs.clone();
        let proxy = proxy.clone();
        async move {
            // One attempt: the retry layer hands the lost create to the run at once.
            let config = StackConfig::preset(Tier::Pro)
                .speed(SPEED)
                .headroom(0.3)
                .retry_max_attempts(1);
            let stack =
                Stack::new(config, Credentials::api_key("test-key").unwrap(), &proxy).unwrap();
            let options = RunOptions::new(default_follow_policy(SPEED));
            let engine = Engine::new(stack, journal, options).unwrap();
            let (_stop, stop) = tokio::sync::watch::channel(false);
            tokio::time::timeout(Duration::from_secs(30), engine.run(&jobs, stop))
                .await
                .unwrap()
                .unwrap()
        }
    };

    let first = run(journal.clone()).await;
    assert_eq!(first.creates, 1);
    assert_eq!(server.stats().tasks_created, 1);
    let record = journal.record("cat").unwrap().unwrap();
    assert_eq!(
        record.state,
        JobState::Creating,
        "still unknown: {record:?}"
    );

    let second = run(journal.clone()).await;
    assert_eq!(second.creates, 0, "nothing sent again: {second:?}");
    let stats = server.stats();
    assert_eq!(
        (stats.tasks_created, stats.duplicate_external_ids),
        (1, 0),
        "{stats:?}"
    );
    let record = journal.record("cat").unwrap().unwrap();
    assert_eq!(record.state, JobState::Succeeded, "{record:?}");
    assert_eq!(
        journal.transitions("cat").unwrap(),
        ["queued", "creating", "created", "succeeded"]
    );
}

/// A run killed with its create in flight: the create may have left any time until the kill
/// (it waited for a slot, say), long after its `creating` mark. A resume that finds no task
/// waits the lookup settle from its own start, not from that mark, before it sends anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_left_late_by_a_killed_run_is_looked_up_again_before_a_resend() {
    use bytes::Bytes;
    use http::Request;
    use http_body_util::Full;
    use kling_batch::jobs::parse_jobs;
    use kling_batch::journal::Update;
    use kling_batch::run::{Engine, RunOptions, default_follow_policy};
    use kling_batch::stack::Stack;
    use kling_tower::{Credentials, StackConfig, Tier};

    use crate::support::SPEED;

    let server = MockServer::start(pro_mock()).await.unwrap();
    // Listed after longer than the resumed run's listing of running tasks takes (16 legacy
    // paths, about 0.5 s), so that its first lookup is sure to miss the task.
    let listed_after = Duration::from_millis(1200);
    let settle = Duration::from_secs(2);
    let proxy = lossy_lagging_proxy(server.base_url(), listed_after, Duration::ZERO).await;
    let (jobs, _) = parse_jobs("{\"id\":\"cat\",\"prompt\":\"a cat\"}\n");
    let journal = Journal::open_in_memory().unwrap();
    journal.register(&jobs).unwrap();
    journal
        .transition("cat", JobState::Creating, Update::default())
        .unwrap();
    // The create leaves a settle after its mark, then the run is killed.
    tokio::time::sleep(settle + Duration::from_millis(100)).await;
    let body = format!(
        "{{\"prompt\":\"a cat\",\"external_task_id\":\"{}\"}}",
        journal.external_id_for("cat")
    );
    let create = Request::post(format!("{proxy}/v1/videos/text2video"))
        .header("authorization", "Bearer test-key")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let _lost = crate::support::bare_client().request(create).await;
    assert_eq!(server.stats().tasks_created, 1);

    let config = StackConfig::preset(Tier::Pro).speed(SPEED).headroom(0.3);
    let stack = Stack::new(config, Credentials::api_key("test-key").unwrap(), &proxy).unwrap();
    let engine = Engine::new(
        stack,
        journal.clone(),
        RunOptions::new(default_follow_policy(SPEED)).lookup_settle(settle),
    )
    .unwrap();
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let report = tokio::time::timeout(Duration::from_secs(30), engine.run(&jobs, stop))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.creates, 0, "nothing sent again: {report:?}");
    let stats = server.stats();
    assert_eq!(
        (stats.tasks_created, stats.duplicate_external_ids),
        (1, 0),
        "{stats:?}"
    );
    assert_eq!(
        journal.transitions("cat").unwrap(),
        ["queued", "creating", "created", "succeeded"]
    );
}

/// A lookup asked before the lookup settle had passed and answered after it (a slow answer,
/// a retried one): its "no such task" is what Kling listed when it was asked, and settled the
/// job as never made, so the create was sent again, a second billed task. A lookup asked once
/// the settle has passed is made before anything is sent: the task is found, and followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_asked_before_the_settle_and_answered_after_it_settles_nothing() {
    use bytes::Bytes;
    use http::Request;
    use http_body_util::Full;
    use kling_batch::jobs::parse_jobs;
    use kling_batch::journal::Update;
    use kling_batch::run::{Engine, RunOptions, default_follow_policy};
    use kling_batch::stack::Stack;
    use kling_tower::{Credentials, StackConfig, Tier};

    use crate::support::SPEED;

    let server = MockServer::start(pro_mock()).await.unwrap();
    // The resumed run's first lookup comes in once it listed the running tasks (about 0.5 s
    // after the create), while the task is not listed yet, and is answered a settle and more
    // later; the task is listed by the time a lookup asked after that answer comes in.
    let settle = Duration::from_secs(1);
    let listed_after = Duration::from_millis(1500);
    let proxy = lossy_lagging_proxy(server.base_url(), listed_after, settle * 2).await;
    let (jobs, _) = parse_jobs("{\"id\":\"cat\",\"prompt\":\"a cat\"}\n");
    let journal = Journal::open_in_memory().unwrap();
    journal.register(&jobs).unwrap();
    journal
        .transition("cat", JobState::Creating, Update::default())
        .unwrap();
    // The run that marked it was killed with its create in flight.
    let body = format!(
        "{{\"prompt\":\"a cat\",\"external_task_id\":\"{}\"}}",
        journal.external_id_for("cat")
    );
    let create = Request::post(format!("{proxy}/v1/videos/text2video"))
        .header("authorization", "Bearer test-key")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let _lost = crate::support::bare_client().request(create).await;
    assert_eq!(server.stats().tasks_created, 1);

    // Answered within an attempt's time (6 s here), not retried.
    let config = StackConfig::preset(Tier::Pro)
        .speed(SPEED)
        .headroom(0.3)
        .attempt_timeout(Duration::from_secs(600));
    let stack = Stack::new(config, Credentials::api_key("test-key").unwrap(), &proxy).unwrap();
    let engine = Engine::new(
        stack,
        journal.clone(),
        RunOptions::new(default_follow_policy(SPEED)).lookup_settle(settle),
    )
    .unwrap();
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let report = tokio::time::timeout(Duration::from_secs(30), engine.run(&jobs, stop))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.creates, 0, "nothing sent again: {report:?}");
    let stats = server.stats();
    assert_eq!(
        (stats.tasks_created, stats.duplicate_external_ids),
        (1, 0),
        "{stats:?}"
    );
    assert_eq!(
        journal.transitions("cat").unwrap(),
        ["queued", "creating", "created", "succeeded"]
    );
}
