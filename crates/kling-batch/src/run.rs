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
//! - **One API per journal**: before anything is sent, the run binds its journal to the base
//!   URL of its stack ([`Stack::base_url`]), in the transaction that registers its jobs
//!   ([`Journal::register_at`]): a journal whose jobs were sent elsewhere is refused
//!   ([`OtherBaseUrl`]), since its tasks are not there and a resume would create them again
//!   (billed twice), unless [`RunOptions::base_url_moved_from`] names the base URL it
//!   recorded. A run refused (for this, or for a job edited under its id) or stopped while it
//!   registers leaves the journal as it was. A library user needs no call of their own for
//!   this ([`Journal::bind_base_url`] is for jobs sent by other means).
//! - **Resume**: jobs whose create may have been sent (`creating`) are looked up by their
//!   external id first (`GET {endpoint}/{id}` or `GET /tasks?external_task_ids=`); jobs
//!   already created are followed (in one batch), after the slots they hold were adopted
//!   ([`SlotsHandle::reconcile`](kling_concurrency::SlotsHandle::reconcile)). Nothing is created
//!   twice: a lookup's "no such task" settles a job as never made only when asked
//!   [`RunOptions::lookup_settle`] after its create could last have left (a task may be listed
//!   a moment after it was made); asked sooner, it is looked up once more then. A create whose
//!   answer was lost and whose lookup right after finds nothing stays `creating`, its error
//!   saying so, for a later run. A job of the journal left open that the jobs file no longer
//!   holds is named in a warning. A listing or lookup refused for the account or its
//!   credentials halts the run: the remaining lookups would be refused the same way, and the
//!   jobs stay `creating` for a later run. So does a stop, at once, even in the middle of a
//!   listing or a lookup.
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
//!   tasks end in this run or a resumed run fetches what an earlier one left missing. A file
//!   the result server refuses as an expired result URL is refused (`403`, `404`, `410`),
//!   30 days or more after its task ended ([`download::expired`]), is recorded once
//!   ([`download::GONE`]) and not fetched again ([`RunOptions::refetch_gone`] sets the marks
//!   aside); refused so sooner, it is left for the next run, once the task was asked for
//!   its result URLs again and they were fetched, a bounded number of times
//!   ([`download::MAX_REFRESHES`]; past the 30 days too with `refetch_gone`). `429`, `408`
//!   and `5xx` are asked again a few times in the run ([`download::MAX_TRIES`]).
//! - **Stop** (Ctrl-C): the stack's drain gate closes (no create leaves any more), creates in
//!   flight get a short grace to be recorded, the follows and downloads are aborted and waited
//!   for (one busy on another thread may still record what it was at, never after the run
//!   reads the journal for its report), and the run ends; a later run picks up. A create
//!   still waiting then (for its pool's slot, say) with no attempt sent was never sent: its
//!   job is `not_submitted`, sent by the next run without a lookup. The jobs left are marked
//!   `not_submitted` (so are they after a halt) a few hundred to a journal transaction, the
//!   run's other work going on between two.
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

use self::failure::{Failure, failure_of};
use crate::download::{self, DownloadTimeouts};
use crate::error::{JournalError, OtherBaseUrl, RunError, SetupError, redacted_url};
use crate::jobs::Job;
use crate::journal::{ApiOrigin, BaseUrlBinding, ErrorInfo, JobRecord, JobState, Journal, Update};
use crate::progress::Progress;
use crate::stack::{BatchService, Stack};
use crate::tally::CallAttempts;

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
    /// Whether files an earlier run recorded gone for good ([`download::GONE`]) are fetched
    /// again (`--refetch-gone`): the marks do not hold for this run.
    pub refetch_gone: bool,
    /// How tasks are queried.
    pub follow: FollowPolicy,
    /// How long after a create of unknown outcome a lookup that finds nothing settles it as
    /// never made (`None`: [`LOOKUP_SETTLE`] of API time, at the stack's speed): a task may
    /// take a moment to be listed by its external id, and a create sent again on a lookup made
    /// sooner may bill twice.
    pub lookup_settle: Option<Duration>,
    /// How long creates in flight may still finish after a stop.
    pub stop_grace: Duration,
    /// The base URL the journal's jobs were sent to, which the stack's now replaces (the same
    /// Kling account and region behind a renamed proxy or host): the journal takes the
    /// stack's in its place ([`Journal::bind_base_url`]'s `moved_from`).
    pub base_url_moved_from: Option<ApiOrigin>,
    /// Called once the journal records the stack's base URL in the place of none or another
    /// ([`RunOptions::on_base_url_bound`]).
    base_url_bound: Option<BoundHook>,
}

/// A hook told how a run bound its journal to its stack's base URL.
type BoundHook = Arc<dyn Fn(&BaseUrlBinding) + Send + Sync>;

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
            .field("refetch_gone", &self.refetch_gone)
            .field("follow", &self.follow)
            .field("lookup_settle", &self.lookup_settle)
            .field("stop_grace", &self.stop_grace)
            .field("base_url_moved_from", &self.base_url_moved_from)
            .field(
                "base_url_bound",
                &self.base_url_bound.as_ref().map(|_| "<hook>"),
            )
            .finish()
    }
}

impl RunOptions {
    /// No callbacks, no downloads (with the default [`DownloadTimeouts`] and at most
    /// [`MAX_IN_FLIGHT`](download::MAX_IN_FLIGHT) jobs downloading at once when set), `follow`
    /// as given, a lookup settle of [`LOOKUP_SETTLE`] at the stack's speed, a 2 s grace.
    pub fn new(follow: FollowPolicy) -> Self {
        RunOptions {
            callback_url: None,
            download_dir: None,
            download_timeouts: DownloadTimeouts::default(),
            max_downloads: download::MAX_IN_FLIGHT,
            refetch_gone: false,
            follow,
            lookup_settle: None,
            stop_grace: Duration::from_secs(2),
            base_url_moved_from: None,
            base_url_bound: None,
        }
    }

    /// Says that the journal's jobs, sent to `from`, are now reached at the stack's base URL
    /// (a proxy or host renamed, the same Kling account and region): a journal that recorded
    /// `from` takes the stack's in its place, and is refused as before if it recorded another
    /// (`kling-batch run --base-url-moved-from`).
    pub fn base_url_moved_from(mut self, from: ApiOrigin) -> Self {
        self.base_url_moved_from = Some(from);
        self
    }

    /// Calls `hook` when the run records its stack's base URL in a journal that recorded none
    /// or another ([`BaseUrlBinding`] other than `Same`), before anything is sent; not when
    /// the journal recorded that base URL already, nor for a run refused.
    pub fn on_base_url_bound(
        mut self,
        hook: impl Fn(&BaseUrlBinding) + Send + Sync + 'static,
    ) -> Self {
        self.base_url_bound = Some(Arc::new(hook));
        self
    }

    /// Sets how long after a create of unknown outcome a lookup must come for its "no such
    /// task" to settle the job as never made, in real time (the default, [`LOOKUP_SETTLE`],
    /// is API time, scaled by the stack's speed).
    pub fn lookup_settle(mut self, settle: Duration) -> Self {
        self.lookup_settle = Some(settle);
        self
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

    /// Fetches again, with `--download`, the files an earlier run recorded gone for good
    /// ([`download::GONE`]): after the 30 days a result URL lasts, a query of the task may
    /// still name a fresh one (see [`download::MAX_REFRESHES`]). The marks are written anew
    /// when the files are refused again.
    pub fn refetch_gone(mut self, refetch: bool) -> Self {
        self.refetch_gone = refetch;
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
    /// Creates sent in this run: those of which an attempt reached the client (a create the
    /// stack refused before sending, or dropped at a stop while it waited, is none).
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
    /// Tasks whose unsigned callback is being confirmed by a query: another callback of one
    /// of them waits for no query of its own (at most one per running task).
    confirming: Mutex<std::collections::HashSet<String>>,
    lifetimes: Mutex<BTreeMap<String, f64>>,
    creates: std::sync::atomic::AtomicU64,
    last_end: Mutex<Option<Instant>>,
    /// The downloads' client, built at the first download.
    download_client: std::sync::OnceLock<Result<kling_tower::client::HttpsClient, String>>,
    /// Turns to download: [`RunOptions::max_downloads`] jobs at a time.
    downloads: tokio::sync::Semaphore,
    /// A query for fresh result URLs was refused for the account or its credentials: so
    /// would every other, and none is sent again in this run.
    refresh_refused: AtomicBool,
    /// The creates in flight, by job, with the attempts each has sent: one dropped at a stop
    /// with none sent (it waited for a slot, say) was never sent.
    in_flight: Mutex<HashMap<String, CallAttempts>>,
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

/// A succeeded job whose result files are to be fetched.
struct Missing {
    job_id: String,
    /// Its create path if its task is a legacy one (where the task is asked for fresh URLs).
    legacy_path: Option<String>,
    task: String,
    urls: Vec<String>,
    /// The files the journal has for it already.
    recorded: Vec<String>,
}

/// Where a legacy job's task is queried (its create path); `None` for a new-style one.
fn legacy_path(job: &Job) -> Option<String> {
    (job.generation() != ApiGeneration::New).then(|| job.endpoint.trim_end_matches('/').to_owned())
}

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
            refresh_refused: AtomicBool::new(false),
            halt_reason: Mutex::new(None),
            tasks: Mutex::new(HashMap::new()),
            confirming: Mutex::default(),
            lifetimes: Mutex::new(BTreeMap::new()),
            creates: std::sync::atomic::AtomicU64::new(0),
            last_end: Mutex::new(None),
            download_client: std::sync::OnceLock::new(),
            downloads,
            in_flight: Mutex::default(),
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
    /// [`RunError::Setup`] when the run is refused before it sends anything, the journal left
    /// as it was: a job edited under its id (with [`ChangedJobs`](crate::error::ChangedJobs)
    /// in its text), a journal whose jobs were sent to another base URL than the stack's (with
    /// [`OtherBaseUrl`] in its text; see [`RunOptions::base_url_moved_from`]), or a journal
    /// that cannot be read or written at the start. [`RunError::Sent`] when a journal write
    /// fails once the run has begun sending (a create's mark, a task's end, a download's
    /// files): the run stops at once (no create leaves after it), and a run on the same
    /// journal looks up whatever this one may have created, and follows or fetches what it
    /// could not record.
    pub async fn run(
        self: &Arc<Self>,
        jobs: &[Job],
        stop: StopSignal,
    ) -> Result<RunReport, RunError> {
        let plan = self.plan(jobs, &|| *stop.borrow()).map_err(|e| {
            // A job edited under its id: the jobs file is at fault, not the journal.
            RunError::Setup(e.changed_jobs_refusal().unwrap_or_else(|| {
                let source = std::error::Error::source(&e);
                match source.and_then(|s| s.downcast_ref::<OtherBaseUrl>()) {
                    Some(other) => SetupError::new("journal", other.to_string()),
                    None => SetupError::new("journal", e.to_string()),
                }
            }))
        })?;
        let Some(plan) = plan else {
            // Stopped while the jobs were registered (nothing written), or while those an
            // earlier run left `not_submitted` were queued again (some are `queued`, the
            // others not yet): nothing was sent. The results are the journal's.
            let mut registered: HashMap<String, JobRecord> = self
                .journal
                .records()
                .map_err(|e| RunError::Setup(SetupError::new("journal", e.to_string())))?
                .into_iter()
                .map(|r| (r.job_id.clone(), r))
                .collect();
            // In the file's order, each at its line there: the registration that would have
            // moved a record to its new line was rolled back. The jobs a stop left
            // unregistered (every job of a new file) are in no record: reported as not sent,
            // so that the results and the summary count every job of the file (it said
            // `jobs  0`).
            let records = jobs
                .iter()
                .map(|job| match registered.remove(&job.id) {
                    Some(record) => JobRecord {
                        line: job.line,
                        ..record
                    },
                    None => self.unregistered(job),
                })
                .collect();
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

    /// The record of `job`, which a stop kept out of the journal: `not_submitted` as
    /// stopped, under the external id its registration will give it.
    fn unregistered(&self, job: &Job) -> JobRecord {
        JobRecord {
            job_id: job.id.clone(),
            line: job.line,
            endpoint: job.endpoint.clone(),
            external_id: self.journal.external_id_for(&job.id),
            state: JobState::NotSubmitted,
            task_id: None,
            status: None,
            urls: Vec::new(),
            files: Vec::new(),
            error: Some(ErrorInfo::new(0, STOPPED, None)),
            download_error: None,
        }
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
        // The journal is bound to the stack's base URL in the transaction that registers the
        // jobs: a run refused for either (another base URL, a job edited under its id), or
        // stopped meanwhile, leaves the journal as it was.
        let bind = (
            self.stack.base_url(),
            self.options.base_url_moved_from.as_ref(),
        );
        let Some((records, binding)) = self.journal.register_unless(jobs, Some(bind), stopped)?
        else {
            return Ok(None);
        };
        if let (Some(binding), Some(hook)) = (&binding, &self.options.base_url_bound)
            && *binding != BaseUrlBinding::Same
        {
            hook(binding);
        }
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
                    // Refused for good (an expired result URL): no run can fetch it. A mark
                    // made before the URL's lifetime was over (by an earlier version, or a
                    // clock since set right) is not honoured: the file is asked for again.
                    // Nor is any with `--refetch-gone`.
                    let gone = !self.options.refetch_gone
                        && record
                            .download_error
                            .as_ref()
                            .is_some_and(|e| e.message.starts_with(download::GONE))
                        && download::expired(
                            self.journal.succeeded_at(&record.job_id)?,
                            std::time::SystemTime::now(),
                        );
                    if self.options.download_dir.is_some() && missing && !gone {
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
        self.warn_open_elsewhere(&jobs_by_id)?;
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

    /// Warns, once, of the journal's jobs that are not in `in_file` and may have made a billed
    /// task: a run settles only its file's jobs, so such a job (its line removed, or edited
    /// without an `id`, which makes it a new job) is neither looked up nor followed, and
    /// no results file names it. Said, so that it is not lost without a word.
    fn warn_open_elsewhere(&self, in_file: &HashMap<&str, &Job>) -> Result<(), JournalError> {
        let open: Vec<(String, JobState)> = self
            .journal
            .open_jobs()?
            .into_iter()
            .filter(|(id, _)| !in_file.contains_key(id.as_str()))
            .collect();
        if open.is_empty() {
            return Ok(());
        }
        let unknown = open
            .iter()
            .filter(|(_, state)| *state == JobState::Creating)
            .count();
        let named: Vec<String> = open
            .iter()
            .take(OPEN_NAMED)
            .map(|(id, _)| format!("{id:?}"))
            .collect();
        let more = match open.len() - named.len() {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        tracing::warn!(
            "{} job(s) of the journal are not in this jobs file and may have made billed tasks \
             ({} created, {unknown} of unknown create outcome: {}{more}); this run neither looks \
             them up nor follows them: run the file that holds them, as it was, on this journal",
            open.len(),
            open.len() - unknown,
            named.join(", "),
        );
        Ok(())
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
                () = self.adopt_slots(jobs, &creating, &created) => {}
            }
        }
        let started = std::time::SystemTime::now();
        for (job, external_id, state, refused_permission) in creating {
            if self.halted.load(Ordering::SeqCst) || *stop.borrow() {
                // Refused for the account, or stopped: the rest stay unknown until a later run.
                break;
            }
            let asked = std::time::SystemTime::now();
            let found = tokio::select! {
                biased;
                () = &mut stopped => break,
                found = self.lookup(job, &external_id) => found,
            };
            // Not found: that settles it only when asked `lookup_settle` after the create's
            // last attempt could have left (a task may take a moment to be listed). Asked
            // sooner, looked up once more then; the waits end at most `lookup_settle` after
            // this run's start.
            let found = match found {
                Ok(None) => match self.settle_wait(&job.id, started, asked)? {
                    Some(wait) => tokio::select! {
                        biased;
                        () = &mut stopped => break,
                        found = async {
                            tokio::time::sleep(wait).await;
                            self.lookup(job, &external_id).await
                        } => found,
                    },
                    None => Ok(None),
                },
                found => found,
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
                .map(|(job, task, urls, recorded)| Missing {
                    job_id: job.id.clone(),
                    legacy_path: legacy_path(job),
                    task,
                    urls,
                    recorded,
                })
                .collect();
            follows.spawn(self.clone().download_missing(missing));
        }
        // Succeeded jobs of an earlier run without a result URL: their tasks are asked for
        // their results once more, new-style ones many to a query.
        if !no_results.is_empty() {
            let asked: Vec<NoResult> = no_results
                .into_iter()
                .map(|(job, task)| (job.id.clone(), legacy_path(job), task))
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
                // An abort is heard at an await only: a follow or download busy on another
                // worker thread may still write what it was at. Each is waited for, so that
                // nothing is written once the journal is read below for the report.
                follows.abort_all();
                while let Some(done) = follows.join_next().await {
                    match done {
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "journal write failed; the run stops");
                            journal_error.get_or_insert(e);
                        }
                        Err(e) if e.is_panic() => {
                            tracing::error!(error = %e, "a follow ended abnormally");
                        }
                        Ok(Ok(())) | Err(_) => {}
                    }
                }
                if journal_error.is_none() {
                    self.settle_unsent()?;
                }
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

    /// A lookup of job `job_id`'s create, asked at `asked`, found no task: how long to wait
    /// before looking it up once more; `None` when that answer settles the job as never made,
    /// [`RunOptions::lookup_settle`] having passed by `asked` (not by the answer: a slow lookup
    /// asked sooner says what Kling listed then) since the create's last attempt could have
    /// left. That is the job's mark
    /// ([`NOT_YET_LISTED`]) when its run recorded one, written once the create's call ended.
    /// Without (the run was killed, stopped or panicked with the create in flight), an attempt
    /// may have left until that run's end, which the journal does not know: this run's
    /// `started`. Never a mark after `started` (every mark is an earlier run's: a clock since
    /// set back): counted from it, each such job waited a whole settle, one after another.
    fn settle_wait(
        &self,
        job_id: &str,
        started: std::time::SystemTime,
        asked: std::time::SystemTime,
    ) -> Result<Option<Duration>, JournalError> {
        let marked = self
            .journal
            .record(job_id)?
            .and_then(|r| r.error)
            .is_some_and(|e| e.message.starts_with(NOT_YET_LISTED));
        let since = if marked {
            self.journal
                .changed_at(job_id)?
                .map_or(started, |mark| mark.min(started))
        } else {
            started
        };
        let settle = self
            .options
            .lookup_settle
            .unwrap_or_else(|| self.stack.scaled(LOOKUP_SETTLE));
        let since_at = |at: std::time::SystemTime| at.duration_since(since).unwrap_or_default();
        if since_at(asked) >= settle {
            return Ok(None);
        }
        Ok(Some(
            settle.saturating_sub(since_at(std::time::SystemTime::now())),
        ))
    }

    /// Lists the account's unfinished tasks and adopts their slots (best effort: a failure
    /// only means the slots layer learns the real count through 1303s). A list entry does not
    /// say its model, so each job's task is placed in its job's pool by its task id (`created`)
    /// or its external id (`creating`); a task of no job here goes to its product's (or
    /// path's) pool. The new-style products listed are those of every job of the file, ended
    /// ones too: their pools may be those this run creates in (two products of one model, or
    /// every product of a kind with `pool_scope = product`), filled by tasks of other runs.
    /// None with the access key pair, which `/tasks` refuses: the list's refusal halted a
    /// resume whose new-style jobs had all ended (the run refuses the pair when one is still
    /// to send, so none creates in a pool only that list would fill).
    async fn adopt_slots(
        &self,
        jobs: &[Job],
        creating: &[(&Job, String, JobState, bool)],
        created: &[(&Job, String)],
    ) {
        let mut plan = Reconcile::new("");
        for (job, external_id, ..) in creating {
            plan = plan.external_id_in(external_id.clone(), job.pool());
        }
        for (job, task) in created {
            plan = plan.task_in(task.clone(), job.pool());
        }
        let mut seen = Vec::new();
        let listed = self.stack.lists_new_style_tasks();
        for job in jobs
            .iter()
            .filter(|j| listed && j.generation() == ApiGeneration::New)
        {
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

    /// Asks Kling once for one task (at its create path `legacy_path`, or new-style), through
    /// the stack: its report, if the answer gives it with result URLs ([`has_results`]).
    async fn task_with_results(
        &self,
        legacy_path: Option<&str>,
        task_id: &str,
    ) -> Result<Option<TaskReport>, BoxError> {
        let ids = [task_id];
        let asked = match legacy_path {
            Some(path) => Asked::Legacy { path, id: task_id },
            None => Asked::New(&ids),
        };
        Ok(self.query_tasks(asked).await?.into_iter().find(has_results))
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
                legacy_path: legacy_path(job),
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
            let created = caught(self.create_one(job, &tx)).await;
            // Ended (a panic too), not dropped: the job's record says where it stands.
            self.in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&job.id);
            match created {
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

    /// After a stop dropped the creates in flight: those that sent no attempt (one that
    /// waited for a slot, say, the drain letting it wait) were never sent, so their jobs are
    /// `not_submitted` as stopped, and the next run sends them without a lookup. The others
    /// stay `creating`, looked up by the next run.
    fn settle_unsent(&self) -> Result<(), JournalError> {
        let dropped: Vec<(String, CallAttempts)> = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for (job_id, attempts) in dropped {
            if attempts.sent() > 0 {
                self.creates.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let creating = self
                .journal
                .record(&job_id)?
                .is_some_and(|r| r.state == JobState::Creating);
            if creating {
                self.move_to(
                    &job_id,
                    JobState::Creating,
                    JobState::NotSubmitted,
                    Update::error(ErrorInfo::new(0, STOPPED, None)),
                )?;
            }
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
    /// [`RunOptions::max_downloads`] jobs at a time; a job's download is begun only when a
    /// running one ends. `Err` (the others dropped) when the journal cannot record a job's
    /// files, as [`download`](Self::download).
    ///
    /// The downloads are futures of this task, not tasks of their own: aborting it at a stop
    /// ends them all at once, and none is left on another thread to write the journal after
    /// the stop has read it.
    async fn download_missing(self: Arc<Self>, missing: Vec<Missing>) -> Result<(), JournalError> {
        let mut missing = missing.into_iter();
        let mut running = FuturesUnordered::new();
        loop {
            while running.len() < self.options.max_downloads.max(1) {
                let Some(job) = missing.next() else {
                    break;
                };
                let engine = &self;
                running.push(async move {
                    match caught(engine.download(&job)).await {
                        Ok(recorded) => recorded,
                        Err(panic) => engine.after_panic(
                            &job.job_id,
                            "the download of the job's files",
                            &panic,
                        ),
                    }
                });
            }
            match running.next().await {
                None => return Ok(()),
                Some(recorded) => recorded?,
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
            for (job_id, legacy_path, task) in &query {
                let update = match &answer {
                    Ok(found) => match found.iter().find(|t| t.id == *task && has_results(t)) {
                        Some(found) => {
                            fetch.push(Missing {
                                job_id: job_id.clone(),
                                legacy_path: legacy_path.clone(),
                                task: task.clone(),
                                urls: found.urls.clone(),
                                recorded: vec![],
                            });
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
        let mut request = match request {
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
        // Counts the attempts that reach the client: a create dropped at a stop before any
        // did was never sent (`settle_unsent`).
        let attempts = CallAttempts::new();
        request.extensions_mut().insert(attempts.clone());
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job.id.clone(), attempts.clone());
        let answer = self.stack.service().oneshot(request).await;
        // Answered: what follows (a lookup, say) is not this create's to settle at a stop.
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&job.id);
        if attempts.sent() > 0 {
            self.creates.fetch_add(1, Ordering::Relaxed);
        }
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
            // Never a call that may have made a task (`final_refusal` is not then): the
            // lookup made at once proves nothing for it, as below.
            Ok(None) if failure.final_refusal && !failure.halts => self.move_to(
                &job.id,
                JobState::Creating,
                JobState::Failed,
                Update::error(failure.info),
            ),
            // The create may have made a task (its answer lost, say) that Kling lists by its
            // external id only a moment later: a lookup at once proves nothing, and the create
            // sent again by the next run might be billed twice. Left of unknown outcome, marked
            // once its call has ended (no attempt leaves after the mark): a later run looks it
            // up again, `lookup_settle` after the mark at the soonest, before it sends anything.
            Ok(None) if failure.may_have_created => {
                tracing::warn!(job = %job.id, "create outcome unknown and no task found by its external id yet; a later run looks it up again");
                let info = ErrorInfo::new(
                    failure.info.code,
                    format!("{NOT_YET_LISTED}: {}", failure.info.message),
                    failure.info.request_id,
                );
                self.journal
                    .transition(&job.id, JobState::Creating, Update::error(info))
            }
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
                let legacy_path = match &running {
                    Some(running) => running.legacy_path.clone(),
                    None if report.generation == ApiGeneration::New => None,
                    None => self
                        .journal
                        .record(job_id)?
                        .map(|r| r.endpoint.trim_end_matches('/').to_owned()),
                };
                // A report without a result URL kling-batch can read (a signed callback that
                // carries the status alone, URLs of a shape it does not know): one query for
                // the whole report before the job is counted.
                let (report, error) = if report.urls.is_empty() {
                    match self
                        .task_with_results(legacy_path.as_deref(), task_id)
                        .await
                    {
                        Ok(Some(found)) => (found, None),
                        Ok(None) => (report, Some(no_result(task_id, None))),
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
                self.download(&Missing {
                    job_id: job_id.to_owned(),
                    legacy_path,
                    task: task_id.to_owned(),
                    urls: report.urls,
                    recorded: vec![],
                })
                .await
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

    /// Fetches a job's result files (`job.recorded`: the files the journal has for it
    /// already). When every file missing was answered `403`, `404` or `410` within the URLs'
    /// 30 days (or past them with [`RunOptions::refetch_gone`]), the task is asked for its
    /// result URLs again and they are fetched, [`download::MAX_REFRESHES`] times at most: a
    /// signed link may expire sooner, and a file may be published a moment after its task
    /// ends. Fresh URLs are recorded. The download turn is given up while it waits and asks,
    /// and no job asks once a query was refused for the account or its credentials. `Err`
    /// when the journal cannot record the files: they stay on disk, a later run records
    /// them, and the run stops.
    async fn download(&self, job: &Missing) -> Result<(), JournalError> {
        let Some(dir) = &self.options.download_dir else {
            return Ok(());
        };
        let job_id = job.job_id.as_str();
        let task_id = job.task.as_str();
        #[cfg(test)]
        self.test_panic(job_id, "download");
        // A turn among the `max_downloads`; the semaphore is never closed.
        let Ok(mut turn) = self.downloads.acquire().await else {
            return Ok(());
        };
        let timeouts = self.options.download_timeouts;
        let client = self.download_client.get_or_init(|| {
            download::client(timeouts.connect_timeout()).map_err(|e| e.to_string())
        });
        let client = match client {
            Ok(client) => client,
            Err(e) => {
                let update = Update {
                    download_error: Some(Some(ErrorInfo::new(
                        0,
                        format!("no download client: {e}"),
                        None,
                    ))),
                    ..Update::default()
                };
                return self.journal.transition(job_id, JobState::Succeeded, update);
            }
        };
        let recorded = &job.recorded;
        let mut fetched =
            download::fetch_all(client, dir, job_id, task_id, &job.urls, recorded, timeouts).await;
        // Past the URLs' lifetime, a query names the same expired URLs (or no task): asked
        // only when told to (`--refetch-gone`), not by every run over old jobs.
        let expired = download::expired(
            self.journal.succeeded_at(job_id)?,
            std::time::SystemTime::now(),
        );
        let mut fresh: Option<Vec<String>> = None;
        let mut wait = download::REFRESH_WAIT;
        for _ in 0..download::MAX_REFRESHES {
            if !fetched.gone
                || (expired && !self.options.refetch_gone)
                || self.refresh_refused.load(Ordering::SeqCst)
            {
                break;
            }
            // The turn is for fetching: another job's files go while this one waits and
            // asks (a query retried through an outage may take a minute).
            drop(turn);
            tokio::time::sleep(wait).await;
            wait = wait.saturating_mul(2);
            let Some(urls) = self.result_urls(job).await else {
                break;
            };
            turn = match self.downloads.acquire().await {
                Ok(turn) => turn,
                Err(_) => break,
            };
            fetched =
                download::fetch_all(client, dir, job_id, task_id, &urls, recorded, timeouts).await;
            // The URLs fetched last are recorded: a later query may name the first ones again.
            fresh = (urls != job.urls).then_some(urls);
        }
        // Refused as an expired URL is: gone only once the URL's lifetime is over
        // (a file not yet published, a CDN's refusal, answer so too).
        let gone = fetched.gone && expired;
        let error = fetched.error.map(|e| {
            if gone {
                tracing::warn!(job = %job_id, error = %e, "result file gone; not fetched again");
                ErrorInfo::new(
                    0,
                    format!("{}: {e}; not fetched again", download::GONE),
                    None,
                )
            } else {
                tracing::warn!(job = %job_id, error = %e, "download failed; a later run tries again");
                ErrorInfo::new(0, format!("{e}; a later run fetches it again"), None)
            }
        });
        let update = Update {
            urls: fresh,
            ..Update::downloaded(fetched.files, error)
        };
        self.journal.transition(job_id, JobState::Succeeded, update)
    }

    /// The result URLs a query of `job`'s task names now, if it succeeded with some; `None`
    /// when the query fails or names none (a warning says why). One refused for the account
    /// or its credentials ends the refreshes of the run (`refresh_refused`): every other
    /// would be refused too.
    async fn result_urls(&self, job: &Missing) -> Option<Vec<String>> {
        match self
            .task_with_results(job.legacy_path.as_deref(), &job.task)
            .await
        {
            Ok(found) => found.map(|t| t.urls),
            Err(e) => {
                tracing::warn!(job = %job.job_id, error = %e, "cannot ask the task for fresh result URLs");
                if failure_of(&*e).halts {
                    self.refresh_refused.store(true, Ordering::SeqCst);
                }
                None
            }
        }
    }

    /// The task reports of one callback body: `reports` holds every task the body reports
    /// (Kling posts one; a proxy batching callbacks may post several), in order; each
    /// terminal one is taken, the others are left to the follow. `trusted` (the signature was
    /// verified): the body frees its tasks' slots (handed to the stack once) and each
    /// terminal report ends its task's follow at once. Otherwise each terminal task is
    /// queried through the stack first, with a query of its own, and that answer is what
    /// counts.
    pub async fn on_callback(&self, payload: &[u8], reports: Vec<TaskReport>, trusted: bool) {
        let terminal: Vec<TaskReport> = reports
            .into_iter()
            .filter(|report| report.status.is_terminal())
            .collect();
        if terminal.is_empty() {
            return;
        }
        if trusted {
            if let Err(e) = self.stack.on_callback(payload).await {
                tracing::warn!(error = %e, "callback not applied to the slots");
            }
            for report in terminal {
                self.follower.deliver(report);
            }
            return;
        }
        // The tasks' queries at once: each waits for its own turn in the account's rate.
        let mut confirms: FuturesUnordered<_> = terminal
            .iter()
            .map(|report| self.confirm_callback(report))
            .collect();
        while confirms.next().await.is_some() {}
    }

    /// An unsigned callback's terminal `report` of a task of the run, confirmed by a query of
    /// the task ([`on_callback`](Self::on_callback)).
    async fn confirm_callback(&self, report: &TaskReport) {
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
        // One at a time per task: the query in flight answers a repeated callback too, which
        // would otherwise wait for a turn of the account's rate of its own, without bound.
        let Some(_confirming) = Confirming::start(&self.confirming, &report.id) else {
            return;
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

/// A task's callback being confirmed ([`Engine::on_callback`]): the task leaves the set when
/// this is dropped.
struct Confirming<'a> {
    set: &'a Mutex<std::collections::HashSet<String>>,
    task: String,
}

impl<'a> Confirming<'a> {
    /// `None` when the task's callback is being confirmed already.
    fn start(set: &'a Mutex<std::collections::HashSet<String>>, task: &str) -> Option<Self> {
        set.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(task.to_owned())
            .then(|| Confirming {
                set,
                task: task.to_owned(),
            })
    }
}

impl Drop for Confirming<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.task);
    }
}

/// The error of a job not sent because the run was stopped.
const STOPPED: &str = "not submitted: the run was stopped";

/// How many jobs of the journal missing from the jobs file a warning names.
const OPEN_NAMED: usize = 5;

/// How long after a create of unknown outcome a lookup must come for its "no such task" to
/// settle the job as never made, in API time ([`RunOptions::lookup_settle`]): a task may be
/// listed by its external id a moment after it was made, and kling-retry's own settle (2 s)
/// is meant for a retry within one call, not for a decision a later run acts on.
pub const LOOKUP_SETTLE: Duration = Duration::from_secs(60);

/// How the error of a job begins whose create may have made a task and whose lookup right
/// after found none: still of unknown outcome, looked up again by a later run
/// ([`Engine::settle_wait`] counts from this mark).
pub(crate) const NOT_YET_LISTED: &str =
    "create outcome unknown: no task found by its external id right after the create";

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

mod failure;
#[cfg(test)]
mod tests;
