//! Where a run sends: `--base-url`, else `KLING_BASE_URL`, else the `--config` file's
//! `base_url`, else Kling's global host; and a base URL refused names what set it.

use std::path::Path;

use kling_mock::MockServer;

use crate::support::{SPEED, finish, pro_mock, temp_dir};

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
/// ignored and the run sent to the file's base URL. A `/` in the password ends the host
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
    let cases: [Case<'_>; 10] = [
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
