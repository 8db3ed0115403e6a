//! Integration tests of kling-tower: presets, auth, spend guard, follower, webhooks, base URL
//! and client adapters, against `kling-mock` in paused time (in process) or over TCP.

mod adaptive;
mod auth;
mod base_url;
mod client;
mod e2e;
mod faults;
mod follow;
mod halt;
mod metrics;
mod preset;
#[cfg(feature = "reqwest")]
mod reqwest;
#[cfg(feature = "redis")]
mod shared;
mod spend;
mod stack;
mod support;
mod webhook;
