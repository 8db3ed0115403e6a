//! The journal: every job's state in an embedded SQLite database, so a run can be killed and
//! resumed without losing a job or paying for one twice.
//!
//! Each state change is one transaction that updates the job's row and appends a row to the
//! `transitions` table, so the journal is never half-written (SQLite's WAL survives a killed
//! process). Each job gets a deterministic `external_task_id` ([`Journal::external_id_for`]):
//! a job whose create may have reached Kling is looked up by that id before anything else, and
//! never created a second time.
//!
//! A job's state is kept under its id, with the body it was registered with. On resume a job
//! of the file whose id the journal holds for a different body or endpoint is refused (the
//! whole file is, before anything is sent: [`ChangedJobs`]), so a task is never reported as
//! another job's. Journals written before jobs without `id` got content-derived ids (they got
//! `line-N`) are read: such a job takes over the `line-N` row that holds the same body and
//! endpoint, with its state, task and external id.
//!
//! A journal belongs to one API: [`Journal::bind_base_url`] records the base URL its jobs are
//! sent to ([`ApiOrigin`]) before a run sends, and refuses a run sent elsewhere, where their
//! tasks are not (looked up there, none is found, and the jobs would be created again). A
//! journal of an earlier version, which recorded none, records the base URL of its next run.
//! [`Engine::run`](crate::run::Engine::run) binds the journal to its stack's base URL itself,
//! in the transaction that registers its jobs ([`Journal::register_at`]): a run refused for
//! either leaves the journal as it was.
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

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ChangedJobs, JournalError, OtherBaseUrl};
use crate::jobs::{Job, default_id};

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

/// The fields a transition may set besides the state; `None` keeps the stored value, except
/// for `error`, which describes the state it was recorded in: a transition to another state
/// without an error clears it (a job refused with `1102` and created by a later run no longer
/// shows the refusal), one that stays in its state keeps it, unless it sets `clear_error`
/// (a run that follows again a task an earlier run did not follow to its end).
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
    /// Why the last download of the job's result files left some missing (`Some(Some(_))`),
    /// or that it left none missing (`Some(None)` clears it).
    pub download_error: Option<Option<ErrorInfo>>,
    /// Clears the error even when the job stays in its state (an `error` set wins).
    pub clear_error: bool,
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

    /// Clears the error, even without a change of state: the error told an earlier run's end
    /// of a step this run takes again (the follow of a task left `created`).
    pub fn error_cleared() -> Self {
        Update {
            clear_error: true,
            ..Update::default()
        }
    }

    /// A download that saved `files` (the job's files on disk) and, with `error`, left some
    /// missing; without, clears an earlier download error.
    pub fn downloaded(files: Vec<String>, error: Option<ErrorInfo>) -> Self {
        Update {
            files: Some(files),
            download_error: Some(error),
            ..Update::default()
        }
    }
}

/// The API a journal's jobs are sent to: a base URL's scheme, host, port and path, and nothing
/// else (no user info, query or fragment, which may hold a password or a token).
///
/// Read as the stack reads a base URL (kling-tower's `BaseUrlLayer`): the scheme and host in
/// lower case, the scheme's default port left out (`https://h:443` is `https://h`), and the
/// path without its trailing `/` (`https://proxy.example/kling/` is
/// `https://proxy.example/kling`). The path is otherwise kept as written: its case and its
/// percent-encoding are not folded (`/Kling`, `/kling`, `/a%2Fb` and `/a/b` are four paths).
///
/// The path counts. The stack puts it before every request's path
/// (`https://proxy.example/kling` sends `/kling/v1/videos/text2video`), and a proxy may route
/// two prefixes of one host to two regions or two accounts (`/kling-cn`, `/kling-global`),
/// neither of which knows the other's tasks: a resume sent to the other prefix would look the
/// journal's tasks up where they are not, and create its open jobs again. Counting it can only
/// refuse a resume too many (two paths that reach one API), which
/// [`Journal::bind_base_url`]'s `moved_from` lets through.
///
/// ```
/// use kling_batch::journal::ApiOrigin;
///
/// let origin = ApiOrigin::parse("HTTPS://Proxy.Example:443/kling/").unwrap();
/// assert_eq!(origin.as_str(), "https://proxy.example/kling");
/// assert_ne!(origin, ApiOrigin::parse("https://proxy.example/kling-cn").unwrap());
/// assert_eq!(ApiOrigin::parse("not a url"), None);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ApiOrigin(String);

impl ApiOrigin {
    /// The API `base_url` names; `None` when it is no `http://` or `https://` URL with a host,
    /// or holds an `@`: user info, which may hold a password, and where a password holds a `/`
    /// (`https://kb:443/x@proxy`) reads as a host, a port and a path (an `@` in a path is
    /// written `%40`). A query and a fragment are left out.
    pub fn parse(base_url: &str) -> Option<ApiOrigin> {
        if base_url.contains('@') {
            return None;
        }
        let uri: http::Uri = base_url.trim().parse().ok()?;
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "https" => 443,
            "http" => 80,
            _ => return None,
        };
        let host = uri.host().filter(|h| !h.is_empty())?.to_ascii_lowercase();
        let port = match uri.port_u16() {
            Some(port) if port != default_port => format!(":{port}"),
            _ => String::new(),
        };
        let path = uri.path().trim_end_matches('/');
        Some(ApiOrigin(format!("{scheme}://{host}{port}{path}")))
    }

    /// As text: `scheme://host[:port][/path]`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ApiOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What [`Journal::bind_base_url`] found, the journal recording this run's base URL in all
/// but the first case.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BaseUrlBinding {
    /// The journal records this run's base URL already.
    Same,
    /// The journal recorded none, and none of its jobs was sent (a new journal).
    New,
    /// The journal recorded none, and some of its jobs were sent: a journal of an earlier
    /// version, which did not record where. It cannot be checked: this run's is recorded.
    Unrecorded,
    /// The journal recorded `from`, but none of its jobs holds or may hold a task there (each
    /// is `queued`, or `not_submitted` for a refusal that made nothing: a first run refused
    /// with `1002`, a key of the other region, say): nothing there to look up.
    Unsent {
        /// The base URL the journal recorded.
        from: ApiOrigin,
    },
    /// The journal recorded `from`, which the caller said this run's base URL replaces (the
    /// same account and region behind a renamed proxy or host).
    Moved {
        /// The base URL the journal recorded.
        from: ApiOrigin,
    },
}

/// What [`Journal::register_unless`] returns: every job's record, in the order given, and
/// what binding the base URL found (when asked to).
pub(crate) type Registered = (Vec<JobRecord>, Option<BaseUrlBinding>);

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
    /// Why it failed or was not submitted, or why its task was not followed to its end.
    pub error: Option<ErrorInfo>,
    /// Why some of its result files are missing after the last download (a later run with
    /// `--download` fetches them).
    pub download_error: Option<ErrorInfo>,
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
    /// Tests: the state changes committed, one transaction each
    /// ([`transition`](Self::transition), [`transition_all`](Self::transition_all)).
    #[cfg(test)]
    commits: Arc<std::sync::atomic::AtomicUsize>,
    /// Tests: called before each [`transition`](Self::transition) takes the connection, with
    /// the job and its new state (a test holds a write there, as a busy thread would).
    #[cfg(test)]
    write_hook: Arc<Mutex<Option<WriteHook>>>,
    /// A journal on disk: marks it closed when the last clone is dropped ([`CloseMark`]).
    close_mark: Option<Arc<CloseMark>>,
    /// A journal on disk: its write-ahead log, folded into the main file by the journal
    /// itself ([`Journal::fold_if_long`]).
    folding: Option<Arc<Folding>>,
}

/// The `meta` key a journal on disk holds `1` under while a run has it open, written to the
/// main file (not only its write-ahead log) when it is opened, and `0` once it is closed and
/// every commit is in the main file. SQLite offers no way to tell a main file whose `-wal`
/// was lost from one closed cleanly (its header says WAL mode in both), so the journal says
/// it itself: `1` with no `-wal` beside it means the commits of its last run may be lost,
/// unless [`FOLDED_KEY`] says another program folded every one of them into the main file.
const OPEN_KEY: &str = "open";

/// The `meta` key that tells a main file whose `-wal` another program folded into it (which
/// is whole) from one whose `-wal` was lost: `0` in every state the run's own checkpoints
/// fold into the main file, and `1` in the commits that follow each (in the `-wal` alone).
/// So a main file reads `1` only once the whole log was folded in by someone else: `sqlite3`
/// opening the journal after a kill (its close folds every commit of the log, and deletes it
/// only then), or SQLite closing the run's connection when the close mark failed. A log lost
/// after the run's last checkpoint leaves `0`. The run makes no other checkpoint: SQLite's
/// automatic one is off (`wal_autocheckpoint = 0`), and [`Journal::fold_if_long`] does it.
const FOLDED_KEY: &str = "after_checkpoint";

/// The `meta` key counting the run's folds of its log into the main file ([`fold`]): raised
/// in the commit that opens each fold, unless the last fold did not end (its [`FOLDED_KEY`]
/// still `0`: the same fold, tried again). Read from the main file alone
/// ([`main_file`]) and through its `-wal`, it tells a `-wal` older than the main file
/// (put back from an earlier moment: its pages laid over newer ones) or newer (the two
/// copied one after the other while the run folded its log) from the journal's own, whose
/// count is the main file's, or one more while a fold has not ended.
const FOLDS_KEY: &str = "folds";

/// The `meta` key of the journal's id, set once when it is made.
const JOURNAL_ID_KEY: &str = "journal_id";

/// The `meta` key of the API the journal's jobs are sent to: an [`ApiOrigin`]'s text, recorded
/// by [`Journal::bind_base_url`] before a run sends anything. Journals of earlier versions lack
/// it (their tables are the same): the first run of this version records its own.
const BASE_URL_KEY: &str = "base_url";

/// Whether a job of the journal holds or may hold a task where its jobs were sent: one neither
/// `queued` nor `not_submitted`, or one `not_submitted` for `1103` (no permission), its create
/// and its lookup both refused so, which an earlier attempt of the create, its answer lost,
/// may have made (the run leaves that to Kling, which refuses the external id sent again there
/// as a duplicate; another base URL does not). Any other job `not_submitted` made nothing
/// (kling-tower's drain refuses only a create never sent; `1002`, `1102` and a proxy's `4xx`
/// page refuse it), and a job looked up there and not found is `queued` again.
const MAY_HOLD_A_TASK: &str = "SELECT EXISTS (SELECT 1 FROM jobs
    WHERE state NOT IN ('queued', 'not_submitted')
        OR (state = 'not_submitted'
            AND CASE WHEN json_valid(error) THEN json_extract(error, '$.code') END = ?1))";

/// What [`Journal::bind_base_url`] finds for `base` in the journal `conn` reads, writing
/// nothing.
fn base_url_binding(
    conn: &Connection,
    base: &ApiOrigin,
    moved_from: Option<&ApiOrigin>,
) -> Result<BaseUrlBinding, JournalError> {
    let recorded: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [BASE_URL_KEY],
            |r| r.get(0),
        )
        .optional()?;
    let sent: bool = conn.query_row(
        MAY_HOLD_A_TASK,
        [kling_core::Code::NoPermission.as_i64()],
        |r| r.get(0),
    )?;
    Ok(match recorded.map(ApiOrigin) {
        Some(recorded) if recorded == *base => BaseUrlBinding::Same,
        None if sent => BaseUrlBinding::Unrecorded,
        None => BaseUrlBinding::New,
        Some(from) if !sent => BaseUrlBinding::Unsent { from },
        Some(from) if moved_from == Some(&from) => BaseUrlBinding::Moved { from },
        Some(recorded) => {
            return Err(JournalError::new(
                "another base URL",
                OtherBaseUrl::new(recorded, base.clone(), moved_from.cloned()),
            ));
        }
    })
}

/// The statement that marks a journal closed (see [`OPEN_KEY`]) by hand: for one whose
/// `-wal` was lost, at the user's own risk.
const CLOSE_BY_HAND: &str = "UPDATE meta SET value = '0' WHERE key = 'open'";

/// The size past which a commit folds the write-ahead log into the main file: SQLite's own
/// automatic checkpoint (1000 pages of 4 KiB), which the journal makes itself ([`FOLDED_KEY`]).
const FOLD_PAST_BYTES: u64 = 1000 * (4096 + 24);

/// A journal's write-ahead log, and the size past which a commit folds it into the main file.
struct Folding {
    wal: std::path::PathBuf,
    past_bytes: std::sync::atomic::AtomicU64,
}

/// Folds the write-ahead log into the main file, the main file saying meanwhile that its
/// state is the run's own checkpoint's ([`FOLDED_KEY`]): marked `0` before the checkpoint and
/// `1` after it, its count of folds raised meanwhile ([`FOLDS_KEY`]). A failure at any step
/// leaves the main file reading `0` (a lost `-wal` is then refused, which is safe). `opening`
/// marks the journal open ([`OPEN_KEY`]) in the first of the two transactions.
fn fold(conn: &Connection, opening: bool) -> rusqlite::Result<()> {
    begin_fold(conn, opening.then_some(true))?;
    checkpoint(conn)?;
    mark(conn, FOLDED_KEY, "1")?;
    Ok(())
}

/// A fold's checkpoint: every commit of the log into the main file, the log kept as it is
/// (`RESTART`, not `TRUNCATE`) until the next commit writes over it from its start and cuts
/// it to that commit (`journal_size_limit = 0`). So a run's `-wal` is never empty while the
/// main file says it is open: a run killed between the checkpoint and the fold's mark leaves
/// the log whole (its commits all in the main file too), not an empty `-wal` that reads as
/// one put in place of a lost log ([`WalFile::Empty`]).
fn checkpoint(conn: &Connection) -> rusqlite::Result<()> {
    wal_checkpoint(conn, "RESTART")
}

/// `PRAGMA wal_checkpoint(mode)`, one that did not fold the whole log an error: SQLite says
/// that a reader cut it short (`busy`) in the pragma's row, not as an error, and a fold
/// marked done after it would say the main file holds commits it lacks ([`FOLDED_KEY`]). The
/// run's own connection, alone on the journal (`locking_mode = EXCLUSIVE`), meets no reader.
fn wal_checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<()> {
    let busy: i64 = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| r.get(0))?;
    if busy != 0 {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("a reader kept the checkpoint from folding the whole log".into()),
        ));
    }
    Ok(())
}

/// Sets a `meta` key.
fn mark(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<usize> {
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
        [key, value],
    )
}

/// The commit that opens a fold, before its checkpoint ([`fold`], and the close's
/// [`CloseMark`]): the open mark if given, the count of folds, and the fold mark `0`.
fn begin_fold(conn: &Connection, open: Option<bool>) -> rusqlite::Result<()> {
    let tx = conn.unchecked_transaction()?;
    if let Some(open) = open {
        mark(conn, OPEN_KEY, if open { "1" } else { "0" })?;
    }
    // Before the fold mark below: whether the last fold ended ([`FOLDS_KEY`]).
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, \
         COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = ?1), 0) \
         + COALESCE((SELECT value != '0' FROM meta WHERE key = ?2), 1))",
        [FOLDS_KEY, FOLDED_KEY],
    )?;
    mark(conn, FOLDED_KEY, "0")?;
    tx.commit()
}

/// `path` as a shell word: as it is when it needs no quoting, else in single quotes; a
/// relative path that begins with `-` behind `./`, which a command would take for an option.
fn shell_word(path: &Path) -> String {
    let text = path.to_string_lossy();
    let text = if text.starts_with('-') {
        std::borrow::Cow::Owned(format!("./{text}"))
    } else {
        text
    };
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+:,@%=".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// Marks the journal closed (see [`OPEN_KEY`]) when dropped, with the last of its clones:
/// the mark and every commit are moved into the main file, which then stands alone. Not run
/// when the process is killed, so the main file keeps saying that it needs its `-wal`.
/// Counted in [`OPEN_ON_DISK`] until its connection is closed.
struct CloseMark(Option<Arc<Mutex<Connection>>>);

/// Journals on disk this process has open, their close not yet ended: the process waits for
/// them before it exits ([`open_on_disk`]).
static OPEN_ON_DISK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many journals on disk this process has open or is closing: an exit before they reach
/// 0 cuts a close (a checkpoint half done leaves a main file that may read as closed
/// without all its commits).
pub(crate) fn open_on_disk() -> usize {
    OPEN_ON_DISK.load(std::sync::atomic::Ordering::SeqCst)
}

impl CloseMark {
    fn new(conn: Arc<Mutex<Connection>>) -> CloseMark {
        OPEN_ON_DISK.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        CloseMark(Some(conn))
    }
}

impl Drop for CloseMark {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            {
                let conn = shared.lock().unwrap_or_else(|e| e.into_inner());
                // A failure leaves the mark at `1`: a copy without the `-wal` is then
                // refused, which is safe. Counted as a fold: a `-wal` of the run's last
                // moments put back beside the closed file is older than it ([`FOLDS_KEY`]).
                if begin_fold(&conn, Some(false)).is_ok() {
                    let _ = wal_checkpoint(&conn, "TRUNCATE");
                }
            }
            // The last handle: the connection closes here, and SQLite removes the `-wal`.
            drop(shared);
        }
        OPEN_ON_DISK.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What an existing file holds, read before the journal writes anything to it.
enum Contents {
    /// No table (a new database), or only a journal's tables with no job in them (one whose
    /// creation was cut short): nothing to lose.
    Fresh,
    /// A kling-batch journal, `id` its id; `left_open` when its last run did not close it,
    /// `folded` when its whole write-ahead log was folded into the main file since
    /// ([`FOLDED_KEY`]), `folds` its count of folds, if it has one ([`FOLDS_KEY`]).
    Journal {
        id: String,
        left_open: bool,
        folded: bool,
        folds: Option<u64>,
    },
    /// Another program's database, by its tables.
    Foreign(Vec<String>),
}

impl Contents {
    fn read(conn: &Connection) -> rusqlite::Result<Contents> {
        let tables: Vec<String> = conn
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
                 ORDER BY name",
            )?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if tables.is_empty() {
            return Ok(Contents::Fresh);
        }
        let has = |name: &str| tables.iter().any(|t| t == name);
        // A `meta` of another program may lack the columns, or hold no text: then it is not a
        // journal's. Any other error (a busy or damaged file) is said as it is.
        let meta = |key: &str| -> rusqlite::Result<Option<String>> {
            match conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
            {
                Err(e)
                    if matches!(
                        e.sqlite_error_code(),
                        None | Some(rusqlite::ErrorCode::Unknown)
                    ) =>
                {
                    Ok(None)
                }
                other => other,
            }
        };
        if has("meta")
            && let Some(id) = meta(JOURNAL_ID_KEY)?
        {
            let left_open = meta(OPEN_KEY)?.as_deref() == Some("1");
            let folded = meta(FOLDED_KEY)?.as_deref() == Some("1");
            let folds = meta(FOLDS_KEY)?.and_then(|count| count.parse().ok());
            return Ok(Contents::Journal {
                id,
                left_open,
                folded,
                folds,
            });
        }
        // A table is a journal's by its columns too, not its name alone: another program's
        // empty `jobs` would have the journal's tables and columns added to it.
        let mut ours = true;
        for table in &tables {
            ours &= match JOURNAL_COLUMNS.iter().find(|(name, _)| name == table) {
                Some((_, columns)) => {
                    let found: Vec<String> = conn
                        .prepare("SELECT name FROM pragma_table_info(?1)")?
                        .query_map([table], |r| r.get(0))?
                        .collect::<Result<_, _>>()?;
                    columns.iter().all(|c| found.iter().any(|f| f == c))
                }
                None => false,
            };
        }
        let no_job = !has("jobs")
            || conn.query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get::<_, i64>(0))? == 0;
        Ok(if ours && no_job {
            Contents::Fresh
        } else {
            Contents::Foreign(tables)
        })
    }
}

/// The columns each table of a journal has had since the first version (later ones added
/// columns): a table of another program that bears one of these names lacks them.
const JOURNAL_COLUMNS: [(&str, &[&str]); 3] = [
    ("meta", &["key", "value"]),
    (
        "jobs",
        &[
            "job_id",
            "line",
            "endpoint",
            "body",
            "external_id",
            "state",
            "task_id",
            "status",
            "urls",
            "files",
            "error",
            "updated_at",
        ],
    ),
    (
        "transitions",
        &["seq", "job_id", "from_state", "to_state", "at"],
    ),
];

/// `path` with `-wal` after it: where SQLite keeps the journal's write-ahead log.
fn wal_path(path: &Path) -> std::path::PathBuf {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    wal.into()
}

/// The file SQLite opens for `path`, by its full path: through every symbolic link, one to a
/// file not made yet too (SQLite makes it where the link points, its `-wal` beside it).
fn linked_file(path: &Path) -> std::path::PathBuf {
    let mut path = path.to_owned();
    // As many links as Linux follows in one path.
    for _ in 0..40 {
        if let Ok(full) = std::fs::canonicalize(&path) {
            return full;
        }
        match std::fs::read_link(&path) {
            Ok(target) => path = path.parent().unwrap_or(Path::new("")).join(target),
            Err(_) => break,
        }
    }
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    match (std::fs::canonicalize(parent), path.file_name()) {
        (Ok(parent), Some(name)) => parent.join(name),
        _ => path,
    }
}

/// What the main file at `file` says of itself, its `-wal` unread: set against what the
/// journal reads through the `-wal`, it tells a log of another moment or another journal.
#[derive(Debug, Default, PartialEq)]
struct MainFile {
    /// Its count of folds ([`FOLDS_KEY`]), if it has one (not a journal of an earlier version).
    folds: Option<u64>,
    /// Its journal id, if it holds one.
    journal_id: Option<String>,
}

/// What the main file at `file` holds by itself, its `-wal` unread: opened `immutable` (read
/// only, no lock taken, no `-wal` read or made). Nothing when it holds no `meta` (a new file)
/// or cannot be read so.
fn main_file(file: &Path) -> MainFile {
    use std::fmt::Write as _;
    // As a URI, the only way to ask for `immutable`: every byte but a few percent-encoded.
    let mut uri = String::from(if file.is_absolute() {
        "file://"
    } else {
        "file:"
    });
    for &byte in file.as_os_str().as_encoded_bytes() {
        if byte.is_ascii_alphanumeric() || b"/._-~".contains(&byte) {
            uri.push(char::from(byte));
        } else {
            let _ = write!(uri, "%{byte:02X}");
        }
    }
    uri.push_str("?immutable=1");
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let Ok(conn) = Connection::open_with_flags(uri, flags) else {
        return MainFile::default();
    };
    let meta = |key: &str| -> Option<String> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .ok()
    };
    MainFile {
        folds: meta(FOLDS_KEY).and_then(|count| count.parse().ok()),
        journal_id: meta(JOURNAL_ID_KEY),
    }
}

/// What lies under the journal's `-wal` name, looked at before SQLite opens the journal:
/// SQLite reads a file there that does not begin as a write-ahead log as an empty one, and
/// deletes it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WalFile {
    /// Nothing.
    Missing,
    /// An empty file: the log a checkpoint truncated, or an empty file put in place of a lost
    /// one, which SQLite reads as no log at all.
    Empty,
    /// A write-ahead log by its first bytes, or one that cannot be read (SQLite then says
    /// why).
    Log,
    /// Another file, or a symbolic link to nothing.
    NotALog,
}

impl WalFile {
    /// The first four bytes of a write-ahead log, big-endian: its two checksum orders.
    const MAGIC: [[u8; 4]; 2] = [[0x37, 0x7f, 0x06, 0x82], [0x37, 0x7f, 0x06, 0x83]];

    fn at(wal: &Path) -> WalFile {
        use std::io::Read as _;
        let mut file = match std::fs::File::open(wal) {
            Ok(file) => file,
            // A symbolic link to nothing is not nothing: SQLite cannot open a log through it,
            // and beside a missing journal file had made an empty one first.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return match std::fs::symlink_metadata(wal) {
                    Ok(_) => WalFile::NotALog,
                    Err(_) => WalFile::Missing,
                };
            }
            Err(_) => return WalFile::Log,
        };
        let mut start = Vec::with_capacity(4);
        match (&mut file).take(4).read_to_end(&mut start) {
            Ok(_) if start.is_empty() => WalFile::Empty,
            Ok(_) if Self::MAGIC.iter().any(|m| start == m) => WalFile::Log,
            Ok(_) => WalFile::NotALog,
            Err(_) => WalFile::Log,
        }
    }
}

/// The files SQLite keeps beside the journal at `path`, each with what it is: its
/// write-ahead log, the log's shared-memory index, and a rollback journal. They lie beside
/// the file a symbolic link names, where SQLite looks for them, and SQLite takes a file under
/// one of these names for the journal's own: it reads the log's commits into the journal, and
/// deletes such a file it cannot read as one (results written there are lost).
pub(crate) fn companions(path: &Path) -> [(std::path::PathBuf, &'static str); 3] {
    let resolved = linked_file(path);
    let beside = |suffix: &str| {
        let mut companion = resolved.as_os_str().to_owned();
        companion.push(suffix);
        std::path::PathBuf::from(companion)
    };
    [
        (beside("-wal"), "write-ahead log (-wal)"),
        (beside("-shm"), "shared-memory index (-shm)"),
        (beside("-journal"), "rollback journal (-journal)"),
    ]
}

/// Tests: see [`Journal::on_write`].
#[cfg(test)]
pub(crate) type WriteHook = Arc<dyn Fn(&str, JobState) + Send + Sync>;

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
    updated_at REAL NOT NULL,
    download_error TEXT
);
CREATE TABLE IF NOT EXISTS transitions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    at REAL NOT NULL
);
-- When each job succeeded (`Journal::succeeded_at`), looked up per job: only the rows of that
-- state, so the writes of other transitions (100 000 `queued` at a registration) pay nothing.
CREATE INDEX IF NOT EXISTS transitions_succeeded ON transitions (job_id, at)
    WHERE to_state = 'succeeded';
";

/// The statements kept prepared per connection (see [`Journal::init`]); more than the journal
/// has, so none is ever evicted and parsed again.
const STATEMENT_CACHE: usize = 32;

/// How many jobs [`Journal::register_unless`] registers between two looks at its stop.
pub(crate) const REGISTER_CHECK: usize = 256;

/// One job's record, by its id.
const SELECT_RECORD: &str = "SELECT job_id, line, endpoint, external_id, state, task_id, status,
        urls, files, error, download_error
    FROM jobs WHERE job_id = ?1";

/// When a job first succeeded: by the partial index `transitions_succeeded`, not a scan of
/// every job's transitions.
const SELECT_SUCCEEDED_AT: &str =
    "SELECT MIN(at) FROM transitions WHERE job_id = ?1 AND to_state = 'succeeded'";

/// A row of `transitions`.
const INSERT_TRANSITION: &str =
    "INSERT INTO transitions (job_id, from_state, to_state, at) VALUES (?1, ?2, ?3, ?4)";

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Journal {
    /// Opens (or creates) the journal at `path`, for this process alone.
    ///
    /// Every transaction reaches the disk before it returns (`synchronous = FULL`): a create is
    /// sent only after its `creating` mark is on disk, so not even a power cut can make a rerun
    /// create the job again. And the journal is locked while it is open (`locking_mode =
    /// EXCLUSIVE`): a second run on it (an overlapping cron job, another terminal) is refused
    /// here, before anything is sent, rather than creating and downloading the same jobs.
    pub fn open(path: impl AsRef<Path>) -> Result<Journal, JournalError> {
        // A path is a file name, even one that starts with `file:`, which SQLite reads as a
        // URI (`file:x.db` opens `x.db`, `file::memory:` a database in memory that no rerun
        // finds): rusqlite's default flags without `SQLITE_OPEN_URI`, and, as the bundled
        // SQLite reads URIs whatever the flags (it is built with `SQLITE_USE_URI`), such a
        // path is given as `./file:…`.
        let path = path.as_ref();
        let path = if path.as_os_str().as_encoded_bytes().starts_with(b"file:") {
            Path::new(".").join(path)
        } else {
            path.to_owned()
        };
        // A folder that is not there: SQLite drops `missing/..` from a path by its letters,
        // where the checks below, asking the system, found nothing at it, and it opened the
        // journal the path named without them (a `-wal` beside no file deleted so).
        if let Some(folder) = path.parent().filter(|f| !f.as_os_str().is_empty())
            && std::fs::metadata(folder).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
        {
            return Err(JournalError::new(
                "its folder does not exist",
                format!(
                    "{} is not there; nothing was written: create the folder, or give a path \
                     in one that exists",
                    folder.display()
                ),
            ));
        }
        // A file cut to 0 bytes reads as a new journal: a resume on it would send every
        // create again, billed twice.
        if std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == 0) {
            return Err(JournalError::new(
                "the file is empty (0 bytes), no journal",
                "a journal cut short cannot say which jobs were created, and a run on it \
                 would create them all again (billed twice); put the journal back from a \
                 copy, or, to start over knowing that, remove the file or choose another \
                 journal",
            ));
        }
        // Looked at before SQLite opens the file (reading it creates an empty `-wal`), beside
        // the file a symbolic link names, where SQLite keeps it.
        let file = linked_file(&path);
        let wal = wal_path(&file);
        let wal_file = WalFile::at(&wal);
        // A log beside no file (the file moved or lost, the log alone copied): SQLite would
        // make a new empty file and, finding it no page long, delete the log, the only record
        // of the jobs created, and the run would create every job again. Not its `-shm`: an
        // index of the log, which SQLite rebuilds from it, it records no job.
        let file_missing =
            std::fs::metadata(&file).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound);
        if file_missing && matches!(wal_file, WalFile::Log | WalFile::Empty) {
            return Err(JournalError::new(
                "the journal file is missing, and its write-ahead log is beside it",
                format!(
                    "{wal} is the log of a journal at {file}, which is not there (moved, lost, \
                     or the log alone copied?): opened so, SQLite would make a new empty \
                     journal and delete the log, which may hold the only record of the jobs \
                     created, and a run would create them all again (billed twice). Nothing \
                     was written: put the journal file back beside its -wal (or both where \
                     --journal names); or, to start over knowing every job would be created \
                     again, remove the -wal too or choose another journal",
                    wal = wal.display(),
                    file = file.display(),
                ),
            ));
        }
        // What a journal its run left open lacks without its log: the refusal's words, and
        // where the log is.
        let log_lost = match wal_file {
            WalFile::Missing => Some((
                "its last run did not close it, and its write-ahead log is missing",
                "which is not beside it",
            )),
            WalFile::Empty => Some((
                "its last run did not close it, and its write-ahead log is empty",
                "which is empty (0 bytes) and holds none of them",
            )),
            WalFile::Log => None,
            WalFile::NotALog => {
                return Err(JournalError::new(
                    "the file under its write-ahead log's name is no write-ahead log",
                    format!(
                        "{} does not begin as a SQLite write-ahead log: opening the journal, \
                         SQLite would read it as an empty log and delete it (and a journal \
                         whose run did not close it would read as if its last commits were \
                         never made); nothing was written: move that file elsewhere, and if \
                         the journal's own -wal file is elsewhere, put it back under that name",
                        wal.display()
                    ),
                ));
            }
        };
        let flags = OpenFlags::default().difference(OpenFlags::SQLITE_OPEN_URI);
        let conn = Connection::open_with_flags(&path, flags)
            .map_err(|e| JournalError::new("cannot open the journal file", e))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Until the file and its log are known to be one journal's, closing the connection
        // must not fold the log into the file (SQLite's last close does): a refused file and
        // its `-wal` are left as they were, not the log's pages of another moment laid over
        // the file's for good.
        use rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE as NO_FOLD_ON_CLOSE;
        // An empty `-wal` too: SQLite's close deletes it, and the refusal said next "missing".
        if wal_file != WalFile::Missing {
            conn.set_db_config(NO_FOLD_ON_CLOSE, true)
                .map_err(|e| JournalError::new("cannot open the journal file", e))?;
        }
        // Only a lock held elsewhere means another run; anything else (a file that is no
        // SQLite database, such as the jobs file given as `--journal`, a read-only file) is
        // said as it is.
        let refused = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                JournalError::new("the journal is in use by another run", e)
            }
            _ => JournalError::new("cannot open the journal file", e),
        };
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .map_err(refused)?;
        // Nothing is written to a file that is no kling-batch journal, nor to a journal that
        // lost its last commits.
        let contents = Contents::read(&conn).map_err(refused)?;
        // A `-wal` of another journal or another database than the main file: SQLite lays its
        // pages over the main file's, and the journal reads as neither (jobs created since may
        // read as never created, and be created again; one that reads as new is made a new
        // journal over the old one's pages). The main file's id, once there, is in every
        // commit of its own log. Read once the reads above passed, which a run holding the
        // journal makes fail; an id the file alone cannot give skips the check.
        let main = match wal_file {
            WalFile::Log => main_file(&file),
            _ => MainFile::default(),
        };
        let of_log = match &contents {
            Contents::Journal { id, .. } => Some(id.as_str()),
            Contents::Fresh | Contents::Foreign(_) => None,
        };
        if let Some(of_file) = &main.journal_id
            && of_log != Some(of_file.as_str())
        {
            let (refusal, what) = match of_log {
                Some(of_log) => (
                    "its write-ahead log is another journal's",
                    format!("holds the commits of journal {of_log}"),
                ),
                None => (
                    "its write-ahead log is another database's",
                    "holds the pages of a database that is no kling-batch journal".to_owned(),
                ),
            };
            return Err(JournalError::new(
                refusal,
                format!(
                    "{wal} {what}, and {file} (journal {of_file}) is another: SQLite would \
                     lay that log's pages over this journal's, and it would read as neither, \
                     its jobs' states lost (jobs may be created again, billed twice). Nothing \
                     was written: move that -wal back beside its own database, and put this \
                     journal's own -wal here if its run did not close it; a journal its run \
                     closed needs no -wal, and opens alone once that one is moved away",
                    wal = wal.display(),
                    file = path.display(),
                ),
            ));
        }
        match (&contents, log_lost) {
            (Contents::Foreign(tables), _) => {
                let mut named = tables
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                if tables.len() > 5 {
                    named.push_str(&format!(" and {} more", tables.len() - 5));
                }
                return Err(JournalError::new(
                    "not a kling-batch journal",
                    format!(
                        "a SQLite database of tables {named}, with no journal id; nothing was \
                         written to it: give the path of a kling-batch journal, or of a new file"
                    ),
                ));
            }
            // Its last run left it open, and its `-wal` is not beside it: whole only if
            // another program folded every commit of the log into it. An empty `-wal` holds
            // no commit either (SQLite reads it as no log): a run's log is never empty while
            // the file says it is open ([`checkpoint`]), so an empty one was put there, or
            // left by an earlier kling-batch, whose fold emptied the log (its journal has no
            // count of folds): killed in the instant after that, it lost nothing, which the
            // refusal says, as it cannot tell that from a lost log.
            (
                Contents::Journal {
                    left_open: true,
                    folded: false,
                    folds,
                    ..
                },
                Some((refusal, where_log_is)),
            ) => {
                let earlier_version = if wal_file == WalFile::Empty && folds.is_none() {
                    " (An earlier kling-batch, which wrote this journal, also left an empty \
                     -wal when killed in the instant after it folded its log into the file, \
                     and then nothing was lost: if its run was killed on this machine, not \
                     copied, that is likely, and marking it closed is safe.)"
                } else {
                    ""
                };
                return Err(JournalError::new(
                    refusal,
                    format!(
                        "that run (killed, or still going when the file was copied) kept its \
                         last commits in {wal}, {where_log_is}: the jobs it created or \
                         was creating last may be missing from this file, and a run on it would \
                         create them again (billed twice). Check where the journal came from: \
                         if the -wal file is there, put it back beside the journal under that \
                         name and run again; a copy made while its run went on is older than \
                         the run, so run on the original instead. Only if the -wal is gone for \
                         good, to run on this file at your own risk (jobs it lost may be created \
                         and billed again), mark it closed: sqlite3 {} \"{CLOSE_BY_HAND}\"\
                         {earlier_version}",
                        shell_word(&path),
                        wal = wal.display(),
                    ),
                ));
            }
            (Contents::Fresh | Contents::Journal { .. }, _) => {}
        }
        // A `-wal` of another moment than the main file ([`FOLDS_KEY`]): a count the file
        // alone cannot give skips the check.
        if let Contents::Journal { folded, folds, .. } = contents
            && let Some(main) = main.folds
        {
            // The count is the main file's, or one more while a fold has not ended.
            let of_log = folds.unwrap_or(0);
            let unfolded_next = of_log == main + 1 && !folded;
            if of_log != main && !unfolded_next {
                let (refusal, moment) = if of_log < main {
                    (
                        "its write-ahead log is older than the journal file",
                        "is from before the journal's last folds of its log into the file \
                         (a copy put back from an earlier moment?)",
                    )
                } else {
                    (
                        "its write-ahead log is newer than the journal file",
                        "is from after folds of the log that the file does not hold (the two \
                         copied one after the other while their run went on?)",
                    )
                };
                return Err(JournalError::new(
                    refusal,
                    format!(
                        "{wal} (fold {of_log} of the log) {moment}, and the file holds fold \
                         {main}: SQLite would lay the log's pages over the file's, and the \
                         journal would read as neither, its jobs' states lost (jobs may be \
                         created again, billed twice). Nothing was written: put back the -wal \
                         and the file as they were together (copied together from a stopped \
                         run), or run on the original; a journal its run closed needs no -wal, \
                         and opens alone once that one is moved away",
                        wal = wal.display(),
                    ),
                ));
            }
        }
        conn.set_db_config(NO_FOLD_ON_CLOSE, false)
            .map_err(|e| JournalError::new("cannot open the journal file", e))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(refused)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(refused)?;
        // The journal folds its log itself, marking the main file around it ([`FOLDED_KEY`]),
        // the log cut by the commit after each fold ([`checkpoint`]).
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(refused)?;
        conn.pragma_update(None, "journal_size_limit", 0)
            .map_err(refused)?;
        // A write takes the lock, held until the journal is closed.
        conn.execute_batch("BEGIN IMMEDIATE; COMMIT;")
            .map_err(refused)?;
        let mut journal = Journal::init(conn).map_err(|e| match e.context() {
            "sqlite" => JournalError::new("cannot open the journal file", e),
            _ => e,
        })?;
        // Open until the last clone is dropped: said in the main file itself, so that a copy
        // of it without its `-wal` is known for one.
        {
            let conn = journal.lock();
            fold(&conn, true).map_err(|e| JournalError::new("cannot open the journal file", e))?;
        }
        journal.close_mark = Some(Arc::new(CloseMark::new(journal.conn.clone())));
        let [(wal, _), ..] = companions(&path);
        journal.folding = Some(Arc::new(Folding {
            wal,
            past_bytes: FOLD_PAST_BYTES.into(),
        }));
        Ok(journal)
    }

    /// A journal that lives in memory (for tests and dry runs).
    pub fn open_in_memory() -> Result<Journal, JournalError> {
        Journal::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Journal, JournalError> {
        // Every statement of a job's registration or transition is prepared once per
        // connection (`prepare_cached`): parsing them again for each of 100 000 jobs took most
        // of a register's time, and of a stop's marking.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // The tables and the journal's id in one transaction: a journal cut between the two
        // would hold tables and no id.
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(SCHEMA)?;
        // Journals of earlier versions lack the columns added since.
        let has_download_error: bool = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('jobs') WHERE name = 'download_error'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !has_download_error {
            conn.execute_batch("ALTER TABLE jobs ADD COLUMN download_error TEXT")?;
        }
        let existing: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [JOURNAL_ID_KEY],
                |r| r.get(0),
            )
            .optional()?;
        let id = match existing {
            Some(id) => id,
            None => {
                let seed = format!("{}:{}:{:?}", now(), std::process::id(), SystemTime::now());
                let id = hex(&Sha256::digest(seed.as_bytes())[..8]);
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2)",
                    params![JOURNAL_ID_KEY, id],
                )?;
                id
            }
        };
        tx.commit()?;
        Ok(Journal {
            conn: Arc::new(Mutex::new(conn)),
            id: Arc::from(id),
            #[cfg(test)]
            commits: Arc::default(),
            #[cfg(test)]
            write_hook: Arc::default(),
            close_mark: None,
            folding: None,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After a commit: folds the write-ahead log into the main file once it is longer than
    /// SQLite's automatic checkpoint lets it grow, marking the main file around it ([`fold`]).
    /// A failure is left for the next commit, as SQLite leaves its own: the commit stands.
    fn fold_if_long(&self, conn: &Connection) {
        let Some(folding) = &self.folding else { return };
        let long = std::fs::metadata(&folding.wal).is_ok_and(|m| {
            m.len()
                > folding
                    .past_bytes
                    .load(std::sync::atomic::Ordering::Relaxed)
        });
        if long && let Err(e) = fold(conn, false) {
            tracing::warn!(error = %e, "could not fold the journal's write-ahead log");
        }
    }

    /// Tests: the log is folded after every commit longer than `bytes`.
    #[cfg(test)]
    pub(crate) fn fold_past(&self, bytes: u64) {
        if let Some(folding) = &self.folding {
            folding
                .past_bytes
                .store(bytes, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The journal's own random id, fixed when it was created.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The deterministic external id a job gets when it is registered in this journal: `kb-`
    /// and 24 hex digits of SHA-256(journal id, job id). The same job always gets the same id,
    /// so a create that may have happened can be looked up, and a second one would be refused
    /// by Kling. The record's [`JobRecord::external_id`] is the one its creates carry (a job
    /// that took over an old journal's `line-N` row keeps that row's).
    pub fn external_id_for(&self, job_id: &str) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.id.as_bytes());
        hasher.update([0]);
        hasher.update(job_id.as_bytes());
        format!("kb-{}", hex(&hasher.finalize()[..12]))
    }

    /// Adds the jobs not yet in the journal (state `queued`) in one transaction, and returns
    /// every job's record in the order given. A job already in the journal keeps its state
    /// (that is what resuming means) and takes its line in the file given.
    ///
    /// # Errors
    ///
    /// A job whose id the journal holds with another body or endpoint (the job was edited
    /// but kept its id) is refused: the error's source is [`ChangedJobs`], naming every such
    /// job, and nothing is written.
    pub fn register(&self, jobs: &[Job]) -> Result<Vec<JobRecord>, JournalError> {
        self.register_unless(jobs, None, &|| false)?
            .map(|(records, _)| records)
            .ok_or_else(|| JournalError::new("registering stopped", "never asked to stop"))
    }

    /// [`register`](Self::register) and [`bind_base_url`](Self::bind_base_url) in one
    /// transaction, for a run about to send `jobs` to `base`: refused for either (a job
    /// edited under its id, another base URL), nothing is written, and the journal stays as
    /// it was; else both are. [`Engine::run`](crate::run::Engine::run) registers its jobs so,
    /// at its stack's base URL.
    ///
    /// # Errors
    ///
    /// As [`bind_base_url`](Self::bind_base_url)'s (checked first) and
    /// [`register`](Self::register)'s.
    pub fn register_at(
        &self,
        jobs: &[Job],
        base: &ApiOrigin,
        moved_from: Option<&ApiOrigin>,
    ) -> Result<(Vec<JobRecord>, BaseUrlBinding), JournalError> {
        match self.register_unless(jobs, Some((base, moved_from)), &|| false)? {
            Some((records, Some(binding))) => Ok((records, binding)),
            _ => Err(JournalError::new(
                "registering stopped",
                "never asked to stop",
            )),
        }
    }

    /// [`register`](Self::register), or [`register_at`](Self::register_at) when `bind` gives
    /// the base URL and the one it replaces, looking at `stopped` every [`REGISTER_CHECK`]
    /// jobs: once it says so, nothing is written (the journal stays as it was, its base URL
    /// too) and `Ok(None)` is returned. A stop while 100 000 jobs are registered is heard
    /// within a few milliseconds. The binding is `Some` when `bind` is.
    pub(crate) fn register_unless(
        &self,
        jobs: &[Job],
        bind: Option<(&ApiOrigin, Option<&ApiOrigin>)>,
        stopped: &dyn Fn() -> bool,
    ) -> Result<Option<Registered>, JournalError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        // Checked before anything is written (registering adds `queued` jobs alone, which
        // change nothing it finds): refused, dropping the transaction writes nothing.
        let binding = bind
            .map(|(base, moved_from)| base_url_binding(&tx, base, moved_from))
            .transpose()?;
        let at = now();
        let mut changed = Vec::new();
        // An earlier version's `line-N` rows, by the default id of their content: read once,
        // when the first job without an id is not found under its own.
        let mut legacy: Option<HashMap<String, VecDeque<LegacyRow>>> = None;
        for (index, job) in jobs.iter().enumerate() {
            if index % REGISTER_CHECK == 0 && stopped() {
                // Dropping the transaction rolls it back.
                return Ok(None);
            }
            if let Some((endpoint, body)) = stored_job(&tx, &job.id)? {
                if same_job(job, &endpoint, &body) {
                    tx.prepare_cached("UPDATE jobs SET line = ?2 WHERE job_id = ?1")?
                        .execute(params![job.id, job.line as i64])?;
                } else {
                    changed.push((job.id.clone(), job.line));
                }
                continue;
            }
            if job.has_default_id() {
                // A journal of an earlier version keeps this job under `line-N`.
                if legacy.is_none() {
                    legacy = Some(legacy_rows(&tx, jobs)?);
                }
                // Identical jobs take identical rows in line order, as their ids are numbered.
                if let Some(found) = legacy
                    .as_mut()
                    .and_then(|rows| rows.get_mut(&default_id(&job.endpoint, &job.body())))
                    .and_then(VecDeque::pop_front)
                    .filter(|r| same_job(job, &r.endpoint, &r.body))
                {
                    tx.execute(
                        "UPDATE jobs SET job_id = ?2, line = ?3 WHERE job_id = ?1",
                        params![found.job_id, job.id, job.line as i64],
                    )?;
                    tx.execute(
                        "UPDATE transitions SET job_id = ?2 WHERE job_id = ?1",
                        params![found.job_id, job.id],
                    )?;
                    continue;
                }
            }
            let body = serde_json::to_string(&job.body()).unwrap_or_default();
            tx.prepare_cached(
                "INSERT INTO jobs (job_id, line, endpoint, body, external_id, state, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6)",
            )?
            .execute(params![
                job.id,
                job.line as i64,
                job.endpoint,
                body,
                self.external_id_for(&job.id),
                at
            ])?;
            tx.prepare_cached(INSERT_TRANSITION)?.execute(params![
                job.id,
                None::<&str>,
                "queued",
                at
            ])?;
        }
        if !changed.is_empty() {
            // Dropping the transaction rolls it back: nothing of this file is recorded, nor
            // this run's base URL.
            return Err(changed_jobs(changed));
        }
        if let (Some((base, _)), Some(binding)) = (bind, &binding)
            && *binding != BaseUrlBinding::Same
        {
            mark(&tx, BASE_URL_KEY, base.as_str())?;
        }
        tx.commit()?;
        self.fold_if_long(&conn);
        let mut select = conn.prepare_cached(SELECT_RECORD)?;
        let records = jobs
            .iter()
            .map(|job| {
                select
                    .query_row(params![job.id], read_record)
                    .optional()?
                    .ok_or_else(|| {
                        JournalError::new("job vanished after registering", job.id.clone())
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some((records, binding)))
    }

    /// The check of [`register`](Self::register) for jobs edited under their id, writing
    /// nothing: `kling-batch run` asks it before it makes a `--download` folder, so that a
    /// resume refused for such a job leaves none behind. The journal is this process's alone
    /// while it is open, so the registration that follows finds the same.
    ///
    /// # Errors
    ///
    /// As [`register`](Self::register)'s: the source is [`ChangedJobs`].
    pub(crate) fn check_jobs(&self, jobs: &[Job]) -> Result<(), JournalError> {
        let conn = self.lock();
        let mut changed = Vec::new();
        for job in jobs {
            if let Some((endpoint, body)) = stored_job(&conn, &job.id)?
                && !same_job(job, &endpoint, &body)
            {
                changed.push((job.id.clone(), job.line));
            }
        }
        if changed.is_empty() {
            Ok(())
        } else {
            Err(changed_jobs(changed))
        }
    }

    /// Moves a job to `state`, setting the fields `update` carries, and records the
    /// transition — all in one transaction. The job's error is the update's when it carries
    /// one; otherwise it is kept if the job stays in its state and cleared if it moves.
    pub fn transition(
        &self,
        job_id: &str,
        state: JobState,
        update: Update,
    ) -> Result<(), JournalError> {
        #[cfg(test)]
        {
            let hook = self
                .write_hook
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(hook) = hook {
                hook(job_id, state);
            }
        }
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        apply(&tx, job_id, state, update)?;
        tx.commit()?;
        self.fold_if_long(&conn);
        #[cfg(test)]
        self.commits
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// [`transition`](Self::transition) of each of `job_ids` to `state` with the same
    /// `update`, all in one transaction (one write to the disk instead of one per job): every
    /// job moves, or none does.
    pub(crate) fn transition_all(
        &self,
        job_ids: &[&str],
        state: JobState,
        update: &Update,
    ) -> Result<(), JournalError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        for job_id in job_ids {
            apply(&tx, job_id, state, update.clone())?;
        }
        tx.commit()?;
        self.fold_if_long(&conn);
        #[cfg(test)]
        self.commits
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Tests: `hook` is called before each later [`transition`](Self::transition) of every
    /// clone takes the connection.
    #[cfg(test)]
    pub(crate) fn on_write(&self, hook: WriteHook) {
        *self.write_hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Tests: every later write fails (`query_only`), as on a disk that filled up.
    #[cfg(test)]
    pub(crate) fn fail_writes(&self) {
        self.lock()
            .pragma_update(None, "query_only", true)
            .expect("query_only");
    }

    /// Tests: the state changes committed so far, one transaction each.
    #[cfg(test)]
    pub(crate) fn commits(&self) -> usize {
        self.commits.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The API the journal's jobs were sent to, as a run recorded it
    /// ([`bind_base_url`](Self::bind_base_url)); `None` for a journal no run bound yet (a new
    /// one, or one of an earlier version, which recorded none).
    pub fn base_url(&self) -> Result<Option<ApiOrigin>, JournalError> {
        let conn = self.lock();
        let text: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [BASE_URL_KEY],
                |r| r.get(0),
            )
            .optional()?;
        Ok(text.map(ApiOrigin))
    }

    /// Checks that the journal's jobs were sent to `base`, the base URL a run is about to
    /// send to, and records it: called before the run sends anything. A task is Kling's in
    /// one region of one account: looked up anywhere else it is not found, and a resume would
    /// create its job again, billed twice. [`Engine::run`](crate::run::Engine::run) does it
    /// for its stack's base URL, in the transaction that registers its jobs
    /// ([`register_at`](Self::register_at)), so a run refused for its jobs records no base URL
    /// either (`kling-batch run` also checks it first with
    /// [`check_base_url`](Self::check_base_url), before it binds a listener or makes a
    /// folder); call this one to send the journal's jobs by other means.
    ///
    /// A journal that recorded no base URL records `base` ([`BaseUrlBinding::New`], or
    /// [`BaseUrlBinding::Unrecorded`] for one of an earlier version whose jobs were sent: where
    /// to is not known, and it resumes as before). One that recorded another takes `base` only
    /// when none of its jobs holds or may hold a task ([`BaseUrlBinding::Unsent`]: each
    /// `queued`, or `not_submitted` for a refusal that made nothing), or when `moved_from`
    /// names the one it recorded: the caller says the same API is now reached at `base`
    /// ([`BaseUrlBinding::Moved`]).
    ///
    /// # Errors
    ///
    /// Any other base URL is refused, and nothing is written: the error's source is
    /// [`OtherBaseUrl`], naming both.
    pub fn bind_base_url(
        &self,
        base: &ApiOrigin,
        moved_from: Option<&ApiOrigin>,
    ) -> Result<BaseUrlBinding, JournalError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        // Refused: dropping the transaction rolls it back, and nothing is written.
        let binding = base_url_binding(&tx, base, moved_from)?;
        if binding == BaseUrlBinding::Same {
            return Ok(binding);
        }
        mark(&tx, BASE_URL_KEY, base.as_str())?;
        tx.commit()?;
        self.fold_if_long(&conn);
        Ok(binding)
    }

    /// What [`bind_base_url`](Self::bind_base_url) would find for `base` and `moved_from`,
    /// writing nothing: a run refused after this check (a listener it cannot bind, say) leaves
    /// the journal as it was. The journal is this process's alone while it is open, so the
    /// binding that follows finds the same.
    ///
    /// # Errors
    ///
    /// As [`bind_base_url`](Self::bind_base_url)'s.
    pub fn check_base_url(
        &self,
        base: &ApiOrigin,
        moved_from: Option<&ApiOrigin>,
    ) -> Result<BaseUrlBinding, JournalError> {
        base_url_binding(&self.lock(), base, moved_from)
    }

    /// One job's record.
    pub fn record(&self, job_id: &str) -> Result<Option<JobRecord>, JournalError> {
        let conn = self.lock();
        let record = conn
            .prepare_cached(SELECT_RECORD)?
            .query_row(params![job_id], read_record)
            .optional()?;
        Ok(record)
    }

    /// Every job's record, in line order.
    pub fn records(&self) -> Result<Vec<JobRecord>, JournalError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT job_id, line, endpoint, external_id, state, task_id, status, urls, files, error,
                download_error
             FROM jobs ORDER BY line",
        )?;
        let rows = stmt.query_map([], read_record)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(Into::into)
    }

    /// The jobs that may have made a task still to settle, with their state: `creating` (a
    /// create of unknown outcome) and `created` (a task not followed to its end), by line.
    pub fn open_jobs(&self) -> Result<Vec<(String, JobState)>, JournalError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT job_id, state FROM jobs WHERE state IN ('creating', 'created') ORDER BY line",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        rows.map(|row| {
            let (id, state) = row?;
            let state = state
                .parse()
                .map_err(|e: String| JournalError::new("unreadable journal", e))?;
            Ok((id, state))
        })
        .collect()
    }

    /// When the job first reached `succeeded` (its task's end noticed), by the wall clock:
    /// how old its result URLs are at least.
    pub fn succeeded_at(&self, job_id: &str) -> Result<Option<SystemTime>, JournalError> {
        let conn = self.lock();
        let at: Option<f64> = conn
            .prepare_cached(SELECT_SUCCEEDED_AT)?
            .query_row(params![job_id], |r| r.get(0))?;
        Ok(at.filter(|at| at.is_finite() && *at >= 0.0).and_then(|at| {
            UNIX_EPOCH.checked_add(std::time::Duration::try_from_secs_f64(at).ok()?)
        }))
    }

    /// When the job's record last changed (a transition, its error or files set), by the wall
    /// clock.
    pub fn changed_at(&self, job_id: &str) -> Result<Option<SystemTime>, JournalError> {
        let conn = self.lock();
        let at: Option<f64> = conn
            .prepare_cached("SELECT updated_at FROM jobs WHERE job_id = ?1")?
            .query_row(params![job_id], |r| r.get(0))
            .optional()?;
        Ok(at.filter(|at| at.is_finite() && *at >= 0.0).and_then(|at| {
            UNIX_EPOCH.checked_add(std::time::Duration::try_from_secs_f64(at).ok()?)
        }))
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

/// One job's transition (see [`Journal::transition`]) inside `tx`.
fn apply(
    tx: &rusqlite::Transaction<'_>,
    job_id: &str,
    state: JobState,
    update: Update,
) -> Result<(), JournalError> {
    let from: Option<String> = tx
        .prepare_cached("SELECT state FROM jobs WHERE job_id = ?1")?
        .query_row(params![job_id], |r| r.get(0))
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
        download_error,
        clear_error,
    } = update;
    let json = |v: Option<Vec<String>>| v.map(|v| serde_json::to_string(&v).unwrap_or_default());
    let error = error.map(|e| serde_json::to_string(&e).unwrap_or_default());
    let set_download_error = download_error.is_some();
    let download_error = download_error
        .flatten()
        .map(|e| serde_json::to_string(&e).unwrap_or_default());
    tx.prepare_cached(
        "UPDATE jobs SET state = ?2,
            task_id = COALESCE(?3, task_id),
            status = COALESCE(?4, status),
            urls = COALESCE(?5, urls),
            files = COALESCE(?6, files),
            error = CASE WHEN ?7 IS NOT NULL THEN ?7 WHEN ?11 OR state <> ?2 THEN NULL
                ELSE error END,
            updated_at = ?8,
            download_error = CASE WHEN ?9 THEN ?10 ELSE download_error END
         WHERE job_id = ?1",
    )?
    .execute(params![
        job_id,
        state.as_str(),
        task_id,
        status,
        json(urls),
        json(files),
        error,
        at,
        set_download_error,
        download_error,
        clear_error
    ])?;
    if from != state.as_str() {
        tx.prepare_cached(INSERT_TRANSITION)?
            .execute(params![job_id, from, state.as_str(), at])?;
    }
    Ok(())
}

fn read_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
    let state: String = row.get(4)?;
    let list = |i: usize| -> rusqlite::Result<Vec<String>> {
        let text: String = row.get(i)?;
        Ok(serde_json::from_str(&text).unwrap_or_default())
    };
    let error: Option<String> = row.get(9)?;
    let download_error: Option<String> = row.get(10)?;
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
        download_error: download_error.and_then(|e| serde_json::from_str(&e).ok()),
    })
}

/// The endpoint and body the journal keeps for the job `job_id`, if it has one: what
/// [`Journal::register`] and [`Journal::check_jobs`] compare a job of the file with.
fn stored_job(conn: &Connection, job_id: &str) -> rusqlite::Result<Option<(String, String)>> {
    conn.prepare_cached("SELECT endpoint, body FROM jobs WHERE job_id = ?1")?
        .query_row(params![job_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
}

/// The refusal of a jobs file whose jobs `changed` (id and line) were edited under their id.
fn changed_jobs(changed: Vec<(String, usize)>) -> JournalError {
    JournalError::new("the jobs file changed", ChangedJobs::new(changed))
}

/// Whether a stored endpoint and body (JSON text) are `job`'s.
fn same_job(job: &Job, endpoint: &str, body: &str) -> bool {
    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(body)
        .is_ok_and(|body| job.same_content(endpoint, &body))
}

/// A row an earlier version registered under a `line-N` id, which a job without `id` may
/// take over.
struct LegacyRow {
    job_id: String,
    endpoint: String,
    body: String,
}

/// The `line-N` rows not held by an id of `jobs`, by the [`default_id`] of their content, each
/// list in line order. Rows whose body is not a JSON object are left out (no job matches them).
fn legacy_rows(
    tx: &rusqlite::Transaction<'_>,
    jobs: &[Job],
) -> rusqlite::Result<HashMap<String, VecDeque<LegacyRow>>> {
    let ids: HashSet<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    let mut stmt = tx.prepare(
        "SELECT job_id, endpoint, body FROM jobs WHERE job_id GLOB 'line-[0-9]*' ORDER BY line",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(LegacyRow {
            job_id: r.get(0)?,
            endpoint: r.get(1)?,
            body: r.get(2)?,
        })
    })?;
    let mut legacy: HashMap<String, VecDeque<LegacyRow>> = HashMap::new();
    for row in rows {
        let row = row?;
        if ids.contains(row.job_id.as_str()) {
            continue;
        }
        let Ok(body) =
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&row.body)
        else {
            continue;
        };
        legacy
            .entry(default_id(&row.endpoint, &body))
            .or_default()
            .push_back(row);
    }
    Ok(legacy)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    /// Written through to the disk, and locked while open: a second open of the same file (a
    /// second run) is refused, naming why; once the first is closed it opens.
    #[test]
    fn the_journal_is_durable_and_one_runs_on_it_at_a_time() {
        let dir = std::env::temp_dir().join(format!("kling-batch-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("j.sqlite");
        let first = Journal::open(&path).unwrap();
        let synchronous: i64 = first
            .lock()
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(synchronous, 2, "FULL");
        let second = Journal::open(&path).map(|_| ()).unwrap_err();
        assert!(
            second.to_string().contains("in use by another run"),
            "{second}"
        );
        drop(first);
        Journal::open(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A file that is no journal (the jobs file given as `--journal`, say) is refused for what
    /// it is, not as a journal another run holds, and is left as it was.
    #[test]
    fn a_file_that_is_not_a_journal_is_refused_as_such_and_left_alone() {
        let dir = std::env::temp_dir().join(format!("kling-batch-notdb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jobs.jsonl");
        let text =
            "{\"id\":\"a\",\"prompt\":\"a cat surfing at dawn, a long prompt\"}\n".repeat(40);
        std::fs::write(&path, &text).unwrap();
        let error = Journal::open(&path).map(|_| ()).unwrap_err().to_string();
        assert!(!error.contains("in use by another run"), "{error}");
        assert!(error.contains("cannot open the journal file"), "{error}");
        assert!(error.contains("not a database"), "{error}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        let _ = std::fs::remove_dir_all(&dir);
    }

    use super::*;
    use crate::jobs::parse_jobs;

    /// A folder of its own for a test's files, emptied.
    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kb-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A journal file cut to 0 bytes is refused, naming what is wrong, and left as it is: it
    /// opened as a new journal, and a resume on it sent every create again.
    #[test]
    fn an_empty_journal_file_is_refused_and_left_alone() {
        let dir = scratch("empty");
        let path = dir.join("j.sqlite");
        std::fs::write(&path, b"").unwrap();
        let error = Journal::open(&path).map(|_| ()).unwrap_err().to_string();
        assert!(error.contains("empty (0 bytes)"), "{error}");
        assert!(error.contains("billed twice"), "{error}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        // A path where no file is yet is a new journal.
        Journal::open(dir.join("new.sqlite")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Another program's SQLite database is refused, naming its tables, and nothing is
    /// written to it: the journal's tables were added to it and it ran as a new journal.
    #[test]
    fn a_database_that_is_no_kling_batch_journal_is_refused_and_left_alone() {
        let dir = scratch("foreign");
        let path = dir.join("photos.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT);
                 CREATE TABLE meta (k TEXT, v TEXT);
                 INSERT INTO photos (name) VALUES ('a');",
            )
            .unwrap();
        }
        let before = std::fs::read(&path).unwrap();
        let error = Journal::open(&path).map(|_| ()).unwrap_err().to_string();
        assert!(error.contains("not a kling-batch journal"), "{error}");
        assert!(error.contains("meta, photos"), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), before, "left as it was");
        // A journal whose creation stopped before its id was written holds no job: opened.
        let cut = dir.join("cut.sqlite");
        Connection::open(&cut)
            .unwrap()
            .execute_batch(SCHEMA)
            .unwrap();
        Journal::open(&cut).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Another program's database whose tables bear a journal's names but not its columns (a
    /// job queue's empty `jobs`) is refused and left alone: holding no row, it read as a
    /// journal whose creation was cut short, and had the journal's tables, a column and an id
    /// added to it.
    #[test]
    fn empty_tables_of_another_program_under_a_journals_names_are_refused_and_left_alone() {
        let dir = scratch("foreign-empty");
        for (name, schema) in [
            (
                "queue.db",
                "CREATE TABLE jobs (id INTEGER PRIMARY KEY, payload BLOB);",
            ),
            (
                "kv.db",
                "CREATE TABLE meta (name TEXT, data BLOB); CREATE TABLE transitions (x);",
            ),
        ] {
            let path = dir.join(name);
            Connection::open(&path)
                .unwrap()
                .execute_batch(schema)
                .unwrap();
            let before = std::fs::read(&path).unwrap();
            let error = Journal::open(&path).map(|_| ()).unwrap_err().to_string();
            assert!(
                error.contains("not a kling-batch journal"),
                "{name}: {error}"
            );
            assert_eq!(
                std::fs::read(&path).unwrap(),
                before,
                "{name}: left as it was"
            );
        }
        // A journal of an earlier version cut before its id (its tables, no `download_error`
        // yet, no row) is still opened.
        let cut = dir.join("cut-old.sqlite");
        Connection::open(&cut)
            .unwrap()
            .execute_batch(&SCHEMA.replace(",\n    download_error TEXT", ""))
            .unwrap();
        Journal::open(&cut).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A new journal at `path`, closed by its run, opens with an empty file at its `-wal`
    /// name (the log its close truncated).
    fn closed_opens_beside_an_empty_wal(path: &Path) {
        drop(Journal::open(path).unwrap());
        std::fs::write(wal_path(path), "").unwrap();
        drop(Journal::open(path).unwrap());
    }

    /// The journal on `conn` as an earlier kling-batch left it when it began a fold: no count
    /// of folds, the fold mark `0`.
    fn as_an_earlier_version_began_a_fold(conn: &Connection) {
        conn.execute("DELETE FROM meta WHERE key = ?1", [FOLDS_KEY])
            .unwrap();
        mark(conn, FOLDED_KEY, "0").unwrap();
    }

    /// A copy of the journal file at `from` at `to`, its `-wal` beside it when `with_wal`.
    fn copied(from: &Path, to: std::path::PathBuf, with_wal: bool) -> std::path::PathBuf {
        std::fs::copy(from, &to).unwrap();
        if with_wal {
            std::fs::copy(wal_path(from), wal_path(&to)).unwrap();
        }
        to
    }

    /// The journal at `path`, still open as a killed run leaves it: job `a` registered and
    /// marked `creating`, both in the `-wal` alone.
    fn killed_while_creating(path: &Path) -> Journal {
        let (jobs, _) = parse_jobs("{\"id\":\"a\",\"prompt\":\"x\"}\n");
        let killed = Journal::open(path).unwrap();
        killed.register(&jobs).unwrap();
        killed
            .transition("a", JobState::Creating, Update::default())
            .unwrap();
        killed
    }

    /// A journal whose run was killed, copied without its `-wal`, is refused, naming the
    /// missing file, what to check, and the command that accepts it at the user's own risk: it
    /// read as a new journal (its jobs, their `creating` marks, its id, all in the `-wal`), and
    /// a resume on it created the jobs again. Copied with it, or closed before it was copied,
    /// it opens with every state.
    #[test]
    fn a_journal_copied_without_its_wal_after_its_run_was_killed_is_refused() {
        let dir = scratch("nowal");
        let path = dir.join("j.sqlite");
        // Still open, as after a kill: the last commits are in the `-wal` alone.
        let killed = killed_while_creating(&path);
        let copy = |to: &str, with_wal: bool| copied(&path, dir.join(to), with_wal);
        let alone = copy("alone copy.sqlite", false);
        let whole = copy("whole.sqlite", true);
        let error = Journal::open(&alone).map(|_| ()).unwrap_err().to_string();
        assert!(error.contains("write-ahead log is missing"), "{error}");
        assert!(error.contains("alone copy.sqlite-wal"), "{error}");
        assert!(error.contains("did not close it"), "{error}");
        assert!(error.contains("put it back beside the journal"), "{error}");
        assert!(error.contains("at your own risk"), "{error}");
        let command = format!("sqlite3 '{}' \"{CLOSE_BY_HAND}\"", alone.to_str().unwrap());
        assert!(error.contains(&command), "{error}");
        assert!(!wal_path(&alone).exists(), "left as it was");
        // Refused again: the refusal left no empty `-wal` that would let it through.
        assert!(Journal::open(&alone).is_err());
        // The command the error gives accepts it, as it reads (the job is lost).
        let status = std::process::Command::new("sqlite3")
            .arg(&alone)
            .arg(CLOSE_BY_HAND)
            .status();
        if status.is_err() {
            // No sqlite3 shell here: the same statement through SQLite.
            Connection::open(&alone)
                .unwrap()
                .execute(CLOSE_BY_HAND, [])
                .unwrap();
        }
        let state = |path: &Path| {
            let journal = Journal::open(path).unwrap();
            journal.record("a").unwrap().map(|r| r.state)
        };
        assert_eq!(state(&alone), None);
        assert_eq!(state(&whole), Some(JobState::Creating));
        // Through a symbolic link, the `-wal` is the one beside the file it names.
        #[cfg(unix)]
        {
            let link = dir.join("link.sqlite");
            std::os::unix::fs::symlink(copy("target.sqlite", true), &link).unwrap();
            assert!(!wal_path(&link).exists());
            assert_eq!(state(&link), Some(JobState::Creating));
        }
        // Closed: the main file stands alone.
        drop(killed);
        assert!(!wal_path(&path).exists());
        let closed = copy("closed.sqlite", false);
        assert_eq!(state(&closed), Some(JobState::Creating));
        assert_eq!(state(&closed), Some(JobState::Creating), "and again");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A `-wal` beside no journal file (the file moved or lost, the log alone copied) is
    /// refused, naming both, and left byte for byte as it was: SQLite made a new empty file
    /// there and, finding it no page long, deleted the log, the only record of the jobs
    /// created, and the run created every job again (billed twice). Through a symbolic link
    /// whose target is missing too, and through `missing/..` (which SQLite drops by the
    /// letters); a `-wal` that links to nothing is refused before SQLite makes a file; with
    /// the file put back, the journal opens whole.
    #[test]
    fn a_wal_whose_journal_file_is_missing_is_refused_and_kept() {
        let dir = scratch("lonewal");
        let path = dir.join("j.sqlite");
        let killed = killed_while_creating(&path);
        let lone = copied(&path, dir.join("lone.sqlite"), true);
        drop(killed);
        let moved = dir.join("moved.sqlite");
        std::fs::rename(&lone, &moved).unwrap();
        let log = std::fs::read(wal_path(&lone)).unwrap();
        assert!(!log.is_empty());
        // An index of the log beside it, as a run that does not lock alone leaves: kept too.
        let mut shm = lone.clone().into_os_string();
        shm.push("-shm");
        std::fs::write(&shm, b"an index of the log").unwrap();
        let refused = |path: &Path| {
            let error = Journal::open(path).map(|_| ()).unwrap_err().to_string();
            assert!(error.contains("the journal file is missing"), "{error}");
            assert!(error.contains("lone.sqlite-wal"), "{error}");
            assert!(error.contains("put the journal file back"), "{error}");
            assert!(error.contains("billed twice"), "{error}");
            assert_eq!(std::fs::read(wal_path(&lone)).unwrap(), log, "the log kept");
            assert!(!lone.exists(), "no file made");
            assert_eq!(std::fs::read(&shm).unwrap(), b"an index of the log");
        };
        refused(&lone);
        refused(&lone);
        // An empty `-wal` is refused too: its journal was closed, and is the file that is gone.
        let closed = dir.join("closed.sqlite");
        drop(Journal::open(&closed).unwrap());
        std::fs::write(wal_path(&closed), "").unwrap();
        std::fs::remove_file(&closed).unwrap();
        let error = Journal::open(&closed).map(|_| ()).unwrap_err().to_string();
        assert!(error.contains("the journal file is missing"), "{error}");
        assert_eq!(std::fs::metadata(wal_path(&closed)).unwrap().len(), 0);
        assert!(!closed.exists(), "no file made");
        // Through a link to the missing file, whose `-wal` is beside the link's target.
        #[cfg(unix)]
        {
            let link = dir.join("link.sqlite");
            std::os::unix::fs::symlink(&lone, &link).unwrap();
            refused(&link);
        }
        // A `-wal` that is a symbolic link to nothing, beside no file: refused before SQLite
        // made an empty journal file (which it did, then failed to open the log through the
        // link), and the link left; so beside a journal file.
        #[cfg(unix)]
        {
            let dangling = dir.join("dangling.sqlite");
            std::os::unix::fs::symlink(dir.join("nowhere"), wal_path(&dangling)).unwrap();
            let error = Journal::open(&dangling)
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(error.contains("is no write-ahead log"), "{error}");
            assert!(!dangling.exists(), "no file made");
            assert!(
                std::fs::symlink_metadata(wal_path(&dangling)).is_ok(),
                "link kept"
            );
            let beside = dir.join("beside.sqlite");
            drop(Journal::open(&beside).unwrap());
            std::os::unix::fs::symlink(dir.join("nowhere"), wal_path(&beside)).unwrap();
            let error = Journal::open(&beside).map(|_| ()).unwrap_err().to_string();
            assert!(error.contains("is no write-ahead log"), "{error}");
        }
        // Through a folder that is not there and `..`, which SQLite drops by the letters
        // (and opened the file beside the log as a new journal, the log deleted).
        let through = dir.join("missing").join("..").join("lone.sqlite");
        let error = Journal::open(&through).map(|_| ()).unwrap_err().to_string();
        assert!(error.contains("its folder does not exist"), "{error}");
        assert_eq!(std::fs::read(wal_path(&lone)).unwrap(), log, "the log kept");
        assert!(!lone.exists(), "no file made");
        // Put back, it opens with the job's mark.
        std::fs::rename(&moved, &lone).unwrap();
        let journal = Journal::open(&lone).unwrap();
        assert_eq!(
            journal.record("a").unwrap().map(|r| r.state),
            Some(JobState::Creating)
        );
        drop(journal);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Opens `path` as another program (`sqlite3 path .tables`) does after a kill: reading it
    /// folds the `-wal` into the main file, and closing it deletes the `-wal`.
    fn fold_as_another_program(path: &Path) {
        Connection::open(path)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get::<_, i64>(0))
            .unwrap();
        assert!(!wal_path(path).exists(), "folded in");
    }

    /// A journal left open by a killed run whose `-wal` another program folded into it (the
    /// user looked at it with `sqlite3`) is whole, and opens with every state, the commits
    /// made after the run's own folds of its log included: it was refused as one whose `-wal`
    /// was lost. One whose `-wal` was lost after the run folded its log itself is still
    /// refused: the main file holds the state of that fold, not the last.
    #[test]
    fn a_journal_whose_wal_another_program_folded_in_is_whole_and_a_lost_one_is_refused() {
        let dir = scratch("folded");
        let path = dir.join("j.sqlite");
        let (jobs, _) =
            parse_jobs("{\"id\":\"a\",\"prompt\":\"x\"}\n{\"id\":\"b\",\"prompt\":\"y\"}\n");
        let killed = Journal::open(&path).unwrap();
        killed.register(&jobs).unwrap();
        // The run folds its log into the main file after every commit (as past 4 MB), up to
        // the `creating` mark of `a`; `b`'s is in the log alone.
        killed.fold_past(0);
        killed
            .transition("a", JobState::Creating, Update::default())
            .unwrap();
        killed.fold_past(u64::MAX);
        killed
            .transition("b", JobState::Creating, Update::default())
            .unwrap();
        let copy = |to: &str, with_wal: bool| copied(&path, dir.join(to), with_wal);
        let states = |path: &Path| {
            let journal = Journal::open(path).unwrap();
            ["a", "b"].map(|id| journal.record(id).unwrap().map(|r| r.state))
        };
        let both_creating = [Some(JobState::Creating), Some(JobState::Creating)];
        let folded = copy("folded.sqlite", true);
        fold_as_another_program(&folded);
        assert_eq!(states(&folded), both_creating);
        assert_eq!(states(&folded), both_creating, "and again");
        // Lost after the run's own fold: the main file has `a`'s mark, not `b`'s. Refused.
        let lost = copy("lost.sqlite", false);
        let error = Journal::open(&lost).map(|_| ()).unwrap_err().to_string();
        assert!(error.contains("write-ahead log is missing"), "{error}");
        // Folded by another program, then resumed, killed and lost again: refused too (the
        // resume's own fold marks the main file as its state, not the last).
        let resumed = Journal::open(&folded).unwrap();
        resumed
            .transition("a", JobState::Created, Update::task("t1"))
            .unwrap();
        let again = dir.join("again.sqlite");
        std::fs::copy(&folded, &again).unwrap();
        let error = Journal::open(&again).map(|_| ()).unwrap_err().to_string();
        assert!(error.contains("write-ahead log is missing"), "{error}");
        drop(resumed);
        drop(killed);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A file under the journal's `-wal` name that is no write-ahead log (another file put
    /// there, the wrong one put back) is refused and left as it is: SQLite reads it as an
    /// empty log and deletes it, so a killed run's journal whose `-wal` was lost passed as one
    /// with its log beside it (its jobs read as never registered, and a run created them
    /// again), and the file was lost. An empty `-wal` (as a checkpoint leaves it) is a log.
    #[test]
    fn a_file_at_the_wal_name_that_is_no_write_ahead_log_is_refused_and_kept() {
        let dir = scratch("notwal");
        let path = dir.join("j.sqlite");
        // Still open, as after a kill: the job and its `creating` mark are in the `-wal` alone.
        let killed = killed_while_creating(&path);
        let stray = "{\"id\":\"a result, not a log\"}\n";
        let lost = dir.join("lost.sqlite");
        std::fs::copy(&path, &lost).unwrap();
        std::fs::write(wal_path(&lost), stray).unwrap();
        let error = Journal::open(&lost).map(|_| ()).unwrap_err().to_string();
        assert!(error.contains("no write-ahead log"), "{error}");
        assert!(error.contains("lost.sqlite-wal"), "{error}");
        assert_eq!(std::fs::read_to_string(wal_path(&lost)).unwrap(), stray);
        // Beside a journal closed by its run too: SQLite would delete it.
        let closed = dir.join("closed.sqlite");
        drop(Journal::open(&closed).unwrap());
        std::fs::write(wal_path(&closed), stray).unwrap();
        let error = Journal::open(&closed).map(|_| ()).unwrap_err().to_string();
        assert!(error.contains("no write-ahead log"), "{error}");
        assert_eq!(std::fs::read_to_string(wal_path(&closed)).unwrap(), stray);
        // Moved away, the journal closed by its run opens; the one whose log was lost is
        // refused for that.
        std::fs::remove_file(wal_path(&closed)).unwrap();
        drop(Journal::open(&closed).unwrap());
        std::fs::remove_file(wal_path(&lost)).unwrap();
        let error = Journal::open(&lost).map(|_| ()).unwrap_err().to_string();
        assert!(error.contains("write-ahead log is missing"), "{error}");
        // Beside a journal its run closed, an empty `-wal` is the log its close truncated.
        closed_opens_beside_an_empty_wal(&dir.join("empty.sqlite"));
        drop(killed);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An empty file put in place of the lost `-wal` of a journal its run left open is
    /// refused as a missing one: SQLite reads an empty `-wal` as no log, so the journal read
    /// as it was before the log's commits (its job never registered) and a run created the
    /// job again, billed twice. Beside a journal its run closed, an empty `-wal` is the log a
    /// checkpoint truncated, and the journal opens.
    #[test]
    fn an_empty_file_in_place_of_a_lost_wal_is_refused_as_a_missing_one() {
        let dir = scratch("emptywal");
        let path = dir.join("j.sqlite");
        let killed = killed_while_creating(&path);
        let lost = dir.join("lost.sqlite");
        std::fs::copy(&path, &lost).unwrap();
        std::fs::write(wal_path(&lost), "").unwrap();
        let error = Journal::open(&lost).map(|_| ()).unwrap_err().to_string();
        assert!(error.contains("write-ahead log is empty"), "{error}");
        assert!(error.contains("lost.sqlite-wal, which is empty"), "{error}");
        assert!(error.contains(CLOSE_BY_HAND), "{error}");
        // This journal counts its folds: the note on an earlier version's empty log is not
        // given.
        assert!(!error.contains("earlier kling-batch"), "{error}");
        // Refused again as empty: the refused open left the empty file where it was (SQLite's
        // close deleted it, and the next refusal said the log was missing).
        let error = Journal::open(&lost).map(|_| ()).unwrap_err().to_string();
        assert!(error.contains("write-ahead log is empty"), "{error}");
        assert_eq!(
            std::fs::metadata(wal_path(&lost)).map(|m| m.len()).ok(),
            Some(0)
        );
        // With its own log put back, it opens with the job's mark.
        std::fs::copy(wal_path(&path), wal_path(&lost)).unwrap();
        let journal = Journal::open(&lost).unwrap();
        assert_eq!(
            journal.record("a").unwrap().map(|r| r.state),
            Some(JobState::Creating)
        );
        drop(journal);
        // Closed by its run: an empty `-wal` beside it is no loss.
        closed_opens_beside_an_empty_wal(&dir.join("closed.sqlite"));
        drop(killed);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A run killed between a fold's checkpoint and its mark left every commit in the main
    /// file, and its resume opens the journal with every state: the checkpoint emptied the
    /// `-wal` (`TRUNCATE`), and the journal was refused as one whose lost log was replaced by
    /// an empty file. The log stays short: the commit after a fold cuts it to itself.
    #[test]
    fn a_run_killed_between_a_folds_checkpoint_and_its_mark_resumes() {
        let dir = scratch("foldcut");
        let path = dir.join("j.sqlite");
        let killed = killed_while_creating(&path);
        begin_fold(&killed.lock(), None).unwrap();
        checkpoint(&killed.lock()).unwrap();
        let copy = copied(&path, dir.join("copy.sqlite"), true);
        let journal = Journal::open(&copy).unwrap();
        assert_eq!(
            journal.record("a").unwrap().map(|r| r.state),
            Some(JobState::Creating)
        );
        drop(journal);
        // Grown past a fold's length, the log is folded and cut to the commit after it.
        mark(&killed.lock(), "filler", &"x".repeat(64 * 4096)).unwrap();
        let long = std::fs::metadata(wal_path(&path)).unwrap().len();
        killed.fold_past(long - 1);
        killed
            .transition("a", JobState::Created, Update::task("t1"))
            .unwrap();
        let short = std::fs::metadata(wal_path(&path)).unwrap().len();
        assert!(
            0 < short && short < 8 * (4096 + 24),
            "{long} -> {short} bytes"
        );
        drop(killed);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Over a long run (3000 jobs, each through `creating`, `created` and `succeeded`: 9000
    /// commits after the registration), the `-wal` stays bounded by the length past which a
    /// commit folds it and the commit after the fold, which cuts it to itself
    /// (`journal_size_limit = 0`); it is never empty while the run holds the journal.
    #[test]
    fn the_log_stays_bounded_over_a_long_run() {
        let dir = scratch("longrun");
        let path = dir.join("j.sqlite");
        let n = 3000;
        let text: String = (0..n)
            .map(|i| format!("{{\"id\":\"j{i}\",\"prompt\":\"p{i}\"}}\n"))
            .collect();
        let (jobs, _) = parse_jobs(&text);
        let journal = Journal::open(&path).unwrap();
        journal.register(&jobs).unwrap();
        let wal = || std::fs::metadata(wal_path(&path)).unwrap().len();
        let after_register = wal();
        let (mut longest, mut shortest) = (0, u64::MAX);
        for (i, job) in jobs.iter().enumerate() {
            for (state, update) in [
                (JobState::Creating, Update::default()),
                (JobState::Created, Update::task(format!("t{i}"))),
                (JobState::Succeeded, Update::default()),
            ] {
                journal.transition(&job.id, state, update).unwrap();
                longest = longest.max(wal());
                shortest = shortest.min(wal());
            }
        }
        let folds: u64 = journal
            .lock()
            .query_row("SELECT value FROM meta WHERE key = ?1", [FOLDS_KEY], |r| {
                r.get::<_, String>(0)
            })
            .unwrap()
            .parse()
            .unwrap();
        let sizes = format!(
            "registered {after_register}, longest {longest}, shortest {shortest}, at end {}, \
             {folds} folds",
            wal()
        );
        assert!(shortest > 0, "{sizes}");
        assert!(longest <= FOLD_PAST_BYTES + 16 * (4096 + 24), "{sizes}");
        // Cut after each fold: a log left at its longest would be folded by every commit.
        assert!(folds < 200, "{sizes}");
        drop(journal);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A checkpoint a reader kept from folding the whole log is an error, and the fold is not
    /// marked done: SQLite says so in the pragma's row (`busy`), not as an error, and the
    /// fold's mark `1` went to the log as if the main file held every commit.
    #[test]
    fn a_checkpoint_that_a_reader_cut_short_is_an_error() {
        let dir = scratch("busyfold");
        let path = dir.join("j.sqlite");
        let writer = Connection::open(&path).unwrap();
        writer.busy_timeout(std::time::Duration::ZERO).unwrap();
        writer.pragma_update(None, "journal_mode", "WAL").unwrap();
        writer
            .execute_batch("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);")
            .unwrap();
        let reader = Connection::open(&path).unwrap();
        reader
            .execute_batch("BEGIN; SELECT COUNT(*) FROM meta;")
            .unwrap();
        mark(&writer, "k", "v").unwrap();
        let error = fold(&writer, false).unwrap_err();
        assert_eq!(
            error.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy)
        );
        let folded: String = writer
            .query_row("SELECT value FROM meta WHERE key = ?1", [FOLDED_KEY], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(folded, "0");
        // The reader gone, the fold ends.
        reader.execute_batch("COMMIT;").unwrap();
        fold(&writer, false).unwrap();
        drop((reader, writer));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An empty `-wal` beside a journal an earlier kling-batch left open (no count of folds)
    /// is refused, and the refusal says that such a run, killed in the instant after its
    /// fold emptied the log, lost nothing: that case cannot be told from a lost log.
    #[test]
    fn an_empty_wal_beside_an_earlier_versions_journal_is_refused_saying_what_it_may_be() {
        let dir = scratch("emptywal-earlier");
        let path = dir.join("j.sqlite");
        let killed = killed_while_creating(&path);
        {
            // As an earlier version's fold left it: no count, the mark `0`, the log emptied.
            let conn = killed.lock();
            as_an_earlier_version_began_a_fold(&conn);
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap();
        }
        assert_eq!(std::fs::metadata(wal_path(&path)).unwrap().len(), 0);
        let copy = copied(&path, dir.join("copy.sqlite"), true);
        drop(killed);
        let error = Journal::open(&copy).map(|_| ()).unwrap_err().to_string();
        assert!(error.contains("write-ahead log is empty"), "{error}");
        assert!(error.contains("An earlier kling-batch"), "{error}");
        assert!(error.contains("nothing was lost"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A journal an earlier kling-batch left open (no count of folds, in the file or its log)
    /// with its `-wal` opens as itself, its last commit (in the log alone) read: the checks of
    /// the log's moment and journal pass it, as its id is the file's and a missing count skips.
    #[test]
    fn an_earlier_versions_journal_left_open_with_its_wal_opens() {
        let dir = scratch("earlier-open");
        let path = dir.join("j.sqlite");
        let killed = killed_while_creating(&path);
        {
            // As an earlier version left it: no count, a fold into the file, then a commit in
            // the log alone.
            let conn = killed.lock();
            as_an_earlier_version_began_a_fold(&conn);
            checkpoint(&conn).unwrap();
            mark(&conn, FOLDED_KEY, "1").unwrap();
        }
        killed
            .transition("a", JobState::Created, Update::task("t1"))
            .unwrap();
        assert_eq!(main_file(&path).folds, None);
        assert_eq!(main_file(&path).journal_id.as_deref(), Some(killed.id()));
        let copy = copied(&path, dir.join("copy.sqlite"), true);
        let id = killed.id().to_owned();
        drop(killed);
        let resumed = Journal::open(&copy).unwrap();
        assert_eq!(resumed.id(), id);
        let record = resumed.record("a").unwrap().unwrap();
        assert_eq!(record.state, JobState::Created);
        assert_eq!(record.task_id.as_deref(), Some("t1"));
        drop(resumed);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The count of folds and the journal id are read from the main file whatever bytes its
    /// path holds (ones SQLite's URI reads as its own: `?`, `#`, `%`, an escape that names
    /// another file; bytes that are not UTF-8), through a symbolic link too: a count or id
    /// not read skips the check of the `-wal`'s moment or journal.
    #[test]
    fn the_main_files_count_of_folds_is_read_whatever_its_path_holds() {
        use std::os::unix::ffi::OsStrExt as _;
        let dir = scratch("uri-bytes");
        let names: [&[u8]; 5] = [
            b"a?b#c.sqlite",
            b"100%41.sqlite",
            b"x\xff\xfe.sqlite",
            b"n\nl :.sqlite",
            b"~home",
        ];
        for name in names {
            let path = dir.join(std::ffi::OsStr::from_bytes(name));
            let id = Journal::open(&path).unwrap().id().to_owned();
            let expected = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap()
                .query_row("SELECT value FROM meta WHERE key = ?1", [FOLDS_KEY], |r| {
                    r.get::<_, String>(0)
                })
                .ok()
                .and_then(|count| count.parse().ok());
            assert!(expected.is_some());
            let expected = MainFile {
                folds: expected,
                journal_id: Some(id),
            };
            assert_eq!(main_file(&path), expected, "{}", path.display());
            let link = dir.join("link.sqlite");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&path, &link).unwrap();
            assert_eq!(
                main_file(&linked_file(&link)),
                expected,
                "{}",
                path.display()
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A `-wal` put back from an earlier moment beside a journal file that holds later
    /// folds of the log is refused, naming it: SQLite laid its older pages over the file's
    /// newer ones, and the journal read as the earlier moment (a task created since read as
    /// a create to look up again, or as never made). So is a `-wal` newer than its file (the
    /// two copied one after the other while the run folded its log). The pair as the run
    /// left it opens, one killed amid a fold (its count one ahead of the file's) included.
    #[test]
    fn a_wal_of_another_moment_than_its_journal_file_is_refused() {
        let dir = scratch("stalewal");
        // A name SQLite's URI would misread unless encoded: the check must read this file.
        let path = dir.join("j ?#%&=.sqlite");
        let (jobs, _) =
            parse_jobs("{\"id\":\"a\",\"prompt\":\"x\"}\n{\"id\":\"b\",\"prompt\":\"y\"}\n");
        let killed = Journal::open(&path).unwrap();
        killed.register(&jobs).unwrap();
        let early_file = dir.join("early-file");
        std::fs::copy(&path, &early_file).unwrap();
        killed
            .transition("a", JobState::Creating, Update::default())
            .unwrap();
        let early_wal = dir.join("early-wal");
        std::fs::copy(wal_path(&path), &early_wal).unwrap();
        // The run folds its log after `a` is created, then marks `b`: in the log alone.
        killed.fold_past(0);
        killed
            .transition("a", JobState::Created, Update::task("t1"))
            .unwrap();
        killed.fold_past(u64::MAX);
        killed
            .transition("b", JobState::Creating, Update::default())
            .unwrap();
        let pair = |name: &str, file: &Path, wal: &Path| {
            let copy = dir.join(name);
            std::fs::copy(file, &copy).unwrap();
            std::fs::copy(wal, wal_path(&copy)).unwrap();
            copy
        };
        let older = pair("older.sqlite", &path, &early_wal);
        let error = Journal::open(&older).map(|_| ()).unwrap_err().to_string();
        assert!(
            error.contains("log is older than the journal file"),
            "{error}"
        );
        assert!(error.contains("older.sqlite-wal"), "{error}");
        let newer = pair("newer.sqlite", &early_file, &wal_path(&path));
        let error = Journal::open(&newer).map(|_| ()).unwrap_err().to_string();
        assert!(
            error.contains("log is newer than the journal file"),
            "{error}"
        );
        // Refused again: nothing was written, both files left as they were.
        assert!(Journal::open(&older).is_err());
        assert_eq!(
            std::fs::read(wal_path(&older)).unwrap(),
            std::fs::read(&early_wal).unwrap()
        );
        let states = |path: &Path| {
            let journal = Journal::open(path).unwrap();
            ["a", "b"].map(|id| journal.record(id).unwrap().map(|r| r.state))
        };
        let whole = pair("whole.sqlite", &path, &wal_path(&path));
        assert_eq!(
            states(&whole),
            [Some(JobState::Created), Some(JobState::Creating)]
        );
        // Killed amid a fold, its first commit made and the log not yet folded: the log's
        // count is one ahead of the file's. A fold tried again after one that failed keeps
        // that count.
        begin_fold(&killed.lock(), None).unwrap();
        begin_fold(&killed.lock(), None).unwrap();
        let amid = pair("amid.sqlite", &path, &wal_path(&path));
        assert_eq!(
            states(&amid),
            [Some(JobState::Created), Some(JobState::Creating)]
        );
        assert_eq!(
            states(&amid),
            [Some(JobState::Created), Some(JobState::Creating)],
            "and again"
        );
        drop(killed);
        // The run's close folds its log too: a `-wal` of its last moments put back beside
        // the closed file is older than it. Killed amid the close, the pair opens.
        let run_to = |name: &str| {
            let run = dir.join(name);
            let journal = Journal::open(&run).unwrap();
            journal.register(&jobs).unwrap();
            journal
                .transition("a", JobState::Creating, Update::default())
                .unwrap();
            (run, journal)
        };
        let as_left = [Some(JobState::Creating), Some(JobState::Queued)];
        let (run, journal) = run_to("run.sqlite");
        let last_wal = dir.join("last-wal");
        std::fs::copy(wal_path(&run), &last_wal).unwrap();
        drop(journal);
        assert!(!wal_path(&run).exists());
        let closed = pair("closed.sqlite", &run, &last_wal);
        let error = Journal::open(&closed).map(|_| ()).unwrap_err().to_string();
        assert!(
            error.contains("log is older than the journal file"),
            "{error}"
        );
        // Moved away, the closed file opens alone.
        std::fs::remove_file(wal_path(&closed)).unwrap();
        assert_eq!(states(&closed), as_left);
        let (cut, journal) = run_to("cut.sqlite");
        begin_fold(&journal.lock(), Some(false)).unwrap();
        let amid_close = pair("amid-close.sqlite", &cut, &wal_path(&cut));
        assert_eq!(states(&amid_close), as_left);
        drop(journal);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A `-wal` of another journal beside a journal file is refused, naming both files and
    /// both journals, even when their counts of folds agree (two runs alike, each opened
    /// once): SQLite laid the other journal's pages over the file's, and the journal read as
    /// the other one's jobs. Both files are left as they were; the pair of one journal opens.
    #[test]
    fn a_wal_of_another_journal_is_refused_naming_both_files() {
        let dir = scratch("otherwal");
        let ours = killed_while_creating(&dir.join("ours.sqlite"));
        let theirs = killed_while_creating(&dir.join("theirs.sqlite"));
        let mixed = dir.join("mixed.sqlite");
        std::fs::copy(dir.join("ours.sqlite"), &mixed).unwrap();
        std::fs::copy(wal_path(&dir.join("theirs.sqlite")), wal_path(&mixed)).unwrap();
        let error = Journal::open(&mixed).map(|_| ()).unwrap_err().to_string();
        assert!(
            error.contains("its write-ahead log is another journal's"),
            "{error}"
        );
        assert!(error.contains("mixed.sqlite-wal"), "{error}");
        assert!(error.contains("mixed.sqlite (journal"), "{error}");
        assert!(
            error.contains(ours.id()) && error.contains(theirs.id()),
            "{error}"
        );
        // Nothing written: refused again, the other journal's log as it was.
        assert!(Journal::open(&mixed).is_err());
        assert_eq!(
            std::fs::read(wal_path(&mixed)).unwrap(),
            std::fs::read(wal_path(&dir.join("theirs.sqlite"))).unwrap()
        );
        // The pair of one journal opens, as that journal.
        let whole = dir.join("whole.sqlite");
        std::fs::copy(dir.join("ours.sqlite"), &whole).unwrap();
        std::fs::copy(wal_path(&dir.join("ours.sqlite")), wal_path(&whole)).unwrap();
        assert_eq!(Journal::open(&whole).unwrap().id(), ours.id());
        drop((ours, theirs));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A `-wal` of another database beside a journal file, one that reads as no journal
    /// through it, is refused as not the journal's, naming both files and the journal, and
    /// both files are left as they were: one that read as new (no table, or a journal's
    /// tables and no job) was taken for a new journal, laid over the old one's pages and
    /// folded into the file, its jobs created again; one of another program's tables was
    /// said to be no kling-batch journal, the file's path to blame.
    #[test]
    fn a_wal_of_another_database_is_refused_as_not_the_journals() {
        let dir = scratch("otherdb");
        let path = dir.join("j.sqlite");
        let id = killed_while_creating(&path).id().to_owned();
        assert!(!wal_path(&path).exists(), "closed: no -wal");
        let closed = std::fs::read(&path).unwrap();
        for (name, statements) in [
            ("empty", "PRAGMA user_version = 7;"),
            (
                "tables",
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
            ),
            (
                "foreign",
                "CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('x');",
            ),
        ] {
            let other = dir.join(format!("{name}.db"));
            let writer = Connection::open(&other).unwrap();
            writer.pragma_update(None, "journal_mode", "WAL").unwrap();
            writer.execute_batch(statements).unwrap();
            std::fs::copy(wal_path(&other), wal_path(&path)).unwrap();
            drop(writer);
            let theirs = std::fs::read(wal_path(&path)).unwrap();
            let error = Journal::open(&path).map(|_| ()).unwrap_err().to_string();
            assert!(
                error.contains("its write-ahead log is another database's"),
                "{name}: {error}"
            );
            assert!(error.contains("j.sqlite-wal"), "{name}: {error}");
            assert!(
                error.contains(&format!("j.sqlite (journal {id})")),
                "{name}: {error}"
            );
            assert_eq!(std::fs::read(&path).unwrap(), closed, "{name}");
            assert_eq!(std::fs::read(wal_path(&path)).unwrap(), theirs, "{name}");
            std::fs::remove_file(wal_path(&path)).unwrap();
        }
        // That -wal moved away, the journal opens alone, as itself.
        assert_eq!(Journal::open(&path).unwrap().id(), id);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The command a refusal gives names a relative journal whose name begins with `-` as
    /// `./-…`: `sqlite3 -j.sqlite …` takes the name for an option and refuses it.
    #[test]
    fn the_command_to_accept_a_journal_names_a_path_that_begins_with_a_dash_as_a_path() {
        let dir = scratch("dash");
        let path = dir.join("-j.sqlite");
        let id = Journal::open(&path).unwrap().id().to_owned();
        let word = shell_word(Path::new("-j.sqlite"));
        assert_eq!(word, "./-j.sqlite");
        assert_eq!(shell_word(Path::new("-a b")), "'./-a b'");
        let read = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "sqlite3 {word} \"SELECT value FROM meta WHERE key = 'journal_id'\""
            ))
            .current_dir(&dir)
            .output();
        // Without a sqlite3 shell here, the word alone is checked.
        if let Some(read) = read.ok().filter(|r| r.status.code() != Some(127)) {
            assert_eq!(String::from_utf8_lossy(&read.stdout).trim(), id, "{read:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The log is folded into the main file by the journal itself once it is longer than
    /// SQLite's automatic checkpoint lets it grow (which the journal turns off): it stays
    /// bounded, however many jobs a run records.
    #[test]
    fn the_write_ahead_log_stays_bounded() {
        let dir = scratch("bounded");
        let path = dir.join("j.sqlite");
        let text: String = (0..20_000)
            .map(|i| {
                format!("{{\"id\":\"job-{i}\",\"prompt\":\"a paper boat sailing, shot {i}\"}}\n")
            })
            .collect();
        let (jobs, _) = parse_jobs(&text);
        let journal = Journal::open(&path).unwrap();
        journal.register(&jobs).unwrap();
        let wal = std::fs::metadata(wal_path(&path)).map_or(0, |m| m.len());
        assert!(wal <= FOLD_PAST_BYTES, "{wal} bytes of log");
        drop(journal);
        let _ = std::fs::remove_dir_all(&dir);
    }

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

    /// `succeeded_at` is when the job first succeeded (a download's update later keeps it),
    /// none before; and it is read through the partial index, not by a scan of every job's
    /// transitions (once per gone-marked job of a resumed run).
    #[test]
    fn succeeded_at_is_the_first_success_read_by_its_index() {
        let journal = Journal::open_in_memory().unwrap();
        let (jobs, _) = parse_jobs("{\"id\":\"a\",\"prompt\":\"x\"}\n");
        journal.register(&jobs).unwrap();
        journal
            .transition("a", JobState::Created, Update::task("t1"))
            .unwrap();
        assert_eq!(journal.succeeded_at("a").unwrap(), None);
        let before = SystemTime::now();
        journal
            .transition("a", JobState::Succeeded, Update::default())
            .unwrap();
        let at = journal.succeeded_at("a").unwrap().expect("succeeded");
        assert!(at + std::time::Duration::from_secs(1) >= before, "{at:?}");
        journal
            .transition("a", JobState::Succeeded, Update::downloaded(vec![], None))
            .unwrap();
        assert_eq!(journal.succeeded_at("a").unwrap(), Some(at));
        let plan: Vec<String> = {
            let conn = journal.lock();
            let mut stmt = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {SELECT_SUCCEEDED_AT}"))
                .unwrap();
            stmt.query_map(params!["a"], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        assert!(
            plan.iter()
                .any(|step| step.contains("transitions_succeeded")),
            "{plan:?}"
        );
    }

    #[test]
    fn an_error_is_cleared_when_the_job_moves_on_and_kept_while_it_stays() {
        let journal = Journal::open_in_memory().unwrap();
        let (jobs, _) = parse_jobs("{\"id\":\"a\",\"prompt\":\"x\"}\n");
        journal.register(&jobs).unwrap();
        let refused = ErrorInfo::new(1102, "resource pack exhausted", None);
        journal
            .transition("a", JobState::Creating, Update::default())
            .unwrap();
        journal
            .transition("a", JobState::NotSubmitted, Update::error(refused.clone()))
            .unwrap();
        assert_eq!(journal.record("a").unwrap().unwrap().error, Some(refused));

        // A later run sends it again, and Kling creates it: the refusal is history.
        for state in [JobState::Queued, JobState::Creating] {
            journal.transition("a", state, Update::default()).unwrap();
        }
        journal
            .transition("a", JobState::Created, Update::task("t1"))
            .unwrap();
        let record = journal.record("a").unwrap().unwrap();
        assert_eq!((record.state, record.error), (JobState::Created, None));

        // An error recorded in a state stays while the job does; the next state clears it.
        let unfollowed = ErrorInfo::new(1101, "account in arrears", None);
        journal
            .transition("a", JobState::Created, Update::error(unfollowed.clone()))
            .unwrap();
        journal
            .transition("a", JobState::Created, Update::default())
            .unwrap();
        assert_eq!(
            journal.record("a").unwrap().unwrap().error,
            Some(unfollowed)
        );
        // A run that follows the task again clears it without a change of state (an error
        // given beside wins); a transition is recorded only for a change of state.
        journal
            .transition("a", JobState::Created, Update::error_cleared())
            .unwrap();
        let record = journal.record("a").unwrap().unwrap();
        assert_eq!((record.state, record.error), (JobState::Created, None));
        let again = ErrorInfo::new(1101, "account in arrears, again", None);
        let update = Update {
            error: Some(again.clone()),
            ..Update::error_cleared()
        };
        journal.transition("a", JobState::Created, update).unwrap();
        assert_eq!(journal.record("a").unwrap().unwrap().error, Some(again));
        assert_eq!(
            journal.transitions("a").unwrap(),
            [
                "queued",
                "creating",
                "not_submitted",
                "queued",
                "creating",
                "created"
            ]
        );
        journal
            .transition("a", JobState::Succeeded, Update::default())
            .unwrap();
        assert_eq!(journal.record("a").unwrap().unwrap().error, None);
    }

    /// A register looks at its stop every [`REGISTER_CHECK`] jobs, and a stop rolls it back:
    /// with 100 000 jobs it went on to the end (seconds) before a Ctrl-C was heard.
    #[test]
    fn a_stop_ends_a_register_early_and_writes_nothing() {
        let text: String = (0..10 * REGISTER_CHECK)
            .map(|i| format!("{{\"id\":\"j{i}\",\"prompt\":\"p\"}}\n"))
            .collect();
        let (jobs, _) = parse_jobs(&text);
        let journal = Journal::open_in_memory().unwrap();
        let looks = std::cell::Cell::new(0);
        // Stopped from the third look on (after 2 × REGISTER_CHECK jobs).
        let stopped = || {
            looks.set(looks.get() + 1);
            looks.get() >= 3
        };
        assert_eq!(
            journal.register_unless(&jobs, None, &stopped).unwrap(),
            None
        );
        assert_eq!(
            looks.get(),
            3,
            "it stopped at the first look after the stop"
        );
        assert_eq!(journal.records().unwrap(), [], "nothing was written");
        // Not stopped, it registers them all.
        let (records, _) = journal
            .register_unless(&jobs, None, &|| false)
            .unwrap()
            .unwrap();
        assert_eq!(records.len(), jobs.len());
    }

    /// A base URL is read as the stack reads it: scheme and host in any case, the default
    /// port written or not, a trailing `/`, user info and a query are one API; another port,
    /// scheme, host or path prefix is another. What is no `http(s)` URL with a host is none.
    #[test]
    fn an_api_origin_is_scheme_host_port_and_path_and_nothing_secret() {
        let origin = |url: &str| ApiOrigin::parse(url).map(|o| o.as_str().to_owned());
        let global = Some("https://api-singapore.klingai.com".to_owned());
        for same in [
            "https://api-singapore.klingai.com",
            " HTTPS://API-Singapore.KlingAI.com:443/ ",
            "https://api-singapore.klingai.com//",
            "https://api-singapore.klingai.com?sig=s3cret#part",
        ] {
            assert_eq!(origin(same), global, "{same}");
        }
        assert_eq!(
            origin("http://127.0.0.1:8080/kling/"),
            Some("http://127.0.0.1:8080/kling".to_owned())
        );
        assert_eq!(
            origin("http://localhost:80"),
            Some("http://localhost".to_owned())
        );
        assert_eq!(
            origin("http://[::1]:4000/"),
            Some("http://[::1]:4000".to_owned())
        );
        for other in [
            "https://api-singapore.klingai.com:8443",
            "http://api-singapore.klingai.com",
            "https://api-beijing.klingai.com",
            "https://api-singapore.klingai.com/kling-cn",
        ] {
            assert_ne!(origin(other), global, "{other}");
        }
        for none in [
            "",
            "not a url",
            "/v1/videos",
            "ftp://host",
            "https://",
            "https://kb:hunter2@api-singapore.klingai.com",
            "https://kb:443/hunter2@api-singapore.klingai.com",
        ] {
            assert_eq!(origin(none), None, "{none}");
        }
    }

    /// A journal records the base URL of the first run that binds it, and refuses another
    /// (writing nothing) while a job of it holds or may hold a task there, unless the caller
    /// names the recorded one as the one it replaces. One whose jobs were never sent, or that
    /// recorded none (an earlier version's), takes the run's.
    #[test]
    fn a_journal_refuses_a_base_url_other_than_the_one_its_jobs_were_sent_to() {
        let parse = |url: &str| ApiOrigin::parse(url).unwrap();
        let (a, b, c) = (
            parse("http://127.0.0.1:4001"),
            parse("http://127.0.0.1:4002/"),
            parse("http://127.0.0.1:4003"),
        );
        let journal = Journal::open_in_memory().unwrap();
        let (jobs, _) =
            parse_jobs("{\"id\":\"x\",\"prompt\":\"x\"}\n{\"id\":\"y\",\"prompt\":\"y\"}\n");
        journal.register(&jobs).unwrap();
        assert_eq!(journal.base_url().unwrap(), None);
        assert_eq!(
            journal.bind_base_url(&a, None).unwrap(),
            BaseUrlBinding::New
        );
        assert_eq!(journal.base_url().unwrap(), Some(a.clone()));
        assert_eq!(
            journal.bind_base_url(&a, Some(&c)).unwrap(),
            BaseUrlBinding::Same
        );
        // Nothing sent yet (queued, then refused before it was made): another takes its place.
        journal
            .transition("x", JobState::NotSubmitted, Update::default())
            .unwrap();
        assert_eq!(
            journal.bind_base_url(&b, None).unwrap(),
            BaseUrlBinding::Unsent { from: a.clone() }
        );
        assert_eq!(journal.base_url().unwrap(), Some(b.clone()));
        // A create of unknown outcome, then a task: refused, naming both, nothing written.
        for state in [JobState::Creating, JobState::Created, JobState::Failed] {
            journal.transition("x", state, Update::default()).unwrap();
            for moved_from in [None, Some(&c)] {
                let error = journal.bind_base_url(&a, moved_from).unwrap_err();
                let other = std::error::Error::source(&error)
                    .and_then(|e| e.downcast_ref::<OtherBaseUrl>())
                    .expect("the source names both base URLs");
                assert_eq!((other.recorded(), other.current()), (&b, &a));
                assert_eq!(other.moved_from(), moved_from);
                let text = error.to_string();
                assert!(text.contains("http://127.0.0.1:4001"), "{text}");
                assert!(text.contains("http://127.0.0.1:4002"), "{text}");
                assert!(text.contains("billed twice"), "{text}");
                assert_eq!(journal.base_url().unwrap(), Some(b.clone()), "{state}");
            }
        }
        // Named as the one it replaces: taken.
        assert_eq!(
            journal.bind_base_url(&c, Some(&b)).unwrap(),
            BaseUrlBinding::Moved { from: b.clone() }
        );
        assert_eq!(journal.base_url().unwrap(), Some(c.clone()));
        assert!(journal.bind_base_url(&b, Some(&b)).is_err());

        // A journal that recorded none, with a job created: an earlier version's, unchecked.
        let earlier = Journal::open_in_memory().unwrap();
        earlier.register(&jobs).unwrap();
        earlier
            .transition("y", JobState::Created, Update::task("t1"))
            .unwrap();
        assert_eq!(
            earlier.bind_base_url(&a, None).unwrap(),
            BaseUrlBinding::Unrecorded
        );
        assert_eq!(earlier.base_url().unwrap(), Some(a.clone()));
        assert!(earlier.bind_base_url(&b, None).is_err());
    }

    /// A journal whose jobs were sent resumes at its base URL however it is spelt (scheme and
    /// host in any case, the default port written or not, a trailing `/`), and is refused,
    /// writing nothing, at another host, port, scheme or path prefix, or at a path that
    /// differs in case or percent-encoding alone (a proxy may route those apart).
    #[test]
    fn a_journal_resumes_at_its_base_url_however_spelt_and_nowhere_else() {
        let parse = |url: &str| ApiOrigin::parse(url).unwrap();
        let cases: [(&str, &[&str], &[&str]); 2] = [
            (
                "https://API.example.com/",
                &[
                    "https://api.example.com",
                    "https://api.example.com:443",
                    "HTTPS://Api.Example.COM:443/",
                ],
                &[
                    "https://api.example.org",
                    "https://api.example.com:8443",
                    "http://api.example.com",
                    "https://api.example.com/v1",
                ],
            ),
            (
                "http://h:80/Kling/a%2Fb/",
                &["http://h/Kling/a%2Fb", "HTTP://H/Kling/a%2Fb/"],
                &[
                    "http://h/kling/a%2Fb",
                    "http://h/Kling/a%2fb",
                    "http://h/Kling/a/b",
                    "http://h/Kling",
                    "http://h:8080/Kling/a%2Fb",
                    "https://h/Kling/a%2Fb",
                ],
            ),
        ];
        let (jobs, _) = parse_jobs("{\"id\":\"x\",\"prompt\":\"x\"}\n");
        for (first, same, others) in cases {
            let journal = Journal::open_in_memory().unwrap();
            journal.register(&jobs).unwrap();
            journal.bind_base_url(&parse(first), None).unwrap();
            journal
                .transition("x", JobState::Created, Update::task("t1"))
                .unwrap();
            let recorded = journal.base_url().unwrap();
            for url in same {
                let bound = journal.bind_base_url(&parse(url), None);
                assert_eq!(bound.unwrap(), BaseUrlBinding::Same, "{first} then {url}");
            }
            for url in others {
                let error = journal.bind_base_url(&parse(url), None).unwrap_err();
                assert!(
                    std::error::Error::source(&error).is_some_and(|e| e.is::<OtherBaseUrl>()),
                    "{first} then {url}: {error}"
                );
                assert_eq!(journal.base_url().unwrap(), recorded, "{first} then {url}");
            }
        }
    }

    /// What a journal records, queried back: its base URL, every job's record and every
    /// job's transitions.
    type Recorded = (Option<ApiOrigin>, Vec<JobRecord>, Vec<Vec<String>>);

    fn recorded(journal: &Journal) -> Recorded {
        let records = journal.records().unwrap();
        let transitions = records
            .iter()
            .map(|r| journal.transitions(&r.job_id).unwrap())
            .collect();
        (journal.base_url().unwrap(), records, transitions)
    }

    /// Registering and binding in one transaction ([`Journal::register_at`]): refused for a
    /// job edited under its id, or for another base URL, or stopped while it registers, it
    /// writes nothing, the base URL it would have recorded (of a journal that recorded none,
    /// whose jobs were never sent, or named as moved) included. Binding before registering
    /// recorded the base URL of a resume then refused for its jobs.
    #[test]
    fn a_registration_refused_or_stopped_records_no_base_url() {
        let parse = |url: &str| ApiOrigin::parse(url).unwrap();
        let (a, b) = (
            parse("http://127.0.0.1:4001"),
            parse("http://127.0.0.1:4002"),
        );
        let (jobs, _) =
            parse_jobs("{\"id\":\"x\",\"prompt\":\"x\"}\n{\"id\":\"y\",\"prompt\":\"y\"}\n");
        let (edited, _) = parse_jobs(
            "{\"id\":\"x\",\"prompt\":\"x, but blue\"}\n{\"id\":\"z\",\"prompt\":\"z\"}\n",
        );
        let (more, _) = parse_jobs("{\"id\":\"z\",\"prompt\":\"z\"}\n");
        // An earlier version's (none recorded, a task made), one whose jobs were never sent
        // (at `a`), one with a task at `a` that this run says moved to `b`.
        let earlier = Journal::open_in_memory().unwrap();
        earlier.register(&jobs).unwrap();
        earlier
            .transition("x", JobState::Created, Update::task("t1"))
            .unwrap();
        let unsent = Journal::open_in_memory().unwrap();
        unsent.register(&jobs).unwrap();
        unsent.bind_base_url(&a, None).unwrap();
        let moved = Journal::open_in_memory().unwrap();
        moved.register(&jobs).unwrap();
        moved.bind_base_url(&a, None).unwrap();
        moved
            .transition("x", JobState::Created, Update::task("t1"))
            .unwrap();
        for (journal, moved_from) in [(&earlier, None), (&unsent, None), (&moved, Some(&a))] {
            let before = recorded(journal);
            let error = journal.register_at(&edited, &b, moved_from).unwrap_err();
            assert!(
                std::error::Error::source(&error).is_some_and(|e| e.is::<ChangedJobs>()),
                "{error}"
            );
            assert_eq!(recorded(journal), before, "{moved_from:?}");
            // Stopped while it registers: nothing either.
            assert_eq!(
                journal
                    .register_unless(&more, Some((&b, moved_from)), &|| true)
                    .unwrap(),
                None
            );
            assert_eq!(recorded(journal), before, "{moved_from:?}");
        }
        // Another base URL, with jobs of the file new: refused before any is registered.
        let before = recorded(&moved);
        let error = moved.register_at(&more, &b, None).unwrap_err();
        assert!(
            std::error::Error::source(&error).is_some_and(|e| e.is::<OtherBaseUrl>()),
            "{error}"
        );
        assert_eq!(recorded(&moved), before);
        // The control: the same jobs, unchanged, register and bind together.
        for (journal, moved_from, binding) in [
            (&earlier, None, BaseUrlBinding::Unrecorded),
            (&unsent, None, BaseUrlBinding::Unsent { from: a.clone() }),
            (&moved, Some(&a), BaseUrlBinding::Moved { from: a.clone() }),
        ] {
            let (records, bound) = journal.register_at(&more, &b, moved_from).unwrap();
            assert_eq!((records.len(), bound), (1, binding));
            assert_eq!(journal.base_url().unwrap().as_ref(), Some(&b));
            assert!(journal.record("z").unwrap().is_some());
            let (_, again) = journal.register_at(&jobs, &b, None).unwrap();
            assert_eq!(again, BaseUrlBinding::Same);
        }
        // A new journal records the base URL of its first registration.
        let fresh = Journal::open_in_memory().unwrap();
        let (_, bound) = fresh.register_at(&jobs, &a, None).unwrap();
        assert_eq!(bound, BaseUrlBinding::New);
        assert_eq!(fresh.base_url().unwrap().as_ref(), Some(&a));
    }

    /// A job `not_submitted` for `1103` (no permission), its create and then its lookup both
    /// refused so, may hold a task: an earlier attempt of that create, its answer lost, may
    /// have made one before the permission was taken away (the run leaves it to Kling, which
    /// refuses the same external id sent again there as a duplicate). Another base URL has no
    /// such guard, and created the job again: such a journal is not one whose jobs were never
    /// sent. Another code `not_submitted` (`1002`, a stop) is.
    #[test]
    fn a_job_refused_1103_after_a_lost_answer_keeps_the_journal_at_its_base_url() {
        let parse = |url: &str| ApiOrigin::parse(url).unwrap();
        let (a, b) = (
            parse("http://127.0.0.1:4001"),
            parse("http://127.0.0.1:4002"),
        );
        let (jobs, _) = parse_jobs("{\"id\":\"x\",\"prompt\":\"x\"}\n");
        for (code, refused) in [(1103, true), (1002, false), (0, false)] {
            let journal = Journal::open_in_memory().unwrap();
            journal.register(&jobs).unwrap();
            journal.bind_base_url(&a, None).unwrap();
            journal
                .transition("x", JobState::Creating, Update::default())
                .unwrap();
            journal
                .transition(
                    "x",
                    JobState::NotSubmitted,
                    Update::error(ErrorInfo::new(code, "refused", None)),
                )
                .unwrap();
            // The check alone finds the same, and writes nothing.
            let checked = journal.check_base_url(&b, None);
            assert_eq!(checked.is_err(), refused, "{code}: {checked:?}");
            assert_eq!(journal.base_url().unwrap().as_ref(), Some(&a), "{code}");
            let bound = journal.bind_base_url(&b, None);
            assert_eq!(bound.is_err(), refused, "{code}: {bound:?}");
            let expected = if refused { &a } else { &b };
            assert_eq!(
                journal.base_url().unwrap().as_ref(),
                Some(expected),
                "{code}"
            );
        }
    }

    #[test]
    fn a_fresh_journal_gives_fresh_external_ids() {
        let a = Journal::open_in_memory().unwrap();
        let b = Journal::open_in_memory().unwrap();
        assert_ne!(a.external_id_for("job"), b.external_id_for("job"));
        assert_eq!(a.external_id_for("job"), a.external_id_for("job"));
        assert!(a.external_id_for("job").starts_with("kb-"));
    }

    #[test]
    fn a_job_changed_under_its_id_is_refused_and_nothing_is_written() {
        let journal = Journal::open_in_memory().unwrap();
        let (jobs, _) =
            parse_jobs("{\"id\":\"a\",\"prompt\":\"x\"}\n{\"id\":\"b\",\"prompt\":\"y\"}\n");
        journal.register(&jobs).unwrap();
        journal
            .transition("a", JobState::Succeeded, Update::task("t1"))
            .unwrap();

        // Keys reordered and lines moved: the same jobs, which take their new lines.
        let (same, _) = parse_jobs(
            "# moved\n{\"prompt\":\"y\",\"id\":\"b\"}\n{\"prompt\":\"x\",\"id\":\"a\"}\n",
        );
        let records = journal.register(&same).unwrap();
        assert_eq!(records[1].state, JobState::Succeeded);
        assert_eq!(
            journal.records().unwrap()[0].job_id,
            "b",
            "records follow the file's order"
        );

        // `a` edited, a new job `c` beside it: refused as a whole, naming `a`.
        let (edited, _) = parse_jobs(
            "{\"id\":\"a\",\"prompt\":\"x, but blue\"}\n{\"id\":\"c\",\"prompt\":\"z\"}\n",
        );
        let error = journal.register(&edited).unwrap_err();
        let changed = std::error::Error::source(&error)
            .and_then(|e| e.downcast_ref::<ChangedJobs>())
            .expect("the source names the changed jobs");
        assert_eq!(changed.ids().collect::<Vec<_>>(), ["a"]);
        assert!(error.to_string().contains("`a` (line 1)"), "{error}");
        assert_eq!(journal.record("c").unwrap(), None, "nothing was written");
        let a = journal.record("a").unwrap().unwrap();
        assert_eq!(
            (a.state, a.task_id.as_deref()),
            (JobState::Succeeded, Some("t1"))
        );

        // Another endpoint is another job too.
        let (moved, _) = parse_jobs(
            "{\"id\":\"b\",\"prompt\":\"y\",\"endpoint\":\"/text-to-video/kling-3.0\"}\n",
        );
        assert!(journal.register(&moved).is_err());
    }

    #[test]
    fn a_journal_of_line_ids_is_taken_over_by_the_jobs_of_the_same_content() {
        // A journal as the versions that named jobs `line-N` wrote it (no `download_error`
        // column): line 1 succeeded, line 2 running, two identical jobs on lines 3 and 4.
        let dir = std::env::temp_dir().join(format!("kb-legacy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("old.sqlite");
        let _ = std::fs::remove_file(&path);
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 INSERT INTO meta VALUES ('journal_id', 'feedfacefeedface');
                 CREATE TABLE jobs (job_id TEXT PRIMARY KEY, line INTEGER NOT NULL,
                    endpoint TEXT NOT NULL, body TEXT NOT NULL, external_id TEXT NOT NULL UNIQUE,
                    state TEXT NOT NULL, task_id TEXT, status TEXT,
                    urls TEXT NOT NULL DEFAULT '[]', files TEXT NOT NULL DEFAULT '[]',
                    error TEXT, updated_at REAL NOT NULL);
                 CREATE TABLE transitions (seq INTEGER PRIMARY KEY AUTOINCREMENT,
                    job_id TEXT NOT NULL, from_state TEXT, to_state TEXT NOT NULL, at REAL NOT NULL);
                 INSERT INTO jobs (job_id, line, endpoint, body, external_id, state, task_id, updated_at) VALUES
                    ('line-1', 1, '/v1/videos/text2video', '{\"prompt\":\"a\"}', 'kb-1', 'succeeded', 't1', 0),
                    ('line-2', 2, '/v1/videos/text2video', '{\"prompt\":\"b\"}', 'kb-2', 'created', 't2', 0),
                    ('line-3', 3, '/v1/videos/text2video', '{\"prompt\":\"c\"}', 'kb-3', 'created', 't3', 0),
                    ('line-4', 4, '/v1/videos/text2video', '{\"prompt\":\"c\"}', 'kb-4', 'queued', NULL, 0);
                 UPDATE jobs SET error = '{\"code\":1101,\"message\":\"arrears\"}'
                    WHERE job_id = 'line-2';
                 INSERT INTO transitions (job_id, from_state, to_state, at) VALUES
                    ('line-1', NULL, 'queued', 0), ('line-1', 'queued', 'succeeded', 0);",
            )
            .unwrap();
        }
        // The same file with a comment added on top.
        let (jobs, _) = parse_jobs(
            "# added\n{\"prompt\":\"a\"}\n{\"prompt\":\"b\"}\n{\"prompt\":\"c\"}\n{\"prompt\":\"c\"}\n",
        );
        let journal = Journal::open(&path).unwrap();
        let records = journal.register(&jobs).unwrap();
        let seen: Vec<(JobState, Option<&str>, &str)> = records
            .iter()
            .map(|r| (r.state, r.task_id.as_deref(), r.external_id.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                (JobState::Succeeded, Some("t1"), "kb-1"),
                (JobState::Created, Some("t2"), "kb-2"),
                (JobState::Created, Some("t3"), "kb-3"),
                (JobState::Queued, None, "kb-4"),
            ]
        );
        assert_eq!(records[0].job_id, jobs[0].id);
        assert_eq!(
            journal.transitions(&jobs[0].id).unwrap(),
            ["queued", "succeeded"]
        );
        assert_eq!(journal.records().unwrap().len(), 4, "no row was added");
        // The added column works on the old file.
        journal
            .transition(
                &jobs[0].id,
                JobState::Succeeded,
                Update::downloaded(Vec::new(), Some(ErrorInfo::new(0, "x", None))),
            )
            .unwrap();
        assert!(
            journal
                .record(&jobs[0].id)
                .unwrap()
                .unwrap()
                .download_error
                .is_some()
        );
        // An error of the old file is read, and cleared as in a new one.
        let error = |id: &str| journal.record(id).unwrap().unwrap().error;
        assert_eq!(
            error(&jobs[1].id),
            Some(ErrorInfo::new(1101, "arrears", None))
        );
        journal
            .transition(&jobs[1].id, JobState::Created, Update::error_cleared())
            .unwrap();
        assert_eq!(error(&jobs[1].id), None);
        drop(journal);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
