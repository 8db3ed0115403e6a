//! Integration tests of kling-metrics: one binary, one module per area.

mod counted_as_sent;
mod errors;
#[cfg(feature = "prometheus")]
mod prometheus;
mod scripted_exchange;
mod secrets;
mod support;
mod usage;
