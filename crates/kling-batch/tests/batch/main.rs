//! kling-batch against kling-mock over real TCP, in real time sped up (the mock and the run
//! share the speed factor), mostly through the binary as a user runs it.

mod bad_input;
mod base_url;
mod demo;
mod downloads;
mod proxies;
mod queue;
mod resume;
mod runs;
#[cfg(feature = "redis")]
mod shared;
mod support;
