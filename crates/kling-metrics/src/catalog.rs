//! The catalogue of every metric the stack records, read from the table in this crate's README.
//!
//! The README table is the one place a metric is documented: its name (from
//! [`kling_core::metrics`]), its type, its labels, the crate whose layer records it and what it
//! means. This module parses that table (embedded at compile time), so tests, dashboards and
//! [`describe`] read the same words a person reads, and the table cannot drift from the code.
//!
//! ```
//! use kling_metrics::catalog::{self, MetricType};
//!
//! let duration = catalog::find(kling_core::metrics::REQUEST_DURATION).unwrap();
//! assert_eq!(duration.metric_type, MetricType::Histogram);
//! assert_eq!(duration.labels, ["kind", "pool", "status", "code"]);
//! assert_eq!(duration.recorded_by, "kling-metrics");
//! ```

use std::fmt;

/// The README this crate ships, with the metrics table between the markers below.
const README: &str = include_str!("../README.md");
const BEGIN: &str = "<!-- metrics-table:begin -->";
const END: &str = "<!-- metrics-table:end -->";

/// The type of a metric, as the `metrics` facade knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MetricType {
    /// Only goes up (`counter!`).
    Counter,
    /// Set to the current value (`gauge!`).
    Gauge,
    /// A distribution of samples (`histogram!`).
    Histogram,
}

impl MetricType {
    /// The type's name in the README table.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Histogram => "histogram",
        }
    }
}

impl fmt::Display for MetricType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of the README's metrics table.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricDoc {
    /// The metric's name, as recorded (Prometheus-safe).
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub metric_type: MetricType,
    /// The label names every series of the metric carries, in table order.
    pub labels: Vec<&'static str>,
    /// The crate whose layer records it (`kling-metrics`, `kling-retry`, …).
    pub recorded_by: &'static str,
    /// What it means.
    pub meaning: &'static str,
}

impl MetricDoc {
    /// Whether the metric is a duration in seconds (its name ends in `_seconds`).
    pub fn is_seconds(&self) -> bool {
        self.name.ends_with("_seconds")
    }
}

/// Every metric of the stack, in README order.
pub fn metrics() -> Vec<MetricDoc> {
    parse(README).expect("the README's metrics table is checked by this crate's tests")
}

/// The metrics one crate records, e.g. `recorded_by("kling-metrics")`.
pub fn recorded_by(krate: &str) -> Vec<MetricDoc> {
    metrics()
        .into_iter()
        .filter(|doc| doc.recorded_by == krate)
        .collect()
}

/// The row of one metric.
pub fn find(name: &str) -> Option<MetricDoc> {
    metrics().into_iter().find(|doc| doc.name == name)
}

/// Registers the unit and meaning of every metric with the installed recorder, so exporters
/// can print them (Prometheus `# HELP`). Call it once after installing a recorder.
pub fn describe() {
    for doc in metrics() {
        let unit = doc.is_seconds().then_some(metrics::Unit::Seconds);
        let name = doc.name;
        let meaning = doc.meaning;
        match (doc.metric_type, unit) {
            (MetricType::Counter, _) => metrics::describe_counter!(name, meaning),
            (MetricType::Gauge, _) => metrics::describe_gauge!(name, meaning),
            (MetricType::Histogram, Some(unit)) => {
                metrics::describe_histogram!(name, unit, meaning);
            }
            (MetricType::Histogram, None) => metrics::describe_histogram!(name, meaning),
        }
    }
}

/// Why the table could not be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TableError(String);

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses the rows between the markers: `| `name` | type | `a`, `b` | crate | meaning |`.
pub(crate) fn parse(readme: &'static str) -> Result<Vec<MetricDoc>, TableError> {
    let start = readme
        .find(BEGIN)
        .ok_or_else(|| TableError(format!("no `{BEGIN}` marker")))?;
    let end = readme[start..]
        .find(END)
        .ok_or_else(|| TableError(format!("no `{END}` marker")))?;
    let mut docs = Vec::new();
    for line in readme[start + BEGIN.len()..start + end].lines() {
        let line = line.trim();
        if !line.starts_with("| `") {
            continue;
        }
        let cells: Vec<&'static str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let [name, metric_type, labels, recorded_by, meaning] = cells[..] else {
            return Err(TableError(format!(
                "row `{line}` has {} cells, expected 5",
                cells.len()
            )));
        };
        let metric_type = match metric_type {
            "counter" => MetricType::Counter,
            "gauge" => MetricType::Gauge,
            "histogram" => MetricType::Histogram,
            other => return Err(TableError(format!("unknown metric type `{other}`"))),
        };
        let labels = if labels == "—" || labels.is_empty() {
            Vec::new()
        } else {
            labels.split(',').map(|l| unquote(l.trim())).collect()
        };
        docs.push(MetricDoc {
            name: unquote(name),
            metric_type,
            labels,
            recorded_by,
            meaning,
        });
    }
    if docs.is_empty() {
        return Err(TableError("the metrics table has no rows".into()));
    }
    Ok(docs)
}

fn unquote(cell: &'static str) -> &'static str {
    cell.trim_matches('`')
}

#[cfg(test)]
mod tests {
    use super::*;
    use kling_core::metrics as names;

    /// Every name in `kling_core::metrics`; a new name there must be added here and to the table.
    const ALL_NAMES: [&str; 13] = [
        names::REQUEST_DURATION,
        names::RESPONSES,
        names::RETRIES,
        names::RETRY_BUDGET_EXHAUSTED,
        names::COOLDOWNS,
        names::RATELIMIT_WAIT,
        names::RATELIMIT_QUEUE_DEPTH,
        names::SLOTS_WAIT,
        names::SLOTS_IN_USE,
        names::SLOTS_CAPACITY,
        names::SLOTS_WAITERS,
        names::TASK_LIFETIME,
        names::TASKS_FINISHED,
    ];

    const LABELS: [&str; 6] = [
        names::LABEL_KIND,
        names::LABEL_POOL,
        names::LABEL_STATUS,
        names::LABEL_CODE,
        names::LABEL_REASON,
        names::LABEL_ACCOUNT,
    ];

    #[test]
    fn the_table_lists_every_core_metric_name_once_and_nothing_else() {
        let docs = metrics();
        let mut listed: Vec<&str> = docs.iter().map(|d| d.name).collect();
        listed.sort_unstable();
        let mut all = ALL_NAMES.to_vec();
        all.sort_unstable();
        assert_eq!(listed, all);
    }

    #[test]
    fn every_row_uses_core_labels_and_a_known_recorder() {
        for doc in metrics() {
            for label in &doc.labels {
                assert!(
                    LABELS.contains(label),
                    "{}: unknown label `{label}`",
                    doc.name
                );
            }
            assert!(
                [
                    "kling-metrics",
                    "kling-retry",
                    "kling-ratelimit",
                    "kling-concurrency"
                ]
                .contains(&doc.recorded_by),
                "{}: unknown recorder `{}`",
                doc.name,
                doc.recorded_by
            );
            assert!(!doc.meaning.is_empty(), "{} has no meaning", doc.name);
            assert_eq!(
                doc.is_seconds(),
                doc.metric_type == MetricType::Histogram,
                "{}: every histogram of the stack is in seconds",
                doc.name
            );
        }
    }

    #[test]
    fn bad_tables_are_reported() {
        assert!(parse("no table").is_err());
        let empty = "<!-- metrics-table:begin -->\n<!-- metrics-table:end -->";
        assert!(parse(empty).is_err());
        let short = "<!-- metrics-table:begin -->\n| `a` | counter |\n<!-- metrics-table:end -->";
        assert!(parse(short).unwrap_err().to_string().contains("2 cells"));
        let odd =
            "<!-- metrics-table:begin -->\n| `a` | meter | — | x | y |\n<!-- metrics-table:end -->";
        assert_eq!(
            parse(odd).unwrap_err().to_string(),
            "unknown metric type `meter`"
        );
    }
}
