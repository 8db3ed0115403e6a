//! Conformance of the mock to KLING_API.md: one test per documented behaviour.
//!
//! In-process tests run in paused tokio time against `MockKling`; the `tcp` and `binary` modules
//! use real sockets and real (sped-up) time. Responses are parsed with serde_json only.

mod auth;
mod binary;
mod errors;
mod legacy;
mod limits;
mod new_api;
mod retention;
mod support;
mod tcp;
