//! `--download DIR`: result files saved as tasks succeed, resumably.

use std::path::PathBuf;

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
    let args = [
        "--download",
        files_dir.to_str().unwrap(),
        "--journal",
        journal_path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    let output = finish(run_command(&jobs, &server.base_url(), &args)).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

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
    let output = finish(run_command(&jobs, &server.base_url(), &args)).await;
    assert_eq!(output.status.code(), Some(0));
    assert!(lost.exists());
    assert_eq!(server.stats().tasks_created, 6);
}
