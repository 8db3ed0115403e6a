//! GCRA pacing for the Kling API on [`governor`]: requests wait their turn (FIFO) or are
//! rejected with the wait, per account and endpoint class, pause together after a 1302, and
//! optionally find the server's real limit on their own.
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use kling_core::AccountId;
//! use kling_ratelimit::{GcraLayer, Quota};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), kling_core::BoxError> {
//! let client = service_fn(|_req: http::Request<Full<Bytes>>| async {
//!     let body = r#"{"code":0,"message":"SUCCEED","request_id":"r"}"#;
//!     Ok::<_, kling_core::BoxError>(http::Response::new(Full::new(Bytes::from(body))))
//! });
//! // The Pro tier: 60 requests a minute, evenly spaced, with 5% headroom.
//! let layer = GcraLayer::new(Quota::per_minute(60.0).with_headroom(0.05))?;
//! let service = layer.layer(client);
//!
//! let start = tokio::time::Instant::now();
//! for _ in 0..3 {
//!     let mut request = http::Request::new(Full::new(Bytes::new()));
//!     request.extensions_mut().insert(AccountId::new("acct-1"));
//!     service.clone().oneshot(request).await?;
//! }
//! // The first goes at once, the next two 1.0526 s apart each (tokio timers fire on whole
//! // milliseconds, so never earlier than that and at most a millisecond later).
//! let elapsed = start.elapsed().as_millis();
//! assert!((2105..=2107).contains(&elapsed), "{elapsed}");
//! # Ok(())
//! # }
//! ```
//!
//! # How it paces
//!
//! - **Quotas** are a rate and a burst ([`Quota::per_minute`], [`Quota::per_second`],
//!   [`Quota::with_burst`]), checked when the layer is built ([`Builder::build`]).
//! - **Keys**: one quota per [`AccountId`](kling_core::AccountId) (the request extension), or
//!   per whatever a [`key_fn`](Builder::key_fn) names; without either, one shared quota.
//!   [`class_quota`](Builder::class_quota) adds a separate quota for an endpoint class of each
//!   account (e.g. `/account/costs` at one per second): such a request passes its class
//!   quota, then its account's. A request that passes its class gate and then finds its
//!   account paused (a 1302 or a `Retry-After`: it asks with nobody queued behind it at the
//!   account's gate, or the account queue's head waits one out) goes back to its class gate,
//!   whose requests ask no sooner than the pause's end
//!   (each spends one more turn of the class quota there, so one that passed the gate less
//!   than a class turn before the pause ends is sent up to that turn later than the quota
//!   alone requires: the price of a store several processes share seeing the class's
//!   requests again after the pause). It goes back ahead of the class requests that came
//!   after it passed the gate, and among those that went back before it in the order they
//!   passed it, so class requests keep their order. One that meets the pause at the head of
//!   its account's queue with others queued behind it keeps its place there instead: back at
//!   its class gate it would come after them. In wait mode the class
//!   quota also holds when the requests are sent: a class request that waited at its
//!   account's gate (behind a queue, or one already queued there when a pause began) is sent
//!   no sooner than the class quota allows after the class's requests this process sent
//!   before. One that
//!   reaches the head of its account's queue sooner leaves that queue, so the account's other
//!   requests are not held behind it, and waits beside its class gate with the class's other
//!   such requests; they go back to the front of the account's queue one at a time, in the
//!   order they reached its head, each when the class quota lets it. (That record is this
//!   process's; across processes sharing a store the class gate spaces passing, not sending.
//!   A class quota change carries the wait left over in class turns, as the gate's own debt
//!   does. Reject mode keeps no record: nothing waits there between the gates.)
//!   In reject mode a class request takes its class's turn and its account's together, or
//!   neither ([`Backend::acquire_class_or_refuse`]), so one its account refuses spends no
//!   class turn; over a backend that cannot (the method's default), the class is asked first
//!   and its turn is spent.
//!   Idle keys are dropped, so keyed state stays bounded.
//! - **Wait mode** (default): requests of a key are served first come, first served through a
//!   per-key queue in which only the head asks the backend; a dropped request gives its place
//!   up; [`max_queue`](Builder::max_queue) (per key: a class request held for its class's
//!   record of sends counts as waiting for its class key), [`max_wait`](Builder::max_wait)
//!   and a request's [`Deadline`](kling_core::signals::Deadline) turn a long wait into a
//!   typed error ([`error::QueueFull`], [`error::WaitExceeded`]) carrying the resume time.
//!   **Reject mode** ([`Builder::reject`]) fails at once with [`error::RateLimited`], which
//!   carries the wait — for servers, which ignore backpressure.
//! - **Time**: tokio time throughout. A request reads the clock once: governor's `check`
//!   decides at that instant (the key's limiter has a clock that hands it back rather than
//!   reading its own), which is also the request's send time; every wait is one
//!   [`tokio::time::Sleep`] until the instant governor names, never governor's own
//!   `until_ready`. Paused-time tests are exact. A request nothing queues before is admitted
//!   in `call`: poll its future promptly, as one polled later is sent then, even into a pause
//!   that began meanwhile or together with requests admitted after it (a burst the quota
//!   would have spaced). `oneshot`, `call_all` and the stack's layers above (kling-tower's
//!   retry and task slots) poll what they call at once.
//! - **Threads**: a key's governor state is one atomic cell, so the usual decision (a key the
//!   thread asked recently, no cooldown, no quota change, no adaptive rate below its ceiling)
//!   takes no lock and writes no line another request of another key writes; an adaptive key
//!   at its ceiling reports no success either, as a success there changes nothing (its state
//!   is at the ceiling, not lowered, no streak running). Decisions of one key made on two
//!   threads at once may reach its state out of instant order, and GCRA still admits no more
//!   than the quota in any window of decision instants (see [`InProcess`]).
//! - **Cooldown**: a 1302 or a `Retry-After` pauses the whole key — queued and new requests
//!   alike — which then resumes in order, an interval apart (the burst is spent when a pause
//!   ends, so no burst goes at once); 1302s in a row escalate the pause up to a ceiling
//!   ([`Cooldown`]). A success's `Retry-After` (code 0 on a 2xx, e.g. a `202` naming when to
//!   poll its task) refused nothing: it pauses nothing, and the success counts as any other
//!   (code 0 on a 429 or a 503 is refused by its status, and its `Retry-After` pauses). A
//!   proxy's or gateway's page (no Kling envelope, so the classify step's
//!   [`MalformedResponse`](kling_core::error::MalformedResponse) error, or the page itself
//!   when no classify step is below) pauses it too: for its `Retry-After`, and as a 1302
//!   would when its status is 429. While a remote store's report of the pause is on its way,
//!   the key pauses in this process from the response on (for the shortest pause the store may
//!   set), so a caller that gives up on the call then does not take the pause with it.
//! - **Adaptive rate** (opt-in, [`Adaptive`]): the rate drops on each 1302 (up to the
//!   cooldown's burst backoff in a streak: a later one says the server refuses whatever the
//!   pace) and climbs back while responses succeed, under the configured quota as ceiling.
//! - **Clones share one limiter** (`Arc`); [`GcraHandle`] changes quotas at run time, and
//!   waiting requests follow the change at once.
//! - **Backends**: the state lives behind the async [`Backend`] trait; [`InProcess`] is the
//!   governor backend here, a Redis backend shares it between processes.
//!
//! # Fairness between creates and queries
//!
//! Creates, queries and every other request of an account share one FIFO queue in front of the
//! account quota, so neither can starve the other: a request waits for at most the requests
//! that arrived before it, whatever their kind. Polling that should not delay creates gets a
//! class quota of its own ([`Builder::class_quota`] with
//! [`RequestKind::Query`](kling_core::RequestKind::Query)), which caps its share of the account
//! quota while it still counts against it.
//!
//! # Errors
//!
//! The service's error is a [`BoxError`](kling_core::BoxError): the inner service's error, or
//! one of [`error::RateLimited`], [`error::WaitExceeded`], [`error::QueueFull`],
//! [`error::BackendError`].
//!
//! # Metrics
//!
//! Recorded through the `metrics` facade under [`kling_core::metrics`] names:
//! `RATELIMIT_WAIT` (seconds, for requests that waited; label `kind`),
//! `RATELIMIT_QUEUE_DEPTH` (label `account`) and `COOLDOWNS` (label `account`). The depth
//! gauge counts the requests [`GcraHandle::waiting`] and `max_queue` count: not those whose
//! first ask of a remote store is on its way (they may be admitted), so a slow store shows as
//! latency rather than as a queue.
//!
//! # Feature flags
//!
//! This crate has no feature flags.
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88.

pub mod backend;
pub mod error;
pub mod future;
mod layer;
mod pause;
mod policy;
mod queue;
mod quota;
mod service;

pub use backend::{Backend, BucketKey, Decision, Feedback, InProcess, Policy};
pub use layer::{Builder, GcraHandle, GcraLayer, KeyFn, Mode};
pub use policy::{Adaptive, AdaptiveState, Cooldown, RETRY_AFTER_RESOLUTION};
pub use quota::Quota;
pub use service::Gcra;

/// The bytes of one waiting request's record in a key's queue (its ticket and its waker).
pub const WAITER_RECORD_BYTES: usize = queue::WAITER_RECORD_BYTES;
