//! Putting a run together: listeners, progress, the engine, and the summary. Shared by
//! `kling-batch run` and `kling-batch demo`.

use std::sync::Arc;

use axum::Router;
use kling_core::Pool;
use kling_tower::{StackConfig, WebhookVerifier};
use tokio::net::TcpListener;

use crate::callbacks;
use crate::error::{RunError, SetupError};
use crate::jobs::Job;
use crate::journal::Journal;
use crate::progress::{self, Bars};
use crate::run::{Engine, RunOptions, RunReport, StopSignal};
use crate::stack::Stack;
use crate::summary::{ServerTruth, Summary, bound_secs};

/// The listeners a run serves while it runs.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Listeners {
    /// The callback listener and, if callbacks are signed, their verifier.
    pub callback: Option<(TcpListener, Option<WebhookVerifier>)>,
    /// The Prometheus `/metrics` listener.
    pub metrics: Option<TcpListener>,
    /// The path of the callback URL, which the callback listener serves besides
    /// [`CALLBACK_PATH`](callbacks::CALLBACK_PATH) ([`callbacks::callback_path`]).
    pub callback_path: Option<String>,
}

/// Runs `jobs` through `stack`, serving the listeners and drawing progress (unless `quiet`
/// or stderr is not a terminal), until done or `stop`.
pub async fn execute(
    stack: Stack,
    journal: Journal,
    jobs: &[Job],
    options: RunOptions,
    listeners: Listeners,
    quiet: bool,
    stop: StopSignal,
) -> Result<RunReport, RunError> {
    let engine = Engine::new(stack.clone(), journal, options)
        .map_err(|e| SetupError::new(e.field().to_owned(), e.to_string()))?;
    let mut served = Vec::new();
    if let Some(listener) = listeners.metrics {
        let endpoint = kling_metrics::prometheus::install()
            .map_err(|e| SetupError::new("--metrics-addr", e.to_string()))?
            .with_monitor(stack.monitor().clone());
        let router = Router::new().route_service("/metrics", endpoint);
        served.push(callbacks::spawn(listener, router));
    }
    if let Some((listener, verifier)) = listeners.callback {
        served.push(callbacks::spawn(
            listener,
            callbacks::router_at(
                engine.clone(),
                verifier,
                listeners
                    .callback_path
                    .as_deref()
                    .unwrap_or(callbacks::CALLBACK_PATH),
            ),
        ));
    }
    let bars = Arc::new(Bars::new(quiet));
    let drawing = tokio::spawn(progress::drive(
        bars.clone(),
        engine.progress(),
        stack.clone(),
    ));
    let report = engine.run(jobs, stop).await;
    drawing.abort();
    bars.finish();
    for task in served {
        task.abort();
    }
    report
}

/// The summary of a run: jobs from the records, traffic from the stack's counters, and the
/// bound from `truth` (the mock's task durations) or else from what the run observed.
pub fn summarize(
    stack: &Stack,
    config: &StackConfig,
    report: &RunReport,
    truth: Option<&kling_mock::Stats>,
) -> Summary {
    let mut summary = Summary::default();
    summary.count_jobs(&report.records);
    if report.downloading {
        summary.count_missing_files(&report.records);
    }
    summary.set_traffic(
        stack.calls().requests(),
        stack.attempts().requests(),
        &stack.attempts().by_code(),
        stack.attempts().other_codes(),
    );
    summary.set_rejections_429(
        &stack.attempts().rejections_429(),
        stack.attempts().other_rejections_429(),
    );
    // A layer's own request for a call (a lookup by external id) is sent beyond its first.
    summary.set_retries(
        stack.attempts().retries() + stack.attempts().extra(),
        stack.calls().unsent(),
    );
    summary.set_pages(&stack.attempts().pages());
    summary.creates = report.creates;
    summary.interrupted = report.interrupted;
    let (task_seconds, basis) = match truth {
        Some(stats) => (stats.task_seconds.clone(), "mock"),
        None => (report.observed_task_seconds.clone(), "observed"),
    };
    let slots_of =
        |pool: &str| Pool::parse(pool).map_or(config.default_slots(), |p| config.slots_for(&p));
    let rate = config.account_rate_per_minute().map(|r| r / 60.0);
    let bound = bound_secs(&task_seconds, slots_of, report.creates, rate);
    summary.set_timing(report.makespan.as_secs_f64(), bound, basis);
    // No task ran to its end (every create refused, say): the bound is then the creates'
    // pacing alone, over a makespan that is the whole run, and read as the run's speed
    // (`0.7%`) it misleads. Not applicable.
    if !task_seconds.values().any(|secs| *secs > 0.0) {
        summary.efficiency = None;
    }
    summary.server = truth.map(ServerTruth::from_stats);
    summary
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kling_tower::{Credentials, Tier};

    use super::*;
    use crate::journal::{ErrorInfo, JobRecord, JobState};

    /// A run whose creates were all refused (no task ran) has no efficiency, and its table
    /// says so: the creates' pacing over the whole run read `efficiency  0.7%`. A run whose
    /// tasks ran has one.
    #[tokio::test]
    async fn a_run_in_which_no_task_ran_has_no_efficiency() {
        let config = StackConfig::preset(Tier::Pro);
        let stack = Stack::new(
            config.clone(),
            Credentials::api_key("key").unwrap(),
            "http://127.0.0.1:9",
        )
        .unwrap();
        let refused = |i: usize| JobRecord {
            job_id: format!("j{i}"),
            line: i + 1,
            endpoint: "/v1/videos/text2video".to_owned(),
            external_id: format!("kb-{i}"),
            state: JobState::Failed,
            task_id: None,
            status: None,
            urls: Vec::new(),
            files: Vec::new(),
            error: Some(ErrorInfo::new(1301, "unsafe", None)),
            download_error: None,
        };
        let mut report = RunReport {
            records: (0..50).map(refused).collect(),
            makespan: Duration::from_secs(900),
            creates: 50,
            ..RunReport::default()
        };
        let summary = summarize(&stack, &config, &report, None);
        assert!(summary.bound_secs > 0.0, "the creates' pacing: {summary:?}");
        assert_eq!(summary.efficiency, None, "{summary:?}");
        let table = summary.to_string();
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("efficiency") && l.ends_with("n/a (no task ran)")),
            "{table}"
        );
        // Control: tasks that ran give a figure.
        report
            .observed_task_seconds
            .insert("video".to_owned(), 4500.0);
        let summary = summarize(&stack, &config, &report, None);
        assert!(summary.efficiency.is_some_and(|e| e > 0.0), "{summary:?}");
        assert!(summary.to_string().contains('%'), "{summary}");
    }
}
