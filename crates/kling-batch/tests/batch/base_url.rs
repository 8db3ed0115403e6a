//! Where a run sends: `--base-url`, else `KLING_BASE_URL`, else the `--config` file's
//! `base_url`, else Kling's global host; a base URL refused names what set it; and a resume
//! sent elsewhere than its journal's jobs were is refused.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use kling_batch::journal::{ApiOrigin, JobState, Journal, Update};
use kling_mock::MockServer;

use crate::support::{SPEED, finish, pro_mock, run_command, temp_dir, until_created, write_jobs};

/// Where nothing listens: a run sent there creates nothing.
const NOWHERE: &str = "http://127.0.0.1:9";

/// `kling-batch run JOBS` with `args` and, of the `KLING_*` variables, the API key and
/// `vars` alone; no `--base-url` unless `args` gives one.
fn run(jobs: &Path, args: &[&str], vars: &[(&str, &str)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kling-batch"));
    cmd.arg("run").arg(jobs).arg("--quiet").args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(|n| n.starts_with("KLING_")) {
            cmd.env_remove(name);
        }
    }
    cmd.env("KLING_API_KEY", "k")
        .envs(vars.iter().copied())
        .kill_on_drop(true);
    cmd
}

/// A `--config` file at `dir/name`: Pro at the tests' speed, with `base_url` if given.
fn config_file(dir: &Path, name: &str, base_url: Option<&str>) -> String {
    let path = dir.join(name);
    let mut text = format!("tier = \"pro\"\nspeed = {SPEED:?}\nheadroom = 0.3\n");
    if let Some(base) = base_url {
        text.push_str(&format!("base_url = \"{base}\"\n"));
    }
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Each source of the base URL is used where nothing before it in the order is set: the
/// option over the variable, the variable over the file (the file's `base_url` used to win
/// there, and `KLING_BASE_URL`, set for the deployment, was ignored without a word), the
/// file over the global host. Each loser points where nothing listens, so a run sent there
/// creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_base_url_comes_from_the_option_then_the_variable_then_the_config_file() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let mock = server.base_url();
    let dir = temp_dir("base-url-order");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(&jobs, "{\"id\":\"a\",\"prompt\":\"one\"}\n").unwrap();
    let speed = SPEED.to_string();
    let tier = ["--tier", "pro", "--speed", speed.as_str()];
    let file_to_mock = config_file(&dir, "mock.toml", Some(&mock));
    let file_to_nowhere = config_file(&dir, "nowhere.toml", Some(NOWHERE));
    let headroom = ("KLING_HEADROOM", "0.3");
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>);
    let cases: [Case<'_>; 6] = [
        // The variable, with `--tier` and without.
        (tier.to_vec(), vec![("KLING_BASE_URL", &mock), headroom]),
        (
            vec!["--speed", &speed],
            vec![("KLING_BASE_URL", &mock), ("KLING_TIER", "pro"), headroom],
        ),
        // The option over the variable.
        (
            [&tier[..], &["--base-url", &mock]].concat(),
            vec![("KLING_BASE_URL", NOWHERE), headroom],
        ),
        // The file alone.
        (vec!["--config", &file_to_mock], vec![]),
        // The variable over the file.
        (
            vec!["--config", &file_to_nowhere],
            vec![("KLING_BASE_URL", &mock)],
        ),
        // The option over both.
        (
            vec!["--config", &file_to_nowhere, "--base-url", &mock],
            vec![("KLING_BASE_URL", NOWHERE)],
        ),
    ];
    for (index, (args, vars)) in cases.into_iter().enumerate() {
        let journal = dir.join(format!("journal-{index}.sqlite"));
        let out = dir.join(format!("out-{index}.jsonl"));
        let mut cmd = run(&jobs, &args, &vars);
        cmd.arg("--journal").arg(&journal).arg("-o").arg(&out);
        let output = finish(cmd).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{args:?} {vars:?}: {stderr}");
        assert_eq!(
            server.stats().tasks_created,
            index as u64 + 1,
            "{args:?} {vars:?}: {stderr}"
        );
    }
}

/// A base URL refused (user info, a query, plain http to another host) names the option,
/// variable or file that set it, and repeats neither its user info nor its query, which may
/// hold a password or a signature: `KLING_BASE_URL` with `--config` too, where it used to be
/// ignored and the run sent to the file's base URL; `--base-url-moved-from` too. A `/` in the password ends the host
/// there (`https://kb:hunter2/x@…` reads as port `hunter2`): `--base-url` quoted that piece.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_url_refused_names_what_set_it_and_repeats_no_secret() {
    let dir = temp_dir("base-url-refused");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(&jobs, "{\"id\":\"a\",\"prompt\":\"one\"}\n").unwrap();
    let with_password = "https://kb:hunter2@kling.example/v1";
    let with_query = "https://kling.example/v1?sig=s3cret";
    let slash_in_password = "https://kb:hunter2/x@kling.example";
    let file_secret = config_file(&dir, "secret.toml", Some(with_password));
    let file_nowhere = config_file(&dir, "nowhere.toml", Some(NOWHERE));
    let tier = ["--tier", "pro"];
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, String);
    let cases: [Case<'_>; 12] = [
        (
            [&tier[..], &["--base-url", with_password]].concat(),
            vec![],
            "--base-url".to_owned(),
        ),
        (
            [&tier[..], &["--base-url", slash_in_password]].concat(),
            vec![],
            "--base-url".to_owned(),
        ),
        (
            vec!["--config", &file_nowhere],
            vec![("KLING_BASE_URL", slash_in_password)],
            "KLING_BASE_URL".to_owned(),
        ),
        (
            [&tier[..], &["--base-url", with_query]].concat(),
            vec![],
            "--base-url".to_owned(),
        ),
        (
            tier.to_vec(),
            vec![("KLING_BASE_URL", with_password)],
            "KLING_BASE_URL".to_owned(),
        ),
        (
            vec![],
            vec![("KLING_BASE_URL", with_query), ("KLING_TIER", "pro")],
            "KLING_BASE_URL".to_owned(),
        ),
        (
            vec!["--config", &file_secret],
            vec![],
            format!("{file_secret} (base_url)"),
        ),
        (
            vec!["--config", &file_nowhere],
            vec![("KLING_BASE_URL", with_query)],
            "KLING_BASE_URL".to_owned(),
        ),
        (
            vec!["--config", &file_nowhere],
            vec![("KLING_BASE_URL", "http://kling.example")],
            "KLING_BASE_URL".to_owned(),
        ),
        // The base URL a journal's jobs were sent to, said to be replaced by this one.
        (
            [
                &tier[..],
                &[
                    "--base-url",
                    NOWHERE,
                    "--base-url-moved-from",
                    with_password,
                ],
            ]
            .concat(),
            vec![],
            "--base-url-moved-from".to_owned(),
        ),
        (
            [
                &tier[..],
                &[
                    "--base-url",
                    NOWHERE,
                    "--base-url-moved-from",
                    slash_in_password,
                ],
            ]
            .concat(),
            vec![],
            "--base-url-moved-from".to_owned(),
        ),
        // Refused however `--base-url` overrides it, as any `KLING_*` variable set wrong is.
        (
            vec!["--config", &file_nowhere, "--base-url", NOWHERE],
            vec![("KLING_BASE_URL", with_password)],
            "KLING_BASE_URL".to_owned(),
        ),
    ];
    for (index, (args, vars, named)) in cases.into_iter().enumerate() {
        let journal = dir.join(format!("journal-{index}.sqlite"));
        let mut cmd = run(&jobs, &args, &vars);
        cmd.arg("--journal").arg(&journal);
        let output = finish(cmd).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?} {vars:?}: {stderr}");
        assert!(
            stderr.contains(&format!("kling-batch: {named}: ")),
            "{args:?} {vars:?}: names {named}: {stderr}"
        );
        for secret in ["hunter2", "s3cret"] {
            assert!(!stderr.contains(secret), "{args:?} {vars:?}: {stderr}");
        }
        assert!(!journal.exists(), "{args:?} {vars:?}: no journal made");
    }
}

/// The run's stderr, its exit status checked to be `code`.
fn exited(output: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(code), "{stderr}");
    stderr
}

/// Runs `jobs` on `server` with `args` and kills it (SIGKILL) once it has created 5 tasks,
/// leaving jobs `creating` and `created` in the journal; returns the requests the server had
/// then.
async fn killed_midway(server: &MockServer, jobs: &Path, args: &[&str]) -> u64 {
    let mut run = run_command(jobs, &server.base_url(), args)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    until_created(server, 5).await;
    run.kill().await.unwrap();
    run.wait().await.unwrap();
    // A request on its way when the run died reaches the server first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(server.stats().tasks_created < 30, "killed midway");
    server.stats().requests_total
}

/// A resume sent elsewhere than its journal's jobs were (`KLING_BASE_URL` unset between runs,
/// the other region, another mock) is refused before anything is sent or made, naming both
/// base URLs and what to do: it looked the journal's tasks up where they are not, found none,
/// and created those jobs again there, each billed twice. Sent to the same base URL, the
/// resume goes on and creates none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_sent_to_another_base_url_is_refused_and_sends_nothing() {
    let first = MockServer::start(pro_mock()).await.unwrap();
    let other = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("base-url-resume");
    let jobs = write_jobs(&dir, 30);
    let journal = dir.join("journal.sqlite");
    let out = dir.join("out.jsonl");
    let args = [
        "--journal",
        journal.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    let sent = killed_midway(&first, &jobs, &args).await;

    let files = dir.join("files");
    let mut elsewhere = run_command(&jobs, &other.base_url(), &args);
    elsewhere.arg("--download").arg(&files);
    let stderr = exited(&finish(elsewhere).await, 2);
    assert!(stderr.contains("kling-batch: --journal: "), "{stderr}");
    for named in [
        format!("its jobs were sent to {}", first.base_url()),
        format!("this run sends to {} (set by --base-url)", other.base_url()),
        "billed twice".to_owned(),
        format!("--base-url {}", first.base_url()),
        format!("--base-url-moved-from {}", first.base_url()),
        "use a new --journal".to_owned(),
    ] {
        assert!(stderr.contains(&named), "names {named}: {stderr}");
    }
    assert_eq!(other.stats().requests_total, 0, "nothing sent: {stderr}");
    assert_eq!(first.stats().requests_total, sent, "nothing sent: {stderr}");
    assert!(!files.exists(), "no --download folder made: {stderr}");

    // The same base URL: the resume goes on.
    exited(
        &finish(run_command(&jobs, &first.base_url(), &args)).await,
        0,
    );
    let stats = first.stats();
    assert_eq!(
        (stats.tasks_created, stats.duplicate_external_ids),
        (30, 0),
        "{stats:?}"
    );
    assert_eq!(other.stats().requests_total, 0);
}

/// A journal whose API is now reached at another URL (a proxy or host renamed; here the same
/// mock at `localhost` for `127.0.0.1`) is refused as any other base URL is, and with
/// `--base-url-moved-from` naming another URL than the one it recorded; naming that one (a
/// trailing `/` aside), it resumes there, creates none twice, and records the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_whose_api_moved_resumes_with_base_url_moved_from_naming_its_base_url() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("base-url-moved");
    let jobs = write_jobs(&dir, 30);
    let journal = dir.join("journal.sqlite");
    let out = dir.join("out.jsonl");
    let args = [
        "--journal",
        journal.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    let sent = killed_midway(&server, &jobs, &args).await;
    let recorded = server.base_url();
    let moved = recorded.replace("127.0.0.1", "localhost");
    assert_ne!(moved, recorded);
    let with = |extra: &[&str]| {
        let mut cmd = run_command(&jobs, &moved, &args);
        cmd.args(extra);
        cmd
    };
    for (extra, said) in [
        (vec![], String::new()),
        (
            vec!["--base-url-moved-from", "http://127.0.0.1:9"],
            format!(
                "(--base-url-moved-from names http://127.0.0.1:9, and the journal names \
                 {recorded})"
            ),
        ),
    ] {
        let stderr = exited(&finish(with(&extra)).await, 2);
        assert!(
            stderr.contains(&format!("its jobs were sent to {recorded}")),
            "{extra:?}: {stderr}"
        );
        assert!(stderr.contains(&said), "{extra:?}: {stderr}");
        assert_eq!(server.stats().requests_total, sent, "{extra:?}: {stderr}");
    }
    let stderr = exited(
        &finish(with(&["--base-url-moved-from", &format!("{recorded}/")])).await,
        0,
    );
    assert!(
        stderr.contains(&format!("sent to {recorded}, are now looked up at {moved}")),
        "{stderr}"
    );
    let stats = server.stats();
    assert_eq!(
        (stats.tasks_created, stats.duplicate_external_ids),
        (30, 0),
        "{stats:?}"
    );
    let journal = Journal::open(&journal).unwrap();
    assert_eq!(journal.base_url().unwrap(), ApiOrigin::parse(&moved));
}

/// A journal of an earlier version, which recorded no base URL, resumes as before (its
/// created task followed, none created twice), says so, and records the base URL of that run:
/// a later run sent elsewhere is refused, and sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_of_an_earlier_version_resumes_and_records_its_base_url() {
    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Full};

    let server = MockServer::start(pro_mock()).await.unwrap();
    let other = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("base-url-earlier");
    let jobs = write_jobs(&dir, 3);
    let path = dir.join("journal.sqlite");
    {
        // As an earlier version left it: jobs registered, one created (its task on the
        // server), no base URL.
        let journal = Journal::open(&path).unwrap();
        let (parsed, _) = kling_batch::jobs::parse_jobs(&std::fs::read_to_string(&jobs).unwrap());
        let records = journal.register(&parsed).unwrap();
        journal
            .transition("job-1", JobState::Creating, Update::default())
            .unwrap();
        let body = format!(
            "{{\"prompt\":\"shot 1\",\"external_task_id\":\"{}\"}}",
            records[0].external_id
        );
        let create = http::Request::post(format!("{}/v1/videos/text2video", server.base_url()))
            .header("authorization", "Bearer test-key")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let answer = crate::support::bare_client().request(create).await.unwrap();
        let answer = answer.into_body().collect().await.unwrap().to_bytes();
        let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
        let task = answer["data"]["task_id"].as_str().unwrap();
        journal
            .transition("job-1", JobState::Created, Update::task(task))
            .unwrap();
        assert_eq!(journal.base_url().unwrap(), None);
    }
    let args = ["--journal", path.to_str().unwrap()];
    let stderr = exited(
        &finish(run_command(&jobs, &server.base_url(), &args)).await,
        0,
    );
    assert!(
        stderr.contains(&format!(
            "does not say where its jobs were sent (a journal of an earlier kling-batch): it \
             now records {}",
            server.base_url()
        )),
        "{stderr}"
    );
    let stats = server.stats();
    assert_eq!(
        (stats.tasks_created, stats.duplicate_external_ids),
        (3, 0),
        "{stats:?}"
    );
    {
        let journal = Journal::open(&path).unwrap();
        assert_eq!(
            journal.base_url().unwrap(),
            ApiOrigin::parse(&server.base_url())
        );
    }
    let stderr = exited(
        &finish(run_command(&jobs, &other.base_url(), &args)).await,
        2,
    );
    assert!(
        stderr.contains(&format!("its jobs were sent to {}", server.base_url())),
        "{stderr}"
    );
    assert_eq!(other.stats().requests_total, 0, "{stderr}");
}

/// A journal none of whose jobs was ever created (the first run's key refused with 1002, as
/// a key of the other region is) holds no task anywhere: a run sent elsewhere (the key's
/// region) takes it over, says so, and creates every job once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_whose_jobs_were_never_created_takes_the_next_runs_base_url() {
    let refusing = MockServer::start(pro_mock().api_key("right-key"))
        .await
        .unwrap();
    let other = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("base-url-unsent");
    let jobs = write_jobs(&dir, 6);
    let journal = dir.join("journal.sqlite");
    let args = ["--journal", journal.to_str().unwrap()];
    exited(
        &finish(run_command(&jobs, &refusing.base_url(), &args)).await,
        1,
    );
    let refused = refusing.stats();
    assert_eq!(
        (refused.tasks_created, refused.requests_total),
        (0, 1),
        "{refused:?}"
    );
    let stderr = exited(
        &finish(run_command(&jobs, &other.base_url(), &args)).await,
        0,
    );
    assert!(
        stderr.contains(&format!(
            "none of its jobs holds a task at {}: it now records {}",
            refusing.base_url(),
            other.base_url()
        )),
        "{stderr}"
    );
    let stats = other.stats();
    assert_eq!(
        (stats.tasks_created, stats.duplicate_external_ids),
        (6, 0),
        "{stats:?}"
    );
    assert_eq!(refusing.stats().requests_total, 1);
}

/// What a journal records, queried back: its base URL, every job's record and every job's
/// transitions.
fn recorded(
    path: &Path,
) -> (
    Option<ApiOrigin>,
    Vec<kling_batch::journal::JobRecord>,
    Vec<Vec<String>>,
) {
    let journal = Journal::open(path).unwrap();
    let records = journal.records().unwrap();
    let transitions = records
        .iter()
        .map(|r| journal.transitions(&r.job_id).unwrap())
        .collect();
    (journal.base_url().unwrap(), records, transitions)
}

/// A resume refused for a job edited under its id leaves the journal as it found it, and
/// makes no `--download` folder: one of an earlier version (no base URL recorded), one whose
/// jobs were never sent (at another base URL), and one named by `--base-url-moved-from` each
/// used to record this run's base URL before the jobs were refused, so that the next run,
/// sent where the jobs were, was refused as sent elsewhere; and the folder was made. No note
/// says that the journal records this run's base URL. The control: the file as it was, the
/// same run goes on past the journal, records its base URL, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_refused_for_a_changed_job_leaves_the_journal_and_its_base_url_as_they_were() {
    let dir = temp_dir("base-url-changed-jobs");
    let jobs = dir.join("jobs.jsonl");
    let original = "{\"id\":\"a\",\"prompt\":\"one\"}\n{\"id\":\"b\",\"prompt\":\"two\"}\n";
    let (parsed, _) = kling_batch::jobs::parse_jobs(original);
    let recorded_at = ApiOrigin::parse("http://127.0.0.1:4001").unwrap();
    let journal_at = |name: &str, state: JobState, base: Option<&ApiOrigin>| {
        let path = dir.join(name);
        let journal = Journal::open(&path).unwrap();
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
        (journal_at("earlier.sqlite", JobState::Failed, None), vec![]),
        (
            journal_at("unsent.sqlite", JobState::Queued, Some(&recorded_at)),
            vec![],
        ),
        (
            journal_at("moved.sqlite", JobState::Failed, Some(&recorded_at)),
            vec!["--base-url-moved-from", "http://127.0.0.1:4001"],
        ),
    ];
    let files = dir.join("files");
    let edited = "{\"id\":\"a\",\"prompt\":\"one, but blue\"}\n{\"id\":\"b\",\"prompt\":\"two\"}\n";
    for (path, moved) in &cases {
        std::fs::write(&jobs, edited).unwrap();
        let before = recorded(path);
        let mut cmd = run(
            &jobs,
            &[&["--tier", "pro", "--base-url", NOWHERE][..], moved].concat(),
            &[],
        );
        cmd.arg("--journal").arg(path).arg("--download").arg(&files);
        let stderr = exited(&finish(cmd).await, 2);
        assert!(
            stderr.contains("JOBS: job `a` (line 1)"),
            "{path:?}: {stderr}"
        );
        assert!(!stderr.contains("now"), "{path:?}: no note: {stderr}");
        assert_eq!(recorded(path), before, "{path:?}: {stderr}");
        assert!(!files.exists(), "{path:?}: no folder made: {stderr}");
    }
    // The control: the file as it was. The jobs left to send go where nothing listens: the
    // run is stopped once it has recorded its base URL (it says so first).
    std::fs::write(&jobs, original).unwrap();
    for (path, moved) in &cases {
        let mut cmd = run(
            &jobs,
            &[
                &["--tier", "pro", "--speed", "100", "--base-url", NOWHERE][..],
                moved,
            ]
            .concat(),
            &[],
        );
        cmd.arg("--journal")
            .arg(path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let mut said = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), async {
            use tokio::io::AsyncReadExt as _;
            let mut buf = [0; 1024];
            while !String::from_utf8_lossy(&said).contains(&format!("now records {NOWHERE}"))
                && !String::from_utf8_lossy(&said)
                    .contains(&format!("are now looked up at {NOWHERE}"))
            {
                let n = stderr.read(&mut buf).await.unwrap();
                assert_ne!(n, 0, "{path:?}: {}", String::from_utf8_lossy(&said));
                said.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{path:?}: the note: {}", String::from_utf8_lossy(&said)));
        child.kill().await.unwrap();
        child.wait().await.unwrap();
        assert_eq!(
            recorded(path).0,
            ApiOrigin::parse(NOWHERE),
            "{path:?}: {}",
            String::from_utf8_lossy(&said)
        );
    }
}
