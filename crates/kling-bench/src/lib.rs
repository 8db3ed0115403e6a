//! One runner that measures kling-tower against what users would otherwise pick — tower's own
//! layers, governor alone, bare clients — in the same run: overhead, goodput, scale and real
//! sockets. `BENCHMARKS.md` at the workspace root holds the tables and what they mean.
//!
//! ```text
//! cargo run --release -p kling-bench -- all            # every section, tables on stdout
//! cargo run --release -p kling-bench -- overhead --quick
//! ```
//!
//! The library is what the binary runs; its sections also take tiny sizes, which the smoke test
//! uses:
//!
//! ```
//! let table = kling_bench::envelope_sizes();
//! assert!(table.contains("230"));
//! ```
//!
//! # Features
//!
//! None. The crate is not published (`publish = false`).
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88.

pub mod alloc;
pub mod cpu;
pub mod fixtures;
pub mod goodput;
pub mod instructions;
pub mod overhead;
pub mod report;
pub mod scale;
pub mod sockets;
pub mod tower_client;

/// The machine and the moment: cores, CPU model, load average.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    format!("Machine: {cores} cores, {model}; load average at start {load}.")
}

/// The sizes of the envelopes the in-memory Kling answers with, as a sentence.
pub fn envelope_sizes() -> String {
    format!(
        "create envelope {} bytes, query envelope {} bytes",
        fixtures::create_envelope(0).len(),
        fixtures::query_envelope(0).len()
    )
}
