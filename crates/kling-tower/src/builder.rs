//! [`ServiceBuilderExt`]: one method per layer, for stacks composed by hand.
//!
//! Call them outermost first, in the order of [`stack`](crate::stack) (leave out what you do
//! not need). The names avoid `ServiceBuilder`'s own `retry`, `rate_limit` and `timeout`.
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use kling_concurrency::{SlotsConfig, TaskSlotsLayer};
//! use kling_core::Outcome;
//! use kling_mock::{MockConfig, MockKling, Preset};
//! use kling_ratelimit::{GcraLayer, Quota};
//! use kling_retry::RetryLayer;
//! use kling_tower::{Credentials, ServiceBuilderExt};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), kling_core::BoxError> {
//! let (slots, slots_handle) = TaskSlotsLayer::pair(SlotsConfig::new(5))?;
//! let service = ServiceBuilder::new()
//!     .kling_retry(RetryLayer::new())
//!     .task_slots(slots)
//!     .gcra(GcraLayer::new(Quota::per_minute(60.0).with_headroom(0.05))?)
//!     .kling_auth(Credentials::api_key("my-key")?)
//!     .attempt_timeout(Duration::from_secs(30))
//!     .classify()
//!     .service(MockKling::new(MockConfig::preset(Preset::Pro))?);
//!
//! let create = http::Request::post("/v1/videos/text2video")
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from(r#"{"prompt":"a cat"}"#)))?;
//! let response = service.oneshot(create).await?;
//! assert!(Outcome::of(&response).unwrap().is_success());
//! assert_eq!(slots_handle.snapshot().await?.pools()[0].in_use, 1);
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use crate::timeout::AttemptTimeoutLayer;
use kling_concurrency::{InFlightLayer, TaskSlotsLayer};
use kling_core::ClassifyLayer;
use kling_metrics::{MetricsLayer, Monitor};
use kling_ratelimit::GcraLayer;
use kling_retry::RetryLayer;
use tower::ServiceBuilder;
use tower::layer::util::Stack;

use crate::auth::{AuthLayer, Credentials};
use crate::base_url::BaseUrlLayer;
use crate::drain::DrainLayer;
use crate::spend::SpendGuardLayer;

mod sealed {
    pub trait Sealed<T> {}
}

/// Adds the Kling layers to [`tower::ServiceBuilder`]. See the [module docs](self).
///
/// Sealed: implemented for `ServiceBuilder` only.
pub trait ServiceBuilderExt<L>: sealed::Sealed<L> + Sized {
    /// [`MetricsLayer`] recording into `monitor`'s snapshot (outermost).
    fn kling_metrics(self, monitor: Monitor) -> ServiceBuilder<Stack<MetricsLayer, L>>;

    /// A [`DrainLayer`] (make it with [`DrainLayer::pair`] to keep the handle).
    fn drain_gate(self, layer: DrainLayer) -> ServiceBuilder<Stack<DrainLayer, L>>;

    /// A [`SpendGuardLayer`]: creates over the credit budget fail before they are sent.
    fn spend_guard(self, layer: SpendGuardLayer) -> ServiceBuilder<Stack<SpendGuardLayer, L>>;

    /// A [`RetryLayer`] (kling-retry).
    fn kling_retry(self, layer: RetryLayer) -> ServiceBuilder<Stack<RetryLayer, L>>;

    /// A [`TaskSlotsLayer`] (kling-concurrency; make it with `pair` to keep the handle).
    fn task_slots(self, layer: TaskSlotsLayer) -> ServiceBuilder<Stack<TaskSlotsLayer, L>>;

    /// A [`GcraLayer`] (kling-ratelimit).
    fn gcra(self, layer: GcraLayer) -> ServiceBuilder<Stack<GcraLayer, L>>;

    /// An [`AuthLayer`] for `credentials`.
    fn kling_auth(self, credentials: Credentials) -> ServiceBuilder<Stack<AuthLayer, L>>;

    /// A per-attempt [`AttemptTimeoutLayer`] (put it right above [`classify`](Self::classify)).
    fn attempt_timeout(self, timeout: Duration) -> ServiceBuilder<Stack<AttemptTimeoutLayer, L>>;

    /// kling-core's [`ClassifyLayer`] with the default body limit.
    fn classify(self) -> ServiceBuilder<Stack<ClassifyLayer, L>>;

    /// A [`BaseUrlLayer`] (regions, proxies, the mock).
    fn base_url(self, layer: BaseUrlLayer) -> ServiceBuilder<Stack<BaseUrlLayer, L>>;

    /// An [`InFlightLayer`]: a plain limit on requests in flight.
    fn in_flight(self, layer: InFlightLayer) -> ServiceBuilder<Stack<InFlightLayer, L>>;
}

impl<L> sealed::Sealed<L> for ServiceBuilder<L> {}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn kling_metrics(self, monitor: Monitor) -> ServiceBuilder<Stack<MetricsLayer, L>> {
        self.layer(MetricsLayer::with_monitor(monitor))
    }

    fn drain_gate(self, layer: DrainLayer) -> ServiceBuilder<Stack<DrainLayer, L>> {
        self.layer(layer)
    }

    fn spend_guard(self, layer: SpendGuardLayer) -> ServiceBuilder<Stack<SpendGuardLayer, L>> {
        self.layer(layer)
    }

    fn kling_retry(self, layer: RetryLayer) -> ServiceBuilder<Stack<RetryLayer, L>> {
        self.layer(layer)
    }

    fn task_slots(self, layer: TaskSlotsLayer) -> ServiceBuilder<Stack<TaskSlotsLayer, L>> {
        self.layer(layer)
    }

    fn gcra(self, layer: GcraLayer) -> ServiceBuilder<Stack<GcraLayer, L>> {
        self.layer(layer)
    }

    fn kling_auth(self, credentials: Credentials) -> ServiceBuilder<Stack<AuthLayer, L>> {
        self.layer(AuthLayer::new(credentials))
    }

    fn attempt_timeout(self, timeout: Duration) -> ServiceBuilder<Stack<AttemptTimeoutLayer, L>> {
        self.layer(AttemptTimeoutLayer::new(timeout))
    }

    fn classify(self) -> ServiceBuilder<Stack<ClassifyLayer, L>> {
        self.layer(ClassifyLayer::new())
    }

    fn base_url(self, layer: BaseUrlLayer) -> ServiceBuilder<Stack<BaseUrlLayer, L>> {
        self.layer(layer)
    }

    fn in_flight(self, layer: InFlightLayer) -> ServiceBuilder<Stack<InFlightLayer, L>> {
        self.layer(layer)
    }
}
