//! The integration tests of `kling-concurrency`, one binary.

mod config;
mod expiry;
mod halt_gate;
mod in_flight;
mod leaks;
mod lookup;
mod mock;
mod paths;
mod pool_scope;
mod props;
mod readiness;
mod reconcile;
mod steps;
mod support;
mod tcp;
mod threads;
