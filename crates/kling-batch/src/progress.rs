//! Live progress: job counts by state, and the progress bars drawn from them.
//!
//! The bars (jobs done / running / queued, slots in use per pool, 429s by code, current rate)
//! are drawn on stderr only when it is a terminal; otherwise the run is quiet.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::journal::JobState;
use crate::stack::Stack;

const STATES: [JobState; 6] = [
    JobState::Queued,
    JobState::Creating,
    JobState::Created,
    JobState::Succeeded,
    JobState::Failed,
    JobState::NotSubmitted,
];

fn index(state: JobState) -> usize {
    STATES.iter().position(|s| *s == state).unwrap_or(0)
}

/// How many jobs are in each state right now.
#[derive(Debug, Default)]
pub struct Progress {
    counts: [AtomicUsize; 6],
}

impl Progress {
    /// Counts a job entering `state` (new to the run).
    pub fn enter(&self, state: JobState) {
        self.counts[index(state)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a job moving from `from` to `to`.
    pub fn moved(&self, from: JobState, to: JobState) {
        if from != to {
            self.counts[index(from)].fetch_sub(1, Ordering::Relaxed);
            self.counts[index(to)].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Jobs in `state`.
    pub fn count(&self, state: JobState) -> usize {
        self.counts[index(state)].load(Ordering::Relaxed)
    }

    /// Jobs in any state.
    pub fn total(&self) -> usize {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// The progress bars of a run; drawn only when `visible`.
#[derive(Debug)]
pub struct Bars {
    multi: MultiProgress,
    jobs: ProgressBar,
    slots: ProgressBar,
    traffic: ProgressBar,
}

impl Bars {
    /// Bars on stderr when it is a terminal and `quiet` is off; hidden otherwise.
    pub fn new(quiet: bool) -> Bars {
        let visible = !quiet && std::io::stderr().is_terminal();
        let target = if visible {
            ProgressDrawTarget::stderr_with_hz(10)
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        if visible {
            // Warnings are printed above the bars, not through them.
            crate::log::draw_above(Some(multi.clone()));
        }
        let jobs = multi.add(ProgressBar::new(0));
        jobs.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} done  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let line = || {
            let bar = multi.add(ProgressBar::new(0));
            bar.set_style(
                ProgressStyle::with_template("  {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar
        };
        let slots = line();
        let traffic = line();
        Bars {
            multi,
            jobs,
            slots,
            traffic,
        }
    }

    /// Redraws from the counts, the stack's snapshot and the request rate.
    pub fn update(&self, progress: &Progress, stack: &Stack, rate: f64) {
        let done = progress.count(JobState::Succeeded)
            + progress.count(JobState::Failed)
            + progress.count(JobState::NotSubmitted);
        self.jobs.set_length(progress.total() as u64);
        self.jobs.set_position(done as u64);
        self.jobs.set_message(format!(
            "running {}  creating {}  queued {}  failed {}",
            progress.count(JobState::Created),
            progress.count(JobState::Creating),
            progress.count(JobState::Queued),
            progress.count(JobState::Failed),
        ));
        let snapshot = stack.snapshot();
        let pools: Vec<String> = snapshot
            .pools
            .iter()
            .map(|p| format!("{} {}/{}", p.pool, p.in_use, p.capacity))
            .collect();
        self.slots.set_message(format!(
            "slots: {}",
            if pools.is_empty() {
                "-".to_owned()
            } else {
                pools.join("  ")
            }
        ));
        let rejections: Vec<String> = stack
            .attempts()
            .rejections_429()
            .iter()
            .map(|(code, n)| format!("{code}×{n}"))
            .collect();
        self.traffic.set_message(format!(
            "requests {}  rate {rate:.1}/s  429s: {}",
            stack.attempts().requests(),
            if rejections.is_empty() {
                "none".to_owned()
            } else {
                rejections.join(" ")
            }
        ));
    }

    /// Removes the bars.
    pub fn finish(&self) {
        for bar in [&self.jobs, &self.slots, &self.traffic] {
            bar.finish_and_clear();
        }
        let _ = self.multi.clear();
        crate::log::draw_above(None);
    }
}

/// Whether Kling sends this code with HTTP 429.
pub fn is_429(code: i64) -> bool {
    matches!(code, 1100 | 1101 | 1102 | 1302 | 1303 | 1304)
}

/// Redraws `bars` every 100 ms until the task is aborted.
pub async fn drive(bars: Arc<Bars>, progress: Arc<Progress>, stack: Stack) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last = (tokio::time::Instant::now(), stack.attempts().requests());
    let mut rate = 0.0;
    loop {
        tick.tick().await;
        let now = tokio::time::Instant::now();
        let requests = stack.attempts().requests();
        let elapsed = now.duration_since(last.0).as_secs_f64();
        if elapsed >= 1.0 {
            rate = (requests - last.1) as f64 / elapsed;
            last = (now, requests);
        }
        bars.update(&progress, &stack, rate);
    }
}
