//! Bad input: malformed lines, missing credentials, impossible configuration.

use kling_mock::MockServer;

use crate::support::{SPEED, finish, in_state, pro_mock, results, run_command, summary, temp_dir};

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

/// A callback URL Kling could not post to is refused before anything is sent, naming
/// `--callback-url`: one that is no absolute http(s) URL, or none at all with a listener on
/// every interface (the default URL would have been `http://0.0.0.0:…`). Every callback
/// would have failed, and the run fallen back on queries without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_url_kling_cannot_post_to_is_refused_before_anything_is_sent() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("callback-url");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(&jobs, "{\"prompt\":\"x\"}\n").unwrap();
    let cases: [&[&str]; 3] = [
        &[
            "--callback-listen",
            "127.0.0.1:0",
            "--callback-url",
            "example.com/hooks",
        ],
        &[
            "--callback-listen",
            "127.0.0.1:0",
            "--callback-url",
            "ftp://example.com/h",
        ],
        &["--callback-listen", "0.0.0.0:0"],
    ];
    for args in cases {
        let output = finish(run_command(&jobs, &server.base_url(), args)).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("--callback-url"), "{args:?}: {stderr}");
    }
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

/// An access key pair with jobs on a new-style endpoint, which takes only an API key, is
/// refused before anything is sent, naming the first such jobs (line, id, endpoint) and what
/// to do: each of their creates would be refused (401, code 1000), after the legacy jobs
/// before them were created and paid for. The same jobs run with an API key, and legacy jobs
/// run with the pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_key_pair_with_jobs_on_new_style_endpoints_is_refused_before_sending() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("pair-new-style");
    let legacy = "{\"id\":\"a\",\"prompt\":\"one\"}\n{\"id\":\"c\",\"prompt\":\"three\"}\n";
    let mixed = dir.join("mixed.jsonl");
    std::fs::write(
        &mixed,
        "{\"id\":\"a\",\"prompt\":\"one\"}\n\
         {\"id\":\"b\",\"prompt\":\"two\",\"endpoint\":\"/text-to-video/kling-3.0\"}\n\
         {\"id\":\"c\",\"prompt\":\"three\"}\n\
         {\"id\":\"d\",\"prompt\":\"four\",\"endpoint\":\"/image-to-video/kling-3.0\",\
         \"image\":\"https://example.com/x.png\"}\n",
    )
    .unwrap();
    let legacy_only = dir.join("legacy.jsonl");
    std::fs::write(&legacy_only, legacy).unwrap();
    let with_pair = |jobs: &std::path::Path| {
        let mut cmd = run_command(jobs, &server.base_url(), &[]);
        cmd.env_remove("KLING_API_KEY")
            .env("KLING_ACCESS_KEY", "ak")
            .env("KLING_SECRET_KEY", "sk");
        cmd
    };
    let output = finish(with_pair(&mixed)).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for expected in [
        "KLING_ACCESS_KEY: ",
        "`b` (line 2) on /text-to-video/kling-3.0",
        "`d` (line 4) on /image-to-video/kling-3.0",
        "set KLING_API_KEY",
        "legacy endpoint",
        "nothing was sent",
    ] {
        assert!(stderr.contains(expected), "names {expected:?}: {stderr}");
    }
    assert!(!stderr.contains("`a`"), "{stderr}");
    assert_eq!(server.stats().requests_total, 0, "{stderr}");
    assert!(
        !dir.join("mixed.journal.sqlite").exists(),
        "no journal made"
    );
    // Legacy jobs alone run with the pair.
    let output = finish(with_pair(&legacy_only)).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(server.stats().tasks_created, 2, "{stderr}");
    // With an API key, the refused jobs all run.
    let output = finish(run_command(&mixed, &server.base_url(), &[])).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(server.stats().tasks_created, 6, "{stderr}");
}

/// A resume with the access key pair whose new-style jobs the journal records as finished
/// sends nothing that needs an API key: it runs, and the legacy jobs added since are created
/// (it was refused for the finished jobs). A new-style job still to create, or whose task is
/// still to follow (new-style tasks are queried on `/tasks`, which takes only an API key too),
/// is refused before anything is sent, naming just that job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_with_an_access_key_pair_is_refused_only_for_new_style_jobs_still_to_send() {
    use kling_batch::journal::{JobState, Journal, Update};
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("pair-resume");
    let jobs = dir.join("jobs.jsonl");
    let new_style = "{\"id\":\"b\",\"prompt\":\"two\",\"endpoint\":\"/text-to-video/kling-3.0\"}\n\
         {\"id\":\"d\",\"prompt\":\"four\",\"endpoint\":\"/image-to-video/kling-3.0\",\
         \"image\":\"https://example.com/x.png\"}\n";
    std::fs::write(&jobs, new_style).unwrap();
    let output = finish(run_command(&jobs, &server.base_url(), &[])).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(server.stats().tasks_created, 2, "{stderr}");
    let with_pair = || {
        let mut cmd = run_command(&jobs, &server.base_url(), &[]);
        cmd.env_remove("KLING_API_KEY")
            .env("KLING_ACCESS_KEY", "ak")
            .env("KLING_SECRET_KEY", "sk");
        cmd
    };
    // A legacy job added: sent with the pair, the finished new-style jobs not refused.
    let first = format!("{new_style}{{\"id\":\"a\",\"prompt\":\"one\"}}\n");
    std::fs::write(&jobs, &first).unwrap();
    let output = finish(with_pair()).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(server.stats().tasks_created, 3, "{stderr}");
    // Its task to follow again (as a run killed while it ran leaves it), and a job added:
    // sent with the pair, the finished new-style jobs' tasks not listed on resume (on
    // `/tasks`, which refused the pair and halted the run).
    let back_to_created = |id: &str| {
        let journal = Journal::open(dir.join("jobs.journal.sqlite")).unwrap();
        let task = journal.record(id).unwrap().unwrap().task_id.unwrap();
        journal
            .transition(id, JobState::Created, Update::task(task))
            .unwrap();
    };
    back_to_created("a");
    let with_legacy = format!("{first}{{\"id\":\"e\",\"prompt\":\"five\"}}\n");
    std::fs::write(&jobs, &with_legacy).unwrap();
    let output = finish(with_pair()).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(server.stats().tasks_created, 4, "{stderr}");
    assert!(!stderr.contains("cannot list running tasks"), "{stderr}");
    let results = results(&dir.join("jobs.results.jsonl"));
    assert_eq!(in_state(&results, "succeeded").len(), 4, "{results:?}");
    let refused = |expected: &'static str| {
        let server = &server;
        let with_pair = &with_pair;
        async move {
            let sent = server.stats().requests_total;
            let output = finish(with_pair()).await;
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            assert_eq!(output.status.code(), Some(2), "{stderr}");
            assert!(stderr.contains("KLING_ACCESS_KEY: "), "{stderr}");
            assert!(stderr.contains(expected), "names {expected:?}: {stderr}");
            assert!(stderr.contains("nothing was sent"), "{stderr}");
            assert_eq!(server.stats().requests_total, sent, "{stderr}");
            stderr
        }
    };
    // A new-style job added: still to create.
    std::fs::write(
        &jobs,
        format!(
            "{with_legacy}{{\"id\":\"f\",\"prompt\":\"six\",\
             \"endpoint\":\"/text-to-video/kling-3.0\"}}\n"
        ),
    )
    .unwrap();
    let stderr = refused("job `f` (line 5) on /text-to-video/kling-3.0").await;
    for finished in ["`b`", "`d`", "`a`", "`e`"] {
        assert!(!stderr.contains(finished), "{finished}: {stderr}");
    }
    // A new-style task still to follow (as a run killed while it ran leaves it).
    std::fs::write(&jobs, &with_legacy).unwrap();
    back_to_created("b");
    let stderr = refused("job `b` (line 1) on /text-to-video/kling-3.0").await;
    assert!(!stderr.contains("`d`"), "{stderr}");
    // With an API key, it is followed to its end.
    let output = finish(run_command(&jobs, &server.base_url(), &[])).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(
        server.stats().tasks_created,
        4,
        "nothing created twice: {stderr}"
    );
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

    // An option out of range names the option. (Not through `run_command`, which gives
    // `--speed` already: clap's "cannot be used multiple times" named it too.)
    let output = finish(refused_run(&jobs, &["--speed", "0"])).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("kling-batch: --speed: "), "{stderr}");
}

/// `kling-batch run JOBS` with `args`, against a port where nothing listens, with
/// no `--speed` of its own and no `KLING_*` variable but the API key.
fn refused_run(jobs: &std::path::Path, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kling-batch"));
    cmd.arg("run").arg(jobs).arg("--quiet").args(args);
    if !args.contains(&"--base-url") {
        cmd.args(["--base-url", "http://127.0.0.1:9"]);
    }
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(|n| n.starts_with("KLING_")) {
            cmd.env_remove(name);
        }
    }
    cmd.env("KLING_API_KEY", "k").kill_on_drop(true);
    cmd
}

/// A setting refused names what set it: a speed so slow that the batch's 48-hour queue
/// deadline comes to more than a year is named `--speed` (the file's `speed`,
/// `KLING_SPEED`), not `retry_deadline_secs`, which no one set; a base URL `--base-url`, not
/// `base_url`; a webhook secret from `KLING_WEBHOOK_SECRET` that variable, not
/// `--callback-secret`; a Redis from `KLING_REDIS_URL` that variable, not `--redis`; a
/// variable named as one the stack reads in another unit or case (`KLING_ATTEMPT_TIMEOUT_MS`,
/// `kling_rate_per_minute`), that variable, with `--tier` as without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_setting_names_the_option_file_or_variable_that_set_it() {
    let dir = temp_dir("setting-names");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(&jobs, "{\"prompt\":\"x\"}\n").unwrap();
    let config = dir.join("kling.toml");
    std::fs::write(&config, "tier = \"pro\"\nspeed = 0.001\n").unwrap();
    let config = config.to_str().unwrap();
    let with_config = ["--config", config];
    // The arguments, the variables set, and the name the refusal must give.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], String);
    let mut cases: Vec<Case<'_>> = vec![
        (
            &["--tier", "pro", "--speed", "0.001"],
            &[],
            "--speed: ".to_owned(),
        ),
        (
            &["--tier", "pro"],
            &[("KLING_SPEED", "0.001")],
            "KLING_SPEED: ".to_owned(),
        ),
        (&with_config, &[], format!("{config} (speed): ")),
        // A variable named as one the stack reads in another unit or case: ignored, the
        // preset's value would have been used without a word.
        (
            &["--tier", "pro"],
            &[("KLING_ATTEMPT_TIMEOUT_MS", "500")],
            "KLING_ATTEMPT_TIMEOUT_MS: ".to_owned(),
        ),
        (
            &[],
            &[("KLING_TIER", "pro"), ("kling_rate_per_minute", "20")],
            "kling_rate_per_minute: ".to_owned(),
        ),
        (
            &["--tier", "pro", "--base-url", "ftp://kling.example/"],
            &[],
            "--base-url: ".to_owned(),
        ),
        (
            &["--tier", "pro", "--callback-listen", "127.0.0.1:0"],
            &[("KLING_WEBHOOK_SECRET", "whsec_!!!")],
            "KLING_WEBHOOK_SECRET: ".to_owned(),
        ),
    ];
    if cfg!(feature = "redis") {
        // Nothing listens on port 9: refused at once.
        cases.push((
            &["--tier", "pro"],
            &[("KLING_REDIS_URL", "redis://127.0.0.1:9/")],
            "KLING_REDIS_URL: ".to_owned(),
        ));
    }
    for (args, vars, named) in cases {
        let mut cmd = refused_run(&jobs, args);
        cmd.envs(vars.iter().copied());
        let output = finish(cmd).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("kling-batch: {named}")),
            "{args:?} {vars:?}: names {named:?}: {stderr}"
        );
        // kling-batch's own variables are refused for their values, never taken for a slip
        // of one the stack reads (`--tier` checks every `KLING_*` name).
        if vars
            .iter()
            .any(|(name, _)| ["KLING_WEBHOOK_SECRET", "KLING_REDIS_URL"].contains(name))
        {
            assert!(!stderr.contains("is not read"), "{vars:?}: {stderr}");
        }
    }
}

/// A variable a typing slip away from one the stack reads (`KLING_RATE_PER_MINUTES`) may be
/// another program's own, so it stops nothing: the run goes on, and a warning on stderr names
/// it and the name it resembles, each once, with `--tier` as without. Run against a mock on
/// loopback, each run ends at once, having sent its job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_variable_a_typing_slip_from_one_read_is_warned_of_and_the_run_goes_on() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let base_url = server.base_url();
    let dir = temp_dir("setting-slips");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(&jobs, "{\"prompt\":\"x\"}\n").unwrap();
    let speed = SPEED.to_string();
    // The arguments, and the variables set.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
    let cases: [Case<'_>; 2] = [
        (
            &["--journal", "env.sqlite"],
            &[("KLING_TIER", "pro"), ("KLING_RATE_PER_MINUTES", "20")],
        ),
        (
            &["--journal", "tier.sqlite", "--tier", "pro"],
            &[("KLING_RATE_PER_MINUTES", "20")],
        ),
    ];
    for (index, (args, vars)) in cases.into_iter().enumerate() {
        let mut all_args = args.to_vec();
        all_args.extend(["--base-url", &base_url, "--speed", &speed]);
        let mut cmd = refused_run(&jobs, &all_args);
        cmd.current_dir(&dir)
            .envs(vars.iter().copied())
            // Real-time jitter does not speed up: keep a few ms between requests at the mock.
            .env("KLING_HEADROOM", "0.3");
        let output = finish(cmd).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        let warning = "kling-batch: warning: KLING_RATE_PER_MINUTES is not read: did you mean \
                       KLING_RATE_PER_MINUTE? (ignored)";
        assert!(
            stderr.lines().any(|line| line == warning),
            "{args:?}: {stderr}"
        );
        // Not refused for it: the run went on, sent its job, and saw it through.
        assert!(
            !stderr.contains("kling-batch: KLING_RATE_PER_MINUTES: "),
            "{args:?}: {stderr}"
        );
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
        assert_eq!(server.stats().tasks_created, index as u64 + 1, "{args:?}");
    }
}

/// A results file the run could not write (`-o` in a missing folder, the journal itself) or
/// a `--download` DIR it could not create is refused before anything is sent, naming the
/// option: found out after the run, every job would have been paid for with nothing to show
/// for it, and the run would have exited 2 ("nothing was sent").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_that_cannot_be_written_is_refused_before_anything_is_sent() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("badoutput");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(&jobs, JOBS.replace("{\"prompt\": oops\n", "")).unwrap();
    let journal = dir.join("state.sqlite");
    let not_a_dir = dir.join("a-file");
    std::fs::write(&not_a_dir, "x").unwrap();
    let missing = dir.join("missing").join("out.jsonl");
    let out = dir.join("out.jsonl");
    let files = not_a_dir.join("files");
    let cases: [(Vec<&str>, &str); 4] = [
        (vec!["-o", missing.to_str().unwrap()], "--output"),
        (vec!["-o", dir.to_str().unwrap()], "--output"),
        (
            vec!["-o", journal.to_str().unwrap()],
            "is the --journal file (",
        ),
        (
            vec![
                "-o",
                out.to_str().unwrap(),
                "--download",
                files.to_str().unwrap(),
            ],
            "--download",
        ),
    ];
    for (extra, named) in cases {
        let mut args = vec!["--journal", journal.to_str().unwrap()];
        args.extend(extra);
        let output = finish(run_command(&jobs, &server.base_url(), &args)).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert_eq!(server.stats().requests_total, 0, "{args:?}: {stderr}");
    }
    // Writing over the jobs file is refused too, and the file is left as it was.
    let output = finish(run_command(
        &jobs,
        &server.base_url(),
        &["-o", jobs.to_str().unwrap()],
    ))
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is the jobs file"), "{stderr}");
    assert_eq!(server.stats().requests_total, 0);
    assert!(
        std::fs::read_to_string(&jobs)
            .unwrap()
            .contains("\"id\":\"a\"")
    );
    // So is writing over the `--config` file (the results went over it), and any other
    // pair of files the run reads or writes; each refusal names both.
    let config = dir.join("stack.toml");
    let toml = "tier = \"pro\"\n";
    std::fs::write(&config, toml).unwrap();
    let config = config.to_str().unwrap();
    let folder = dir.join("files");
    let folder = folder.to_str().unwrap();
    let journal = journal.to_str().unwrap();
    let jobs_path = jobs.to_str().unwrap();
    let cases: [(Vec<&str>, &str); 5] = [
        (vec!["-o", config], "--output"),
        (vec!["--journal", config], "--journal"),
        (vec!["-o", journal, "--journal", journal], "--output"),
        (vec!["--download", jobs_path], "--download"),
        (vec!["-o", folder, "--download", folder], "--download"),
    ];
    for (args, option) in cases {
        // `--config` (which `--tier` conflicts with) instead of `run_command`'s `--tier`.
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kling-batch"));
        cmd.arg("run")
            .arg(&jobs)
            .args([
                "--base-url",
                &server.base_url(),
                "--quiet",
                "--config",
                config,
            ])
            .args(&args)
            .env("KLING_API_KEY", "test-key")
            .env_remove("KLING_TIER")
            .kill_on_drop(true);
        let output = finish(cmd).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(option), "{args:?}: {stderr}");
        assert!(stderr.contains("name another"), "{args:?}: {stderr}");
        assert_eq!(server.stats().requests_total, 0, "{args:?}: {stderr}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("stack.toml")).unwrap(),
        toml
    );
    assert!(
        !std::path::Path::new(folder).exists(),
        "no folder was made in place of the results"
    );
}

/// `-o` naming a file SQLite keeps beside the journal (its `-wal`, `-shm` or `-journal`,
/// however the path is written, and beside the file a symbolic link `--journal` names, made
/// or not yet), the journal itself, or a path whose temporary file is the journal, is refused
/// before anything is sent or written, naming both options and the path: the run went on,
/// and its results were read by SQLite as the journal's own at the next open, and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_among_the_journals_own_files_is_refused_naming_both_options() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("companions");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(&jobs, JOBS.replace("{\"prompt\": oops\n", "")).unwrap();
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let journal = dir.join("state.sqlite");
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let journal_text = journal.to_str().unwrap().to_owned();
    let mut cases: Vec<(String, String, String)> = ["-wal", "-shm", "-journal"]
        .iter()
        .map(|suffix| {
            (
                journal_text.clone(),
                path(&format!("state.sqlite{suffix}")),
                suffix.to_string(),
            )
        })
        .collect();
    cases.push((
        journal_text.clone(),
        path("sub/../state.sqlite-wal"),
        "-wal".into(),
    ));
    cases.push((
        journal_text.clone(),
        journal_text.clone(),
        "is the --journal file".into(),
    ));
    // Results written first to `state.jsonl.tmp`, the journal.
    cases.push((
        path("state.jsonl.tmp"),
        path("state.jsonl"),
        "state.jsonl.tmp".into(),
    ));
    #[cfg(unix)]
    {
        // Through a link, SQLite keeps the `-wal` beside the file the link names.
        kling_batch::journal::Journal::open(dir.join("sub/real.sqlite")).unwrap();
        std::os::unix::fs::symlink(dir.join("sub/real.sqlite"), dir.join("link.sqlite")).unwrap();
        cases.push((
            path("link.sqlite"),
            path("sub/real.sqlite-wal"),
            "-wal".into(),
        ));
        // A link to a journal not made yet, which SQLite makes where the link points: the
        // `-wal` beside that, through a relative link and a second link.
        std::os::unix::fs::symlink("sub/new.sqlite", dir.join("to-new.sqlite")).unwrap();
        std::os::unix::fs::symlink("to-new.sqlite", dir.join("to-to-new.sqlite")).unwrap();
        cases.push((
            path("to-to-new.sqlite"),
            path("sub/new.sqlite-wal"),
            "-wal".into(),
        ));
    }
    for (journal, out, named) in cases {
        let args = ["--journal", journal.as_str(), "-o", out.as_str()];
        let output = finish(run_command(&jobs, &server.base_url(), &args)).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        for expected in [
            "--output",
            "--journal",
            out.as_str(),
            named.as_str(),
            "name another file",
        ] {
            assert!(
                stderr.contains(expected),
                "{args:?}: names {expected:?}: {stderr}"
            );
        }
        assert_eq!(server.stats().requests_total, 0, "{args:?}: {stderr}");
        assert!(
            !std::path::Path::new(&out).exists() || out == journal,
            "{args:?}: nothing written at {out}"
        );
    }
    // A name beside the link itself is no file of the journal's: the run goes on.
    #[cfg(unix)]
    {
        let out = path("link.sqlite-wal");
        let args = ["--journal", &path("link.sqlite"), "-o", &out];
        let output = finish(run_command(&jobs, &server.base_url(), &args)).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
        assert_eq!(results(std::path::Path::new(&out)).len(), 3);
    }
}

/// A `--download` folder at the path the results are first written to (`X.jsonl.tmp` for
/// `-o X.*`) is refused before anything is sent, naming both options: the run created every
/// job, and then could not write its results, nor could any rerun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_folder_at_the_results_temporary_file_is_refused_naming_both_options() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("download-tmp");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(&jobs, JOBS.replace("{\"prompt\": oops\n", "")).unwrap();
    let out = dir.join("out.json");
    let folder = dir.join("out.jsonl.tmp");
    let args = [
        "-o",
        out.to_str().unwrap(),
        "--download",
        folder.to_str().unwrap(),
    ];
    let output = finish(run_command(&jobs, &server.base_url(), &args)).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for expected in ["--output", "--download", folder.to_str().unwrap()] {
        assert!(stderr.contains(expected), "names {expected:?}: {stderr}");
    }
    assert_eq!(server.stats().requests_total, 0, "{stderr}");
    // Elsewhere, the same run goes through and writes its results.
    let files = dir.join("files");
    let args = [
        "-o",
        out.to_str().unwrap(),
        "--download",
        files.to_str().unwrap(),
    ];
    let output = finish(run_command(&jobs, &server.base_url(), &args)).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(results(&out).len(), 3);
}

/// A directory already at the path the results are first written to (`X.jsonl.tmp` for
/// `-o X.*`), with no `--download` naming it, is refused before anything is sent, naming
/// the path: the run created every job, and then could not write its results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_at_the_results_temporary_file_is_refused_before_anything_is_sent() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("tmp-dir");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(&jobs, JOBS.replace("{\"prompt\": oops\n", "")).unwrap();
    let out = dir.join("out.json");
    let in_the_way = dir.join("out.jsonl.tmp");
    std::fs::create_dir(&in_the_way).unwrap();
    let args = ["-o", out.to_str().unwrap()];
    let output = finish(run_command(&jobs, &server.base_url(), &args)).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for expected in ["--output", in_the_way.to_str().unwrap(), "a directory"] {
        assert!(stderr.contains(expected), "names {expected:?}: {stderr}");
    }
    assert_eq!(server.stats().requests_total, 0, "{stderr}");
    // Moved away, the same run goes through and writes its results.
    std::fs::remove_dir(&in_the_way).unwrap();
    let output = finish(run_command(&jobs, &server.base_url(), &args)).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(results(&out).len(), 3);
}

/// A results file that can no longer be written once the jobs ran (its folder went away)
/// does not turn the run into a setup error: the summary is printed, the status is 1, and the
/// journal keeps every result for a rerun, which writes them without creating anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_results_file_lost_after_the_run_still_reports_the_run_and_a_rerun_writes_it() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("lateoutput");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(&jobs, JOBS.replace("{\"prompt\": oops\n", "")).unwrap();
    let journal = dir.join("journal.sqlite");
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join("results.jsonl");
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
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while server.stats().tasks_created == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the run creates tasks");
    std::fs::remove_dir_all(&out_dir).unwrap();
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), run.wait_with_output())
        .await
        .expect("the run ends")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--output: cannot write"), "{stderr}");
    assert_eq!(summary(&output)["ok"], 3, "{stderr}");

    std::fs::create_dir_all(&out_dir).unwrap();
    let rerun = finish(run_command(&jobs, &server.base_url(), &args)).await;
    assert_eq!(
        rerun.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&rerun.stderr)
    );
    assert_eq!(results(&out).len(), 3);
    assert_eq!(server.stats().tasks_created, 3);
}

/// A `--download` folder whose path is not valid UTF-8 is refused before anything is sent: the
/// journal and the results record each file's path as text, which held `�` for the bytes that
/// are not, so the results named files that do not exist and a rerun never found them.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_folder_whose_path_is_not_utf8_is_refused() {
    use std::os::unix::ffi::OsStrExt as _;

    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("non-utf8-download");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(&jobs, "{\"id\":\"a\",\"prompt\":\"one\"}\n").unwrap();
    let folder = dir.join(std::ffi::OsStr::from_bytes(b"files-\xff"));
    let mut cmd = run_command(&jobs, &server.base_url(), &[]);
    cmd.arg("--download").arg(&folder);
    let output = finish(cmd).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--download"), "{stderr}");
    assert!(stderr.contains("not valid UTF-8"), "{stderr}");
    assert_eq!(server.stats().requests_total, 0, "{stderr}");
    assert!(!folder.exists());
}

/// A variable the run reads set to bytes that are not UTF-8 is refused, naming it, with
/// `--tier` as without: read as unset, `--tier` used the preset's number in its place (a
/// `KLING_SLOTS` of 1 meant for an account's single slot became the Pro tier's 5), a
/// `KLING_WEBHOOK_SECRET` left callbacks unverified and a `KLING_REDIS_URL` the limits in
/// this process alone, without a word.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_variable_that_is_not_utf8_is_refused_naming_it() {
    use std::os::unix::ffi::OsStrExt as _;

    let dir = temp_dir("non-utf8-var");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(&jobs, "{\"prompt\":\"x\"}\n").unwrap();
    let latin1 = std::ffi::OsStr::from_bytes(b"1\xe9");
    let mut cases: Vec<(&[&str], &str)> = vec![
        (&["--tier", "pro"], "KLING_SLOTS"),
        (&["--tier", "pro"], "KLING_DAILY_CREDITS"),
        (&[], "KLING_SLOTS"),
        (
            &["--tier", "pro", "--callback-listen", "127.0.0.1:0"],
            "KLING_WEBHOOK_SECRET",
        ),
    ];
    if cfg!(feature = "redis") {
        cases.push((&["--tier", "pro"], "KLING_REDIS_URL"));
    }
    for (args, var) in cases {
        let mut cmd = refused_run(&jobs, args);
        if args.is_empty() {
            cmd.env("KLING_TIER", "pro");
        }
        cmd.env(var, latin1);
        let output = finish(cmd).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?} {var}: {stderr}");
        assert!(
            stderr.contains(&format!("kling-batch: {var}: ")),
            "{args:?} {var}: {stderr}"
        );
        assert!(
            stderr.contains("not valid UTF-8"),
            "{args:?} {var}: {stderr}"
        );
    }
}

/// A run refused at the start leaves nothing behind: no `--download` folder (it was made
/// before the journal was opened, so a journal refused, through a folder that is not there or
/// beside a lone `-wal`, or a resume refused for the access key pair, left it), and no new
/// journal when a callback setting is refused (those were checked once the journal was
/// made). The control: the same run, nothing wrong, makes both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_run_leaves_no_download_folder_nor_new_journal_behind() {
    use kling_batch::journal::Journal;

    let dir = temp_dir("refused-leaves-nothing");
    let jobs = dir.join("jobs.jsonl");
    let new_style = "{\"id\":\"b\",\"prompt\":\"two\",\"endpoint\":\"/text-to-video/kling-3.0\"}\n";
    std::fs::write(&jobs, new_style).unwrap();
    // A lone `-wal` (the journal file beside it moved away).
    std::fs::write(dir.join("lone.sqlite-wal"), b"").unwrap();
    // A journal with the new-style job registered and still to create.
    let resumed = dir.join("resumed.sqlite");
    {
        let journal = Journal::open(&resumed).unwrap();
        let (parsed, errors) = kling_batch::jobs::parse_jobs(new_style);
        assert!(errors.is_empty());
        journal.register(&parsed).unwrap();
    }
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let (missing, lone, fresh) = (
        path("missing/state.sqlite"),
        path("lone.sqlite"),
        path("fresh.sqlite"),
    );
    let resumed = resumed.to_str().unwrap().to_owned();
    let listen = ["--callback-listen", "127.0.0.1:0"];
    // The journal, further arguments, variables, and what the refusal names.
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let pair = [
        ("KLING_ACCESS_KEY", "ak"),
        ("KLING_SECRET_KEY", "sk"),
        ("KLING_API_KEY", ""),
    ];
    let cases: [Case<'_>; 6] = [
        (&missing, vec![], vec![], "its folder does not exist"),
        (&lone, vec![], vec![], "the journal file is missing"),
        (&resumed, vec![], pair.to_vec(), "KLING_ACCESS_KEY: "),
        (
            &fresh,
            [&listen[..], &["--callback-url", "example.com/hooks"]].concat(),
            vec![],
            "--callback-url: ",
        ),
        (
            &fresh,
            vec!["--callback-listen", "0.0.0.0:0"],
            vec![],
            "--callback-url: ",
        ),
        (
            &fresh,
            listen.to_vec(),
            vec![("KLING_WEBHOOK_SECRET", "whsec_!!!")],
            "KLING_WEBHOOK_SECRET: ",
        ),
    ];
    let files = dir.join("files").join("deep");
    for (journal, args, vars, named) in cases {
        let mut cmd = refused_run(&jobs, &args);
        cmd.args(["--tier", "pro", "--journal", journal, "--download"])
            .arg(&files)
            .envs(vars.iter().copied());
        let output = finish(cmd).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{journal} {args:?}: {stderr}"
        );
        assert!(stderr.contains(named), "{journal} {args:?}: {stderr}");
        assert!(
            !dir.join("files").exists(),
            "{journal} {args:?}: no --download folder made: {stderr}"
        );
        assert!(
            !std::path::Path::new(&fresh).exists(),
            "{journal} {args:?}: no journal made: {stderr}"
        );
    }
    // The control: nothing wrong (sent where nothing listens), the run makes both.
    let mut cmd = refused_run(&jobs, &["--speed", "100"]);
    cmd.args(["--tier", "pro", "--journal", &fresh, "--download"])
        .arg(&files);
    let output = finish(cmd).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        files.is_dir() && std::path::Path::new(&fresh).exists(),
        "{stderr}"
    );
}

/// A run refused for a listener it cannot bind (`--metrics-addr` or `--callback-listen` on a
/// port in use, or on an address not on this machine) leaves nothing behind either: with a
/// new journal, it made the journal first (it recorded the run's base URL, too) and left it;
/// with a journal already there, it recorded that run's base URL in it (one of an earlier
/// version, or whose jobs were never sent, or named by `--base-url-moved-from`), so that the
/// next run, sent where the jobs were, was refused as sent elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_refused_for_a_listener_leaves_no_journal_nor_base_url_behind() {
    use kling_batch::journal::{ApiOrigin, JobState, Journal, Update};

    let dir = temp_dir("refused-listener");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(&jobs, "{\"id\":\"a\",\"prompt\":\"one\"}\n").unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let files = dir.join("files");
    let listeners: [(&str, &str); 3] = [
        ("--metrics-addr", &taken),
        ("--callback-listen", &taken),
        ("--metrics-addr", "192.0.2.1:9"),
    ];
    // A new journal.
    let fresh = dir.join("fresh.sqlite");
    for (option, addr) in listeners {
        let mut cmd = refused_run(&jobs, &["--tier", "pro", option, addr]);
        cmd.arg("--journal")
            .arg(&fresh)
            .arg("--download")
            .arg(&files);
        let output = finish(cmd).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{option} {addr}: {stderr}");
        assert!(stderr.contains(&format!("{option}: ")), "{stderr}");
        assert!(
            !fresh.exists(),
            "{option} {addr}: no journal made: {stderr}"
        );
        assert!(!files.exists(), "{option} {addr}: no folder made: {stderr}");
    }
    // Journals there: one of an earlier version, its job created (no base URL recorded); one
    // whose job was never sent, at another base URL; one sent elsewhere, named as moved.
    let recorded = ApiOrigin::parse("http://127.0.0.1:4001").unwrap();
    let journal_at = |name: &str, state: JobState, base: Option<&ApiOrigin>| {
        let path = dir.join(name);
        let journal = Journal::open(&path).unwrap();
        let (parsed, _) = kling_batch::jobs::parse_jobs("{\"id\":\"a\",\"prompt\":\"one\"}\n");
        journal.register(&parsed).unwrap();
        if let Some(base) = base {
            journal.bind_base_url(base, None).unwrap();
        }
        if state != JobState::Queued {
            journal
                .transition("a", JobState::Creating, Update::default())
                .unwrap();
            journal.transition("a", state, Update::task("t1")).unwrap();
        }
        path
    };
    let cases = [
        (
            journal_at("earlier.sqlite", JobState::Created, None),
            vec![],
        ),
        (
            journal_at("unsent.sqlite", JobState::Queued, Some(&recorded)),
            vec![],
        ),
        (
            journal_at("moved.sqlite", JobState::Created, Some(&recorded)),
            vec!["--base-url-moved-from", "http://127.0.0.1:4001"],
        ),
    ];
    for (path, moved) in cases {
        let before = Journal::open(&path).unwrap().base_url().unwrap();
        for (option, addr) in listeners {
            let mut args = vec!["--tier", "pro", option, addr];
            args.extend(&moved);
            let mut cmd = refused_run(&jobs, &args);
            cmd.arg("--journal")
                .arg(&path)
                .arg("--download")
                .arg(&files);
            let output = finish(cmd).await;
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{path:?} {option}: {stderr}");
            assert!(stderr.contains(&format!("{option}: ")), "{stderr}");
            assert!(
                !stderr.contains("now"),
                "{path:?} {option}: no note: {stderr}"
            );
            let after = Journal::open(&path).unwrap().base_url().unwrap();
            assert_eq!(after, before, "{path:?} {option}: {stderr}");
            assert!(
                !files.exists(),
                "{path:?} {option}: no folder made: {stderr}"
            );
        }
    }
}
