//! Fuzz target: see [`kling_fuzz::envelope`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kling_fuzz::envelope(data));
