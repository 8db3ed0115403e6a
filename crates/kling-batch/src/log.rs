//! Warnings and errors on stderr: the `kling-batch` command's [`tracing`] subscriber.
//!
//! The run reports what it cannot do itself through `tracing` (`journal write failed`,
//! `download failed; a later run tries again`, `cannot look the job up`, a Redis that stops
//! answering, …). [`install`] prints every such event at level `WARN` or `ERROR` on stderr, one
//! line each, above the progress bars when they are drawn:
//!
//! ```text
//! kling-batch: warning: download failed; a later run tries again (job=cat, error=…)
//! ```
//!
//! Other levels are not printed, and neither are kling-metrics' own warnings (target
//! `kling_metrics`: one per failed call, and "usage passed the warning threshold", which a
//! batch that keeps its slots full always meets): the summary counts those calls by code.
//!
//! A few dozen lines on `tracing`'s own [`Subscriber`] trait, so the command needs no
//! `tracing-subscriber`. A library user installs the subscriber of their choice instead.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::sync::Mutex;

use indicatif::MultiProgress;
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// The progress bars drawing now, if any: a line is printed with them suspended.
static BARS: Mutex<Option<MultiProgress>> = Mutex::new(None);

/// Prints the `WARN` and `ERROR` events of this process on stderr (see the
/// [module docs](self)). Returns `false`, and changes nothing, when a global subscriber is
/// set already.
pub fn install() -> bool {
    tracing::subscriber::set_global_default(StderrSubscriber).is_ok()
}

/// Sets the bars lines are printed above (`None`: no bars drawn).
pub(crate) fn draw_above(bars: Option<MultiProgress>) {
    *BARS.lock().unwrap_or_else(|e| e.into_inner()) = bars;
}

/// Prints `line` on stderr, above the progress bars when they are drawn.
pub(crate) fn print_line(line: &str) {
    let print = || {
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    };
    let bars = BARS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match bars {
        Some(bars) => bars.suspend(print),
        None => print(),
    }
}

/// The subscriber [`install`] sets: `WARN` and above, every target but `kling_metrics`, to
/// stderr. Spans are not recorded.
#[derive(Clone, Copy, Debug, Default)]
pub struct StderrSubscriber;

impl StderrSubscriber {
    /// Whether an event of `metadata` is printed.
    fn prints(metadata: &Metadata<'_>) -> bool {
        metadata.is_event()
            && *metadata.level() <= Level::WARN
            && !metadata.target().starts_with("kling_metrics")
    }
}

/// The fields, by their event's target, whose values the message itself names: kling-tower's
/// warning of a variable a typing slip from one it reads (`KLING_TEIR is not read: did you
/// mean KLING_TIER? (ignored)`) carries both names as fields too, which printed each name
/// twice. Such a field is left out only when the message holds its value.
const NAMED_IN_MESSAGE: [(&str, &str); 2] = [("kling_tower", "variable"), ("kling_tower", "meant")];

/// The text of one event: its message, then its other fields as `name=value`.
fn format_event(event: &Event<'_>) -> String {
    let target = event.metadata().target();
    let mut fields = Fields {
        named_in_message: NAMED_IN_MESSAGE
            .iter()
            .filter(|(of, _)| *of == target)
            .map(|&(_, field)| field)
            .collect(),
        ..Fields::default()
    };
    event.record(&mut fields);
    fields.add_fields_not_in_message();
    let level = if *event.metadata().level() == Level::ERROR {
        "error"
    } else {
        "warning"
    };
    let mut line = format!("kling-batch: {level}: {}", fields.message);
    if !fields.rest.is_empty() {
        let _ = write!(line, " ({})", fields.rest);
    }
    escape_controls(&line)
}

/// `text` with its control characters escaped (`\u{1b}`): a job id or a server's message
/// must not move the cursor or color the terminal.
pub(crate) fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
    /// The fields of this event that the message may name ([`NAMED_IN_MESSAGE`]).
    named_in_message: Vec<&'static str>,
    /// Those recorded, with their values: printed unless the message holds the value.
    maybe_named: Vec<(&'static str, String)>,
}

impl Fields {
    /// Adds `name=value` to the fields printed.
    fn push(&mut self, name: &str, value: &str) {
        let sep = if self.rest.is_empty() { "" } else { ", " };
        let _ = write!(self.rest, "{sep}{name}={value}");
    }

    /// Adds the fields the message may name whose value it does not hold: called once the
    /// whole event is recorded, as its message may come after its fields.
    fn add_fields_not_in_message(&mut self) {
        for (name, value) in std::mem::take(&mut self.maybe_named) {
            if !self.message.contains(&value) {
                self.push(name, &value);
            }
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_debug(field, &format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else if self.named_in_message.contains(&field.name()) {
            self.maybe_named.push((field.name(), format!("{value:?}")));
        } else {
            self.push(field.name(), &format!("{value:?}"));
        }
    }
}

impl Subscriber for StderrSubscriber {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        Self::prints(metadata)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::WARN)
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        // Never called for a span `enabled` refused; any id will do for the rest.
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        if !Self::prints(event.metadata()) {
            return;
        }
        print_line(&format_event(event));
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// Tests: records the lines the subscriber would print instead of printing them.
#[cfg(test)]
pub(crate) struct Capture(pub(crate) std::sync::Arc<Mutex<Vec<String>>>);

#[cfg(test)]
impl Subscriber for Capture {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        StderrSubscriber::prints(metadata)
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format_event(event));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_and_errors_are_printed_with_their_fields_and_the_rest_is_not() {
        let lines = std::sync::Arc::new(Mutex::new(Vec::new()));
        tracing::subscriber::with_default(Capture(lines.clone()), || {
            let error = std::io::Error::other("disk full");
            tracing::error!(job = %"cat", error = %error, "journal write failed");
            tracing::warn!(job = "dog", "download failed; a later run tries again");
            tracing::info!("adopted the slots of running tasks");
            tracing::warn!(target: "kling_metrics", code = 1303, "kling call failed");
            // A job id or a server's message with terminal controls in it.
            tracing::warn!(job = %"\u{1b}[2Jx", "server said \u{7}{}", "\u{1b}[31mred");
        });
        assert_eq!(
            *lines.lock().unwrap(),
            [
                "kling-batch: error: journal write failed (job=cat, error=disk full)",
                "kling-batch: warning: download failed; a later run tries again (job=dog)",
                "kling-batch: warning: server said \\u{7}\\u{1b}[31mred (job=\\u{1b}[2Jx)",
            ]
        );
    }

    /// kling-tower's warning of a variable a typing slip from one it reads names both in its
    /// message and in its fields: each name is printed once. A field of another event is
    /// printed even when the message holds its value (a job `a`, in "a later run").
    #[test]
    fn a_variable_a_slip_from_one_read_is_named_once() {
        let lines = std::sync::Arc::new(Mutex::new(Vec::new()));
        tracing::subscriber::with_default(Capture(lines.clone()), || {
            kling_tower::StackConfig::check_env_names(["KLING_RATE_PER_MINUTES"]).unwrap();
            tracing::warn!(job = "a", "download failed; a later run tries again");
            tracing::warn!(
                target: "kling_tower",
                variable = "KLING_X",
                meant = "KLING_Y",
                "a message of another shape"
            );
        });
        assert_eq!(
            *lines.lock().unwrap(),
            [
                "kling-batch: warning: KLING_RATE_PER_MINUTES is not read: did you mean \
                 KLING_RATE_PER_MINUTE? (ignored)",
                "kling-batch: warning: download failed; a later run tries again (job=a)",
                "kling-batch: warning: a message of another shape (variable=KLING_X, \
                 meant=KLING_Y)",
            ]
        );
    }
}
