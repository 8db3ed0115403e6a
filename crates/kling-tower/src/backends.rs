//! Where a [`KlingLayer`](crate::KlingLayer)'s limits live: in this process ([`InProcess`], the
//! default) or in Redis, shared by every process of the account (`Redis`, feature `redis`).
//!
//! Kling's limits are account-wide: as soon as two processes (two workers, a worker and a web
//! app) call with one account, limits kept in each process over-admit — each believes it has
//! the Pro tier's 5 slots — and the account meets 1303s. With `Redis`, the rate limiter and
//! the task slots of every stack built on the same Redis (and key prefix) count under one
//! account, keyed by the stack's [`AccountId`](kling_core::AccountId). Only where the state
//! lives changes: the layers, their order and their numbers stay the same.
//!
//! `KlingBuilder::shared` has an example (feature `redis`);
//! `examples/stack_redis.rs` runs two stacks of one account on one Redis against the mock.

use kling_concurrency::SlotsConfig;
use kling_concurrency::backend::SlotBackend;

use crate::error::ConfigError;
use crate::preset::StackConfig;

/// The backends of a stack's rate limiter ([`GcraLayer`](kling_ratelimit::GcraLayer)) and task
/// slots ([`TaskSlotsLayer`](kling_concurrency::TaskSlotsLayer)), made once per
/// [`KlingBuilder::build`](crate::KlingBuilder::build).
///
/// Implemented by [`InProcess`] and `Redis` (feature `redis`); implement it to keep the
/// limits in another store.
pub trait StackBackends {
    /// The rate limiter's backend.
    type Rate: kling_ratelimit::Backend;
    /// The task slots' backend.
    type Slots: SlotBackend;

    /// Whether the backends hold other accounts' limits too (a store a fleet and a gateway's
    /// stacks share): a stack's snapshot then shows its own account's pools only. In this
    /// process (`false`) they hold only what went through the stack, requests that named
    /// another account included, and its snapshot shows them all.
    const SHARED_ACROSS_ACCOUNTS: bool = false;

    /// The rate limiter's backend for `config` (called only when the preset has a rate cap).
    fn rate_backend(&self, config: &StackConfig) -> Result<Self::Rate, ConfigError>;

    /// The task slots' backend: `slots` has the preset's capacities per pool, lease, 1303
    /// recovery interval and the stack's account.
    fn slots_backend(
        &self,
        slots: &SlotsConfig,
        config: &StackConfig,
    ) -> Result<Self::Slots, ConfigError>;
}

/// The limits in this process (the default): every clone of one
/// [`KlingLayer`](crate::KlingLayer) shares them; another process does not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InProcess;

impl StackBackends for InProcess {
    type Rate = kling_ratelimit::InProcess;
    type Slots = kling_concurrency::backend::InProcess;

    fn rate_backend(&self, _config: &StackConfig) -> Result<Self::Rate, ConfigError> {
        Ok(kling_ratelimit::InProcess::new())
    }

    fn slots_backend(
        &self,
        slots: &SlotsConfig,
        _config: &StackConfig,
    ) -> Result<Self::Slots, ConfigError> {
        kling_concurrency::backend::InProcess::new(slots.clone())
            .map_err(|e| crate::stack::layer_error("slots", e.field(), &e))
    }
}

#[cfg(feature = "redis")]
pub use self::redis::Redis;

#[cfg(feature = "redis")]
mod redis {
    use std::time::Duration;

    use kling_concurrency::SlotsConfig;
    use kling_redis::{
        Connection, DEFAULT_GCRA_PLACE_TTL, DEFAULT_POLL_EVERY, RedisGcra, RedisSlots,
        WhenUnreachable,
    };

    use super::StackBackends;
    use crate::error::ConfigError;
    use crate::preset::StackConfig;

    /// The shortest polling fallback the stack derives from its speed.
    const MIN_POLL_EVERY: Duration = Duration::from_millis(50);

    /// The limits in Redis, shared by every stack (every process) built on the same Redis and
    /// key prefix: [`RedisGcra`] paces the account's requests, [`RedisSlots`] counts its
    /// tasks, both keyed by the stack's [`AccountId`](kling_core::AccountId). Feature `redis`.
    ///
    /// Usually made by [`KlingBuilder::shared`](crate::KlingBuilder::shared); see the
    /// [module docs](super) and kling-redis for what is shared and how time is kept.
    ///
    /// | setting | default |
    /// |---|---|
    /// | [`when_unreachable`](Self::when_unreachable) | [`WhenUnreachable::Wait`]: fail closed by waiting |
    /// | [`retry_every`](Self::retry_every) | kling-redis's 100 ms |
    /// | [`poll_every`](Self::poll_every) | kling-redis's 1 s divided by the preset's speed, at least 50 ms (releases are announced at once; this is the fallback) |
    /// | [`arrival_order`](Self::arrival_order) | on: freed slots and rate cells go to the fleet's waiting requests in the order they began waiting (kling-redis's fleet order); a rate place lasts kling-redis's 500 ms divided by the preset's speed, at least 50 ms |
    /// | [`count_requests`](Self::count_requests) | on: the fleet's requests are counted over the preset's minute, and every process's snapshot and rate warning count them |
    ///
    /// Every stack of the fleet should use the same preset numbers: the capacities a create is
    /// admitted against are the asking stack's.
    ///
    /// # Clone
    ///
    /// Clones share the connection; each [`build`](crate::KlingBuilder::build) makes its own
    /// backends on it.
    #[derive(Clone, Debug)]
    pub struct Redis {
        conn: Connection,
        when_unreachable: WhenUnreachable,
        retry_every: Option<Duration>,
        poll_every: Option<Duration>,
        arrival_order: bool,
        count_requests: bool,
    }

    impl Redis {
        /// The limits in the Redis of `conn` (its key prefix names the fleet).
        pub fn new(conn: Connection) -> Self {
            Redis {
                conn,
                when_unreachable: WhenUnreachable::default(),
                retry_every: None,
                poll_every: None,
                arrival_order: true,
                count_requests: true,
            }
        }

        /// What the rate limiter and the slots do while Redis cannot be reached (default
        /// [`WhenUnreachable::Wait`]); see [`WhenUnreachable`] for the over-admission each
        /// choice allows.
        pub fn when_unreachable(mut self, choice: WhenUnreachable) -> Self {
            self.when_unreachable = choice;
            self
        }

        /// How often a waiting request asks an unreachable Redis again.
        pub fn retry_every(mut self, every: Duration) -> Self {
            self.retry_every = Some(every);
            self
        }

        /// How often a waiting create asks Redis again when no release was announced.
        pub fn poll_every(mut self, every: Duration) -> Self {
            self.poll_every = Some(every);
            self
        }

        /// Whether freed slots and rate cells go to the fleet's waiting requests in the order
        /// they began waiting (default `true`), rather than to whichever process asks Redis first, which lets the process
        /// nearest to Redis starve the others: kling-redis's `RedisSlots::arrival_order` and
        /// `RedisGcra::arrival_order`. Every process of the fleet should choose the same.
        pub fn arrival_order(mut self, on: bool) -> Self {
            self.arrival_order = on;
            self
        }

        /// Whether Redis counts the fleet's requests (default `true`): kling-redis's
        /// `RedisGcra::count_requests`. Off, each process's snapshot and rate warning know only
        /// its own requests again, and one process can drive about 13% more decisions a second
        /// through Redis (kling-redis's bench). Every process of the fleet should choose the
        /// same: the count holds only the requests of those that count.
        pub fn count_requests(mut self, on: bool) -> Self {
            self.count_requests = on;
            self
        }

        /// The connection.
        pub fn connection(&self) -> &Connection {
            &self.conn
        }

        /// The unreachable-Redis choice.
        pub fn get_when_unreachable(&self) -> WhenUnreachable {
            self.when_unreachable
        }
    }

    impl StackBackends for Redis {
        type Rate = RedisGcra;
        type Slots = RedisSlots;

        const SHARED_ACROSS_ACCOUNTS: bool = true;

        fn rate_backend(&self, config: &StackConfig) -> Result<RedisGcra, ConfigError> {
            let mut backend = RedisGcra::new(self.conn.clone())
                .when_unreachable(self.when_unreachable)
                .arrival_order(self.arrival_order)
                .place_ttl(config.scaled(DEFAULT_GCRA_PLACE_TTL).max(MIN_POLL_EVERY))
                // The fleet's requests are counted over the preset's minute, the monitor's
                // window.
                .usage_window(config.scaled(kling_redis::DEFAULT_USAGE_WINDOW))
                .count_requests(self.count_requests);
            if let Some(every) = self.retry_every {
                backend = backend.retry_every(every);
            }
            Ok(backend)
        }

        fn slots_backend(
            &self,
            slots: &SlotsConfig,
            config: &StackConfig,
        ) -> Result<RedisSlots, ConfigError> {
            let poll_every = self
                .poll_every
                .unwrap_or_else(|| config.scaled(DEFAULT_POLL_EVERY).max(MIN_POLL_EVERY));
            let mut backend = RedisSlots::new(self.conn.clone(), slots.clone())
                .map_err(|e| crate::stack::layer_error("redis", e.field(), e))?
                .when_unreachable(self.when_unreachable)
                .poll_every(poll_every)
                .arrival_order(self.arrival_order);
            if let Some(every) = self.retry_every {
                backend = backend.retry_every(every);
            }
            Ok(backend)
        }
    }
}
