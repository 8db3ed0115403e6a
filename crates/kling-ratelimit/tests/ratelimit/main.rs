//! Integration tests of kling-ratelimit: pacing and waiting, cooldowns, adaptive rate,
//! properties, and the real mock server over TCP.

mod adaptive;
mod ceiling;
mod class_hold;
mod class_order;
mod class_pause;
mod cooldown;
mod first_ask;
mod mock;
mod pacing;
mod properties;
mod report;
mod support;
