//! Fuzz target: see [`kling_fuzz::config`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kling_fuzz::config(data));
