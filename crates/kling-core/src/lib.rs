//! The shared vocabulary of kling-tower: what a Kling response says, what a request is, and
//! the one step every layer needs, classification.
//!
//! Kling answers overload with HTTP 429, but six different business codes hide behind that
//! status and only two are worth retrying. This crate reads each response once — the envelope
//! `{code, message, request_id, data}`, the tasks it reports, any `Retry-After` — into an
//! [`Outcome`], and says for every [`Code`] what a client should do ([`Disposition`]). The
//! policy layers (`kling-retry`, `kling-ratelimit`, `kling-concurrency`, …) build on it; this
//! crate has no policy of its own.
//!
//! ```
//! use http::StatusCode;
//! use kling_core::{Code, Disposition, Outcome, RetryKind};
//!
//! let body = br#"{"code":1302,"message":"too many requests","request_id":"8f1c"}"#;
//! let outcome = Outcome::parse(
//!     StatusCode::TOO_MANY_REQUESTS,
//!     &http::HeaderMap::new(),
//!     body,
//!     tokio::time::Instant::now(),
//! )
//! .unwrap();
//! assert_eq!(outcome.code(), Code::RateLimited);
//! assert_eq!(outcome.disposition(), Disposition::Retry(RetryKind::Throttled));
//!
//! // 1102 also arrives as HTTP 429, and must never be retried.
//! assert_eq!(
//!     Code::from_i64(1102).disposition(StatusCode::TOO_MANY_REQUESTS),
//!     Disposition::Fatal
//! );
//! ```
//!
//! # What is here
//!
//! | item | why |
//! |---|---|
//! | [`Code`], [`Disposition`] | the error-code table, once |
//! | [`Envelope`], [`TaskReport`], [`TaskStatus`], [`Currency`] | both API generations' task fields, a cost with its currency |
//! | [`Outcome`] | one response, parsed once, shared through extensions |
//! | [`RetryAfter`] | delta-seconds and all three HTTP-date forms |
//! | [`Recognized`], [`Pool`], [`PoolScope`] | create / query / list / account, pool and weight |
//! | [`Route`] | what the method and path alone say (kind, pool), without allocating |
//! | [`AccountId`] | the key every limit is counted under |
//! | [`TokioClock`] | a governor clock on tokio time, for paused-time tests |
//! | [`ClassifyLayer`] | bounded body read that attaches the [`Outcome`] |
//! | [`metrics`] | every metric name of the stack |
//! | [`signals`] | extensions layers use to cooperate (deadline, attempt, slot-gated 1303) |
//! | [`headers`] | a copy of a request's headers kept to send it again, without allocating |
//! | [`intern`] | configured texts kept once, so copies touch no reference count; label texts that input chooses, kept up to a bound |
//! | [`lanes`] | per-thread references to a layer's shared state, so threads write no one count |
//! | [`waitlist`] | a FIFO of waiters any of which may give up cheaply (the limiters' queues) |
//!
//! # Feature flags
//!
//! | feature | default | what it does |
//! |---|---|---|
//! | `hyper-util` | no | recognise hyper-util's connect errors as "never sent" |
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88.

mod account;
pub mod body;
pub mod call_clock;
pub mod classify;
mod clock;
mod code;
mod envelope;
pub mod error;
pub mod headers;
pub mod intern;
pub mod lanes;
pub mod metrics;
mod outcome;
mod request;
mod retry_after;
mod route;
pub mod signals;
pub mod waitlist;

pub use account::AccountId;
pub use body::PeekBody;
pub use classify::{Classify, ClassifyLayer};
pub use clock::{TokioClock, TokioInstant};
pub use code::{Code, Disposition, RetryKind, status_disposition};
pub use envelope::{CallbackError, Currency, Envelope, TaskReport, TaskStatus};
pub use error::{BoxError, SendState};
pub use outcome::Outcome;
pub use request::{
    ApiGeneration, Pool, PoolScope, Product, Recognized, RequestKind, UnknownPoolScope,
};
pub use retry_after::{MAX_RETRY_AFTER, RetryAfter, retry_after_delay};
pub use route::Route;

/// How long a task counts as running with no sign of life (its create, a report that it still
/// runs) before the layers that track it let it go: the task slots give its slots back
/// (kling-concurrency's `DEFAULT_LEASE`) and the metrics monitor stops counting it
/// (kling-metrics' `DEFAULT_TASK_LEASE`). Kling's tasks take minutes.
pub const DEFAULT_TASK_LEASE: std::time::Duration = std::time::Duration::from_secs(30 * 60);
