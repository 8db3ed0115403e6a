//! [`Monitor`]: the in-process usage state behind [`Snapshot`] and the usage warnings.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use kling_core::metrics::{LABEL_POOL, LABEL_STATUS, TASK_LIFETIME, TASKS_FINISHED};
use kling_core::{Outcome, TaskStatus};
use metrics::SharedString;
use tokio::time::Instant;

use crate::error::ConfigError;
use crate::labels;
use crate::snapshot::{RateUsage, Resource, Snapshot, SnapshotSource, TaskCounts, UsageWarning};

/// The default usage threshold of warnings: 80%.
pub const DEFAULT_USAGE_THRESHOLD: f64 = 0.8;
/// The default hysteresis: after a warning at 80%, the next fires once usage fell below 75%.
pub const DEFAULT_HYSTERESIS: f64 = 0.05;
/// The default number of created tasks tracked for their lifetime at once.
pub const DEFAULT_MAX_TRACKED_TASKS: usize = 100_000;

type Hook = Arc<dyn Fn(&UsageWarning) + Send + Sync>;

/// Builds a [`Monitor`]: the rate quota to measure usage against, the warning threshold and
/// the warning hook.
#[must_use]
pub struct MonitorBuilder {
    threshold: f64,
    hysteresis: f64,
    quota: Option<(u32, Duration)>,
    window: Duration,
    hook: Option<Hook>,
    max_tracked_tasks: usize,
    record_task_metrics: bool,
}

impl fmt::Debug for MonitorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MonitorBuilder")
            .field("threshold", &self.threshold)
            .field("hysteresis", &self.hysteresis)
            .field("quota", &self.quota)
            .field("window", &self.window)
            .field("hook", &self.hook.is_some())
            .field("max_tracked_tasks", &self.max_tracked_tasks)
            .field("record_task_metrics", &self.record_task_metrics)
            .finish()
    }
}

impl MonitorBuilder {
    fn new() -> Self {
        MonitorBuilder {
            threshold: DEFAULT_USAGE_THRESHOLD,
            hysteresis: DEFAULT_HYSTERESIS,
            quota: None,
            window: Duration::from_secs(60),
            hook: None,
            max_tracked_tasks: DEFAULT_MAX_TRACKED_TASKS,
            record_task_metrics: false,
        }
    }

    /// The account's request quota: `requests` per `per` (e.g. `60` per minute on the Pro
    /// tier). Usage is measured over a sliding window of length `per`, in 60 steps.
    pub fn rate_quota(mut self, requests: u32, per: Duration) -> Self {
        self.quota = Some((requests, per));
        self.window = per;
        self
    }

    /// The usage (a fraction, 0.8 = 80%) at which a warning fires. Default 0.8.
    pub fn usage_threshold(mut self, threshold: f64) -> Self {
        self.threshold = threshold;
        self
    }

    /// How far usage must fall below the threshold before the next warning can fire.
    /// Default 0.05.
    pub fn hysteresis(mut self, hysteresis: f64) -> Self {
        self.hysteresis = hysteresis;
        self
    }

    /// Called with each [`UsageWarning`], besides the `tracing` warning event. Keep it short:
    /// it runs on the request's task.
    pub fn on_usage_warning<F>(mut self, hook: F) -> Self
    where
        F: Fn(&UsageWarning) + Send + Sync + 'static,
    {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// How many created tasks are tracked at once for their lifetime (default 100 000); past
    /// it, new tasks are not tracked (their end is not counted).
    pub fn max_tracked_tasks(mut self, max: usize) -> Self {
        self.max_tracked_tasks = max;
        self
    }

    /// Also records [`TASK_LIFETIME`] and [`TASKS_FINISHED`] for the tasks the layer sees end.
    /// Default off: `TaskSlotsLayer` (kling-concurrency) records them from the slots it holds
    /// for each task; turn this on only in a stack without it, or every task counts twice.
    /// The [`Snapshot`]'s task counts are kept either way.
    pub fn record_task_metrics(mut self, on: bool) -> Self {
        self.record_task_metrics = on;
        self
    }

    /// Checks the settings and builds the monitor; its window starts now (tokio time).
    pub fn build(self) -> Result<Monitor, ConfigError> {
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(ConfigError::new(
                "usage_threshold",
                "must be in (0, 1] (0.8 = 80%)",
            ));
        }
        if !(self.hysteresis >= 0.0 && self.hysteresis < self.threshold) {
            return Err(ConfigError::new(
                "hysteresis",
                "must be at least 0 and below the usage threshold",
            ));
        }
        if let Some((requests, _)) = self.quota
            && requests == 0
        {
            return Err(ConfigError::new("rate_quota", "needs at least one request"));
        }
        let bucket_nanos = self.window.as_nanos() / BUCKETS as u128;
        if bucket_nanos == 0 || self.window > Duration::from_secs(365 * 24 * 3600) {
            return Err(ConfigError::new(
                "rate_quota",
                "window must be between 60 ns and a year",
            ));
        }
        Ok(Monitor {
            inner: Arc::new(Inner {
                threshold: self.threshold,
                hysteresis: self.hysteresis,
                quota: self.quota.map(|(requests, _)| requests),
                window: RateWindow::new(self.window, bucket_nanos as u64),
                rate_warned: AtomicBool::new(false),
                pool_warned: Mutex::new(HashMap::new()),
                hook: self.hook,
                rejections: Mutex::new(BTreeMap::new()),
                tasks: std::array::from_fn(|_| TaskShard::default()),
                task_hasher: foldhash::fast::RandomState::default(),
                tracked: Padded(AtomicUsize::new(0)),
                max_tracked_tasks: self.max_tracked_tasks,
                record_task_metrics: self.record_task_metrics,
                sources: RwLock::new(Vec::new()),
            }),
        })
    }
}

/// The usage the [`MetricsLayer`](crate::MetricsLayer) observes, the sources that know the
/// rest, and the warning state: read it with [`Monitor::snapshot`].
///
/// # Clone
///
/// Clones share everything: the rate window, the 429 counts, the tracked tasks, the sources
/// and the warning state. Give every `MetricsLayer` of one account a clone of one monitor.
#[derive(Clone)]
pub struct Monitor {
    inner: Arc<Inner>,
}

struct Inner {
    threshold: f64,
    hysteresis: f64,
    quota: Option<u32>,
    window: RateWindow,
    rate_warned: AtomicBool,
    pool_warned: Mutex<HashMap<(Option<String>, String), bool>>,
    hook: Option<Hook>,
    rejections: Mutex<BTreeMap<i64, u64>>,
    /// Tracked tasks and task counts, in shards picked by task id: concurrent calls on
    /// different tasks rarely share a lock or a cache line.
    tasks: [TaskShard; TASK_SHARDS],
    /// Hashes task ids for [`TaskTable`] and the shards; foldhash rather than SipHash.
    task_hasher: foldhash::fast::RandomState,
    /// Tasks tracked across all shards, for `max_tracked_tasks` (on its own cache line).
    tracked: Padded<AtomicUsize>,
    max_tracked_tasks: usize,
    record_task_metrics: bool,
    sources: RwLock<Vec<Arc<dyn SnapshotSource>>>,
}

/// Shards of the tracked tasks (a power of two).
const TASK_SHARDS: usize = 16;

/// A value alone on its cache lines (128 bytes: adjacent-line prefetch pairs them).
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

/// One shard of the tracked tasks, with the task counts of the calls that locked it (the
/// snapshot sums them): counting under the lock a call takes anyway costs no shared atomic.
#[derive(Default)]
struct TaskShard(Padded<Mutex<ShardState>>);

#[derive(Default)]
struct ShardState {
    tasks: TaskTable,
    created: u64,
    finished: u64,
    failed: u64,
}

impl ShardState {
    fn count_end(&mut self, status: &TaskStatus) {
        self.finished += 1;
        if *status == TaskStatus::Failed {
            self.failed += 1;
        }
    }
}

/// Tracked tasks by the hash of their id, computed once per call (it also picks the shard):
/// the map itself hashes nothing and compares `u64`s. Ids with one hash share a slot.
#[derive(Default)]
struct TaskTable {
    slots: HashMap<u64, Slot, BuildHasherDefault<Prehashed>>,
    len: usize,
}

/// The tracked tasks of one id hash: almost always one.
struct Slot {
    first: (TaskKey, Tracked),
    more: Vec<(TaskKey, Tracked)>,
}

impl TaskTable {
    fn len(&self) -> usize {
        self.len
    }

    /// Tracks `id` (whose hash is `hash`); returns the entry it replaced, if it was tracked.
    fn insert(&mut self, hash: u64, id: &str, tracked: Tracked) -> Option<Tracked> {
        let slot = match self.slots.entry(hash) {
            Entry::Vacant(vacant) => {
                vacant.insert(Slot {
                    first: (TaskKey::new(id), tracked),
                    more: Vec::new(),
                });
                self.len += 1;
                return None;
            }
            Entry::Occupied(occupied) => occupied.into_mut(),
        };
        let id_bytes = id.as_bytes();
        let same = std::iter::once(&mut slot.first)
            .chain(slot.more.iter_mut())
            .find(|(key, _)| key.as_bytes() == id_bytes);
        match same {
            Some((_, old)) => Some(std::mem::replace(old, tracked)),
            None => {
                slot.more.push((TaskKey::new(id), tracked));
                self.len += 1;
                None
            }
        }
    }

    /// Stops tracking `id` (whose hash is `hash`); returns its entry, if it was tracked.
    fn remove(&mut self, hash: u64, id: &[u8]) -> Option<Tracked> {
        let Entry::Occupied(mut occupied) = self.slots.entry(hash) else {
            return None;
        };
        let slot = occupied.get_mut();
        let tracked = if slot.first.0.as_bytes() == id {
            match slot.more.pop() {
                Some(last) => std::mem::replace(&mut slot.first, last).1,
                None => occupied.remove().first.1,
            }
        } else {
            let at = slot.more.iter().position(|(key, _)| key.as_bytes() == id)?;
            slot.more.swap_remove(at).1
        };
        self.len -= 1;
        Some(tracked)
    }
}

/// The hasher of [`TaskTable`]: its keys are hashes already.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64`s are hashed here; kept correct for anything else.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

/// A tracked task's id: inline when short (Kling's ids are 18 to 36 bytes), so tracking a
/// task allocates nothing. Hashed and compared as its bytes, so a map of them is searched with
/// a `&[u8]`.
enum TaskKey {
    Inline { len: u8, bytes: [u8; INLINE_ID] },
    Heap(Box<[u8]>),
}

/// The longest task id kept inline.
const INLINE_ID: usize = 46;

impl TaskKey {
    fn new(id: &str) -> TaskKey {
        let id = id.as_bytes();
        if id.len() > INLINE_ID {
            return TaskKey::Heap(id.into());
        }
        let mut bytes = [0; INLINE_ID];
        bytes[..id.len()].copy_from_slice(id);
        TaskKey::Inline {
            len: id.len() as u8,
            bytes,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            TaskKey::Inline { len, bytes } => &bytes[..usize::from(*len)],
            TaskKey::Heap(bytes) => bytes,
        }
    }
}

/// A created task whose end is awaited.
struct Tracked {
    since: Instant,
    pool: SharedString,
}

impl fmt::Debug for Monitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Monitor")
            .field("threshold", &self.inner.threshold)
            .field("hysteresis", &self.inner.hysteresis)
            .field("quota", &self.inner.quota)
            .field("window", &self.inner.window.window)
            .finish_non_exhaustive()
    }
}

impl Default for Monitor {
    /// No quota, threshold 80%.
    fn default() -> Self {
        Monitor::builder()
            .build()
            .expect("the default settings are valid")
    }
}

impl Monitor {
    /// Starts building a monitor.
    pub fn builder() -> MonitorBuilder {
        MonitorBuilder::new()
    }

    /// Registers a source of pools and queues for [`Monitor::snapshot`].
    pub fn add_source<S: SnapshotSource>(&self, source: S) {
        self.write_sources().push(Arc::new(source));
    }

    /// What the stack knows now. Also checks every pool's slot usage against the threshold
    /// (pools are only known here, so poll it, e.g. on every `/metrics` scrape).
    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let inner = &*self.inner;
        let requests = inner.window.total(now);
        let mut snapshot = Snapshot {
            rate: RateUsage {
                requests,
                quota: inner.quota,
                window: inner.window.window,
            },
            pools: Vec::new(),
            queues: Vec::new(),
            rejections: lock(&inner.rejections).clone(),
            tasks: self.task_counts(),
        };
        let sources: Vec<_> = self.read_sources().clone();
        for source in sources {
            source.fill(&mut snapshot);
        }
        self.check_rate(requests);
        self.check_pools(&snapshot);
        snapshot
    }

    /// Records that a task ended, for tasks whose end the layer cannot see (a callback).
    /// Returns whether the task was tracked; only tracked tasks are counted.
    pub fn task_finished(&self, task_id: &str, status: &TaskStatus) -> bool {
        if !status.is_terminal() {
            return false;
        }
        match self.end_tracked(task_id, status) {
            Some(tracked) => {
                self.record_end(tracked, status, Instant::now());
                true
            }
            None => false,
        }
    }

    /// The task counts, summed over the shards.
    fn task_counts(&self) -> TaskCounts {
        let mut counts = TaskCounts {
            created: 0,
            finished: 0,
            failed: 0,
            running: 0,
        };
        for shard in &self.inner.tasks {
            let state = lock(&shard.0.0);
            counts.created += state.created;
            counts.finished += state.finished;
            counts.failed += state.failed;
            counts.running += state.tasks.len() as u64;
        }
        counts
    }

    /// The hash of a task id, and its shard, locked.
    fn shard(&self, id: &[u8]) -> (u64, MutexGuard<'_, ShardState>) {
        let hash = self.inner.task_hasher.hash_one(id);
        // Bits neither the map's bucket index (low) nor its tag (high) uses.
        let shard = (hash >> 32) as usize % TASK_SHARDS;
        (hash, lock(&self.inner.tasks[shard].0.0))
    }

    /// Stops tracking a task that ended with `status` (terminal) and counts its end; `None`
    /// when it was not tracked (nothing is counted then).
    fn end_tracked(&self, id: &str, status: &TaskStatus) -> Option<Tracked> {
        let id = id.as_bytes();
        let tracked = {
            let (hash, mut shard) = self.shard(id);
            let tracked = shard.tasks.remove(hash, id)?;
            shard.count_end(status);
            tracked
        };
        self.inner.tracked.0.fetch_sub(1, Ordering::Relaxed);
        Some(tracked)
    }

    /// Takes one of the `max_tracked_tasks` places; `false` when all are taken.
    fn reserve_tracked(&self) -> bool {
        let max = self.inner.max_tracked_tasks;
        self.inner
            .tracked
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Whether task ends are recorded as metrics (their pool label is then kept).
    pub(crate) fn records_task_metrics(&self) -> bool {
        self.inner.record_task_metrics
    }

    /// The configured warning threshold.
    pub fn usage_threshold(&self) -> f64 {
        self.inner.threshold
    }

    /// A request was sent (or `n` more: retried attempts reported afterwards).
    pub(crate) fn note_requests(&self, now: Instant, n: u64) {
        // The window's total is only needed to check it against a quota.
        if self.inner.quota.is_some() {
            self.check_rate(self.inner.window.record(now, n));
        } else {
            self.inner.window.count(now, n);
        }
    }

    /// A final response (or error) with HTTP 429 and this code.
    pub(crate) fn note_rejection(&self, code: i64) {
        *lock(&self.inner.rejections).entry(code).or_insert(0) += 1;
    }

    /// Tracks the tasks a successful create made, and ends tracked tasks a response reports
    /// terminal; `now` is when the response arrived.
    pub(crate) fn observe_tasks(
        &self,
        is_create: bool,
        pool: &labels::Value,
        outcome: &Outcome,
        now: Instant,
    ) {
        let tasks = outcome.tasks();
        let create = is_create && outcome.is_success() && !tasks.is_empty();
        if !create && !tasks.iter().any(|t| t.status.is_terminal()) {
            return;
        }
        if create {
            let pool = pool.to_shared();
            for task in tasks {
                let entry = Tracked {
                    since: now,
                    pool: pool.clone(),
                };
                let id = task.id.as_bytes();
                let (hash, mut shard) = self.shard(id);
                shard.created += 1;
                if task.status.is_terminal() {
                    shard.count_end(&task.status);
                    drop(shard);
                    self.record_end(entry, &task.status, now);
                } else if self.reserve_tracked()
                    && shard.tasks.insert(hash, &task.id, entry).is_some()
                {
                    // The id was tracked already (created twice): one place, not two.
                    self.inner.tracked.0.fetch_sub(1, Ordering::Relaxed);
                }
            }
            return;
        }
        for task in tasks.iter().filter(|t| t.status.is_terminal()) {
            if let Some(entry) = self.end_tracked(&task.id, &task.status) {
                self.record_end(entry, &task.status, now);
            }
        }
    }

    /// Records the metrics of a task's end, once its shard counted it.
    fn record_end(&self, tracked: Tracked, status: &TaskStatus, now: Instant) {
        let inner = &*self.inner;
        if !inner.record_task_metrics {
            return;
        }
        let status = labels::task_status(status);
        let lifetime = now.saturating_duration_since(tracked.since);
        metrics::histogram!(TASK_LIFETIME, LABEL_POOL => tracked.pool.clone(), LABEL_STATUS => status.clone())
            .record(lifetime.as_secs_f64());
        metrics::counter!(TASKS_FINISHED, LABEL_POOL => tracked.pool, LABEL_STATUS => status)
            .increment(1);
    }

    /// Fires or re-arms the rate warning for `requests` in the window.
    fn check_rate(&self, requests: u64) {
        let Some(quota) = self.inner.quota else {
            return;
        };
        let usage = requests as f64 / f64::from(quota);
        let inner = &*self.inner;
        if usage >= inner.threshold {
            if !inner.rate_warned.load(Ordering::Relaxed)
                && !inner.rate_warned.swap(true, Ordering::AcqRel)
            {
                self.warn(&UsageWarning {
                    resource: Resource::RateQuota,
                    usage,
                    threshold: inner.threshold,
                });
            }
        } else if usage < inner.threshold - inner.hysteresis
            && inner.rate_warned.load(Ordering::Relaxed)
            && inner.rate_warned.swap(false, Ordering::AcqRel)
        {
            tracing::info!(
                target: "kling_metrics",
                resource = "rate quota",
                usage,
                "usage fell back below the warning threshold"
            );
        }
    }

    fn check_pools(&self, snapshot: &Snapshot) {
        let inner = &*self.inner;
        let mut fired = Vec::new();
        {
            let mut warned = lock(&inner.pool_warned);
            for pool in &snapshot.pools {
                let Some(usage) = pool.usage() else { continue };
                let key = (pool.account.clone(), pool.pool.clone());
                let was = warned.get(&key).copied().unwrap_or(false);
                if usage >= inner.threshold && !was {
                    warned.insert(key, true);
                    fired.push(UsageWarning {
                        resource: Resource::Slots {
                            account: pool.account.clone(),
                            pool: pool.pool.clone(),
                        },
                        usage,
                        threshold: inner.threshold,
                    });
                } else if usage < inner.threshold - inner.hysteresis && was {
                    warned.insert(key, false);
                }
            }
        }
        for warning in &fired {
            self.warn(warning);
        }
    }

    fn warn(&self, warning: &UsageWarning) {
        tracing::warn!(
            target: "kling_metrics",
            resource = %warning.resource,
            usage = warning.usage,
            threshold = warning.threshold,
            "usage passed the warning threshold"
        );
        if let Some(hook) = &self.inner.hook {
            hook(warning);
        }
    }

    fn read_sources(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<dyn SnapshotSource>>> {
        self.inner.sources.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_sources(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<dyn SnapshotSource>>> {
        self.inner
            .sources
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// Locks a mutex; a panic elsewhere never poisons the monitor for good.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Buckets of the sliding window.
const BUCKETS: usize = 60;
/// Bits of a bucket word that hold the count; the rest hold the bucket's epoch.
const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

fn pack(epoch: u64, count: u64) -> u64 {
    (epoch << COUNT_BITS) | count.min(COUNT_MASK)
}

fn unpack(word: u64) -> (u64, u64) {
    (word >> COUNT_BITS, word & COUNT_MASK)
}

/// The last step of a window a thread saw: `epoch` of window `window` runs from `from` until
/// `until` (excluded).
#[derive(Clone, Copy)]
struct CachedEpoch {
    window: u64,
    epoch: u64,
    from: Instant,
    until: Instant,
}

thread_local! {
    /// Per thread, so it costs no shared write.
    static EPOCH_CACHE: std::cell::Cell<Option<CachedEpoch>> = const { std::cell::Cell::new(None) };
}

/// Requests per sliding window, in 60 lock-free buckets.
///
/// Each bucket word packs the bucket's epoch (which step of the window it counts) with its
/// count, so a stale bucket is reset by the same compare-and-swap that counts. The sum of the
/// other 59 buckets only changes when a new step starts, so it is cached per step and a request
/// costs one CAS and two loads.
struct RateWindow {
    /// Tells this window's entry in [`EPOCH_CACHE`] from another's.
    id: u64,
    start: Instant,
    window: Duration,
    bucket_nanos: u64,
    buckets: [AtomicU64; BUCKETS],
    /// `pack(epoch, sum of the other buckets within the window at that epoch)`.
    others: AtomicU64,
}

impl RateWindow {
    fn new(window: Duration, bucket_nanos: u64) -> Self {
        static IDS: AtomicU64 = AtomicU64::new(0);
        RateWindow {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            start: Instant::now(),
            window,
            bucket_nanos,
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            others: AtomicU64::new(0),
        }
    }

    /// The step of the window `now` falls in: from this thread's cache of the last step seen
    /// when `now` is within it (two instant comparisons), else worked out (an instant
    /// subtraction and a division) and cached.
    fn epoch(&self, now: Instant) -> u64 {
        if let Some(cached) = EPOCH_CACHE.get()
            && cached.window == self.id
            && cached.from <= now
            && now < cached.until
        {
            return cached.epoch;
        }
        let epoch = self.epoch_of(now);
        let from = epoch
            .checked_sub(1)
            .and_then(|step| step.checked_mul(self.bucket_nanos))
            .and_then(|nanos| self.start.checked_add(Duration::from_nanos(nanos)));
        let until = from.and_then(|from| from.checked_add(Duration::from_nanos(self.bucket_nanos)));
        if let (Some(from), Some(until)) = (from, until) {
            EPOCH_CACHE.set(Some(CachedEpoch {
                window: self.id,
                epoch,
                from,
                until,
            }));
        }
        epoch
    }

    /// [`RateWindow::epoch`], worked out.
    fn epoch_of(&self, now: Instant) -> u64 {
        // Epoch 0 is reserved for "never used" (a zeroed bucket word). u64 nanoseconds last
        // 584 years, and u64 division is several times cheaper than u128.
        let elapsed = now.saturating_duration_since(self.start);
        let nanos = elapsed
            .as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(elapsed.subsec_nanos()));
        nanos / self.bucket_nanos + 1
    }

    /// Counts `n` requests now; returns the requests in the window, these included.
    fn record(&self, now: Instant, n: u64) -> u64 {
        let (epoch, count) = self.count(now, n);
        count + self.others(epoch)
    }

    /// Counts `n` requests now; returns the step and the requests in its bucket.
    fn count(&self, now: Instant, n: u64) -> (u64, u64) {
        let epoch = self.epoch(now);
        let slot = &self.buckets[(epoch % BUCKETS as u64) as usize];
        let mut current = slot.load(Ordering::Relaxed);
        let count = loop {
            let (e, c) = unpack(current);
            let next = if e >= epoch {
                pack(e, c.saturating_add(n))
            } else {
                pack(epoch, n)
            };
            match slot.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break unpack(next).1,
                Err(actual) => current = actual,
            }
        };
        (epoch, count)
    }

    /// The requests in the buckets of the window at step `epoch` but its own.
    fn others(&self, epoch: u64) -> u64 {
        let (cached_epoch, cached) = unpack(self.others.load(Ordering::Acquire));
        if cached_epoch == epoch {
            return cached;
        }
        let sum = self.sum(epoch, true);
        self.others.store(pack(epoch, sum), Ordering::Release);
        sum
    }

    /// The requests in the window ending now.
    fn total(&self, now: Instant) -> u64 {
        self.sum(self.epoch(now), false)
    }

    fn sum(&self, epoch: u64, skip_current: bool) -> u64 {
        let oldest = epoch.saturating_sub(BUCKETS as u64 - 1);
        self.buckets
            .iter()
            .map(|b| unpack(b.load(Ordering::Acquire)))
            .filter(|&(e, _)| e >= oldest && e <= epoch && !(skip_current && e == epoch))
            .map(|(_, c)| c)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(id: &str, status: &str) -> Outcome {
        let body = format!(
            r#"{{"code":0,"message":"SUCCEED","request_id":"r","data":{{"task_id":"{id}","task_status":"{status}"}}}}"#
        );
        Outcome::parse(
            http::StatusCode::OK,
            &http::HeaderMap::new(),
            body.as_bytes(),
            Instant::now(),
        )
        .unwrap()
    }

    #[test]
    fn task_keys_are_their_bytes_inline_or_not() {
        let long = "y".repeat(INLINE_ID + 1);
        for id in ["7", "ab", "ab\0", &"x".repeat(INLINE_ID), &long, "é"] {
            let key = TaskKey::new(id);
            assert_eq!(key.as_bytes(), id.as_bytes());
            assert_eq!(matches!(key, TaskKey::Heap(_)), id.len() > INLINE_ID);
        }
        assert!(TaskKey::new("ab").as_bytes() != TaskKey::new("ab\0").as_bytes());
    }

    fn tracked(pool: &'static str) -> Tracked {
        Tracked {
            since: Instant::now(),
            pool: SharedString::const_str(pool),
        }
    }

    /// The table agrees with a plain map of ids, with real hashes and with hashes that
    /// collide (a handful of values), over a long run of random inserts and removes.
    #[test]
    fn the_task_table_agrees_with_a_map_of_ids_even_when_hashes_collide() {
        let hasher = foldhash::fast::RandomState::default();
        for buckets in [None, Some(1), Some(3)] {
            let mut table = TaskTable::default();
            let mut model: HashMap<String, &'static str> = HashMap::new();
            let mut state = 0x2545_f491_4f6c_dd1d_u64;
            let pools = ["a", "b", "c"];
            for _ in 0..20_000 {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let id = format!("task-{}", (state >> 33) % 64);
                // Colliding: a function of the last digit, so one id keeps one hash.
                let hash = match buckets {
                    None => hasher.hash_one(id.as_bytes()),
                    Some(n) => u64::from(id.as_bytes()[id.len() - 1]) % n,
                };
                let pool = pools[(state >> 20) as usize % 3];
                if (state >> 50) & 1 == 0 {
                    let old = table.insert(hash, &id, tracked(pool));
                    let expected = model.insert(id, pool);
                    assert_eq!(old.map(|t| t.pool), expected.map(SharedString::const_str));
                } else {
                    let removed = table.remove(hash, id.as_bytes());
                    let expected = model.remove(&id);
                    assert_eq!(
                        removed.map(|t| t.pool),
                        expected.map(SharedString::const_str)
                    );
                }
                assert_eq!(table.len(), model.len());
            }
            assert!(model.len() > 10, "the run ends with tasks tracked");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tasks_are_tracked_until_they_end_whatever_the_length_of_their_id() {
        let monitor = Monitor::default();
        let video = labels::pool(crate::route::PoolRef::Product(kling_core::Product::Video));
        let ids = [
            "7".to_owned(),
            "x".repeat(INLINE_ID),
            "y".repeat(INLINE_ID + 1),
            "é".repeat(40),
        ];
        for id in &ids {
            monitor.observe_tasks(true, &video, &outcome(id, "submitted"), Instant::now());
        }
        assert_eq!(monitor.snapshot().tasks.running, 4);
        // A query is no create: an unknown id is not tracked, a running one stays.
        monitor.observe_tasks(
            false,
            &video,
            &outcome("unknown", "succeed"),
            Instant::now(),
        );
        monitor.observe_tasks(
            false,
            &video,
            &outcome(&ids[0], "processing"),
            Instant::now(),
        );
        for (n, id) in ids.iter().enumerate() {
            let end = if n % 2 == 0 { "succeed" } else { "failed" };
            monitor.observe_tasks(false, &video, &outcome(id, end), Instant::now());
            // Seen ending twice, counted once.
            monitor.observe_tasks(false, &video, &outcome(id, end), Instant::now());
        }
        let tasks = monitor.snapshot().tasks;
        assert_eq!(
            (tasks.created, tasks.finished, tasks.failed, tasks.running),
            (4, 4, 2, 0)
        );
    }

    #[test]
    fn the_prehashed_hasher_passes_a_hash_through() {
        let mut hasher = Prehashed::default();
        hasher.write_u64(0xdead_beef);
        assert_eq!(hasher.finish(), 0xdead_beef);
        let mut bytes = Prehashed::default();
        bytes.write(&[1, 2]);
        assert_eq!(bytes.finish(), 0x0102);
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_max_tracked_tasks_are_tracked_and_an_ended_one_frees_its_place() {
        let monitor = Monitor::builder().max_tracked_tasks(3).build().unwrap();
        let video = labels::pool(crate::route::PoolRef::Product(kling_core::Product::Video));
        let create = |id: &str| {
            monitor.observe_tasks(true, &video, &outcome(id, "submitted"), Instant::now())
        };
        for id in ["a", "b", "c", "d", "e"] {
            create(id);
        }
        // Created twice: still one place.
        create("a");
        let tasks = monitor.snapshot().tasks;
        assert_eq!((tasks.created, tasks.running), (6, 3));
        // "d" was not tracked: its end is not counted.
        assert!(!monitor.task_finished("d", &TaskStatus::Succeeded));
        assert!(monitor.task_finished("a", &TaskStatus::Succeeded));
        create("f");
        assert_eq!(monitor.snapshot().tasks.running, 3);
        create("g");
        assert!(monitor.task_finished("f", &TaskStatus::Failed));
        assert!(!monitor.task_finished("g", &TaskStatus::Failed));
        let tasks = monitor.snapshot().tasks;
        assert_eq!(
            (tasks.created, tasks.finished, tasks.failed, tasks.running),
            (8, 2, 1, 2)
        );
    }

    #[test]
    fn concurrent_calls_count_every_task_once() {
        let monitor = Monitor::default();
        let video = labels::pool(crate::route::PoolRef::Product(kling_core::Product::Video));
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let (monitor, video) = (&monitor, &video);
                scope.spawn(move || {
                    for n in 0..500 {
                        let id = format!("task-{thread}-{n:08}");
                        monitor.observe_tasks(
                            true,
                            video,
                            &outcome(&id, "submitted"),
                            Instant::now(),
                        );
                        let end = if n % 5 == 0 { "failed" } else { "succeed" };
                        monitor.observe_tasks(false, video, &outcome(&id, end), Instant::now());
                        monitor.observe_tasks(false, video, &outcome(&id, end), Instant::now());
                    }
                });
            }
        });
        let tasks = monitor.snapshot().tasks;
        assert_eq!(
            (tasks.created, tasks.finished, tasks.failed, tasks.running),
            (2000, 2000, 400, 0)
        );
        assert_eq!(monitor.inner.tracked.0.load(Ordering::Relaxed), 0);
    }

    /// The thread's cached step agrees with the step worked out, for two windows used in
    /// turn, at instants at, just before and just after step boundaries, and at random.
    #[tokio::test(start_paused = true)]
    async fn the_cached_step_is_the_step_worked_out() {
        tokio::time::advance(Duration::from_secs(5)).await;
        let windows = [
            RateWindow::new(Duration::from_secs(60), 1_000_000_000),
            RateWindow::new(Duration::from_nanos(600), 10),
        ];
        let start = Instant::now();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for n in 0..20_000u64 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let window = &windows[(state >> 60) as usize % 2];
            let step = window.bucket_nanos;
            let boundary = (state >> 20) % 100 * step;
            let nanos = match n % 4 {
                0 => boundary,
                1 => boundary.saturating_sub(1),
                2 => boundary + 1,
                _ => (state >> 8) % (200 * step),
            };
            // Some instants before the window's start too.
            let now = (start + Duration::from_nanos(nanos))
                .checked_sub(Duration::from_nanos(3 * step))
                .unwrap();
            assert_eq!(window.epoch(now), window.epoch_of(now), "{nanos} / {step}");
            // Right after: mostly answered from the cache, across a boundary or not.
            for later in [1, step - 1, step] {
                let then = now + Duration::from_nanos(later);
                assert_eq!(
                    window.epoch(then),
                    window.epoch_of(then),
                    "{nanos} + {later}"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_forgets_requests_older_than_a_minute() {
        let window = RateWindow::new(Duration::from_secs(60), 1_000_000_000);
        let start = Instant::now();
        assert_eq!(window.record(start, 1), 1);
        assert_eq!(window.record(start + Duration::from_millis(500), 1), 2);
        assert_eq!(window.record(start + Duration::from_secs(30), 3), 5);
        assert_eq!(window.total(start + Duration::from_secs(59)), 5);
        // At 60 s the first second's bucket left the window.
        assert_eq!(window.total(start + Duration::from_secs(60)), 3);
        assert_eq!(window.record(start + Duration::from_secs(61), 1), 4);
        assert_eq!(window.total(start + Duration::from_secs(90)), 1);
        // A bucket reused an hour later starts from zero.
        assert_eq!(window.record(start + Duration::from_secs(3600), 2), 2);
        assert_eq!(window.total(start + Duration::from_secs(3600)), 2);
    }

    #[test]
    fn invalid_settings_name_their_field() {
        let err = Monitor::builder().usage_threshold(1.5).build().unwrap_err();
        assert_eq!(err.field(), "usage_threshold");
        assert_eq!(
            err.to_string(),
            "invalid metrics configuration: `usage_threshold` must be in (0, 1] (0.8 = 80%)"
        );
        let err = Monitor::builder()
            .usage_threshold(f64::NAN)
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "usage_threshold");
        let err = Monitor::builder().hysteresis(0.9).build().unwrap_err();
        assert_eq!(err.field(), "hysteresis");
        let err = Monitor::builder()
            .rate_quota(0, Duration::from_secs(60))
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "rate_quota");
        let err = Monitor::builder()
            .rate_quota(10, Duration::from_nanos(10))
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "rate_quota");
    }
}
