//! The command line: `kling-batch run` and `kling-batch demo`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kling_tower::{Credentials, FollowPolicy, StackConfig, Tier, WebhookVerifier};
use tokio::sync::watch;

use crate::app::{self, Listeners};
use crate::callbacks::{self, CALLBACK_PATH};
use crate::demo::{self, DemoOptions};
use crate::download::DownloadTimeouts;
use crate::error::{OtherBaseUrl, RunError, SetupError, redacted_url};
use crate::jobs::parse_jobs_bytes;
use crate::journal::{ApiOrigin, BaseUrlBinding, Journal};
use crate::output::{check_writable, write_results};
use crate::run::{RunOptions, StopSignal};
use crate::stack::Stack;
use crate::summary::Summary;

/// Exit status: every job succeeded.
pub const EXIT_OK: i32 = 0;
/// Exit status: some job failed, was not submitted, or is still running, a result file is
/// missing (`--download`), or a malformed line of the jobs file was skipped.
pub const EXIT_INCOMPLETE: i32 = 1;
/// Exit status: bad input or configuration; nothing was sent.
pub const EXIT_SETUP: i32 = 2;
/// Exit status: the run stopped on an error after it began sending (a journal write failed):
/// jobs may have been created and billed. Each create was marked in the journal before it was
/// sent: fix the cause and run again on the same journal, which looks them up and creates none
/// twice.
pub const EXIT_RUN_FAILED: i32 = 3;
/// Exit status: stopped by Ctrl-C (run again to resume).
pub const EXIT_INTERRUPTED: i32 = 130;

/// Generate with Kling as fast as your account allows: resumable, never paying twice.
#[derive(Debug, Parser)]
#[command(name = "kling-batch", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the jobs of a JSONL file (one create body per line) and write their results.
    Run(RunArgs),
    /// Run a generated workload against the embedded mock: no account needed.
    Demo(DemoArgs),
}

/// `kling-batch run`.
///
/// Its `Debug` shows neither the callback secret nor the Redis URL (which may hold a
/// password): `<redacted>` stands for a value that is set. The base and callback URLs are
/// shown without user info and query (`scheme://host[:port]/path`), which may hold a password
/// or a token, and as `<redacted>` when they cannot be read as URLs.
#[derive(Args)]
pub struct RunArgs {
    /// The jobs: one JSON object per line (`prompt` and other create fields, optional `id`
    /// and `endpoint`).
    pub jobs: PathBuf,
    /// The journal (SQLite); running again on the same journal resumes, sent to the base URL
    /// its jobs were sent to (a run sent elsewhere is refused: see `--base-url-moved-from`).
    /// Default: `JOBS.journal.sqlite`.
    #[arg(long)]
    pub journal: Option<PathBuf>,
    /// Where results go, one JSON line per job. Default: `JOBS.results.jsonl`.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// The API's base URL (a region, a proxy, or a mock). Default: `KLING_BASE_URL` (read with
    /// `--config` too), else the `--config` file's `base_url`, else the global host.
    #[arg(long)]
    pub base_url: Option<String>,
    /// The base URL the journal's jobs were sent to, which this run's base URL replaces: the
    /// same Kling account and region, reached at another URL (a proxy or host renamed). A
    /// journal refuses a run sent elsewhere than its jobs were; this records the run's base URL
    /// in its place, and only when URL is the one the journal names.
    #[arg(long, value_name = "URL")]
    pub base_url_moved_from: Option<String>,
    /// The account tier: free, standard, pro, enterprise, resource-pack (default: `KLING_TIER`,
    /// else free). `KLING_*` variables override its numbers.
    #[arg(long, conflicts_with = "config")]
    pub tier: Option<Tier>,
    /// A TOML file with the tier and every number (see kling-tower's `preset` docs); the
    /// `KLING_*` variables of the stack are not read with it, but for `KLING_BASE_URL`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Speed factor (for a sped-up mock): rates × N, durations ÷ N.
    #[arg(long)]
    pub speed: Option<f64>,
    /// Listen for Kling's callbacks on ADDR (e.g. 127.0.0.1:8787 behind a reverse proxy, or
    /// 0.0.0.0:8787 with --callback-url).
    #[arg(long)]
    pub callback_listen: Option<SocketAddr>,
    /// The public URL Kling should post callbacks to, e.g. behind a reverse proxy (default:
    /// http://ADDR/kling/callback; needed when ADDR is `0.0.0.0` or `[::]`). The listener serves
    /// its path as well as /kling/callback.
    #[arg(long, requires = "callback_listen")]
    pub callback_url: Option<String>,
    /// Standard-Webhooks secret of signed callbacks (or `KLING_WEBHOOK_SECRET`); without one,
    /// each callback is confirmed with a query.
    #[arg(long, requires = "callback_listen")]
    pub callback_secret: Option<String>,
    /// Save each result file under DIR as soon as its task succeeds.
    #[arg(long)]
    pub download: Option<PathBuf>,
    /// Seconds to wait for a result server's connection (default 10).
    #[arg(long, value_name = "SECS", requires = "download")]
    pub download_connect_timeout: Option<f64>,
    /// Seconds to wait for a result server's answer, or for more bytes of a file, before
    /// giving the file up until the next run (default 30).
    #[arg(long, value_name = "SECS", requires = "download")]
    pub download_idle_timeout: Option<f64>,
    /// Seconds one result file may take in all before it is given up until the next run
    /// (default 600).
    #[arg(long, value_name = "SECS", requires = "download")]
    pub download_timeout: Option<f64>,
    /// Fetch again the result files an earlier run recorded gone (`result file gone`: a
    /// result URL refused 30 days or more after its task ended). Refused again, the task is
    /// asked for fresh URLs; if those are refused too, the mark is written anew.
    #[arg(long, requires = "download")]
    pub refetch_gone: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics while running.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Refuse the whole file when a line is malformed (default: report and skip it).
    #[arg(long)]
    pub strict: bool,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
    /// Share the account's limits (task slots, rate, a 1102 halt, a lowered capacity) through
    /// the Redis at URL, e.g. `redis://10.0.0.5:6379/` (or `KLING_REDIS_URL`): runs and
    /// services of one account on one Redis then never together exceed its limits. Feature
    /// `redis`.
    #[cfg(feature = "redis")]
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// The key prefix in that Redis (default `kling`): only runs under one prefix share limits.
    #[cfg(feature = "redis")]
    #[arg(long, value_name = "PREFIX")]
    pub redis_prefix: Option<String>,
}

impl std::fmt::Debug for RunArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |value: &Option<String>| value.as_ref().map(|_| "<redacted>");
        let mut debug = f.debug_struct("RunArgs");
        debug
            .field("jobs", &self.jobs)
            .field("journal", &self.journal)
            .field("output", &self.output)
            .field("base_url", &self.base_url.as_deref().map(redacted_url))
            .field(
                "base_url_moved_from",
                &self.base_url_moved_from.as_deref().map(redacted_url),
            )
            .field("tier", &self.tier)
            .field("config", &self.config)
            .field("speed", &self.speed)
            .field("callback_listen", &self.callback_listen)
            .field(
                "callback_url",
                &self.callback_url.as_deref().map(redacted_url),
            )
            .field("callback_secret", &redacted(&self.callback_secret))
            .field("download", &self.download)
            .field("download_connect_timeout", &self.download_connect_timeout)
            .field("download_idle_timeout", &self.download_idle_timeout)
            .field("download_timeout", &self.download_timeout)
            .field("refetch_gone", &self.refetch_gone)
            .field("metrics_addr", &self.metrics_addr)
            .field("json", &self.json)
            .field("strict", &self.strict)
            .field("quiet", &self.quiet);
        #[cfg(feature = "redis")]
        debug
            .field("redis", &redacted(&self.redis))
            .field("redis_prefix", &self.redis_prefix);
        debug.finish()
    }
}

/// `kling-batch demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The tier the mock enforces and the stack is set for: free, standard, pro, enterprise.
    #[arg(long, default_value = "pro")]
    pub tier: Tier,
    /// How many jobs.
    #[arg(long, default_value_t = 100)]
    pub jobs: usize,
    /// Speed factor of the mock and the stack alike.
    #[arg(long, default_value_t = 60.0)]
    pub speed: f64,
    /// Save each result file under DIR.
    #[arg(long)]
    pub download: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics while running.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Prints a note on stderr, above the progress bars when they are drawn (a run's own, such
/// as [`note_binding`]'s, is said once the bars are).
fn note(message: impl std::fmt::Display) {
    crate::log::print_line(&note_line(message));
}

/// A line [`note`] prints: its control characters escaped, as in the warnings of
/// [`log`](crate::log), since a line of the jobs file (an `endpoint` with `\u001b[2J` in it)
/// or a path must not move the cursor or color the terminal.
fn note_line(message: impl std::fmt::Display) -> String {
    crate::log::escape_controls(&format!("kling-batch: {message}"))
}

/// How long [`shut_down`] waits for blocking work still running (a file being written, a
/// name lookup).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Shuts the runtime [`main`] ran on down, before the process exits: every task still
/// held (a callback listener's, a follow a stop gave up on) is dropped, and with the last
/// of them the journal, which marks itself closed ([`Journal`]). `std::process::exit` runs
/// no `Drop`: shut down in the background, they were dropped on its threads while the
/// process exited, and a clean run left its journal marked open (or cut off its closing
/// checkpoint). Blocking work is waited for at most 5 s, the journal's close as long as it
/// takes (a checkpoint cut halfway may leave a main file that reads as closed).
///
/// `false` when a Ctrl-C or SIGTERM came first: the process is to exit at once, its journal
/// left open as a kill leaves it. The run's own watcher is dropped with the runtime, and a
/// stop while blocking work was waited for (a name lookup a stop gave up on) went unheard.
pub fn shut_down(runtime: tokio::runtime::Runtime) -> bool {
    shut_down_unless(
        runtime,
        async { Stops::new().next().await },
        SHUTDOWN_WAIT,
        || crate::journal::open_on_disk() == 0,
    )
}

/// [`shut_down`], cut short by `quit`, waiting `wait` for blocking work and, past it, for
/// `journals_closed`.
fn shut_down_unless(
    runtime: tokio::runtime::Runtime,
    quit: impl std::future::Future<Output = ()>,
    wait: Duration,
    journals_closed: impl Fn() -> bool + Send + 'static,
) -> bool {
    // Listens for `quit` on a runtime of its own while the other is shut down on a thread.
    let Ok(waiter) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        close(runtime, wait, &journals_closed);
        return true;
    };
    let (done, closed) = tokio::sync::oneshot::channel::<()>();
    let (hand_over, to_close) = std::sync::mpsc::sync_channel::<tokio::runtime::Runtime>(1);
    let closer = std::thread::Builder::new()
        .name("kling-batch-shutdown".to_owned())
        .spawn(move || {
            if let Ok(runtime) = to_close.recv() {
                close(runtime, wait, &journals_closed);
            }
            let _ = done.send(());
        });
    let Ok(_closer) = closer else {
        runtime.shutdown_timeout(wait);
        return true;
    };
    if let Err(std::sync::mpsc::SendError(runtime)) = hand_over.send(runtime) {
        runtime.shutdown_timeout(wait);
        return true;
    }
    waiter.block_on(async {
        tokio::select! {
            _ = closed => true,
            () = quit => false,
        }
    })
}

/// Shuts `runtime` down, waiting `wait` for blocking work, then for the journals' close
/// however long it takes: past the wait, a worker may still be closing one (a checkpoint
/// on a slow disk), and an exit then would cut it. A stop still quits at once.
fn close(runtime: tokio::runtime::Runtime, wait: Duration, journals_closed: &impl Fn() -> bool) {
    runtime.shutdown_timeout(wait);
    if journals_closed() {
        return;
    }
    note("waiting for the journal to close (ctrl-c to quit at once, leaving it as a kill does)");
    while !journals_closed() {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a parsed command line; returns the exit status.
pub async fn main(cli: Cli) -> i32 {
    let stop = stop_on_ctrl_c();
    let result = match cli.command {
        Command::Run(args) => run(args, stop).await,
        Command::Demo(args) => demo(args, stop).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            note(&e);
            if e.sent() {
                EXIT_RUN_FAILED
            } else {
                EXIT_SETUP
            }
        }
    }
}

/// A stop signal set by the first Ctrl-C or SIGTERM (`docker stop`, systemd, `timeout`); a
/// second one exits at once.
fn stop_on_ctrl_c() -> StopSignal {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut stops = Stops::new();
        stops.next().await;
        note("stopping: no new creates; the journal is kept (ctrl-c again to quit at once)");
        let _ = tx.send(true);
        stops.next().await;
        std::process::exit(EXIT_INTERRUPTED);
    });
    rx
}

/// Ctrl-C (SIGINT) and, on Unix, SIGTERM, as one stream of stop requests.
struct Stops {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl Stops {
    fn new() -> Stops {
        Stops {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok(),
        }
    }

    /// The next stop request (never, where no signal can be listened for: the run goes on
    /// without it).
    async fn next(&mut self) {
        let ctrl_c = async {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        #[cfg(unix)]
        let term = async {
            let received = match self.term.as_mut() {
                Some(term) => term.recv().await.is_some(),
                None => false,
            };
            if !received {
                std::future::pending::<()>().await;
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            () = ctrl_c => {}
            () = term => {}
        }
    }
}

fn default_path(jobs: &Path, suffix: &str) -> PathBuf {
    let stem = jobs
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "jobs".to_owned());
    jobs.with_file_name(format!("{stem}{suffix}"))
}

/// The download timeouts of `--download-connect-timeout`, `--download-idle-timeout` and
/// `--download-timeout` (seconds, each above 0 and at most a day), the defaults for the rest.
pub fn download_timeouts(args: &RunArgs) -> Result<DownloadTimeouts, SetupError> {
    let secs = |option: &str, value: Option<f64>| -> Result<Option<Duration>, SetupError> {
        match value {
            None => Ok(None),
            Some(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => {
                Ok(Some(Duration::from_secs_f64(v)))
            }
            Some(v) => Err(SetupError::new(
                option,
                format!("{v} is not a number of seconds above 0 and at most 86400"),
            )),
        }
    };
    let mut timeouts = DownloadTimeouts::default();
    if let Some(d) = secs("--download-connect-timeout", args.download_connect_timeout)? {
        timeouts = timeouts.connect(d);
    }
    if let Some(d) = secs("--download-idle-timeout", args.download_idle_timeout)? {
        timeouts = timeouts.idle(d);
    }
    if let Some(d) = secs("--download-timeout", args.download_timeout)? {
        timeouts = timeouts.total(d);
    }
    Ok(timeouts)
}

/// Reads the stack configuration: `--config` (with `KLING_BASE_URL` over its `base_url`),
/// else `--tier` with `KLING_*` overrides, else `KLING_*` alone; then `--speed`.
pub fn load_config(args: &RunArgs) -> Result<StackConfig, SetupError> {
    let config = if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path).map_err(|e| {
            SetupError::new("--config", format!("cannot read {}: {e}", path.display()))
        })?;
        let config = StackConfig::from_toml_str(&text).map_err(|e| {
            SetupError::new(format!("{} ({})", path.display(), e.field()), e.to_string())
        })?;
        // `KLING_BASE_URL` is read with `--config` too, over the file's `base_url`, where the
        // other `KLING_*` variables are not: where to send, like `KLING_REDIS_URL`, is the
        // deployment's. Ignored, the run went to the file's base URL (or the global host)
        // without a word.
        match env_text(BASE_URL_VAR)? {
            Some(base) if !base.trim().is_empty() => {
                check_base_url(&base, BASE_URL_VAR)?;
                config.base_url(base.trim())
            }
            _ => config,
        }
    } else if let Some(tier) = args.tier {
        // As `from_env` does: a variable named as one read here in another case or unit is
        // refused (read by name alone, it was ignored and the preset's value used without a
        // word), one a typing slip away is warned of on stderr ([`crate::log`]).
        StackConfig::check_env_names(std::env::vars_os().map(|(name, _)| name))
            .map_err(|e| SetupError::new(e.field().to_owned(), e.to_string()))?;
        // Values not UTF-8 are refused, as `from_env` does: read as unset, the preset's value
        // was used without a word. The first one the stack asked for is named.
        let unreadable = std::cell::RefCell::new(None);
        let config = StackConfig::preset(tier).with_lookup(|name| {
            env_text(name).unwrap_or_else(|e| {
                unreadable.borrow_mut().get_or_insert(e);
                None
            })
        });
        if let Some(e) = unreadable.into_inner() {
            return Err(e);
        }
        config.map_err(|e| SetupError::new(e.field().to_owned(), e.to_string()))?
    } else {
        StackConfig::from_env().map_err(|e| SetupError::new(e.field().to_owned(), e.to_string()))?
    };
    let config = match args.speed {
        Some(speed) => config.speed(speed),
        None => config,
    };
    // Each source was validated alone; what fails now is the speed: `--speed`, else the one
    // the file or `KLING_SPEED` set. Named so, not by the field it scales
    // (`--jitter_allowance_ms`, no option of this tool).
    let speed_source = if args.speed.is_some() {
        Some("--speed".to_owned())
    } else if let Some(path) = &args.config {
        Some(format!("{} (speed)", path.display()))
    } else {
        std::env::var_os("KLING_SPEED").map(|_| "KLING_SPEED".to_owned())
    };
    check_speed(&config, speed_source)?;
    Ok(config)
}

/// A variable's value, `None` if unset. One set to bytes that are not UTF-8 is refused,
/// naming it (`std::env::var(..).ok()` read it as unset, without a word).
fn env_text(name: &str) -> Result<Option<String>, SetupError> {
    std::env::var_os(name)
        .map(|value| {
            value
                .into_string()
                .map_err(|_| SetupError::new(name, "is set but is not valid UTF-8"))
        })
        .transpose()
}

/// Validates `config` as a run uses it (its retry deadline raised to
/// [`QUEUE_DEADLINE`](crate::stack::QUEUE_DEADLINE), which a slow speed stretches past what
/// the stack takes), naming `speed_source` (the option, file or variable that set the speed)
/// when given, else the field.
pub(crate) fn check_speed(
    config: &StackConfig,
    speed_source: Option<String>,
) -> Result<(), SetupError> {
    crate::stack::queue_config(config.clone())
        .validate()
        .map_err(|e| {
            let mut reason = e.to_string();
            if e.field() == "retry_deadline_secs" {
                reason.push_str(&format!(
                    " (kling-batch waits at least {} hours of API time for a create: a batch is \
                     a queue)",
                    crate::stack::QUEUE_DEADLINE.as_secs() / 3600
                ));
            }
            match speed_source {
                Some(source) => SetupError::new(source, reason),
                None => SetupError::new(e.field().to_owned(), reason),
            }
        })
}

async fn run(args: RunArgs, stop: StopSignal) -> Result<i32, RunError> {
    // Bytes, not a string: a line that is not UTF-8 is one malformed line, not a bad file.
    // The file's bytes are freed once parsed: only the jobs are held while the run lasts.
    let (jobs, errors) = parse_jobs_bytes(&std::fs::read(&args.jobs).map_err(|e| {
        SetupError::new("JOBS", format!("cannot read {}: {e}", args.jobs.display()))
    })?);
    for error in &errors {
        note(format_args!(
            "{}: {error}{}",
            args.jobs.display(),
            if args.strict { "" } else { " (skipped)" }
        ));
    }
    if args.strict && !errors.is_empty() {
        return Err(SetupError::new(
            "--strict",
            format!(
                "{} malformed line(s) in {}; nothing was sent",
                errors.len(),
                args.jobs.display()
            ),
        )
        .into());
    }
    if jobs.is_empty() {
        return Err(
            SetupError::new("JOBS", format!("{} holds no job", args.jobs.display())).into(),
        );
    }
    let config = load_config(&args)?;
    let timeouts = download_timeouts(&args)?;
    let credentials = Credentials::from_env()
        .map_err(|e| SetupError::new(e.field().to_owned(), e.to_string()))?;
    let journal_path = args
        .journal
        .clone()
        .unwrap_or_else(|| default_path(&args.jobs, ".journal.sqlite"));
    // With the access key pair, the jobs on a new-style endpoint: refused before sending if
    // any is still to send. With no journal yet every one is, said before a journal is made;
    // on a resume, only those its journal does not record as done.
    let new_style = if credentials.is_jwt() {
        new_style_jobs(&jobs)
    } else {
        Vec::new()
    };
    if !new_style.is_empty() && !journal_path.exists() {
        return Err(refuse_new_style_jobs(&new_style).into());
    }
    // Every check of the input comes before anything is made or bound: the journal (which a
    // run makes when it is new), a listener, the `--download` folder. A run refused for its
    // input, or by its journal, leaves nothing behind.
    let callback = callback_settings(&args)?;
    // Checked before a Redis is connected to; a `--base-url` refused quotes nothing of it.
    let (base, source) = base_url(&args, &config);
    check_base_url(&base, &source)?;
    // Neither is quoted: it may carry a password.
    let unreadable = |field: &str| {
        SetupError::new(
            field,
            "is not an http:// or https:// URL with a host and no `@` (user info; an `@` in a \
             path is written %40), and is not quoted",
        )
    };
    let origin = ApiOrigin::parse(&base).ok_or_else(|| unreadable(&source))?;
    let set_by = base_url_set_by(&args, &config, &source);
    let moved_from = match &args.base_url_moved_from {
        Some(url) => {
            Some(ApiOrigin::parse(url).ok_or_else(|| unreadable("--base-url-moved-from"))?)
        }
        None => None,
    };
    let stack = build_stack(&args, config.clone(), credentials, (base, source)).await?;
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| default_path(&args.jobs, ".results.jsonl"));
    // Where the results go is checked before anything is sent: found out after the run, a
    // bad `-o` (or `--download`) would cost every job's credits for nothing to show. And no
    // file the run writes may be one it reads or another it writes: `-o` naming the
    // `--config` file wrote the results over it.
    check_distinct(&args, &journal_path, &output)?;
    if let Some(dir) = &args.download {
        check_utf8_folder(dir)?;
        check_folder_can_be(dir)?;
    }
    check_writable(&output)
        .map_err(|e| SetupError::new("--output", format!("{}: {e}", output.display())))?;
    // The listeners: bound before a new journal is made, which a run refused for one (a port
    // in use, an address not on this machine) left behind; bound once a journal there is
    // open, so that a second run on it is refused as such, not for the first one's port.
    let mut callback = callback;
    let resumed = journal_path.exists();
    let bound = if resumed {
        None
    } else {
        Some(bind_listeners(&args, callback.take(), &config).await?)
    };
    // The journal's own checks (a lone `-wal`, a folder that is not there, another run's
    // lock) refuse it before SQLite writes anything.
    let journal = Journal::open(&journal_path)
        .map_err(|e| SetupError::new("--journal", format!("{}: {e}", journal_path.display())))?;
    if !new_style.is_empty() {
        let to_send = still_to_send(&journal, new_style).map_err(|e| {
            SetupError::new("--journal", format!("{}: {e}", journal_path.display()))
        })?;
        if !to_send.is_empty() {
            return Err(refuse_new_style_jobs(&to_send).into());
        }
    }
    // Where the journal's jobs were sent: a resume sent elsewhere is refused before anything
    // is sent, bound or made (its tasks are not there, and their jobs would be created again).
    // Checked here; the run records it in the transaction that registers its jobs.
    let shown = journal_path.display().to_string();
    journal
        .check_base_url(&origin, moved_from.as_ref())
        .map_err(|e| refuse_base_url(&e, &shown, &set_by))?;
    // A job edited under its id: refused by the run's registration, which writes nothing;
    // checked here too when a `--download` folder is to be made, so that such a resume makes
    // none (a new journal holds no job). Not otherwise: on 100 000 jobs the check costs 0.42
    // of the registration's instructions (1.85 G against 4.36 G).
    if resumed && args.download.as_ref().is_some_and(|dir| !dir.exists()) {
        journal.check_jobs(&jobs).map_err(|e| {
            e.changed_jobs_refusal()
                .unwrap_or_else(|| SetupError::new("--journal", format!("{shown}: {e}")))
        })?;
    }
    let (listeners, follow, options_callback) = match bound {
        Some(bound) => bound,
        None => bind_listeners(&args, callback, &config).await?,
    };
    // Made last: a run refused by its journal, or for a listener, made it for nothing.
    if let Some(dir) = &args.download {
        std::fs::create_dir_all(dir).map_err(|e| {
            SetupError::new(
                "--download",
                format!("cannot create {}: {e}", dir.display()),
            )
        })?;
    }
    // The run binds the journal to `origin` (the stack's base URL) as it registers the jobs,
    // and says what that changed.
    let mut options = RunOptions::new(follow)
        .on_base_url_bound(move |binding| note_binding(binding, &shown, &origin));
    if let Some(from) = moved_from {
        options = options.base_url_moved_from(from);
    }
    if let Some(url) = options_callback {
        options = options.callback_url(url);
    }
    if let Some(dir) = &args.download {
        options = options
            .download_dir(dir.clone())
            .download_timeouts(timeouts)
            .refetch_gone(args.refetch_gone);
    }
    let report = match app::execute(
        stack.clone(),
        journal,
        &jobs,
        options,
        listeners,
        args.quiet,
        stop,
    )
    .await
    {
        Ok(report) => report,
        Err(RunError::Sent(e)) => {
            note(format_args!(
                "{}; the journal is {}",
                RunError::Sent(e),
                journal_path.display()
            ));
            return Ok(EXIT_RUN_FAILED);
        }
        Err(e) => return Err(e),
    };
    // The jobs ran: a results file that cannot be written now (the disk filled up, its
    // folder went away) loses no result, since the journal has them all, and the run is
    // still reported. Not a setup error (status 2 says nothing was sent).
    let written = write_results(&output, &report.records);
    let mut summary = app::summarize(&stack, &config, &report, None);
    summary.skipped_lines = errors.len();
    print_summary(&summary, args.json);
    let code = exit_code(&summary);
    match written {
        Ok(()) => {
            note(format_args!(
                "results in {}, journal in {}",
                output.display(),
                journal_path.display()
            ));
            Ok(code)
        }
        Err(e) => {
            note(format_args!(
                "--output: cannot write {}: {e}; every result is in the journal {}: run \
                 again (nothing is created twice) to write them",
                output.display(),
                journal_path.display()
            ));
            Ok(if code == EXIT_OK {
                EXIT_INCOMPLETE
            } else {
                code
            })
        }
    }
}

/// How many jobs on a new-style endpoint a refusal for the access key pair names.
const NEW_STYLE_JOBS_NAMED: usize = 5;

/// The jobs on a new-style endpoint (`/{product}/{model}`), which takes only an API key
/// (KLING_API.md, "Auth"), for its creates and for the queries of its tasks (`/tasks`).
fn new_style_jobs(jobs: &[crate::jobs::Job]) -> Vec<&crate::jobs::Job> {
    jobs.iter()
        .filter(|job| {
            kling_core::Route::of(&http::Method::POST, &job.endpoint).generation
                == Some(kling_core::ApiGeneration::New)
        })
        .collect()
}

/// The jobs of `jobs` that a run on `journal` still sends a request for on their endpoint: to
/// create (not recorded, or never created), to look up a create of unknown outcome, to follow
/// a task, or to ask a succeeded task for the result URLs it named none of. A job that ended
/// is not: its missing result files are fetched from their URLs, and only a URL refused within
/// its 30 days sends its task's query (for fresh ones), which the pair meets with a warning,
/// the file left for a run with an API key, the run going on. One recorded under another
/// endpoint is counted: its record is not this job's.
fn still_to_send<'a>(
    journal: &Journal,
    jobs: Vec<&'a crate::jobs::Job>,
) -> Result<Vec<&'a crate::jobs::Job>, crate::error::JournalError> {
    use crate::journal::JobState;
    let mut to_send = Vec::new();
    for job in jobs {
        let done = journal.record(&job.id)?.is_some_and(|record| {
            record.endpoint == job.endpoint
                && match record.state {
                    JobState::Failed => true,
                    JobState::Succeeded => !record.urls.is_empty() || record.task_id.is_none(),
                    _ => false,
                }
        });
        if !done {
            to_send.push(job);
        }
    }
    Ok(to_send)
}

/// Refuses a run signed with the access key pair that would send requests for `new_style`,
/// jobs on a new-style endpoint: each would go to a sure refusal (401, code 1000), after the
/// legacy jobs before it were created and paid for. Names the first of them, by line and id,
/// and their endpoints.
fn refuse_new_style_jobs(new_style: &[&crate::jobs::Job]) -> SetupError {
    let mut named = String::from(if new_style.len() == 1 {
        "job "
    } else {
        "jobs "
    });
    for (index, job) in new_style.iter().take(NEW_STYLE_JOBS_NAMED).enumerate() {
        let sep = if index > 0 { ", " } else { "" };
        named.push_str(&format!(
            "{sep}`{}` (line {}) on {}",
            job.id, job.line, job.endpoint
        ));
    }
    if new_style.len() > NEW_STYLE_JOBS_NAMED {
        named.push_str(&format!(
            " and {} more",
            new_style.len() - NEW_STYLE_JOBS_NAMED
        ));
    }
    SetupError::new(
        "KLING_ACCESS_KEY",
        format!(
            "the credentials are an access key pair (KLING_ACCESS_KEY and KLING_SECRET_KEY, \
             no KLING_API_KEY), which new-style endpoints (/{{product}}/{{model}}) refuse: \
             they take only an API key, and Kling would refuse (401, code 1000) every request \
             (a create, or a query of the task) of {named}, still to send; nothing was sent: \
             set KLING_API_KEY to an API key (it works on every endpoint), or give the jobs \
             not yet sent a legacy endpoint (/v1/...)"
        ),
    )
}

/// Refuses a run whose journal, results file or `--download` folder is the jobs file, the
/// `--config` file, or another of these three, or whose results (or their temporary file),
/// jobs, `--config` file or `--download` folder is a file SQLite keeps beside the journal:
/// SQLite takes such a file for the journal's own, reads it as the journal's last commits or
/// deletes it when it opens the journal. Each refusal names both options and the path.
fn check_distinct(args: &RunArgs, journal: &Path, output: &Path) -> Result<(), SetupError> {
    let mut read: Vec<(&str, &Path, &str)> = vec![("JOBS", &args.jobs, "the jobs file")];
    if let Some(config) = &args.config {
        read.push(("--config", config, "the --config file"));
    }
    let mut written: Vec<(&str, &Path, &str, &str)> = vec![
        ("--journal", journal, "the --journal file", "file"),
        ("--output", output, "the --output file", "file"),
    ];
    if let Some(dir) = &args.download {
        written.push(("--download", dir, "the --download folder", "folder"));
    }
    for (index, &(option, path, _, kind)) in written.iter().enumerate() {
        let others = read
            .iter()
            .map(|&(_, p, what)| (p, what))
            .chain(written[..index].iter().map(|&(_, p, what, _)| (p, what)));
        for (other, what) in others {
            if same_file(path, other) {
                return Err(SetupError::new(
                    option,
                    format!(
                        "{} is {what} ({}); name another {kind}",
                        path.display(),
                        other.display()
                    ),
                ));
            }
        }
    }
    // The results reach their path through a temporary file, which must be none of those.
    let results_tmp = crate::output::tmp_path(output);
    let read_or_written = read
        .iter()
        .map(|&(_, p, what)| (p, what))
        .chain([(journal, "the --journal file")])
        .chain(
            args.download
                .as_deref()
                .map(|d| (d, "the --download folder")),
        );
    for (other, what) in read_or_written {
        if same_file(&results_tmp, other) {
            return Err(SetupError::new(
                "--output",
                format!(
                    "{}: the results are written first to {}, which is {what} ({}); name \
                     another file",
                    output.display(),
                    results_tmp.display(),
                    other.display()
                ),
            ));
        }
    }
    // Nor may any be a file SQLite keeps beside the journal, and takes for the journal's own.
    let mut others: Vec<(&str, &Path, &str, &str)> = read
        .iter()
        .map(|&(option, path, what)| (option, path, what, "file"))
        .collect();
    others.push(("--output", output, "the --output file", "file"));
    others.push((
        "--output",
        &results_tmp,
        "the --output file's temporary file",
        "file",
    ));
    if let Some(dir) = &args.download {
        others.push(("--download", dir, "the --download folder", "folder"));
    }
    for (companion, role) in crate::journal::companions(journal) {
        for &(option, path, what, kind) in &others {
            if same_file(path, &companion) {
                return Err(SetupError::new(
                    option,
                    format!(
                        "{} ({what}) is the {role} of the --journal file {}, which SQLite keeps \
                         beside it: opening the journal, SQLite would take it for the journal's \
                         own, and read it as the journal's commits or delete it; name another \
                         {kind}",
                        path.display(),
                        journal.display(),
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `--callback-listen` and what goes with it, checked before anything is made or bound.
struct CallbackSettings {
    /// Where to listen.
    addr: SocketAddr,
    /// `--callback-url` and the path the listener serves for it, if given (else the URL is
    /// the bound address's).
    url: Option<(String, String)>,
    /// The verifier of `--callback-secret`, else of `KLING_WEBHOOK_SECRET`, if either is set.
    verifier: Option<WebhookVerifier>,
}

/// The callback settings of `args`, if it listens for callbacks: a `--callback-url` Kling
/// cannot post to, none with a listener on every interface, or a secret that is none, is
/// refused naming the option or variable.
fn callback_settings(args: &RunArgs) -> Result<Option<CallbackSettings>, SetupError> {
    let Some(addr) = args.callback_listen else {
        return Ok(None);
    };
    let url = match &args.callback_url {
        Some(url) => Some((url.clone(), callbacks::callback_path(url)?)),
        // Kling cannot post to `0.0.0.0` or `[::]`: its callbacks would all fail, and the
        // run fall back on its queries without a word.
        None if addr.ip().is_unspecified() => {
            return Err(SetupError::new(
                "--callback-url",
                format!(
                    "--callback-listen {addr} listens on every interface, and Kling cannot post \
                     to {}: give the public URL Kling should post callbacks to (e.g. \
                     https://HOST{CALLBACK_PATH})",
                    addr.ip()
                ),
            ));
        }
        None => None,
    };
    // A secret refused is named by where it came from: the option, else the variable.
    let secret = match &args.callback_secret {
        Some(secret) => Some(("--callback-secret", secret.clone())),
        None => env_text("KLING_WEBHOOK_SECRET")?.map(|secret| ("KLING_WEBHOOK_SECRET", secret)),
    };
    let verifier = match secret {
        Some((source, secret)) => Some(
            WebhookVerifier::new(&secret).map_err(|e| SetupError::new(source, e.to_string()))?,
        ),
        None => None,
    };
    Ok(Some(CallbackSettings {
        addr,
        url,
        verifier,
    }))
}

/// Refuses a `--download` folder that could not be made for what is already on its path: a
/// file there, or at a folder above it. Checked before the journal is made; the folder itself
/// is made last, once nothing else can refuse the run (a refused run left it behind).
fn check_folder_can_be(dir: &Path) -> Result<(), SetupError> {
    let blocked = |found: &Path| {
        SetupError::new(
            "--download",
            format!(
                "cannot create {}: {} is there and is not a folder",
                dir.display(),
                found.display()
            ),
        )
    };
    // The nearest part of the path that is there must be a folder (links followed).
    for part in dir.ancestors().filter(|p| !p.as_os_str().is_empty()) {
        match std::fs::metadata(part) {
            Ok(found) if found.is_dir() => return Ok(()),
            Ok(_) => return Err(blocked(part)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // Not known (no permission to look): making it will say.
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

/// Refuses a `--download` folder whose path is not valid UTF-8: the journal and the results
/// record each file's path as text, which would hold `�` in place of the bytes that are not,
/// and a rerun, not finding the files recorded, would fetch every job's files again.
fn check_utf8_folder(dir: &Path) -> Result<(), SetupError> {
    match dir.to_str() {
        Some(_) => Ok(()),
        None => Err(SetupError::new(
            "--download",
            format!(
                "{} is not valid UTF-8: the journal and the results record each file's path as \
                 text; name a folder whose path is",
                dir.display()
            ),
        )),
    }
}

/// Whether `a` and `b` name one file (the second may not exist yet).
fn same_file(a: &Path, b: &Path) -> bool {
    fn resolved(path: &Path) -> Option<PathBuf> {
        if let Ok(path) = std::fs::canonicalize(path) {
            return Some(path);
        }
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        Some(std::fs::canonicalize(parent).ok()?.join(path.file_name()?))
    }
    match (resolved(a), resolved(b)) {
        (Some(a), Some(b)) => a == b,
        _ => a == b,
    }
}

/// The run's stack: its limits in this process, or (feature `redis`, `--redis`) in Redis.
async fn build_stack(
    // Its Redis options, with feature `redis`.
    #[cfg_attr(not(feature = "redis"), allow(unused_variables))] args: &RunArgs,
    config: StackConfig,
    credentials: Credentials,
    (base_url, base_source): (String, String),
) -> Result<Stack, SetupError> {
    #[cfg(feature = "redis")]
    if let Some((source, url)) = match &args.redis {
        Some(url) => Some(("--redis", url.clone())),
        None => env_text("KLING_REDIS_URL")?.map(|url| ("KLING_REDIS_URL", url)),
    } {
        use kling_tower::redis::{Connection, RedisConfig};
        let mut redis = RedisConfig::new(url);
        if let Some(prefix) = &args.redis_prefix {
            redis = redis.prefix(prefix.clone());
        }
        // The URL is not echoed: it may hold a password.
        let connection = Connection::connect(redis)
            .await
            .map_err(|e| SetupError::new(source, format!("cannot use that Redis: {e}")))?;
        return Stack::shared(config, credentials, &base_url, connection)
            .map_err(|e| base_url_option(e, base_source));
    }
    Stack::new(config, credentials, &base_url).map_err(|e| base_url_option(e, base_source))
}

/// Checks `base` as the stack will, before a Redis is connected to, a refusal named by
/// `source`, the option or variable that set it. kling-tower's check quotes nothing of a base
/// URL that may carry a password or a signature (an `@`, `?` or `#` anywhere).
fn check_base_url(base: &str, source: &str) -> Result<(), SetupError> {
    StackConfig::preset(Tier::Free)
        .base_url(base)
        .validate()
        .map(drop)
        .map_err(|e| {
            SetupError::new(
                source,
                format!(
                    "invalid kling-tower configuration: `{source}` {}",
                    e.reason()
                ),
            )
        })
}

/// The variable that sets the base URL, with `--config` too ([`load_config`]).
const BASE_URL_VAR: &str = "KLING_BASE_URL";

/// The base URL a run sends to, and where it was set: `--base-url`, else the configuration's
/// (checked when it was read: `KLING_BASE_URL`, else the `--config` file's `base_url`), else
/// the global host.
fn base_url(args: &RunArgs, config: &StackConfig) -> (String, String) {
    let variable_set = std::env::var_os(BASE_URL_VAR)
        .is_some_and(|value| !value.to_string_lossy().trim().is_empty());
    base_url_from(args, config, variable_set)
}

/// [`base_url`], told whether `KLING_BASE_URL` is set (not blank).
fn base_url_from(args: &RunArgs, config: &StackConfig, variable_set: bool) -> (String, String) {
    match (&args.base_url, config.configured_base_url(), &args.config) {
        (Some(url), _, _) => (url.clone(), "--base-url".to_owned()),
        (None, Some(url), Some(file)) if !variable_set => {
            (url.to_owned(), format!("{} (base_url)", file.display()))
        }
        (None, Some(url), _) => (url.to_owned(), BASE_URL_VAR.to_owned()),
        (None, None, _) => (
            kling_tower::base_url::GLOBAL.to_owned(),
            "--base-url".to_owned(),
        ),
    }
}

/// Where the base URL of `base_url_from` came from, as a refusal says it: `source` (the
/// option, variable or file), or that nothing set it.
fn base_url_set_by(args: &RunArgs, config: &StackConfig, source: &str) -> String {
    if args.base_url.is_none() && config.configured_base_url().is_none() {
        format!(
            "the default, Kling's global host: no --base-url, {BASE_URL_VAR} nor --config \
             base_url is set"
        )
    } else {
        format!("set by {source}")
    }
}

/// What binding the journal at `shown` to `origin`, the base URL of this run
/// ([`Journal::bind_base_url`]), changed, as a note: one that recorded none (of an earlier
/// version), none whose jobs hold a task, or one named by `--base-url-moved-from`, records
/// this run's.
fn note_binding(binding: &BaseUrlBinding, shown: &impl std::fmt::Display, origin: &ApiOrigin) {
    match binding {
        BaseUrlBinding::Unrecorded => note(format_args!(
            "{shown} does not say where its jobs were sent (a journal of an earlier \
             kling-batch): it now records {origin}, where this run looks them up, and later \
             runs on it must send there too"
        )),
        BaseUrlBinding::Unsent { from } => note(format_args!(
            "{shown}: none of its jobs holds a task at {from}: it now records {origin}"
        )),
        BaseUrlBinding::Moved { from } => note(format_args!(
            "{shown}: its jobs, sent to {from}, are now looked up at {origin} \
             (--base-url-moved-from), which it records"
        )),
        _ => {}
    }
}

/// The refusal of the journal at `shown` for the base URL of this run
/// ([`Journal::check_base_url`]): a journal whose jobs were sent elsewhere names both base
/// URLs, what set this run's (`set_by`) and what to do.
fn refuse_base_url(
    e: &crate::error::JournalError,
    shown: &impl std::fmt::Display,
    set_by: &str,
) -> SetupError {
    let other =
        std::error::Error::source(e).and_then(|source| source.downcast_ref::<OtherBaseUrl>());
    let Some(other) = other else {
        return SetupError::new("--journal", format!("{shown}: {e}"));
    };
    let (recorded, current) = (other.recorded(), other.current());
    let named = match other.moved_from() {
        Some(given) => {
            format!(" (--base-url-moved-from names {given}, and the journal names {recorded})")
        }
        None => String::new(),
    };
    SetupError::new(
        "--journal",
        format!(
            "{shown}: its jobs were sent to {recorded}, and this run sends to {current} \
             ({set_by}){named}: their tasks are not there, and looked up there none would be \
             found and those jobs created again (billed twice). Nothing was sent. Run with \
             --base-url {recorded} (or the {BASE_URL_VAR} or --config that sent them there); \
             if {current} reaches the same Kling account and region (a proxy or host renamed), \
             run once with --base-url-moved-from {recorded}; to run every job anew at \
             {current} instead (each created and billed again), use a new --journal"
        ),
    )
}

/// The listeners of a run, its follow policy and the callback URL its creates name: the
/// callback listener (`callback`, checked before) and `--metrics-addr`, each refused naming its
/// option when it cannot be bound.
async fn bind_listeners(
    args: &RunArgs,
    callback: Option<CallbackSettings>,
    config: &StackConfig,
) -> Result<(Listeners, FollowPolicy, Option<String>), SetupError> {
    let mut listeners = Listeners::default();
    let mut follow = crate::run::default_follow_policy(config.speed_factor());
    let mut options_callback = None;
    if let Some(callback) = callback {
        let addr = callback.addr;
        let listener = callbacks::bind(addr)
            .await
            .map_err(|e| SetupError::new("--callback-listen", format!("{addr}: {e}")))?;
        let bound = listener
            .local_addr()
            .map_err(|e| SetupError::new("--callback-listen", e.to_string()))?;
        let url = match callback.url {
            Some((url, path)) => {
                listeners.callback_path = Some(path);
                url
            }
            None => format!("http://{bound}{CALLBACK_PATH}"),
        };
        listeners.callback = Some((listener, callback.verifier));
        options_callback = Some(url);
        follow = FollowPolicy::new()
            .callbacks_first(std::time::Duration::from_secs(60))
            .speed(config.speed_factor());
    }
    if let Some(addr) = args.metrics_addr {
        listeners.metrics = Some(
            callbacks::bind(addr)
                .await
                .map_err(|e| SetupError::new("--metrics-addr", format!("{addr}: {e}")))?,
        );
    }
    Ok((listeners, follow, options_callback))
}

/// A stack's error about its `base_url` field, naming the option, variable or file that set
/// it.
fn base_url_option(e: SetupError, source: String) -> SetupError {
    if e.field() == "base_url" {
        e.renamed(source)
    } else {
        e
    }
}

async fn demo(args: DemoArgs, stop: StopSignal) -> Result<i32, RunError> {
    let options = DemoOptions {
        tier: args.tier,
        jobs: args.jobs,
        speed: args.speed,
        download_dir: args.download,
        metrics_addr: args.metrics_addr,
        quiet: args.quiet,
    };
    let (summary, _) = demo::run_demo(&options, stop).await?;
    print_summary(&summary, args.json);
    Ok(exit_code(&summary))
}

fn print_summary(summary: &Summary, json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        let _ = serde_json::to_writer(&mut out, summary);
        let _ = writeln!(out);
    } else {
        let _ = write!(out, "{summary}");
    }
}

/// The exit status a summary calls for: 0 only when every job succeeded with its result URLs
/// (none is counted under `succeeded, no result URL`), no result file is missing (nor gone)
/// and no line of the jobs file was skipped.
pub fn exit_code(summary: &Summary) -> i32 {
    if summary.interrupted {
        EXIT_INTERRUPTED
    } else if summary.ok == summary.jobs
        && summary.downloads_missing == 0
        && summary.downloads_gone == 0
        && summary.skipped_lines == 0
    {
        EXIT_OK
    } else {
        EXIT_INCOMPLETE
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    /// Of the new-style jobs of a resume, those still to send a request on their endpoint:
    /// not recorded, queued, not submitted, creating, created (with or without a task), or
    /// succeeded without a result URL (its task is asked again); not one that failed or
    /// succeeded with its URLs, nor one of another endpoint under its id. Every job was
    /// counted, finished or not.
    #[test]
    fn only_the_new_style_jobs_a_resume_still_sends_need_an_api_key() {
        use crate::journal::{JobState, Update};
        let ids = [
            "queued",
            "unsent",
            "creating",
            "untasked",
            "following",
            "asked",
            "done",
            "failed",
        ];
        let line = |id: &str| {
            format!(
                "{{\"id\":\"{id}\",\"prompt\":\"{id}\",\"endpoint\":\"/text-to-video/kling-3.0\"}}\n"
            )
        };
        let text: String = ids.iter().map(|id| line(id)).collect();
        let (jobs, errors) = crate::jobs::parse_jobs(&text);
        assert!(errors.is_empty());
        let journal = Journal::open_in_memory().unwrap();
        journal.register(&jobs).unwrap();
        let to = |id: &str, state: JobState, update: Update| {
            journal.transition(id, state, update).unwrap();
        };
        to("unsent", JobState::NotSubmitted, Update::default());
        for id in &ids[2..] {
            to(id, JobState::Creating, Update::default());
        }
        for id in &ids[3..] {
            to(id, JobState::Created, Update::default());
        }
        for id in &ids[4..] {
            to(id, JobState::Created, Update::task(format!("t-{id}")));
        }
        to("asked", JobState::Succeeded, Update::default());
        let urls = Update {
            urls: Some(vec!["https://cdn.example/done.mp4".to_owned()]),
            ..Update::default()
        };
        to("done", JobState::Succeeded, urls);
        to("failed", JobState::Failed, Update::default());
        // Not recorded yet, and recorded under another endpoint (a legacy job's).
        let (more, _) = crate::jobs::parse_jobs(&format!("{}{}", line("new"), line("moved")));
        let (legacy, _) = crate::jobs::parse_jobs("{\"id\":\"moved\",\"prompt\":\"moved\"}\n");
        journal.register(&legacy).unwrap();
        let all: Vec<_> = jobs.iter().chain(&more).collect();
        assert_eq!(new_style_jobs(&jobs).len(), jobs.len());
        let to_send: Vec<&str> = still_to_send(&journal, all)
            .unwrap()
            .iter()
            .map(|job| job.id.as_str())
            .collect();
        assert_eq!(
            to_send,
            [
                "queued",
                "unsent",
                "creating",
                "untasked",
                "following",
                "asked",
                "new",
                "moved"
            ]
        );
    }

    /// The journal a task still holds when the command returns (a callback listener's
    /// connection, an aborted follow) is closed before the process may exit: the runtime
    /// was shut down in the background, and the process exited while its threads dropped
    /// the last handle, leaving a clean run's journal marked open, with its `-wal`.
    #[test]
    fn the_journal_a_task_still_holds_is_closed_before_the_process_may_exit() {
        /// Holds the journal, and lets it go slowly, as a thread that is busy would.
        struct SlowDrop(Option<Journal>);
        impl Drop for SlowDrop {
            fn drop(&mut self) {
                std::thread::sleep(Duration::from_millis(500));
                self.0.take();
            }
        }
        let dir = std::env::temp_dir().join(format!("kb-cli-close-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("j.sqlite");
        let wal = dir.join("j.sqlite-wal");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let held = SlowDrop(Some(Journal::open(&path).unwrap()));
        assert!(wal.exists(), "open: its commits may be in the -wal alone");
        runtime.spawn(async move {
            let _held = held;
            std::future::pending::<()>().await
        });
        assert_eq!(runtime.block_on(async { EXIT_OK }), EXIT_OK);
        assert!(shut_down_unless(
            runtime,
            std::future::pending(),
            SHUTDOWN_WAIT,
            || true
        ));
        assert!(!wal.exists(), "closed: the journal stands alone");
        // So a copy of the main file alone is a whole journal, not one refused as left open.
        let copy = dir.join("copy.sqlite");
        std::fs::copy(&path, &copy).unwrap();
        Journal::open(&copy).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A stop while the runtime is shut down (blocking work that does not end, as a name
    /// lookup a stop gave up on) quits at once: the run's own watcher was dropped with the
    /// runtime, and a second Ctrl-C went unheard for the 5 s the shutdown waited. Control:
    /// with no stop, the shutdown ends as the work it waits for does.
    #[test]
    fn a_stop_while_the_runtime_shuts_down_quits_at_once() {
        let blocked_runtime = || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let (release, released) = std::sync::mpsc::channel::<()>();
            runtime.spawn_blocking(move || released.recv());
            (runtime, release)
        };
        let (runtime, release) = blocked_runtime();
        let began = std::time::Instant::now();
        let quit = async { tokio::time::sleep(Duration::from_millis(100)).await };
        assert!(
            !shut_down_unless(runtime, quit, SHUTDOWN_WAIT, || true),
            "the stop came first"
        );
        let waited = began.elapsed();
        assert!(waited < Duration::from_secs(2), "quit after {waited:?}");
        drop(release);

        let (runtime, release) = blocked_runtime();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(release);
        });
        assert!(shut_down_unless(
            runtime,
            std::future::pending(),
            SHUTDOWN_WAIT,
            || true
        ));
        releaser.join().unwrap();
    }

    /// A journal whose close outlasts the wait for blocking work (a checkpoint on a slow
    /// disk, a worker busy as the shutdown began) is waited for: the shutdown returned after
    /// the wait and the process exited (0 for a clean run) with the close cut, a checkpoint
    /// half done leaving a main file that may read as closed without all its commits. A stop
    /// while it is waited for still quits at once.
    #[test]
    fn a_journal_closing_past_the_wait_for_blocking_work_is_waited_for() {
        /// Holds the journal, and lets it go slowly, as a thread that is busy would.
        struct SlowDrop(Option<Journal>);
        impl Drop for SlowDrop {
            fn drop(&mut self) {
                std::thread::sleep(Duration::from_millis(1_500));
                self.0.take();
            }
        }
        let dir = std::env::temp_dir().join(format!("kb-cli-slow-close-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let holding = |name: &str| {
            let path = dir.join(name);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let held = SlowDrop(Some(Journal::open(&path).unwrap()));
            runtime.spawn(async move {
                let _held = held;
                std::future::pending::<()>().await
            });
            let wal = dir.join(format!("{name}-wal"));
            assert!(wal.exists(), "open");
            (runtime, wal)
        };
        let wait = Duration::from_millis(50);

        let (runtime, wal) = holding("slow.sqlite");
        let probe = wal.clone();
        assert!(shut_down_unless(
            runtime,
            std::future::pending(),
            wait,
            move || !probe.exists()
        ));
        assert!(!wal.exists(), "closed before the process may exit");

        // Control: a stop while the close is waited for quits at once, as a kill does.
        let (runtime, wal) = holding("stopped.sqlite");
        let probe = wal.clone();
        let began = std::time::Instant::now();
        let quit = async { tokio::time::sleep(Duration::from_millis(100)).await };
        assert!(!shut_down_unless(runtime, quit, wait, move || !probe.exists()));
        assert!(
            began.elapsed() < Duration::from_millis(1_000),
            "{:?}",
            began.elapsed()
        );
        assert!(wal.exists(), "left open");
        std::thread::sleep(Duration::from_millis(1_600));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A malformed line is named with what it holds (`endpoint` `…` is not a path): a control
    /// character there (an escape that clears the screen or colors it) reached the terminal.
    #[test]
    fn a_note_on_stderr_escapes_the_control_characters_of_a_line() {
        let (_, errors) = crate::jobs::parse_jobs(
            "{\"id\":\"a\",\"prompt\":\"x\",\"endpoint\":\"/\\u001b[2J\\u0007\"}\n",
        );
        let line = note_line(format_args!("jobs.jsonl: {} (skipped)", errors[0]));
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.contains("`/\\u{1b}[2J\\u{7}`"), "{line}");
        assert!(
            line.starts_with("kling-batch: jobs.jsonl: line 1: "),
            "{line}"
        );
    }

    /// The callback secret (and the Redis URL, which may hold a password) never show in the
    /// command line's `Debug`, which a caller may log.
    #[test]
    fn the_debug_of_a_command_line_shows_no_secret() {
        let mut argv = vec![
            "kling-batch",
            "run",
            "jobs.jsonl",
            "--callback-listen",
            "127.0.0.1:0",
            "--callback-secret",
            "whsec_TOPSECRET",
            "--callback-url",
            "https://hook:HOOKPASSWORD@example.com/hooks/kling?token=HOOKTOKEN",
            "--base-url",
            "https://proxy:PROXYPASSWORD@proxy.example/kling?key=PROXYKEY",
            "--base-url-moved-from",
            "https://old:OLDPASSWORD@old.example/kling?key=OLDKEY",
        ];
        if cfg!(feature = "redis") {
            argv.extend(["--redis", "redis://:REDISPASSWORD@10.0.0.5:6379/"]);
        }
        let cli = Cli::try_parse_from(argv).unwrap();
        let text = format!("{cli:?}");
        assert!(!text.contains("TOPSECRET"), "{text}");
        assert!(!text.contains("REDISPASSWORD"), "{text}");
        for secret in [
            "HOOKPASSWORD",
            "HOOKTOKEN",
            "PROXYPASSWORD",
            "PROXYKEY",
            "OLDPASSWORD",
            "OLDKEY",
        ] {
            assert!(!text.contains(secret), "{secret}: {text}");
        }
        assert!(
            text.contains("https://example.com/hooks/kling")
                && text.contains("proxy.example")
                && text.contains("https://old.example/kling"),
            "{text}"
        );
        assert!(
            text.contains("callback_secret: Some(\"<redacted>\")"),
            "{text}"
        );
        assert!(text.contains("jobs.jsonl"), "{text}");
        let Command::Run(args) = cli.command else {
            panic!("a run")
        };
        assert_eq!(args.callback_secret.as_deref(), Some("whsec_TOPSECRET"));
        // A URL that cannot be read as one is not shown at all.
        let cli = Cli::try_parse_from([
            "kling-batch",
            "run",
            "jobs.jsonl",
            "--callback-listen",
            "127.0.0.1:0",
            "--callback-url",
            "https://example.com/hooks kling?token=HOOKTOKEN",
            "--base-url",
            "https://proxy.example/kling?key=PROXY KEY",
        ])
        .unwrap();
        let text = format!("{cli:?}");
        assert!(
            !text.contains("HOOKTOKEN") && !text.contains("PROXY KEY"),
            "{text}"
        );
        assert!(text.contains("base_url: Some(\"<redacted>\")"), "{text}");
    }

    /// A URL whose password holds a `/`, `?` or `#` reads as a host (the user name), a port
    /// and a path, query or fragment that hold the rest of the password and the host
    /// (`https://kb:443/hunter2@proxy` is host `kb`, port 443, path `/hunter2@proxy`): the
    /// command line's `Debug` showed that path, the password in it, for `--base-url`,
    /// `--base-url-moved-from` and `--callback-url` (whose refusals quote nothing of such a
    /// URL). An `@` that is not in the URL's user info, as `http` reads it, shows nothing.
    #[test]
    fn the_debug_of_a_command_line_shows_no_password_that_ends_its_host_early() {
        for url in [
            "https://kb:443/HUNTER2@proxy.example/kling",
            "https://kb:pass/HUNTER2@proxy.example",
            "https://kb:1234#HUNTER2@proxy.example",
            "https://kb:1234?HUNTER2@proxy.example",
            "https://kb:1234/56@proxy.example",
        ] {
            let cli = Cli::try_parse_from([
                "kling-batch",
                "run",
                "jobs.jsonl",
                "--callback-listen",
                "127.0.0.1:0",
                "--callback-url",
                url,
                "--base-url",
                url,
                "--base-url-moved-from",
                url,
            ])
            .unwrap();
            let text = format!("{cli:?}");
            for secret in ["HUNTER2", "1234", "56@"] {
                assert!(!text.contains(secret), "{url}: {secret}: {text}");
            }
            for field in ["base_url", "base_url_moved_from", "callback_url"] {
                assert!(
                    text.contains(&format!("{field}: Some(\"<redacted>\")")),
                    "{url}: {field}: {text}"
                );
            }
        }
        // User info `http` reads as such is left out, and the rest shown.
        assert_eq!(
            redacted_url("https://kb:pass@proxy.example:8443/kling?key=K"),
            "https://proxy.example:8443/kling"
        );
    }

    /// With no `--base-url`, a run sends where the configuration says (`KLING_BASE_URL`, or
    /// the file's `base_url`), else to the global host; the option wins over both. The option
    /// used to default to the global host, so a configured base URL was checked and then
    /// ignored without a word. Each is named by what set it: a base URL the `--config` file
    /// set was named `KLING_BASE_URL`.
    #[test]
    fn the_base_url_comes_from_the_option_else_the_configuration_else_the_global_host() {
        use kling_tower::base_url::{CHINA, GLOBAL};
        let args = |argv: &[&str]| {
            let argv = ["kling-batch", "run", "jobs.jsonl"].iter().chain(argv);
            match Cli::try_parse_from(argv).unwrap().command {
                Command::Run(args) => args,
                _ => panic!("a run"),
            }
        };
        let plain = StackConfig::preset(Tier::Pro);
        let china = StackConfig::preset(Tier::Pro).base_url(CHINA);
        let named = |url: &str, source: &str| (url.to_owned(), source.to_owned());
        for variable_set in [false, true] {
            assert_eq!(
                base_url_from(&args(&[]), &plain, variable_set),
                named(GLOBAL, "--base-url")
            );
        }
        assert_eq!(
            base_url_from(&args(&[]), &china, true),
            named(CHINA, "KLING_BASE_URL")
        );
        // Read from the file: named by it, unless the variable set it over the file's.
        let with_file = args(&["--config", "kling.toml"]);
        assert_eq!(
            base_url_from(&with_file, &china, false),
            named(CHINA, "kling.toml (base_url)")
        );
        assert_eq!(
            base_url_from(&with_file, &china, true),
            named(CHINA, "KLING_BASE_URL")
        );
        let proxy = args(&["--base-url", "http://127.0.0.1:9", "--config", "kling.toml"]);
        for variable_set in [false, true] {
            assert_eq!(
                base_url_from(&proxy, &china, variable_set),
                named("http://127.0.0.1:9", "--base-url")
            );
        }
        // A refusal for another base URL than the journal's says what set this run's: the
        // global host is named as the default, not as set by `--base-url`, which no one gave
        // (`KLING_BASE_URL` unset since the last run).
        let default = base_url_set_by(&args(&[]), &plain, "--base-url");
        assert!(
            default.starts_with("the default, Kling's global host: no --base-url"),
            "{default}"
        );
        assert_eq!(
            base_url_set_by(&args(&[]), &china, "KLING_BASE_URL"),
            "set by KLING_BASE_URL"
        );
        assert_eq!(
            base_url_set_by(&proxy, &plain, "--base-url"),
            "set by --base-url"
        );
    }

    /// A speed is judged by the configuration the run uses, its retry deadline raised to 48
    /// hours of API time: `--speed 100000` left the preset's 10 minutes at 6 ms, under its
    /// 15 ms jitter allowance, and was refused as `--jitter_allowance_ms` (no option), though
    /// the run never uses that deadline; `--speed 0.001`, which stretches the 48 hours past
    /// the year the stack takes, was refused only when the stack was built, as
    /// `retry_deadline_secs`, a field no one set.
    #[test]
    fn a_speed_is_judged_by_the_runs_own_deadline_and_named_as_the_option() {
        let args = |speed: &str| {
            let argv = [
                "kling-batch",
                "run",
                "j.jsonl",
                "--tier",
                "pro",
                "--speed",
                speed,
            ];
            let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("a run")
            };
            args
        };
        let config = load_config(&args("100000")).unwrap();
        assert_eq!(config.speed_factor(), 100_000.0);
        let error = load_config(&args("0.001")).unwrap_err();
        assert_eq!(error.field(), "--speed", "{error}");
        assert!(error.to_string().contains("48 hours"), "{error}");
    }

    /// `--refetch-gone` does something only with `--download`: alone it is refused, not
    /// accepted and ignored.
    #[test]
    fn refetch_gone_requires_download() {
        let run = |extra: &[&str]| {
            let mut argv = vec!["kling-batch", "run", "jobs.jsonl", "--refetch-gone"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv)
        };
        let error = run(&[]).unwrap_err();
        assert!(error.to_string().contains("--download"), "{error}");
        let Command::Run(args) = run(&["--download", "out"]).unwrap().command else {
            panic!("a run")
        };
        assert!(args.refetch_gone);
    }
}
