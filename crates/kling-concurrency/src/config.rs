//! [`SlotsConfig`]: capacities, lease and the 1303 recovery rule.

use std::collections::HashMap;
use std::time::Duration;

use kling_core::{AccountId, Pool};

use crate::error::ConfigError;

/// The default maximum task lifetime: a task nobody follows up frees its slots after this
/// ([`kling_core::DEFAULT_TASK_LEASE`], which the metrics monitor's tracked tasks share).
pub const DEFAULT_LEASE: Duration = kling_core::DEFAULT_TASK_LEASE;

/// The default interval after which one slot hidden by a `1303` is believed free again when no
/// task of ours ended in the meantime (see [`SlotsConfig::recovery_interval`]).
pub const DEFAULT_RECOVERY_INTERVAL: Duration = Duration::from_secs(20);

/// How many times `1303`s in a row double a pool's recovery interval: at most 32 times the
/// configured one (640 s at the default 20 s). See the crate docs' `1303` rule.
pub const MAX_RECOVERY_DOUBLINGS: u32 = 5;

/// The account requests without an [`AccountId`] extension count against.
pub const DEFAULT_ACCOUNT: &str = "default";

/// Configuration of the task-slot limiter.
///
/// Capacity of a pool is looked up, most specific first: the account's own setting for the pool,
/// the setting for the pool, the setting for the pool's product (so `video` also covers
/// `video:kling-3.0` unless that is set), then [`SlotsConfig::new`]'s default.
///
/// ```
/// use std::time::Duration;
/// use kling_concurrency::SlotsConfig;
/// use kling_core::{Pool, Product};
///
/// let config = SlotsConfig::new(5)
///     .pool_capacity(Pool::new(Product::Image), 9)
///     .lease(Duration::from_secs(600));
/// assert!(config.validate().is_ok());
/// assert!(SlotsConfig::new(0).validate().is_err());
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SlotsConfig {
    pub(crate) default_capacity: u32,
    pub(crate) pools: HashMap<Pool, u32>,
    pub(crate) accounts: HashMap<(AccountId, Pool), u32>,
    pub(crate) lease: Duration,
    pub(crate) recovery_interval: Duration,
    pub(crate) default_account: AccountId,
    pub(crate) max_queue: Option<usize>,
}

impl SlotsConfig {
    /// Every pool gets `default_capacity` slots unless set otherwise.
    pub fn new(default_capacity: u32) -> Self {
        SlotsConfig {
            default_capacity,
            pools: HashMap::new(),
            accounts: HashMap::new(),
            lease: DEFAULT_LEASE,
            recovery_interval: DEFAULT_RECOVERY_INTERVAL,
            default_account: AccountId::new(DEFAULT_ACCOUNT),
            max_queue: None,
        }
    }

    /// Sets the capacity of one pool (for every account). A product-wide pool (`video`) also
    /// sets the default of its model pools (`video:kling-3.0`).
    pub fn pool_capacity(mut self, pool: Pool, capacity: u32) -> Self {
        self.pools.insert(pool, capacity);
        self
    }

    /// Sets the capacity of one pool of one account.
    pub fn account_capacity(mut self, account: AccountId, pool: Pool, capacity: u32) -> Self {
        self.accounts.insert((account, pool), capacity);
        self
    }

    /// Sets the maximum task lifetime: slots of a task that no query or callback reports
    /// ended are freed this long after the last sign of life (default [`DEFAULT_LEASE`]).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets how often one slot hidden by a `1303` comes back by itself (default
    /// [`DEFAULT_RECOVERY_INTERVAL`]), doubled for each `1303` in a row at the same level (at
    /// most [`MAX_RECOVERY_DOUBLINGS`] times); see the crate docs for the rule.
    pub fn recovery_interval(mut self, interval: Duration) -> Self {
        self.recovery_interval = interval;
        self
    }

    /// Sets the account of requests that carry no [`AccountId`] (default [`DEFAULT_ACCOUNT`]).
    pub fn default_account(mut self, account: AccountId) -> Self {
        self.default_account = account;
        self
    }

    /// Bounds each pool's queue (per account): while `max` creates wait for its slots, one more
    /// is refused at once with [`QueueFull`](crate::error::QueueFull) instead of waiting, and
    /// is not sent. `0` never waits: a create that finds no free slot is refused (after the
    /// pool's leases that ran out and slots hidden by a `1303` that are due back are counted
    /// free). Unbounded by default (every create waits its turn, and the queue holds each
    /// waiting request).
    pub fn max_queue(mut self, max: usize) -> Self {
        self.max_queue = Some(max);
        self
    }

    /// The configured queue bound ([`max_queue`](Self::max_queue)), for backends outside this
    /// crate; `None` when unbounded.
    pub fn get_max_queue(&self) -> Option<usize> {
        self.max_queue
    }

    /// The capacity configured for `pool` of `account`.
    pub fn capacity_of(&self, account: &AccountId, pool: &Pool) -> u32 {
        if let Some(&n) = self.accounts.get(&(account.clone(), pool.clone())) {
            return n;
        }
        if let Some(&n) = self.pools.get(pool) {
            return n;
        }
        if pool.model().is_some()
            && let Some(&n) = self.pools.get(&Pool::new(pool.product()))
        {
            return n;
        }
        self.default_capacity
    }

    /// The configured lease ([`lease`](Self::lease)), for backends outside this crate.
    pub fn get_lease(&self) -> Duration {
        self.lease
    }

    /// The configured recovery interval ([`recovery_interval`](Self::recovery_interval)), for
    /// backends outside this crate.
    pub fn get_recovery_interval(&self) -> Duration {
        self.recovery_interval
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.default_capacity == 0 {
            return Err(ConfigError::new("default_capacity", "must be at least 1"));
        }
        for (pool, &n) in &self.pools {
            if n == 0 {
                return Err(ConfigError::new(
                    format!("pool_capacity[{pool}]"),
                    "must be at least 1",
                ));
            }
        }
        for ((account, pool), &n) in &self.accounts {
            if n == 0 {
                return Err(ConfigError::new(
                    format!("account_capacity[{account}, {pool}]"),
                    "must be at least 1",
                ));
            }
        }
        if self.lease.is_zero() {
            return Err(ConfigError::new("lease", "must be longer than zero"));
        }
        if self.recovery_interval.is_zero() {
            return Err(ConfigError::new(
                "recovery_interval",
                "must be longer than zero",
            ));
        }
        Ok(())
    }
}
