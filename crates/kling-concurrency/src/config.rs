//! [`SlotsConfig`]: capacities, lease and the 1303 recovery rule.

use std::collections::HashMap;
use std::time::Duration;

use kling_core::{AccountId, Pool, PoolScope};

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

/// The longest lease and recovery interval [`SlotsConfig::validate`] accepts: a year (as
/// kling-tower's `MAX_DURATION`). Longer ones would overflow the clock when added to it, and
/// no Kling task runs that long.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The account requests without an [`AccountId`] extension count against.
pub const DEFAULT_ACCOUNT: &str = "default";

/// Configuration of the task-slot limiter.
///
/// Capacity of a pool of an account is looked up, most specific first (see
/// [`capacity_of`](Self::capacity_of)): the account's setting for the pool, the account's
/// setting for the pool's product, the setting for the pool, the setting for the pool's product,
/// then [`SlotsConfig::new`]'s default. So a product-wide setting (`video`) also covers its
/// model pools (`video:kling-3.0`) unless they have their own at the same level, and anything
/// set for the account beats anything set for every account. Capacities set at run time
/// ([`SlotsHandle::set_capacity`](crate::SlotsHandle::set_capacity)) take the place of the
/// setting at their level.
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
    pub(crate) pool_scope: PoolScope,
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
            pool_scope: PoolScope::Model,
        }
    }

    /// Sets the capacity of one pool (for every account). A product-wide pool (`video`) also
    /// sets the default of its model pools (`video:kling-3.0`).
    pub fn pool_capacity(mut self, pool: Pool, capacity: u32) -> Self {
        self.pools.insert(pool, capacity);
        self
    }

    /// Sets the capacity of one pool of one account. A product-wide pool (`video`) also sets
    /// the account's model pools (`video:kling-3.0`) unless the account has its own setting
    /// for them.
    pub fn account_capacity(mut self, account: AccountId, pool: Pool, capacity: u32) -> Self {
        self.accounts.insert((account, pool), capacity);
        self
    }

    /// Sets the maximum task lifetime: slots of a task that no query or callback reports
    /// ended are freed this long after the last sign of life (default [`DEFAULT_LEASE`]; at
    /// most a year, as kling-tower's durations).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets how often one slot hidden by a `1303` comes back by itself (default
    /// [`DEFAULT_RECOVERY_INTERVAL`]), doubled for each `1303` in a row at the same level (at
    /// most [`MAX_RECOVERY_DOUBLINGS`] times); see the crate docs for the rule. At most a
    /// year.
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

    /// Sets which pool a create counts in: its model version's (`video:kling-3.0`, the
    /// default) or, with [`PoolScope::Product`], its product's (`video`), so that every model
    /// and legacy path of a product shares one capacity. Kling's pages leave open which an
    /// account has: see [`PoolScope`]. Capacities are looked up for the pool a create counts
    /// in, so under [`PoolScope::Product`] only product-wide settings (`video`) apply, and
    /// [`validate`](Self::validate) refuses a setting for a model's pool.
    pub fn pool_scope(mut self, scope: PoolScope) -> Self {
        self.pool_scope = scope;
        self
    }

    /// The configured pool scope ([`pool_scope`](Self::pool_scope)).
    pub fn get_pool_scope(&self) -> PoolScope {
        self.pool_scope
    }

    /// The configured queue bound ([`max_queue`](Self::max_queue)), for backends outside this
    /// crate; `None` when unbounded.
    pub fn get_max_queue(&self) -> Option<usize> {
        self.max_queue
    }

    /// The capacity configured for `pool` of `account`, looked up most specific first: the
    /// account's setting for `pool`, the account's setting for `pool`'s product (when `pool`
    /// names a model), the setting for `pool`, the setting for its product, the default.
    pub fn capacity_of(&self, account: &AccountId, pool: &Pool) -> u32 {
        let product = pool.model().map(|_| Pool::new(pool.product()));
        let levels = [
            (Some(account), Some(pool)),
            (Some(account), product.as_ref()),
            (None, Some(pool)),
            (None, product.as_ref()),
        ];
        levels
            .into_iter()
            .find_map(|(account, pool)| self.capacity_setting(account, pool?))
            .unwrap_or(self.default_capacity)
    }

    /// The capacity set for exactly `pool` of `account` (`None`: for every account), with no
    /// fallback to the product or the default: for backends outside this crate that interleave
    /// run-time settings with these, level by level, in [`capacity_of`](Self::capacity_of)'s
    /// order.
    pub fn capacity_setting(&self, account: Option<&AccountId>, pool: &Pool) -> Option<u32> {
        match account {
            Some(account) => self.accounts.get(&(account.clone(), pool.clone())).copied(),
            None => self.pools.get(pool).copied(),
        }
    }

    /// The capacity of a pool nothing else is set for ([`SlotsConfig::new`]'s), for backends
    /// outside this crate.
    pub fn get_default_capacity(&self) -> u32 {
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
        if self.pool_scope == PoolScope::Product {
            // A model's pool is never counted in under this scope: its setting would be ignored.
            let pool_field = self
                .pools
                .keys()
                .find(|pool| pool.model().is_some())
                .map(|pool| format!("pool_capacity[{pool}]"));
            let account_field = || {
                self.accounts
                    .keys()
                    .find(|(_, pool)| pool.model().is_some())
                    .map(|(account, pool)| format!("account_capacity[{account}, {pool}]"))
            };
            if let Some(field) = pool_field.or_else(account_field) {
                return Err(ConfigError::new(
                    field,
                    "names a model's pool, which pool_scope product never counts in: set the \
                     product's pool (`video`, `image`)",
                ));
            }
        }
        for (field, duration) in [
            ("lease", self.lease),
            ("recovery_interval", self.recovery_interval),
        ] {
            if duration.is_zero() {
                return Err(ConfigError::new(field, "must be longer than zero"));
            }
            if duration > MAX_DURATION {
                return Err(ConfigError::new(field, "must be at most a year"));
            }
        }
        Ok(())
    }
}
