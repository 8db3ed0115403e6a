//! Fuzz target: see [`kling_fuzz::webhook`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kling_fuzz::webhook(data));
