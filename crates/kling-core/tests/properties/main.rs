//! Property tests for the parsers that read outside input: they never panic, and what they
//! accept means what RFC 9110 and Kling say it means.

mod envelope;
mod retry_after;
