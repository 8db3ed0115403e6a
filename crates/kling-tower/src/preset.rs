//! Tier presets: the numbers a stack enforces, as plain data.
//!
//! [`StackConfig::preset`] starts from one of the tiers of the published Kling rate-limit guide
//! (or from a resource-pack account), every number can be overridden, and the whole can be read
//! from environment variables ([`StackConfig::from_env`]) or a TOML document
//! ([`StackConfig::from_toml_str`]). [`StackConfig::validate`] rejects impossible values with an
//! error that names the field, also a duration the [speed factor](#speed-factor) divides to 0.
//!
//! | tier | slots per pool | requests / minute | daily credits |
//! |---|---|---|---|
//! | [`Tier::Free`] | 1 | 10 | 66 |
//! | [`Tier::Standard`] | 3 | 30 | none |
//! | [`Tier::Pro`] | 5 | 60 | none |
//! | [`Tier::Enterprise`] | 10 (set yours) | no cap (set yours) | none |
//! | [`Tier::ResourcePack`] | video 20, image 9, try-on 20 (see below) | no cap | none |
//!
//! Every preset paces at a GCRA burst of 1, each request at least the rate's interval plus a
//! [jitter allowance](StackConfig::jitter_allowance) (15 ms) after the one before, so network
//! and scheduling jitter do not turn into 1302s. The allowance is real time: it does not shrink
//! with the [speed factor](StackConfig::speed), because jitter does not, and it costs the least
//! where the rate is lowest (0.25% of the Free tier's 6 s interval, 1.5% of Pro's 1 s). A
//! proportional [`headroom`](StackConfig::headroom) (default 0) can be added on top.
//!
//! Under a rate cap the stack also adapts its rate ([`StackConfig::adaptive_rate`], on by
//! default): the configured rate is the ceiling it starts at, and 1302s lower it, so a rate
//! set higher than the account's (a tier preset on an account with a lower real limit) costs
//! a 1302 on a few percent of the requests rather than on every other one.
//!
//! Kling's own pages publish none of these tiers; they count concurrency per resource pack.
//! [`Tier::ResourcePack`]'s video 20 and image 9 are third-party figures no official page
//! confirms, and no try-on figure is published at all: try-on gets the video pack's 20 as a
//! guess. Set your packs' numbers with [`StackConfig::resource_pack`].
//!
//! # Speed factor
//!
//! [`StackConfig::speed`] matches the mock's `--speed N`: the getters return what the layers
//! enforce, rates × N and durations ÷ N, so a demo against `kling-mock --speed 60` runs a minute
//! of Kling in a second. Token lifetimes are not in this configuration and stay real.
//!
//! # TOML
//!
//! ```toml
//! tier = "pro"              # free | standard | pro | enterprise | resource-pack
//! speed = 1.0
//! rate_per_minute = 60      # or "none" for no cap
//! adaptive_rate = true      # slow to the account's rate on 1302s (default on with a cap)
//! burst = 1
//! headroom = 0.0
//! jitter_allowance_ms = 15  # real time, not scaled by speed
//! slots = 5
//! slot_queue = "none"       # or the most creates that may wait for a pool's slots
//! pool_scope = "model"      # or "product": every model of a product in one pool
//! task_lease_secs = 1800
//! retry_max_attempts = 6
//! retry_deadline_secs = 600
//! retry_budget_ratio = 0.2
//! attempt_timeout_secs = 30
//! max_body_bytes = 2097152  # 1024 to 67108864 (64 MiB, preset::MAX_BODY_BYTES)
//! daily_credits = "none"    # or a number
//! credit_period_secs = 86400
//! base_url = "https://api-beijing.klingai.com"  # default: the global host
//!
//! [pool_slots]
//! video = 5
//! "image:kling-v2" = 3
//! ```

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use http::Method;
use kling_core::{Pool, PoolScope, Product, Route};
use serde::Deserialize;

use crate::base_url::BaseUrlLayer;
use crate::error::ConfigError;

/// An account tier: where a [`StackConfig`]'s numbers start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Tier {
    /// 1 slot per pool, 10 requests per minute, 66 credits per day.
    #[default]
    Free,
    /// 3 slots per pool, 30 requests per minute.
    Standard,
    /// 5 slots per pool, 60 requests per minute.
    Pro,
    /// 10 slots per pool and no request-rate cap until you set your contract's numbers.
    Enterprise,
    /// Slots per resource pack and no request-rate cap. Kling counts concurrency per pack type;
    /// the figures here are not Kling's: video 20 and image 9 are published third-party
    /// figures no official page confirms, and try-on's 20 is a guess (no figure is published).
    /// Set your packs' numbers with [`StackConfig::resource_pack`].
    ResourcePack,
}

impl Tier {
    /// Every tier, in the table's order.
    pub const ALL: [Tier; 5] = [
        Tier::Free,
        Tier::Standard,
        Tier::Pro,
        Tier::Enterprise,
        Tier::ResourcePack,
    ];

    /// The tier's name in configuration: `free`, `standard`, `pro`, `enterprise`,
    /// `resource-pack`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Standard => "standard",
            Tier::Pro => "pro",
            Tier::Enterprise => "enterprise",
            Tier::ResourcePack => "resource-pack",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Tier {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Tier, ConfigError> {
        let name = s.trim().to_ascii_lowercase().replace('_', "-");
        Tier::ALL
            .into_iter()
            .find(|tier| tier.as_str() == name)
            .ok_or_else(|| {
                ConfigError::new(
                    "tier",
                    format!(
                        "must be free, standard, pro, enterprise or resource-pack, not `{}`",
                        s.trim()
                    ),
                )
            })
    }
}

/// The numbers a Kling stack enforces. See the [module docs](self).
///
/// Setters take Kling's own (API-time) numbers; getters return what the layers enforce at the
/// configured [`speed`](StackConfig::speed). Setters never fail: call
/// [`validate`](StackConfig::validate) (the loaders do) to reject impossible values.
#[derive(Clone, Debug, PartialEq)]
pub struct StackConfig {
    tier: Tier,
    speed: f64,
    rate_per_minute: Option<f64>,
    adaptive_rate: Option<bool>,
    burst: u32,
    headroom: f64,
    jitter_allowance: Duration,
    slots: u32,
    pool_slots: BTreeMap<String, u32>,
    slot_queue: Option<usize>,
    pool_scope: PoolScope,
    task_lease: Duration,
    retry_max_attempts: u32,
    retry_deadline: Duration,
    retry_budget_ratio: f64,
    attempt_timeout: Duration,
    max_body_bytes: usize,
    daily_credits: Option<f64>,
    credit_period: Duration,
    base_url: Option<BaseUrlText>,
}

/// A base URL as configured, kept as text so that setters never fail; its `Debug` leaves out
/// one with user info or a query, which may hold a password or a signature (validation
/// refuses both).
#[derive(Clone, PartialEq)]
struct BaseUrlText(String);

impl BaseUrlText {
    /// Whether the text may hold a secret: an `@` (user info), a `?` (a query) or a `#`.
    fn may_hold_secret(&self) -> bool {
        self.0.contains(['@', '?', '#'])
    }

    /// The layer [`BaseUrlLayer::new`] makes of it, whose refusal quotes nothing of a text
    /// that [may hold a secret](Self::may_hold_secret) (also where a `/`, `?` or `#` in a
    /// password ends the host early, `https://kling:pa/ss@proxy`).
    fn layer(&self) -> Result<BaseUrlLayer, ConfigError> {
        BaseUrlLayer::new(&self.0)
    }
}

impl fmt::Debug for BaseUrlText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.may_hold_secret() {
            f.write_str("\"<not shown: user info or a query>\"")
        } else {
            fmt::Debug::fmt(&self.0, f)
        }
    }
}

/// The default proportional headroom under the request rate: none, the
/// [`DEFAULT_JITTER_ALLOWANCE`] keeps requests apart instead.
pub const DEFAULT_HEADROOM: f64 = 0.0;

/// The default real-time gap kept beyond the rate's interval between two requests: the
/// scheduling and network jitter one request's arrival may have against the next one's.
pub const DEFAULT_JITTER_ALLOWANCE: Duration = Duration::from_millis(15);

/// The longest duration a configuration accepts (a year): for this crate's durations
/// ([`StackConfig::validate`], [`FollowPolicy::validate`](crate::FollowPolicy::validate)).
/// "Never" is a year, so that adding any of them to an instant cannot overflow. (A rate's
/// interval has the shorter bound [`MAX_PACING_INTERVAL`].)
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The longest interval between two requests a rate may ask for, at its speed, less the
/// headroom and plus the jitter allowance ([`StackConfig::pacing_interval`]): the rate
/// limiter's longest (2^48 - 1 ns, about 78 hours).
pub const MAX_PACING_INTERVAL: Duration = Duration::from_nanos((1 << 48) - 1);

/// The longest connect timeout [`StackConfig::connect_timeout_duration`] gives: the clients'
/// default (10 s), well inside the default 30 s attempt timeout.
pub const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest response body limit accepted ([`StackConfig::max_body_bytes`], 64 MiB): the
/// classify step buffers up to this much of every response in flight. Kling's largest answer,
/// a list of 500 tasks, is far below it.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// The slowest speed factor accepted (a thousandth of real time).
pub const MIN_SPEED: f64 = 0.001;
/// The fastest speed factor accepted (a million times real time).
pub const MAX_SPEED: f64 = 1_000_000.0;

/// The largest jitter allowance accepted.
const MAX_JITTER_ALLOWANCE: Duration = Duration::from_secs(10);

/// The largest rate a stack paces at when it keeps no jitter allowance: one request a
/// nanosecond, the shortest interval the rate limiter takes.
const MAX_PACED_PER_MINUTE: f64 = 60e9;

/// The largest GCRA burst the rate limiter takes.
const MAX_BURST: u32 = u16::MAX as u32;

/// The longest burst window (pacing interval × burst) the rate limiter takes: 2^62 ns, about
/// 146 years.
const MAX_BURST_WINDOW_NANOS: u128 = 1 << 62;

impl Default for StackConfig {
    /// The [`Tier::Free`] preset: the numbers every account has.
    fn default() -> Self {
        StackConfig::preset(Tier::Free)
    }
}

impl StackConfig {
    /// The numbers of a tier (see the [module docs](self) for the table).
    pub fn preset(tier: Tier) -> StackConfig {
        let (slots, rate, credits) = match tier {
            Tier::Free => (1, Some(10.0), Some(66.0)),
            Tier::Standard => (3, Some(30.0), None),
            Tier::Pro => (5, Some(60.0), None),
            Tier::Enterprise => (10, None, None),
            Tier::ResourcePack => (20, None, None),
        };
        let mut pool_slots = BTreeMap::new();
        if tier == Tier::ResourcePack {
            pool_slots.insert("video".to_owned(), 20);
            pool_slots.insert("image".to_owned(), 9);
            pool_slots.insert("try-on".to_owned(), 20);
        }
        StackConfig {
            tier,
            speed: 1.0,
            rate_per_minute: rate,
            adaptive_rate: None,
            burst: 1,
            headroom: DEFAULT_HEADROOM,
            jitter_allowance: DEFAULT_JITTER_ALLOWANCE,
            slots,
            pool_slots,
            slot_queue: None,
            pool_scope: PoolScope::Model,
            task_lease: Duration::from_secs(30 * 60),
            retry_max_attempts: 6,
            retry_deadline: Duration::from_secs(10 * 60),
            retry_budget_ratio: 0.2,
            attempt_timeout: Duration::from_secs(30),
            max_body_bytes: kling_core::classify::DEFAULT_MAX_BODY_BYTES,
            daily_credits: credits,
            credit_period: Duration::from_secs(24 * 60 * 60),
            base_url: None,
        }
    }

    /// An enterprise account with the contract's numbers: `slots` per pool and
    /// `rate_per_minute` requests per minute (`None`: no cap).
    pub fn enterprise(slots: u32, rate_per_minute: Option<f64>) -> StackConfig {
        let mut config = StackConfig::preset(Tier::Enterprise).slots(slots);
        config.rate_per_minute = rate_per_minute;
        config
    }

    /// A resource-pack account: the given slots per pool (`video`, `image`, `try-on`,
    /// `video:kling-3.0`, …), no request-rate cap; pools not named get the largest given.
    pub fn resource_pack<P: Into<String>>(
        pools: impl IntoIterator<Item = (P, u32)>,
    ) -> StackConfig {
        let mut config = StackConfig::preset(Tier::ResourcePack);
        config.pool_slots.clear();
        for (pool, slots) in pools {
            config.pool_slots.insert(pool.into(), slots);
        }
        if let Some(max) = config.pool_slots.values().copied().max() {
            config.slots = max;
        }
        config
    }

    // ---- setters (API time) ----

    /// Sets the speed factor: rates × `speed`, durations ÷ `speed` (not cumulative).
    pub fn speed(mut self, speed: f64) -> Self {
        self.speed = speed;
        self
    }

    /// Sets the request rate per minute the account allows.
    pub fn rate_per_minute(mut self, per_minute: f64) -> Self {
        self.rate_per_minute = Some(per_minute);
        self
    }

    /// Removes the request-rate cap.
    pub fn no_rate_limit(mut self) -> Self {
        self.rate_per_minute = None;
        self
    }

    /// Sets whether the stack adapts its rate to the account's from the 1302s it meets, under
    /// the configured rate as the ceiling (default: on wherever there is a rate cap). It
    /// starts at the configured rate, so at the account's true rate it paces exactly as
    /// without it; told a rate above the account's, it slows to about the account's rate
    /// after a few 1302s instead of meeting one on every other request. See
    /// [`adapts_rate`](Self::adapts_rate). On without a rate cap is refused by
    /// [`validate`](Self::validate): there is no ceiling to adapt under.
    pub fn adaptive_rate(mut self, on: bool) -> Self {
        self.adaptive_rate = Some(on);
        self
    }

    /// Sets the GCRA burst (1 = evenly spaced requests; at most 65535, and at most 146 years
    /// worth of [pacing intervals](Self::pacing_interval), the rate limiter's longest window).
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    /// Sets the share of the rate left unused (0.05 = pace at 95%), on top of the
    /// [jitter allowance](Self::jitter_allowance).
    pub fn headroom(mut self, headroom: f64) -> Self {
        self.headroom = headroom;
        self
    }

    /// Sets the real-time gap kept beyond the rate's interval between two requests (default
    /// [`DEFAULT_JITTER_ALLOWANCE`]). Not scaled by the speed factor: jitter is not. Under a rate
    /// cap it must stay below the retry deadline at that speed (the default 15 ms fills the
    /// default deadline from speed 40,000): [`validate`](Self::validate) refuses it there.
    pub fn jitter_allowance(mut self, allowance: Duration) -> Self {
        self.jitter_allowance = allowance;
        self
    }

    /// Sets the slots of every pool without its own entry.
    pub fn slots(mut self, slots: u32) -> Self {
        self.slots = slots;
        self
    }

    /// Sets the slots of one pool (`video`, `image`, `try-on`, or `video:kling-3.0`).
    pub fn pool_slots(mut self, pool: impl Into<String>, slots: u32) -> Self {
        self.pool_slots.insert(pool.into(), slots);
        self
    }

    /// Bounds how many creates may wait for a pool's slots (per account; `None`, the default:
    /// unbounded). One more is refused at once with
    /// [`QueueFull`](kling_concurrency::error::QueueFull) and is not sent; `Some(0)` refuses any
    /// create that finds no free slot (for a caller that would rather answer "busy" than wait).
    pub fn slot_queue(mut self, max: Option<usize>) -> Self {
        self.slot_queue = max;
        self
    }

    /// Sets which pool a create counts in: its model version's (`video:kling-3.0`, the default)
    /// or its product's (`video`, shared by every model and the legacy paths), for an account
    /// that counts running tasks per resource-pack type only. See
    /// [`PoolScope`].
    pub fn pool_scope(mut self, scope: PoolScope) -> Self {
        self.pool_scope = scope;
        self
    }

    /// Sets how long a task may hold its slot without news before the slot is reclaimed.
    pub fn task_lease(mut self, lease: Duration) -> Self {
        self.task_lease = lease;
        self
    }

    /// Sets the attempts of one logical call (1 = no retry).
    pub fn retry_max_attempts(mut self, attempts: u32) -> Self {
        self.retry_max_attempts = attempts;
        self
    }

    /// Sets how long one logical call may take, waits and retries included.
    pub fn retry_deadline(mut self, deadline: Duration) -> Self {
        self.retry_deadline = deadline;
        self
    }

    /// Sets the retry budget: retries allowed per first attempt, over a window.
    pub fn retry_budget_ratio(mut self, ratio: f64) -> Self {
        self.retry_budget_ratio = ratio;
        self
    }

    /// Sets the timeout of one attempt (body read included).
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// Sets the largest response body read: at least 1024, at most [`MAX_BODY_BYTES`] (64 MiB),
    /// as each response in flight may buffer that much.
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// Sets a credit budget per period (a day by default).
    pub fn daily_credits(mut self, credits: f64) -> Self {
        self.daily_credits = Some(credits);
        self
    }

    /// Removes the credit budget.
    pub fn no_daily_credits(mut self) -> Self {
        self.daily_credits = None;
        self
    }

    /// Sets the period after which the credit budget starts again (a day).
    pub fn credit_period(mut self, period: Duration) -> Self {
        self.credit_period = period;
        self
    }

    /// Sets the base URL the stack sends to (default Kling's global host,
    /// [`base_url::GLOBAL`](crate::base_url::GLOBAL)): [`base_url::CHINA`](crate::base_url::CHINA),
    /// a proxy or the mock, so that a configuration read from the environment or TOML reaches
    /// them without code. Checked as [`BaseUrlLayer::new`] checks it; a builder's own
    /// [`base_url`](crate::KlingBuilder::base_url) takes its place.
    pub fn base_url(mut self, base: impl Into<String>) -> Self {
        self.base_url = Some(BaseUrlText(base.into()));
        self
    }

    // ---- getters (what the layers enforce) ----

    /// The tier the numbers started from.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// The speed factor.
    pub fn speed_factor(&self) -> f64 {
        self.speed
    }

    /// The account's request rate per minute at this speed (`None`: no cap).
    pub fn account_rate_per_minute(&self) -> Option<f64> {
        self.rate_per_minute.map(|r| r * self.speed)
    }

    /// The rate the stack paces at, at this speed: one request per
    /// [`pacing_interval`](Self::pacing_interval).
    pub fn pacing_rate_per_minute(&self) -> Option<f64> {
        self.pacing_interval().map(|i| 60.0 / i.as_secs_f64())
    }

    /// The least time between two requests' turns, at this speed: the account's interval
    /// (60 s ÷ its rate) less the headroom's share of the rate, plus the jitter allowance.
    pub fn pacing_interval(&self) -> Option<Duration> {
        self.pacing_interval_under(self.headroom)
    }

    /// [`pacing_interval`](Self::pacing_interval) with `headroom` in place of the configured
    /// one.
    fn pacing_interval_under(&self, headroom: f64) -> Option<Duration> {
        let per_minute = self.account_rate_per_minute()? * (1.0 - headroom);
        let interval = Duration::try_from_secs_f64(60.0 / per_minute).ok()?;
        // Saturating: a tiny rate's interval plus an unchecked allowance overflowed and panicked.
        Some(interval.saturating_add(self.jitter_allowance))
    }

    /// Whether the stack adapts its rate ([`adaptive_rate`](Self::adaptive_rate)): as set, or
    /// by default wherever there is a rate cap. Always `false` without one.
    ///
    /// The rule is kling-ratelimit's [`Adaptive`](kling_ratelimit::Adaptive) started at the
    /// [pacing rate](Self::pacing_rate_per_minute), which is also its ceiling: a 1302 lowers
    /// the rate to 85% of where it came, successes climb back towards 97% of that and then
    /// probe upward, never past the ceiling. With the Redis backends the fleet shares the
    /// adaptive rate as it shares the pacing.
    pub fn adapts_rate(&self) -> bool {
        self.rate_per_minute.is_some() && self.adaptive_rate.unwrap_or(true)
    }

    /// The GCRA burst.
    pub fn burst_size(&self) -> u32 {
        self.burst
    }

    /// The headroom under the rate.
    pub fn headroom_share(&self) -> f64 {
        self.headroom
    }

    /// The real-time gap kept beyond the rate's interval (not scaled).
    pub fn jitter_allowance_duration(&self) -> Duration {
        self.jitter_allowance
    }

    /// The slots of pools without their own entry.
    pub fn default_slots(&self) -> u32 {
        self.slots
    }

    /// The pools with their own slot count.
    pub fn pool_slot_overrides(&self) -> impl Iterator<Item = (&str, u32)> + '_ {
        self.pool_slots.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// The slots of a pool: its own entry (`video:kling-3.0`), else its product's (`video`),
    /// else the default.
    pub fn slots_for(&self, pool: &Pool) -> u32 {
        let exact = self.pool_slots.get(pool.to_string().as_str());
        let product = || self.pool_slots.get(pool.product().as_str());
        exact.or_else(product).copied().unwrap_or(self.slots)
    }

    /// How many creates may wait for a pool's slots (`None`: unbounded).
    pub fn slot_queue_limit(&self) -> Option<usize> {
        self.slot_queue
    }

    /// Which pool a create counts in ([`pool_scope`](Self::pool_scope)).
    pub fn slot_pool_scope(&self) -> PoolScope {
        self.pool_scope
    }

    /// The slot lease at this speed.
    pub fn task_lease_duration(&self) -> Duration {
        self.scaled(self.task_lease)
    }

    /// The attempts of one logical call.
    pub fn max_attempts(&self) -> u32 {
        self.retry_max_attempts
    }

    /// The deadline of one logical call at this speed.
    pub fn retry_deadline_duration(&self) -> Duration {
        self.scaled(self.retry_deadline)
    }

    /// The retry budget ratio.
    pub fn retry_budget(&self) -> f64 {
        self.retry_budget_ratio
    }

    /// The timeout of one attempt at this speed.
    pub fn attempt_timeout_duration(&self) -> Duration {
        self.scaled(self.attempt_timeout)
    }

    /// The connect timeout a client under this stack needs (TCP connect and TLS handshake):
    /// a third of the attempt timeout, at most [`MAX_CONNECT_TIMEOUT`]. A connection that does
    /// not open in time then fails as a connect error, never sent, before the attempt times out
    /// as sent with its outcome unknown (a create the slots must then keep). Build the client
    /// with it (`client::https_client_with_connect_timeout`,
    /// `client::ReqwestService::new_client_with_connect_timeout`) when the attempt timeout is
    /// short or the speed factor above 1; the clients' default is 10 s.
    pub fn connect_timeout_duration(&self) -> Duration {
        (self.attempt_timeout_duration() / 3).min(MAX_CONNECT_TIMEOUT)
    }

    /// The largest response body read.
    pub fn body_limit(&self) -> usize {
        self.max_body_bytes
    }

    /// The credit budget per period (`None`: no budget).
    pub fn credit_budget(&self) -> Option<f64> {
        self.daily_credits
    }

    /// The base URL set ([`base_url`](Self::base_url)); `None`: Kling's global host.
    pub fn configured_base_url(&self) -> Option<&str> {
        self.base_url.as_ref().map(|base| base.0.as_str())
    }

    /// The layer of the base URL set, checked as [`validate`](Self::validate) checks it (its
    /// error quoting nothing of one that may hold a secret); `None`: none set.
    pub(crate) fn base_url_layer(&self) -> Option<Result<BaseUrlLayer, ConfigError>> {
        self.base_url.as_ref().map(BaseUrlText::layer)
    }

    /// The credit period at this speed.
    pub fn credit_period_duration(&self) -> Duration {
        self.scaled(self.credit_period)
    }

    /// Divides an API-time duration by the speed factor.
    pub fn scaled(&self, duration: Duration) -> Duration {
        if self.speed.is_finite() && self.speed > 0.0 {
            Duration::try_from_secs_f64(duration.as_secs_f64() / self.speed).unwrap_or(duration)
        } else {
            duration
        }
    }

    /// Checks every number, naming the first impossible one. A duration must be above 0 and at
    /// most a year ([`MAX_DURATION`]) also once divided by the speed factor (the attempt timeout
    /// at least 3 ns, so that its third, the [connect timeout](Self::connect_timeout_duration),
    /// is above 0 too). A rate must allow a request at least every [`MAX_PACING_INTERVAL`]
    /// (about 78 hours) at its [pacing interval](Self::pacing_interval); when the rate alone
    /// would, the error names the `headroom` that leaves too little of it. Under a rate cap the
    /// jitter allowance (real time) must be below the retry deadline (divided by the speed), or
    /// no request the rate limiter queues could meet its deadline. A pool's key must be one a
    /// create can count in, and a base URL one [`BaseUrlLayer::new`] takes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field: &'static str, reason: &'static str| Err(ConfigError::new(field, reason));
        // Beyond these, scaled durations leave what a `Duration` or the clock can hold (a
        // backoff of 1e-18 speed panicked on building the stack).
        if !(MIN_SPEED..=MAX_SPEED).contains(&self.speed) {
            return err("speed", "must be between 0.001 and 1000000");
        }
        if let Some(rate) = self.rate_per_minute
            && !(rate.is_finite() && rate > 0.0)
        {
            return err("rate_per_minute", "must be a finite number above 0");
        }
        if self.adaptive_rate == Some(true) && self.rate_per_minute.is_none() {
            return err(
                "adaptive_rate",
                "needs a rate cap (rate_per_minute): the configured rate is the adaptive rate's \
                 ceiling",
            );
        }
        if self.burst == 0 {
            return err("burst", "must be at least 1");
        }
        if !(self.headroom.is_finite() && (0.0..1.0).contains(&self.headroom)) {
            return err("headroom", "must be at least 0 and below 1");
        }
        // Before the rate checks, which add it to the rate's interval: the field at fault.
        if self.jitter_allowance > MAX_JITTER_ALLOWANCE {
            return Err(ConfigError::new(
                "jitter_allowance_ms",
                format!(
                    "is {:?}, too large: must be at most 10000",
                    self.jitter_allowance.as_secs_f64() * 1000.0
                ),
            ));
        }
        // A rate so small that its interval is beyond a `Duration` would otherwise make
        // `pacing_interval` `None`, which the stack reads as "no cap"; one whose interval is
        // beyond the rate limiter's longest would fail only when the stack is built.
        let too_long = |interval: Option<Duration>| {
            interval.is_none_or(|interval| interval > MAX_PACING_INTERVAL)
        };
        if let Some(rate) = self.rate_per_minute
            && too_long(self.pacing_interval())
        {
            // A rate that would pace with no headroom is refused for its headroom (one near 1
            // leaves almost nothing of it), named so.
            if !too_long(self.pacing_interval_under(0.0)) {
                return Err(ConfigError::new(
                    "headroom",
                    format!(
                        "is {:?}, too close to 1: it leaves {:?} of rate_per_minute {rate:?} at \
                         speed {}, one request every {}; must allow at least one request every \
                         {:?} hours, the rate limiter's longest interval",
                        self.headroom,
                        1.0 - self.headroom,
                        self.speed,
                        self.pacing_interval().map_or_else(
                            || "longer than any Duration".to_owned(),
                            |i| format!("{i:?}")
                        ),
                        MAX_PACING_INTERVAL.as_secs() / 3600,
                    ),
                ));
            }
            return Err(ConfigError::new(
                "rate_per_minute",
                format!(
                    "is {rate:?}, too small: at speed {} (less the headroom, plus the jitter \
                     allowance) that is one request every {}; must allow at least one request \
                     every {:?} hours, the rate limiter's longest interval",
                    self.speed,
                    self.pacing_interval().map_or_else(
                        || "longer than any Duration".to_owned(),
                        |i| format!("{i:?}")
                    ),
                    MAX_PACING_INTERVAL.as_secs() / 3600,
                ),
            ));
        }
        // With no jitter allowance, a rate so large that its interval is under a nanosecond
        // paces at an interval of 0, which no rate limiter takes.
        if let Some(rate) = self.rate_per_minute
            && self.jitter_allowance.is_zero()
        {
            let factor = self.speed * (1.0 - self.headroom);
            let paced = rate * factor;
            if paced > MAX_PACED_PER_MINUTE {
                return Err(ConfigError::new(
                    "rate_per_minute",
                    format!(
                        "is {rate:?}, too large: at speed {} (less the headroom) that is {paced:?} \
                         a minute, one request every {:?}; with no jitter allowance, must be at \
                         most {:?} (one request a nanosecond at this speed)",
                        self.speed,
                        Duration::try_from_secs_f64(60.0 / paced).unwrap_or_default(),
                        MAX_PACED_PER_MINUTE / factor
                    ),
                ));
            }
        }
        if self.burst > MAX_BURST {
            return Err(ConfigError::new(
                "burst",
                format!("is {}, too large: must be at most {MAX_BURST}", self.burst),
            ));
        }
        // The rate limiter keeps a burst window (interval × burst) of at most 2^62 ns: beyond
        // it, the stack would not build, failing with a field no configuration has.
        if let Some(interval) = self.pacing_interval()
            && interval.as_nanos() * u128::from(self.burst) > MAX_BURST_WINDOW_NANOS
        {
            return Err(ConfigError::new(
                "burst",
                format!(
                    "is {}, too large for one request every {interval:?} (rate_per_minute at \
                     speed {}, plus the jitter allowance): the burst times the interval must be \
                     at most 146 years, the rate limiter's longest window",
                    self.burst, self.speed
                ),
            ));
        }
        if self.slots == 0 {
            return err("slots", "must be at least 1");
        }
        for (pool, slots) in &self.pool_slots {
            let Some(parsed) = Pool::parse(pool) else {
                return Err(ConfigError::new(
                    format!("pool_slots.{pool}"),
                    "is not a pool (video, image, try-on, or product:model)",
                ));
            };
            if let Some(model) = parsed.model() {
                model_key_check(parsed.product(), model)
                    .map_err(|reason| ConfigError::new(format!("pool_slots.{pool}"), reason))?;
            }
            if self.pool_scope == PoolScope::Product && parsed.model().is_some() {
                return Err(ConfigError::new(
                    format!("pool_slots.{pool}"),
                    format!(
                        "names a model's pool, which pool_scope product never counts in: set `{}`",
                        parsed.product().as_str()
                    ),
                ));
            }
            if *slots == 0 {
                return Err(ConfigError::new(
                    format!("pool_slots.{pool}"),
                    "must be at least 1",
                ));
            }
        }
        let durations = [
            ("task_lease_secs", self.task_lease),
            ("retry_deadline_secs", self.retry_deadline),
            ("attempt_timeout_secs", self.attempt_timeout),
            ("credit_period_secs", self.credit_period),
        ];
        for (field, duration) in durations {
            if duration.is_zero() {
                return err(field, "must be above 0");
            }
            if duration > MAX_DURATION {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "is {:?} seconds, too large: must be at most a year ({} seconds)",
                        duration.as_secs_f64(),
                        MAX_DURATION.as_secs()
                    ),
                ));
            }
            // Divided by the speed factor, a nanosecond or two rounds to nothing: a zero
            // attempt timeout, lease, deadline or period would end everything at once.
            let scaled = self.scaled(duration);
            if scaled.is_zero() {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "is {:?} seconds, which comes to {scaled:?} at speed {}: must be above 0 \
                         after dividing by the speed",
                        duration.as_secs_f64(),
                        self.speed
                    ),
                ));
            }
            // Below speed 1, the other way: a day at a thousandth of real time is 1000 days
            // (the credit period counts only with a credit budget).
            let used = field != "credit_period_secs" || self.daily_credits.is_some();
            if used && scaled > MAX_DURATION {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "is {:?} seconds, which comes to {:?} seconds at speed {}, too large: must \
                         be at most a year ({} seconds) after dividing by the speed",
                        duration.as_secs_f64(),
                        scaled.as_secs_f64(),
                        self.speed,
                        MAX_DURATION.as_secs()
                    ),
                ));
            }
        }
        // The connect timeout a client needs under this stack is a third of the attempt
        // timeout: it must not round to nothing either.
        let connect = self.connect_timeout_duration();
        if connect.is_zero() {
            return Err(ConfigError::new(
                "attempt_timeout_secs",
                format!(
                    "is {:?} seconds, which comes to {:?} at speed {}, and its third, the connect \
                     timeout, to {connect:?}: must be at least 3 ns after dividing by the speed",
                    self.attempt_timeout.as_secs_f64(),
                    self.attempt_timeout_duration(),
                    self.speed
                ),
            ));
        }
        // The allowance is real time and the deadline shrinks with the speed: past the point
        // where it alone fills the deadline, every request the rate limiter queues fails with
        // "would pass the request's deadline" (about speed 40,000 with the defaults).
        if self.rate_per_minute.is_some() && self.jitter_allowance >= self.retry_deadline_duration()
        {
            return Err(ConfigError::new(
                "jitter_allowance_ms",
                format!(
                    "is {:?}, not below the retry deadline at speed {} ({:?}): a request queued \
                     for the rate would pass its deadline; lower it (it is real time, not scaled \
                     by the speed) or the speed",
                    self.jitter_allowance.as_secs_f64() * 1000.0,
                    self.speed,
                    self.retry_deadline_duration()
                ),
            ));
        }
        if self.retry_max_attempts == 0 {
            return err("retry_max_attempts", "must be at least 1");
        }
        if !(self.retry_budget_ratio.is_finite() && self.retry_budget_ratio >= 0.0) {
            return err("retry_budget_ratio", "must be a finite number, 0 or more");
        }
        if self.max_body_bytes < 1024 {
            return err("max_body_bytes", "must be at least 1024");
        }
        if self.max_body_bytes > MAX_BODY_BYTES {
            return Err(ConfigError::new(
                "max_body_bytes",
                format!(
                    "is {}, too large: must be at most {MAX_BODY_BYTES} (64 MiB)",
                    self.max_body_bytes
                ),
            ));
        }
        if let Some(credits) = self.daily_credits
            && !(credits.is_finite() && credits >= 0.0)
        {
            return err("daily_credits", "must be a finite number, 0 or more");
        }
        // Its errors quote no user info nor query (see `BaseUrlText::layer`).
        if let Some(layer) = self.base_url_layer() {
            layer?;
        }
        Ok(())
    }

    // ---- loading ----

    /// Reads the configuration from `KLING_*` environment variables (see
    /// [`StackConfig::from_lookup`] for the list) and validates it. A variable set to bytes that
    /// are not UTF-8 is refused, naming it, and so is one named as one read here in another
    /// case or unit; one a typing slip away is warned of
    /// ([`check_env_names`](Self::check_env_names)).
    pub fn from_env() -> Result<StackConfig, ConfigError> {
        StackConfig::check_env_names(std::env::vars_os().map(|(name, _)| name))?;
        StackConfig::from_os_lookup(|name| std::env::var_os(name))
    }

    /// Refuses a variable name that is one [`from_lookup`](Self::from_lookup) reads in another
    /// form, naming it and the one meant: in another case (`kling_tier`), or with another unit
    /// or none (`KLING_ATTEMPT_TIMEOUT_MS`, `KLING_TASK_LEASE` for `KLING_TASK_LEASE_SECS`,
    /// `KLING_CREDIT_PERIOD_DAYS`, `KLING_RATE_PER_SECOND`, `KLING_MAX_BODY_KB`).
    /// Read by name alone, such a variable was left unread without a word, and the preset's
    /// number used (TOML refuses an unknown key).
    ///
    /// A name a typing slip away from one read ([`env_name_slips`](Self::env_name_slips):
    /// `KLING_TEIR`, `KLING_SLOT`) is logged as a `WARN` event (target `kling_tower`) and
    /// passes: a program's own name may be one too (`KLING_TIRE`, `KLING_POOL_SCORE`), and no
    /// rule on the letters tells it from a typo, so it must not stop the program. Other names
    /// pass without a word.
    ///
    /// [`from_env`](Self::from_env) checks the environment's names; a caller reading the
    /// variables through [`with_lookup`](Self::with_lookup) passes them
    /// (`std::env::vars_os().map(|(name, _)| name)`).
    pub fn check_env_names<N: AsRef<std::ffi::OsStr>>(
        names: impl IntoIterator<Item = N>,
    ) -> Result<(), ConfigError> {
        for name in names {
            let Some(name) = name.as_ref().to_str() else {
                continue;
            };
            match misread_env_name(name) {
                Some(Misread::Form(meant)) => {
                    return Err(ConfigError::new(
                        name.to_owned(),
                        format!("is not read: did you mean {meant}? (rename it, or unset it)"),
                    ));
                }
                Some(Misread::Slip(meant)) => {
                    tracing::warn!(
                        target: "kling_tower",
                        variable = name,
                        meant = %meant,
                        "{name} is not read: did you mean {meant}? (ignored)"
                    );
                }
                None => {}
            }
        }
        Ok(())
    }

    /// The names a typing slip away from one [`from_lookup`](Self::from_lookup) reads, each
    /// with the one it resembles: two letters swapped (`KLING_TEIR`) or an `S` added or left
    /// out at the end (`KLING_SLOT`); after `KLING_` a name of 10 letters or more also a letter
    /// wrong, missing or added (`KLING_RATE_PER_MINUT`). A short name a letter from one read
    /// is often a word of its own (`KLING_SEED`, `KLING_TIMER`) and a name with a digit one of
    /// its own (`KLING_SLOTS2`): not named. [`check_env_names`](Self::check_env_names) warns
    /// of these; a program that owns no `KLING_*` name of its own may refuse them.
    pub fn env_name_slips<N: AsRef<std::ffi::OsStr>>(
        names: impl IntoIterator<Item = N>,
    ) -> Vec<EnvNameSlip> {
        names
            .into_iter()
            .filter_map(|name| {
                let name = name.as_ref().to_str()?;
                match misread_env_name(name)? {
                    Misread::Slip(meant) => Some(EnvNameSlip {
                        name: name.to_owned(),
                        meant,
                    }),
                    Misread::Form(_) => None,
                }
            })
            .collect()
    }

    /// [`from_lookup`](Self::from_lookup) over values that may not be text: a variable it reads
    /// that is set to bytes that are not UTF-8 is refused, naming it (read as unset, it left the
    /// preset's number in place without a word).
    fn from_os_lookup(
        lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<StackConfig, ConfigError> {
        let unreadable = std::cell::RefCell::new(None);
        let config = StackConfig::from_lookup(|name| match lookup(name)?.into_string() {
            Ok(value) => Some(value),
            Err(_) => {
                unreadable
                    .borrow_mut()
                    .get_or_insert_with(|| name.to_owned());
                None
            }
        });
        match unreadable.into_inner() {
            Some(var) => Err(ConfigError::new(var, "is set but is not valid UTF-8")),
            None => config,
        }
    }

    /// Reads the configuration from variables looked up by name, and validates it.
    ///
    /// `KLING_TIER` picks the preset (default `free`, the numbers every account has); the
    /// others override one number each:
    ///
    /// | variable | field | value |
    /// |---|---|---|
    /// | `KLING_TIER` | tier | `free`, `standard`, `pro`, `enterprise`, `resource-pack` |
    /// | `KLING_SPEED` | speed | 0.001 to 1000000 |
    /// | `KLING_RATE_PER_MINUTE` | rate_per_minute | number, or `none` |
    /// | `KLING_ADAPTIVE_RATE` | adaptive_rate | `true` or `false` (also `on`/`off`, `1`/`0`) |
    /// | `KLING_BURST` | burst | integer, 1 to 65535 |
    /// | `KLING_HEADROOM` | headroom | 0 ≤ x < 1 |
    /// | `KLING_JITTER_ALLOWANCE_MS` | jitter allowance | milliseconds, 0 to 10000 |
    /// | `KLING_SLOTS` | slots | integer ≥ 1 |
    /// | `KLING_POOL_SLOTS` | pool_slots | `video=20,image=9` |
    /// | `KLING_SLOT_QUEUE` | slot_queue | integer, 0 to 4294967295, or `none` |
    /// | `KLING_POOL_SCOPE` | pool_scope | `model` or `product` |
    /// | `KLING_TASK_LEASE_SECS` | task_lease | seconds |
    /// | `KLING_RETRY_MAX_ATTEMPTS` | retry_max_attempts | integer ≥ 1 |
    /// | `KLING_RETRY_DEADLINE_SECS` | retry_deadline | seconds |
    /// | `KLING_RETRY_BUDGET_RATIO` | retry_budget_ratio | number ≥ 0 |
    /// | `KLING_ATTEMPT_TIMEOUT_SECS` | attempt_timeout | seconds |
    /// | `KLING_MAX_BODY_BYTES` | max_body_bytes | integer, 1024 to 67108864 |
    /// | `KLING_DAILY_CREDITS` | daily_credits | number, or `none` |
    /// | `KLING_CREDIT_PERIOD_SECS` | credit_period | seconds |
    /// | `KLING_BASE_URL` | base_url | `https://…` (or `http://` to a loopback host), as [`BaseUrlLayer::new`] takes it |
    ///
    /// A variable that is blank (empty or only spaces: `KLING_TIER=` in a `.env` file, or a
    /// compose file's `${KLING_TIER}` where it is unset) counts as not set, as in
    /// [`Credentials::from_env`](crate::Credentials::from_env). Errors name the variable; a
    /// number no variable set that the others make impossible names its field instead (the
    /// Free tier's `credit_period_secs`, a day, which `KLING_SPEED=0.001` makes 1000 days).
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<StackConfig, ConfigError> {
        let tier = match set(&lookup, "KLING_TIER") {
            Some(name) => name.parse::<Tier>().map_err(|e| e.renamed("KLING_TIER"))?,
            None => Tier::Free,
        };
        StackConfig::preset(tier).with_lookup(lookup)
    }

    /// Overrides this configuration's numbers with the `KLING_*` variables that are set and
    /// not blank (all but `KLING_TIER`), and validates the result.
    ///
    /// `KLING_TIER` is not read: the tier stays this configuration's, the caller's choice (a
    /// TOML `tier`, a command-line `--tier`), whatever the variable says.
    /// [`from_lookup`](Self::from_lookup) is the one that lets `KLING_TIER` pick the preset.
    pub fn with_lookup(
        mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<StackConfig, ConfigError> {
        let get = |var: &'static str| set(&lookup, var).map(|v| (var, v));
        if let Some((var, v)) = get("KLING_SPEED") {
            self.speed = parse_num(var, &v)?;
        }
        if let Some((var, v)) = get("KLING_RATE_PER_MINUTE") {
            self.rate_per_minute = parse_optional(var, &v)?;
        }
        if let Some((var, v)) = get("KLING_ADAPTIVE_RATE") {
            self.adaptive_rate = Some(parse_bool(var, &v)?);
        }
        if let Some((var, v)) = get("KLING_BURST") {
            self.burst = parse_num(var, &v)?;
        }
        if let Some((var, v)) = get("KLING_HEADROOM") {
            self.headroom = parse_num(var, &v)?;
        }
        if let Some((var, v)) = get("KLING_JITTER_ALLOWANCE_MS") {
            self.jitter_allowance = parse_millis(var, &v)?;
        }
        if let Some((var, v)) = get("KLING_SLOTS") {
            self.slots = parse_num(var, &v)?;
        }
        if let Some((var, v)) = get("KLING_POOL_SLOTS") {
            let mut named = std::collections::BTreeSet::new();
            for entry in v.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                let Some((pool, slots)) = entry.split_once('=') else {
                    return Err(ConfigError::new(
                        var,
                        format!("entry `{entry}` is not `pool=slots`"),
                    ));
                };
                // Named as validation names a pool's entry: with several, the one refused.
                let pool = pool.trim();
                let slots = parse_num(var, slots.trim())
                    .map_err(|e| e.renamed(format!("KLING_POOL_SLOTS (pool_slots.{pool})")))?;
                // The last of two values was kept without a word: which one was meant?
                if !named.insert(pool) {
                    return Err(ConfigError::new(
                        var,
                        format!("names pool `{pool}` twice: give each pool once"),
                    ));
                }
                self.pool_slots.insert(pool.to_owned(), slots);
            }
        }
        if let Some((var, v)) = get("KLING_SLOT_QUEUE") {
            // At most `u32::MAX`, as TOML's `slot_queue`.
            self.slot_queue = parse_optional::<u32>(var, &v)?
                .map(|max| usize::try_from(max).unwrap_or(usize::MAX));
        }
        if let Some((var, v)) = get("KLING_POOL_SCOPE") {
            self.pool_scope = v
                .parse()
                .map_err(|e: kling_core::UnknownPoolScope| ConfigError::new(var, e.to_string()))?;
        }
        if let Some((var, v)) = get("KLING_TASK_LEASE_SECS") {
            self.task_lease = parse_secs(var, &v)?;
        }
        if let Some((var, v)) = get("KLING_RETRY_MAX_ATTEMPTS") {
            self.retry_max_attempts = parse_num(var, &v)?;
        }
        if let Some((var, v)) = get("KLING_RETRY_DEADLINE_SECS") {
            self.retry_deadline = parse_secs(var, &v)?;
        }
        if let Some((var, v)) = get("KLING_RETRY_BUDGET_RATIO") {
            self.retry_budget_ratio = parse_num(var, &v)?;
        }
        if let Some((var, v)) = get("KLING_ATTEMPT_TIMEOUT_SECS") {
            self.attempt_timeout = parse_secs(var, &v)?;
        }
        if let Some((var, v)) = get("KLING_MAX_BODY_BYTES") {
            self.max_body_bytes = parse_num(var, &v)?;
        }
        if let Some((var, v)) = get("KLING_DAILY_CREDITS") {
            self.daily_credits = parse_optional(var, &v)?;
        }
        if let Some((var, v)) = get("KLING_CREDIT_PERIOD_SECS") {
            self.credit_period = parse_secs(var, &v)?;
        }
        if let Some((_, v)) = get("KLING_BASE_URL") {
            self.base_url = Some(BaseUrlText(v));
        }
        // Named by its variable where that variable is set; a number the variables left as it
        // was (a preset's credit period that `KLING_SPEED=0.001` stretches past a year) keeps
        // its field's name, rather than sending the reader to a variable they never set.
        self.validate().map_err(|e| match env_var_of(e.field()) {
            Some((var, shown)) if set(&lookup, var).is_some() => e.renamed(shown),
            _ => e,
        })?;
        Ok(self)
    }

    /// Reads a TOML document (see the [module docs](self) for the keys) and validates it.
    ///
    /// `tier` picks the preset (default `free`); the other keys override it. Unknown keys are
    /// refused; errors name the key.
    pub fn from_toml_str(text: &str) -> Result<StackConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        raw.into_config()
    }
}

/// The keys of the TOML document, as [`RawConfig`] names them.
const TOML_KEYS: [&str; 20] = [
    "tier",
    "speed",
    "rate_per_minute",
    "adaptive_rate",
    "burst",
    "headroom",
    "jitter_allowance_ms",
    "slots",
    "pool_slots",
    "slot_queue",
    "pool_scope",
    "task_lease_secs",
    "retry_max_attempts",
    "retry_deadline_secs",
    "retry_budget_ratio",
    "attempt_timeout_secs",
    "max_body_bytes",
    "daily_credits",
    "credit_period_secs",
    "base_url",
];

/// A TOML document [`RawConfig`] refused, as an error naming the key whose value has the wrong
/// type or range (`burst`, `pool_slots.video`): the parser's message names the type expected,
/// not the key. Syntax errors and unknown keys stay `toml` (their message quotes the key).
fn toml_error(text: &str, error: &toml::de::Error) -> ConfigError {
    let message = error.message().to_owned();
    let Ok(table) = toml::from_str::<toml::Table>(text) else {
        // The parser's "duplicate key" names no key (a pool given twice under `[pool_slots]`).
        let key = error.span().and_then(|span| text.get(span));
        if let Some(key) = key.filter(|_| message.contains("duplicate key")) {
            return ConfigError::new(
                "toml",
                format!("{message}: `{}` is given twice", key.trim()),
            );
        }
        return ConfigError::new("toml", message);
    };
    let refused = |key: &str, value: &toml::Value| {
        let one = toml::Table::from_iter([(key.to_owned(), value.clone())]);
        let parsed: Result<RawConfig, _> = one.try_into();
        parsed.is_err()
    };
    for (key, value) in &table {
        if !TOML_KEYS.contains(&key.as_str()) || !refused(key, value) {
            continue;
        }
        if let Some(pools) = value.as_table()
            && let Some((pool, slots)) = pools.iter().find(|(_, slots)| {
                let parsed: Result<u32, _> = (*slots).clone().try_into();
                parsed.is_err()
            })
        {
            return ConfigError::new(format!("pool_slots.{pool}"), out_of_range(slots, message));
        }
        return ConfigError::new(key.clone(), out_of_range(value, message));
    }
    ConfigError::new("toml", message)
}

/// The parser's `message` for a whole number its key's type does not hold ("invalid value:
/// integer `5000000000`, expected u32"), with the reason first: too large, naming the largest,
/// or below 0. Every key of whole numbers holds a `u32` at least.
fn out_of_range(value: &toml::Value, message: String) -> String {
    match value.as_integer() {
        Some(n) if n > i64::from(u32::MAX) && message.contains("u32") => {
            format!(
                "`{n}` is too large: must be at most {} ({message})",
                u32::MAX
            )
        }
        Some(n) if n < 0 => format!("`{n}` is below 0: must be 0 or more ({message})"),
        _ => message,
    }
}

/// The variables [`StackConfig::from_lookup`] reads.
const ENV_VARS: [&str; 20] = [
    "KLING_TIER",
    "KLING_SPEED",
    "KLING_RATE_PER_MINUTE",
    "KLING_ADAPTIVE_RATE",
    "KLING_BURST",
    "KLING_HEADROOM",
    "KLING_JITTER_ALLOWANCE_MS",
    "KLING_SLOTS",
    "KLING_POOL_SLOTS",
    "KLING_SLOT_QUEUE",
    "KLING_POOL_SCOPE",
    "KLING_TASK_LEASE_SECS",
    "KLING_RETRY_MAX_ATTEMPTS",
    "KLING_RETRY_DEADLINE_SECS",
    "KLING_RETRY_BUDGET_RATIO",
    "KLING_ATTEMPT_TIMEOUT_SECS",
    "KLING_MAX_BODY_BYTES",
    "KLING_DAILY_CREDITS",
    "KLING_CREDIT_PERIOD_SECS",
    "KLING_BASE_URL",
];

/// The other variables of this crate (`Credentials::from_env`'s): never a slip.
const CREDENTIAL_VARS: [&str; 3] = ["KLING_API_KEY", "KLING_ACCESS_KEY", "KLING_SECRET_KEY"];

/// Unit suffixes a variable may be written with, its own and others of its kind: of the rate
/// (per minute, second, hour or day), of durations (milliseconds to days) and of the body
/// limit (bytes, KB, MiB, …). The rate's come first: `RATE_PER_MIN` is the rate per minute,
/// not `RATE_PER` in minutes. The rate's and the body limit's own unit with an `S` more or
/// less (`RATE_PER_MINUTES`, `MAX_BODY_BYTE`) is left out: a typing slip, warned of.
const UNIT_SUFFIXES: [&str; 39] = [
    "_PER_MINUTE",
    "_PER_MIN",
    "_PER_M",
    "_PER_SECOND",
    "_PER_SEC",
    "_PER_S",
    "_PER_HOUR",
    "_PER_HR",
    "_PER_H",
    "_PER_DAY",
    "_PER_D",
    "_SECONDS",
    "_SECOND",
    "_SECS",
    "_SEC",
    "_S",
    "_MILLISECONDS",
    "_MILLISECOND",
    "_MILLIS",
    "_MS",
    "_MINUTES",
    "_MINUTE",
    "_MINS",
    "_MIN",
    "_M",
    "_HOURS",
    "_HOUR",
    "_HRS",
    "_HR",
    "_H",
    "_DAYS",
    "_DAY",
    "_D",
    "_BYTES",
    "_KB",
    "_KIB",
    "_MB",
    "_MIB",
    "_K",
];

/// A variable name a typing slip away from one [`StackConfig`] reads
/// ([`StackConfig::env_name_slips`]): warned of, not refused, as it may be a program's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvNameSlip {
    name: String,
    meant: String,
}

impl EnvNameSlip {
    /// The name as set.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name read that it resembles, with its unit for a duration's
    /// (`KLING_TASK_LEASE_SECS (seconds)`).
    pub fn meant(&self) -> &str {
        &self.meant
    }
}

impl fmt::Display for EnvNameSlip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is not read: did you mean {}?", self.name, self.meant)
    }
}

/// How a variable name differs from the one it was most likely meant to be, with that one's
/// unit for a duration's.
enum Misread {
    /// The name read in another case or with another unit (or none): nobody else's. Refused.
    Form(String),
    /// A typing slip of it: maybe a name of its own. Warned of.
    Slip(String),
}

/// How `name` is a slip of a variable read ([`StackConfig::check_env_names`]); `None` for a
/// name read as it is, or one too far from any. Another form of one read wins over a typing
/// slip of another.
fn misread_env_name(name: &str) -> Option<Misread> {
    // A `KLING_` name in any case, no longer than a read one with another unit written out
    // (`KLING_JITTER_ALLOWANCE_MILLISECONDS`, 35): a longer name costs no more than its prefix.
    if !name.get(..6)?.eq_ignore_ascii_case("KLING_") || name.len() > 48 {
        return None;
    }
    let upper = name.to_ascii_uppercase();
    // Windows reads variable names in any case: `Kling_Tier` is `KLING_TIER` there.
    let known = |name: &str| ENV_VARS.contains(&name) || CREDENTIAL_VARS.contains(&name);
    if known(name) || (cfg!(windows) && known(&upper)) {
        return None;
    }
    let rest = &upper["KLING_".len()..];
    // No name read has a digit: `KLING_SLOTS2` is a name of its own, not a slip.
    let numbered = rest.bytes().any(|b| b.is_ascii_digit());
    let stem = |text: &str| -> usize {
        UNIT_SUFFIXES
            .iter()
            .find_map(|unit| text.strip_suffix(unit))
            .map_or(text.len(), str::len)
    };
    let another_form = |var: &&str| {
        let read = &var["KLING_".len()..];
        let (read_stem, rest_stem) = (&read[..stem(read)], &rest[..stem(rest)]);
        *var == upper || (read_stem != read && rest_stem == read_stem)
    };
    let with_unit = |meant: &str| {
        let unit = if meant.ends_with("_SECS") {
            " (seconds)"
        } else if meant.ends_with("_MS") {
            " (milliseconds)"
        } else {
            ""
        };
        format!("{meant}{unit}")
    };
    if let Some(meant) = ENV_VARS.into_iter().find(another_form) {
        return Some(Misread::Form(with_unit(meant)));
    }
    let meant = ENV_VARS
        .into_iter()
        .find(|var| !numbered && typed_slip(rest, &var["KLING_".len()..]))?;
    Some(Misread::Slip(with_unit(meant)))
}

/// Whether `name` is a typing slip of `read`. In a name of under 10 letters one letter more,
/// less or changed is often another word (`SEED`, `SPEND` for `SPEED`; `TIMER` for `TIER`), so
/// only an `S` added or left out at the end (`SLOT`) or two letters side by side swapped
/// (`TEIR`) count; in a longer one, also a letter wrong, missing or added (`RATE_PER_MINUT`).
/// One slip at most, found in one pass (no distance table).
fn typed_slip(name: &str, read: &str) -> bool {
    let (a, b) = (name.as_bytes(), read.as_bytes());
    // Past the letters both start with, the slip is at the first letter left.
    let same = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let (a, b) = (&a[same..], &b[same..]);
    let swapped = a.len() >= 2 && b.len() >= 2 && a[0] == b[1] && a[1] == b[0] && a[2..] == b[2..];
    let added = a.get(1..) == Some(b);
    let missing = b.get(1..) == Some(a);
    if read.len() < 10 {
        return swapped || (added && a == b"S") || (missing && b == b"S");
    }
    swapped || added || missing || a.get(1..) == b.get(1..)
}

/// A variable's value, trimmed; `None` when it is not set or blank (`KLING_TIER=` in a `.env`
/// file, or a compose file's `${KLING_TIER}` where it is unset), as `Credentials::from_env`
/// reads its variables.
fn set(lookup: impl Fn(&str) -> Option<String>, var: &str) -> Option<String> {
    lookup(var)
        .map(|value| value.trim().to_owned())
        .filter(|value| !value.is_empty())
}

/// The variable behind a field name, for errors found by validation after reading variables:
/// the variable, and the name the error shows (a pool's entry: `KLING_POOL_SLOTS
/// (pool_slots.video)`).
fn env_var_of(field: &str) -> Option<(&'static str, Cow<'static, str>)> {
    let var = match field {
        "speed" => "KLING_SPEED",
        "rate_per_minute" => "KLING_RATE_PER_MINUTE",
        "adaptive_rate" => "KLING_ADAPTIVE_RATE",
        "burst" => "KLING_BURST",
        "headroom" => "KLING_HEADROOM",
        "jitter_allowance_ms" => "KLING_JITTER_ALLOWANCE_MS",
        "slots" => "KLING_SLOTS",
        "slot_queue" => "KLING_SLOT_QUEUE",
        "pool_scope" => "KLING_POOL_SCOPE",
        "task_lease_secs" => "KLING_TASK_LEASE_SECS",
        "retry_max_attempts" => "KLING_RETRY_MAX_ATTEMPTS",
        "retry_deadline_secs" => "KLING_RETRY_DEADLINE_SECS",
        "retry_budget_ratio" => "KLING_RETRY_BUDGET_RATIO",
        "attempt_timeout_secs" => "KLING_ATTEMPT_TIMEOUT_SECS",
        "max_body_bytes" => "KLING_MAX_BODY_BYTES",
        "daily_credits" => "KLING_DAILY_CREDITS",
        "credit_period_secs" => "KLING_CREDIT_PERIOD_SECS",
        "base_url" => "KLING_BASE_URL",
        f if f.starts_with("pool_slots") => {
            return Some((
                "KLING_POOL_SLOTS",
                Cow::Owned(format!("KLING_POOL_SLOTS ({f})")),
            ));
        }
        _ => return None,
    };
    Some((var, Cow::Borrowed(var)))
}

/// Why a model pool's key (`video:{model}`) can match no create, if it cannot: the router
/// ([`Route::pool`](kling_core::Route::pool)) keys a new-style create by its path's last
/// segment, with escapes of unreserved characters decoded, `;` parameters and dot segments
/// removed, and its case kept. So a key is refused that differs from the pool a create to
/// `/{product path}/{model}` gets (or has no such path: a space, a `/`, a `?`), and one in
/// capitals: Kling's model names are lowercase and its server compares paths as written, so
/// such a create makes no task. Not normalised: the router does not normalise case or
/// spaces either, and a key quietly rewritten would hide the slip.
fn model_key_check(product: Product, model: &str) -> Result<(), String> {
    let key = format!("{}:{model}", product.as_str());
    if model.chars().any(char::is_whitespace) {
        return Err(format!(
            "has a space in its model `{model}`: a create's model is a path segment, which \
             holds none, so no create counts in `{key}`"
        ));
    }
    // A create path of the product's: the route reads the model the same under any of them.
    // A product none of these names (one added later) has nothing to compare with.
    let product_path = ["text-to-video", "text-to-image", "virtual-try-on"]
        .into_iter()
        .find(|path| Route::of(&Method::POST, &format!("/{path}/m")).product == Some(product));
    let Some(product_path) = product_path else {
        return Ok(());
    };
    let path = format!("/{product_path}/{model}");
    let routed = path
        .parse::<http::Uri>()
        .ok()
        .and_then(|uri| Route::of(&Method::POST, uri.path()).pool());
    let Some(routed) = routed else {
        return Err(format!(
            "is a pool no create counts in: `{model}` is never a create path's model (one path \
             segment, with no `?` or `#`)"
        ));
    };
    let routed_key = routed.to_string();
    if routed_key != key {
        // The key to set is one this check takes: the routed model lowercased too (an
        // escaped capital, `%4Bling`, is routed as `Kling`).
        return Err(match routed.model().map(lowercase_model) {
            Some(lowercase) if routed.model() != Some(lowercase.as_str()) => format!(
                "is a pool no create counts in: a create to `{path}` counts in `{routed_key}`, \
                 and Kling's model names are lowercase; set `{}:{lowercase}`",
                product.as_str(),
            ),
            _ => format!(
                "is a pool no create counts in: a create to `{path}` counts in `{routed_key}`; \
                 set `{routed_key}`"
            ),
        });
    }
    let lowercase = lowercase_model(model);
    if lowercase != model {
        return Err(format!(
            "has capitals in its model: Kling's model names are lowercase and a create path is \
             compared as written, so no create counts in it; set `{}:{lowercase}`",
            product.as_str(),
        ));
    }
    Ok(())
}

/// `model` with its ASCII capitals lowercased, but not the hex digits of an escape (`%3A`),
/// which are no letters of the name.
fn lowercase_model(model: &str) -> String {
    let mut lowercase = String::with_capacity(model.len());
    let mut escape_digits = 0;
    for c in model.chars() {
        if escape_digits > 0 {
            escape_digits -= 1;
            lowercase.push(c);
        } else {
            escape_digits = if c == '%' { 2 } else { 0 };
            lowercase.push(c.to_ascii_lowercase());
        }
    }
    lowercase
}

/// A number type a variable's value is read as, with the largest value it holds.
trait Number: FromStr {
    /// The largest value, as the error for one too large shows it.
    const MAX: &'static str;
    /// The largest value, as a float.
    const MAX_F64: f64;
    /// Whether the type holds whole numbers only.
    const WHOLE: bool;
}

impl Number for u32 {
    const MAX: &'static str = "4294967295";
    const MAX_F64: f64 = u32::MAX as f64;
    const WHOLE: bool = true;
}

impl Number for usize {
    #[cfg(target_pointer_width = "64")]
    const MAX: &'static str = "18446744073709551615";
    #[cfg(not(target_pointer_width = "64"))]
    const MAX: &'static str = "4294967295";
    const MAX_F64: f64 = usize::MAX as f64;
    const WHOLE: bool = true;
}

impl Number for f64 {
    const MAX: &'static str = "1.7976931348623157e308";
    const MAX_F64: f64 = f64::MAX;
    const WHOLE: bool = false;
}

/// A variable's value as a number of type `T`. A value that is a number, but not one `T`
/// holds, is refused with the reason: too large (naming the largest), below 0, or not whole.
fn parse_num<T: Number>(var: &'static str, value: &str) -> Result<T, ConfigError> {
    let refused = |reason: String| Err(ConfigError::new(var, reason));
    let Ok(number) = value.parse::<f64>() else {
        return value
            .parse()
            .or_else(|_| refused(format!("`{value}` is not a valid number here")));
    };
    let spelled_infinite = value
        .trim_start_matches(['+', '-'])
        .to_ascii_lowercase()
        .starts_with("inf");
    if number == f64::INFINITY && !spelled_infinite {
        return refused(format!(
            "`{value}` is too large: must be at most {}",
            T::MAX
        ));
    }
    match value.parse() {
        Ok(parsed) => Ok(parsed),
        Err(_) if !T::WHOLE || number.is_nan() => {
            refused(format!("`{value}` is not a valid number here"))
        }
        Err(_) if number < 0.0 => refused(format!("`{value}` is below 0: must be 0 or more")),
        Err(_) if number.fract() != 0.0 => refused(format!("`{value}` is not a whole number")),
        Err(_) if number > T::MAX_F64 => refused(format!(
            "`{value}` is too large: must be at most {}",
            T::MAX
        )),
        Err(_) => refused(format!("`{value}` is not a whole number written in digits")),
    }
}

/// A variable's value as a switch: `true`/`false`, `on`/`off` or `1`/`0`, in any case.
fn parse_bool(var: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "on" | "1" => Ok(true),
        "false" | "off" | "0" => Ok(false),
        _ => Err(ConfigError::new(
            var,
            format!("`{value}` is not true or false (nor on/off, 1/0)"),
        )),
    }
}

fn parse_optional<T: Number>(var: &'static str, value: &str) -> Result<Option<T>, ConfigError> {
    if value.eq_ignore_ascii_case("none") {
        Ok(None)
    } else {
        parse_num(var, value).map(Some)
    }
}

/// `amount` of `unit`s (`per_second` of them in a second) as a duration: refused as below 0
/// or not a number, or as too large, naming `max`, the most [`StackConfig::validate`]
/// accepts. `shown` is the value as written.
fn to_duration(
    field: &'static str,
    amount: f64,
    shown: &str,
    (unit, per_second, max): (&str, f64, &str),
) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(amount / per_second).map_err(|_| {
        if amount.is_nan() || amount < 0.0 {
            ConfigError::new(field, format!("must be a number of {unit}, 0 or more"))
        } else {
            ConfigError::new(
                field,
                format!("`{shown}` is too large: must be at most {max}"),
            )
        }
    })
}

/// Seconds: at most a year.
const SECONDS: (&str, f64, &str) = ("seconds", 1.0, "31536000 seconds (a year)");
/// Milliseconds of the jitter allowance: at most 10 s.
const MILLISECONDS: (&str, f64, &str) = ("milliseconds", 1000.0, "10000 milliseconds");

/// A float, infinite too (a value beyond any number, `1e400`, is then too large for a
/// duration, naming the duration's largest).
fn parse_float(var: &'static str, value: &str) -> Result<f64, ConfigError> {
    value
        .parse()
        .map_err(|_| ConfigError::new(var, format!("`{value}` is not a valid number here")))
}

fn parse_millis(var: &'static str, value: &str) -> Result<Duration, ConfigError> {
    to_duration(var, parse_float(var, value)?, value, MILLISECONDS)
}

fn parse_secs(var: &'static str, value: &str) -> Result<Duration, ConfigError> {
    to_duration(var, parse_float(var, value)?, value, SECONDS)
}

/// A number, or the word `none`.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrNone {
    Number(f64),
    Word(String),
}

impl NumberOrNone {
    fn into_option(self, field: &'static str) -> Result<Option<f64>, ConfigError> {
        match self {
            NumberOrNone::Number(n) => Ok(Some(n)),
            NumberOrNone::Word(w) if w.eq_ignore_ascii_case("none") => Ok(None),
            NumberOrNone::Word(w) => Err(ConfigError::new(
                field,
                format!("must be a number or \"none\", not \"{w}\""),
            )),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    tier: Option<String>,
    speed: Option<f64>,
    rate_per_minute: Option<NumberOrNone>,
    adaptive_rate: Option<bool>,
    burst: Option<u32>,
    headroom: Option<f64>,
    jitter_allowance_ms: Option<f64>,
    slots: Option<u32>,
    pool_slots: Option<BTreeMap<String, u32>>,
    slot_queue: Option<NumberOrNone>,
    pool_scope: Option<String>,
    task_lease_secs: Option<f64>,
    retry_max_attempts: Option<u32>,
    retry_deadline_secs: Option<f64>,
    retry_budget_ratio: Option<f64>,
    attempt_timeout_secs: Option<f64>,
    max_body_bytes: Option<usize>,
    daily_credits: Option<NumberOrNone>,
    credit_period_secs: Option<f64>,
    base_url: Option<String>,
}

impl RawConfig {
    fn into_config(self) -> Result<StackConfig, ConfigError> {
        let tier = match self.tier {
            Some(name) => name.parse::<Tier>()?,
            None => Tier::Free,
        };
        let mut c = StackConfig::preset(tier);
        let secs = |field: &'static str, secs: f64| {
            to_duration(field, secs, &format!("{secs:?}"), SECONDS)
        };
        if let Some(v) = self.speed {
            c.speed = v;
        }
        if let Some(v) = self.rate_per_minute {
            c.rate_per_minute = v.into_option("rate_per_minute")?;
        }
        if let Some(v) = self.adaptive_rate {
            c.adaptive_rate = Some(v);
        }
        if let Some(v) = self.burst {
            c.burst = v;
        }
        if let Some(v) = self.headroom {
            c.headroom = v;
        }
        if let Some(v) = self.jitter_allowance_ms {
            c.jitter_allowance =
                to_duration("jitter_allowance_ms", v, &format!("{v:?}"), MILLISECONDS)?;
        }
        if let Some(v) = self.slots {
            c.slots = v;
        }
        if let Some(v) = self.pool_slots {
            c.pool_slots.extend(v);
        }
        if let Some(v) = self.slot_queue {
            c.slot_queue = match v.into_option("slot_queue")? {
                None => None,
                Some(n) if n >= 0.0 && n.fract() == 0.0 && n <= u32::MAX as f64 => Some(n as usize),
                Some(n) if n > u32::MAX as f64 => {
                    return Err(ConfigError::new(
                        "slot_queue",
                        format!("is {n:?}, too large: must be at most {}", u32::MAX),
                    ));
                }
                Some(_) => {
                    return Err(ConfigError::new(
                        "slot_queue",
                        "must be a whole number, 0 or more, or \"none\"",
                    ));
                }
            };
        }
        if let Some(v) = self.pool_scope {
            c.pool_scope = v.parse().map_err(|e: kling_core::UnknownPoolScope| {
                ConfigError::new("pool_scope", e.to_string())
            })?;
        }
        if let Some(v) = self.task_lease_secs {
            c.task_lease = secs("task_lease_secs", v)?;
        }
        if let Some(v) = self.retry_max_attempts {
            c.retry_max_attempts = v;
        }
        if let Some(v) = self.retry_deadline_secs {
            c.retry_deadline = secs("retry_deadline_secs", v)?;
        }
        if let Some(v) = self.retry_budget_ratio {
            c.retry_budget_ratio = v;
        }
        if let Some(v) = self.attempt_timeout_secs {
            c.attempt_timeout = secs("attempt_timeout_secs", v)?;
        }
        if let Some(v) = self.max_body_bytes {
            c.max_body_bytes = v;
        }
        if let Some(v) = self.daily_credits {
            c.daily_credits = v.into_option("daily_credits")?;
        }
        if let Some(v) = self.credit_period_secs {
            c.credit_period = secs("credit_period_secs", v)?;
        }
        if let Some(v) = self.base_url {
            c.base_url = Some(BaseUrlText(v));
        }
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::*;

    /// A variable set to bytes that are not UTF-8 (a Latin-1 `.env` file) is refused naming it:
    /// read as unset, it left the preset's number in place without a word.
    #[cfg(unix)]
    #[test]
    fn a_variable_that_is_not_utf8_is_refused_naming_it() {
        use std::os::unix::ffi::OsStringExt;

        let latin1 = |name: &str| {
            (name == "KLING_DAILY_CREDITS").then(|| OsString::from_vec(b"1\xe900".to_vec()))
        };
        let err = StackConfig::from_os_lookup(latin1).unwrap_err();
        assert_eq!(err.field(), "KLING_DAILY_CREDITS");
        assert!(err.reason().contains("UTF-8"), "{err}");

        // The control: the same variable as text is read.
        let text = |name: &str| (name == "KLING_DAILY_CREDITS").then(|| OsString::from("100"));
        let config = StackConfig::from_os_lookup(text).unwrap();
        assert_eq!(config.credit_budget(), Some(100.0));
    }
}
