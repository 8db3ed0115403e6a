//! A Tower retry layer that knows what Kling's 429s mean: it retries `1302`, `1303` and 5xx, never
//! `1102`, follows `Retry-After`, and never creates a billed task twice.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//!
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use kling_core::{ClassifyLayer, Code};
//! use kling_retry::RetryLayer;
//! use kling_retry::error::{Failed, StopReason};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), kling_core::error::BoxError> {
//! // A Kling that throttles the first request, then accepts; and refuses job 2 for good.
//! let calls = Arc::new(AtomicUsize::new(0));
//! let seen = calls.clone();
//! let kling = service_fn(move |req: http::Request<Full<Bytes>>| {
//!     let n = seen.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         let (status, body) = if req.uri().path().ends_with("/2") {
//!             (429, r#"{"code":1102,"message":"resource pack exhausted","request_id":"r2"}"#)
//!         } else if n == 0 {
//!             (429, r#"{"code":1302,"message":"too fast","request_id":"r0"}"#)
//!         } else {
//!             (200, r#"{"code":0,"message":"SUCCEED","request_id":"r1","data":{"task_id":"t1","task_status":"succeed"}}"#)
//!         };
//!         http::Response::builder().status(status).body(Full::new(Bytes::from(body)))
//!     }
//! });
//! let client = RetryLayer::builder().seed(7).build()?.layer(ClassifyLayer::new().layer(kling));
//!
//! let get = |path: &str| http::Request::get(path).body(Full::new(Bytes::new())).unwrap();
//! let response = client.clone().oneshot(get("/v1/videos/text2video/1")).await?;
//! assert_eq!(response.status(), 200);
//! assert_eq!(calls.load(Ordering::SeqCst), 2, "the 1302 was retried once");
//!
//! let error = client.oneshot(get("/v1/videos/text2video/2")).await.unwrap_err();
//! let failed = error.downcast_ref::<Failed>().expect("a final kling error");
//! assert_eq!(failed.reason(), StopReason::NotRetryable);
//! assert_eq!(failed.code(), Some(Code::ResourcePackExhausted));
//! assert_eq!(failed.request_id(), Some("r2"));
//! assert_eq!(calls.load(Ordering::SeqCst), 3, "the 1102 went out exactly once");
//! # Ok(())
//! # }
//! ```
//!
//! # What it decides, and from what
//!
//! Every decision reads the attempt's [`Outcome`](kling_core::Outcome) (attached by
//! [`ClassifyLayer`](kling_core::ClassifyLayer), or parsed here from the buffered body), never
//! the status alone; the table is on [`KlingPolicy`], and [`Policy`] lets you change it.
//!
//! - **Retried**: `1302`; `5000`, `5001`, `5002` and other 5xx; connection errors before the
//!   request was sent; timeouts and resets after it was sent (subject to the create rules).
//!   `5001` (maintenance) refused the request, so a create is sent again after it like after
//!   `1302`; whether a code may have created a task is
//!   [`Code::may_have_created`](kling_core::Code::may_have_created), the table every layer reads.
//! - **`1303`**: when the response carries [`SlotGated`](kling_core::signals::SlotGated) (a
//!   task-slots layer below gave the slot back and will hold the retried create until one
//!   frees) it is retried at once; without a slots layer, after a backoff of at least 1 s.
//! - **Never retried**: `1000`–`1002`, `1100`–`1103`, `1200`–`1203`, `1300`, `1301`, `1304`,
//!   and `1003`/`1004` (the auth layer below re-signs and retries those once itself) unless
//!   the response carries [`TokenDropped`]: the auth layer below dropped the refused token and
//!   left the resend to this layer, which sends it again at once, at most once per call and
//!   outside the attempt limit.
//! - **Delay**: a `Retry-After` (delta seconds or HTTP-date) counts from the response's arrival,
//!   with jitter only upward so a retry is never early (one over the maximum followed, or
//!   ending at or past the deadline, ends the call at once instead), and never sooner
//!   than the backoff's floor for its kind (1 s after a `1302`, the maintenance wait after a
//!   `5001`: a `Retry-After: 0` sends no burst); otherwise
//!   exponential backoff with full jitter, with separate bases for throttling (≥ 1 s) and
//!   transient faults, drawn from what fits before the deadline when the floor does. See
//!   [`Backoff`] for the exact bounds.
//! - **Bounds**: at most [`max_attempts`](RetryLayerBuilder::max_attempts) requests (a
//!   slot-gated `1303` retry, held below until a slot frees, is not counted, nor in a call
//!   with a deadline a `1302` retry, which the backoff and the budget space); a total
//!   [`deadline`](RetryLayerBuilder::deadline), passed down as
//!   [`Deadline`](kling_core::signals::Deadline) so the rate limiter and the slots layer stop
//!   waiting at it too; and a [`RetryBudget`] shared by clones. When the next retry would start
//!   at or after the deadline, the call returns at once with [`error::DeadlineExceeded`], which
//!   says when to resume (unless a create's lookup was next: see below). A retry or a lookup
//!   still out at the deadline is given up there, as a timed-out attempt, and one the service
//!   below is not ready to take before it ends the call there too (it is not sent at the
//!   deadline only to be given up at once); the first attempt arms no
//!   timer (a call answered at once pays for none), so bound it with a timeout under this
//!   layer (kling-tower's stack has one, 30 s), or a server that never answers it holds the
//!   call past its deadline.
//! - **No duplicate billed tasks**: a create is sent again after `1302`, `1303`, `5001` or a
//!   connection that was never made (it did not happen). After `5000`, `5002`, a 5xx without a
//!   Kling envelope, a timeout or a reset it is sent again only when it carries an
//!   `external_task_id`, and only after a lookup by that id (`GET {create path}/{id}` or
//!   `GET /tasks?external_task_ids={id}`), sent [`Backoff::lookup_settle`] (2 s) after the
//!   failed attempt so that a task still in the making is found, says there is no task
//!   (`1203`, or a new-style `data: []`); if the lookup finds one, the caller gets it as the
//!   create's result (see [`Recovered`]). Without an id the call fails with
//!   [`StopReason::CreateMayHaveHappened`](error::StopReason::CreateMayHaveHappened), and so
//!   does a `POST` on a path the router does not recognise (it may be a create endpoint newer
//!   than this crate; one it knows as no create, an endpoint that answers at once such as
//!   `/v1/videos/identify-face`
//!   ([`Recognized::answers_at_once`](kling_core::Recognized::answers_at_once)), written
//!   plainly, is retried as a query is);
//!   [`generate_external_ids`](RetryLayerBuilder::generate_external_ids) gives every
//!   recognised create one. Once an attempt may have created a task, a final refusal of a
//!   later attempt (`1201` "duplicate external task id" when the first create landed after
//!   all) is looked up again before it is returned; a `1200`/`1201` (perhaps the answer to
//!   the duplicate id of that task) after the settle time, and if still not found the create
//!   is left unresolved, not refused.
//! - **A create left unresolved is said so**: when the call stops while a lookup is still due
//!   (the attempts, the budget or the deadline run out, the lookup is refused for good or
//!   answers without a task the layer can read, an error from below stops it), the caller gets
//!   [`StopReason::CreateUnresolved`](error::StopReason::CreateUnresolved), or a
//!   [`DeadlineExceeded`](error::DeadlineExceeded) whose `may_have_created()` is true, each
//!   naming the create's external id (`external_id()`, the generated one included): look the
//!   task up by it, never create again without it.
//!
//! # What the caller gets
//!
//! - a success (code 0) as the response;
//! - a Kling error response that is final, or still failing when the attempts, the budget or the
//!   deadline run out, as [`error::Failed`] or [`error::DeadlineExceeded`], carrying the Kling
//!   `code`, `message`, `request_id`, the attempts and the time waited, with a one-line
//!   `Display`; for a create that may have made a task, also `may_have_created()` and the
//!   `external_id()` to look it up by;
//! - an error from below that is not retried (a limiter's deadline error, for instance)
//!   unchanged when it ends the call's first request; after a retry, as the last failure of an
//!   [`error::Failed`] ([`StopReason::NotRetryable`](error::StopReason::NotRetryable), or
//!   [`StopReason::CreateUnresolved`](error::StopReason::CreateUnresolved) while a create's
//!   lookup is due) that counts the requests and names the create's external id.
//!
//! # Requests must be replayable
//!
//! The layer keeps a copy of each request to send it again, so the body must be in memory and
//! cheap to clone: [`ReplayBody`] is implemented for `Full<Bytes>`, `Bytes`, `String` and
//! `Vec<u8>`. A streaming body is refused at compile time with a message saying so:
//!
//! ```compile_fail
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower::{Layer, Service, service_fn};
//!
//! /// A body that streams from a socket: it cannot be sent twice.
//! struct Streaming;
//!
//! fn ready<S: Service<http::Request<Streaming>>>(_: S) {}
//!
//! let client = service_fn(|_req: http::Request<Streaming>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
//! });
//! // error[E0277]: the retry layer cannot replay a `Streaming` request body
//! ready(kling_retry::RetryLayer::new().layer(client));
//! ```
//!
//! # Where it goes
//!
//! Outermost but one, under the metrics layer: it sets [`Deadline`](kling_core::signals::Deadline)
//! and [`Attempt`](kling_core::signals::Attempt) on each attempt's request for the task-slots,
//! rate-limit and auth layers below, and wraps a per-attempt `tower::timeout` and the classify
//! step. A call answered after more than one request carries `Attempt(n)` on its response
//! too, so the metrics layer above counts all `n` against the account's rate.
//!
//! # Time and randomness
//!
//! Every wait is a `tokio::time` sleep, so `tokio::time::pause()` makes tests exact; the jitter's
//! [`RandomSource`] is injectable ([`RetryLayerBuilder::seed`]).
//!
//! # Feature flags
//!
//! | feature | default | what it does |
//! |---|---|---|
//! | `hyper-util` | no | recognise hyper-util's legacy-client connect errors as "never sent" (enables `kling-core/hyper-util`), so a create whose connection failed is sent again |
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88.

mod backoff;
mod body;
mod budget;
pub mod error;
pub mod future;
mod layer;
mod lookup;
mod policy;
mod rng;
mod service;
mod template;

pub use backoff::{Backoff, DelayKind};
pub use body::ReplayBody;
pub use budget::RetryBudget;
pub use kling_core::signals::TokenDropped;
pub use layer::{DEFAULT_DEADLINE, DEFAULT_MAX_ATTEMPTS, RetryLayer, RetryLayerBuilder};
pub use lookup::{Lookup, Recovered, read as read_lookup};
pub use policy::{Attempted, CreateState, KlingPolicy, Policy, Verdict};
pub use rng::{RandomSource, SplitMix};
pub use service::Retry;
