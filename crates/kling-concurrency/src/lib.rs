//! Task slots for the Kling API: a create waits for a weighted slot in its pool, and the slot
//! is held for the task's whole server-side life, not for one HTTP call.
//!
//! Kling limits how many generation tasks run at once per account and resource-pack pool, and a
//! task holds its slot from `submitted` until it ends, minutes later. Limiters that tie a permit
//! to one HTTP call (tower's `ConcurrencyLimit`, semaphores, bulkheads) let far too many creates
//! through and meet a wall of `1303`s. [`TaskSlotsLayer`] counts what Kling counts: see
//! [`slots`] for the rules, [`backend`] for where the state lives.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use kling_concurrency::{SlotsConfig, TaskSlotsLayer};
//! use kling_core::{AccountId, Pool, Product};
//! use tower::{Layer, Service, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), kling_core::error::BoxError> {
//! // A stand-in for the HTTP client: every create makes task "t1", every query says it ended.
//! let client = service_fn(|req: http::Request<Full<Bytes>>| async move {
//!     let body = if req.method() == http::Method::POST {
//!         r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t1","task_status":"submitted"}}"#
//!     } else {
//!         r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t1","task_status":"succeed"}}"#
//!     };
//!     Ok::<_, http::Error>(http::Response::new(Full::new(Bytes::from(body))))
//! });
//! let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(5))?;
//! let mut slots = layer.layer(client);
//!
//! let create = http::Request::post("/v1/videos/text2video")
//!     .body(Full::new(Bytes::from(r#"{"prompt":"a cat"}"#)))?;
//! slots.ready().await?.call(create).await?;
//! let video = Pool::new(Product::Video);
//! let account = handle.default_account().clone();
//! let snapshot = handle.snapshot().await?;
//! assert_eq!(snapshot.get(&account, &video).unwrap().in_use, 1); // held after the response
//!
//! let query = http::Request::get("/v1/videos/text2video/t1").body(Full::new(Bytes::new()))?;
//! slots.ready().await?.call(query).await?;
//! let snapshot = handle.snapshot().await?;
//! assert_eq!(snapshot.get(&account, &video).unwrap().in_use, 0); // the query said it ended
//! # Ok(())
//! # }
//! ```
//!
//! # What is here
//!
//! | item | what |
//! |---|---|
//! | [`TaskSlotsLayer`], [`TaskSlots`], [`SlotsHandle`] | the task-slot limiter and its handle (callbacks, reconcile, halts, capacities, snapshots) |
//! | [`SlotsConfig`] | capacities per pool and account, lease, `1303` recovery |
//! | [`backend::SlotBackend`], [`backend::InProcess`] | where slot state lives; a Redis backend implements the same trait |
//! | [`InFlightLayer`] | a plain FIFO limit on requests in flight, shared by clones |
//! | [`error`] | the errors this crate adds |
//!
//! # Metrics
//!
//! Through the `metrics` facade, with the names of [`kling_core::metrics`]:
//! `SLOTS_IN_USE`, `SLOTS_CAPACITY`, `SLOTS_WAITERS` (gauges per account and pool; handles are
//! registered when a pool is first used, and moved by differences, so pools sharing a label add
//! up and a pool that is gone leaves it; the in-process backend moves them once its lock is
//! released, never under it), `SLOTS_WAIT` (creates that waited), `TASK_LIFETIME`
//! and `TASKS_FINISHED` (status `succeeded`, `failed`, `completed` or `expired`). The `pool`
//! label is [`kling_core::metrics::pool_label`]: a model's pool past the first 60 a process
//! labels shares `video:other` (or `image:other`, `try-on:other`).
//!
//! # Feature flags
//!
//! None.
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88.

pub mod backend;
mod config;
pub mod error;
mod id;
pub mod in_flight;
pub mod slots;

pub use config::{
    DEFAULT_ACCOUNT, DEFAULT_LEASE, DEFAULT_RECOVERY_INTERVAL, MAX_RECOVERY_DOUBLINGS, SlotsConfig,
};
pub use in_flight::{InFlight, InFlightLayer};
pub use slots::{Reconcile, Reconciled, SlotsHandle, Snapshot, TaskSlots, TaskSlotsLayer};
