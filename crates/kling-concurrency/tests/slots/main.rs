//! The integration tests of `kling-concurrency`, one binary.

mod in_flight;
mod lookup;
mod props;
mod reconcile;
mod steps;
mod support;
mod tcp;
mod threads;
