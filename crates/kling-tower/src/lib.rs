//! Call the Kling AI API as fast as your account allows, and no faster: the whole Tower stack
//! (metrics, retry, task slots, pacing, auth, timeout, classify) in one line, per tier preset,
//! on the HTTP client you already use.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use kling_core::{Outcome, TaskStatus};
//! use kling_mock::{MockConfig, MockKling, Preset};
//! use kling_tower::{Credentials, KlingLayer, StackConfig, TaskRef, Tier};
//! use tower::{Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), kling_core::BoxError> {
//! # let client = MockKling::new(MockConfig::preset(Preset::Pro).access_key("ak", "sk"))?;
//! // The Pro tier's numbers (5 slots per pool; 60 requests a minute, paced one a second plus
//! // 15 ms for jitter), a JWT signed from an access key, Kling's global host; `client` is
//! // hyper-util, reqwest, …
//! let kling = KlingLayer::new(StackConfig::preset(Tier::Pro), Credentials::access_key("ak", "sk")?)?;
//! let service = kling.layer(client);
//!
//! let create = http::Request::post("/v1/videos/text2video")
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from(r#"{"prompt":"a cat surfing"}"#)))?;
//! let created = service.clone().oneshot(create).await?;
//! let task = Outcome::of(&created).and_then(Outcome::task).unwrap().clone();
//!
//! // Follow it to its end; the queries are paced and free its slot when it ends.
//! let follower = kling.follower(service, kling.follow_policy())?;
//! let done = follower.follow(TaskRef::from_report("/v1/videos/text2video", &task)).await?;
//! assert_eq!(done.status, TaskStatus::Succeeded);
//! assert_eq!(kling.snapshot().pool("video").unwrap().in_use, 0);
//! # Ok(()) }
//! ```
//!
//! # What is here
//!
//! | module | what |
//! |---|---|
//! | [`stack`] | [`KlingLayer`]: the recommended stack in its order, with its handles (slots, rate limit, snapshot, spend, drain) |
//! | [`gateway`] | [`GatewayLayer`]: several accounts in one process, one service keyed by `AccountId` |
//! | [`builder`] | [`ServiceBuilderExt`]: one method per layer, for stacks composed by hand |
//! | [`preset`] | [`Tier`] presets and [`StackConfig`]: every number, from env or TOML, validated, with a speed factor |
//! | [`auth`] | [`AuthLayer`]: API key or HS256 JWT, cached, re-signed once on 1003/1004 |
//! | [`spend`] | [`SpendGuardLayer`]: a daily credit budget checked before creates leave |
//! | [`drain`] | [`DrainLayer`]: graceful drain — refuse new creates, finish what is in flight |
//! | [`follow`] | [`Follower`]: waits for tasks to end, batch queries, callbacks first |
//! | [`webhook`] | Standard-Webhooks verification of Kling callbacks (and an axum route) |
//! | [`backends`] | where the stack's limits live: in process (default), or in Redis shared by a fleet (`KlingBuilder::shared`, feature `redis`) |
//! | [`base_url`] | [`BaseUrlLayer`]: regions, proxies, the mock |
//! | [`client`] | an HTTPS hyper-util client and a reqwest adapter, on rustls with `ring` |
//! | [`clock`] | the wall clock JWTs and webhooks read, injectable for paused-time tests |
//! | [`error`] | the errors these layers add |
//!
//! The layer crates are re-exported whole: [`core`] (kling-core), [`retry`] (kling-retry),
//! [`ratelimit`] (kling-ratelimit), [`concurrency`] (kling-concurrency), [`metrics`]
//! (kling-metrics), and with feature `redis`, `redis` (kling-redis).
//!
//! # Layer order
//!
//! Metrics → Drain → SpendGuard → Retry → TaskSlots → Gcra → Auth → per-attempt timeout →
//! Classify → BaseUrl → client; [`stack`] gives the reason for each position.
//!
//! # Feature flags
//!
//! | feature | default | what it does |
//! |---|---|---|
//! | `hyper` | yes | `client::https_client`: hyper-util over hyper-rustls (`ring`, webpki roots); hyper-util connect errors read as "never sent" |
//! | `reqwest` | no | `client::ReqwestService`: a `reqwest::Client` as a `tower::Service` (rustls, `ring`) |
//! | `axum` | no | `webhook::axum::callback_route`: verify and hand over callbacks in an axum router |
//! | `prometheus` | no | `metrics::prometheus`: a Prometheus recorder with the stack's buckets and a `GET /metrics` service |
//! | `redis` | no | `KlingBuilder::shared` and `backends::Redis`: the rate limiter and task slots in Redis (kling-redis), shared by every process of an account; re-exports kling-redis as `redis` |
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88.

pub mod auth;
pub mod backends;
pub mod base_url;
pub mod builder;
pub mod client;
pub mod clock;
pub mod drain;
pub mod error;
pub mod follow;
pub mod gateway;
pub mod preset;
pub mod spend;
pub mod stack;
pub mod timeout;
pub mod webhook;

pub use auth::{AuthLayer, Credentials};
pub use base_url::BaseUrlLayer;
pub use builder::ServiceBuilderExt;
pub use drain::{DrainHandle, DrainLayer};
pub use follow::{FollowPolicy, Follower, TaskRef};
pub use gateway::{Gateway, GatewayLayer};
pub use preset::{StackConfig, Tier};
pub use spend::{CostTable, SpendGuardLayer};
pub use stack::{Kling, KlingBuilder, KlingLayer};
pub use webhook::WebhookVerifier;

// The layer crates, whole: the stack is made of them, and hand-made stacks use them directly.
pub use kling_concurrency as concurrency;
pub use kling_core as core;
pub use kling_metrics as metrics;
pub use kling_ratelimit as ratelimit;
#[cfg(feature = "redis")]
pub use kling_redis as redis;
pub use kling_retry as retry;
