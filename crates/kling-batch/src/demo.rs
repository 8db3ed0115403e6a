//! `kling-batch demo`: the embedded mock, a generated workload, the whole stack — no account
//! needed.
//!
//! The mock runs the tier's limits exactly, sped up by `speed`; the stack uses the same
//! tier's preset at the same speed, a local callback listener (signed callbacks), and the
//! follow policy at that speed. The summary's bound uses the mock's own task durations.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use kling_mock::{MockConfig, MockServer, Preset};
use kling_tower::{Credentials, FollowPolicy, StackConfig, Tier, WebhookVerifier};
use serde_json::{Map, Value};

use crate::app::{self, Listeners};
use crate::callbacks::{self, CALLBACK_PATH};
use crate::error::{RunError, SetupError};
use crate::jobs::{DEFAULT_ENDPOINT, Job};
use crate::journal::Journal;
use crate::run::{RunOptions, RunReport, StopSignal};
use crate::stack::Stack;
use crate::summary::Summary;

/// The demo's settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DemoOptions {
    /// The tier the mock enforces and the stack is configured for.
    pub tier: Tier,
    /// How many jobs to generate.
    pub jobs: usize,
    /// The speed factor of both sides.
    pub speed: f64,
    /// Where to save result files, if anywhere.
    pub download_dir: Option<PathBuf>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// No progress bars.
    pub quiet: bool,
}

impl Default for DemoOptions {
    /// Pro, 100 jobs, 60× speed.
    fn default() -> Self {
        DemoOptions {
            tier: Tier::Pro,
            jobs: 100,
            speed: 60.0,
            download_dir: None,
            metrics_addr: None,
            quiet: false,
        }
    }
}

/// The mock preset of a tier.
pub fn preset_of(tier: Tier) -> Result<Preset, SetupError> {
    match tier {
        Tier::Free => Ok(Preset::Free),
        Tier::Standard => Ok(Preset::Standard),
        Tier::Pro => Ok(Preset::Pro),
        Tier::Enterprise => Ok(Preset::Enterprise),
        other => Err(SetupError::new(
            "--tier",
            format!("the demo runs free, standard, pro or enterprise, not {other}"),
        )),
    }
}

/// The real-time margin the demo keeps between two requests' turns at the server, beyond the
/// rate's own spacing: at 60× a request interval is a few milliseconds, so the preset's 15 ms
/// jitter allowance would cost most of the rate; on a quiet loopback 5 ms is enough.
pub const JITTER_MARGIN: Duration = Duration::from_millis(5);

/// The stack configuration of the demo: the tier's preset at `speed`, with a
/// [`JITTER_MARGIN`] jitter allowance.
pub fn demo_config(tier: Tier, speed: f64) -> StackConfig {
    StackConfig::preset(tier)
        .speed(speed)
        .jitter_allowance(JITTER_MARGIN)
}

/// The generated workload: `n` text-to-video jobs.
pub fn workload(n: usize) -> Vec<Job> {
    (1..=n)
        .map(|i| {
            let mut body = Map::new();
            body.insert(
                "prompt".into(),
                Value::String(format!(
                    "demo shot {i}: a paper boat sailing down a rainy street"
                )),
            );
            Job::new(format!("demo-{i:04}"), i, DEFAULT_ENDPOINT, body)
                .unwrap_or_else(|e| unreachable!("the demo's jobs are valid: {e}"))
        })
        .collect()
}

/// Runs the demo; returns the summary (with the mock's truth) and the run's report.
pub async fn run_demo(
    options: &DemoOptions,
    stop: StopSignal,
) -> Result<(Summary, RunReport), RunError> {
    if options.jobs == 0 {
        return Err(SetupError::new("--jobs", "must be at least 1").into());
    }
    let config = demo_config(options.tier, options.speed);
    crate::cli::check_speed(&config, Some("--speed".to_owned()))?;
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("kling-batch-demo-{}", std::process::id()))
    );
    let mock = MockConfig::preset(preset_of(options.tier)?)
        .speed(options.speed)
        .callback_secret(secret.clone());
    let server = MockServer::start(mock)
        .await
        .map_err(|e| SetupError::new("mock", e.to_string()))?;
    let stack = Stack::new(
        config.clone(),
        Credentials::api_key("kling-batch-demo")
            .map_err(|e| SetupError::new("api_key", e.to_string()))?,
        &server.base_url(),
    )?;
    let listener = callbacks::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .map_err(|e| SetupError::new("callback listener", e.to_string()))?;
    let callback_url = format!(
        "http://{}{CALLBACK_PATH}",
        listener
            .local_addr()
            .map_err(|e| SetupError::new("callback listener", e.to_string()))?
    );
    let verifier = WebhookVerifier::new(&secret)
        .map_err(|e| SetupError::new("webhook_secret", e.to_string()))?;
    let metrics = match options.metrics_addr {
        Some(addr) => Some(
            callbacks::bind(addr)
                .await
                .map_err(|e| SetupError::new("--metrics-addr", e.to_string()))?,
        ),
        None => None,
    };
    // Callbacks end tasks; queries are only a slow safety net.
    let follow = FollowPolicy::new()
        .callbacks_first(Duration::from_secs(120))
        .speed(options.speed);
    let mut run = RunOptions::new(follow).callback_url(callback_url);
    if let Some(dir) = &options.download_dir {
        run = run.download_dir(dir.clone());
    }
    let journal =
        Journal::open_in_memory().map_err(|e| SetupError::new("journal", e.to_string()))?;
    let jobs = workload(options.jobs);
    let listeners = Listeners {
        callback: Some((listener, Some(verifier))),
        metrics,
        callback_path: None,
    };
    let report = app::execute(
        stack.clone(),
        journal,
        &jobs,
        run,
        listeners,
        options.quiet,
        stop,
    )
    .await?;
    let stats = server.stats();
    let summary = app::summarize(&stack, &config, &report, Some(&stats));
    server.shutdown().await;
    Ok((summary, report))
}
