//! A real HTTP mock of the Kling AI API, for tests, examples, demos and benches.
//!
//! It honours what `KLING_API.md` documents: both API generations (legacy `/v1/...` with
//! `task_id`/`task_status`/`succeed`, new `/{product}/{model}` with `id`/`status`/`succeeded` and
//! the batch `/tasks` query), the `{code, message, request_id, data}` envelope with every error
//! code at its HTTP status, account-wide weighted concurrency per pool, a request-rate GCRA with an
//! optional penalty, `/account/costs` at one query a second, credits that run out (1102) until
//! their period ends (the Free tier's 66 a day) or for good, API-key and HS256-JWT auth (header
//! and claims as KLING_API.md gives them; the JWT on legacy endpoints only), signed callbacks,
//! and seeded fault injection (5xx, ghost creates, dropped connections, slow and malformed
//! answers). It is an independent oracle: it shares no code with the client crates.
//!
//! Two ways to use it:
//! - [`MockKling`], an in-process `tower_service::Service<http::Request<Full<Bytes>>>` whose time
//!   is tokio's, so `#[tokio::test(start_paused = true)]` runs an hour of traffic in milliseconds;
//! - [`MockServer`], the same mock behind hyper on `127.0.0.1` (and the `kling-mock` binary), for
//!   real sockets, several processes and demos, sped up by [`MockConfig::speed`].
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use kling_mock::{MockConfig, MockKling, Preset};
//! use tower_service::Service;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! // One video slot: the second concurrent create is refused with 1303.
//! let mut mock = MockKling::new(MockConfig::preset(Preset::Free).no_rate_limit()).unwrap();
//! let create = || {
//!     http::Request::post("/v1/videos/text2video")
//!         .header("authorization", "Bearer key")
//!         .body(Full::new(Bytes::from(r#"{"prompt":"a cat"}"#)))
//!         .unwrap()
//! };
//! let first = mock.call(create()).await.unwrap();
//! assert_eq!(first.status(), 200);
//! let second = mock.call(create()).await.unwrap();
//! assert_eq!(second.status(), 429);
//! let body: serde_json::Value =
//!     serde_json::from_slice(&second.into_body().collect().await.unwrap().to_bytes()).unwrap();
//! assert_eq!(body["code"], 1303);
//! assert!(body.get("data").is_none());
//! # }
//! ```
//!
//! Pools are named `video`, `image`, `try-on` (legacy endpoints) and `video:{model}`,
//! `image:{model}` (new endpoints, model from the path); a model's pool without a capacity of its
//! own takes its type's ([`MockConfig::capacity`]). With [`PoolScope::Product`] every create of a
//! type counts in the type's pool (`video`), whatever its model or endpoint. A create heavier
//! than its pool's whole capacity (an image `n` above it) is answered `1303` every time, with
//! no `Retry-After`: no wait frees enough. Control and observation without auth:
//! `GET /__mock/stats` ([`Stats`]), `POST /__mock/reset-stats`, `POST /__mock/switches`, and
//! `GET /__mock/files/...`, the result files ([`file_bytes`]) that [`MockServer`]'s result URLs
//! point at (from the task's success until 30 days of API time after, as Kling's URLs expire).
//! A task is forgotten then too: it answers as an unknown task (404, 1203), so memory holds one
//! 30-day window of tasks however long the mock runs.
//!
//! No cargo features. MSRV: the workspace's `rust-version` (1.88).

mod auth;
mod callbacks;
mod config;
mod error;
mod faults;
mod handlers;
mod routes;
mod server;
mod service;
mod state;
mod stats;
mod task;

pub use callbacks::sign_webhook;
pub use config::{
    ApiKey, ConfigError, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MAX_OPEN_ACCOUNTS, Faults,
    MockConfig, ParseError, PoolScope, Preset, RateLimit, RetryAfterMode, Switches,
};
pub use error::MockError;
pub use server::MockServer;
pub use service::{MockKling, ResponseFuture};
pub use stats::{MAX_STATS_POOLS, Stats};

/// The bytes `GET /__mock/files/{name}` answers for a file that exists: 4 KiB that name the
/// file, the same on every call, so a downloaded result can be checked.
pub fn file_bytes(name: &str) -> bytes::Bytes {
    let line = format!("kling-mock result {name}\n");
    let mut out = Vec::with_capacity(4096);
    while out.len() < 4096 {
        out.extend_from_slice(line.as_bytes());
    }
    out.truncate(4096);
    bytes::Bytes::from(out)
}
