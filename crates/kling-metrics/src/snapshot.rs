//! [`Snapshot`]: how close the account is to its limits, now, in process.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// What the stack knows about usage right now: the rate quota, each pool's slots, queue
/// depths, 429s by code and finished tasks.
///
/// [`Monitor::snapshot`](crate::Monitor::snapshot) fills the rate usage, the 429 counts and the
/// task counts from what the [`MetricsLayer`](crate::MetricsLayer) saw, then lets every
/// registered [`SnapshotSource`] (the umbrella crate registers the rate limiter's and the task
/// slots' handles) add pools and queues.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Snapshot {
    /// Requests over the last window against the configured quota.
    pub rate: RateUsage,
    /// Slots per pool (from sources).
    pub pools: Vec<PoolUsage>,
    /// Requests waiting per key (from sources).
    pub queues: Vec<QueueDepth>,
    /// Final responses with HTTP 429, by Kling code (`1302`, `1303`, `1102`, …): every
    /// documented code, and the first 32 undocumented codes the process saw. A code Kling
    /// sends with 429 (1100–1102, 1302–1304) counts whatever status it came with; code 0 never
    /// does (a success by its code, its task counted in [`tasks`](Self::tasks)). Final: a
    /// 429 the retry layer retried is not counted (`kling_retries_total` counts those).
    pub rejections: BTreeMap<i64, u64>,
    /// Final 429s with an undocumented code past the first 32 (an upstream's codes are its
    /// input, so the map stays bounded); counted in [`rejections_total`](Self::rejections_total).
    pub rejections_other: u64,
    /// Final 429s that carried no Kling envelope, so no code: a proxy's or gateway's own page
    /// (an HTML "Too Many Requests", say), which the rate limiter also reads as a pause when it
    /// says `Retry-After`. Counted in [`rejections_total`](Self::rejections_total).
    pub rejections_without_code: u64,
    /// Tasks created through the layer and seen to end.
    pub tasks: TaskCounts,
}

impl Snapshot {
    /// The 429 responses of one code (0 for an undocumented code past the first 32, counted in
    /// [`rejections_other`](Self::rejections_other)).
    pub fn rejections_of(&self, code: i64) -> u64 {
        self.rejections.get(&code).copied().unwrap_or(0)
    }

    /// All 429 responses, with a Kling code or without.
    pub fn rejections_total(&self) -> u64 {
        self.rejections.values().sum::<u64>() + self.rejections_other + self.rejections_without_code
    }

    /// The usage of one pool, by pool name (first match over accounts).
    pub fn pool(&self, pool: &str) -> Option<&PoolUsage> {
        self.pools.iter().find(|p| p.pool == pool)
    }
}

/// Requests seen over the last window, and the share of the quota they use.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct RateUsage {
    /// Requests counted over the last `window` (retried attempts included when the retry layer
    /// reports them through [`kling_core::signals::Attempt`]; a create dropped before its
    /// answer when it may have left, see the README's "The `Monitor`").
    pub requests: u64,
    /// The configured quota per `window`, if any.
    pub quota: Option<u32>,
    /// The window (a minute unless configured).
    pub window: Duration,
    /// The requests every process sharing the account's limits sent over the window, when a
    /// source knows (the Redis backends: their shared store counts them); `requests` is this
    /// process's alone.
    pub fleet_requests: Option<u64>,
    /// When the source read `fleet_requests` from the shared store (tokio's clock, so a test
    /// in paused time ages it too); `None` when it was read for this snapshot. The monitor
    /// counts the figure against the quota until it is a window old from this time, not from
    /// the snapshot that showed it; a snapshot taken later leaves it out (this field and
    /// `fleet_requests` are `None`), so [`usage`](Self::usage) no longer counts it either.
    pub fleet_read_at: Option<tokio::time::Instant>,
}

impl RateUsage {
    /// The requests that count against the quota: the fleet's when known, else this
    /// process's (whichever is more: the fleet's figure is as old as its last read).
    pub fn account_requests(&self) -> u64 {
        self.requests.max(self.fleet_requests.unwrap_or(0))
    }

    /// [`account_requests`](Self::account_requests)` / quota` (1.0 = the whole quota), or
    /// `None` without a quota.
    pub fn usage(&self) -> Option<f64> {
        self.quota
            .map(|q| self.account_requests() as f64 / f64::from(q))
    }

    /// The usage in percent.
    pub fn percent(&self) -> Option<f64> {
        self.usage().map(|u| u * 100.0)
    }
}

/// The slots of one pool.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolUsage {
    /// The account, when the source keys pools by account.
    pub account: Option<String>,
    /// The pool name (`video`, `image:kling-v2`, …).
    pub pool: String,
    /// Slots held by running tasks.
    pub in_use: u32,
    /// Slots the pool is believed to have.
    pub capacity: u32,
    /// Creates waiting for a slot.
    pub waiters: u32,
}

impl PoolUsage {
    /// A pool's slots.
    pub fn new(pool: impl Into<String>, in_use: u32, capacity: u32, waiters: u32) -> Self {
        PoolUsage {
            account: None,
            pool: pool.into(),
            in_use,
            capacity,
            waiters,
        }
    }

    /// Sets the account.
    pub fn with_account(mut self, account: impl Into<String>) -> Self {
        self.account = Some(account.into());
        self
    }

    /// `in_use / capacity` (1.0 = full); `None` for a pool of capacity 0.
    pub fn usage(&self) -> Option<f64> {
        (self.capacity > 0).then(|| f64::from(self.in_use) / f64::from(self.capacity))
    }
}

/// Requests queued under one key (an account at the rate limiter, a pool at the slots layer).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueDepth {
    /// The key (`ratelimit:acct-1`, `slots:acct-1:video`, … as the source names it).
    pub key: String,
    /// Requests waiting.
    pub depth: u64,
}

impl QueueDepth {
    /// A queue's depth.
    pub fn new(key: impl Into<String>, depth: u64) -> Self {
        QueueDepth {
            key: key.into(),
            depth,
        }
    }
}

/// Tasks created through the layer, and how they ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskCounts {
    /// Tasks created (successful creates; a create answering a task tracked already is none).
    pub created: u64,
    /// Tasks seen to reach a terminal status.
    pub finished: u64,
    /// Of those, tasks that failed.
    pub failed: u64,
    /// Created tasks still tracked (not yet seen to end).
    pub running: u64,
    /// Created tasks that stopped being tracked with no sign of life for the task lease
    /// ([`MonitorBuilder::task_lease`](crate::MonitorBuilder::task_lease)): nobody followed
    /// them to their end, and the task slots gave their slots back at the same lease.
    pub expired: u64,
    /// Created tasks never tracked, so never seen to end: created while
    /// [`max_tracked_tasks`](crate::MonitorBuilder::max_tracked_tasks) were tracked, or with an
    /// id over 128 bytes (Kling's are 18 to 36). With them the counts add up:
    /// `created == finished + running + expired + untracked`.
    pub untracked: u64,
}

impl TaskCounts {
    /// `failed / finished`, or `None` before any task finished.
    pub fn failure_share(&self) -> Option<f64> {
        (self.finished > 0).then(|| self.failed as f64 / self.finished as f64)
    }
}

/// Something that knows part of the usage picture: the rate limiter's queues, the task slots'
/// pools. Registered with [`Monitor::add_source`](crate::Monitor::add_source).
///
/// Layer crates do not depend on each other, so the umbrella crate implements this for the
/// rate-limit and task-slots handles. A closure `Fn(&mut Snapshot)` is a source too.
///
/// ```
/// use kling_metrics::{Monitor, PoolUsage, Snapshot};
///
/// let monitor = Monitor::builder().build().unwrap();
/// monitor.add_source(|snapshot: &mut Snapshot| {
///     snapshot.pools.push(PoolUsage::new("video", 3, 5, 0));
/// });
/// assert_eq!(monitor.snapshot().pool("video").unwrap().usage(), Some(0.6));
/// ```
pub trait SnapshotSource: Send + Sync + 'static {
    /// Adds what this source knows (pools, queues, more 429s) to `snapshot`.
    ///
    /// It must not wait: a source whose figures take a round trip (a fleet's pools in Redis)
    /// adds those it read last, at its last [`refresh`](SnapshotSource::refresh).
    fn fill(&self, snapshot: &mut Snapshot);

    /// Reads again what takes a round trip, for the next [`fill`](SnapshotSource::fill);
    /// [`Monitor::refreshed_snapshot`](crate::Monitor::refreshed_snapshot) awaits it. A source
    /// whose figures are at hand has nothing to read (the default).
    fn refresh(&self) -> Refresh<'_> {
        Box::pin(std::future::ready(()))
    }
}

/// The future of [`SnapshotSource::refresh`].
pub type Refresh<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

impl<F> SnapshotSource for F
where
    F: Fn(&mut Snapshot) + Send + Sync + 'static,
{
    fn fill(&self, snapshot: &mut Snapshot) {
        self(snapshot)
    }
}

/// What passed the usage threshold.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Resource {
    /// The request-rate quota.
    RateQuota,
    /// A pool's task slots.
    Slots {
        /// The account, when the source said.
        account: Option<String>,
        /// The pool name.
        pool: String,
    },
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::RateQuota => f.write_str("rate quota"),
            Resource::Slots {
                account: Some(account),
                pool,
            } => write!(f, "{pool} slots of account {account}"),
            Resource::Slots {
                account: None,
                pool,
            } => write!(f, "{pool} slots"),
        }
    }
}

/// A usage warning: `resource` passed `threshold` (fractions: 0.8 = 80%).
///
/// Fired once per crossing: it fires again only after usage fell below
/// `threshold − hysteresis` and rose past the threshold again.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct UsageWarning {
    /// What is nearly used up.
    pub resource: Resource,
    /// The usage that crossed the threshold (1.0 = all of it).
    pub usage: f64,
    /// The configured threshold.
    pub threshold: f64,
}

impl fmt::Display for UsageWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at {:.0}% (warning threshold {:.0}%)",
            self.resource,
            self.usage * 100.0,
            self.threshold * 100.0
        )
    }
}
