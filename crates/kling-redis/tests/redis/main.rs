//! Integration tests of kling-redis against a real `redis-server` (each test starts its own on
//! a free loopback port; under `CI=true` a missing server fails the test): the Lua GCRA, the
//! task slots, and fleets of OS processes on `kling-mock`.

mod auth;
mod capacity_and_fallback;
mod clock;
mod failover;
mod fleet;
mod gcra;
mod halts;
mod paths;
mod slots;
mod support;
