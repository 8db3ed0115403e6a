//! The run: create every job through the stack, follow each task to its end, record every
//! step in the journal, and resume where a killed run stopped.
//!
//! - **Creates** go one at a time per pool: a create waits in the task-slots layer for a free
//!   slot, so one waiting create per pool keeps the pool full, and no second create can be on
//!   the wire when Kling answers `1102` (the run then stops creating and reports the rest as
//!   not submitted).
//! - **A refused create** is looked up by its external id before the job is settled (a
//!   refusal such as `1201` may be Kling's answer to an id it already has), unless the refusal
//!   proves nothing was made and no lookup could say otherwise: a refusal of the account or
//!   its credentials (`1000`–`1002`, `1100`–`1102`, `1304`, and any other final refusal sent
//!   with HTTP 429), which also halts the run (the job and every job not yet created are
//!   reported `not_submitted` with its code), or an answer that is no Kling envelope at all
//!   (a proxy's `404`/`413` page), which leaves the job `not_submitted` saying so. So does a
//!   create refused `1103` (no permission for this API or model) whose lookup is refused
//!   `1103` too, here or on resume: without the permission nothing was created. The next run
//!   sends such jobs again.
//! - **Resume**: jobs whose create may have been sent (`creating`) are looked up by their
//!   external id first (`GET {endpoint}/{id}` or `GET /tasks?external_task_ids=`); jobs
//!   already created are followed (in one batch), after the slots they hold were adopted
//!   ([`SlotsHandle::reconcile`](kling_concurrency::SlotsHandle::reconcile)). Nothing is created
//!   twice. A listing or lookup refused for the account or its credentials halts the run:
//!   the remaining lookups would be refused the same way, and the jobs stay `creating` for a
//!   later run. So does a stop, at once, even in the middle of a listing or a lookup.
//! - **Follow**: kling-tower's [`Follower`] with the run's [`FollowPolicy`]; callbacks (when a
//!   listener is configured) end a follow at once. A follow that ends with a Kling error
//!   fails the job only when the error is about the task: `1203` (Kling does not know the
//!   task). Any other code — auth (`1000`–`1004`), account (`1100`–`1103`), IP whitelist
//!   (`1304`), … — says nothing about the task, which may still run and be billed: the job
//!   stays `created` with the error recorded, and the next run follows it again. So does a
//!   follow that ends without a Kling code (its deadline passed, say): the job's error names
//!   the task and says that a run on the same journal follows it. A run that follows such a
//!   task again clears that error first, so a stop before the follow ends does not report an
//!   earlier run's end as its own.
//! - **A success without results** (a signed callback that carries the status alone, URLs of
//!   a shape kling-core leaves out) is not taken as it is: the task is queried once for its
//!   whole report before its job is recorded. Still without a result URL, the job is
//!   `succeeded` with no URLs and an error saying so (the summary counts it apart from `ok`),
//!   and each later run asks once more, new-style tasks many to a `GET /tasks` query.
//! - **Downloads** (`--download`) each have a connect, an idle and an overall timeout
//!   ([`DownloadTimeouts`]); a file that runs out of time is left for the next run and the
//!   job's `download_error` says why, so one stalled result server never holds the run. At
//!   most [`RunOptions::max_downloads`] jobs download at once (8 by default), whether their
//!   tasks end in this run or a resumed run fetches what an earlier one left missing.
//! - **Stop** (Ctrl-C): the stack's drain gate closes (no create leaves any more), creates in
//!   flight get a short grace to be recorded, and the run ends; a later run picks up. The jobs
//!   left are marked `not_submitted` (so are they after a halt) a few hundred to a journal
//!   transaction, the run's other work going on between two.
//! - **A journal write that fails** once the run has begun sending (marking a create,
//!   recording a task's end or a download's files) stops the run the same way, with
//!   [`RunError::Sent`]: a run on the same journal looks up, follows or fetches what this one
//!   could not record, and creates nothing twice.
//! - **A panic** (a bug) in a job's create, follow or download is caught: one error on stderr,
//!   and the job's error names it, the job kept where it stands (`creating`, `created`:
//!   looked up or followed by the next run; one not yet sent is `not_submitted`), and the
//!   other jobs go on.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use http::Request;
use http_body_util::Full;
use kling_concurrency::Reconcile;
use kling_core::error::ApiError;
use kling_core::{ApiGeneration, BoxError, Code, Outcome, PeekBody as _, TaskReport, TaskStatus};
use kling_retry::Lookup;
use kling_tower::error::FollowError;
use kling_tower::{FollowPolicy, Follower, TaskRef};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt as _;

use crate::download::{self, DownloadTimeouts};
use crate::error::{ChangedJobs, JournalError, RunError, SetupError, redacted_url};
use crate::jobs::Job;
use crate::journal::{ErrorInfo, JobRecord, JobState, Journal, Update};
use crate::progress::Progress;
use crate::stack::{BatchService, Stack};

/// What a run does besides creating and following.
///
/// Its `Debug` shows the callback URL as `scheme://host[:port]/path`: its user info and query
/// may hold a password or a token (`<redacted>` when it is no URL that can be read).
#[derive(Clone)]
#[non_exhaustive]
pub struct RunOptions {
    /// The URL Kling posts task changes to (a listener must answer there).
    pub callback_url: Option<String>,
    /// Where result files are saved, if anywhere.
    pub download_dir: Option<PathBuf>,
    /// How long each result file may take.
    pub download_timeouts: DownloadTimeouts,
    /// How many jobs may download their result files at once.
    pub max_downloads: usize,
    /// How tasks are queried.
    pub follow: FollowPolicy,
    /// How long creates in flight may still finish after a stop.
    pub stop_grace: Duration,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field(
                "callback_url",
                &self.callback_url.as_deref().map(redacted_url),
            )
            .field("download_dir", &self.download_dir)
            .field("download_timeouts", &self.download_timeouts)
            .field("max_downloads", &self.max_downloads)
            .field("follow", &self.follow)
            .field("stop_grace", &self.stop_grace)
            .finish()
    }
}

impl RunOptions {
    /// No callbacks, no downloads (with the default [`DownloadTimeouts`] and at most
    /// [`MAX_IN_FLIGHT`](download::MAX_IN_FLIGHT) jobs downloading at once when set), `follow`
    /// as given, a 2 s grace.
    pub fn new(follow: FollowPolicy) -> Self {
        RunOptions {
            callback_url: None,
            download_dir: None,
            download_timeouts: DownloadTimeouts::default(),
            max_downloads: download::MAX_IN_FLIGHT,
            follow,
            stop_grace: Duration::from_secs(2),
        }
    }

    /// Sets the callback URL sent with each create.
    pub fn callback_url(mut self, url: impl Into<String>) -> Self {
        self.callback_url = Some(url.into());
        self
    }

    /// Saves result files under `dir`.
    pub fn download_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.download_dir = Some(dir.into());
        self
    }

    /// Sets how long each result file may take.
    pub fn download_timeouts(mut self, timeouts: DownloadTimeouts) -> Self {
        self.download_timeouts = timeouts;
        self
    }

    /// Sets how many jobs may download their result files at once (at least 1), for fresh
    /// and resumed runs alike; the others wait their turn.
    pub fn max_downloads(mut self, max: std::num::NonZeroUsize) -> Self {
        self.max_downloads = max.get();
        self
    }
}

/// The follow policy of a run without callbacks, at `speed`: first query after 10 s, then
/// every quarter of the task's age between 5 s and 30 s (API time), so the five tasks of a Pro
/// account cost about one query every four seconds while a task's end is noticed within a
/// quarter of its age.
pub fn default_follow_policy(speed: f64) -> FollowPolicy {
    FollowPolicy::new()
        .first_query(Duration::from_secs(10))
        .interval_bounds(Duration::from_secs(5), Duration::from_secs(30))
        .age_factor(0.25)
        .speed(speed)
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct RunReport {
    /// Every job's final record, in line order.
    pub records: Vec<JobRecord>,
    /// From the first create to the last task's end.
    pub makespan: Duration,
    /// Per pool, the seconds tasks ran as this run saw them (create answer to end noticed).
    pub observed_task_seconds: BTreeMap<String, f64>,
    /// Creates sent in this run.
    pub creates: u64,
    /// Whether the run was stopped before it finished.
    pub interrupted: bool,
    /// Whether result files were to be saved ([`RunOptions::download_dir`]).
    pub downloading: bool,
}

/// A stop signal: `true` once the run should stop creating.
pub type StopSignal = watch::Receiver<bool>;

/// One run of a batch. See the [module docs](self).
///
/// Its `Debug` shows the stack, the journal, the options (the callback URL without user info
/// and query, see [`RunOptions`]), and the run's counts; not the tasks it follows.
pub struct Engine {
    stack: Stack,
    journal: Journal,
    /// Follows every task; the follows of new-style tasks share batch `GET /tasks?task_ids=…`
    /// queries.
    follower: Follower<BatchService>,
    options: RunOptions,
    progress: Arc<Progress>,
    halted: AtomicBool,
    halt_reason: Mutex<Option<ErrorInfo>>,
    tasks: Mutex<HashMap<String, Running>>,
    lifetimes: Mutex<BTreeMap<String, f64>>,
    creates: std::sync::atomic::AtomicU64,
    last_end: Mutex<Option<Instant>>,
    /// The downloads' client, built at the first download.
    download_client: std::sync::OnceLock<Result<kling_tower::client::HttpsClient, String>>,
    /// Turns to download: [`RunOptions::max_downloads`] jobs at a time.
    downloads: tokio::sync::Semaphore,
    /// Tests: the (job, step) pairs that panic ([`Engine::test_panic`]).
    #[cfg(test)]
    test_panics: Mutex<Vec<(String, &'static str)>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("stack", &self.stack)
            .field("journal", &self.journal)
            .field("options", &self.options)
            .field("progress", &self.progress)
            .field("halted", &self.halted)
            .field("creates", &self.creates)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug)]
struct Running {
    /// `{create path}/` for legacy tasks; `None` for new-style ones (`GET /tasks`).
    legacy_path: Option<String>,
    pool: String,
    created: Instant,
}

/// What a run must do, from the journal's records, before it sends anything.
struct Plan<'a> {
    queued: Vec<&'a Job>,
    /// Creates of unknown outcome, with their external ids and recorded states, and whether
    /// Kling refused the create `1103` (no permission for this API or model).
    creating: Vec<(&'a Job, String, JobState, bool)>,
    /// Tasks created by an earlier run.
    created: Vec<(&'a Job, String)>,
    /// The jobs of `created` whose error tells how an earlier run's follow of their task
    /// ended (past its deadline, refused `1101`, …): cleared once this run follows them again.
    stale_errors: Vec<&'a Job>,
    /// Succeeded jobs with a result file missing: task, URLs, recorded files.
    undownloaded: Vec<(&'a Job, String, Vec<String>, Vec<String>)>,
    /// Succeeded jobs whose task named no result URL kling-batch could read, with the task:
    /// asked for their results once more.
    no_results: Vec<(&'a Job, String)>,
}

/// A succeeded job of an earlier run with result files missing: its id, task, URLs and
/// recorded files.
type Missing = (String, String, Vec<String>, Vec<String>);

/// A succeeded job of an earlier run without a result URL: its id, its create path if its
/// task is a legacy one, and its task.
type NoResult = (String, Option<String>, String);

/// A created task for the coordinator to follow.
struct Created {
    job_id: String,
    task: TaskRef,
}

impl Engine {
    /// An engine over `stack`, recording in `journal`.
    pub fn new(
        stack: Stack,
        journal: Journal,
        options: RunOptions,
    ) -> Result<Arc<Engine>, kling_tower::error::ConfigError> {
        let follower = stack.follower(options.follow.clone())?;
        let downloads = tokio::sync::Semaphore::new(options.max_downloads.max(1));
        Ok(Arc::new(Engine {
            stack,
            journal,
            follower,
            options,
            progress: Arc::new(Progress::default()),
            halted: AtomicBool::new(false),
            halt_reason: Mutex::new(None),
            tasks: Mutex::new(HashMap::new()),
            lifetimes: Mutex::new(BTreeMap::new()),
            creates: std::sync::atomic::AtomicU64::new(0),
            last_end: Mutex::new(None),
            download_client: std::sync::OnceLock::new(),
            downloads,
            #[cfg(test)]
            test_panics: Mutex::new(Vec::new()),
        }))
    }

    /// Tests: panics at `step` of job `job_id`, if the test asked for it: `create` (before the
    /// job is marked `creating`), `send` (once it is, before the create is sent), `finish` (at
    /// its follow's end), `download` (before its files are fetched).
    #[cfg(test)]
    fn test_panic(&self, job_id: &str, step: &str) {
        let asked = self
            .test_panics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(job, at)| job == job_id && *at == step);
        assert!(!asked, "test panic at the {step} of {job_id}");
    }

    /// The live job counts.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// The stack.
    pub fn stack(&self) -> &Stack {
        &self.stack
    }

    /// The journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    fn move_to(
        &self,
        job_id: &str,
        from: JobState,
        to: JobState,
        update: Update,
    ) -> Result<(), JournalError> {
        self.journal.transition(job_id, to, update)?;
        self.progress.moved(from, to);
        Ok(())
    }

    /// Runs `jobs` to the end (or until `stop`), and returns what happened.
    ///
    /// # Errors
    ///
    /// [`RunError::Setup`] when the run is refused before it sends anything: a job edited
    /// under its id (with [`ChangedJobs`] in its text), or a journal that cannot be read or
    /// written at the start. [`RunError::Sent`] when a journal write fails once the run has
    /// begun sending (a create's mark, a task's end, a download's files): the run stops at once
    /// (no create leaves after it), and a run on the same journal looks up whatever this one
    /// may have created, and follows or fetches what it could not record.
    pub async fn run(
        self: &Arc<Self>,
        jobs: &[Job],
        stop: StopSignal,
    ) -> Result<RunReport, RunError> {
        let plan = self.plan(jobs, &|| *stop.borrow()).map_err(|e| {
            // A job edited under its id: the jobs file is at fault, not the journal.
            RunError::Setup(
                match std::error::Error::source(&e).and_then(|s| s.downcast_ref::<ChangedJobs>()) {
                    Some(changed) => SetupError::new("JOBS", changed.to_string()),
                    None => SetupError::new("journal", e.to_string()),
                },
            )
        })?;
        let Some(plan) = plan else {
            // Stopped while the jobs were registered (nothing written), or while those an
            // earlier run left `not_submitted` were queued again (some are `queued`, the
            // others not yet): nothing was sent. The results are the journal's.
            let ids: std::collections::HashSet<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
            let mut records = self
                .journal
                .records()
                .map_err(|e| RunError::Setup(SetupError::new("journal", e.to_string())))?;
            records.retain(|r| ids.contains(r.job_id.as_str()));
            return Ok(RunReport {
                records,
                interrupted: true,
                downloading: self.options.download_dir.is_some(),
                ..RunReport::default()
            });
        };
        self.carry_out(jobs, plan, stop)
            .await
            .map_err(RunError::Sent)
    }

    /// Registers `jobs` in the journal and sorts them by what the run must do first; sends
    /// nothing. `None` when `stopped` says so while the jobs are registered (nothing is
    /// written) or while the jobs an earlier run left `not_submitted` are queued again: it is
    /// asked before each [`REQUEUE_CHUNK`] of them, each chunk one transaction, so the jobs
    /// queued again so far are `queued` and the others still `not_submitted`, and a later run
    /// sends both.
    fn plan<'a>(
        &self,
        jobs: &'a [Job],
        stopped: &dyn Fn() -> bool,
    ) -> Result<Option<Plan<'a>>, JournalError> {
        let Some(records) = self.journal.register_unless(jobs, stopped)? else {
            return Ok(None);
        };
        let jobs_by_id: HashMap<&str, &Job> = jobs.iter().map(|j| (j.id.as_str(), j)).collect();
        let mut queued: Vec<&Job> = Vec::new();
        let mut creating: Vec<(&Job, String, JobState, bool)> = Vec::new();
        let mut created: Vec<(&Job, String)> = Vec::new();
        let mut stale_errors: Vec<&Job> = Vec::new();
        let mut undownloaded: Vec<(&Job, String, Vec<String>, Vec<String>)> = Vec::new();
        let mut no_results: Vec<(&Job, String)> = Vec::new();
        // Never created: this run tries again (queued again below).
        let mut again: Vec<&Job> = Vec::new();
        for record in &records {
            let job = jobs_by_id[record.job_id.as_str()];
            self.progress.enter(record.state);
            match record.state {
                JobState::Queued => queued.push(job),
                JobState::NotSubmitted => again.push(job),
                JobState::Creating => {
                    let refused = record
                        .error
                        .as_ref()
                        .is_some_and(|e| e.code == Code::NoPermission.as_i64());
                    creating.push((job, record.external_id.clone(), JobState::Creating, refused));
                }
                JobState::Created => match &record.task_id {
                    Some(task) => {
                        if record.error.is_some() {
                            stale_errors.push(job);
                        }
                        created.push((job, task.clone()));
                    }
                    None => {
                        creating.push((job, record.external_id.clone(), JobState::Created, false));
                    }
                },
                JobState::Succeeded => {
                    // No result URL to fetch or report (a report kling-batch could not read
                    // whole, a callback that carried the status alone): asked again.
                    if record.urls.is_empty()
                        && let Some(task) = &record.task_id
                    {
                        no_results.push((job, task.clone()));
                    }
                    // A file recorded under another `--download` DIR is not in this one.
                    let elsewhere = |f: &str| {
                        self.options
                            .download_dir
                            .as_ref()
                            .is_some_and(|dir| !std::path::Path::new(f).starts_with(dir))
                    };
                    let missing = record.files.len() < record.urls.len()
                        || record
                            .files
                            .iter()
                            .any(|f| !std::path::Path::new(f).exists() || elsewhere(f));
                    if self.options.download_dir.is_some() && missing {
                        let task = record.task_id.as_ref().unwrap_or(&record.external_id);
                        undownloaded.push((
                            job,
                            task.clone(),
                            record.urls.clone(),
                            record.files.clone(),
                        ));
                    }
                }
                JobState::Failed => {}
            }
        }
        // Many at a time: after a `1102` or a stop, most of a large file is `not_submitted`,
        // and one transaction each (one write to the disk) held a run of 100 000 such jobs
        // for minutes before it sent anything, deaf to Ctrl-C. A stop is heard between two.
        for chunk in again.chunks(REQUEUE_CHUNK) {
            if stopped() {
                return Ok(None);
            }
            let ids: Vec<&str> = chunk.iter().map(|job| job.id.as_str()).collect();
            self.journal
                .transition_all(&ids, JobState::Queued, &Update::default())?;
            for _ in chunk {
                self.progress
                    .moved(JobState::NotSubmitted, JobState::Queued);
            }
        }
        queued.extend(again);

        Ok(Some(Plan {
            queued,
            creating,
            created,
            stale_errors,
            undownloaded,
            no_results,
        }))
    }

    /// The run once planned: everything that sends.
    async fn carry_out(
        self: &Arc<Self>,
        jobs: &[Job],
        plan: Plan<'_>,
        mut stop: StopSignal,
    ) -> Result<RunReport, JournalError> {
        let Plan {
            mut queued,
            creating,
            mut created,
            mut stale_errors,
            undownloaded,
            no_results,
        } = plan;
        // Resume: adopt the slots of tasks still running on the server, then settle every
        // create whose outcome is unknown by looking it up, before anything is created. A
        // stop ends this at once (with nothing answering, each call is retried for half a
        // minute and more): the jobs not looked up stay unknown until a later run.
        let stopped = until_stopped(stop.clone());
        tokio::pin!(stopped);
        if !creating.is_empty() || !created.is_empty() {
            tokio::select! {
                biased;
                () = &mut stopped => {}
                () = self.adopt_slots(jobs) => {}
            }
        }
        for (job, external_id, state, refused_permission) in creating {
            if self.halted.load(Ordering::SeqCst) || *stop.borrow() {
                // Refused for the account, or stopped: the rest stay unknown until a later run.
                break;
            }
            let found = tokio::select! {
                biased;
                () = &mut stopped => break,
                found = self.lookup(job, &external_id) => found,
            };
            match found {
                Ok(Some(report)) => {
                    self.move_to(
                        &job.id,
                        state,
                        JobState::Created,
                        Update::task(report.id.clone()),
                    )?;
                    if state == JobState::Created {
                        // Still `created`: its error, if any, is an earlier run's.
                        stale_errors.push(job);
                    }
                    created.push((job, report.id));
                }
                Ok(None) => {
                    self.move_to(&job.id, state, JobState::Queued, Update::default())?;
                    queued.push(job);
                }
                Err(e) => {
                    let failure = failure_of(&*e);
                    if refused_permission && failure.code == Some(Code::NoPermission) {
                        // Its create and its lookup refused `1103`: nothing was made (see
                        // `create_one`). Not sent by this run: it would be refused the same.
                        tracing::warn!(job = %job.id, error = %e, "the create and the lookup were refused for want of permission; not submitted");
                        let recorded = self.journal.record(&job.id)?.and_then(|r| r.error);
                        let info = recorded.unwrap_or_else(|| failure.info.clone());
                        self.move_to(&job.id, state, JobState::NotSubmitted, Update::error(info))?;
                    } else {
                        tracing::warn!(job = %job.id, error = %e, "cannot look the job up; it stays unknown until a later run");
                    }
                    if failure.halts {
                        self.halt(failure.info);
                    }
                }
            }
        }
        queued.sort_by_key(|j| j.line);

        let start = Instant::now();
        let (tx, mut rx) = mpsc::unbounded_channel::<Created>();
        // Each ends in `Err` when the journal cannot record what it did.
        let mut follows: JoinSet<Result<(), JournalError>> = JoinSet::new();

        // Tasks created by an earlier run, followed again: the errors an earlier run's follows
        // ended with (`deadline passed`, `1101`, …) are cleared, so that a run stopped before
        // these follows end does not report them as its own. Not once the run is stopped: it
        // follows nothing, and the earlier reason still holds.
        {
            let stop = stop.clone();
            self.clear_stale_errors(&stale_errors, &|| *stop.borrow())?;
        }
        // Tasks created by an earlier run.
        if !created.is_empty() {
            let now = Instant::now();
            let refs: Vec<(String, TaskRef)> = created
                .iter()
                .map(|(job, task)| {
                    let task = match job.generation() {
                        ApiGeneration::New => TaskRef::new_style(task.clone()),
                        _ => TaskRef::legacy(job.endpoint.clone(), task.clone()),
                    };
                    self.track(job, &task, now);
                    (job.id.clone(), task)
                })
                .collect();
            // A follow each, as for the tasks this run creates: legacy tasks are queried on
            // their own schedules, new-style ones share batch queries.
            for (job_id, task) in refs {
                follows.spawn(self.clone().follow_to_end(job_id, task));
            }
        }
        // The files an earlier run left missing, `max_downloads` jobs at a time: a job's
        // download is started only when one of them ends, so a rerun that fetches the files
        // of 100 000 jobs holds a few downloads, not 100 000 tasks waiting for their turn.
        if !undownloaded.is_empty() {
            let missing: Vec<Missing> = undownloaded
                .into_iter()
                .map(|(job, task, urls, recorded)| (job.id.clone(), task, urls, recorded))
                .collect();
            follows.spawn(self.clone().download_missing(missing));
        }
        // Succeeded jobs of an earlier run without a result URL: their tasks are asked for
        // their results once more, new-style ones many to a query.
        if !no_results.is_empty() {
            let asked: Vec<NoResult> = no_results
                .into_iter()
                .map(|(job, task)| {
                    let legacy_path = (job.generation() != ApiGeneration::New)
                        .then(|| job.endpoint.trim_end_matches('/').to_owned());
                    (job.id.clone(), legacy_path, task)
                })
                .collect();
            follows.spawn(self.clone().ask_results(asked));
        }

        // Creators: one per pool, one create in flight each. They borrow the jobs (a job is
        // held once however large the file), so they run in this task rather than spawned.
        let mut pools: BTreeMap<String, Vec<&Job>> = BTreeMap::new();
        for job in queued {
            pools.entry(job.pool().to_string()).or_default().push(job);
        }
        let mut creators = FuturesUnordered::new();
        for (_, jobs) in pools {
            creators.push(self.create_all(jobs, tx.clone(), stop.clone()));
        }
        drop(tx);

        let mut interrupted = false;
        let mut stop_closed = false;
        let mut creators_done = creators.is_empty();
        let mut channel_open = true;
        let mut journal_error = None;
        loop {
            if creators_done && !channel_open && follows.is_empty() {
                break;
            }
            tokio::select! {
                created = rx.recv(), if channel_open => match created {
                    Some(created) => {
                        follows.spawn(self.clone().follow_to_end(created.job_id, created.task));
                    }
                    None => channel_open = false,
                },
                done = creators.next(), if !creators_done => match done {
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "journal write failed; the run stops");
                        journal_error.get_or_insert(e);
                    }
                    Some(Ok(())) => {}
                    None => creators_done = true,
                },
                Some(done) = follows.join_next(), if !follows.is_empty() => match done {
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "journal write failed; the run stops");
                        journal_error.get_or_insert(e);
                    }
                    Ok(Ok(())) => {}
                    // Each follow catches its own panic (`follow_to_end`); never aborted here.
                    Err(e) => tracing::error!(error = %e, "a follow ended abnormally"),
                },
                changed = stop.changed(), if !interrupted && !stop_closed => {
                    if changed.is_err() {
                        // Nobody can stop this run any more: run to the end.
                        stop_closed = true;
                    } else if *stop.borrow() {
                        interrupted = true;
                    }
                }
            }
            // Stopped, or the journal failed: with a journal that cannot record them, no
            // more creates leave, and a later run on it picks up what this one left.
            if interrupted || journal_error.is_some() {
                self.stack.drain_handle().close();
                // Creates in flight get a short grace to be answered and recorded.
                let grace = tokio::time::sleep(self.options.stop_grace);
                tokio::pin!(grace);
                loop {
                    tokio::select! {
                        () = &mut grace => break,
                        done = creators.next() => match done {
                            Some(Err(e)) => {
                                journal_error.get_or_insert(e);
                            }
                            Some(Ok(())) => {}
                            None => break,
                        },
                    }
                }
                drop(creators);
                follows.abort_all();
                break;
            }
        }
        if let Some(e) = journal_error {
            return Err(e);
        }
        if interrupted {
            // The jobs no creator reached before the grace ended (one waited on a create in
            // flight, or was still marking): never sent, so `not_submitted` as the others.
            let queued: std::collections::HashSet<String> = self
                .journal
                .records()?
                .into_iter()
                .filter(|r| r.state == JobState::Queued)
                .map(|r| r.job_id)
                .collect();
            let left: Vec<&Job> = jobs.iter().filter(|j| queued.contains(&j.id)).collect();
            self.not_submitted(&left, ErrorInfo::new(0, STOPPED, None))
                .await?;
        }
        let end = self
            .last_end
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or_else(Instant::now);
        // The journal may hold jobs of earlier files: report this file's.
        let mut records = self.journal.records()?;
        let ids: std::collections::HashSet<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        records.retain(|r| ids.contains(r.job_id.as_str()));
        Ok(RunReport {
            records,
            makespan: end.saturating_duration_since(start),
            observed_task_seconds: self
                .lifetimes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            creates: self.creates.load(Ordering::Relaxed),
            interrupted,
            downloading: self.options.download_dir.is_some(),
        })
    }

    /// Clears the errors an earlier run's follows of `jobs` (left `created`) ended with,
    /// [`REQUEUE_CHUNK`] jobs to a journal transaction. `stopped` is asked before each: once
    /// it says so, the jobs not reached keep their earlier reason (this run follows nothing
    /// more), and a Ctrl-C is heard between two transactions rather than after all of them.
    /// `false` when it stopped there.
    fn clear_stale_errors(
        &self,
        jobs: &[&Job],
        stopped: &dyn Fn() -> bool,
    ) -> Result<bool, JournalError> {
        for chunk in jobs.chunks(REQUEUE_CHUNK) {
            if stopped() {
                return Ok(false);
            }
            let ids: Vec<&str> = chunk.iter().map(|job| job.id.as_str()).collect();
            self.journal
                .transition_all(&ids, JobState::Created, &Update::error_cleared())?;
        }
        Ok(true)
    }

    /// Lists the account's unfinished tasks and adopts their slots (best effort: a failure
    /// only means the slots layer learns the real count through 1303s).
    async fn adopt_slots(&self, jobs: &[Job]) {
        let mut plan = Reconcile::new("");
        let mut seen = Vec::new();
        for job in jobs.iter().filter(|j| j.generation() == ApiGeneration::New) {
            let product = job
                .endpoint
                .trim_start_matches('/')
                .split('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            let pool = job.pool();
            if !seen.contains(&(product.clone(), pool.clone())) {
                seen.push((product.clone(), pool.clone()));
                plan = plan.new_style(product, pool);
            }
        }
        match self.stack.reconcile(&plan).await {
            Ok(found) => tracing::info!(
                unfinished = found.unfinished,
                adopted = found.adopted,
                "adopted the slots of running tasks"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list running tasks; slots are learned through 1303");
                // Refused for the account (a wrong key, say): so would every lookup be.
                let failure = failure_of(&*e);
                if failure.halts {
                    self.halt(failure.info);
                }
            }
        }
    }

    /// Looks a job's task up by its external id: `Some` if Kling has it, `None` if Kling
    /// says it does not exist.
    ///
    /// Read by kling-retry's rule for its own lookups ([`kling_retry::read_lookup`]): only
    /// `1203`, or a new-style answer whose list was read in whole and is empty, says the task
    /// does not exist; a task counts as the job's when it carries the job's external id, or
    /// when it is the answer's only task and names none. Any other answer (a list of other
    /// tasks, as from a proxy that dropped the query, or a `data` that cannot be read) is an
    /// error, and the job stays of unknown outcome: neither created again nor given another
    /// job's task.
    pub async fn lookup(
        &self,
        job: &Job,
        external_id: &str,
    ) -> Result<Option<TaskReport>, BoxError> {
        let uri = match job.generation() {
            ApiGeneration::New => format!("/tasks?external_task_ids={external_id}"),
            _ => format!("{}/{external_id}", job.endpoint.trim_end_matches('/')),
        };
        let request = Request::get(uri).body(Full::new(Bytes::new()))?;
        match self.stack.service().oneshot(request).await {
            Ok(mut response) => {
                let outcome = Outcome::ensure(&mut response)?;
                if outcome.code() == Code::NotFound {
                    return Ok(None);
                }
                if !outcome.is_success() {
                    return Err(Box::new(ApiError::from_outcome(&outcome)));
                }
                let body = response.body().peek_bytes();
                let new_style = job.generation() == ApiGeneration::New;
                match kling_retry::read_lookup(&body, &outcome, external_id, new_style) {
                    // The id is one of the answer's tasks; never read as "not found".
                    Lookup::Found(id) => match outcome.tasks().iter().find(|t| t.id == id) {
                        Some(task) => Ok(Some(task.clone())),
                        None => Err(format!("the lookup found task {id} but lists none").into()),
                    },
                    Lookup::NotFound => Ok(None),
                    _ => Err(format!(
                        "the lookup of external id {external_id} was answered with no task of \
                         that id it could read ({} other task(s)); the job stays of unknown \
                         outcome",
                        outcome.tasks().len()
                    )
                    .into()),
                }
            }
            Err(e) if failure_of(&*e).code == Some(Code::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Asks Kling once for the tasks `asked`, through the stack: the reports of those ids the
    /// answer holds (an id it leaves out has none). `Err` on a refusal or an answer that
    /// cannot be read.
    async fn query_tasks(&self, asked: Asked<'_>) -> Result<Vec<TaskReport>, BoxError> {
        let legacy_id: [&str; 1];
        let (uri, ids): (String, &[&str]) = match asked {
            Asked::Legacy { path, id } => {
                legacy_id = [id];
                (format!("{path}/{id}"), &legacy_id)
            }
            Asked::New(ids) => (format!("/tasks?task_ids={}", ids.join(",")), ids),
        };
        let request = Request::get(uri).body(Full::new(Bytes::new()))?;
        let mut response = self.stack.service().oneshot(request).await?;
        let outcome = Outcome::ensure(&mut response)?;
        if !outcome.is_success() {
            return Err(Box::new(ApiError::from_outcome(&outcome)));
        }
        Ok(outcome
            .tasks()
            .iter()
            .filter(|t| ids.contains(&t.id.as_str()))
            .cloned()
            .collect())
    }

    fn track(&self, job: &Job, task: &TaskRef, created: Instant) {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner()).insert(
            task.id().to_owned(),
            Running {
                legacy_path: (job.generation() != ApiGeneration::New)
                    .then(|| job.endpoint.trim_end_matches('/').to_owned()),
                pool: job.pool().to_string(),
                created,
            },
        );
    }

    fn halt(&self, info: ErrorInfo) {
        self.halted.store(true, Ordering::SeqCst);
        self.halt_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(info);
    }

    /// Creates a pool's `jobs` one after the other. A job whose create panics is recorded as
    /// such ([`after_panic`](Self::after_panic)) and the next one goes on. Once the run is
    /// stopped or halted, the jobs left are marked `not_submitted`
    /// ([`not_submitted`](Self::not_submitted)).
    async fn create_all(
        &self,
        jobs: Vec<&Job>,
        tx: mpsc::UnboundedSender<Created>,
        stop: StopSignal,
    ) -> Result<(), JournalError> {
        for (index, job) in jobs.iter().enumerate() {
            if let Some(info) = self.no_more_creates(&stop) {
                return self.not_submitted(&jobs[index..], info).await;
            }
            match caught(self.create_one(job, &tx)).await {
                Ok(created) => created?,
                Err(panic) => self.after_panic(&job.id, "the job's create", &panic)?,
            }
        }
        Ok(())
    }

    /// Why no create may leave any more, if the run was stopped or halted.
    fn no_more_creates(&self, stop: &StopSignal) -> Option<ErrorInfo> {
        if *stop.borrow() {
            return Some(ErrorInfo::new(0, STOPPED, None));
        }
        if self.halted.load(Ordering::SeqCst) {
            let cause = self
                .halt_reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default();
            return Some(ErrorInfo::new(
                cause.code,
                format!("not submitted: creates stopped after {}", cause.message),
                cause.request_id,
            ));
        }
        None
    }

    /// Marks the queued `jobs` `not_submitted` with `info`, [`MARK_CHUNK`] jobs to a journal
    /// transaction, yielding between two: a stop with 100 000 jobs left must not hold the
    /// runtime thread (the timers, the answers in flight, the follows) while it writes them.
    async fn not_submitted(&self, jobs: &[&Job], info: ErrorInfo) -> Result<(), JournalError> {
        let update = Update::error(info);
        for chunk in jobs.chunks(MARK_CHUNK) {
            let ids: Vec<&str> = chunk.iter().map(|job| job.id.as_str()).collect();
            self.journal
                .transition_all(&ids, JobState::NotSubmitted, &update)?;
            for _ in chunk {
                self.progress
                    .moved(JobState::Queued, JobState::NotSubmitted);
            }
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    /// Follows `task` of job `job_id` to its end and records it. A panic on the way is
    /// recorded as such ([`after_panic`](Self::after_panic)).
    async fn follow_to_end(
        self: Arc<Self>,
        job_id: String,
        task: TaskRef,
    ) -> Result<(), JournalError> {
        let followed = caught(async {
            let result = self.follower.follow(task.clone()).await;
            self.finish(&job_id, task.id(), result).await
        });
        match followed.await {
            Ok(recorded) => recorded,
            Err(panic) => self.after_panic(&job_id, "the follow of the job's task", &panic),
        }
    }

    /// Fetches the files `missing` (succeeded jobs of an earlier run), at most
    /// [`RunOptions::max_downloads`] jobs at a time, each in a task of its own; a job's task is
    /// spawned only when a running one ends. `Err` (the others dropped) when the journal cannot
    /// record a job's files, as [`download`](Self::download).
    async fn download_missing(self: Arc<Self>, missing: Vec<Missing>) -> Result<(), JournalError> {
        let mut missing = missing.into_iter();
        let mut running = JoinSet::new();
        loop {
            while running.len() < self.options.max_downloads.max(1) {
                let Some((job_id, task, urls, recorded)) = missing.next() else {
                    break;
                };
                let engine = self.clone();
                running.spawn(async move {
                    let downloaded = caught(engine.download(&job_id, &task, &urls, &recorded));
                    match downloaded.await {
                        Ok(recorded) => recorded,
                        Err(panic) => {
                            engine.after_panic(&job_id, "the download of the job's files", &panic)
                        }
                    }
                });
            }
            match running.join_next().await {
                None => return Ok(()),
                Some(Ok(recorded)) => recorded?,
                // Each catches its own panic; never aborted but with this task.
                Some(Err(e)) => tracing::error!(error = %e, "a download ended abnormally"),
            }
        }
    }

    /// Asks once for the results of tasks that succeeded without a result URL kling-batch
    /// could read in an earlier run: legacy tasks a query each, new-style ones
    /// [`RESULTS_BATCH`] to a `GET /tasks` query, one query at a time. A task found with
    /// result URLs gets them, its job's error cleared (with `--download`, its files are fetched
    /// once every query is answered); a job whose task still has none gets this run's error
    /// ([`no_result`]). A query refused for the account or its credentials ends the asking:
    /// the jobs not asked for keep their error, and a later run asks again. `Err` when the
    /// journal cannot record an answer.
    async fn ask_results(self: Arc<Self>, asked: Vec<NoResult>) -> Result<(), JournalError> {
        let (legacy, new): (Vec<NoResult>, Vec<NoResult>) =
            asked.into_iter().partition(|(_, path, _)| path.is_some());
        let mut queries: Vec<Vec<NoResult>> = legacy.into_iter().map(|one| vec![one]).collect();
        queries.extend(new.chunks(RESULTS_BATCH).map(<[NoResult]>::to_vec));
        let mut fetch: Vec<Missing> = Vec::new();
        for query in queries {
            let ids: Vec<&str> = query.iter().map(|(_, _, task)| task.as_str()).collect();
            let asked = match &query[0].1 {
                Some(path) => Asked::Legacy { path, id: ids[0] },
                None => Asked::New(&ids),
            };
            let answer = self.query_tasks(asked).await;
            for (job_id, _, task) in &query {
                let update = match &answer {
                    Ok(found) => match found.iter().find(|t| t.id == *task && has_results(t)) {
                        Some(found) => {
                            fetch.push((job_id.clone(), task.clone(), found.urls.clone(), vec![]));
                            Update {
                                urls: Some(found.urls.clone()),
                                clear_error: true,
                                ..Update::default()
                            }
                        }
                        None => Update::error(no_result(task, None)),
                    },
                    Err(e) => Update::error(no_result(task, Some(&**e))),
                };
                self.journal
                    .transition(job_id, JobState::Succeeded, update)?;
            }
            if let Err(e) = &answer {
                tracing::warn!(error = %e, "cannot ask for the results of succeeded tasks; a later run asks again");
                if failure_of(&**e).halts {
                    break;
                }
            }
        }
        if self.options.download_dir.is_some() && !fetch.is_empty() {
            self.clone().download_missing(fetch).await?;
        }
        Ok(())
    }

    /// Records that `what` of job `job_id` panicked (a bug of kling-batch), so that the job is
    /// never left as it was without a word: one error on stderr, and the job's error in the
    /// journal and the results, by where the job stands.
    ///
    /// - `queued` (nothing sent): `not_submitted`, and the next run sends it.
    /// - `creating` (the create may have been sent) and `created`: kept so, the next run looks
    ///   the create up or follows the task. Never `failed`: a task that may run and be billed
    ///   is never given up.
    /// - `succeeded` with `--download`: the files count as missing, and the next run fetches
    ///   them.
    fn after_panic(&self, job_id: &str, what: &str, panic: &str) -> Result<(), JournalError> {
        tracing::error!(
            job = %job_id,
            panic = %panic,
            "kling-batch panicked during {what} (a bug: please report it); the other jobs go on"
        );
        let Some(record) = self.journal.record(job_id)? else {
            return Ok(());
        };
        let message = |then: &str| {
            format!("{PANICKED} during {what} (a bug: please report it): {panic}; {then}")
        };
        match record.state {
            JobState::Queued => self.move_to(
                job_id,
                JobState::Queued,
                JobState::NotSubmitted,
                Update::error(ErrorInfo::new(
                    0,
                    message("not sent; a later run sends it"),
                    None,
                )),
            ),
            JobState::Creating => self.journal.transition(
                job_id,
                JobState::Creating,
                Update::error(ErrorInfo::new(
                    0,
                    message("the create may have been sent; a later run looks it up"),
                    None,
                )),
            ),
            JobState::Created => {
                let task = record.task_id.as_deref().unwrap_or("of this job");
                self.journal.transition(
                    job_id,
                    JobState::Created,
                    Update::error(ErrorInfo::new(0, message(&follow_again(task)), None)),
                )
            }
            JobState::Succeeded if self.options.download_dir.is_some() => self.journal.transition(
                job_id,
                JobState::Succeeded,
                Update {
                    download_error: Some(Some(ErrorInfo::new(
                        0,
                        message("a later run fetches the files missing"),
                        None,
                    ))),
                    ..Update::default()
                },
            ),
            JobState::Succeeded | JobState::Failed | JobState::NotSubmitted => Ok(()),
        }
    }

    async fn create_one(
        &self,
        job: &Job,
        tx: &mpsc::UnboundedSender<Created>,
    ) -> Result<(), JournalError> {
        #[cfg(test)]
        self.test_panic(&job.id, "create");
        // The recorded external id: a job that took over an old journal's row keeps its own.
        let external_id = match self.journal.record(&job.id)? {
            Some(record) => record.external_id,
            None => self.journal.external_id_for(&job.id),
        };
        self.move_to(
            &job.id,
            JobState::Queued,
            JobState::Creating,
            Update::default(),
        )?;
        #[cfg(test)]
        self.test_panic(&job.id, "send");
        let body = job.create_body(&external_id, self.options.callback_url.as_deref());
        let request = Request::post(job.endpoint.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)));
        let request = match request {
            Ok(request) => request,
            Err(e) => {
                let info = ErrorInfo::new(0, format!("cannot build the request: {e}"), None);
                return self.move_to(
                    &job.id,
                    JobState::Creating,
                    JobState::Failed,
                    Update::error(info),
                );
            }
        };
        self.creates.fetch_add(1, Ordering::Relaxed);
        let answer = self.stack.service().oneshot(request).await;
        let failure = match answer {
            Ok(mut response) => match Outcome::ensure(&mut response) {
                Ok(outcome) if outcome.is_success() => match outcome.task() {
                    Some(report) => return self.created(job, report, tx),
                    None => Failure::unknown("the create answer reports no task"),
                },
                Ok(outcome) => Failure::from_api(&ApiError::from_outcome(&outcome)),
                Err(e) => Failure::unknown(e.to_string()),
            },
            Err(e) => failure_of(&*e),
        };
        if failure.draining {
            let info = ErrorInfo::new(0, STOPPED, None);
            return self.move_to(
                &job.id,
                JobState::Creating,
                JobState::NotSubmitted,
                Update::error(info),
            );
        }
        if failure.halts {
            self.halt(failure.info.clone());
        }
        if failure.made_nothing() {
            // Refused for the account, or answered by something that is not Kling: a lookup
            // would be refused or answered the same way, and has nothing to find.
            return self.move_to(
                &job.id,
                JobState::Creating,
                JobState::NotSubmitted,
                Update::error(failure.info),
            );
        }
        // Any other error: the create may have happened (or a duplicate id was refused), so
        // look it up before deciding.
        match self.lookup(job, &external_id).await {
            Ok(Some(report)) => self.created(job, &report, tx),
            // A refusal of the account says nothing against the job: the next run sends it.
            Ok(None) if failure.final_refusal && !failure.halts => self.move_to(
                &job.id,
                JobState::Creating,
                JobState::Failed,
                Update::error(failure.info),
            ),
            Ok(None) => self.move_to(
                &job.id,
                JobState::Creating,
                JobState::NotSubmitted,
                Update::error(failure.info),
            ),
            // Refused `1103` (no permission for this API or model), and so was its lookup: the
            // account lacks the permission, without which nothing is created, and no lookup can
            // say more until it is granted. Left `creating`, it was looked up (and refused)
            // again by every run, never settled. The next run sends it again under the same
            // external id: were there a task (a permission taken away between two attempts),
            // Kling would refuse the create as a duplicate, and its lookup would find the task.
            Err(e)
                if failure.code == Some(Code::NoPermission)
                    && failure_of(&*e).code == Some(Code::NoPermission) =>
            {
                tracing::warn!(job = %job.id, error = %e, "the create and its lookup were refused for want of permission; not submitted");
                self.move_to(
                    &job.id,
                    JobState::Creating,
                    JobState::NotSubmitted,
                    Update::error(failure.info),
                )
            }
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e, "create outcome unknown and the lookup failed; a later run looks it up again");
                self.journal
                    .transition(&job.id, JobState::Creating, Update::error(failure.info))
            }
        }
    }

    fn created(
        &self,
        job: &Job,
        report: &TaskReport,
        tx: &mpsc::UnboundedSender<Created>,
    ) -> Result<(), JournalError> {
        let update = Update {
            task_id: Some(report.id.clone()),
            status: Some(report.status.as_str().to_owned()),
            ..Update::default()
        };
        self.move_to(&job.id, JobState::Creating, JobState::Created, update)?;
        let task = TaskRef::from_report(&job.endpoint, report).created_at(Instant::now());
        self.track(job, &task, Instant::now());
        let _ = tx.send(Created {
            job_id: job.id.clone(),
            task,
        });
        Ok(())
    }

    /// Records the end of a follow. `Err` when the journal cannot record it: the job stays
    /// `created` (or `succeeded` without its files), and the run stops.
    async fn finish(
        &self,
        job_id: &str,
        task_id: &str,
        result: Result<TaskReport, FollowError>,
    ) -> Result<(), JournalError> {
        #[cfg(test)]
        self.test_panic(job_id, "finish");
        let running = self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(task_id);
        let now = Instant::now();
        if let Some(running) = &running {
            *self
                .lifetimes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(running.pool.clone())
                .or_default() += now.duration_since(running.created).as_secs_f64();
        }
        match result {
            Ok(report) if report.status == TaskStatus::Succeeded => {
                self.ended(now);
                // A report without a result URL kling-batch can read (a signed callback that
                // carries the status alone, URLs of a shape it does not know): one query for
                // the whole report before the job is counted.
                let (report, error) = if report.urls.is_empty() {
                    let legacy_path = match &running {
                        Some(running) => running.legacy_path.clone(),
                        None if report.generation == ApiGeneration::New => None,
                        None => self
                            .journal
                            .record(job_id)?
                            .map(|r| r.endpoint.trim_end_matches('/').to_owned()),
                    };
                    let asked = match &legacy_path {
                        Some(path) => Asked::Legacy { path, id: task_id },
                        None => Asked::New(&[task_id]),
                    };
                    match self.query_tasks(asked).await {
                        Ok(found) => match found.into_iter().find(has_results) {
                            Some(found) => (found, None),
                            None => (report, Some(no_result(task_id, None))),
                        },
                        Err(e) => (report, Some(no_result(task_id, Some(&*e)))),
                    }
                } else {
                    (report, None)
                };
                if let Some(error) = &error {
                    tracing::warn!(job = %job_id, error = %error.message, "succeeded, no result URL");
                }
                let update = Update {
                    status: Some(report.status.as_str().to_owned()),
                    urls: Some(report.urls.clone()),
                    error,
                    ..Update::default()
                };
                self.move_to(job_id, JobState::Created, JobState::Succeeded, update)?;
                self.download(job_id, task_id, &report.urls, &[]).await
            }
            Ok(report) => {
                let message = report
                    .failure
                    .clone()
                    .unwrap_or_else(|| format!("task ended {}", report.status));
                let update = Update {
                    status: Some(report.status.as_str().to_owned()),
                    error: Some(ErrorInfo::new(0, format!("task failed: {message}"), None)),
                    ..Update::default()
                };
                self.ended(now);
                self.move_to(job_id, JobState::Created, JobState::Failed, update)
            }
            Err(FollowError::Api { error, .. }) if error.code() == Code::NotFound => {
                // Kling does not know the task (any more): it will never report an end.
                self.ended(now);
                let info = ErrorInfo::new(
                    error.code().as_i64(),
                    format!("task {task_id} is unknown to Kling: {}", error.message()),
                    error.request_id().map(str::to_owned),
                );
                self.move_to(
                    job_id,
                    JobState::Created,
                    JobState::Failed,
                    Update::error(info),
                )
            }
            Err(FollowError::Api { error, .. }) => {
                // Auth, account or any other refusal of the query says nothing about the
                // task, which may still run (and be billed): keep following it next run.
                tracing::warn!(job = %job_id, error = %error, "task not followed to its end; a later run follows it");
                let info = ErrorInfo::new(
                    error.code().as_i64(),
                    format!(
                        "task {task_id} not followed to its end: {}; {}",
                        error.message(),
                        follow_again(task_id)
                    ),
                    error.request_id().map(str::to_owned),
                );
                self.journal
                    .transition(job_id, JobState::Created, Update::error(info))
            }
            Err(e) => {
                // The follow's deadline passed (a task that runs long or hangs, or queries
                // that failed until then), or the task cannot be queried: the task exists all
                // the same, and may still run (and be billed).
                tracing::warn!(job = %job_id, error = %e, "task not followed to its end; a later run follows it");
                let why = match e {
                    FollowError::DeadlineExceeded { .. } => FOLLOW_DEADLINE,
                    _ => FOLLOW_FAILED,
                };
                let info =
                    ErrorInfo::new(0, format!("{why}: {e}; {}", follow_again(task_id)), None);
                self.journal
                    .transition(job_id, JobState::Created, Update::error(info))
            }
        }
    }

    fn ended(&self, at: Instant) {
        let mut last = self.last_end.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|l| l < at) {
            *last = Some(at);
        }
    }

    /// Fetches a task's result files; `recorded`: the files the journal has for it already.
    /// `Err` when the journal cannot record them: the files stay on disk, a later run records
    /// them, and the run stops.
    async fn download(
        &self,
        job_id: &str,
        task_id: &str,
        urls: &[String],
        recorded: &[String],
    ) -> Result<(), JournalError> {
        let Some(dir) = &self.options.download_dir else {
            return Ok(());
        };
        #[cfg(test)]
        self.test_panic(job_id, "download");
        // A turn among the `max_downloads`; the semaphore is never closed.
        let Ok(_turn) = self.downloads.acquire().await else {
            return Ok(());
        };
        let timeouts = self.options.download_timeouts;
        let client = self.download_client.get_or_init(|| {
            download::client(timeouts.connect_timeout()).map_err(|e| e.to_string())
        });
        let update = match client {
            Ok(client) => {
                let fetched =
                    download::fetch_all(client, dir, job_id, task_id, urls, recorded, timeouts)
                        .await;
                let error = fetched.error.map(|e| {
                    tracing::warn!(job = %job_id, error = %e, "download failed; a later run tries again");
                    ErrorInfo::new(0, format!("{e}; a later run fetches it again"), None)
                });
                Update::downloaded(fetched.files, error)
            }
            Err(e) => Update {
                download_error: Some(Some(ErrorInfo::new(
                    0,
                    format!("no download client: {e}"),
                    None,
                ))),
                ..Update::default()
            },
        };
        self.journal.transition(job_id, JobState::Succeeded, update)
    }

    /// A task report from a callback. `trusted` (the signature was verified): the report
    /// frees the task's slots and ends its follow at once. Otherwise the task is queried
    /// through the stack first, and that answer is what counts.
    pub async fn on_callback(&self, payload: &[u8], report: TaskReport, trusted: bool) {
        if !report.status.is_terminal() {
            return;
        }
        if trusted {
            if let Err(e) = self.stack.on_callback(payload).await {
                tracing::warn!(error = %e, "callback not applied to the slots");
            }
            self.follower.deliver(report);
            return;
        }
        // One query confirms it (and frees the slots as any query does).
        let uri = {
            let tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
            let Some(running) = tasks.get(&report.id) else {
                return;
            };
            match &running.legacy_path {
                Some(path) => format!("{path}/{}", report.id),
                None => format!("/tasks?task_ids={}", report.id),
            }
        };
        let Ok(request) = Request::get(uri).body(Full::new(Bytes::new())) else {
            return;
        };
        if let Ok(mut response) = self.stack.service().oneshot(request).await
            && let Ok(outcome) = Outcome::ensure(&mut response)
            && let Some(found) = outcome.tasks().iter().find(|t| t.id == report.id)
            && found.status.is_terminal()
        {
            self.follower.deliver(found.clone());
        }
    }
}

/// The error of a job not sent because the run was stopped.
const STOPPED: &str = "not submitted: the run was stopped";

/// How many jobs a stop or a halt marks `not_submitted` in one journal transaction before it
/// lets the run's other work go on.
const MARK_CHUNK: usize = 256;

/// How many jobs a run queues again (`not_submitted` ones) or clears the earlier error of
/// (`created` ones it follows again) in one journal transaction.
const REQUEUE_CHUNK: usize = 4096;

/// How the error of a job whose create, follow or download panicked begins (the summary
/// tells such jobs by it).
pub(crate) const PANICKED: &str = "kling-batch panicked";

/// How the error of a job begins whose task was not followed to its end because the follow's
/// deadline passed (the summary tells such jobs by it).
pub(crate) const FOLLOW_DEADLINE: &str = "the follow's deadline passed";

/// How the error of a job begins whose task was not followed to its end for another reason
/// than a Kling code, a panic or the deadline (a task id that cannot be queried).
pub(crate) const FOLLOW_FAILED: &str = "the follow stopped";

/// What the error of a job left `created` says of its task `task_id`, and what to do.
fn follow_again(task_id: &str) -> String {
    format!(
        "task {task_id} exists at Kling and may still run (and be billed): a later run follows \
         it (run again on the same journal)"
    )
}

/// How the error of a succeeded job begins whose task's report, and a query of it, named no
/// result URL kling-batch can read (kling-core leaves out a URL of an odd type; a signed
/// callback may carry the status alone). The summary counts such jobs apart from `ok` by their
/// empty URL list, and every later run on the journal asks for the task's results once.
pub(crate) const NO_RESULT: &str = "succeeded, no result URL";

/// How many new-style tasks a resumed run asks for the results of in one `GET /tasks` query.
const RESULTS_BATCH: usize = 50;

/// Whether `report` is a succeeded task's with a result URL.
fn has_results(report: &TaskReport) -> bool {
    report.status == TaskStatus::Succeeded && !report.urls.is_empty()
}

/// The error of a job whose task `task_id` succeeded without a result URL kling-batch can
/// read, with the query's error if the query that would have told failed (its Kling code and
/// request id when it carries them).
fn no_result(task_id: &str, query_error: Option<&(dyn std::error::Error + 'static)>) -> ErrorInfo {
    let mut message = format!(
        "{NO_RESULT}: task {task_id} succeeded, but neither its report nor a query of it named \
         a result URL kling-batch can read"
    );
    let (code, request_id) = match query_error {
        Some(e) => {
            let failure = failure_of(e);
            message.push_str(&format!(" (the query failed: {e})"));
            (failure.info.code, failure.info.request_id)
        }
        None => (0, None),
    };
    message.push_str("; a later run on the same journal asks again");
    ErrorInfo::new(code, message, request_id)
}

/// A query of tasks by id.
#[derive(Clone, Copy, Debug)]
enum Asked<'a> {
    /// A legacy task, at `{path}/{id}` (`path`: its create path).
    Legacy { path: &'a str, id: &'a str },
    /// New-style tasks, in one `GET /tasks?task_ids=…`.
    New(&'a [&'a str]),
}

/// Ends once `stop` says to stop; never, if nobody can stop the run any more.
async fn until_stopped(mut stop: StopSignal) {
    if stop.wait_for(|stopped| *stopped).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// `future`, with a panic caught and handed back as its message, so that the job it served is
/// recorded as such rather than left as it was without a word.
async fn caught<T>(future: impl Future<Output = T>) -> Result<T, String> {
    AssertUnwindSafe(future)
        .catch_unwind()
        .await
        .map_err(|payload| panic_message(&*payload))
}

/// The message a panic was given.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// What a failed create says about itself.
#[derive(Clone, Debug)]
struct Failure {
    info: ErrorInfo,
    code: Option<Code>,
    /// Surely not created, and sending it again would fail the same way.
    final_refusal: bool,
    /// The account can create nothing more: [`halts_run`] (1000–1002, 1100–1102, 1304),
    /// [`refuses_account`] (a final refusal under 429), a spent budget.
    halts: bool,
    /// The stack's drain gate refused it (never sent).
    draining: bool,
    /// This call may have made a billed task (the retry layer's word when it gave one:
    /// [`Failed::may_have_created`](kling_retry::error::Failed::may_have_created)).
    may_have_created: bool,
}

/// Whether a Kling code refuses the account or its credentials rather than the request, so
/// that every further create (and query) of the run would be refused the same way: the
/// account-level refusals ([`Code::halts_creates`]: 1100, 1101, 1102), and the configuration
/// errors KLING_API.md says never to retry — authentication (1000, 1001, 1002: a wrong key,
/// or a key of the other region) and the IP whitelist (1304).
fn halts_run(code: Code) -> bool {
    code.halts_creates()
        || matches!(
            code,
            Code::AuthFailed | Code::AuthHeaderEmpty | Code::InvalidKey | Code::IpWhitelist
        )
}

/// Whether a refusal that no retry can change came with HTTP `429`. Every code Kling sends
/// with `429` is about the account (its standing, its credits, the IP whitelist) or its rate
/// and slots (`1302`, `1303`, which are retried), never about the request: so is any other
/// final refusal under `429` (an undocumented code, or `1103` sent with `429`), and each
/// further create would meet it too; but a code Kling documents as a refusal of the request
/// itself (`1200`–`1203`, `1300`, `1301`) stays the job's, whatever its status. Such a
/// refusal made nothing (kling-core's [`Code::may_have_created_under`]).
fn refuses_account(code: Code, status: http::StatusCode) -> bool {
    let of_the_request = matches!(
        code,
        Code::InvalidRequest
            | Code::InvalidParameter
            | Code::WrongMethod
            | Code::NotFound
            | Code::PlatformPolicy
            | Code::ContentSecurity
    );
    status == http::StatusCode::TOO_MANY_REQUESTS
        && code.disposition(status) == kling_core::Disposition::Fatal
        && !of_the_request
}

impl Failure {
    fn unknown(message: impl Into<String>) -> Self {
        Failure {
            info: ErrorInfo::new(0, message, None),
            code: None,
            final_refusal: false,
            halts: false,
            draining: false,
            may_have_created: true,
        }
    }

    fn from_api(error: &ApiError) -> Self {
        let code = error.code();
        Failure {
            info: ErrorInfo::new(
                code.as_i64(),
                error.message(),
                error.request_id().map(str::to_owned),
            ),
            code: Some(code),
            // One rule with `may_have_created`: an undocumented code with a 4xx status made
            // nothing (kling-core's `Code::may_have_created_under`), and is as final a refusal.
            final_refusal: !error.may_have_created()
                && !code.disposition(error.status()).is_retryable(),
            halts: halts_run(code) || refuses_account(code, error.status()),
            draining: false,
            may_have_created: error.may_have_created(),
        }
    }

    /// Whether the create surely made nothing and no lookup could say otherwise: refused for
    /// the account or its credentials, or stopped without any answer from Kling (a proxy's
    /// page, never sent). A Kling refusal of the request itself (`1201`, say) may be its answer
    /// to an external id it already has, so that one is looked up.
    fn made_nothing(&self) -> bool {
        !self.may_have_created && (self.halts || self.code.is_none())
    }
}

/// Reads a stack error: the Kling code it carries, whether it halts creates, whether the
/// drain gate refused it, whether it may have made a task.
///
/// Whether it may have made a task is kling-core's rule, which reads the retry layer's own
/// account of its attempts ([`kling_core::error::Attempts`]) when there is one.
fn failure_of(error: &(dyn std::error::Error + 'static)) -> Failure {
    let mut failure = read_failure(error);
    failure.may_have_created = kling_core::error::may_have_created(error);
    failure
}

fn read_failure(error: &(dyn std::error::Error + 'static)) -> Failure {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(err) = current {
        if let Some(failed) = err.downcast_ref::<kling_retry::error::Failed>()
            && let Some(api) = failed.api_error()
        {
            return Failure::from_api(api);
        }
        if let Some(api) = err.downcast_ref::<ApiError>() {
            return Failure::from_api(api);
        }
        if let Some(halted) = err.downcast_ref::<kling_concurrency::error::Halted>() {
            let mut failure = Failure::from_api(halted.cause());
            failure.halts = true;
            return failure;
        }
        if err.is::<kling_tower::error::Draining>() {
            let mut failure = Failure::unknown(err.to_string());
            failure.draining = true;
            return failure;
        }
        if err.is::<kling_tower::error::BudgetExceeded>() {
            let mut failure = Failure::unknown(err.to_string());
            failure.halts = true;
            failure.final_refusal = true;
            return failure;
        }
        if err.is::<kling_core::error::MalformedResponse>()
            || err.is::<kling_core::error::BodyTooLarge>()
        {
            return Failure::unknown(format!(
                "answered by something other than Kling (a proxy's or gateway's page? check \
                 --base-url): {error}"
            ));
        }
        current = err.source();
    }
    Failure::unknown(error.to_string())
}

#[cfg(test)]
mod tests {
    use kling_core::{ClassifyLayer, Envelope};
    use kling_mock::{MockConfig, MockKling, Preset, Switches};
    use kling_tower::{Credentials, StackConfig, Tier};
    use tower::Layer as _;

    use super::*;
    use crate::jobs::parse_jobs;

    const ENDPOINT: &str = "/v1/videos/text2video";

    /// Creates a task on the in-process mock with key `key`, turns `switches` on, and
    /// follows `task` (the created one unless given) with kling-tower's follower sending
    /// `follow_key`: what the follow ends with, and the task id followed.
    async fn follow_on_mock(
        switches: Switches,
        follow_key: &str,
        task: Option<&str>,
    ) -> (String, Result<TaskReport, FollowError>) {
        let mock = MockKling::new(
            MockConfig::preset(Preset::Pro)
                .no_rate_limit()
                .api_key("key"),
        )
        .unwrap();
        let service = ClassifyLayer::new().layer(mock.clone());
        let create = Request::post(ENDPOINT)
            .header("authorization", "Bearer key")
            .body(Full::new(Bytes::from_static(br#"{"prompt":"a cat"}"#)))
            .unwrap();
        let created = service.clone().oneshot(create).await.unwrap();
        let report = Outcome::of(&created)
            .and_then(|o| o.task())
            .cloned()
            .unwrap();
        mock.set_switches(switches);
        let follower = Follower::new(service, FollowPolicy::new())
            .unwrap()
            .with_header("authorization", &format!("Bearer {follow_key}"))
            .unwrap();
        let id = task.unwrap_or(&report.id).to_owned();
        let result = follower.follow(TaskRef::legacy(ENDPOINT, id.clone())).await;
        (id, result)
    }

    /// An engine (nothing is sent) with one job `created` as task `task_id`; `finish` is
    /// handed `result` as a follow's end.
    async fn finish_created_job(
        task_id: &str,
        result: Result<TaskReport, FollowError>,
    ) -> (Journal, JobRecord) {
        let stack = Stack::new(
            StackConfig::preset(Tier::Pro),
            Credentials::api_key("key").unwrap(),
            "http://127.0.0.1:9",
        )
        .unwrap();
        let journal = Journal::open_in_memory().unwrap();
        let (jobs, _) = parse_jobs("{\"id\":\"cat\",\"prompt\":\"a cat\"}\n");
        journal.register(&jobs).unwrap();
        journal
            .transition("cat", JobState::Creating, Update::default())
            .unwrap();
        journal
            .transition("cat", JobState::Created, Update::task(task_id))
            .unwrap();
        let engine = Engine::new(
            stack,
            journal.clone(),
            RunOptions::new(default_follow_policy(1.0)),
        )
        .unwrap();
        engine.finish("cat", task_id, result).await.unwrap();
        let record = journal.record("cat").unwrap().unwrap();
        (journal, record)
    }

    /// A server on a free local port that answers every request with `body` (code 0, 200).
    async fn answering(body: String) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(move || {
            let body = body.clone();
            async move { ([(http::header::CONTENT_TYPE, "application/json")], body) }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    /// A lookup by external id takes a task for the job's only when it carries the job's id
    /// (or none): an answer naming other tasks gave the job the first of them, another job's,
    /// reported as its own and never created. And an answer whose `data` cannot be read said
    /// "no such task", so the job was created again. By the retry layer's rule now: only an
    /// empty new-style list read in whole is "not found"; an unreadable answer, a list of other
    /// tasks or a legacy task of another id leaves the job unknown.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lookup_never_takes_another_jobs_task_nor_reads_nothing_as_not_found() {
        let (jobs, _) = parse_jobs(concat!(
            r#"{"id":"cat","prompt":"a cat","endpoint":"/text-to-video/kling-3.0"}"#,
            "\n",
            r#"{"id":"dog","prompt":"a dog"}"#,
            "\n",
        ));
        let lookup = |index: usize, data: String| {
            let job = jobs[index].clone();
            async move {
                let body =
                    format!(r#"{{"code":0,"message":"SUCCEED","request_id":"r","data":{data}}}"#);
                let stack = Stack::new(
                    StackConfig::preset(Tier::Pro),
                    Credentials::api_key("key").unwrap(),
                    &answering(body).await,
                )
                .unwrap();
                let journal = Journal::open_in_memory().unwrap();
                let engine =
                    Engine::new(stack, journal, RunOptions::new(default_follow_policy(1.0)))
                        .unwrap();
                engine.lookup(&job, "kb-mine").await
            }
        };
        let other = r#"{"id":"860000000000000007","status":"succeeded","external_id":"kb-else"}"#;
        let mine = r#"{"id":"860000000000000001","status":"processing","external_id":"kb-mine"}"#;
        // New-style (`GET /tasks?external_task_ids=`).
        // Another job's task alone: a server that ignored the filter, saying nothing of ours.
        let found = lookup(0, format!("[{other}]")).await;
        assert!(
            found.is_err(),
            "not the other task, nor not found: {found:?}"
        );
        let found = lookup(0, "null".into()).await;
        assert!(found.is_err(), "nothing read is no answer: {found:?}");
        let found = lookup(0, "[]".into()).await;
        assert!(matches!(found, Ok(None)), "{found:?}");
        let found = lookup(0, format!("[{other},{mine}]")).await;
        assert_eq!(found.unwrap().unwrap().id, "860000000000000001");
        // Legacy (`GET {create path}/{external id}`).
        let found = lookup(
            1,
            concat!(
                r#"{"task_id":"860000000000000007","task_status":"succeed","#,
                r#""task_info":{"external_task_id":"kb-else"}}"#
            )
            .into(),
        )
        .await;
        assert!(found.is_err(), "not the other task: {found:?}");
        let found = lookup(1, "null".into()).await;
        assert!(found.is_err(), "nothing read is no answer: {found:?}");
        let found = lookup(
            1,
            concat!(
                r#"{"task_id":"860000000000000001","task_status":"submitted","#,
                r#""task_info":{"external_task_id":"kb-mine"}}"#
            )
            .into(),
        )
        .await;
        assert_eq!(found.unwrap().unwrap().id, "860000000000000001");
    }

    /// The callback URL's user info, query and fragment (a password, a token) never show in
    /// the `Debug` of the options or of the engine, which a library user may log: the URL is
    /// shown as `scheme://host[:port]/path`, and one that cannot be read as `<redacted>`.
    #[test]
    fn the_debug_of_options_and_engine_shows_no_secret_of_the_callback_url() {
        let cases = [
            (
                "https://hook:HOOKPASSWORD@cb.example:8443/hooks/kling?token=HOOKTOKEN",
                "\"https://cb.example:8443/hooks/kling\"",
            ),
            (
                "https://cb.example/hooks/kling#HOOKTOKEN",
                "\"https://cb.example/hooks/kling\"",
            ),
            ("https://cb.example/hooks/kling?t=HOOK TOKEN", "<redacted>"),
            ("HOOKTOKEN", "<redacted>"),
        ];
        for (url, expected) in cases {
            let options = RunOptions::new(default_follow_policy(1.0)).callback_url(url);
            let stack = Stack::new(
                StackConfig::preset(Tier::Pro),
                Credentials::api_key("APIKEYSECRET").unwrap(),
                "http://127.0.0.1:9",
            )
            .unwrap();
            let engine =
                Engine::new(stack, Journal::open_in_memory().unwrap(), options.clone()).unwrap();
            for text in [format!("{options:?}"), format!("{engine:?}")] {
                for secret in ["HOOKPASSWORD", "HOOKTOKEN", "APIKEYSECRET"] {
                    assert!(!text.contains(secret), "{secret}: {text}");
                }
                assert!(text.contains(expected), "{expected}: {text}");
            }
            assert_eq!(options.callback_url.as_deref(), Some(url), "kept whole");
        }
    }

    /// A job's create, follow or download that panics (a bug) is reported on stderr and in
    /// the job's error, by where the job stands, and the other jobs go on, those of its pool
    /// included: a panicked create task left its job and every later job of its pool `queued`,
    /// and the run exited 1 without a word. A job left `created` is counted in the summary
    /// under a reason saying its task exists and a rerun follows it (it had none). A rerun
    /// finishes every job, creating none twice.
    #[tokio::test]
    async fn a_panic_in_a_jobs_create_follow_or_download_is_reported_and_the_rest_go_on() {
        let server = kling_mock::MockServer::start(MockConfig::preset(Preset::Pro).speed(1000.0))
            .await
            .unwrap();
        let dir = std::env::temp_dir().join(format!("kling-batch-panics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let stack = || {
            Stack::new(
                StackConfig::preset(Tier::Pro).speed(1000.0).headroom(0.5),
                Credentials::api_key("key").unwrap(),
                &server.base_url(),
            )
            .unwrap()
        };
        let options = || RunOptions::new(default_follow_policy(1000.0)).download_dir(dir.clone());
        let (jobs, _) = parse_jobs(
            &["a", "b", "c", "d", "e"]
                .map(|id| format!("{{\"id\":\"{id}\",\"prompt\":\"{id}\"}}\n"))
                .concat(),
        );
        let journal = Journal::open_in_memory().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let capture = tracing::subscriber::set_default(crate::log::Capture(lines.clone()));
        let engine = Engine::new(stack(), journal.clone(), options()).unwrap();
        engine.test_panics.lock().unwrap().extend([
            ("b".to_owned(), "create"),
            ("c".to_owned(), "send"),
            ("d".to_owned(), "finish"),
            ("e".to_owned(), "download"),
        ]);
        let (_stop, stop) = watch::channel(false);
        let report = engine.run(&jobs, stop.clone()).await.unwrap();
        drop(capture);

        let record = |id: &str| report.records.iter().find(|r| r.job_id == id).unwrap();
        let error = |id: &str| {
            let record = record(id);
            let error = record.error.as_ref().or(record.download_error.as_ref());
            let message = error.map(|e| e.message.clone()).unwrap_or_default();
            assert!(
                message.contains("kling-batch panicked")
                    && message.contains("test panic at the ")
                    && message.contains(&format!(" of {id}")),
                "{id}: {record:?}"
            );
            message
        };
        assert_eq!(record("a").state, JobState::Succeeded, "the others go on");
        assert_eq!(record("a").files.len(), 1);
        assert_eq!(record("b").state, JobState::NotSubmitted);
        assert!(error("b").contains("a later run sends it"));
        assert_eq!(record("c").state, JobState::Creating);
        assert!(error("c").contains("a later run looks it up"));
        assert_eq!(record("d").state, JobState::Created);
        assert!(error("d").contains("a later run follows it"));
        // The summary says why `d` did not finish: its task exists, and a rerun follows it.
        let task = record("d").task_id.clone().unwrap();
        assert!(error("d").contains(&format!("task {task} exists at Kling")));
        let mut summary = crate::summary::Summary::default();
        summary.count_jobs(&report.records);
        assert_eq!(
            summary.unfinished_by_reason,
            BTreeMap::from([(crate::summary::PANIC_REASON.to_owned(), 1)])
        );
        let table = summary.to_string();
        let row = format!("not followed: {}  1", crate::summary::PANIC_REASON);
        assert!(table.contains(&row), "{table}");
        assert_eq!(record("e").state, JobState::Succeeded);
        assert!(record("e").files.is_empty());
        assert!(error("e").contains("a later run fetches the files missing"));
        let lines = lines.lock().unwrap().clone();
        for id in ["b", "c", "d", "e"] {
            assert!(
                lines.iter().any(
                    |l| l.starts_with("kling-batch: error: kling-batch panicked")
                        && l.contains(&format!("job={id}"))
                ),
                "{id}: {lines:?}"
            );
        }
        assert_eq!(server.stats().tasks_created, 3, "b and c were never sent");

        let engine = Engine::new(stack(), journal, options()).unwrap();
        let report = engine.run(&jobs, stop).await.unwrap();
        for record in &report.records {
            assert_eq!(record.state, JobState::Succeeded, "{record:?}");
            assert_eq!(record.files.len(), 1, "{record:?}");
            assert!(record.download_error.is_none(), "{record:?}");
        }
        let stats = server.stats();
        assert_eq!(stats.tasks_created, 5, "{stats:?}");
        assert_eq!(stats.duplicate_external_ids, 0, "{stats:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A task whose follow passes its deadline (it runs longer, or queries fail until then)
    /// leaves its job `created`: its error had only the follower's words (no task, nothing
    /// to do) and the summary no reason at all. The error now says the task exists and may
    /// be billed, naming it, and that a run on the same journal follows it; the summary counts
    /// the job under the deadline's reason. A rerun follows the task to its end.
    #[tokio::test]
    async fn a_follow_past_its_deadline_is_reported_and_a_rerun_follows_the_task() {
        let speed = 1000.0;
        // Tasks of 10 minutes (0.6 s real); the first follow gives up after 30 s (30 ms).
        let config = MockConfig::preset(Preset::Pro)
            .speed(speed)
            .task_duration(Duration::from_secs(600), Duration::from_secs(600));
        let server = kling_mock::MockServer::start(config).await.unwrap();
        let stack = || {
            Stack::new(
                StackConfig::preset(Tier::Pro).speed(speed).headroom(0.5),
                Credentials::api_key("key").unwrap(),
                &server.base_url(),
            )
            .unwrap()
        };
        let (jobs, _) = parse_jobs("{\"id\":\"a\",\"prompt\":\"a\"}\n");
        let journal = Journal::open_in_memory().unwrap();
        let short = FollowPolicy::new()
            .deadline(Duration::from_secs(30))
            .speed(speed);
        let engine = Engine::new(stack(), journal.clone(), RunOptions::new(short)).unwrap();
        let (_stop, stop) = watch::channel(false);
        let report = engine.run(&jobs, stop.clone()).await.unwrap();

        let record = &report.records[0];
        assert_eq!(record.state, JobState::Created, "{record:?}");
        let task = record.task_id.clone().unwrap();
        let message = &record.error.as_ref().expect("the job says why").message;
        assert!(message.starts_with(FOLLOW_DEADLINE), "{message}");
        assert!(
            message.contains(&format!("task {task} exists at Kling"))
                && message.contains("may still run (and be billed)")
                && message.contains("run again on the same journal"),
            "{message}"
        );
        let mut summary = crate::summary::Summary::default();
        summary.count_jobs(&report.records);
        assert_eq!(summary.unfinished, 1);
        assert_eq!(
            summary.unfinished_by_reason,
            BTreeMap::from([(crate::summary::DEADLINE_REASON.to_owned(), 1)])
        );
        let table = summary.to_string();
        let row = |key: &str, value: &str| {
            table.lines().any(|l| {
                l.len() > key.len() + value.len()
                    && l.starts_with(key)
                    && l.ends_with(value)
                    && l[key.len()..l.len() - value.len()].trim().is_empty()
            })
        };
        let reason = format!("not followed: {}", crate::summary::DEADLINE_REASON);
        assert!(row(&format!("  {reason}"), "1"), "{table}");
        assert!(row("still running", "1 (run again to follow)"), "{table}");

        // A day's deadline (86 s): the task ends well within it, however loaded the machine.
        let long = default_follow_policy(speed).deadline(Duration::from_secs(24 * 3600));
        let engine = Engine::new(stack(), journal, RunOptions::new(long)).unwrap();
        let report = engine.run(&jobs, stop).await.unwrap();
        let record = &report.records[0];
        assert_eq!(record.state, JobState::Succeeded, "{record:?}");
        assert_eq!(record.task_id.as_deref(), Some(task.as_str()));
        assert!(record.error.is_none(), "{record:?}");
        let stats = server.stats();
        assert_eq!(stats.tasks_created, 1, "{stats:?}");
    }

    /// A rerun that follows again a task an earlier run's follow left (past its deadline, here)
    /// clears that run's error: stopped (Ctrl-C) before the follow ended, it kept the earlier
    /// error, and the summary said `not followed: deadline passed; …` as if this run's follow
    /// had passed its deadline. The job is now `still running` with no reason but to run
    /// again. A run stopped before it follows anything keeps the earlier reason, still true.
    #[tokio::test]
    async fn a_rerun_stopped_while_it_follows_again_does_not_report_the_earlier_runs_error() {
        let speed = 1000.0;
        // Tasks of half an hour (1.8 s real); the first follow gives up after 30 s (30 ms).
        let config = MockConfig::preset(Preset::Pro)
            .speed(speed)
            .task_duration(Duration::from_secs(1800), Duration::from_secs(1800));
        let server = kling_mock::MockServer::start(config).await.unwrap();
        let stack = || {
            Stack::new(
                StackConfig::preset(Tier::Pro).speed(speed).headroom(0.5),
                Credentials::api_key("key").unwrap(),
                &server.base_url(),
            )
            .unwrap()
        };
        let (jobs, _) = parse_jobs("{\"id\":\"a\",\"prompt\":\"a\"}\n");
        let journal = Journal::open_in_memory().unwrap();
        let short = FollowPolicy::new()
            .deadline(Duration::from_secs(30))
            .speed(speed);
        let engine = Engine::new(stack(), journal.clone(), RunOptions::new(short)).unwrap();
        let (_stop, stop) = watch::channel(false);
        let report = engine.run(&jobs, stop).await.unwrap();
        let earlier = report.records[0]
            .error
            .clone()
            .expect("the deadline passed");
        assert!(earlier.message.starts_with(FOLLOW_DEADLINE), "{earlier:?}");
        let long = || {
            let policy = default_follow_policy(speed).deadline(Duration::from_secs(24 * 3600));
            let mut options = RunOptions::new(policy);
            options.stop_grace = Duration::from_millis(50);
            options
        };

        // Stopped before it begins: it follows nothing, and the earlier reason holds.
        let (stopper, stop) = watch::channel(false);
        stopper.send_replace(true);
        let engine = Engine::new(stack(), journal.clone(), long()).unwrap();
        let report = engine.run(&jobs, stop).await.unwrap();
        assert!(report.interrupted);
        assert_eq!(report.records[0].error.as_ref(), Some(&earlier));

        // Stopped once it follows the task again (tracked, and a query sent since).
        let engine = Engine::new(stack(), journal.clone(), long()).unwrap();
        let (stopper, stop) = watch::channel(false);
        let run = tokio::spawn({
            let engine = engine.clone();
            let jobs = jobs.clone();
            async move { engine.run(&jobs, stop).await }
        });
        tokio::time::timeout(Duration::from_secs(30), async {
            while engine.tasks.lock().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let before = server.stats().requests_total;
            while server.stats().requests_total == before {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the task is followed");
        stopper.send_replace(true);
        let report = tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("the run stops")
            .unwrap()
            .unwrap();
        assert!(report.interrupted);
        let record = &report.records[0];
        assert_eq!(record.state, JobState::Created, "{record:?}");
        assert_eq!(record.error, None, "{record:?}");
        let mut summary = crate::summary::Summary::default();
        summary.count_jobs(&report.records);
        assert_eq!(summary.unfinished, 1, "{summary:?}");
        assert!(summary.unfinished_by_reason.is_empty(), "{summary:?}");
        let table = summary.to_string();
        assert!(!table.contains("deadline passed"), "{table}");
        assert!(table.contains("(run again to follow)"), "{table}");
        assert_eq!(server.stats().tasks_created, 1);
    }

    /// The same for a job left `created` without its task id, which the rerun looks up first:
    /// found, it stays `created`, and the earlier error went with it into the follow.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rerun_that_finds_a_created_jobs_task_clears_the_earlier_runs_error() {
        let (jobs, _) = parse_jobs("{\"id\":\"a\",\"prompt\":\"a\"}\n");
        let journal = Journal::open_in_memory().unwrap();
        journal.register(&jobs).unwrap();
        let earlier = ErrorInfo::new(1101, "account in arrears", None);
        journal
            .transition("a", JobState::Created, Update::error(earlier))
            .unwrap();
        let external_id = journal.external_id_for("a");
        // The lookup and every query: the task runs.
        let base = answering(format!(
            concat!(
                r#"{{"code":0,"message":"SUCCEED","request_id":"r","data":"#,
                r#"{{"task_id":"860000000000000001","task_status":"processing","#,
                r#""task_info":{{"external_task_id":"{}"}}}}}}"#
            ),
            external_id
        ))
        .await;
        let stack = Stack::new(
            StackConfig::preset(Tier::Pro).speed(100.0),
            Credentials::api_key("key").unwrap(),
            &base,
        )
        .unwrap();
        let mut options = RunOptions::new(default_follow_policy(100.0));
        options.stop_grace = Duration::from_millis(50);
        let engine = Engine::new(stack, journal, options).unwrap();
        let (stopper, stop) = watch::channel(false);
        let run = tokio::spawn({
            let engine = engine.clone();
            async move { engine.run(&jobs, stop).await }
        });
        tokio::time::timeout(Duration::from_secs(30), async {
            while engine.tasks.lock().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the task is followed");
        stopper.send_replace(true);
        let report = tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("the run stops")
            .unwrap()
            .unwrap();
        let record = &report.records[0];
        assert_eq!(record.state, JobState::Created, "{record:?}");
        assert_eq!(record.task_id.as_deref(), Some("860000000000000001"));
        assert_eq!(record.error, None, "{record:?}");
    }

    /// A run queues the jobs an earlier one left `not_submitted` (after a `1102`, a stop)
    /// many to a journal transaction: it took one each, one write to the disk each (2–3 ms),
    /// so a rerun of 100 000 such jobs spent minutes before it sent anything.
    #[test]
    fn jobs_not_submitted_are_queued_again_many_to_a_transaction() {
        let n = REQUEUE_CHUNK + 5;
        let text: String = (0..n)
            .map(|i| format!("{{\"id\":\"j{i}\",\"prompt\":\"p\"}}\n"))
            .collect();
        let (jobs, _) = parse_jobs(&text);
        let journal = Journal::open_in_memory().unwrap();
        journal.register(&jobs).unwrap();
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        let stopped = Update::error(ErrorInfo::new(1102, "credits", None));
        journal
            .transition_all(&ids, JobState::NotSubmitted, &stopped)
            .unwrap();
        let stack = Stack::new(
            StackConfig::preset(Tier::Pro),
            Credentials::api_key("key").unwrap(),
            "http://127.0.0.1:9",
        )
        .unwrap();
        let options = RunOptions::new(default_follow_policy(1.0));
        let engine = Engine::new(stack, journal.clone(), options).unwrap();
        let before = journal.commits();
        let plan = engine.plan(&jobs, &|| false).unwrap().unwrap();
        assert_eq!(journal.commits() - before, 2, "{n} jobs, two transactions");
        assert_eq!(plan.queued.len(), n);
        let progress = engine.progress();
        assert_eq!(progress.count(JobState::Queued), n);
        assert_eq!(progress.count(JobState::NotSubmitted), 0);
        for record in journal.records().unwrap() {
            assert_eq!(record.state, JobState::Queued, "{record:?}");
            assert!(
                record.error.is_none(),
                "the old reason is cleared: {record:?}"
            );
        }
        assert_eq!(
            journal.transitions("j0").unwrap(),
            ["queued", "not_submitted", "queued"]
        );
    }

    /// A stop while the jobs an earlier run left `not_submitted` are queued again ends the run
    /// between two transactions: the loop never looked at the stop, so a resumed run of
    /// 100 000 such jobs queued them all before a Ctrl-C was heard. The journal stays whole:
    /// the jobs queued so far are `queued`, the others `not_submitted` with their reason, and
    /// a later run queues the rest and sends them all.
    #[test]
    fn a_stop_while_jobs_are_queued_again_ends_the_plan_between_two_transactions() {
        let n = 3 * REQUEUE_CHUNK + 5;
        let text: String = (0..n)
            .map(|i| format!("{{\"id\":\"j{i}\",\"prompt\":\"p\"}}\n"))
            .collect();
        let (jobs, _) = parse_jobs(&text);
        let journal = Journal::open_in_memory().unwrap();
        journal.register(&jobs).unwrap();
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        let credits = ErrorInfo::new(1102, "credits", None);
        journal
            .transition_all(
                &ids,
                JobState::NotSubmitted,
                &Update::error(credits.clone()),
            )
            .unwrap();
        let stack = Stack::new(
            StackConfig::preset(Tier::Pro),
            Credentials::api_key("key").unwrap(),
            "http://127.0.0.1:9",
        )
        .unwrap();
        let options = RunOptions::new(default_follow_policy(1.0));
        let engine = Engine::new(stack.clone(), journal.clone(), options).unwrap();
        let before = journal.commits();
        // Stopped once the first transaction of jobs queued again is written.
        let stopped = || journal.commits() > before;
        assert!(
            engine.plan(&jobs, &stopped).unwrap().is_none(),
            "the plan ends at the stop"
        );
        assert_eq!(
            journal.commits() - before,
            1,
            "one transaction, then the stop"
        );
        let records = journal.records().unwrap();
        let queued: Vec<&JobRecord> = records
            .iter()
            .filter(|r| r.state == JobState::Queued)
            .collect();
        assert_eq!(queued.len(), REQUEUE_CHUNK);
        assert!(queued.iter().all(|r| r.error.is_none()), "{:?}", queued[0]);
        for record in &records[REQUEUE_CHUNK..] {
            assert_eq!(record.state, JobState::NotSubmitted, "{record:?}");
            assert_eq!(record.error.as_ref(), Some(&credits), "{record:?}");
        }
        assert_eq!(stack.attempts().requests(), 0, "nothing was sent");

        // A later run queues the rest, and sends every job.
        let engine = Engine::new(
            stack,
            journal.clone(),
            RunOptions::new(default_follow_policy(1.0)),
        )
        .unwrap();
        let before = journal.commits();
        let plan = engine.plan(&jobs, &|| false).unwrap().unwrap();
        assert_eq!(
            journal.commits() - before,
            3,
            "the rest, three transactions"
        );
        assert_eq!(plan.queued.len(), n);
        for record in journal.records().unwrap() {
            assert_eq!(record.state, JobState::Queued, "{record:?}");
        }
        assert_eq!(
            journal.transitions(&jobs[n - 1].id).unwrap(),
            ["queued", "not_submitted", "queued"]
        );
    }

    /// A stop while the jobs are registered ends the run there: it registered every job of
    /// the file first (100 000 jobs: seconds), then marked them all `not_submitted`. Nothing
    /// is written to the journal and nothing is sent; a resumed run's report keeps the
    /// journal's records as an earlier run left them.
    #[tokio::test(start_paused = true)]
    async fn a_stop_while_the_jobs_are_registered_ends_the_run_with_nothing_written() {
        let text = |n: usize| -> String {
            (0..n)
                .map(|i| format!("{{\"id\":\"j{i}\",\"prompt\":\"p\"}}\n"))
                .collect()
        };
        let (earlier, _) = parse_jobs(&text(3));
        let (jobs, _) = parse_jobs(&text(3 * crate::journal::REGISTER_CHECK));
        let journal = Journal::open_in_memory().unwrap();
        journal.register(&earlier).unwrap();
        journal
            .transition("j0", JobState::Succeeded, Update::task("t0"))
            .unwrap();
        let stack = Stack::new(
            StackConfig::preset(Tier::Pro),
            Credentials::api_key("key").unwrap(),
            "http://127.0.0.1:9",
        )
        .unwrap();
        let engine = Engine::new(
            stack.clone(),
            journal.clone(),
            RunOptions::new(default_follow_policy(1.0)),
        )
        .unwrap();
        let (_stopper, stopped) = watch::channel(true);
        let report = engine.run(&jobs, stopped).await.unwrap();
        assert!(report.interrupted);
        assert_eq!(report.creates, 0);
        assert_eq!(stack.attempts().requests(), 0);
        let states: Vec<(&str, JobState)> = report
            .records
            .iter()
            .map(|r| (r.job_id.as_str(), r.state))
            .collect();
        assert_eq!(
            states,
            [
                ("j0", JobState::Succeeded),
                ("j1", JobState::Queued),
                ("j2", JobState::Queued)
            ]
        );
        assert_eq!(journal.records().unwrap().len(), 3, "nothing registered");
    }

    /// A stop marks the jobs left `not_submitted` in chunks, yielding between two, so the
    /// other work of the runtime thread (follows, answers in flight, timers) goes on meanwhile:
    /// it marked them all in one go, one transaction each, and with 100 000 jobs left held
    /// the thread for as long.
    #[tokio::test(start_paused = true)]
    async fn a_stop_marks_the_jobs_left_in_chunks_and_other_work_goes_on_meanwhile() {
        let n = 4 * MARK_CHUNK + 7;
        let text: String = (0..n)
            .map(|i| format!("{{\"id\":\"j{i}\",\"prompt\":\"p\"}}\n"))
            .collect();
        let (jobs, _) = parse_jobs(&text);
        let stack = Stack::new(
            StackConfig::preset(Tier::Pro),
            Credentials::api_key("key").unwrap(),
            "http://127.0.0.1:9",
        )
        .unwrap();
        let journal = Journal::open_in_memory().unwrap();
        let engine = Engine::new(
            stack,
            journal.clone(),
            RunOptions::new(default_follow_policy(1.0)),
        )
        .unwrap();
        let plan = engine.plan(&jobs, &|| false).unwrap().unwrap();
        let progress = engine.progress();
        // Other work on this (the only) runtime thread: a task that notes, each time it runs,
        // how many jobs are marked.
        let done = Arc::new(AtomicBool::new(false));
        let other = tokio::spawn({
            let (progress, done) = (progress.clone(), done.clone());
            async move {
                let mut seen = Vec::new();
                while !done.load(Ordering::SeqCst) {
                    seen.push(progress.count(JobState::NotSubmitted));
                    tokio::task::yield_now().await;
                }
                seen
            }
        });
        let (_stopper, stop) = watch::channel(true);
        let (tx, _rx) = mpsc::unbounded_channel();
        engine.create_all(plan.queued, tx, stop).await.unwrap();
        done.store(true, Ordering::SeqCst);
        let seen = other.await.unwrap();
        assert!(
            seen.iter().any(|&marked| marked > 0 && marked < n),
            "the other task ran while the jobs were marked: {seen:?}"
        );
        assert_eq!(progress.count(JobState::NotSubmitted), n);
        assert_eq!(progress.count(JobState::Queued), 0);
        for record in journal.records().unwrap() {
            assert_eq!(record.state, JobState::NotSubmitted, "{record:?}");
            let error = record.error.unwrap();
            assert_eq!(error.message, "not submitted: the run was stopped");
        }
        assert_eq!(
            journal.transitions(&format!("j{}", n - 1)).unwrap(),
            ["queued", "not_submitted"]
        );
    }

    /// A stop while a create waits (nothing answers: it is retried until the grace ends)
    /// leaves no job `queued` without a word: the jobs its pool had not reached stayed
    /// `queued`, counted as not submitted with no reason. They are `not_submitted` as stopped,
    /// and the one in flight stays `creating` (looked up by the next run).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_during_a_create_marks_every_job_left_not_submitted() {
        let n = MARK_CHUNK + 10;
        let text: String = (0..n)
            .map(|i| format!("{{\"id\":\"j{i}\",\"prompt\":\"p\"}}\n"))
            .collect();
        let (jobs, _) = parse_jobs(&text);
        // A port that refuses connections: the create is retried, never answered.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let stack = Stack::new(
            StackConfig::preset(Tier::Pro),
            Credentials::api_key("key").unwrap(),
            &base,
        )
        .unwrap();
        let journal = Journal::open_in_memory().unwrap();
        let mut options = RunOptions::new(default_follow_policy(1.0));
        options.stop_grace = Duration::from_millis(50);
        let engine = Engine::new(stack, journal, options).unwrap();
        let (stopper, stop) = watch::channel(false);
        let run = tokio::spawn({
            let engine = engine.clone();
            let jobs = jobs.clone();
            async move { engine.run(&jobs, stop).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        stopper.send(true).unwrap();
        let report = run.await.unwrap().unwrap();
        assert!(report.interrupted);
        let by_state = |state| report.records.iter().filter(|r| r.state == state).count();
        assert_eq!(by_state(JobState::Creating), 1, "{:?}", report.records[0]);
        assert_eq!(by_state(JobState::NotSubmitted), n - 1);
        for record in report.records.iter().skip(1) {
            assert_eq!(
                record.error.as_ref().unwrap().message,
                STOPPED,
                "{record:?}"
            );
        }
    }

    /// A stop while a resumed run lists the running tasks or looks up a create of unknown
    /// outcome ends the run at once: with nothing answering, each of these calls is retried
    /// for half a minute and more, and the run went on with them (a minute and more after
    /// Ctrl-C) before it stopped. The job not looked up stays `creating` for a later run, and
    /// the jobs not sent are `not_submitted` as stopped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_during_the_lookups_of_a_resumed_run_ends_it_at_once() {
        let (jobs, _) = parse_jobs(concat!(
            "{\"id\":\"sent\",\"prompt\":\"a\"}\n",
            "{\"id\":\"next\",\"prompt\":\"b\"}\n",
        ));
        // A port that refuses connections: the listing of running tasks is retried, never
        // answered.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let refusing = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        // A server that lists no running task, and never answers a lookup (it says when one
        // arrives).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent = format!("http://{}", listener.local_addr().unwrap());
        let (looked_up, mut lookup_arrived) = watch::channel(false);
        let app = axum::Router::new().fallback(move |uri: http::Uri| async move {
            if uri.path().contains("/kb-") {
                looked_up.send_replace(true);
                std::future::pending::<()>().await;
            }
            (
                [(http::header::CONTENT_TYPE, "application/json")],
                r#"{"code":0,"message":"SUCCEED","request_id":"r","data":[]}"#,
            )
        });
        tokio::spawn(async move { axum::serve(listener, app).await });

        for (base, during) in [(refusing, "listing"), (silent, "lookup")] {
            let journal = Journal::open_in_memory().unwrap();
            journal.register(&jobs).unwrap();
            journal
                .transition("sent", JobState::Creating, Update::default())
                .unwrap();
            // The lookup case: its 15 listings (one a second at 1×) go by at once, and the
            // lookup's first attempt waits 36 s.
            let config = match during {
                "lookup" => StackConfig::preset(Tier::Pro)
                    .speed(100.0)
                    .attempt_timeout(Duration::from_secs(3600)),
                _ => StackConfig::preset(Tier::Pro),
            };
            let stack = Stack::new(config, Credentials::api_key("key").unwrap(), &base).unwrap();
            let mut options = RunOptions::new(default_follow_policy(1.0));
            options.stop_grace = Duration::from_millis(50);
            let engine = Engine::new(stack, journal, options).unwrap();
            let (stopper, stop) = watch::channel(false);
            let run = tokio::spawn({
                let engine = engine.clone();
                let jobs = jobs.clone();
                async move { engine.run(&jobs, stop).await }
            });
            if during == "lookup" {
                tokio::time::timeout(Duration::from_secs(30), lookup_arrived.wait_for(|a| *a))
                    .await
                    .expect("the job is looked up")
                    .unwrap();
            } else {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            stopper.send(true).unwrap();
            let report = tokio::time::timeout(Duration::from_secs(3), run)
                .await
                .unwrap_or_else(|_| panic!("a stop during the {during}: the run ends soon"))
                .unwrap()
                .unwrap();
            assert!(report.interrupted);
            let record = |id: &str| report.records.iter().find(|r| r.job_id == id).unwrap();
            assert_eq!(record("sent").state, JobState::Creating, "looked up later");
            assert_eq!(record("next").state, JobState::NotSubmitted);
            assert_eq!(record("next").error.as_ref().unwrap().message, STOPPED);
            assert_eq!(report.creates, 0);
        }
    }

    /// A final refusal sent with HTTP 429 (an undocumented code, `1103` under 429) refuses the
    /// account, as every code Kling sends with 429 does: the run stops creating after the
    /// first, as after `1101`, and every job is `not_submitted` with the code, for a later run.
    /// Each create was sent and refused, then looked up and refused again: every job ended
    /// `creating` ("create outcome unknown", no reason in the summary), and each rerun did
    /// nothing but look them all up again. A final refusal under another status (`1103` with
    /// its 403), or a refusal of the request itself under 429 (`1301`), stays the job's alone:
    /// `1301`, its lookup refused too, leaves the job unknown; `1103` refused on the lookup as
    /// well settles it `not_submitted` (without the permission, nothing was created).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_final_refusal_sent_with_429_stops_the_creates_as_a_refusal_of_the_account() {
        let n = 6;
        let text: String = (0..n)
            .map(|i| format!("{{\"id\":\"j{i}\",\"prompt\":\"p\"}}\n"))
            .collect();
        let (jobs, _) = parse_jobs(&text);
        let cases = [
            (429, 1104, true),
            (429, 1103, true),
            (403, 1103, false),
            (429, 1301, false),
        ];
        for (status, code, halts) in cases {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let body = format!(r#"{{"code":{code},"message":"refused","request_id":"r"}}"#);
            let app = axum::Router::new().fallback(move || {
                let body = body.clone();
                async move {
                    (
                        http::StatusCode::from_u16(status).unwrap(),
                        [(http::header::CONTENT_TYPE, "application/json")],
                        body,
                    )
                }
            });
            tokio::spawn(async move { axum::serve(listener, app).await });
            let stack = Stack::new(
                StackConfig::preset(Tier::Pro).speed(100.0).headroom(0.5),
                Credentials::api_key("key").unwrap(),
                &base,
            )
            .unwrap();
            let options = RunOptions::new(default_follow_policy(100.0));
            let engine = Engine::new(stack, Journal::open_in_memory().unwrap(), options).unwrap();
            let (_stop, stop) = watch::channel(false);
            let report = engine.run(&jobs, stop).await.unwrap();
            let case = format!("{status} {code}");
            let mut summary = crate::summary::Summary::default();
            summary.count_jobs(&report.records);
            if !halts {
                assert_eq!(report.creates, n as u64, "{case}: each job its own");
                let reason = format!("{code} {}", Code::from_i64(code).description());
                if code == 1103 {
                    // No permission for the create nor for its lookup: nothing was created.
                    assert_eq!(summary.unknown, 0, "{case}");
                    assert_eq!(
                        summary.not_submitted_by_reason,
                        BTreeMap::from([(reason, n)]),
                        "{case}"
                    );
                    continue;
                }
                // Refused, and so was the lookup: unknown, and the summary says why.
                assert_eq!(summary.unknown, n, "{case}");
                assert_eq!(
                    summary.unknown_by_reason,
                    BTreeMap::from([(reason, n)]),
                    "{case}"
                );
                continue;
            }
            assert_eq!(report.creates, 1, "{case}");
            for record in &report.records {
                assert_eq!(record.state, JobState::NotSubmitted, "{case}: {record:?}");
                assert_eq!(record.error.as_ref().unwrap().code, code, "{case}");
            }
            assert_eq!(summary.unknown, 0, "{case}");
            assert_eq!(
                summary.not_submitted_by_reason.values().sum::<usize>(),
                n,
                "{case}: {summary:?}"
            );
        }
    }

    /// A job an earlier run left `creating` with its create refused `1103` (no permission for
    /// this API or model), whose lookup is refused `1103` again, is settled `not_submitted`
    /// with the create's refusal: it stayed `creating`, looked up (and refused) by every rerun,
    /// never settled, the summary saying to run again. Not sent by this run (it would be
    /// refused the same); the next sends it. A job `creating` for another reason (a run killed
    /// mid-create) whose lookup is refused `1103` stays unknown: that create may have been
    /// made before the permission was taken away.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resumed_create_refused_1103_whose_lookup_is_refused_1103_is_not_submitted() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().fallback(|| async {
            (
                http::StatusCode::FORBIDDEN,
                [(http::header::CONTENT_TYPE, "application/json")],
                r#"{"code":1103,"message":"no permission","request_id":"r2"}"#,
            )
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        let (jobs, _) = parse_jobs(concat!(
            "{\"id\":\"refused\",\"prompt\":\"a\"}\n",
            "{\"id\":\"killed\",\"prompt\":\"b\"}\n",
        ));
        let journal = Journal::open_in_memory().unwrap();
        journal.register(&jobs).unwrap();
        let refusal = ErrorInfo::new(1103, "no permission", Some("r1".into()));
        journal
            .transition(
                "refused",
                JobState::Creating,
                Update::error(refusal.clone()),
            )
            .unwrap();
        journal
            .transition("killed", JobState::Creating, Update::default())
            .unwrap();
        let stack = Stack::new(
            StackConfig::preset(Tier::Pro).speed(100.0).headroom(0.5),
            Credentials::api_key("key").unwrap(),
            &base,
        )
        .unwrap();
        let options = RunOptions::new(default_follow_policy(100.0));
        let engine = Engine::new(stack, journal.clone(), options).unwrap();
        let (_stop, stop) = watch::channel(false);
        let report = engine.run(&jobs, stop).await.unwrap();
        assert_eq!(report.creates, 0);
        let record = |id: &str| report.records.iter().find(|r| r.job_id == id).unwrap();
        assert_eq!(record("refused").state, JobState::NotSubmitted);
        assert_eq!(record("refused").error.as_ref(), Some(&refusal));
        assert_eq!(record("killed").state, JobState::Creating);
        let mut summary = crate::summary::Summary::default();
        summary.count_jobs(&report.records);
        let reason = "1103 no permission for this api or model".to_owned();
        assert_eq!(
            summary.not_submitted_by_reason,
            BTreeMap::from([(reason, 1)])
        );
        assert_eq!(summary.unknown, 1);
        assert_eq!(
            journal.transitions("refused").unwrap(),
            ["queued", "creating", "not_submitted"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_account_or_auth_error_on_a_query_keeps_the_job_created_for_the_next_run() {
        let cases = [
            (Switches::new().arrears(true), "key", 1101),
            (Switches::new().abnormal(true), "key", 1100),
            (Switches::new().ip_denied(true), "key", 1304),
            (Switches::new(), "revoked-key", 1002),
        ];
        for (switches, key, code) in cases {
            let (task_id, result) = follow_on_mock(switches, key, None).await;
            match &result {
                Err(FollowError::Api { error, .. }) => assert_eq!(error.code().as_i64(), code),
                other => panic!("the follower ends with the Kling error: {other:?}"),
            }
            let (journal, record) = finish_created_job(&task_id, result).await;
            assert_eq!(record.state, JobState::Created, "{code}: {record:?}");
            assert_eq!(record.task_id.as_deref(), Some(task_id.as_str()));
            let error = record.error.expect("the error is reported");
            assert_eq!(error.code, code);
            assert!(error.message.contains("may still run"), "{error:?}");
            assert_eq!(
                journal.transitions("cat").unwrap(),
                ["queued", "creating", "created"]
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_kling_does_not_know_fails_its_job_naming_the_task() {
        let (task_id, result) =
            follow_on_mock(Switches::new(), "key", Some("860000000000000404")).await;
        match &result {
            Err(FollowError::Api { error, .. }) => assert_eq!(error.code(), Code::NotFound),
            other => panic!("the follower ends with 1203: {other:?}"),
        }
        let (_, record) = finish_created_job(&task_id, result).await;
        assert_eq!(record.state, JobState::Failed);
        let error = record.error.unwrap();
        assert_eq!(error.code, 1203);
        assert!(error.message.contains("860000000000000404"), "{error:?}");
        assert!(error.request_id.is_some());
    }

    /// A resumed run whose succeeded jobs have files missing (a file of 100 000 jobs run
    /// once without `--download`, then with it) holds a few downloads at a time, not one
    /// waiting task per job: each job's download was spawned at once, to wait for its turn,
    /// and such a rerun took 435 MB where the run itself took 100 MB.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resumed_run_with_many_files_missing_holds_only_the_downloads_it_runs() {
        use std::sync::atomic::AtomicUsize;

        const JOBS: usize = 400;
        // A result server that accepts and never answers: the downloads it took wait.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
        let text: String = (0..JOBS)
            .map(|i| format!("{{\"id\":\"j{i}\",\"prompt\":\"p{i}\"}}\n"))
            .collect();
        let (jobs, _) = parse_jobs(&text);
        let journal = Journal::open_in_memory().unwrap();
        journal.register(&jobs).unwrap();
        for (i, job) in jobs.iter().enumerate() {
            let update = Update {
                task_id: Some(format!("t{i}")),
                urls: Some(vec![format!("http://{addr}/outputs/{i}.mp4")]),
                ..Update::default()
            };
            journal
                .transition(&job.id, JobState::Succeeded, update)
                .unwrap();
        }
        let dir = std::env::temp_dir().join(format!("kling-batch-missing-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let stack = Stack::new(
            StackConfig::preset(Tier::Pro),
            Credentials::api_key("key").unwrap(),
            "http://127.0.0.1:9",
        )
        .unwrap();
        let options = RunOptions::new(default_follow_policy(1.0)).download_dir(dir.clone());
        let engine = Engine::new(stack, journal, options).unwrap();
        let (stop_tx, stop) = watch::channel(false);
        let run = tokio::spawn(async move { engine.run(&jobs, stop).await });
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while accepted.load(Ordering::SeqCst) < download::MAX_IN_FLIGHT {
            assert!(std::time::Instant::now() < deadline, "no download began");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let alive = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        assert_eq!(accepted.load(Ordering::SeqCst), download::MAX_IN_FLIGHT);
        assert!(
            alive < 64,
            "{alive} tasks alive for {} downloads running",
            download::MAX_IN_FLIGHT
        );
        stop_tx.send(true).unwrap();
        let report = run.await.unwrap().unwrap();
        assert!(report.interrupted);
        assert_eq!(report.records.len(), JOBS);
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A server on a free local port that answers every request with what `body` holds at the
    /// time (code 0, 200; `{base}` in it reads as the server's own URL), and the paths asked.
    async fn answering_as_told(body: Arc<Mutex<String>>) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let asked = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new().fallback({
            let (base, asked) = (base.clone(), asked.clone());
            move |uri: http::Uri| {
                asked.lock().unwrap().push(uri.to_string());
                let body = body.lock().unwrap().replace("{base}", &base);
                async move { ([(http::header::CONTENT_TYPE, "application/json")], body) }
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        (base, asked)
    }

    /// The envelope of a legacy task `id` that succeeded, with `result` as its `task_result`.
    fn succeeded_legacy(id: &str, result: &str) -> String {
        format!(
            r#"{{"code":0,"message":"SUCCEED","request_id":"r","data":{{"task_id":"{id}","task_status":"succeed","task_result":{result}}}}}"#
        )
    }

    /// A signed callback that carries the status alone (no `task_result`) ended the follow
    /// with a report without result URLs: the job counted as `ok` with nothing to fetch, and
    /// no later run asked again. Its task is queried once now, and the job gets the query's
    /// URLs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_callback_without_results_is_completed_by_one_query_of_the_task() {
        let speed = 1000.0;
        let config = MockConfig::preset(Preset::Pro)
            .speed(speed)
            .task_duration(Duration::from_secs(10), Duration::from_secs(10));
        let server = kling_mock::MockServer::start(config).await.unwrap();
        let stack = Stack::new(
            StackConfig::preset(Tier::Pro).speed(speed).headroom(0.5),
            Credentials::api_key("key").unwrap(),
            &server.base_url(),
        )
        .unwrap();
        let (jobs, _) = parse_jobs("{\"id\":\"a\",\"prompt\":\"a\"}\n");
        let journal = Journal::open_in_memory().unwrap();
        // Callbacks first: the follow queries only after an hour, so the callback ends it.
        let policy = FollowPolicy::new().callbacks_first(Duration::from_secs(3600));
        let engine = Engine::new(stack, journal.clone(), RunOptions::new(policy)).unwrap();
        let (_stop, stop) = watch::channel(false);
        let run = tokio::spawn({
            let (engine, jobs) = (engine.clone(), jobs.clone());
            async move { engine.run(&jobs, stop).await }
        });
        // Created, and ended at the mock (a query of it names its result).
        let task = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let task = engine.tasks.lock().unwrap().keys().next().cloned();
                if let Some(task) = task {
                    let asked = Asked::Legacy {
                        path: ENDPOINT,
                        id: &task,
                    };
                    if let Ok(found) = engine.query_tasks(asked).await
                        && found.iter().any(has_results)
                    {
                        return task;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the task is created and ends");
        let before = server.stats().requests_total;
        let payload = format!(r#"{{"task_id":"{task}","task_status":"succeed"}}"#);
        let thin = kling_tower::webhook::parse_task(payload.as_bytes()).unwrap();
        assert!(thin.urls.is_empty());
        engine.on_callback(payload.as_bytes(), thin, true).await;
        let report = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the callback ends the run")
            .unwrap()
            .unwrap();
        let record = &report.records[0];
        assert_eq!(record.state, JobState::Succeeded, "{record:?}");
        assert_eq!(record.urls.len(), 1, "{record:?}");
        assert_eq!(record.error, None, "{record:?}");
        assert_eq!(
            server.stats().requests_total - before,
            1,
            "one query of the task"
        );
        let mut summary = crate::summary::Summary::default();
        summary.count_jobs(&report.records);
        assert_eq!((summary.ok, summary.no_result_url), (1, 0), "{summary:?}");
    }

    /// A succeeded report whose URLs kling-batch cannot read (a URL of a shape it does not
    /// know, which kling-core leaves out), and a query of it that names none either: the job
    /// was `ok` with nothing to fetch, the results without a word. Now it is counted apart
    /// (`succeeded, no result URL`, exit status 1), its results line says why, it cost one
    /// query, and a later run asks once more: the URLs found then are recorded and fetched.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_succeeded_task_without_a_result_url_is_counted_apart_and_asked_again() {
        let task = "860000000000000001";
        let unreadable = succeeded_legacy(task, r#"{"videos":[{"id":"v","url":{"href":"x"}}]}"#);
        let body = Arc::new(Mutex::new(unreadable.clone()));
        let (base, asked) = answering_as_told(body.clone()).await;
        let stack = || {
            Stack::new(
                StackConfig::preset(Tier::Pro),
                Credentials::api_key("key").unwrap(),
                &base,
            )
            .unwrap()
        };
        let (jobs, _) = parse_jobs("{\"id\":\"cat\",\"prompt\":\"a cat\"}\n");
        let journal = Journal::open_in_memory().unwrap();
        journal.register(&jobs).unwrap();
        journal
            .transition("cat", JobState::Creating, Update::default())
            .unwrap();
        journal
            .transition("cat", JobState::Created, Update::task(task))
            .unwrap();
        let dir = std::env::temp_dir().join(format!("kling-batch-no-url-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let options = || RunOptions::new(default_follow_policy(1.0)).download_dir(dir.clone());
        let engine = Engine::new(stack(), journal.clone(), options()).unwrap();
        engine.track(&jobs[0], &TaskRef::legacy(ENDPOINT, task), Instant::now());
        let thin = Envelope::parse(unreadable.as_bytes()).unwrap().tasks[0].clone();
        assert!(thin.urls.is_empty());
        engine.finish("cat", task, Ok(thin)).await.unwrap();

        let queries = |asked: &Mutex<Vec<String>>| {
            asked
                .lock()
                .unwrap()
                .iter()
                .filter(|p| p.starts_with(ENDPOINT))
                .count()
        };
        assert_eq!(queries(&asked), 1, "one query: {:?}", asked.lock().unwrap());
        let records = journal.records().unwrap();
        let record = &records[0];
        assert_eq!(record.state, JobState::Succeeded, "{record:?}");
        assert!(record.urls.is_empty(), "{record:?}");
        let error = record.error.as_ref().expect("why there is no result");
        assert!(error.message.starts_with(NO_RESULT), "{error:?}");
        assert!(error.message.contains(task), "{error:?}");
        let line = serde_json::to_value(crate::output::ResultLine::of(record)).unwrap();
        assert_eq!(line["state"], "succeeded");
        assert_eq!(line["error"]["message"], error.message.as_str(), "{line}");
        let mut summary = crate::summary::Summary::default();
        summary.count_jobs(&records);
        summary.count_missing_files(&records);
        assert_eq!((summary.ok, summary.no_result_url), (0, 1), "{summary:?}");
        assert!(
            summary
                .to_string()
                .contains("succeeded, no result URL  1 (run again to ask for them)"),
            "{summary}"
        );
        assert_eq!(crate::cli::exit_code(&summary), 1);

        // A later run asks once more; still none: one query, and the job stays as it was.
        let engine = Engine::new(stack(), journal.clone(), options()).unwrap();
        let (_stop, stop) = watch::channel(false);
        let report = engine.run(&jobs, stop).await.unwrap();
        assert_eq!(queries(&asked), 2, "{:?}", asked.lock().unwrap());
        assert!(report.records[0].urls.is_empty(), "{:?}", report.records[0]);
        assert!(report.records[0].error.is_some(), "{:?}", report.records[0]);

        // And a later one finds the URL: recorded, the error gone, the file fetched.
        *body.lock().unwrap() = succeeded_legacy(task, r#"{"videos":[{"url":"{base}/v/0.mp4"}]}"#);
        let engine = Engine::new(stack(), journal.clone(), options()).unwrap();
        let (_stop, stop) = watch::channel(false);
        let report = engine.run(&jobs, stop).await.unwrap();
        assert_eq!(queries(&asked), 3, "{:?}", asked.lock().unwrap());
        let record = &report.records[0];
        assert_eq!(record.state, JobState::Succeeded, "{record:?}");
        assert_eq!(record.urls, [format!("{base}/v/0.mp4")], "{record:?}");
        assert_eq!(record.error, None, "{record:?}");
        assert_eq!(record.files.len(), 1, "{record:?}");
        assert!(
            std::path::Path::new(&record.files[0]).exists(),
            "{record:?}"
        );
        let mut summary = crate::summary::Summary::default();
        summary.count_jobs(&report.records);
        summary.count_missing_files(&report.records);
        assert_eq!((summary.ok, summary.no_result_url), (1, 0), "{summary:?}");
        assert_eq!(crate::cli::exit_code(&summary), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A resumed run asks for the results of many new-style tasks a batch query at a time,
    /// [`RESULTS_BATCH`] ids to a query, never a query each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resumed_run_asks_for_many_new_style_results_a_batch_at_a_time() {
        let n = RESULTS_BATCH + 3;
        let body = Arc::new(Mutex::new(
            r#"{"code":0,"message":"SUCCEED","request_id":"r","data":[]}"#.to_owned(),
        ));
        let (base, asked) = answering_as_told(body).await;
        let stack = Stack::new(
            StackConfig::preset(Tier::Pro),
            Credentials::api_key("key").unwrap(),
            &base,
        )
        .unwrap();
        let text: String = (0..n)
            .map(|i| {
                format!("{{\"id\":\"j{i}\",\"prompt\":\"p\",\"endpoint\":\"/text-to-video/kling-3.0\"}}\n")
            })
            .collect();
        let (jobs, _) = parse_jobs(&text);
        let journal = Journal::open_in_memory().unwrap();
        journal.register(&jobs).unwrap();
        for (i, job) in jobs.iter().enumerate() {
            journal
                .transition(&job.id, JobState::Succeeded, Update::task(format!("t{i}")))
                .unwrap();
        }
        let engine = Engine::new(
            stack,
            journal.clone(),
            RunOptions::new(default_follow_policy(1.0)),
        )
        .unwrap();
        let (_stop, stop) = watch::channel(false);
        let report = engine.run(&jobs, stop).await.unwrap();
        let asked = asked.lock().unwrap().clone();
        assert_eq!(asked.len(), 2, "{asked:?}");
        assert!(asked[0].starts_with("/tasks?task_ids=t0,t1,"), "{asked:?}");
        assert_eq!(
            asked[1],
            format!("/tasks?task_ids=t{},t{},t{}", n - 3, n - 2, n - 1)
        );
        for record in &report.records {
            let error = record.error.as_ref().expect("still no result");
            assert!(error.message.starts_with(NO_RESULT), "{record:?}");
        }
    }

    /// The loop that clears the errors of tasks an earlier run left `created` (4 096 jobs to
    /// a transaction) never looked at the stop: a rerun of 100 000 such jobs cleared them all
    /// before a Ctrl-C was heard. It looks before each transaction now, and the jobs not
    /// reached keep their earlier reason.
    #[test]
    fn a_stop_while_earlier_errors_are_cleared_ends_it_between_two_transactions() {
        let n = 3 * REQUEUE_CHUNK + 5;
        let text: String = (0..n)
            .map(|i| format!("{{\"id\":\"j{i}\",\"prompt\":\"p\"}}\n"))
            .collect();
        let (jobs, _) = parse_jobs(&text);
        let journal = Journal::open_in_memory().unwrap();
        journal.register(&jobs).unwrap();
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        let earlier = ErrorInfo::new(1101, "arrears", None);
        journal
            .transition_all(&ids, JobState::Created, &Update::error(earlier.clone()))
            .unwrap();
        let stack = Stack::new(
            StackConfig::preset(Tier::Pro),
            Credentials::api_key("key").unwrap(),
            "http://127.0.0.1:9",
        )
        .unwrap();
        let options = RunOptions::new(default_follow_policy(1.0));
        let engine = Engine::new(stack, journal.clone(), options).unwrap();
        let refs: Vec<&Job> = jobs.iter().collect();
        let before = journal.commits();
        let stopped = || journal.commits() > before;
        assert!(!engine.clear_stale_errors(&refs, &stopped).unwrap());
        assert_eq!(
            journal.commits() - before,
            1,
            "one transaction, then the stop"
        );
        let records = journal.records().unwrap();
        for record in &records[..REQUEUE_CHUNK] {
            assert_eq!(record.error, None, "{record:?}");
        }
        for record in &records[REQUEUE_CHUNK..] {
            assert_eq!(record.error.as_ref(), Some(&earlier), "{record:?}");
        }
        let before = journal.commits();
        assert!(engine.clear_stale_errors(&refs, &|| false).unwrap());
        assert_eq!(journal.commits() - before, 4);
        assert!(journal.records().unwrap().iter().all(|r| r.error.is_none()));
    }
}
