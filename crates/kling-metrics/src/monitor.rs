//! [`Monitor`]: the in-process usage state behind [`Snapshot`] and the usage warnings.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
                tasks: Mutex::new(HashMap::default()),
                max_tracked_tasks: self.max_tracked_tasks,
                record_task_metrics: self.record_task_metrics,
                created: AtomicU64::new(0),
                finished: AtomicU64::new(0),
                failed: AtomicU64::new(0),
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
    /// Tracked tasks by id; foldhash rather than SipHash (two hashes per task on the hot path).
    tasks: Mutex<HashMap<TaskKey, Tracked, foldhash::fast::RandomState>>,
    max_tracked_tasks: usize,
    record_task_metrics: bool,
    created: AtomicU64,
    finished: AtomicU64,
    failed: AtomicU64,
    sources: RwLock<Vec<Arc<dyn SnapshotSource>>>,
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

impl std::borrow::Borrow<[u8]> for TaskKey {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl PartialEq for TaskKey {
    fn eq(&self, other: &TaskKey) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for TaskKey {}

impl std::hash::Hash for TaskKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `[u8]` hashes, so `Borrow<[u8]>` finds it.
        self.as_bytes().hash(state);
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
            tasks: TaskCounts {
                created: inner.created.load(Ordering::Relaxed),
                finished: inner.finished.load(Ordering::Relaxed),
                failed: inner.failed.load(Ordering::Relaxed),
                running: lock(&inner.tasks).len() as u64,
            },
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
        let tracked = lock(&self.inner.tasks).remove(task_id.as_bytes());
        match tracked {
            Some(tracked) => {
                self.record_end(tracked, status, Instant::now());
                true
            }
            None => false,
        }
    }

    /// The configured warning threshold.
    pub fn usage_threshold(&self) -> f64 {
        self.inner.threshold
    }

    /// A request was sent (or `n` more: retried attempts reported afterwards).
    pub(crate) fn note_requests(&self, now: Instant, n: u64) {
        let total = self.inner.window.record(now, n);
        if self.inner.quota.is_some() {
            self.check_rate(total);
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
            let mut tracked = lock(&self.inner.tasks);
            for task in tasks {
                self.inner.created.fetch_add(1, Ordering::Relaxed);
                let entry = Tracked {
                    since: now,
                    pool: pool.clone(),
                };
                if task.status.is_terminal() {
                    self.record_end(entry, &task.status, now);
                } else if tracked.len() < self.inner.max_tracked_tasks {
                    tracked.insert(TaskKey::new(&task.id), entry);
                }
            }
            return;
        }
        if let [task] = tasks {
            // One task (a query): no list of ended tasks to build.
            let ended = lock(&self.inner.tasks).remove(task.id.as_bytes());
            if let Some(entry) = ended {
                self.record_end(entry, &task.status, now);
            }
            return;
        }
        let ended: Vec<(Tracked, &TaskStatus)> = {
            let mut tracked = lock(&self.inner.tasks);
            tasks
                .iter()
                .filter(|t| t.status.is_terminal())
                .filter_map(|t| {
                    tracked
                        .remove(t.id.as_bytes())
                        .map(|entry| (entry, &t.status))
                })
                .collect()
        };
        for (entry, status) in ended {
            self.record_end(entry, status, now);
        }
    }

    fn record_end(&self, tracked: Tracked, status: &TaskStatus, now: Instant) {
        let inner = &*self.inner;
        inner.finished.fetch_add(1, Ordering::Relaxed);
        if *status == TaskStatus::Failed {
            inner.failed.fetch_add(1, Ordering::Relaxed);
        }
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

/// Requests per sliding window, in 60 lock-free buckets.
///
/// Each bucket word packs the bucket's epoch (which step of the window it counts) with its
/// count, so a stale bucket is reset by the same compare-and-swap that counts. The sum of the
/// other 59 buckets only changes when a new step starts, so it is cached per step and a request
/// costs one CAS and two loads.
struct RateWindow {
    start: Instant,
    window: Duration,
    bucket_nanos: u64,
    buckets: [AtomicU64; BUCKETS],
    /// `pack(epoch, sum of the other buckets within the window at that epoch)`.
    others: AtomicU64,
}

impl RateWindow {
    fn new(window: Duration, bucket_nanos: u64) -> Self {
        RateWindow {
            start: Instant::now(),
            window,
            bucket_nanos,
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            others: AtomicU64::new(0),
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
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
        let (cached_epoch, cached) = unpack(self.others.load(Ordering::Acquire));
        let others = if cached_epoch == epoch {
            cached
        } else {
            let sum = self.sum(epoch, true);
            self.others.store(pack(epoch, sum), Ordering::Release);
            sum
        };
        count + others
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
        assert!(TaskKey::new("ab") != TaskKey::new("ab\0"));
        let mut map: HashMap<TaskKey, u8, foldhash::fast::RandomState> = HashMap::default();
        map.insert(TaskKey::new("ab"), 1);
        map.insert(TaskKey::new(&long), 2);
        assert_eq!(map.get(b"ab".as_slice()), Some(&1));
        assert_eq!(map.get(long.as_bytes()), Some(&2));
        assert_eq!(map.get(b"ab\0".as_slice()), None);
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
