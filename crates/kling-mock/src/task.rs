//! Tasks and their two wire shapes.
//!
//! A task's whole life is fixed when it is created (start, switch to `processing`, end, outcome),
//! so its status is a pure function of the clock: no timers are needed to answer a query, and
//! paused tokio time moves every task forward at once.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::time::Instant;

/// Converts the tokio clock to wall-clock time: the wall time at construction plus tokio's
/// elapsed time, so paused-time tests see timestamps that advance with `tokio::time::advance`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    start: Instant,
    wall: SystemTime,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Clock {
            start: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    /// The instant the mock was built.
    pub(crate) fn started(&self) -> Instant {
        self.start
    }

    pub(crate) fn wall(&self, at: Instant) -> SystemTime {
        self.wall + at.saturating_duration_since(self.start)
    }

    pub(crate) fn unix(&self, at: Instant) -> Duration {
        self.wall(at)
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
    }

    pub(crate) fn millis(&self, at: Instant) -> u64 {
        u64::try_from(self.unix(at).as_millis()).unwrap_or(u64::MAX)
    }
}

/// Which API generation created a task; it decides the wire shape and where it can be queried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Generation {
    /// Created on a legacy endpoint such as `/v1/videos/text2video`.
    Legacy { endpoint: String },
    /// Created on `/{product}/{model}`.
    New { product: String },
}

/// What a successful task produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutputKind {
    Video,
    Image,
}

impl OutputKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            OutputKind::Video => "video",
            OutputKind::Image => "image",
        }
    }
}

/// Where a task is in its life at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Submitted,
    Processing,
    Succeeded,
    Failed,
}

impl Phase {
    pub(crate) fn legacy(self) -> &'static str {
        match self {
            Phase::Submitted => "submitted",
            Phase::Processing => "processing",
            Phase::Succeeded => "succeed",
            Phase::Failed => "failed",
        }
    }

    pub(crate) fn new_style(self) -> &'static str {
        match self {
            Phase::Submitted => "submitted",
            Phase::Processing => "processing",
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
        }
    }

    pub(crate) fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

/// The failure reason reported by failed tasks.
pub(crate) const FAILURE_MESSAGE: &str = "generation failed (mock-injected failure)";

/// One generation task.
#[derive(Debug, Clone)]
pub(crate) struct Task {
    /// The task's number, 1, 2, … in creation order and never reused: its id
    /// ([`task_id`]), its key in the task store and the new-style list's cursor.
    pub(crate) seq: u64,
    pub(crate) id: String,
    pub(crate) account: String,
    pub(crate) generation: Generation,
    pub(crate) output: OutputKind,
    pub(crate) pool: String,
    pub(crate) weight: u32,
    pub(crate) cost: u32,
    pub(crate) outputs: u32,
    pub(crate) video_duration: String,
    pub(crate) external_id: Option<String>,
    /// Base of the result URLs; `None` for the non-resolvable default host.
    pub(crate) files_base: Option<std::sync::Arc<str>>,
    pub(crate) created: Instant,
    pub(crate) processing_at: Instant,
    pub(crate) end: Instant,
    pub(crate) fails: bool,
}

/// Task ids are this plus the task's `seq`, so an id maps back to its task without an index.
const ID_BASE: u64 = 860_000_000_000_000_000;

/// The task id of task number `seq`.
pub(crate) fn task_id(seq: u64) -> String {
    ID_BASE.saturating_add(seq).to_string()
}

/// The number of the task whose id is `id`, if [`task_id`] could have made it: only its exact
/// decimal form (no sign, no leading zero) names the task.
pub(crate) fn task_seq(id: &str) -> Option<u64> {
    if id.is_empty() || id.starts_with('0') || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    id.parse::<u64>().ok()?.checked_sub(ID_BASE)
}

impl Task {
    pub(crate) fn phase(&self, now: Instant) -> Phase {
        if now >= self.end {
            if self.fails {
                Phase::Failed
            } else {
                Phase::Succeeded
            }
        } else if now >= self.processing_at {
            Phase::Processing
        } else {
            Phase::Submitted
        }
    }

    fn updated(&self, phase: Phase) -> Instant {
        match phase {
            Phase::Submitted => self.created,
            Phase::Processing => self.processing_at,
            Phase::Succeeded | Phase::Failed => self.end,
        }
    }

    /// What the finished task cost: failures are not billed.
    pub(crate) fn final_cost(&self) -> u32 {
        if self.fails { 0 } else { self.cost }
    }

    /// The extension of the task's result files.
    pub(crate) fn extension(&self) -> &'static str {
        match self.output {
            OutputKind::Video => "mp4",
            OutputKind::Image => "png",
        }
    }

    fn url(&self, index: u32) -> String {
        let ext = self.extension();
        let base = self
            .files_base
            .as_deref()
            .unwrap_or("https://mock.klingai.invalid/outputs");
        format!("{base}/{}/{index}.{ext}", self.id)
    }

    /// The shape of the task's own generation.
    pub(crate) fn to_json(&self, clock: &Clock, now: Instant) -> Value {
        match self.generation {
            Generation::Legacy { .. } => self.legacy_json(clock, now),
            Generation::New { .. } => self.new_json(clock, now),
        }
    }

    /// `{task_id, task_status, task_status_msg?, task_info, created_at, updated_at, task_result?,
    /// final_unit_deduction?}`.
    pub(crate) fn legacy_json(&self, clock: &Clock, now: Instant) -> Value {
        let phase = self.phase(now);
        let mut info = serde_json::Map::new();
        if let Some(ext) = &self.external_id {
            info.insert("external_task_id".into(), Value::String(ext.clone()));
        }
        let mut obj = serde_json::Map::new();
        obj.insert("task_id".into(), json!(self.id));
        obj.insert("task_status".into(), json!(phase.legacy()));
        if phase == Phase::Failed {
            obj.insert("task_status_msg".into(), json!(FAILURE_MESSAGE));
        }
        obj.insert("task_info".into(), Value::Object(info));
        obj.insert("created_at".into(), json!(clock.millis(self.created)));
        obj.insert(
            "updated_at".into(),
            json!(clock.millis(self.updated(phase))),
        );
        if phase == Phase::Succeeded {
            let result = match self.output {
                OutputKind::Video => json!({
                    "videos": (0..self.outputs)
                        .map(|i| json!({
                            "id": format!("{}-{i}", self.id),
                            "url": self.url(i),
                            "duration": self.video_duration,
                        }))
                        .collect::<Vec<_>>()
                }),
                OutputKind::Image => json!({
                    "images": (0..self.outputs)
                        .map(|i| json!({"index": i, "url": self.url(i)}))
                        .collect::<Vec<_>>()
                }),
            };
            obj.insert("task_result".into(), result);
        }
        if phase.is_terminal() {
            obj.insert(
                "final_unit_deduction".into(),
                json!(self.final_cost().to_string()),
            );
        }
        Value::Object(obj)
    }

    /// `{id, status, message?, external_id?, created_at, updated_at, outputs?, billing?}`.
    pub(crate) fn new_json(&self, clock: &Clock, now: Instant) -> Value {
        let phase = self.phase(now);
        let mut obj = serde_json::Map::new();
        obj.insert("id".into(), json!(self.id));
        obj.insert("status".into(), json!(phase.new_style()));
        if phase == Phase::Failed {
            obj.insert("message".into(), json!(FAILURE_MESSAGE));
        }
        if let Some(ext) = &self.external_id {
            obj.insert("external_id".into(), json!(ext));
        }
        obj.insert("created_at".into(), json!(clock.millis(self.created)));
        obj.insert(
            "updated_at".into(),
            json!(clock.millis(self.updated(phase))),
        );
        if phase == Phase::Succeeded {
            let outputs: Vec<Value> = (0..self.outputs)
                .map(|i| {
                    let mut o = json!({"type": self.output.as_str(), "url": self.url(i)});
                    if self.output == OutputKind::Video
                        && let Ok(d) = self.video_duration.parse::<f64>()
                    {
                        o["duration"] = json!(d);
                    }
                    o
                })
                .collect();
            obj.insert("outputs".into(), Value::Array(outputs));
        }
        if phase.is_terminal() {
            obj.insert(
                "billing".into(),
                json!([{
                    "charge_type": "credits",
                    "amount": self.final_cost(),
                    "currency": "credit",
                    "package_type": self.output.as_str(),
                }]),
            );
        }
        Value::Object(obj)
    }
}
