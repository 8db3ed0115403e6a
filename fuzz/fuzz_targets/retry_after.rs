//! Fuzz target: see [`kling_fuzz::retry_after`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kling_fuzz::retry_after(data));
