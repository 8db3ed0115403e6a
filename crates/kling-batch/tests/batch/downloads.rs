//! `--download DIR`: result files saved as tasks succeed, resumably.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kling_batch::download::{self, DownloadTimeouts};
use kling_batch::journal::Journal;
use kling_mock::MockServer;

use crate::support::{finish, pro_mock, results, run_command, temp_dir, write_jobs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_downloaded_recorded_and_a_missing_file_is_fetched_again() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("download");
    let jobs = write_jobs(&dir, 6);
    let files_dir = dir.join("files");
    let journal_path = dir.join("journal.sqlite");
    let out = dir.join("out.jsonl");
    let run = || run_downloading(&server, &jobs, &files_dir, &journal_path, &out);
    run().await;

    let lines = results(&out);
    for line in &lines {
        let task = line["task_id"].as_str().unwrap();
        let files = line["files"]
            .as_array()
            .expect("files recorded in the output");
        assert_eq!(files.len(), 1);
        let path = PathBuf::from(files[0].as_str().unwrap());
        assert!(path.starts_with(&files_dir), "{path:?}");
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes, kling_mock::file_bytes(&format!("{task}/0.mp4")));
    }
    let journal = Journal::open(&journal_path).unwrap();
    let record = journal.record("job-3").unwrap().unwrap();
    assert_eq!(record.files.len(), 1, "the journal records the file too");
    drop(journal);

    // A lost file is fetched again by the next run; nothing is created again.
    let lost = PathBuf::from(lines[2]["files"][0].as_str().unwrap());
    std::fs::remove_file(&lost).unwrap();
    run().await;
    assert!(lost.exists());
    assert_eq!(server.stats().tasks_created, 6);
}

/// Runs `jobs` against `server` with `--download files --journal journal -o out`, and checks
/// that every job succeeded with its files (exit status 0).
async fn run_downloading(
    server: &MockServer,
    jobs: &std::path::Path,
    files: &std::path::Path,
    journal: &std::path::Path,
    out: &std::path::Path,
) {
    let args = [
        "--download",
        files.to_str().unwrap(),
        "--journal",
        journal.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    let output = finish(run_command(jobs, &server.base_url(), &args)).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A result server on 127.0.0.1 that stalls: the first `stalled` connections are accepted and
/// then held without a byte of answer; later ones get `BODY`.
async fn stalling_server(stalled: usize) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        let mut accepted = 0;
        while let Ok((mut socket, _)) = listener.accept().await {
            accepted += 1;
            if accepted <= stalled {
                held.push(socket);
                continue;
            }
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    BODY.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(BODY).await;
            });
        }
    });
    addr
}

const BODY: &[u8] = b"not really a video";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_download_is_given_up_left_for_the_next_run_and_holds_nothing() {
    // Result URLs point at a server whose first connection stalls: one of the two files hangs.
    let files = stalling_server(1).await;
    let server = MockServer::start(pro_mock().files_base_url(format!("http://{files}/outputs")))
        .await
        .unwrap();
    let dir = temp_dir("download-stall");
    let jobs = write_jobs(&dir, 2);
    let files_dir = dir.join("files");
    let journal_path = dir.join("journal.sqlite");
    let out = dir.join("out.jsonl");
    let args = [
        "--download",
        files_dir.to_str().unwrap(),
        "--download-idle-timeout",
        "0.3",
        "--download-timeout",
        "5",
        "--journal",
        journal_path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--json",
    ];
    let output = finish(run_command(&jobs, &server.base_url(), &args)).await;
    assert_eq!(
        output.status.code(),
        Some(1),
        "a file is missing: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = results(&out);
    assert!(lines.iter().all(|l| l["state"] == "succeeded"), "{lines:?}");
    let (missing, saved): (Vec<&serde_json::Value>, Vec<&serde_json::Value>) = lines
        .iter()
        .partition(|l| l.get("download_error").is_some());
    assert_eq!((missing.len(), saved.len()), (1, 1), "{lines:?}");
    let why = missing[0]["download_error"]["message"].as_str().unwrap();
    assert!(why.contains("timed out"), "{why}");
    assert!(why.contains("a later run fetches it again"), "{why}");
    assert!(missing[0].get("files").is_none(), "{lines:?}");
    let saved_file = PathBuf::from(saved[0]["files"][0].as_str().unwrap());
    assert_eq!(std::fs::read(&saved_file).unwrap(), BODY);
    assert_eq!(crate::support::summary(&output)["downloads_missing"], 1);
    // The run's warning reaches stderr (the binary installs a subscriber).
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("kling-batch: warning: download failed; a later run tries again"),
        "{stderr}"
    );
    assert!(stderr.contains("timed out"), "{stderr}");

    // The next run fetches the missing file (the server answers now) and creates nothing.
    let output = finish(run_command(&jobs, &server.base_url(), &args)).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = results(&out);
    assert!(
        lines.iter().all(|l| l.get("download_error").is_none()),
        "{lines:?}"
    );
    for line in &lines {
        let path = PathBuf::from(line["files"][0].as_str().unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), BODY);
    }
    assert_eq!(server.stats().tasks_created, 2);
    let journal = Journal::open(&journal_path).unwrap();
    assert!(
        journal
            .records()
            .unwrap()
            .iter()
            .all(|r| r.download_error.is_none())
    );
}

/// A file an older version saved in `DIR/{job}/` and recorded stays recorded where it is when a
/// resumed run fetches the task's other files, though its URL no longer answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_saved_by_an_older_version_is_kept_where_it_is() {
    let timeouts = DownloadTimeouts::default();
    let client = download::client(timeouts.connect_timeout()).unwrap();
    let dir = temp_dir("download-old-layout");
    let old = dir.join("job").join("0.mp4");
    std::fs::create_dir_all(old.parent().unwrap()).unwrap();
    std::fs::write(&old, BODY).unwrap();
    // Nothing listens there: a URL that expired, say.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = gone.local_addr().unwrap();
    drop(gone);
    let urls = [
        format!("http://{addr}/outputs/t/0.mp4"),
        format!("http://{addr}/outputs/t/1.mp4"),
    ];
    let recorded = [old.display().to_string()];
    let fetched = download::fetch_all(&client, &dir, "job", "t", &urls, &recorded, timeouts).await;
    assert_eq!(
        fetched.files, recorded,
        "kept, and the missing one is not recorded"
    );
    assert!(fetched.error.is_some(), "the second file is missing");
}

/// `fetch_all` of one URL on `server`, with a guard against hanging forever.
async fn fetch_one(
    addr: std::net::SocketAddr,
    timeouts: DownloadTimeouts,
    name: &str,
) -> kling_batch::download::Fetched {
    let client = download::client(timeouts.connect_timeout()).unwrap();
    let dir = temp_dir(name);
    let url = format!("http://{addr}/outputs/t/0.mp4");
    let fetched = tokio::time::timeout(
        Duration::from_secs(20),
        download::fetch_all(&client, &dir, "job", "t", &[url], &[], timeouts),
    )
    .await
    .expect("the download gives up instead of hanging");
    assert!(fetched.files.is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(download::task_dir(&dir, "job", "t"))
        .unwrap()
        .collect();
    assert!(
        leftovers.is_empty(),
        "no file or .part is left: {leftovers:?}"
    );
    fetched
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_stops_midway_or_only_trickles_is_given_up() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    // Sends the head and 10 of 100 bytes, then nothing: the idle timeout.
    let midway = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let midway_addr = midway.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut socket, _)) = midway.accept().await {
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                .await;
            held.push(socket);
        }
    });
    // Sends a byte every 20 ms forever: never idle, so the overall cap.
    let trickle = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trickle_addr = trickle.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = trickle.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000000\r\n\r\n")
                    .await;
                while socket.write_all(b"x").await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        }
    });

    let timeouts = DownloadTimeouts::default()
        .idle(Duration::from_millis(300))
        .total(Duration::from_secs(2));
    let fetched = fetch_one(midway_addr, timeouts, "dl-midway").await;
    let error = fetched.error.expect("the file is reported missing");
    assert!(error.is_timeout(), "{error}");
    assert!(error.to_string().contains("no data for 0.3s"), "{error}");

    let fetched = fetch_one(trickle_addr, timeouts, "dl-trickle").await;
    let error = fetched.error.expect("the file is reported missing");
    assert!(error.is_timeout(), "{error}");
    assert!(error.to_string().contains("took more than 2s"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_server_that_never_accepts_is_given_up_at_the_connect_timeout() {
    // A listener with a backlog of one that never accepts: once one connection fills the
    // backlog, the kernel drops further SYNs and a connect waits.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let _filler = std::net::TcpStream::connect(addr).unwrap();

    // The idle timeout (30 s) is beyond the test's guard: only the connect timeout ends it.
    let timeouts = DownloadTimeouts::default().connect(Duration::from_millis(200));
    let fetched = fetch_one(addr, timeouts, "dl-connect").await;
    let error = fetched.error.expect("the file is reported missing");
    assert!(error.is_timeout(), "{error}");
    assert!(
        error.to_string().contains("no connection within 0.2s"),
        "{error}"
    );
    drop(listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_whose_ids_clean_to_one_name_and_a_new_journal_never_take_another_tasks_file() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("download-ids");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(
        &jobs,
        "{\"id\":\"a b\",\"prompt\":\"one\"}\n{\"id\":\"a_b\",\"prompt\":\"two\"}\n",
    )
    .unwrap();
    let files_dir = dir.join("files");
    // Each run's files are its own tasks' files, each job's in a folder of its own.
    let check = |out: &std::path::Path| -> Vec<PathBuf> {
        let lines = results(out);
        assert_eq!(lines.len(), 2);
        let mut paths = Vec::new();
        for line in &lines {
            let task = line["task_id"].as_str().unwrap();
            let path = PathBuf::from(line["files"][0].as_str().unwrap());
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                bytes == kling_mock::file_bytes(&format!("{task}/0.mp4")),
                "{} holds its own task's file: {path:?}",
                line["job_id"]
            );
            paths.push(path);
        }
        // `DIR/{job}/{task}/0.mp4`: the jobs' folders differ, not only their tasks'.
        let job_dir = |p: &PathBuf| p.parent().and_then(|t| t.parent()).map(PathBuf::from);
        assert_ne!(job_dir(&paths[0]), job_dir(&paths[1]), "{paths:?}");
        paths
    };
    let run = |journal: &str, out: &str| {
        let journal = dir.join(journal);
        let out = dir.join(out);
        let args = [
            "--download".to_owned(),
            files_dir.display().to_string(),
            "--journal".to_owned(),
            journal.display().to_string(),
            "-o".to_owned(),
            out.display().to_string(),
        ];
        let command = {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_command(&jobs, &server.base_url(), &args)
        };
        (command, out)
    };

    let (command, out) = run("first.sqlite", "first.jsonl");
    let output = finish(command).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let first = check(&out);

    // A new journal over the same folder: new tasks, whose files are fetched, not taken from
    // the first run's; the first run's files stay as they were.
    let (command, out) = run("second.sqlite", "second.jsonl");
    let output = finish(command).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let second = check(&out);
    assert_eq!(server.stats().tasks_created, 4);
    let first_lines = results(&dir.join("first.jsonl"));
    for (path, line) in first.iter().zip(&first_lines) {
        let task = line["task_id"].as_str().unwrap();
        assert_eq!(
            std::fs::read(path).unwrap(),
            kling_mock::file_bytes(&format!("{task}/0.mp4"))
        );
    }
    assert!(
        second.iter().all(|p| !first.contains(p)),
        "{first:?} {second:?}"
    );
}

/// A result server on 127.0.0.1 that answers each request after `hold`, counting the requests
/// in flight: the most at once.
async fn counting_server(hold: Duration) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let now = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let peak = most.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (now, most) = (now.clone(), most.clone());
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let in_flight = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(in_flight, Ordering::SeqCst);
                tokio::time::sleep(hold).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    BODY.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(BODY).await;
                now.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, peak)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_run_downloads_at_most_eight_jobs_at_once() {
    let (files, peak) = counting_server(Duration::from_millis(150)).await;
    let server = MockServer::start(pro_mock().files_base_url(format!("http://{files}/outputs")))
        .await
        .unwrap();
    let dir = temp_dir("download-bound");
    let jobs = write_jobs(&dir, 24);
    let journal_path = dir.join("journal.sqlite");
    let out = dir.join("out.jsonl");
    let files_dir = dir.join("files");
    let plain = [
        "--journal",
        journal_path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    // First without `--download`: 24 succeeded jobs, none of whose files is on disk.
    let output = finish(run_command(&jobs, &server.base_url(), &plain)).await;
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(peak.load(Ordering::SeqCst), 0);

    let mut args = plain.to_vec();
    args.extend(["--download", files_dir.to_str().unwrap()]);
    let output = finish(run_command(&jobs, &server.base_url(), &args)).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = results(&out);
    assert!(
        lines
            .iter()
            .all(|l| l["files"].as_array().is_some_and(|f| f.len() == 1))
    );
    let most = peak.load(Ordering::SeqCst);
    assert!(
        (2..=download::MAX_IN_FLIGHT).contains(&most),
        "{most} downloads at once"
    );
    assert_eq!(server.stats().tasks_created, 24);
}

/// A rerun with another `--download DIR` saves every file there: files recorded under the
/// old DIR do not count as present in the new one. Nothing is created again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_with_another_download_dir_fetches_the_files_there() {
    let server = MockServer::start(pro_mock()).await.unwrap();
    let dir = temp_dir("download-moved");
    let jobs = write_jobs(&dir, 3);
    let journal_path = dir.join("journal.sqlite");
    let out = dir.join("out.jsonl");
    for files in ["a", "b"] {
        let files_dir = dir.join(files);
        run_downloading(&server, &jobs, &files_dir, &journal_path, &out).await;
        for line in results(&out) {
            let saved = PathBuf::from(line["files"][0].as_str().unwrap());
            assert!(
                saved.starts_with(&files_dir),
                "{saved:?} not in {files_dir:?}"
            );
            assert!(saved.exists(), "{saved:?}");
        }
    }
    assert_eq!(server.stats().tasks_created, 3);
}

/// A result URL whose own extension is `.part` (`…/0.mp4.part`): a download cut off midway
/// (the run killed) leaves a partial file, and the next run must not take it for the whole
/// result. It was written under the result's own name (`0.part`, as its temporary name was
/// too), so the next run kept the 10 bytes of 100 as the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_off_midway_is_fetched_whole_even_when_its_url_ends_in_part() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    // The first connection gets the head and 10 of 100 bytes, then nothing; later ones get
    // the whole file.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        let mut first = true;
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let head = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n";
            let _ = socket.write_all(head).await;
            if first {
                first = false;
                let _ = socket.write_all(&[b'x'; 10]).await;
                held.push(socket);
            } else {
                let _ = socket.write_all(&[b'y'; 100]).await;
            }
        }
    });
    let client = download::client(Duration::from_secs(5)).unwrap();
    let dir = temp_dir("dl-part-url");
    let url = format!("http://{addr}/outputs/t/0.mp4.part");
    let folder = download::task_dir(&dir, "job", "t");

    let cut = {
        let (client, dir, url) = (client.clone(), dir.clone(), url.clone());
        tokio::spawn(async move {
            download::fetch_all(
                &client,
                &dir,
                "job",
                "t",
                &[url],
                &[],
                DownloadTimeouts::default(),
            )
            .await
        })
    };
    // Once the 10 bytes are on disk, the run is killed (no cleanup).
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let written = std::fs::read_dir(&folder).ok().is_some_and(|entries| {
                entries
                    .flatten()
                    .any(|e| e.metadata().is_ok_and(|m| m.len() >= 10))
            });
            if written {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the first 10 bytes are written");
    cut.abort();
    let _ = cut.await;

    let fetched = tokio::time::timeout(
        Duration::from_secs(20),
        download::fetch_all(
            &client,
            &dir,
            "job",
            "t",
            &[url],
            &[],
            DownloadTimeouts::default(),
        ),
    )
    .await
    .expect("the download ends");
    assert!(fetched.error.is_none(), "{:?}", fetched.error);
    let path = folder.join("0.part");
    assert_eq!(fetched.files, [path.display().to_string()]);
    assert_eq!(std::fs::read(&path).unwrap(), [b'y'; 100], "the whole file");
}

/// A result server that answers by the file's folder (`/outputs/{folder}/…`): `gone` with
/// `404`, `flaky` with `503` twice and then the file, `down` with `503` (`Retry-After: 0`)
/// always, anything else with the file; and counts the requests of each folder.
async fn status_server() -> (
    std::net::SocketAddr,
    Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
) {
    let asked: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>> = Arc::default();
    let counts = asked.clone();
    let app = axum::Router::new().fallback(move |uri: http::Uri| {
        let asked = asked.clone();
        async move {
            let folder = uri.path().split('/').nth(2).unwrap_or_default().to_owned();
            let n = {
                let mut asked = asked.lock().unwrap();
                let n = asked.entry(folder.clone()).or_default();
                *n += 1;
                *n
            };
            let answer = |status: u16, retry_after: Option<&str>, body: &[u8]| {
                let mut answer = http::Response::builder().status(status);
                if let Some(secs) = retry_after {
                    answer = answer.header(http::header::RETRY_AFTER, secs);
                }
                answer.body(axum::body::Body::from(body.to_vec())).unwrap()
            };
            match folder.as_str() {
                "gone" => answer(404, None, b"expired"),
                "flaky" if n <= 2 => answer(503, None, b""),
                "down" => answer(503, Some("0"), b""),
                _ => answer(200, None, BODY),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, counts)
}

/// A file answered `404` (an expired result URL) is asked for once and reported gone; one
/// answered `503` is asked again in the run, a bounded number of times, and saved once the
/// server answers. A job with a file gone and another that may still come is not gone: the
/// next run tries the latter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_for_good_is_reported_gone_and_a_5xx_is_asked_again_a_few_times() {
    let (addr, asked) = status_server().await;
    let timeouts = DownloadTimeouts::default();
    let client = download::client(timeouts.connect_timeout()).unwrap();
    let dir = temp_dir("download-status");
    let url = |folder: &str| format!("http://{addr}/outputs/{folder}/0.mp4");
    let count = |folder: &str| asked.lock().unwrap().get(folder).copied().unwrap_or(0);

    let fetched =
        download::fetch_all(&client, &dir, "gone", "t", &[url("gone")], &[], timeouts).await;
    let error = fetched.error.expect("missing");
    assert!(fetched.gone && error.is_gone(), "{error}");
    assert!(error.to_string().contains("http 404"), "{error}");
    assert_eq!(count("gone"), 1, "never asked again");

    let fetched =
        download::fetch_all(&client, &dir, "flaky", "t", &[url("flaky")], &[], timeouts).await;
    assert!(fetched.error.is_none(), "{:?}", fetched.error);
    assert_eq!(std::fs::read(&fetched.files[0]).unwrap(), BODY);
    assert_eq!(count("flaky"), 3);

    let urls = [url("down"), url("gone")];
    let fetched = download::fetch_all(&client, &dir, "down", "t", &urls, &[], timeouts).await;
    let error = fetched.error.expect("missing");
    assert!(!fetched.gone, "the 503 may pass: {error}");
    assert_eq!(
        error.http_status().map(|s| s.status().as_u16()),
        Some(503),
        "{error}"
    );
    assert_eq!(count("down"), download::MAX_TRIES as usize, "bounded");
}

/// A result URL answered `404` (expired) failed the download on every run, forever: once its
/// task ended 30 days ago or more (its URL's lifetime), it is recorded once as gone, counted
/// under `downloads gone`, and a later run does not ask for it again (nor creates anything).
/// Sooner, a `404` is no expiry (a file not yet published, a CDN's refusal): the first run,
/// whose URL was minutes old, recorded the file gone for good; it is left for the next run,
/// and a gone-mark made so (by the version that brought the mark) is not honoured. Each run
/// that asks for it while its URL is young asks the task for its URLs again, a bounded
/// number of times, before it gives up; past the 30 days, it does not. `--refetch-gone` asks for a file recorded gone again (the mark was final: only
/// an edit of the journal brought it back), and writes the mark anew when it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_result_url_is_recorded_once_and_not_fetched_on_every_run() {
    let (files, asked) = status_server().await;
    let server =
        MockServer::start(pro_mock().files_base_url(format!("http://{files}/outputs/gone")))
            .await
            .unwrap();
    let dir = temp_dir("download-gone");
    let jobs = write_jobs(&dir, 1);
    let files_dir = dir.join("files");
    let journal_path = dir.join("journal.sqlite");
    let out = dir.join("out.jsonl");
    let args = [
        "--download",
        files_dir.to_str().unwrap(),
        "--journal",
        journal_path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--json",
    ];
    let count = || asked.lock().unwrap().get("gone").copied().unwrap_or(0);
    // One try, and one after each fresh query of the task.
    let tries = 1 + download::MAX_REFRESHES as usize;
    for run in 0..5 {
        // Opened once the first run made the journal: an empty file there is refused.
        let db = || rusqlite::Connection::open(&journal_path);
        if run == 1 {
            // A gone-mark made while the URL was young (as the version that introduced the
            // mark made it) is not honoured: the file is asked for again.
            let db = db().unwrap();
            let error: String = db
                .query_row("SELECT download_error FROM jobs", [], |r| r.get(0))
                .unwrap();
            let mut error: serde_json::Value = serde_json::from_str(&error).unwrap();
            error["message"] = format!("{}: http 404; not fetched again", download::GONE).into();
            db.execute(
                "UPDATE jobs SET download_error = ?1",
                [serde_json::to_string(&error).unwrap()],
            )
            .unwrap();
        } else if run == 2 {
            // The task ended 31 days ago: its URL's lifetime is over.
            let moved = db()
                .unwrap()
                .execute(
                    "UPDATE transitions SET at = at - 31 * 86400 WHERE to_state = 'succeeded'",
                    [],
                )
                .unwrap();
            assert_eq!(moved, 1);
        }
        let mut args = args.to_vec();
        if run == 4 {
            args.push("--refetch-gone");
        }
        let output = finish(run_command(&jobs, &server.base_url(), &args)).await;
        assert_eq!(
            output.status.code(),
            Some(1),
            "a file is missing: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let lines = results(&out);
        assert_eq!(lines[0]["state"], "succeeded", "{lines:?}");
        let why = lines[0]["download_error"]["message"].as_str().unwrap();
        assert!(why.contains("http 404"), "{why}");
        let summary = crate::support::summary(&output);
        let counted = (
            summary["downloads_gone"].as_u64(),
            summary["downloads_missing"].as_u64(),
        );
        if run < 2 {
            assert!(!why.starts_with(download::GONE), "a young URL: {why}");
            assert!(why.contains("a later run fetches it again"), "{why}");
            assert_eq!(counted, (Some(0), Some(1)), "run {run}: {summary}");
            assert_eq!(count(), (run + 1) * tries, "run {run}");
        } else {
            assert!(why.starts_with(download::GONE), "{why}");
            assert!(why.contains("not fetched again"), "{why}");
            assert_eq!(counted, (Some(1), Some(0)), "run {run}: {summary}");
            let asked = if run < 4 {
                2 * tries + 1
            } else {
                3 * tries + 1
            };
            assert_eq!(
                count(),
                asked,
                "run {run}: asked once more by the third run (its URL expired: no query of the \
                 task), and again by the one with --refetch-gone"
            );
        }
    }
    assert_eq!(server.stats().tasks_created, 1);
}

/// Set in the child process that [`a_result_file_whose_last_write_fails_is_not_taken_for_whole`]
/// runs itself in, under a file-size limit.
const UNDER_A_FILE_SIZE_LIMIT: &str = "KLING_BATCH_TEST_UNDER_A_FILE_SIZE_LIMIT";

/// What the child process prints once it has checked the download under the limit: a child
/// that ran no test (its name not matched) exits 0 too.
const CHECKED_UNDER_THE_LIMIT: &str = "checked under a 1024-byte file-size limit";

/// A result file whose last write fails (the disk full, a quota, `EFBIG`) is neither renamed
/// to its result name nor recorded, and its `.part` is removed: tokio's `File::sync_all` waits
/// for the write in flight but keeps its error for a later call, and none came (no `flush`),
/// so the file was saved cut short and reported whole, and every later run took it as saved.
///
/// The test runs itself again in a child process under `ulimit -f 1` (a write past 1024 bytes
/// fails with `EFBIG`; `SIGXFSZ` ignored), where the file (4000 bytes, one write) must be
/// refused; here, without the limit, the same download is saved whole (the control). Skipped
/// where there is no `bash`.
#[test]
fn a_result_file_whose_last_write_fails_is_not_taken_for_whole() {
    const SIZE: usize = 4000;
    let limited = std::env::var_os(UNDER_A_FILE_SIZE_LIMIT).is_some();
    let dir = temp_dir(if limited {
        "dl-efbig-limited"
    } else {
        "dl-efbig"
    });
    let file = download::task_dir(&dir, "job", "t").join("0.mp4");
    if limited {
        // The limit is in effect, and refuses a plain write as it will the download's.
        let probe = std::fs::write(dir.join("probe"), [7u8; SIZE]).unwrap_err();
        assert_eq!(probe.kind(), std::io::ErrorKind::FileTooLarge, "{probe}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fetched = runtime.block_on(async {
        // One body of SIZE bytes, which the download writes at once: its last write.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(|| async { vec![7u8; SIZE] });
        tokio::spawn(async move { axum::serve(listener, app).await });
        let timeouts = DownloadTimeouts::default();
        let client = download::client(timeouts.connect_timeout()).unwrap();
        let url = format!("http://{addr}/outputs/t/0.mp4");
        tokio::time::timeout(
            Duration::from_secs(20),
            download::fetch_all(&client, &dir, "job", "t", &[url], &[], timeouts),
        )
        .await
        .expect("the download ends")
    });
    if limited {
        assert!(
            fetched.files.is_empty(),
            "a file cut short is not recorded: {fetched:?}, {} bytes on disk",
            std::fs::metadata(&file).map_or(0, |m| m.len())
        );
        let error = fetched.error.expect("the missing file is reported");
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
        let mut io = None;
        while let Some(e) = source {
            io = io.or(e.downcast_ref::<std::io::Error>());
            source = e.source();
        }
        assert_eq!(
            io.map(std::io::Error::kind),
            Some(std::io::ErrorKind::FileTooLarge),
            "{error}"
        );
        assert!(!fetched.gone);
        assert!(!file.exists(), "nothing under the result's name");
        assert!(!download::part_path(&file).exists(), "no .part left");
        let _ = std::fs::remove_dir_all(&dir);
        // The parent reads it from the child's output (libtest's capture is off there).
        #[allow(clippy::print_stdout)]
        {
            println!("{CHECKED_UNDER_THE_LIMIT}");
        }
        return;
    }
    // The control: without the limit, the same download is saved whole.
    assert!(fetched.error.is_none(), "{fetched:?}");
    assert_eq!(fetched.files, [file.display().to_string()]);
    assert_eq!(std::fs::read(&file).unwrap(), [7u8; SIZE]);
    let _ = std::fs::remove_dir_all(&dir);

    // This test's name as the harness knows it (without the binary's name).
    let module = module_path!().split_once("::").map_or("", |(_, m)| m);
    let name = format!("{module}::a_result_file_whose_last_write_fails_is_not_taken_for_whole");
    let child = std::process::Command::new("bash")
        .arg("-c")
        // An ignored signal stays ignored across `exec`.
        .arg(r#"ulimit -f 1 && trap '' XFSZ && exec "$0" "$@""#)
        .arg(std::env::current_exe().unwrap())
        .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(UNDER_A_FILE_SIZE_LIMIT, "1")
        .output();
    let child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("skipped: no bash to set a file-size limit with");
            }
            return;
        }
        Err(e) => panic!("cannot start bash: {e}"),
    };
    let stdout = String::from_utf8_lossy(&child.stdout);
    let stderr = String::from_utf8_lossy(&child.stderr);
    assert!(
        child.status.success() && stdout.contains(CHECKED_UNDER_THE_LIMIT),
        "under the limit ({}):\n{stdout}\n{stderr}",
        child.status
    );
}
