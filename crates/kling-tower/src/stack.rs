//! [`KlingLayer`]: the whole recommended stack in one layer, with the numbers of a preset and
//! the handles users need.
//!
//! Outer to inner (DESIGN.md), and why each sits where it does:
//!
//! | # | layer | why here |
//! |---|---|---|
//! | 1 | [`MetricsLayer`] | sees the whole logical call: waiting, retries, final outcome |
//! | 2 | [`DrainLayer`] | a graceful drain refuses new creates before anything waits for them, and counts what is in flight |
//! | 3 | [`SpendGuardLayer`] (with a credit budget) | an over-budget create fails before it waits or is retried |
//! | 4 | [`RetryLayer`] | decides from each attempt's `Outcome` whether and when to try again; its deadline bounds every wait below |
//! | 5 | [`TaskSlotsLayer`] | a create waits for a weighted slot in its pool, held until the task ends; a retried 1303 waits here |
//! | 6 | [`GcraLayer`] | paces every attempt, retries included; a 1302 or a refusal's `Retry-After` pauses the whole account; under a rate cap the [adaptive rate](crate::StackConfig::adaptive_rate) slows below it after 1302s; `/account/costs` once a second (without a rate cap, only these) |
//! | 7 | [`AuthLayer`] | sets the bearer token per attempt; on 1003/1004 drops the refused token, and the retry layer resends once, signed afresh |
//! | 8 | [`AttemptTimeoutLayer`] | per attempt, around the classify step, so a stalled body counts too; its timer is armed only when the attempt waits |
//! | 9 | [`ClassifyLayer`] | reads the body (bounded) and parses the envelope once |
//! | 10 | [`BaseUrlLayer`] | resolves `/v1/...` against the region, a proxy or the mock |
//! | 11 | your client | hyper-util ([`https_client`](crate::client)), reqwest ([`ReqwestService`](crate::client)), … |
//!
//! The numbers come from a [`StackConfig`] (a [`Tier`](crate::Tier) preset, overridden as
//! needed) at its [`speed`](StackConfig::speed): rates × N, durations ÷ N.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use kling_core::Outcome;
//! use kling_mock::{MockConfig, MockKling, Preset};
//! use kling_tower::{Credentials, KlingLayer, StackConfig, Tier};
//! use tower::{Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), kling_core::BoxError> {
//! let kling = KlingLayer::new(StackConfig::preset(Tier::Pro), Credentials::api_key("my-key")?)?;
//! let service = kling.layer(MockKling::new(MockConfig::preset(Preset::Pro).api_key("my-key"))?);
//!
//! let create = http::Request::post("/v1/videos/text2video")
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from(r#"{"prompt":"a cat"}"#)))?;
//! let response = service.oneshot(create).await?;
//! assert!(Outcome::of(&response).unwrap().is_success());
//! // The task holds one of the Pro tier's 5 video slots until a query or callback says it ended.
//! let snapshot = kling.snapshot();
//! let video = snapshot.pool("video").unwrap();
//! assert_eq!((video.in_use, video.capacity), (1, 5));
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use kling_concurrency::{DEFAULT_RECOVERY_INTERVAL, SlotsConfig, SlotsHandle, TaskSlotsLayer};
use kling_core::{AccountId, BoxError, ClassifyLayer, Pool, Recognized, RequestKind, TaskReport};
use kling_metrics::{MetricsLayer, Monitor, Snapshot};
use kling_ratelimit::{Adaptive, Cooldown, GcraHandle, GcraLayer, Quota};
use kling_retry::{Backoff, RetryBudget, RetryLayer, SplitMix};
use tower::util::Either;
use tower_layer::Layer;
use tower_service::Service;

use crate::auth::{Auth, AuthLayer, Credentials};
use crate::backends::{InProcess, StackBackends};
use crate::base_url::{BaseUrl, BaseUrlLayer};
use crate::drain::{Drain, DrainHandle, DrainLayer};
use crate::error::ConfigError;
use crate::follow::{FollowPolicy, Follower};
use crate::preset::StackConfig;
use crate::spend::{CostTable, SpendGuard, SpendGuardLayer};
use crate::timeout::{AttemptTimeout, AttemptTimeoutLayer};

mod sources;

pub use sources::{RateLimitSource, SlotsSource};

/// Auth, per-attempt timeout, classify and base URL over the client `S`.
pub type Attempt<S> = Auth<AttemptTimeout<kling_core::Classify<BaseUrl<S>>>>;
/// [`Attempt`] paced by the rate limiter (on the rate backend of `B`). Without a rate cap its
/// account quota never holds a request (one a microsecond, 65,535 back to back), and it still
/// pauses the account after a 1302 or a refusal's `Retry-After` and keeps `/account/costs` to
/// one a second.
pub type Paced<S, B = InProcess> = kling_ratelimit::Gcra<Attempt<S>, <B as StackBackends>::Rate>;
/// Retry over task slots (on the slots backend of `B`) over [`Paced`].
pub type Core<S, B = InProcess> =
    kling_retry::Retry<kling_concurrency::TaskSlots<Paced<S, B>, <B as StackBackends>::Slots>>;
/// [`Core`] behind the spend guard, when the preset has a credit budget.
pub type Guarded<S, B = InProcess> = Either<SpendGuard<Core<S, B>>, Core<S, B>>;
/// The whole stack over the client `S`, as [`Kling`] wraps it.
pub type Stack<S, B = InProcess> = kling_metrics::Metrics<Drain<Guarded<S, B>>>;

/// Builds a [`KlingLayer`]: a [`StackConfig`], [`Credentials`], and the few choices that are
/// not numbers — among them where the limits live (`B`, [`StackBackends`]: in this process by
/// default, or in Redis with `shared`, feature `redis`).
#[must_use]
pub struct KlingBuilder<B = InProcess> {
    config: StackConfig,
    credentials: Credentials,
    account: Option<AccountId>,
    base_url: Result<BaseUrlLayer, ConfigError>,
    costs: CostTable,
    monitor: Option<Monitor>,
    auth: Option<AuthLayer>,
    generate_external_ids: bool,
    seed: Option<u64>,
    replay_seed: Option<u64>,
    backends: B,
}

impl<B: fmt::Debug> fmt::Debug for KlingBuilder<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KlingBuilder")
            .field("config", &self.config)
            .field("credentials", &self.credentials)
            .field("account", &self.account)
            .field("base_url", &self.base_url)
            .field("costs", &self.costs)
            .field("generate_external_ids", &self.generate_external_ids)
            .field("backends", &self.backends)
            .finish_non_exhaustive()
    }
}

impl<B: StackBackends> KlingBuilder<B> {
    /// The account every limit counts under (default: the one the credentials derive,
    /// [`Credentials::account_id`]). Requests that carry their own [`AccountId`] keep it.
    ///
    /// The stack keeps an interned copy ([`AccountId::interned`]), which every request then
    /// carries without touching a shared reference count.
    pub fn account(mut self, account: AccountId) -> Self {
        self.account = Some(account);
        self
    }

    /// The account [`account`](Self::account) set, if any (a gateway names each stack's).
    pub(crate) fn account_set(&self) -> Option<&AccountId> {
        self.account.as_ref()
    }

    /// The base URL relative request URIs resolve against (default the configuration's
    /// [`base_url`](StackConfig::base_url), else Kling's global host,
    /// [`base_url::GLOBAL`](crate::base_url::GLOBAL)): a region, a proxy or the mock.
    pub fn base_url(mut self, base: &str) -> Self {
        self.base_url = BaseUrlLayer::new(base);
        self
    }

    /// The prices the spend guard estimates creates with (default [`CostTable::new`]).
    pub fn costs(mut self, costs: CostTable) -> Self {
        self.costs = costs;
        self
    }

    /// The metrics monitor (default: one measuring usage against the preset's rate, whose
    /// tracked tasks expire at the preset's task lease, as their slots do). Give yours the
    /// same [`task_lease`](kling_metrics::MonitorBuilder::task_lease).
    pub fn monitor(mut self, monitor: Monitor) -> Self {
        self.monitor = Some(monitor);
        self
    }

    /// The auth layer, e.g. one with a test clock (default `AuthLayer::new(credentials)`). The
    /// stack turns its own resend off (`resend_on_refusal(false)`): the retry layer resends a
    /// 1003/1004 once, through the slots and the rate limiter.
    ///
    /// It must sign with the builder's credentials (the same API key, or the same access key):
    /// the stack's limits count under the account those derive, so an auth layer for another
    /// account is refused by [`build`](Self::build) (`auth`, naming both accounts) rather than
    /// having its requests counted against the builder's account.
    pub fn auth(mut self, auth: AuthLayer) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Whether creates without an `external_task_id` get one, so a create whose outcome is
    /// unknown (5xx, timeout) can be looked up and retried without a duplicate (default on).
    pub fn generate_external_ids(mut self, on: bool) -> Self {
        self.generate_external_ids = on;
        self
    }

    /// Seeds the retry jitter, for reproducible tests (generated external ids stay drawn from
    /// the process's entropy: two runs seeded alike must not share them).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Seeds the retry jitter and the generated external ids alike, so that two runs against
    /// the same mock send the same bytes in the same order (a benchmark's table that must be
    /// the same on every machine). Two runs so seeded give their creates the same ids: never
    /// where runs share an account at Kling. Takes the place of [`KlingBuilder::seed`].
    pub fn replay_seed(mut self, seed: u64) -> Self {
        self.replay_seed = Some(seed);
        self
    }

    /// Keeps the rate limiter's and the task slots' state in `backends` (default
    /// [`InProcess`]); the layers, their order and numbers stay the same.
    pub fn backends<B2: StackBackends>(self, backends: B2) -> KlingBuilder<B2> {
        KlingBuilder {
            config: self.config,
            credentials: self.credentials,
            account: self.account,
            base_url: self.base_url,
            costs: self.costs,
            monitor: self.monitor,
            auth: self.auth,
            generate_external_ids: self.generate_external_ids,
            seed: self.seed,
            replay_seed: self.replay_seed,
            backends,
        }
    }

    /// Shares the account's limits with every other stack on the same Redis and key prefix
    /// (other processes, other hosts): the rate limiter and the task slots keep their state
    /// in Redis ([`RedisGcra`](kling_redis::RedisGcra), [`RedisSlots`](kling_redis::RedisSlots)),
    /// keyed by the stack's [`AccountId`]; waiting stays in the process. Shorthand for
    /// `.backends(Redis::new(connection))` ([`Redis`](crate::backends::Redis) has the
    /// settings); fails closed by waiting while Redis is unreachable unless
    /// [`when_unreachable`](KlingBuilder::when_unreachable) says otherwise. Feature `redis`.
    ///
    /// Reading the fleet's pools is a round trip: the synchronous [`KlingLayer::snapshot`]
    /// shows them as the previous snapshot read them (and starts the next read), and
    /// [`KlingLayer::refreshed_snapshot`] reads them first.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use kling_core::{Outcome, Pool};
    /// use kling_mock::{MockConfig, MockKling, Preset};
    /// use kling_redis::testing::RedisServer;
    /// use kling_tower::redis::{Connection, RedisConfig, WhenUnreachable};
    /// use kling_tower::{Credentials, KlingLayer, StackConfig, Tier};
    /// use tower::{Layer, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kling_core::BoxError> {
    /// // A throw-away redis-server (kling-redis's `testing` feature); in production, yours.
    /// let Some(redis) = RedisServer::start_or_skip()? else { return Ok(()) };
    /// let config = RedisConfig::new(redis.url()).prefix("kling:doc");
    ///
    /// // Two processes of one account would each build this, on their own connection.
    /// let mut stacks = Vec::new();
    /// for _ in 0..2 {
    ///     let conn = Connection::connect(config.clone()).await?;
    ///     let stack = KlingLayer::builder(StackConfig::preset(Tier::Pro), Credentials::api_key("my-key")?)
    ///         .shared(conn)
    ///         .when_unreachable(WhenUnreachable::Wait) // the default: fail closed by waiting
    ///         .build()?;
    ///     stacks.push(stack);
    /// }
    ///
    /// let mock = MockKling::new(MockConfig::preset(Preset::Pro).api_key("my-key"))?;
    /// for stack in &stacks {
    ///     let create = http::Request::post("/v1/videos/text2video")
    ///         .header("content-type", "application/json")
    ///         .body(Full::new(Bytes::from(r#"{"prompt":"a cat"}"#)))?;
    ///     let response = stack.layer(mock.clone()).oneshot(create).await?;
    ///     assert!(Outcome::of(&response).unwrap().is_success());
    /// }
    ///
    /// // Either stack sees the account's two tasks, each holding one of its 5 video slots.
    /// let slots = stacks[0].slots().snapshot().await?;
    /// let video = slots.get(stacks[0].account_id(), &Pool::parse("video").unwrap()).unwrap();
    /// assert_eq!((video.in_use, video.capacity), (2, 5));
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "redis")]
    pub fn shared(
        self,
        connection: kling_redis::Connection,
    ) -> KlingBuilder<crate::backends::Redis> {
        self.backends(crate::backends::Redis::new(connection))
    }

    /// Checks the configuration and builds the layers.
    pub fn build(self) -> Result<KlingLayer<B>, ConfigError> {
        let config = self.config;
        config.validate()?;
        let base_url = self.base_url?;
        let speed = config.speed_factor();
        // An auth layer of the caller's must sign for the account the limits count under: the
        // builder's credentials', unless `account` names another (which then still means the
        // account these credentials are for).
        if let Some(auth) = &self.auth {
            let (signs_for, given) = (auth.account_id(), self.credentials.account_id());
            if *signs_for != given {
                return Err(ConfigError::new(
                    "auth",
                    format!(
                        "signs for account {signs_for}, but the builder's credentials are \
                         account {given}: give the builder the credentials the auth layer signs \
                         with"
                    ),
                ));
            }
        }
        let auth = self
            .auth
            .unwrap_or_else(|| AuthLayer::new(self.credentials.clone()))
            .resend_on_refusal(false);
        let account = self.account.map_or_else(
            || self.credentials.account_id(),
            |account| AccountId::interned(account.as_str()),
        );

        // Retry: the preset's attempts, deadline and budget; backoff at the speed factor.
        let budget = RetryBudget::new(
            config
                .scaled(Duration::from_secs(10))
                .max(MIN_BUDGET_WINDOW),
            speed.ceil().clamp(1.0, f64::from(u32::MAX)) as u32,
            config.retry_budget(),
        )
        .map_err(|e| layer_error("retry", e.field(), &e))?;
        let mut retry = RetryLayer::builder()
            .max_attempts(config.max_attempts())
            .deadline(config.retry_deadline_duration())
            .backoff(Backoff::new().sped_up(speed))
            .budget(budget)
            .generate_external_ids(self.generate_external_ids);
        if let Some(seed) = self.replay_seed {
            retry = retry.rng(SplitMix::seeded(seed));
        } else if let Some(seed) = self.seed {
            retry = retry.seed(seed);
        }
        let retry = retry
            .build()
            .map_err(|e| layer_error("retry", e.field(), &e))?;

        // Task slots: the preset's slots per pool, lease and 1303 recovery at the speed factor.
        let mut slots = SlotsConfig::new(config.default_slots())
            .lease(config.task_lease_duration())
            .recovery_interval(config.scaled(DEFAULT_RECOVERY_INTERVAL))
            .default_account(account.clone())
            .pool_scope(config.slot_pool_scope());
        if let Some(max) = config.slot_queue_limit() {
            slots = slots.max_queue(max);
        }
        for (pool, n) in config.pool_slot_overrides() {
            let parsed = Pool::parse(pool)
                .ok_or_else(|| ConfigError::new(format!("pool_slots.{pool}"), "is not a pool"))?;
            slots = slots.pool_capacity(parsed, n);
        }
        let slots_backend = self.backends.slots_backend(&slots, &config)?;
        let slots = TaskSlotsLayer::with_backend(&slots, slots_backend)
            .map_err(|e| layer_error("slots", e.field(), &e))?;
        let slots_handle = slots.handle();

        // Rate: one request per pacing interval (the rate's, plus the jitter allowance), burst,
        // and a key-wide cooldown after 1302 or a Retry-After; `/account/costs` at most once a
        // second (Kling asks for it), plus the same jitter allowance. Without a rate cap the
        // limiter is still there, for the cooldown and that class quota, with an account quota
        // that never holds a request.
        let quota = match config.pacing_interval() {
            Some(interval) => Quota::with_period(interval).with_burst(config.burst_size()),
            None => uncapped(),
        };
        // With the adaptive rate (the default under a rate cap), the pacing quota is its
        // ceiling and its start: at the account's true rate nothing changes, and a rate told
        // too high slows to the account's after a few 1302s.
        let mut gcra = GcraLayer::builder(quota);
        if config.adapts_rate() {
            gcra = gcra.adaptive(Adaptive::new().start(quota));
        }
        let gcra = gcra
            .cooldown(Cooldown::default().scaled(speed))
            .class_quota(
                RequestKind::Account,
                Quota::with_period(
                    Duration::from_secs_f64(1.0 / speed) + config.jitter_allowance_duration(),
                ),
            )
            .backend(self.backends.rate_backend(&config)?)
            .build()
            .map_err(|e| layer_error("rate_per_minute", e.field(), &e))?;

        let spend = SpendGuardLayer::from_config(&config, self.costs)?;

        let monitor = match self.monitor {
            Some(monitor) => monitor,
            None => {
                // Tasks stop counting as running when their slots are given back.
                let mut builder = Monitor::builder().task_lease(config.task_lease_duration());
                if let Some(rate) = config.account_rate_per_minute() {
                    // A minute at this speed, with the requests the account allows in it; no
                    // shorter than the monitor's shortest window.
                    let window = config
                        .scaled(Duration::from_secs(60))
                        .max(MIN_MONITOR_WINDOW);
                    let per_window = (rate * window.as_secs_f64() / 60.0).round().max(1.0) as u32;
                    builder = builder.rate_quota(per_window, window);
                }
                builder
                    .build()
                    .map_err(|e| layer_error("monitor", e.field(), &e))?
            }
        };
        // This account's pools only where the backend holds other accounts' too (the stacks
        // of a gateway on one Redis); in this process, every account that went through it.
        let pools = SlotsSource::new(slots_handle.clone());
        monitor.add_source(if B::SHARED_ACROSS_ACCOUNTS {
            pools.account(account.clone())
        } else {
            pools
        });
        if config.pacing_interval().is_some() {
            monitor.add_source(RateLimitSource::new(gcra.handle(), vec![account.clone()]));
        }

        Ok(KlingLayer {
            inner: Arc::new(Parts {
                metrics: MetricsLayer::with_monitor(monitor),
                drain: DrainLayer::new(),
                spend,
                retry,
                slots,
                slots_handle,
                gcra,
                auth,
                timeout: config.attempt_timeout_duration(),
                classify: ClassifyLayer::new().max_body_bytes(config.body_limit()),
                base_url,
                account,
                config,
            }),
        })
    }
}

#[cfg(feature = "redis")]
impl KlingBuilder<crate::backends::Redis> {
    /// What the rate limiter and the slots do while Redis cannot be reached (default
    /// [`WhenUnreachable::Wait`](kling_redis::WhenUnreachable::Wait), fail closed by waiting;
    /// `Fail` errs at once; `Fallback { processes }` gives each process its share of the
    /// limits). Feature `redis`.
    pub fn when_unreachable(mut self, choice: kling_redis::WhenUnreachable) -> Self {
        self.backends = self.backends.when_unreachable(choice);
        self
    }
}

/// The account quota of a preset without a rate cap (Enterprise by default, ResourcePack): a
/// request every microsecond, 65,535 back to back, so it never holds an ordinary request; the
/// rate limiter is there for its cooldown (a 1302 or a refusal's `Retry-After` pauses the whole
/// account, as with a cap) and the `/account/costs` quota of one a second.
fn uncapped() -> Quota {
    Quota::with_period(Duration::from_micros(1)).with_burst(65_535)
}

/// The shortest window the retry budget takes (kling-retry's `RetryBudget::new`): its 10 s
/// divided by a speed factor above 1000 is shorter, and the stack would not build.
const MIN_BUDGET_WINDOW: Duration = Duration::from_millis(10);

/// The shortest rate window the monitor takes (kling-metrics' `MonitorBuilder::rate_quota`): a
/// minute divided by a speed factor above 20000 is shorter, and the stack would not build.
const MIN_MONITOR_WINDOW: Duration = Duration::from_millis(3);

/// Names the layer crate a configuration error came from.
pub(crate) fn layer_error(
    scope: &str,
    field: impl fmt::Display,
    error: impl fmt::Display,
) -> ConfigError {
    ConfigError::new(format!("{scope}.{field}"), error.to_string())
}

struct Parts<B: StackBackends> {
    config: StackConfig,
    account: AccountId,
    metrics: MetricsLayer,
    drain: DrainLayer,
    spend: Option<SpendGuardLayer>,
    retry: RetryLayer,
    slots: TaskSlotsLayer<B::Slots>,
    slots_handle: SlotsHandle<B::Slots>,
    gcra: GcraLayer<B::Rate>,
    auth: AuthLayer,
    timeout: Duration,
    classify: ClassifyLayer,
    base_url: BaseUrlLayer,
}

/// The recommended stack as one layer, with its handles. See the [module docs](self).
///
/// `B` says where the rate limiter's and the slots' state lives ([`StackBackends`]): in this
/// process by default; in Redis, shared with the account's other processes, when built with
/// `KlingBuilder::shared` (feature `redis`).
///
/// # Clone
///
/// Clones (and every service they build) share every limit and handle: the slots, the rate
/// limiter, the retry budget, the spend ledger, the token cache, the drain gate and the
/// metrics monitor. Layering the same `KlingLayer` over two clients makes two services that
/// count against one account. With Redis backends, the rate and the slots are also shared
/// with every other stack on the same Redis and key prefix.
pub struct KlingLayer<B: StackBackends = InProcess> {
    inner: Arc<Parts<B>>,
}

impl<B: StackBackends> Clone for KlingLayer<B> {
    fn clone(&self) -> Self {
        KlingLayer {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<B: StackBackends> fmt::Debug for KlingLayer<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KlingLayer")
            .field("account", &self.inner.account)
            .field("config", &self.inner.config)
            .field("auth", &self.inner.auth)
            .finish_non_exhaustive()
    }
}

impl KlingLayer {
    /// The stack of `config`, against its [base URL](StackConfig::base_url) (`KLING_BASE_URL`,
    /// TOML `base_url`), else Kling's global host.
    pub fn new(config: StackConfig, credentials: Credentials) -> Result<KlingLayer, ConfigError> {
        KlingLayer::builder(config, credentials).build()
    }

    /// A builder, for the base URL, prices, monitor and other choices.
    pub fn builder(config: StackConfig, credentials: Credentials) -> KlingBuilder {
        // The configuration's base URL (`KLING_BASE_URL`), until `base_url` sets another.
        // Its error quotes nothing of a base URL that may hold a secret (the builder's `Debug`
        // shows it).
        let base_url = config
            .base_url_layer()
            .unwrap_or_else(|| Ok(BaseUrlLayer::global()));
        KlingBuilder {
            config,
            credentials,
            account: None,
            base_url,
            costs: CostTable::new(),
            monitor: None,
            auth: None,
            generate_external_ids: true,
            seed: None,
            replay_seed: None,
            backends: InProcess,
        }
    }
}

impl<B: StackBackends> KlingLayer<B> {
    /// The configuration the stack enforces.
    pub fn config(&self) -> &StackConfig {
        &self.inner.config
    }

    /// The account requests without an [`AccountId`] count under.
    pub fn account_id(&self) -> &AccountId {
        &self.inner.account
    }

    /// The task-slots handle: callbacks ([`SlotsHandle::on_callback`]), reconcile after a
    /// restart, halts, capacities, snapshots.
    pub fn slots(&self) -> &SlotsHandle<B::Slots> {
        &self.inner.slots_handle
    }

    /// The rate limiter's handle. Always `Some`: a preset without a rate cap still has the
    /// limiter, for the cooldown after a 1302 or a `Retry-After` and the `/account/costs`
    /// quota, with an account quota that never holds a request (one a microsecond, 65,535 back
    /// to back).
    pub fn rate_limit(&self) -> Option<GcraHandle<B::Rate>> {
        Some(self.inner.gcra.handle())
    }

    /// The retry budget every service of this stack draws from.
    pub fn retry_budget(&self) -> &RetryBudget {
        self.inner.retry.budget()
    }

    /// The spend guard (`None` when the preset sets no credit budget). Every request through
    /// the stack carries its account, so read this stack's budget with it:
    /// `remaining(Some(kling.account_id()))` (`None` is the budget of requests without an
    /// account, which this stack never sends).
    pub fn spend_guard(&self) -> Option<&SpendGuardLayer> {
        self.inner.spend.as_ref()
    }

    /// The auth layer (token cache, account id).
    pub fn auth(&self) -> &AuthLayer {
        &self.inner.auth
    }

    /// The metrics monitor: usage against the rate quota, 429s by code, task counts, and the
    /// pools and queues of the slots and rate-limit handles.
    pub fn monitor(&self) -> &Monitor {
        self.inner.metrics.monitor()
    }

    /// How close the account is to its limits now, without waiting: with a backend that holds
    /// other accounts' limits too (a gateway's stacks on one Redis), its own pools only. With the
    /// Redis backends the fleet's pools and requests are as the previous snapshot read them
    /// (each snapshot starts the next read);
    /// [`refreshed_snapshot`](KlingLayer::refreshed_snapshot) reads them first.
    pub fn snapshot(&self) -> Snapshot {
        self.monitor().snapshot()
    }

    /// [`snapshot`](KlingLayer::snapshot) with the fleet's pools and requests read now (a
    /// round trip to Redis; with the in-process backends, the same as `snapshot`).
    pub async fn refreshed_snapshot(&self) -> Snapshot {
        self.monitor().refreshed_snapshot().await
    }

    /// The drain gate's handle.
    pub fn drain_handle(&self) -> DrainHandle {
        self.inner.drain.handle()
    }

    /// Stops admitting creates ([`Draining`](crate::error::Draining)), then waits until every
    /// request in flight and every task followed by a [`follower`](KlingLayer::follower) has
    /// finished.
    pub async fn drain(&self) {
        self.inner.drain.handle().drain().await;
    }

    /// The follow policy of this preset: [`FollowPolicy::new`] at the preset's speed. Durations
    /// set on it are API time, divided by that speed like the others.
    pub fn follow_policy(&self) -> FollowPolicy {
        FollowPolicy::new().speed(self.inner.config.speed_factor())
    }

    /// A task follower that queries through `service` (normally this stack's service, so its
    /// queries are paced and free slots like any other) and holds the drain open while it
    /// follows. Its queries carry this stack's account, so a [`Gateway`](crate::gateway::Gateway)
    /// serving several accounts routes them here. Each call makes a follower of its own: clone
    /// one to have its calls share batch queries and the callbacks
    /// [delivered](Follower::deliver) to any clone.
    pub fn follower<S>(&self, service: S, policy: FollowPolicy) -> Result<Follower<S>, ConfigError>
    where
        S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>> + Clone,
        S::Error: Into<BoxError>,
    {
        Ok(Follower::new(service, policy)?
            .with_drain(self.drain_handle())
            .with_account(self.account_id().clone()))
    }

    /// Hands a verified callback body (the task object Kling posts) to the stack: a terminal
    /// status frees the task's slots, its reported cost corrects the spend guard, and the
    /// monitor counts it; a running one renews the task's leases. Verify the signature first
    /// ([`WebhookVerifier`](crate::WebhookVerifier)).
    ///
    /// A body that reports several tasks (an array of them, or an envelope whose `data` holds
    /// several, as a proxy batching callbacks may post) has each applied; the first is
    /// returned. To hand each to a [`Follower`] as well, use
    /// [`on_callback_tasks`](Self::on_callback_tasks).
    pub async fn on_callback(&self, payload: &[u8]) -> Result<Option<TaskReport>, BoxError> {
        Ok(self.on_callback_tasks(payload).await?.into_iter().next())
    }

    /// [`on_callback`](Self::on_callback), returning every task the body reports.
    ///
    /// The spend guard and the monitor get each task whatever the slots' backend answers: when
    /// it fails (Redis away), its error is returned after they have.
    pub async fn on_callback_tasks(&self, payload: &[u8]) -> Result<Vec<TaskReport>, BoxError> {
        let slots = self.inner.slots_handle.on_callback(payload).await;
        let tasks = kling_core::Envelope::parse_callback(payload).unwrap_or_default();
        for task in &tasks {
            self.settle(task);
        }
        slots?;
        Ok(tasks)
    }

    /// Hands a task report from elsewhere (a verified callback already parsed, e.g. by
    /// [`callback_route`](crate::webhook)): a terminal one frees the task's slots, corrects
    /// the spend guard and is counted by the monitor; a running one renews its slots' and the
    /// monitor's leases.
    /// The task is found by its task id, else by its external id in the stack's account (a
    /// create whose answer was lost holds its slot under its external id only). The spend
    /// guard and the monitor get it whatever the slots' backend answers: when it fails (Redis
    /// away), its error is returned after they have.
    pub async fn on_task(&self, task: &TaskReport) -> Result<(), BoxError> {
        let slots = self
            .inner
            .slots_handle
            .report_in(&self.inner.account, task)
            .await;
        self.settle(task);
        slots?;
        Ok(())
    }

    fn settle(&self, task: &TaskReport) {
        if let Some(spend) = &self.inner.spend {
            spend.report(Some(&self.inner.account), task);
        }
        // A running task's report renews the monitor's lease of it, as the slots' (a task
        // followed only by callbacks would otherwise be counted expired, and its end lost).
        self.monitor().task_reported(&task.id, &task.status);
    }
}

impl<S, B: StackBackends> Layer<S> for KlingLayer<B> {
    type Service = Kling<S, B>;

    fn layer(&self, client: S) -> Kling<S, B> {
        let p = &*self.inner;
        // `Kling::call` sets the account of every request, so the auth service need not.
        let attempt = p.auth.layer_below_account(
            AttemptTimeoutLayer::new(p.timeout).layer(p.classify.layer(p.base_url.layer(client))),
        );
        let core = p.retry.layer(p.slots.layer(p.gcra.layer(attempt)));
        let guarded = match &p.spend {
            Some(spend) => Either::Left(spend.layer(core)),
            None => Either::Right(core),
        };
        // With an access key pair, the drain gate refuses a new-style request at once: under
        // the metrics layer (counted as refused), before a rate turn or a slot is spent on it.
        let gate = p
            .drain
            .layer(guarded)
            .check_endpoints(p.auth.signs_tokens().then(|| p.auth.clone()));
        Kling {
            inner: p.metrics.layer(gate),
            account: p.account.clone(),
        }
    }
}

/// The recommended stack over a client `S`, from a [`KlingLayer`].
///
/// Takes `http::Request<Full<Bytes>>` with a relative (`/v1/videos/text2video`) URI, or an
/// absolute one at the base URL's origin (any other is refused before sending with
/// [`OtherOrigin`](crate::base_url::OtherOrigin): the stack's credentials go nowhere else), and
/// answers `http::Response<Full<Bytes>>` with the [`Outcome`](kling_core::Outcome) in
/// its extensions. Requests without an [`AccountId`] count under the stack's account. Errors
/// are a [`BoxError`]: downcast to the layers' error types (`kling_retry::error::Failed`,
/// [`BudgetExceeded`](crate::error::BudgetExceeded), [`Draining`](crate::error::Draining), …).
///
/// # Clone
///
/// Clones share every limit (see [`KlingLayer`]); clone it per task or per request. A clone
/// writes each layer's shared reference count when it is made and dropped, so a task that
/// sends many requests does better keeping its own clone than cloning per request
/// (BENCHMARKS.md, "cloned per request" rows against the plain ones: about +100 ns per request
/// with one task and +180 ns with 64 tasks on two threads).
pub struct Kling<S, B: StackBackends = InProcess> {
    inner: Stack<S, B>,
    account: AccountId,
}

impl<S, B: StackBackends> Clone for Kling<S, B>
where
    Stack<S, B>: Clone,
{
    fn clone(&self) -> Self {
        Kling {
            inner: self.inner.clone(),
            account: self.account.clone(),
        }
    }
}

impl<S, B: StackBackends> fmt::Debug for Kling<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kling")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl<S, B: StackBackends> Kling<S, B> {
    /// The layers, outermost first.
    pub fn get_ref(&self) -> &Stack<S, B> {
        &self.inner
    }

    /// The account requests without an [`AccountId`] count under.
    pub fn account_id(&self) -> &AccountId {
        &self.account
    }
}

impl<S, B: StackBackends> Service<Request<Full<Bytes>>> for Kling<S, B>
where
    Stack<S, B>: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError>,
{
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = <Stack<S, B> as Service<Request<Full<Bytes>>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Full<Bytes>>) -> Self::Future {
        // Recognised once, here: metrics, retry, slots and the rate limiter all read the copy
        // cached in the request.
        Recognized::of_with_account(&mut request, &self.account);
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::Full;
    use kling_core::Outcome;
    use kling_mock::{MockConfig, MockKling, Preset};
    use tower::ServiceExt;

    use super::*;
    use crate::{Credentials, Tier};

    /// A task followed only by callbacks, running several task leases: each "processing"
    /// callback renews the monitor's lease as well as the slots', so the monitor does not count
    /// it expired, and counts its real end.
    #[tokio::test(start_paused = true)]
    async fn callbacks_of_a_running_task_renew_the_monitors_lease() {
        let lease = Duration::from_secs(600);
        let config = StackConfig::preset(Tier::Pro).task_lease(lease);
        let kling = KlingLayer::new(config, Credentials::api_key("k").unwrap()).unwrap();
        let mock = MockKling::new(MockConfig::preset(Preset::Pro).api_key("k")).unwrap();
        let create = Request::post("/v1/videos/text2video")
            .body(Full::new(Bytes::from_static(br#"{"prompt":"a cat"}"#)))
            .unwrap();
        let response = kling.layer(mock).oneshot(create).await.unwrap();
        let id = Outcome::of(&response).unwrap().tasks()[0].id.clone();
        let callback =
            |status: &str| format!(r#"{{"task_id":"{id}","task_status":"{status}"}}"#).into_bytes();
        for _ in 0..5 {
            tokio::time::advance(lease * 2 / 3).await;
            kling.on_callback(&callback("processing")).await.unwrap();
            let tasks = kling.snapshot().tasks;
            assert_eq!((tasks.running, tasks.expired), (1, 0));
        }
        kling.on_callback(&callback("succeed")).await.unwrap();
        let tasks = kling.snapshot().tasks;
        assert_eq!((tasks.running, tasks.expired, tasks.finished), (0, 0, 1));
    }
}
