//! Fuzz target: see [`kling_fuzz::jsonl`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kling_fuzz::jsonl(data));
