//! One Kling account's limits shared by a fleet of processes, through Redis: the backends of
//! `kling-ratelimit`'s [`GcraLayer`](kling_ratelimit::GcraLayer) and `kling-concurrency`'s
//! [`TaskSlotsLayer`](kling_concurrency::TaskSlotsLayer), unchanged layers over a shared store.
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use kling_core::AccountId;
//! use kling_ratelimit::{GcraLayer, Quota};
//! use kling_redis::{Connection, RedisConfig, RedisGcra};
//! use kling_redis::testing::RedisServer;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), kling_core::BoxError> {
//! // A throw-away redis-server (feature `testing`); in production, your Redis.
//! let Some(server) = RedisServer::start_or_skip()? else { return Ok(()) };
//! let conn = Connection::connect(RedisConfig::new(server.url()).prefix("doc")).await?;
//!
//! let client = service_fn(|_req: http::Request<Full<Bytes>>| async {
//!     let body = r#"{"code":0,"message":"SUCCEED","request_id":"r"}"#;
//!     Ok::<_, kling_core::BoxError>(http::Response::new(Full::new(Bytes::from(body))))
//! });
//! // Two processes would build the same layer on the same Redis and share the 10 per second.
//! let layer = GcraLayer::builder(Quota::per_second(10.0))
//!     .backend(RedisGcra::new(conn))
//!     .build()?;
//! let service = layer.layer(client);
//!
//! let start = tokio::time::Instant::now();
//! for _ in 0..3 {
//!     let mut request = http::Request::new(Full::new(Bytes::new()));
//!     request.extensions_mut().insert(AccountId::new("acct-1"));
//!     service.clone().oneshot(request).await?;
//! }
//! // The first goes at once, the next two 100 ms apart each.
//! assert!(start.elapsed() >= Duration::from_millis(199), "{:?}", start.elapsed());
//! # Ok(())
//! # }
//! ```
//!
//! # What is here
//!
//! | item | what |
//! |---|---|
//! | [`RedisConfig`], [`Connection`] | one auto-reconnecting connection (the `redis` crate's `ConnectionManager`), a timeout on every command, the key prefix, the fleet clock |
//! | [`RedisGcra`] | [`kling_ratelimit::Backend`]: GCRA, cooldown after 1302 and adaptive rate in one script per decision |
//! | [`RedisSlots`] | [`kling_concurrency::backend::SlotBackend`]: weighted task slots with leases, 1303 capacity, 1102 halt, waiters woken by pub/sub |
//! | [`WhenUnreachable`] | what both do while Redis is away: wait (default), fail, or fall back to a per-process share |
//! | `testing` (feature `testing`) | a throw-away `redis-server` on a free loopback port, for tests |
//!
//! # Time
//!
//! Scripts never read the server's clock: each process sends fleet time, its own clock
//! corrected by the offset to the server's `TIME` that [`Connection`] measures on connect and
//! every 30 s, so client clock skew does not leak into the limits (the residue is half a
//! round trip). A [`Connection::lazy`] measures it on first use: the first script of either
//! backend (a decision or report, a create, a change or a snapshot) waits for the measurement
//! (or, while Redis cannot be reached, does what [`WhenUnreachable`] says). Times are integer microseconds (Lua numbers are doubles: exact to 2⁵³ µs);
//! emission intervals are rounded up to a whole microsecond, never down.
//!
//! # When Redis restarts or goes away
//!
//! Every process keeps a record of the slots it holds. A script that finds Redis has lost its
//! state (the `PREFIX:alive` key is gone) or come back older (another server's `run_id`, read
//! by the maintenance passes, or a script number lower than one already seen) starts a grace
//! period in which no create is admitted, and every process registers its slots again within
//! one maintenance pass (default 1 s; grace 3 s), releases its own holdings that came back
//! although it gave them up, and reports again the ends it reported in the last 30 minutes;
//! a task reported ended is not registered or held again. Changes made while Redis was unreachable are replayed, in order,
//! when it is back; so are the pauses (1302, `Retry-After`) a process could not report, which
//! hold in that process meanwhile. What happens meanwhile is [`WhenUnreachable`]'s choice; a Redis that
//! answers `LOADING`, `MASTERDOWN` or `TRYAGAIN` (restarting, failing over) counts as away. The GCRA state of
//! a restarted Redis starts empty: a key admits one request, then paces again — a fresh key
//! never admits more than its burst.
//!
//! Not supported: Redis Cluster (the scripts touch keys they compute, and task ids map to pools
//! across accounts); a single primary, with or without replicas, works, managed or not.
//!
//! # Feature flags
//!
//! | feature | default | what it does |
//! |---|---|---|
//! | `testing` | no | the `testing` module: start and stop a `redis-server` for tests |
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88.

mod conn;
pub mod error;
mod gcra;
mod order_lua;
mod slots;
mod slots_lua;
#[cfg(feature = "testing")]
pub mod testing;
mod unreachable;

pub use conn::{Connection, DEFAULT_COMMAND_TIMEOUT, DEFAULT_PREFIX, RedisConfig};
pub use gcra::{
    DEFAULT_GCRA_PLACE_TTL, DEFAULT_IDLE_TTL, DEFAULT_USAGE_WINDOW, FleetDecision, GcraFuture,
    RedisGcra, USAGE_BUCKETS,
};
pub use slots::{
    DEFAULT_GRACE, DEFAULT_MAINTAIN_EVERY, DEFAULT_PLACE_TTL_POLLS, DEFAULT_POLL_EVERY,
    MAX_PENDING_REPORTS, RedisSlots, SlotsFuture,
};
pub use unreachable::{DEFAULT_RETRY_EVERY, WhenUnreachable};
