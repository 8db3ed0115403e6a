//! The output JSONL: one line per job, in the jobs file's order.
//!
//! ```json
//! {"job_id":"cat","line":1,"state":"succeeded","external_id":"kb-…","task_id":"8600…","status":"succeeded","urls":["https://…/0.mp4"],"files":["out/cat/0.mp4"]}
//! {"job_id":"dog","line":2,"state":"failed","external_id":"kb-…","error":{"code":1301,"message":"content security check failed","request_id":"…"}}
//! ```
//!
//! `state` is `succeeded`, `failed`, `not_submitted`, `created` (still running, or not
//! followed to its end, e.g. after a `1101` on its query: run again to follow it) or `creating`
//! (create outcome unknown: run again to look it up). A succeeded job whose result files are
//! not all on disk carries `download_error` (run again with `--download` to fetch them):
//!
//! ```json
//! {"job_id":"cat","line":1,"state":"succeeded","external_id":"kb-…","task_id":"8600…","status":"succeeded","urls":["https://…/0.mp4"],"download_error":{"code":0,"message":"download of https://…/0.mp4: timed out: no data for 30s; a later run fetches it again"}}
//! ```
//!
//! A succeeded job whose task named no result URL kling-batch could read, in its report or in
//! a query of it (a signed callback that carries the status alone, URLs of a shape it does not
//! know), has no `urls` and an `error` whose message begins `succeeded, no result URL` and
//! names the task: a later run on the same journal asks for them again.

use std::io::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::journal::{ErrorInfo, JobRecord, JobState};

/// One output line.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ResultLine<'a> {
    /// The job's id.
    pub job_id: &'a str,
    /// Its line in the jobs file.
    pub line: usize,
    /// Where it ended.
    pub state: JobState,
    /// The external id its create carried.
    pub external_id: &'a str,
    /// The task id, once created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<&'a str>,
    /// The task's last status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'a str>,
    /// Result URLs.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub urls: &'a [String],
    /// Downloaded files.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub files: &'a [String],
    /// The error, with Kling's code and request id when Kling gave them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a ErrorInfo>,
    /// Why some result files are missing after the last download.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download_error: Option<&'a ErrorInfo>,
}

impl<'a> ResultLine<'a> {
    /// The line of a journal record.
    pub fn of(record: &'a JobRecord) -> Self {
        ResultLine {
            job_id: &record.job_id,
            line: record.line,
            state: record.state,
            external_id: &record.external_id,
            task_id: record.task_id.as_deref(),
            status: record.status.as_deref(),
            urls: &record.urls,
            files: &record.files,
            // A succeeded job's error says why it has no result URL, if it has none.
            error: if record.state == JobState::Succeeded && !record.urls.is_empty() {
                None
            } else {
                record.error.as_ref()
            },
            download_error: record.download_error.as_ref(),
        }
    }
}

/// The temporary file [`write_results`] writes before renaming it to `path`.
pub(crate) fn tmp_path(path: &Path) -> std::path::PathBuf {
    path.with_extension("jsonl.tmp")
}

/// Checks that [`write_results`] can write to `path`, before a run sends anything: the
/// results of a run whose `-o` names a missing folder, a folder, or a place it may not write
/// would otherwise be lost only once every job ran (and was paid for). Creates and removes a
/// file of its own beside `path` (named for this process); an existing file at `path`, and
/// the temporary file of [`write_results`], are left alone: that one may be another run's,
/// writing its results there (an overlapping run, which its journal then refuses). A
/// directory or other non-file under the temporary file's name is refused, naming it: the
/// results could not be written through it, once every job ran.
pub fn check_writable(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        return Err(std::io::Error::other("is a directory"));
    }
    let tmp = tmp_path(path);
    if let Ok(found) = std::fs::metadata(&tmp)
        && !found.is_file()
    {
        let what = if found.is_dir() {
            "a directory"
        } else {
            "no regular file"
        };
        return Err(std::io::Error::other(format!(
            "the results are written first to {}, which is {what}: move it, or name another \
             file",
            tmp.display()
        )));
    }
    let probe = path.with_extension(format!("jsonl.check-{}", std::process::id()));
    std::fs::File::create(&probe)?;
    std::fs::remove_file(&probe)
}

/// Writes the records as JSONL to `path` (through a temporary file, on the disk before it is
/// renamed to `path`, and on Unix the rename too, as far as the file system allows): after a
/// power cut `path` holds the earlier results or these, never an empty or partial file.
pub fn write_results(path: &Path, records: &[JobRecord]) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for record in records {
            serde_json::to_writer(&mut file, &ResultLine::of(record))?;
            file.write_all(b"\n")?;
        }
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // The folder's entry on the disk too. Best effort: the results are in place whatever
    // this says (some file systems refuse to sync a folder), and the journal holds them all.
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        if let Err(e) = std::fs::File::open(dir).and_then(|dir| dir.sync_all()) {
            tracing::warn!(error = %e, "could not sync the results file's folder");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check of a second run (an overlapping cron job, refused later by the journal)
    /// truncated and removed the temporary file of the run writing its results: that run's
    /// rename then failed, or, between the two, put a truncated file in place of its results.
    #[test]
    fn checking_an_output_leaves_another_runs_results_being_written_alone() {
        let dir = std::env::temp_dir().join(format!("kling-batch-check-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let output = dir.join("jobs.results.jsonl");
        let being_written = tmp_path(&output);
        std::fs::write(&being_written, "{\"job_id\":\"a\"}\n").unwrap();
        check_writable(&output).unwrap();
        assert_eq!(
            std::fs::read_to_string(&being_written).unwrap(),
            "{\"job_id\":\"a\"}\n"
        );
        assert!(!output.exists());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no probe left");
        // Still refused where nothing can be written.
        assert!(check_writable(&dir.join("missing").join("out.jsonl")).is_err());
        assert!(check_writable(&dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A directory (or a FIFO, which an open for writing would wait on for ever) under the
    /// results' temporary file's name is refused, naming it: the run sent every create and
    /// then could not write its results.
    #[test]
    fn a_non_file_at_the_results_temporary_file_is_refused_naming_it() {
        let dir = std::env::temp_dir().join(format!("kling-batch-tmpdir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let output = dir.join("out.json");
        let tmp = tmp_path(&output);
        check_writable(&output).unwrap();
        std::fs::create_dir(&tmp).unwrap();
        let error = check_writable(&output).unwrap_err().to_string();
        assert!(error.contains(tmp.to_str().unwrap()), "{error}");
        assert!(error.contains("a directory"), "{error}");
        std::fs::remove_dir(&tmp).unwrap();
        let fifo = std::process::Command::new("mkfifo").arg(&tmp).status();
        if fifo.is_ok_and(|s| s.success()) {
            let error = check_writable(&output).unwrap_err().to_string();
            assert!(error.contains("no regular file"), "{error}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
