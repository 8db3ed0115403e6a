//! Configuration of the mock: presets, limits, credentials, faults.
//!
//! Every number the mock enforces lives here so a test can state the exact account it simulates.
//! Durations are given in *API time*; the mock divides them by [`MockConfig::speed`] before use,
//! so a demo at `speed(60.0)` runs a minute of Kling in one second while the numbers still read
//! like Kling's.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The longest duration the mock ever adds to an instant (ten years): keeps `Instant`
/// arithmetic far from overflow whatever the configuration.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// How many accounts open mode keeps by default ([`MockConfig::max_open_accounts`]): far more
/// than any test or bench uses, a few megabytes with tokens of ordinary length.
pub const DEFAULT_MAX_OPEN_ACCOUNTS: usize = 10_000;

/// How long [`crate::MockServer`] waits by default for a request's header
/// ([`MockConfig::header_read_timeout`]): hyper's own default.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The account tiers of the published Kling rate-limit guide.
///
/// | preset | slots per pool | requests / minute | credits |
/// |---|---|---|---|
/// | `Free` | 1 | 10 | 66 a day |
/// | `Standard` | 3 | 30 | unlimited |
/// | `Pro` | 5 | 60 | unlimited |
/// | `Enterprise` | 10 | unlimited | unlimited |
///
/// Every tier answers `/account/costs` at most once a second (Kling asks for no more).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Preset {
    /// 1 slot per pool, 10 requests per minute, 66 credits a day.
    Free,
    /// 3 slots per pool, 30 requests per minute.
    Standard,
    /// 5 slots per pool, 60 requests per minute (the default).
    #[default]
    Pro,
    /// 10 slots per pool, no request-rate limit unless one is set.
    Enterprise,
}

impl Preset {
    /// Slots per pool of this tier.
    pub fn slots(self) -> u32 {
        match self {
            Preset::Free => 1,
            Preset::Standard => 3,
            Preset::Pro => 5,
            Preset::Enterprise => 10,
        }
    }

    /// The request-rate limit of this tier, if it has one.
    pub fn rate_limit(self) -> Option<RateLimit> {
        let per_minute = match self {
            Preset::Free => 10.0,
            Preset::Standard => 30.0,
            Preset::Pro => 60.0,
            Preset::Enterprise => return None,
        };
        Some(RateLimit {
            per_minute,
            burst: 1,
            penalty: false,
        })
    }

    /// The credit budget of this tier (`None` = unlimited).
    pub fn credits(self) -> Option<f64> {
        match self {
            Preset::Free => Some(66.0),
            _ => None,
        }
    }

    /// How often this tier's credit budget comes back in full (API time; `None` = never: a
    /// budget set on a paid tier is a resource pack, spent for good).
    pub fn credit_period(self) -> Option<Duration> {
        match self {
            Preset::Free => Some(Duration::from_secs(24 * 3600)),
            _ => None,
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Preset::Free => "free",
            Preset::Standard => "standard",
            Preset::Pro => "pro",
            Preset::Enterprise => "enterprise",
        })
    }
}

/// The error of parsing a [`Preset`] or a [`RetryAfterMode`] from a string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    what: &'static str,
    input: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown {} `{}`", self.what, self.input)
    }
}

impl std::error::Error for ParseError {}

impl FromStr for Preset {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "free" => Ok(Preset::Free),
            "standard" => Ok(Preset::Standard),
            "pro" => Ok(Preset::Pro),
            "enterprise" => Ok(Preset::Enterprise),
            _ => Err(ParseError {
                what: "preset (expected free, standard, pro or enterprise)",
                input: s.to_owned(),
            }),
        }
    }
}

/// Whether and how 1302 and 1303 responses carry a `Retry-After` header.
///
/// Kling documents none; proxies and a future API may send one, so clients must handle both forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum RetryAfterMode {
    /// No header (what Kling documents).
    #[default]
    None,
    /// Delta seconds: the real wait rounded up, at least 1.
    Seconds,
    /// An HTTP-date (rounded up to the next whole second) plus a `Date` header.
    Date,
}

impl FromStr for RetryAfterMode {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(RetryAfterMode::None),
            "seconds" => Ok(RetryAfterMode::Seconds),
            "date" => Ok(RetryAfterMode::Date),
            _ => Err(ParseError {
                what: "retry-after mode (expected none, seconds or date)",
                input: s.to_owned(),
            }),
        }
    }
}

/// Which pool a new-style create's slots count in.
///
/// Kling counts running tasks per resource-pack type and, per its newer pages, per model
/// version; both readings are served so clients can be tested against either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum PoolScope {
    /// Each model version has its own pool (`video:{model}`, `image:{model}`); legacy
    /// endpoints count in `video`, `image`, `try-on`.
    #[default]
    Model,
    /// Every create of a product counts in the product's pool (`video`, `image`), legacy and
    /// new-style endpoints and every model alike.
    Product,
}

impl FromStr for PoolScope {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "model" => Ok(PoolScope::Model),
            "product" => Ok(PoolScope::Product),
            _ => Err(ParseError {
                what: "pool scope (expected model or product)",
                input: s.to_owned(),
            }),
        }
    }
}

/// A GCRA request-rate limit applied per account to every request.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct RateLimit {
    /// Requests allowed per minute of API time.
    pub per_minute: f64,
    /// Requests allowed back to back (1 = perfectly even spacing).
    pub burst: u32,
    /// Whether a refused request pushes the next allowed time one interval further, which locks
    /// out clients that retry before the advertised time.
    pub penalty: bool,
}

impl RateLimit {
    /// `per_minute` requests per minute, burst 1, no penalty.
    pub fn per_minute(per_minute: f64) -> Self {
        RateLimit {
            per_minute,
            burst: 1,
            penalty: false,
        }
    }
}

/// Account-state switches, and an overload one: each one makes every request fail with its
/// code, of every account when set mock-wide ([`MockConfig::switches`],
/// [`crate::MockKling::set_switches`]), of one account when set for it
/// ([`crate::MockKling::set_account_switches`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Switches {
    /// Account abnormal: 429 code 1100.
    pub abnormal: bool,
    /// Account in arrears: 429 code 1101.
    pub arrears: bool,
    /// Caller refused by the IP whitelist: 429 code 1304.
    pub ip_denied: bool,
    /// The server refuses every request as too fast, whatever the pace (an overload, a burst
    /// lockout): 429 code 1302, with a `Retry-After` of one rate interval (one second without a
    /// rate limit) when [`MockConfig::retry_after`] asks for one, or of the time until the rate
    /// check would admit the request when longer (a running [`MockConfig::rate_lockout`], a
    /// penalty-pushed limit). The rate limit's own state is left as it was. The account states
    /// (1100, 1101, 1304) come first.
    pub throttled: bool,
}

impl Switches {
    /// All off.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the "account abnormal" switch (1100).
    pub fn abnormal(mut self, on: bool) -> Self {
        self.abnormal = on;
        self
    }
    /// Sets the "account in arrears" switch (1101).
    pub fn arrears(mut self, on: bool) -> Self {
        self.arrears = on;
        self
    }
    /// Sets the "IP whitelist deny" switch (1304).
    pub fn ip_denied(mut self, on: bool) -> Self {
        self.ip_denied = on;
        self
    }
    /// Sets the "refuse everything as too fast" switch (1302).
    pub fn throttled(mut self, on: bool) -> Self {
        self.throttled = on;
        self
    }
}

/// Probabilities of injected faults, each drawn per request from the seeded RNG.
///
/// They are drawn in turn (drop, malformed, 5xx, slow, lost answer), each among the requests
/// no earlier one took: with several on, a later one's share of all requests is its rate times
/// the share the earlier ones left. The ghost create is drawn apart, for each create that made
/// its task.
///
/// Whether the request was carried out (for a create: whether its task was made, billed) is
/// what a client cannot tell from what it gets, and must not guess kindly (DESIGN.md fact 6):
///
/// | fault | the request | the client gets |
/// |---|---|---|
/// | [`drop_rate`](Faults::drop_rate) | lost on its way: not carried out, no task | the connection closed, no response |
/// | [`fault_rate`](Faults::fault_rate) | not carried out, no task | 5000 / 5001 / 5002 (HTTP 500 / 503 / 504) |
/// | [`ghost_create_rate`](Faults::ghost_create_rate) | a create carried out: its task made | 5000 / 5002 (HTTP 500 / 504) |
/// | [`slow_rate`](Faults::slow_rate) | carried out on arrival: a create's task made | its answer, after [`slow_delay`](Faults::slow_delay) (or nothing, if it gave up first: the task stays) |
/// | [`malformed_rate`](Faults::malformed_rate) | carried out: a create's task made unless refused | its answer's status and headers, the body cut in half (not JSON) |
/// | [`lost_answer_rate`](Faults::lost_answer_rate) | carried out: a create's task made unless refused | the connection closed, no response |
///
/// Kling says a 5000 or 5002 create "may have happened": `fault_rate` is the case where it did
/// not, `ghost_create_rate` the case where it did. A slow, garbled or lost answer to a create
/// that was refused (no slot, a bad key) carries that refusal: nothing was made.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Faults {
    /// Share of requests answered 5000/5001/5002 (HTTP 500/503/504) without doing anything: a
    /// create makes no task (see [`Faults::ghost_create_rate`] for the 5xx whose task was made).
    pub fault_rate: f64,
    /// Share of successful creates answered 5000 or 5002 (HTTP 500 / 504, in turn by task)
    /// although the task *was* created and billed.
    pub ghost_create_rate: f64,
    /// Share of requests whose connection is dropped without a response, before the server
    /// does anything with them (the request was lost on its way): a create makes no task.
    pub drop_rate: f64,
    /// Share of requests whose answer is lost on its way back: the server handles the request
    /// (a create makes its task, billed; a refusal, early or not, refuses), then drops the
    /// connection without a response, as a timeout or a reset after sending leaves a real
    /// client.
    pub lost_answer_rate: f64,
    /// Share of requests whose answer is sent only [`Faults::slow_delay`] after they arrived.
    /// The request is carried out when it arrives (the rate and slot checks, a create's task
    /// made and billed, its callbacks begun); only the answer waits, and a client that gives up
    /// first (a timeout, a closed connection) leaves the task made. The answer is counted in
    /// [`Stats::responses_by_code`](crate::Stats::responses_by_code) when it is sent, not at
    /// all if the client has gone.
    pub slow_rate: f64,
    /// How long a slow response waits (API time, divided by speed).
    pub slow_delay: Duration,
    /// Share of requests whose answer arrives garbled: the request is carried out (a create
    /// that succeeds makes its task, billed) and its answer keeps its HTTP status and headers,
    /// its body cut to its first half, so not JSON: HTTP 200 for a create that made its task,
    /// the refusal's status (429, 401, ...) for one refused. Counted in
    /// [`Stats::malformed_responses`](crate::Stats::malformed_responses), not by its code.
    pub malformed_rate: f64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            fault_rate: 0.0,
            ghost_create_rate: 0.0,
            drop_rate: 0.0,
            lost_answer_rate: 0.0,
            slow_rate: 0.0,
            slow_delay: Duration::from_secs(30),
            malformed_rate: 0.0,
        }
    }
}

/// One configured API key and the account it belongs to. Its `Debug` hides the key.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApiKey {
    /// The bearer value.
    pub key: String,
    /// The account whose limits the key shares.
    pub account: String,
}

/// The whole configuration of a mock. `Default` is the [`Preset::Pro`] tier.
///
/// Built with chained methods: `MockConfig::preset(Preset::Free).speed(60.0).credits(10.0)`.
/// [`MockConfig::validate`] (called by the constructors) rejects impossible values, naming the
/// field. Its `Debug` (and so [`crate::MockKling`]'s and [`crate::MockServer`]'s) shows
/// `<redacted>` for the API keys, the secret key and the callback secrets.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct MockConfig {
    /// The tier the numbers below started from.
    pub preset: Preset,
    /// Time compression: every duration and window is divided by it.
    pub speed: f64,
    /// Slots of every pool that has no entry in [`MockConfig::pool_slots`].
    pub slots: u32,
    /// Per-pool capacity overrides, keyed by pool name (`video`, `image:kolors-v2`, ...).
    pub pool_slots: BTreeMap<String, u32>,
    /// Whether new-style creates count per model version (the default) or per product.
    pub pool_scope: PoolScope,
    /// The request-rate limit per account, if any.
    pub rate_limit: Option<RateLimit>,
    /// Credit budget per account (`None` = unlimited).
    pub credits: Option<f64>,
    /// How often the credit budget comes back in full (API time), counted in whole periods
    /// from the account's first create; `None` = never (the budget is spent for good). A new
    /// period also lifts the 1102 latch.
    pub credit_period: Option<Duration>,
    /// `/account/costs` queries allowed per second of API time, per account (`None` =
    /// unlimited); more is 429 code 1302. Burst 1.
    pub costs_per_second: Option<f64>,
    /// Whether 1302/1303 carry `Retry-After`.
    pub retry_after: RetryAfterMode,
    /// How long (API time) an account is refused 1302 after a request-rate 1302 (the
    /// account's rate or `/account/costs`'), whatever its pace; every refusal's `Retry-After`
    /// names the time left (the rate limit's own wait if longer). A refusal within it neither lengthens it nor touches the rate
    /// limit's state. `None` (the default): none. Not Kling's documented behaviour: a harsher
    /// server, so a client that ignores `Retry-After` shows (its own pause after a 1302 no
    /// longer covers the wait).
    pub rate_lockout: Option<Duration>,
    /// Shortest task duration (API time).
    pub task_duration_min: Duration,
    /// Longest task duration (API time).
    pub task_duration_max: Duration,
    /// Share of tasks that end `failed`.
    pub failure_rate: f64,
    /// Accepted API keys; empty = any bearer accepted (unless access/secret keys are set).
    pub api_keys: Vec<ApiKey>,
    /// Account used for keys added with [`MockConfig::api_key`] and for JWTs.
    pub account: Option<String>,
    /// Legacy access key (JWT `iss`).
    pub access_key: Option<String>,
    /// Legacy secret key (JWT HS256 key).
    pub secret_key: Option<String>,
    /// Seconds added to the real clock when checking JWT `nbf`/`exp` (simulates server skew).
    pub clock_offset_secs: i64,
    /// Model names that get 403 code 1103.
    pub forbidden_models: Vec<String>,
    /// The models a new-style create (`/{product}/{model}`) may name; any other gets 404 code
    /// 1203 ("resource or model not found"). `None` (the default): every model exists. Legacy
    /// creates, whose model is in the body, are not checked.
    pub known_models: Option<Vec<String>>,
    /// Standard-Webhooks secret for signing callbacks (`whsec_<base64>` or raw).
    pub callback_secret: Option<String>,
    /// More secrets that sign every callback beside [`MockConfig::callback_secret`], as during
    /// a key rotation: `webhook-signature` carries one `v1,<base64>` per secret, the main
    /// secret's first, separated by spaces. Unused without `callback_secret`.
    pub callback_rotated_secrets: Vec<String>,
    /// Account-state switches at start.
    pub switches: Switches,
    /// Injected faults.
    pub faults: Faults,
    /// Seed of the RNG behind faults, durations and failures.
    pub seed: u64,
    /// Largest accepted request body in bytes; larger gets 400 code 1200, after the fault draw
    /// every request meets (over TCP too, where the server stops reading at the bound).
    pub max_body_bytes: usize,
    /// TCP port of [`crate::MockServer::start`] on 127.0.0.1 (0 = a free port).
    pub port: u16,
    /// The most accounts open mode (no API key nor access key configured: every bearer its
    /// own account) keeps, so a long-running mock fed ever new tokens stays bounded. A new
    /// token beyond it makes the mock forget the least recently seen idle account (no task
    /// running, no occupation, no switches of its own, rate limits at rest): its task list,
    /// external ids and credits go, its tasks stay queryable by task id, and it comes back as
    /// a fresh account. When none is idle the new token gets HTTP 503 code 5001 until one is.
    /// Default [`DEFAULT_MAX_OPEN_ACCOUNTS`].
    pub max_open_accounts: usize,
    /// How long [`crate::MockServer`] waits for the whole header of a request once it waits
    /// for one (an idle keep-alive connection included), and then as long again for its body,
    /// before it closes the connection without an answer, so a client that sends half a header
    /// or half a body holds no connection for good. Real time, not divided by
    /// the speed (it is network time). `None`: no limit. Default
    /// [`DEFAULT_HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Option<Duration>,
    /// Base of result URLs (`{base}/{task_id}/{index}.{ext}`). `None`: a non-resolvable
    /// `https://mock.klingai.invalid/outputs`, except under [`crate::MockServer::start`], which
    /// points them at its own `GET /__mock/files/...` so results can be downloaded.
    pub files_base_url: Option<String>,
}

/// What `Debug` shows of a secret.
const REDACTED: &str = "<redacted>";

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("key", &REDACTED)
            .field("account", &self.account)
            .finish()
    }
}

impl fmt::Debug for MockConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |secret: &Option<String>| secret.as_ref().map(|_| REDACTED);
        f.debug_struct("MockConfig")
            .field("preset", &self.preset)
            .field("speed", &self.speed)
            .field("slots", &self.slots)
            .field("pool_slots", &self.pool_slots)
            .field("pool_scope", &self.pool_scope)
            .field("rate_limit", &self.rate_limit)
            .field("credits", &self.credits)
            .field("credit_period", &self.credit_period)
            .field("costs_per_second", &self.costs_per_second)
            .field("retry_after", &self.retry_after)
            .field("rate_lockout", &self.rate_lockout)
            .field("task_duration_min", &self.task_duration_min)
            .field("task_duration_max", &self.task_duration_max)
            .field("failure_rate", &self.failure_rate)
            .field("api_keys", &self.api_keys)
            .field("account", &self.account)
            .field("access_key", &self.access_key)
            .field("secret_key", &redacted(&self.secret_key))
            .field("clock_offset_secs", &self.clock_offset_secs)
            .field("forbidden_models", &self.forbidden_models)
            .field("known_models", &self.known_models)
            .field("callback_secret", &redacted(&self.callback_secret))
            .field(
                "callback_rotated_secrets",
                &vec![REDACTED; self.callback_rotated_secrets.len()],
            )
            .field("switches", &self.switches)
            .field("faults", &self.faults)
            .field("seed", &self.seed)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("port", &self.port)
            .field("max_open_accounts", &self.max_open_accounts)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("files_base_url", &self.files_base_url)
            .finish()
    }
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig::preset(Preset::Pro)
    }
}

impl MockConfig {
    /// The configuration of a tier, everything else at its default.
    pub fn preset(preset: Preset) -> Self {
        MockConfig {
            preset,
            speed: 1.0,
            slots: preset.slots(),
            pool_slots: BTreeMap::new(),
            pool_scope: PoolScope::Model,
            rate_limit: preset.rate_limit(),
            credits: preset.credits(),
            credit_period: preset.credit_period(),
            costs_per_second: Some(1.0),
            retry_after: RetryAfterMode::None,
            rate_lockout: None,
            task_duration_min: Duration::from_secs(60),
            task_duration_max: Duration::from_secs(120),
            failure_rate: 0.0,
            api_keys: Vec::new(),
            account: None,
            access_key: None,
            secret_key: None,
            clock_offset_secs: 0,
            forbidden_models: Vec::new(),
            known_models: None,
            callback_secret: None,
            callback_rotated_secrets: Vec::new(),
            switches: Switches::default(),
            faults: Faults::default(),
            seed: 0x006b_6c69_6e67,
            max_body_bytes: 10 * 1024 * 1024,
            port: 0,
            max_open_accounts: DEFAULT_MAX_OPEN_ACCOUNTS,
            header_read_timeout: Some(DEFAULT_HEADER_READ_TIMEOUT),
            files_base_url: None,
        }
    }

    /// Sets the speed factor.
    pub fn speed(mut self, speed: f64) -> Self {
        self.speed = speed;
        self
    }
    /// Sets the slots of every pool without an override.
    pub fn slots(mut self, slots: u32) -> Self {
        self.slots = slots;
        self
    }
    /// Overrides the capacity of one pool.
    pub fn pool_slots(mut self, pool: impl Into<String>, slots: u32) -> Self {
        self.pool_slots.insert(pool.into(), slots);
        self
    }
    /// Sets which pool a new-style create counts in: its model's or its product's.
    pub fn pool_scope(mut self, scope: PoolScope) -> Self {
        self.pool_scope = scope;
        self
    }
    /// Sets the request-rate limit (`None` = unlimited).
    pub fn rate_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.rate_limit = limit;
        self
    }
    /// Sets requests per minute, keeping burst and penalty (burst 1 if there was no limit).
    pub fn rate_per_minute(mut self, per_minute: f64) -> Self {
        let mut limit = self
            .rate_limit
            .unwrap_or_else(|| RateLimit::per_minute(per_minute));
        limit.per_minute = per_minute;
        self.rate_limit = Some(limit);
        self
    }
    /// Removes the request-rate limit.
    pub fn no_rate_limit(mut self) -> Self {
        self.rate_limit = None;
        self
    }
    /// Sets the GCRA burst (has no effect without a rate limit).
    pub fn burst(mut self, burst: u32) -> Self {
        if let Some(limit) = self.rate_limit.as_mut() {
            limit.burst = burst;
        }
        self
    }
    /// Turns the penalty mode on or off (has no effect without a rate limit).
    pub fn penalty(mut self, on: bool) -> Self {
        if let Some(limit) = self.rate_limit.as_mut() {
            limit.penalty = on;
        }
        self
    }
    /// Sets a credit budget per account.
    pub fn credits(mut self, credits: f64) -> Self {
        self.credits = Some(credits);
        self
    }
    /// Removes the credit budget.
    pub fn unlimited_credits(mut self) -> Self {
        self.credits = None;
        self
    }
    /// Gives the credit budget back in full every `period` of API time (see
    /// [`MockConfig::credit_period`]).
    pub fn credit_period(mut self, period: Duration) -> Self {
        self.credit_period = Some(period);
        self
    }
    /// Makes the credit budget last for good: once spent, every create gets 1102.
    pub fn lifetime_credits(mut self) -> Self {
        self.credit_period = None;
        self
    }
    /// Sets how many `/account/costs` queries an account may send per second of API time.
    pub fn costs_per_second(mut self, per_second: f64) -> Self {
        self.costs_per_second = Some(per_second);
        self
    }
    /// Removes the `/account/costs` limit (every request still counts against
    /// [`MockConfig::rate_limit`]).
    pub fn no_costs_limit(mut self) -> Self {
        self.costs_per_second = None;
        self
    }
    /// Sets the `Retry-After` mode.
    pub fn retry_after(mut self, mode: RetryAfterMode) -> Self {
        self.retry_after = mode;
        self
    }
    /// Sets a lockout after a request-rate 1302 (API time; see [`MockConfig::rate_lockout`]).
    pub fn rate_lockout(mut self, lockout: Duration) -> Self {
        self.rate_lockout = Some(lockout);
        self
    }
    /// Removes the lockout after a 1302 (the default).
    pub fn no_rate_lockout(mut self) -> Self {
        self.rate_lockout = None;
        self
    }
    /// Sets the range task durations are drawn from (API time).
    ///
    /// `(0, 0)` is allowed: after the speed factor a task lasts at least 1 µs of real time, so
    /// a create is still answered `submitted` (as Kling's always are) and the task ends just
    /// after.
    pub fn task_duration(mut self, min: Duration, max: Duration) -> Self {
        self.task_duration_min = min;
        self.task_duration_max = max;
        self
    }
    /// Sets the share of tasks that fail.
    pub fn failure_rate(mut self, rate: f64) -> Self {
        self.failure_rate = rate;
        self
    }
    /// Accepts an API key belonging to the configured account (see [`MockConfig::account`]).
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        let account = self.default_account();
        self.api_keys.push(ApiKey {
            key: key.into(),
            account,
        });
        self
    }
    /// Accepts an API key belonging to the named account.
    pub fn api_key_for(mut self, key: impl Into<String>, account: impl Into<String>) -> Self {
        self.api_keys.push(ApiKey {
            key: key.into(),
            account: account.into(),
        });
        self
    }
    /// Names the account of configured credentials (default: the access key, else `default`).
    pub fn account(mut self, account: impl Into<String>) -> Self {
        let account = account.into();
        let old = self.default_account();
        for key in &mut self.api_keys {
            if key.account == old {
                key.account.clone_from(&account);
            }
        }
        self.account = Some(account);
        self
    }
    /// Configures the legacy access key + secret key (JWT auth). Legacy endpoints only: a JWT on
    /// a new-style endpoint (`/{product}/{model}`, `/tasks`) is 401 code 1000, as KLING_API.md
    /// gives the API key as their only option.
    pub fn access_key(
        mut self,
        access_key: impl Into<String>,
        secret_key: impl Into<String>,
    ) -> Self {
        let old = self.default_account();
        self.access_key = Some(access_key.into());
        self.secret_key = Some(secret_key.into());
        let new = self.default_account();
        for key in &mut self.api_keys {
            if key.account == old {
                key.account.clone_from(&new);
            }
        }
        self
    }
    /// Shifts the clock JWTs are checked against.
    pub fn clock_offset_secs(mut self, secs: i64) -> Self {
        self.clock_offset_secs = secs;
        self
    }
    /// Makes a model name answer 403 code 1103.
    pub fn forbid_model(mut self, model: impl Into<String>) -> Self {
        self.forbidden_models.push(model.into());
        self
    }
    /// Adds a model to [`MockConfig::known_models`]: once one is added, a new-style create of
    /// any model not added gets 404 code 1203.
    pub fn known_model(mut self, model: impl Into<String>) -> Self {
        self.known_models
            .get_or_insert_with(Vec::new)
            .push(model.into());
        self
    }
    /// Lets a new-style create name any model again (the default).
    pub fn any_model(mut self) -> Self {
        self.known_models = None;
        self
    }
    /// Signs callbacks with this Standard-Webhooks secret.
    pub fn callback_secret(mut self, secret: impl Into<String>) -> Self {
        self.callback_secret = Some(secret.into());
        self
    }
    /// Adds a secret that signs every callback too, as during a key rotation (see
    /// [`MockConfig::callback_rotated_secrets`]).
    pub fn callback_rotated_secret(mut self, secret: impl Into<String>) -> Self {
        self.callback_rotated_secrets.push(secret.into());
        self
    }
    /// Sets the account-state switches.
    pub fn switches(mut self, switches: Switches) -> Self {
        self.switches = switches;
        self
    }
    /// Sets all fault probabilities at once.
    pub fn faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }
    /// Share of requests answered 5000/5001/5002 without being carried out (a create makes no
    /// task).
    pub fn fault_rate(mut self, rate: f64) -> Self {
        self.faults.fault_rate = rate;
        self
    }
    /// Share of creates answered 5000 or 5002 (in turn) although the task was created.
    pub fn ghost_create_rate(mut self, rate: f64) -> Self {
        self.faults.ghost_create_rate = rate;
        self
    }
    /// Share of requests whose connection is dropped before they are carried out (a create
    /// makes no task).
    pub fn drop_rate(mut self, rate: f64) -> Self {
        self.faults.drop_rate = rate;
        self
    }
    /// Share of requests handled (a create makes its task, a refusal refuses) whose answer is
    /// then lost: the connection is dropped without a response.
    pub fn lost_answer_rate(mut self, rate: f64) -> Self {
        self.faults.lost_answer_rate = rate;
        self
    }
    /// Share of requests answered after `delay` (API time), carried out when they arrive (a
    /// create makes its task then, however long the client waits for the answer).
    pub fn slow(mut self, rate: f64, delay: Duration) -> Self {
        self.faults.slow_rate = rate;
        self.faults.slow_delay = delay;
        self
    }
    /// Share of requests carried out (a create that succeeds makes its task) whose answer keeps
    /// its status and has its body garbled (cut in half, not JSON).
    pub fn malformed_rate(mut self, rate: f64) -> Self {
        self.faults.malformed_rate = rate;
        self
    }
    /// Seeds the RNG.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Sets the request-body limit in bytes.
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// Sets the TCP port of [`crate::MockServer::start`] (0 = a free port).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Sets how many accounts open mode keeps (see [`MockConfig::max_open_accounts`]).
    pub fn max_open_accounts(mut self, accounts: usize) -> Self {
        self.max_open_accounts = accounts;
        self
    }

    /// Sets how long the server waits for a request's header (see
    /// [`MockConfig::header_read_timeout`]; `None`: no limit).
    pub fn header_read_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.header_read_timeout = timeout.into();
        self
    }

    /// Sets the base of result URLs (see [`MockConfig::files_base_url`]).
    pub fn files_base_url(mut self, base: impl Into<String>) -> Self {
        self.files_base_url = Some(base.into().trim_end_matches('/').to_owned());
        self
    }

    /// The account configured credentials belong to.
    pub fn default_account(&self) -> String {
        self.account
            .clone()
            .or_else(|| self.access_key.clone())
            .unwrap_or_else(|| "default".to_owned())
    }

    /// Whether no credentials are configured, so every bearer is an account of its own.
    pub(crate) fn is_open(&self) -> bool {
        self.api_keys.is_empty() && self.access_key.is_none()
    }

    /// The capacity of a pool: its own override, else its product's (`video:kling-3.0` takes
    /// `video`'s: slots count per pack type, and a model's pool is one of its type), else
    /// [`MockConfig::slots`].
    pub fn capacity(&self, pool: &str) -> u32 {
        self.pool_slots
            .get(pool)
            .or_else(|| {
                pool.split_once(':')
                    .and_then(|(product, _)| self.pool_slots.get(product))
            })
            .copied()
            .unwrap_or(self.slots)
    }

    /// Checks every field, naming the first one that is impossible.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field: &'static str, reason: &'static str| Err(ConfigError { field, reason });
        if !(self.speed.is_finite() && self.speed > 0.0) {
            return err("speed", "must be a finite number above 0");
        }
        if let Some(limit) = &self.rate_limit {
            if !(limit.per_minute.is_finite() && limit.per_minute > 0.0) {
                return err("rate_limit.per_minute", "must be a finite number above 0");
            }
            if limit.burst == 0 {
                return err("rate_limit.burst", "must be at least 1");
            }
        }
        if let Some(credits) = self.credits
            && !(credits.is_finite() && credits >= 0.0)
        {
            return err("credits", "must be a finite number, 0 or more");
        }
        if self.credit_period.is_some_and(|p| p.is_zero()) {
            return err("credit_period", "must be above 0");
        }
        if let Some(per_second) = self.costs_per_second
            && !(per_second.is_finite() && per_second > 0.0)
        {
            return err("costs_per_second", "must be a finite number above 0");
        }
        if let Some(lockout) = self.rate_lockout
            && !(Duration::ZERO < lockout && lockout <= MAX_WAIT)
        {
            return err(
                "rate_lockout",
                "must be above 0 and at most ten years (None: no lockout)",
            );
        }
        if self.pool_scope == PoolScope::Product && self.pool_slots.keys().any(|p| p.contains(':'))
        {
            return err(
                "pool_slots",
                "names a model's pool, which pool scope product never counts in",
            );
        }
        if self.task_duration_min > self.task_duration_max {
            return err("task_duration_min", "must not exceed task_duration_max");
        }
        if self.task_duration_max > Duration::from_secs(365 * 24 * 3600) {
            return err("task_duration_max", "must be at most a year");
        }
        if self.faults.slow_delay > Duration::from_secs(24 * 3600) {
            return err("faults.slow_delay", "must be at most a day");
        }
        let rates = [
            ("failure_rate", self.failure_rate),
            ("faults.fault_rate", self.faults.fault_rate),
            ("faults.ghost_create_rate", self.faults.ghost_create_rate),
            ("faults.drop_rate", self.faults.drop_rate),
            ("faults.lost_answer_rate", self.faults.lost_answer_rate),
            ("faults.slow_rate", self.faults.slow_rate),
            ("faults.malformed_rate", self.faults.malformed_rate),
        ];
        for (field, rate) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return err(field, "must be a probability between 0 and 1");
            }
        }
        if self.max_open_accounts == 0 {
            return err("max_open_accounts", "must be at least 1");
        }
        if let Some(timeout) = self.header_read_timeout
            && !(Duration::ZERO < timeout && timeout <= MAX_WAIT)
        {
            return err(
                "header_read_timeout",
                "must be above 0 and at most ten years (None: no limit)",
            );
        }
        if self.access_key.is_some() != self.secret_key.is_some() {
            return err("secret_key", "access_key and secret_key go together");
        }
        Ok(())
    }

    /// Divides an API-time duration by the speed factor.
    ///
    /// Capped at ten years so that adding it to an `Instant` can never overflow.
    pub(crate) fn scaled(&self, d: Duration) -> Duration {
        self.scaled_secs(d.as_secs_f64())
    }

    /// The credit period ([`MockConfig::credit_period`]) divided by the speed factor.
    pub(crate) fn scaled_credit_period(&self) -> Option<Duration> {
        self.credit_period.map(|p| self.scaled(p))
    }

    /// Like [`MockConfig::scaled`], from seconds of API time.
    pub(crate) fn scaled_secs(&self, secs: f64) -> Duration {
        Duration::try_from_secs_f64(secs / self.speed)
            .unwrap_or(MAX_WAIT)
            .min(MAX_WAIT)
    }
}

/// An impossible configuration value, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    field: &'static str,
    reason: &'static str,
}

impl ConfigError {
    /// The offending field.
    pub fn field(&self) -> &'static str {
        self.field
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid mock configuration: `{}` {}",
            self.field, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

impl From<ConfigError> for std::io::Error {
    fn from(e: ConfigError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
    }
}
