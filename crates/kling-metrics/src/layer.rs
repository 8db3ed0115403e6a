//! [`MetricsLayer`].

use tower_layer::Layer;

use crate::Monitor;
use crate::service::Metrics;

/// Applies [`Metrics`] to a service: a duration histogram, response counters, task lifetimes,
/// a `tracing` span per call and the [`Monitor`]'s usage.
///
/// Put it outermost (DESIGN.md's order), so it sees the whole logical call: waits, retries,
/// final outcome.
///
/// # Clone
///
/// Clones share the [`Monitor`].
#[derive(Clone, Debug, Default)]
pub struct MetricsLayer {
    monitor: Monitor,
}

impl MetricsLayer {
    /// A layer with a fresh monitor (no rate quota, warnings at 80%).
    pub fn new() -> Self {
        MetricsLayer::default()
    }

    /// A layer reporting to `monitor` (which may be shared with other layers).
    pub fn with_monitor(monitor: Monitor) -> Self {
        MetricsLayer { monitor }
    }

    /// The monitor: [`Monitor::snapshot`], [`Monitor::add_source`].
    pub fn monitor(&self) -> &Monitor {
        &self.monitor
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;

    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics::new(inner, self.monitor.clone())
    }
}
