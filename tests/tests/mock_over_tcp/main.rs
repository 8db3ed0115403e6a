//! kling-mock over real TCP, read back through kling-core: the mock behaves as KLING_API.md
//! says, and kling-core understands what it says. Real time, with the mock sped up.

mod support;

mod concurrency;
mod credits_and_auth;
mod queries;
mod retry_after;
