//! The journal: every job's state in an embedded SQLite database, so a run can be killed and
//! resumed without losing a job or paying for one twice.
//!
//! Each state change is one transaction that updates the job's row and appends a row to the
//! `transitions` table, so the journal is never half-written (SQLite's WAL survives a killed
//! process). Each job gets a deterministic `external_task_id` ([`Journal::external_id_for`]):
//! a job whose create may have reached Kling is looked up by that id before anything else, and
//! never created a second time.
//!
//! ```
//! use kling_batch::journal::{JobState, Journal, Update};
//! use kling_batch::jobs::parse_jobs;
//!
//! let journal = Journal::open_in_memory()?;
//! let (jobs, _) = parse_jobs("{\"id\":\"a\",\"prompt\":\"a cat\"}\n");
//! let records = journal.register(&jobs)?;
//! assert_eq!(records[0].state, JobState::Queued);
//! journal.transition("a", JobState::Creating, Update::default())?;
//! journal.transition("a", JobState::Created, Update::task("860000000000000001"))?;
//! let record = journal.record("a")?.unwrap();
//! assert_eq!(record.task_id.as_deref(), Some("860000000000000001"));
//! assert_eq!(journal.transitions("a")?, vec!["queued", "creating", "created"]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::JournalError;
use crate::jobs::Job;

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum JobState {
    /// Not sent yet.
    Queued,
    /// A create is (or may have been) in flight: look it up by external id before creating.
    Creating,
    /// Kling accepted the create; the task runs.
    Created,
    /// The task ended `succeeded`.
    Succeeded,
    /// The create was refused for good, or the task ended `failed`.
    Failed,
    /// Never created: the run stopped creating first (credits ran out, Ctrl-C, account halt).
    NotSubmitted,
}

impl JobState {
    /// The state's name in the journal and the output.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Creating => "creating",
            JobState::Created => "created",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::NotSubmitted => "not_submitted",
        }
    }

    /// Whether nothing more will happen to the job in this run.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "queued" => JobState::Queued,
            "creating" => JobState::Creating,
            "created" => JobState::Created,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "not_submitted" => JobState::NotSubmitted,
            other => return Err(format!("unknown job state `{other}`")),
        })
    }
}

/// A Kling error as the output reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ErrorInfo {
    /// The Kling code (0 when the error is not a Kling answer, e.g. a task that ran and failed).
    pub code: i64,
    /// The message.
    pub message: String,
    /// Kling's request id, to quote to support.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl ErrorInfo {
    /// An error with a code, message and request id.
    pub fn new(code: i64, message: impl Into<String>, request_id: Option<String>) -> Self {
        ErrorInfo {
            code,
            message: message.into(),
            request_id,
        }
    }
}

/// The fields a transition may set besides the state; `None` keeps the stored value.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Update {
    /// The task id.
    pub task_id: Option<String>,
    /// The task's last status word.
    pub status: Option<String>,
    /// Result URLs.
    pub urls: Option<Vec<String>>,
    /// Downloaded files.
    pub files: Option<Vec<String>>,
    /// The error.
    pub error: Option<ErrorInfo>,
}

impl Update {
    /// Sets the task id.
    pub fn task(id: impl Into<String>) -> Self {
        Update {
            task_id: Some(id.into()),
            ..Update::default()
        }
    }

    /// Sets the error.
    pub fn error(error: ErrorInfo) -> Self {
        Update {
            error: Some(error),
            ..Update::default()
        }
    }
}

/// A job as the journal holds it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct JobRecord {
    /// The job's id.
    pub job_id: String,
    /// Its line in the jobs file.
    pub line: usize,
    /// Its create path.
    pub endpoint: String,
    /// Its deterministic external id.
    pub external_id: String,
    /// Where it is.
    pub state: JobState,
    /// The task id, once created.
    pub task_id: Option<String>,
    /// The task's last status.
    pub status: Option<String>,
    /// Result URLs.
    pub urls: Vec<String>,
    /// Downloaded files.
    pub files: Vec<String>,
    /// Why it failed or was not submitted.
    pub error: Option<ErrorInfo>,
}

/// The journal database. See the [module docs](self).
///
/// # Clone
///
/// Clones share one connection (behind a mutex): every write is a short transaction, never
/// held across an await.
#[derive(Clone)]
pub struct Journal {
    conn: Arc<Mutex<Connection>>,
    id: Arc<str>,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal").field("id", &self.id).finish()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    line INTEGER NOT NULL,
    endpoint TEXT NOT NULL,
    body TEXT NOT NULL,
    external_id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    task_id TEXT,
    status TEXT,
    urls TEXT NOT NULL DEFAULT '[]',
    files TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS transitions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    at REAL NOT NULL
);
";

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Journal {
    /// Opens (or creates) the journal at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Journal, JournalError> {
        let conn = Connection::open(path.as_ref())
            .map_err(|e| JournalError::new("cannot open the journal file", e))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Journal::init(conn)
    }

    /// A journal that lives in memory (for tests and dry runs).
    pub fn open_in_memory() -> Result<Journal, JournalError> {
        Journal::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Journal, JournalError> {
        conn.execute_batch(SCHEMA)?;
        let existing: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'journal_id'", [], |r| {
                r.get(0)
            })
            .optional()?;
        let id = match existing {
            Some(id) => id,
            None => {
                let seed = format!("{}:{}:{:?}", now(), std::process::id(), SystemTime::now());
                let id = hex(&Sha256::digest(seed.as_bytes())[..8]);
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('journal_id', ?1)",
                    params![id],
                )?;
                id
            }
        };
        Ok(Journal {
            conn: Arc::new(Mutex::new(conn)),
            id: Arc::from(id),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The journal's own random id, fixed when it was created.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The deterministic external id of a job in this journal: `kb-` and 24 hex digits of
    /// SHA-256(journal id, job id). The same job always gets the same id, so a create that
    /// may have happened can be looked up, and a second one would be refused by Kling.
    pub fn external_id_for(&self, job_id: &str) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.id.as_bytes());
        hasher.update([0]);
        hasher.update(job_id.as_bytes());
        format!("kb-{}", hex(&hasher.finalize()[..12]))
    }

    /// Adds the jobs not yet in the journal (state `queued`) in one transaction, and returns
    /// every job's record in the order given. A job already in the journal keeps its state
    /// (that is what resuming means).
    pub fn register(&self, jobs: &[Job]) -> Result<Vec<JobRecord>, JournalError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let at = now();
        for job in jobs {
            let body = serde_json::to_string(&job.body).unwrap_or_default();
            let inserted = tx.execute(
                "INSERT OR IGNORE INTO jobs (job_id, line, endpoint, body, external_id, state, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6)",
                params![job.id, job.line as i64, job.endpoint, body, self.external_id_for(&job.id), at],
            )?;
            if inserted == 1 {
                tx.execute(
                    "INSERT INTO transitions (job_id, from_state, to_state, at) VALUES (?1, NULL, 'queued', ?2)",
                    params![job.id, at],
                )?;
            }
        }
        tx.commit()?;
        drop(conn);
        jobs.iter()
            .map(|job| {
                self.record(&job.id)?.ok_or_else(|| {
                    JournalError::new("job vanished after registering", job.id.clone())
                })
            })
            .collect()
    }

    /// Moves a job to `state`, setting the fields `update` carries, and records the
    /// transition — all in one transaction.
    pub fn transition(
        &self,
        job_id: &str,
        state: JobState,
        update: Update,
    ) -> Result<(), JournalError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let from: Option<String> = tx
            .query_row(
                "SELECT state FROM jobs WHERE job_id = ?1",
                params![job_id],
                |r| r.get(0),
            )
            .optional()?;
        let Some(from) = from else {
            return Err(JournalError::new("no such job", job_id.to_owned()));
        };
        let at = now();
        let Update {
            task_id,
            status,
            urls,
            files,
            error,
        } = update;
        let json =
            |v: Option<Vec<String>>| v.map(|v| serde_json::to_string(&v).unwrap_or_default());
        let error = error.map(|e| serde_json::to_string(&e).unwrap_or_default());
        tx.execute(
            "UPDATE jobs SET state = ?2,
                task_id = COALESCE(?3, task_id),
                status = COALESCE(?4, status),
                urls = COALESCE(?5, urls),
                files = COALESCE(?6, files),
                error = COALESCE(?7, error),
                updated_at = ?8
             WHERE job_id = ?1",
            params![
                job_id,
                state.as_str(),
                task_id,
                status,
                json(urls),
                json(files),
                error,
                at
            ],
        )?;
        if from != state.as_str() {
            tx.execute(
                "INSERT INTO transitions (job_id, from_state, to_state, at) VALUES (?1, ?2, ?3, ?4)",
                params![job_id, from, state.as_str(), at],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// One job's record.
    pub fn record(&self, job_id: &str) -> Result<Option<JobRecord>, JournalError> {
        let conn = self.lock();
        let record = conn
            .query_row(
                "SELECT job_id, line, endpoint, external_id, state, task_id, status, urls, files, error
                 FROM jobs WHERE job_id = ?1",
                params![job_id],
                read_record,
            )
            .optional()?;
        Ok(record)
    }

    /// Every job's record, in line order.
    pub fn records(&self) -> Result<Vec<JobRecord>, JournalError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT job_id, line, endpoint, external_id, state, task_id, status, urls, files, error
             FROM jobs ORDER BY line",
        )?;
        let rows = stmt.query_map([], read_record)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(Into::into)
    }

    /// The states a job went through, oldest first.
    pub fn transitions(&self, job_id: &str) -> Result<Vec<String>, JournalError> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare("SELECT to_state FROM transitions WHERE job_id = ?1 ORDER BY seq")?;
        let rows = stmt.query_map(params![job_id], |r| r.get::<_, String>(0))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(Into::into)
    }
}

fn read_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
    let state: String = row.get(4)?;
    let list = |i: usize| -> rusqlite::Result<Vec<String>> {
        let text: String = row.get(i)?;
        Ok(serde_json::from_str(&text).unwrap_or_default())
    };
    let error: Option<String> = row.get(9)?;
    Ok(JobRecord {
        job_id: row.get(0)?,
        line: row.get::<_, i64>(1)? as usize,
        endpoint: row.get(2)?,
        external_id: row.get(3)?,
        state: state.parse().map_err(|e: String| {
            rusqlite::Error::FromSqlConversionFailure(4, rusqlite::types::Type::Text, e.into())
        })?,
        task_id: row.get(5)?,
        status: row.get(6)?,
        urls: list(7)?,
        files: list(8)?,
        error: error.and_then(|e| serde_json::from_str(&e).ok()),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::parse_jobs;

    #[test]
    fn a_reopened_journal_keeps_states_and_external_ids() {
        let dir = std::env::temp_dir().join(format!("kb-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("j.sqlite");
        let _ = std::fs::remove_file(&path);
        let (jobs, _) =
            parse_jobs("{\"id\":\"a\",\"prompt\":\"x\"}\n{\"id\":\"b\",\"prompt\":\"y\"}\n");
        let (ext, id) = {
            let journal = Journal::open(&path).unwrap();
            journal.register(&jobs).unwrap();
            journal
                .transition("a", JobState::Created, Update::task("t1"))
                .unwrap();
            (journal.external_id_for("a"), journal.id().to_owned())
        };
        let journal = Journal::open(&path).unwrap();
        assert_eq!(journal.id(), id);
        let records = journal.register(&jobs).unwrap();
        assert_eq!(records[0].state, JobState::Created);
        assert_eq!(records[0].external_id, ext);
        assert_eq!(records[1].state, JobState::Queued);
        assert_ne!(records[0].external_id, records[1].external_id);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_fresh_journal_gives_fresh_external_ids() {
        let a = Journal::open_in_memory().unwrap();
        let b = Journal::open_in_memory().unwrap();
        assert_ne!(a.external_id_for("job"), b.external_id_for("job"));
        assert_eq!(a.external_id_for("job"), a.external_id_for("job"));
        assert!(a.external_id_for("job").starts_with("kb-"));
    }
}
