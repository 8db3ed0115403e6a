//! Run a batch of Kling generation jobs as fast as the account allows: resumable, never paying
//! twice, with progress and a report.
//!
//! This is the library behind the `kling-batch` command (`kling-batch run JOBS.jsonl`,
//! `kling-batch demo`): jobs from JSONL ([`jobs`]), a SQLite journal of every state change
//! ([`journal`]), the run itself through kling-tower's stack ([`run`]), callbacks
//! ([`callbacks`]), downloads ([`download`]), the summary with its efficiency bound
//! ([`summary`]), and the command's warnings on stderr ([`log`]).
//!
//! ```
//! use kling_batch::jobs::parse_jobs;
//! use kling_batch::journal::{JobState, Journal};
//! use kling_batch::run::{Engine, RunOptions, default_follow_policy};
//! use kling_batch::stack::Stack;
//! use kling_mock::{MockConfig, MockServer, Preset};
//! use kling_tower::{Credentials, StackConfig, Tier};
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A Pro-tier mock at 1000× speed: a two-minute task takes 0.12 s.
//! let server = MockServer::start(MockConfig::preset(Preset::Pro).speed(1000.0)).await?;
//! let config = StackConfig::preset(Tier::Pro).speed(1000.0).headroom(0.5);
//! let stack = Stack::new(config, Credentials::api_key("my-key")?, &server.base_url())?;
//!
//! let (jobs, errors) = parse_jobs("{\"prompt\":\"a cat\"}\n{\"prompt\":\"a dog\"}\nnot json\n");
//! assert_eq!(errors[0].line(), 3);
//! let journal = Journal::open_in_memory()?;
//! let options = RunOptions::new(default_follow_policy(1000.0));
//! let engine = Engine::new(stack.clone(), journal.clone(), options)?;
//! let (_stop, stop) = tokio::sync::watch::channel(false);
//! let report = engine.run(&jobs, stop).await?;
//!
//! assert!(report.records.iter().all(|r| r.state == JobState::Succeeded));
//! assert_eq!(server.stats().tasks_created, 2);
//! // The journal records where its jobs were sent: a resume through a stack sent elsewhere
//! // is refused before it sends anything.
//! assert_eq!(journal.base_url()?.as_ref(), Some(stack.base_url()));
//! # Ok(()) }
//! ```
//!
//! The engine binds its journal to its stack's base URL itself, as it registers the jobs (see
//! [`run`]): a journal whose tasks are at another API, where a resume would not find them and
//! would create them again, is refused without a call of yours.
//!
//! # The command
//!
//! | command | what it does |
//! |---|---|
//! | `kling-batch demo [--tier pro] [--jobs 100] [--speed 60] [--json]` | the embedded mock, a generated workload, the summary |
//! | `kling-batch run JOBS.jsonl [--tier T \| --config FILE] [--base-url URL]` | creates, follows, writes `JOBS.results.jsonl`; run again to resume |
//! | `--callback-listen ADDR [--callback-secret S]` | ends tasks on Kling's callbacks |
//! | `--download DIR` | saves result files as tasks succeed (`--download-connect-timeout`, `--download-idle-timeout`, `--download-timeout`, `--refetch-gone`: see [`download`]) |
//! | `--metrics-addr ADDR` | Prometheus metrics at `/metrics` while running |
//! | `--json` | the summary as one JSON object |
//! | `--strict` | refuses a file with a malformed line (without it, such a line is skipped, counted, and the exit status is 1) |
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `redis` | off | `kling-batch run --redis URL` and [`Stack::shared`](stack::Stack): the account's limits in a Redis shared by every run of the account (kling-tower's `redis` feature) |
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88.

pub mod app;
pub mod callbacks;
pub mod cli;
pub mod demo;
pub mod download;
pub mod error;
pub mod jobs;
pub mod journal;
pub mod log;
pub mod output;
pub mod progress;
pub mod run;
pub mod stack;
pub mod summary;
pub mod tally;
