//! Call the Kling AI API as fast as your account allows, and no faster: presets per tier,
//! authentication, a spend guard, a task follower, signed-callback verification and client
//! adapters, as Tower layers.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use kling_core::{ClassifyLayer, Outcome};
//! use kling_mock::{MockConfig, MockKling, Preset};
//! use kling_tower::auth::{AuthLayer, Credentials};
//! use kling_tower::preset::{StackConfig, Tier};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! // The Pro tier's numbers: 5 slots per pool, 60 requests a minute paced at 95%.
//! let config = StackConfig::preset(Tier::Pro);
//! config.validate()?;
//! assert_eq!(config.pacing_rate_per_minute(), Some(57.0));
//!
//! // Signed JWTs against a mock that checks them.
//! let mock = MockKling::new(MockConfig::preset(Preset::Pro).access_key("ak", "sk"))?;
//! let service = ServiceBuilder::new()
//!     .layer(AuthLayer::new(Credentials::access_key("ak", "sk")?))
//!     .layer(ClassifyLayer::new())
//!     .service(mock);
//! let create = http::Request::post("/v1/videos/text2video")
//!     .body(Full::new(Bytes::from(r#"{"prompt":"a cat"}"#)))?;
//! let response = service.oneshot(create).await?;
//! assert!(Outcome::of(&response).unwrap().is_success());
//! # Ok(()) }
//! ```
//!
//! # What is here
//!
//! | module | what |
//! |---|---|
//! | [`preset`] | [`Tier`] presets and [`StackConfig`]: every number, from env or TOML, validated |
//! | [`auth`] | [`AuthLayer`]: API key or HS256 JWT, cached, re-signed once on 1003/1004 |
//! | [`spend`] | [`SpendGuardLayer`]: a daily credit budget checked before creates leave |
//! | [`follow`] | [`Follower`]: waits for tasks to end, batch queries, callbacks first |
//! | [`webhook`] | Standard-Webhooks verification of Kling callbacks (and an axum route) |
//! | [`base_url`] | [`BaseUrlLayer`]: regions, proxies, the mock |
//! | [`client`] | an HTTPS hyper-util client and a reqwest adapter, on rustls with `ring` |
//! | [`clock`] | the wall clock JWTs and webhooks read, injectable for paused-time tests |
//! | [`error`] | the errors these layers add |
//!
//! The policy layers themselves (retry, pacing, task slots, metrics) live in their own crates;
//! see the workspace README for the recommended order.
//!
//! # Feature flags
//!
//! | feature | default | what it does |
//! |---|---|---|
//! | `hyper` | yes | `client::https_client`: hyper-util over hyper-rustls (`ring`, webpki roots) |
//! | `reqwest` | no | `client::ReqwestService`: a `reqwest::Client` as a `tower::Service` (rustls, `ring`) |
//! | `axum` | no | `webhook::axum::callback_route`: verify and hand over callbacks in an axum router |
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88.

pub mod auth;
pub mod base_url;
pub mod client;
pub mod clock;
pub mod error;
pub mod follow;
pub mod preset;
pub mod spend;
pub mod webhook;

pub use auth::{AuthLayer, Credentials};
pub use base_url::BaseUrlLayer;
pub use follow::{FollowPolicy, Follower, TaskRef};
pub use preset::{StackConfig, Tier};
pub use spend::{CostTable, SpendGuardLayer};
pub use webhook::WebhookVerifier;
