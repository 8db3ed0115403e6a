//! [`Monitor`]: the in-process usage state behind [`Snapshot`] and the usage warnings.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use kling_core::lanes;
use kling_core::metrics::{LABEL_POOL, LABEL_STATUS, TASK_LIFETIME, TASKS_FINISHED};
use kling_core::{Code, Outcome, TaskStatus};
use metrics::SharedString;
use tokio::time::Instant;

use crate::error::ConfigError;
use crate::labels;
use crate::snapshot::{
    PoolUsage, RateUsage, Resource, Snapshot, SnapshotSource, TaskCounts, UsageWarning,
};

/// The default usage threshold of warnings: 80%.
pub const DEFAULT_USAGE_THRESHOLD: f64 = 0.8;
/// The default hysteresis: after a warning at 80%, the next fires once usage fell below 75%.
pub const DEFAULT_HYSTERESIS: f64 = 0.05;
/// The default number of created tasks tracked for their lifetime at once.
pub const DEFAULT_MAX_TRACKED_TASKS: usize = 100_000;
/// The default task lease: a tracked task with no sign of life (a create, or a report that it
/// still runs) for this long stops being tracked and counts as expired
/// ([`kling_core::DEFAULT_TASK_LEASE`], after which the task slots give its slots back too).
pub const DEFAULT_TASK_LEASE: Duration = kling_core::DEFAULT_TASK_LEASE;

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
    task_lease: Duration,
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
            .field("task_lease", &self.task_lease)
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
            task_lease: DEFAULT_TASK_LEASE,
            record_task_metrics: false,
        }
    }

    /// The account's request quota: `requests` per `per` (e.g. `60` per minute on the Pro
    /// tier). Usage is measured over a sliding window of length `per`, in 60 steps; `per` must
    /// be between 3 ms and a year ([`build`](MonitorBuilder::build) refuses others).
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
    /// it, new tasks are not tracked (their end is not counted): they count as
    /// [`untracked`](crate::TaskCounts::untracked).
    pub fn max_tracked_tasks(mut self, max: usize) -> Self {
        self.max_tracked_tasks = max;
        self
    }

    /// How long a tracked task may go without a sign of life (its create, a response that
    /// reports it still running) before it stops being tracked and counts as
    /// [`expired`](crate::TaskCounts::expired) (default [`DEFAULT_TASK_LEASE`]; counted in whole
    /// seconds, a lease rounded up, so a task expires after its lease, never before, and is
    /// seen to by the next snapshot, or create that finds no place, a second later at most).
    /// A task nobody follows would otherwise count as running, and hold a tracking place,
    /// forever. Give it the task slots' lease (`KlingLayer` does), so a task stops counting as
    /// running here when its slots are given back there.
    pub fn task_lease(mut self, lease: Duration) -> Self {
        self.task_lease = lease;
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
        if self.task_lease.is_zero() {
            return Err(ConfigError::new("task_lease", "must be more than zero"));
        }
        let bucket_nanos = self.window.as_nanos() / BUCKETS as u128;
        if self.window < MIN_RATE_WINDOW || self.window > Duration::from_secs(365 * 24 * 3600) {
            return Err(ConfigError::new(
                "rate_quota",
                "window must be between 3 ms and a year (shorter, its steps would run out of \
                 numbers within a century)",
            ));
        }
        Ok(Monitor {
            inner: Arc::new(Inner {
                threshold: self.threshold,
                hysteresis: self.hysteresis,
                quota: self.quota.map(|(requests, _)| requests),
                fire_at: self
                    .quota
                    .map(|(requests, _)| fire_at(requests, self.threshold)),
                window: RateWindow::new(self.window, bucket_nanos as u64),
                rate_warned: AtomicBool::new(false),
                fleet: FleetCount::default(),
                pool_warned: Mutex::new(HashSet::new()),
                hook: self.hook,
                rejections: Mutex::new(Rejections::default()),
                tasks: (0..TASK_BUCKETS).map(|_| Bucket::default()).collect(),
                task_hasher: foldhash::fast::RandomState::default(),
                free_places: Padded(AtomicUsize::new(self.max_tracked_tasks)),
                scarce_places: Padded(AtomicBool::new(false)),
                #[cfg(test)]
                exact_runs: AtomicUsize::new(0),
                record_task_metrics: self.record_task_metrics,
                // Whole seconds, rounded up (a lease of a speeded-up stack may be under one).
                task_lease_secs: u32::try_from(self.task_lease.as_secs())
                    .unwrap_or(u32::MAX)
                    .saturating_add(u32::from(self.task_lease.subsec_nanos() > 0)),
                started: Instant::now(),
                swept_at: AtomicU32::new(0),
                swept: AtomicU32::new(0),
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

/// The requests of a fleet over the rate window, as a [`SnapshotSource`] last read them from
/// a shared store, and until when they count: a figure older than the window no longer does.
#[derive(Default)]
struct FleetCount {
    requests: AtomicU64,
    /// Nanoseconds from the window's start to a window after the read, plus one (0: never
    /// read). The end rather than the read: a read from before the monitor was built has no
    /// place on this scale, and counted as read at its start it outlived its window.
    counts_until: AtomicU64,
}

impl FleetCount {
    /// Notes `requests`, read at `read_at`.
    fn note(&self, window: &RateWindow, requests: u64, read_at: Instant) {
        let until = read_at
            .checked_add(window.window)
            .map_or(u64::MAX, |until| window.nanos_since_start(until));
        self.requests.store(requests, Ordering::Relaxed);
        self.counts_until
            .store(until.saturating_add(1), Ordering::Release);
    }

    /// The figure, if read within the window before `now` (else 0).
    fn recent(&self, window: &RateWindow, now: Instant) -> u64 {
        let until = self.counts_until.load(Ordering::Acquire);
        if until == 0 || window.nanos_since_start(now) > until - 1 {
            return 0;
        }
        self.requests.load(Ordering::Relaxed)
    }
}

/// Undocumented codes counted by number in [`Snapshot::rejections`]; later ones are summed in
/// [`Snapshot::rejections_other`]. The code is the upstream's input: one answering codes at
/// random must not grow the map without end. The same bound as the metrics' code labels.
const UNDOCUMENTED_REJECTION_CODES: usize = 32;

/// The final 429s by code: every documented code, the first
/// [`UNDOCUMENTED_REJECTION_CODES`] undocumented ones, and a count of the rest.
#[derive(Default)]
struct Rejections {
    by_code: BTreeMap<i64, u64>,
    undocumented: usize,
    other: u64,
    /// 429s with no Kling envelope (a proxy's or gateway's page).
    without_code: u64,
}

impl Rejections {
    fn note(&mut self, code: i64) {
        if let Some(count) = self.by_code.get_mut(&code) {
            *count += 1;
        } else if !matches!(Code::from_i64(code), Code::Unknown(_)) {
            self.by_code.insert(code, 1);
        } else if self.undocumented < UNDOCUMENTED_REJECTION_CODES {
            self.undocumented += 1;
            self.by_code.insert(code, 1);
        } else {
            self.other += 1;
        }
    }
}

struct Inner {
    threshold: f64,
    hysteresis: f64,
    quota: Option<u32>,
    /// The fewest requests in the window whose usage of `quota` reaches `threshold`.
    fire_at: Option<u64>,
    window: RateWindow,
    rate_warned: AtomicBool,
    /// The fleet's requests over the window, as a source last read them.
    fleet: FleetCount,
    /// The pools warned about and not yet back under the hysteresis: only those, so pools
    /// that come and go (one per model name) leave nothing behind.
    pool_warned: Mutex<HashSet<(Option<String>, String)>>,
    hook: Option<Hook>,
    rejections: Mutex<Rejections>,
    /// Tracked tasks and task counts, in buckets picked by task id, each alone on its cache
    /// lines: a create or an end of a task touches one bucket's lines (see [`Bucket`]).
    tasks: Box<[Bucket]>,
    /// Hashes task ids for the buckets and [`TaskTable`]; foldhash rather than SipHash.
    task_hasher: foldhash::fast::RandomState,
    /// The places of `max_tracked_tasks` no bucket holds (on its own cache line). Buckets take
    /// them [`PLACES_CHUNK`] at a time and give spare ones back in chunks, so tracking a task
    /// and ending it rarely write this line, which every thread shares.
    free_places: Padded<AtomicUsize>,
    /// Set by the exact path when fewer places are free than there are buckets: buckets then
    /// give back every spare place at once (each end writes `free_places`), so when none is
    /// free, all are tracked and a create is refused without locking every bucket. Cleared
    /// once twice that many are free again. Read by every end that leaves a place spare.
    scarce_places: Padded<AtomicBool>,
    /// How many times the exact path ran.
    #[cfg(test)]
    exact_runs: AtomicUsize,
    record_task_metrics: bool,
    /// [`MonitorBuilder::task_lease`], in whole seconds.
    task_lease_secs: u32,
    /// What a task's last sign of life is counted from (whole seconds since then).
    started: Instant,
    /// When a sweep for tasks past their lease was last started ([`Monitor::seconds`], plus
    /// one; 0: never): at most one a second.
    swept_at: AtomicU32,
    /// The same, once that sweep gave back the places it freed: a create that finds no place
    /// is refused without a sweep of its own only after one.
    swept: AtomicU32,
    sources: RwLock<Vec<Arc<dyn SnapshotSource>>>,
}

/// Buckets of the tracked tasks (a power of two): many more than tracked tasks usually
/// (Kling lets an account run tens of tasks at once), so a task is mostly alone in its
/// bucket and held in the bucket's own slot.
const TASK_BUCKETS: usize = 1024;

/// A value alone on its cache lines (128 bytes: adjacent-line prefetch pairs them).
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

/// One bucket of the tracked tasks: its lock, its task counts, its places and one tracked task
/// in 128 bytes, what a create or an end of a short id touches in the first 64. The create and
/// the end of a task often run on different threads, and with a lock, counts and a hash table
/// on separate lines each call waited for three or four lines to come from the other core;
/// here it waits for one (a store to a second line would be waited for at the unlock). The
/// counts of the calls that locked the bucket are kept here (the snapshot sums them): counting
/// under the lock a call takes anyway costs no shared atomic.
#[repr(align(128))]
#[derive(Default)]
struct Bucket(Mutex<BucketState>);

// The lock and the state fill one aligned pair of lines.
const _: () = assert!(std::mem::size_of::<Bucket>() == 128);

/// In declaration order (`repr(C)`): after the lock, what every create and end of a task in
/// the slot touches, then the slot's id, then the rest. Ends are not counted: a bucket's
/// finished tasks are its creates that are neither tracked nor `untracked` nor `expired`, so an
/// end writes only the first line (the counts read by the snapshot stay exact, all under the
/// lock).
#[repr(C)]
struct BucketState {
    created: u64,
    /// Places taken from `free_places`: at least `len()`.
    places: u32,
    /// How many tasks `overflow` holds.
    overflowed: u32,
    /// The slot's task's start; `None` when the slot is free.
    slot_since: Option<Instant>,
    /// The slot's task's last sign of life ([`Monitor::seconds`]).
    slot_seen: u32,
    /// The length of the slot's task id.
    slot_len: u8,
    /// The slot's task id (its first `SLOT_ID_FIRST_LINE` bytes on the first line).
    slot_id: [u8; SLOT_ID],
    /// Creates that neither started a tracked task nor ended one: refused for want of a
    /// place, or of an id too long to keep ([`TaskCounts::untracked`]). (A create answering a
    /// task tracked already is no create: it renews the task's lease or ends it.)
    untracked: u64,
    failed: u64,
    /// Tasks that stopped being tracked with no sign of life for the task lease.
    expired: u64,
    /// The bucket's other tracked tasks, read only when `overflowed` says it holds any: a
    /// second task of the bucket, an id longer than [`SLOT_ID`], a task with a pool label.
    /// Kept once allocated.
    overflow: Option<Box<TaskTable>>,
}

impl Default for BucketState {
    fn default() -> Self {
        BucketState {
            created: 0,
            places: 0,
            overflowed: 0,
            slot_since: None,
            slot_seen: 0,
            slot_len: 0,
            slot_id: [0; SLOT_ID],
            untracked: 0,
            failed: 0,
            expired: 0,
            overflow: None,
        }
    }
}

/// The longest task id a bucket's slot holds (Kling's ids are 18 to 36 bytes).
const SLOT_ID: usize = 51;

/// How many bytes of the slot's id share the first cache line with the lock (the mutex's own
/// 8 bytes, then 37 of the state, the slot task's last sign of life included, which a query
/// reporting it running writes): Kling's numeric ids (18 or 19 digits) fit.
#[cfg(test)]
const SLOT_ID_FIRST_LINE: usize = 64 - 8 - 37;

/// How many places a bucket takes from `free_places` at once; it gives spare ones back once it
/// holds twice as many. One: buckets are many and mostly hold one task or none, so a bucket
/// keeps the place its last task freed and the next task there takes no shared write.
const PLACES_CHUNK: u32 = 1;

impl BucketState {
    /// How many tasks the bucket tracks.
    fn len(&self) -> u32 {
        u32::from(self.slot_since.is_some()) + self.overflowed
    }

    /// The bucket's finished tasks: its creates that neither are tracked nor went untracked
    /// nor expired.
    fn finished(&self) -> u64 {
        self.created - u64::from(self.len()) - self.untracked - self.expired
    }

    /// Renews the lease of `id` (whose hash is `hash`), if it is tracked: a sign of life at
    /// `now` ([`Monitor::seconds`]). Returns whether it was.
    fn renew(&mut self, hash: u64, id: &[u8], now: u32) -> bool {
        if self.slot_id() == Some(id) {
            self.slot_seen = now;
            true
        } else if self.overflowed > 0
            && let Some(tracked) = self.overflow.as_mut().and_then(|t| t.get_mut(hash, id))
        {
            tracked.seen = now;
            true
        } else {
            false
        }
    }

    /// Stops tracking the tasks with no sign of life for more than `lease` whole seconds by
    /// `now` (both in [`Monitor::seconds`]), counting them expired; returns how many. Their
    /// entries go to `ended` when given (task ends are recorded as metrics: by the caller, once
    /// the bucket's lock is released).
    #[cold]
    fn expire_idle(&mut self, now: u32, lease: u32, mut ended: Option<&mut Vec<Tracked>>) -> u32 {
        // Whole seconds, both rounded down: more than `lease` of them apart is at least a lease,
        // so a task never expires early (up to a second late).
        let idle = |seen: u32| now.saturating_sub(seen) > lease;
        let mut expired = 0;
        if self.slot_since.is_some() && idle(self.slot_seen) {
            let since = self.slot_since.take();
            if let (Some(since), Some(ended)) = (since, ended.as_deref_mut()) {
                ended.push(Ended::Slot(since).into_tracked());
            }
            expired += 1;
        }
        if self.overflowed > 0
            && let Some(table) = self.overflow.as_mut()
        {
            let gone = table.remove_where(|tracked| idle(tracked.seen), ended);
            self.overflowed -= gone;
            expired += gone;
        }
        self.expired += u64::from(expired);
        expired
    }

    /// The slot's task id, if it holds one.
    fn slot_id(&self) -> Option<&[u8]> {
        self.slot_since?;
        Some(&self.slot_id[..usize::from(self.slot_len)])
    }

    /// Gives back the places past one chunk once twice that many are spare, or every spare
    /// one while places are scarce (`scarce` is read under the bucket's lock, so it shows the
    /// exact path's setting).
    fn trim_places(&mut self, free: &AtomicUsize, scarce: &AtomicBool) {
        let spare = self.places - self.len();
        if spare == 0 {
            return;
        }
        if scarce.load(Ordering::Relaxed) {
            self.places -= spare;
            // Cleared before the places are counted back (release): a create that finds none
            // free after them (by a read-modify-write, acquire) sees it cleared.
            if free.load(Ordering::Relaxed) + spare as usize >= 2 * TASK_BUCKETS {
                scarce.store(false, Ordering::Relaxed);
            }
            free.fetch_add(spare as usize, Ordering::Release);
        } else if spare >= 2 * PLACES_CHUNK {
            let back = spare - PLACES_CHUNK;
            self.places -= back;
            free.fetch_add(back as usize, Ordering::Relaxed);
        }
    }

    /// Counts an end with `status` (the end itself is counted by the task's leaving, see
    /// [`BucketState::finished`]).
    fn count_end(&mut self, status: &TaskStatus) {
        if *status == TaskStatus::Failed {
            self.failed += 1;
        }
    }

    /// Whether `id` (whose hash is `hash`) is tracked.
    #[cfg(test)]
    fn contains(&self, hash: u64, id: &[u8]) -> bool {
        self.slot_id() == Some(id)
            || (self.overflowed > 0
                && self
                    .overflow
                    .as_ref()
                    .is_some_and(|table| table.contains(hash, id)))
    }

    /// Tracks `id` (whose hash is `hash`); an `id` tracked already is replaced and counted
    /// untracked (the monitor's creates renew a tracked task instead, so never do this).
    /// Inlined into the create path (its other caller is the cold exact path).
    #[inline(always)]
    fn insert(&mut self, hash: u64, id: &str, tracked: Tracked) {
        if self.remove(hash, id.as_bytes()).is_some() {
            self.untracked += 1;
        }
        let bytes = id.as_bytes();
        if self.slot_since.is_none() && bytes.len() <= SLOT_ID && tracked.pool.is_none() {
            self.slot_since = Some(tracked.since);
            self.slot_seen = tracked.seen;
            self.slot_len = bytes.len() as u8;
            self.slot_id[..bytes.len()].copy_from_slice(bytes);
        } else {
            self.insert_overflow(hash, id, tracked);
        }
    }

    /// [`BucketState::insert`] of a task the slot cannot hold (`id` is not tracked).
    #[cold]
    #[inline(never)]
    fn insert_overflow(&mut self, hash: u64, id: &str, tracked: Tracked) {
        let table = self.overflow.get_or_insert_with(Box::default);
        let replaced = table.insert(hash, id, tracked);
        debug_assert!(replaced.is_none(), "removed before");
        self.overflowed += 1;
    }

    /// Stops tracking `id` (whose hash is `hash`); returns what was tracked, if it was.
    #[inline]
    fn remove(&mut self, hash: u64, id: &[u8]) -> Option<Ended> {
        if self.slot_id() == Some(id) {
            return self.slot_since.take().map(Ended::Slot);
        }
        if self.overflowed == 0 {
            return None;
        }
        self.remove_overflow(hash, id).map(Ended::Entry)
    }

    /// [`BucketState::remove`] from `overflow`.
    #[cold]
    #[inline(never)]
    fn remove_overflow(&mut self, hash: u64, id: &[u8]) -> Option<Tracked> {
        let removed = self.overflow.as_mut()?.remove(hash, id)?;
        self.overflowed -= 1;
        Some(removed)
    }
}

/// Tracked tasks by the hash of their id, computed once per call (it also picks the bucket):
/// the map itself hashes nothing and compares `u64`s. An id whose hash another tracked id has
/// already waits in `collided` (almost never any), so a map entry is one task: no list to
/// check or free per entry, and fewer bytes moved and cache lines touched per create and end.
#[derive(Default)]
struct TaskTable {
    slots: HashMap<u64, (TaskKey, Tracked), BuildHasherDefault<Prehashed>>,
    /// Tracked tasks whose hash an entry of `slots` has too (every hash here is in `slots`).
    collided: Vec<(u64, TaskKey, Tracked)>,
}

impl TaskTable {
    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.len() + self.collided.len()
    }

    /// Tracks `id` (whose hash is `hash`); returns the entry it replaced, if it was tracked.
    /// Inlined into the create path (its other caller is the cold exact path).
    #[inline(always)]
    fn insert(&mut self, hash: u64, id: &str, tracked: Tracked) -> Option<Tracked> {
        match self.slots.entry(hash) {
            Entry::Vacant(vacant) => {
                vacant.insert((TaskKey::new(id), tracked));
                None
            }
            Entry::Occupied(occupied) => {
                let (key, old) = occupied.into_mut();
                if key.as_bytes() == id.as_bytes() {
                    Some(std::mem::replace(old, tracked))
                } else {
                    self.insert_collided(hash, id, tracked)
                }
            }
        }
    }

    /// [`TaskTable::insert`] of an id whose hash another tracked id has.
    #[cold]
    fn insert_collided(&mut self, hash: u64, id: &str, tracked: Tracked) -> Option<Tracked> {
        let same = self
            .collided
            .iter_mut()
            .find(|(h, key, _)| *h == hash && key.as_bytes() == id.as_bytes());
        match same {
            Some((_, _, old)) => Some(std::mem::replace(old, tracked)),
            None => {
                self.collided.push((hash, TaskKey::new(id), tracked));
                None
            }
        }
    }

    /// The entry of `id` (whose hash is `hash`), if it is tracked.
    fn get_mut(&mut self, hash: u64, id: &[u8]) -> Option<&mut Tracked> {
        match self.slots.get_mut(&hash) {
            Some((key, tracked)) if key.as_bytes() == id => Some(tracked),
            Some(_) => self
                .collided
                .iter_mut()
                .find(|(h, key, _)| *h == hash && key.as_bytes() == id)
                .map(|(.., tracked)| tracked),
            None => None,
        }
    }

    /// Stops tracking every task `idle` says, their entries going to `ended` when given;
    /// returns how many.
    fn remove_where(
        &mut self,
        idle: impl Fn(&Tracked) -> bool,
        mut ended: Option<&mut Vec<Tracked>>,
    ) -> u32 {
        let gone: Vec<(u64, Vec<u8>)> = self
            .slots
            .iter()
            .map(|(hash, (key, tracked))| (*hash, key, tracked))
            .chain(
                self.collided
                    .iter()
                    .map(|(hash, key, tracked)| (*hash, key, tracked)),
            )
            .filter(|(.., tracked)| idle(tracked))
            .map(|(hash, key, _)| (hash, key.as_bytes().to_vec()))
            .collect();
        // One by one, as an end removes them, so every collided hash stays in `slots`.
        for (hash, id) in &gone {
            let removed = self.remove(*hash, id);
            if let (Some(tracked), Some(ended)) = (removed, ended.as_deref_mut()) {
                ended.push(tracked);
            }
        }
        gone.len() as u32
    }

    /// Whether `id` (whose hash is `hash`) is tracked.
    #[cfg(test)]
    fn contains(&self, hash: u64, id: &[u8]) -> bool {
        self.slots
            .get(&hash)
            .is_some_and(|(key, _)| key.as_bytes() == id)
            || self
                .collided
                .iter()
                .any(|(h, key, _)| *h == hash && key.as_bytes() == id)
    }

    /// Stops tracking `id` (whose hash is `hash`); returns its entry, if it was tracked.
    fn remove(&mut self, hash: u64, id: &[u8]) -> Option<Tracked> {
        let Entry::Occupied(mut occupied) = self.slots.entry(hash) else {
            return None;
        };
        if occupied.get().0.as_bytes() != id {
            let at = self
                .collided
                .iter()
                .position(|(h, key, _)| *h == hash && key.as_bytes() == id)?;
            return Some(self.collided.swap_remove(at).2);
        }
        if self.collided.is_empty() {
            return Some(occupied.remove().1);
        }
        // Another id of this hash takes the entry's place, so every collided hash stays in
        // `slots`.
        Some(match self.collided.iter().position(|(h, ..)| *h == hash) {
            Some(at) => {
                let (_, key, tracked) = self.collided.swap_remove(at);
                std::mem::replace(occupied.get_mut(), (key, tracked)).1
            }
            None => occupied.remove().1,
        })
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

/// The longest task id tracked at all (a task with a longer id is counted as created and
/// untracked, never as ended, as when the table is full).
const MAX_TRACKED_ID: usize = 128;

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

/// A task no longer tracked: a slot's start (made a [`Tracked`] only when its end is
/// recorded), or its entry.
enum Ended {
    Slot(Instant),
    Entry(Tracked),
}

impl Ended {
    /// What was tracked.
    fn into_tracked(self) -> Tracked {
        match self {
            Ended::Slot(since) => Tracked {
                since,
                seen: 0,
                pool: None,
            },
            Ended::Entry(tracked) => tracked,
        }
    }
}

/// A created task whose end is awaited.
struct Tracked {
    since: Instant,
    /// Its last sign of life ([`Monitor::seconds`]).
    seen: u32,
    /// Its pool label, kept only when task ends are recorded as metrics (nothing else reads
    /// it, and a label kept is cloned at the create and dropped at the end).
    pool: Option<SharedString>,
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
        self.expire_idle_tasks(now);
        let requests = inner.window.total(now);
        let mut snapshot = Snapshot {
            rate: RateUsage {
                requests,
                quota: inner.quota,
                window: inner.window.window,
                fleet_requests: None,
                fleet_read_at: None,
            },
            pools: Vec::new(),
            queues: Vec::new(),
            rejections: BTreeMap::new(),
            rejections_other: 0,
            rejections_without_code: 0,
            tasks: self.task_counts(),
        };
        {
            let rejections = lock(&inner.rejections);
            snapshot.rejections = rejections.by_code.clone();
            snapshot.rejections_other = rejections.other;
            snapshot.rejections_without_code = rejections.without_code;
        }
        let sources: Vec<_> = self.read_sources().clone();
        for source in sources {
            source.fill(&mut snapshot);
        }
        if let Some(fleet) = snapshot.rate.fleet_requests {
            let read_at = snapshot.rate.fleet_read_at.unwrap_or(now).min(now);
            if now.saturating_duration_since(read_at) > inner.window.window {
                // Read longer ago than the window: it says nothing of the window now, and the
                // snapshot's usage would count it (the warning does not, see `FleetCount`).
                snapshot.rate.fleet_requests = None;
                snapshot.rate.fleet_read_at = None;
            } else {
                inner.fleet.note(&inner.window, fleet, read_at);
            }
        }
        self.check_rate(now, requests, || inner.window.total(now));
        self.check_pools(&snapshot);
        snapshot
    }

    /// [`snapshot`](Monitor::snapshot) after every source read again what takes a round trip
    /// ([`SnapshotSource::refresh`]): with the Redis backends, the fleet's pools and requests
    /// as they are now rather than as the previous snapshot found them.
    pub async fn refreshed_snapshot(&self) -> Snapshot {
        let sources: Vec<_> = self.read_sources().clone();
        for source in &sources {
            source.refresh().await;
        }
        self.snapshot()
    }

    /// Records that a task ended, for tasks whose end the layer cannot see (a callback).
    /// Returns whether the task was tracked; only tracked tasks are counted. A status that is
    /// not terminal does nothing here: hand every report to [`Monitor::task_reported`].
    pub fn task_finished(&self, task_id: &str, status: &TaskStatus) -> bool {
        if !status.is_terminal() {
            return false;
        }
        self.end_tracked(task_id, status, Instant::now)
    }

    /// Records a task's status reported from elsewhere (a callback), as a query's answer
    /// would: a terminal one ends the task ([`Monitor::task_finished`]), one still running
    /// renews its lease ([`MonitorBuilder::task_lease`]), so a task followed only by callbacks
    /// is not counted expired while it runs and its end is still counted. Returns whether the
    /// task was tracked.
    ///
    /// An end reported before the answer of the create that made the task was seen (a callback
    /// overtaking it) finds nothing tracked and is not kept: the task is then tracked until its
    /// lease runs out, and counted expired.
    pub fn task_reported(&self, task_id: &str, status: &TaskStatus) -> bool {
        if status.is_terminal() {
            return self.end_tracked(task_id, status, Instant::now);
        }
        let seen = self.seconds(Instant::now());
        self.renew(task_id, seen)
    }

    /// The task counts, summed over the buckets.
    fn task_counts(&self) -> TaskCounts {
        let mut counts = TaskCounts {
            created: 0,
            finished: 0,
            failed: 0,
            running: 0,
            expired: 0,
            untracked: 0,
        };
        for bucket in &self.inner.tasks {
            let state = lock(&bucket.0);
            counts.created += state.created;
            counts.finished += state.finished();
            counts.failed += state.failed;
            counts.running += u64::from(state.len());
            counts.expired += state.expired;
            counts.untracked += state.untracked;
        }
        counts
    }

    /// The hash of a task id, and its bucket, locked.
    fn bucket(&self, id: &[u8]) -> (u64, MutexGuard<'_, BucketState>) {
        let hash = self.inner.task_hasher.hash_one(id);
        (hash, lock(&self.inner.tasks[bucket_of(hash)].0))
    }

    /// Stops tracking a task that ended with `status` (terminal) at `now`, counts its end and
    /// records it; returns whether it was tracked (nothing is counted when not). Its entry is
    /// used here, not returned: moving it out went through the stack, in pieces that the
    /// reads after it waited for.
    fn end_tracked(&self, id: &str, status: &TaskStatus, now: impl FnOnce() -> Instant) -> bool {
        let id = id.as_bytes();
        let (hash, mut bucket) = self.bucket(id);
        let Some(tracked) = bucket.remove(hash, id) else {
            return false;
        };
        bucket.count_end(status);
        bucket.trim_places(&self.inner.free_places.0, &self.inner.scarce_places.0);
        drop(bucket);
        self.record_end(tracked, status, now());
        true
    }

    /// Tracks `id` (not tracked: the caller looked under the bucket's lock) in its locked
    /// bucket if one of the `max_tracked_tasks` places is free. The bucket uses a place it
    /// holds, else takes a chunk; when none is free it asks every bucket for its spare places
    /// (all locked, so the answer is exact: a task is refused only when `max_tracked_tasks` are
    /// tracked), unless places are scarce (then no bucket holds a spare one: none free means
    /// all are tracked).
    fn track(&self, hash: u64, id: &str, entry: Tracked, mut bucket: MutexGuard<'_, BucketState>) {
        let (free, scarce) = (&self.inner.free_places.0, &self.inner.scarce_places.0);
        if bucket.len() == bucket.places {
            let chunk = PLACES_CHUNK as usize;
            let taken = free.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n > 0).then(|| n - n.min(chunk))
            });
            match taken {
                // At most a chunk.
                Ok(n) => bucket.places += n.min(chunk) as u32,
                // No task may have gone past its lease since the last sweep finished (at most
                // one a second), and none free, read again by a read-modify-write (which sees
                // every place given back before it, that sweep's included, and the flag cleared
                // before those).
                Err(_)
                    if !self.sweep_due(entry.since)
                        && free
                            .compare_exchange(0, 0, Ordering::AcqRel, Ordering::Acquire)
                            .is_ok()
                        && scarce.load(Ordering::Acquire) =>
                {
                    bucket.untracked += 1;
                    return;
                }
                Err(_) => {
                    // Counted again under every lock: counted here, it would read as
                    // finished until then.
                    bucket.created -= 1;
                    drop(bucket);
                    return self.track_exactly(hash, id, entry);
                }
            }
        }
        bucket.insert(hash, id, entry);
        // A bucket that held places spare gives back what it need not keep.
        if bucket.places > bucket.len() {
            bucket.trim_places(free, scarce);
        }
    }

    /// [`Monitor::track`] when no place was free: collects the spare places of every bucket.
    #[cold]
    fn track_exactly(&self, hash: u64, id: &str, entry: Tracked) {
        #[cfg(test)]
        self.inner.exact_runs.fetch_add(1, Ordering::Relaxed);
        let free = &self.inner.free_places.0;
        let at = entry.since;
        let (now, lease) = (self.seconds(at), self.inner.task_lease_secs);
        // The expired tasks' entries, when their ends are recorded: after the locks.
        let mut ended = Vec::new();
        // In index order, and no other lock held: no deadlock with another call doing this.
        let mut buckets: Vec<_> = self.inner.tasks.iter().map(|b| lock(&b.0)).collect();
        // Every bucket is swept here, under the locks.
        self.inner
            .swept_at
            .store(now.saturating_add(1), Ordering::Relaxed);
        self.inner
            .swept
            .store(now.saturating_add(1), Ordering::Release);
        for state in &mut buckets {
            // Tasks past their lease give their places up first.
            if state.len() > 0 {
                let sink = self.inner.record_task_metrics.then_some(&mut ended);
                state.expire_idle(now, lease, sink);
            }
            let spare = state.places - state.len();
            state.places -= spare;
            free.fetch_add(spare as usize, Ordering::Relaxed);
        }
        // Every bucket locked and none holding a spare place: the flag is seen by every later
        // call on a bucket.
        let scarce = free.load(Ordering::Relaxed) < TASK_BUCKETS;
        self.inner.scarce_places.0.store(scarce, Ordering::Relaxed);
        let bucket = &mut buckets[bucket_of(hash)];
        // Tracked meanwhile by another create answering the same task: counted by that one,
        // and this answer is a sign of life of it.
        if !bucket.renew(hash, id.as_bytes(), entry.seen) {
            bucket.created += 1;
            if free.load(Ordering::Relaxed) > 0 {
                free.fetch_sub(1, Ordering::Relaxed);
                bucket.places += 1;
                bucket.insert(hash, id, entry);
            } else {
                bucket.untracked += 1;
            }
        }
        drop(buckets);
        self.record_expired(ended, at);
    }

    /// How many handles hold the monitor's state (clones, and the services' own `Arc`s).
    #[cfg(test)]
    pub(crate) fn holders(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// Whether task ends are recorded as metrics (their pool label is then kept).
    pub(crate) fn records_task_metrics(&self) -> bool {
        self.inner.record_task_metrics
    }

    /// The configured warning threshold.
    pub fn usage_threshold(&self) -> f64 {
        self.inner.threshold
    }

    /// `n` requests were sent: counted when the call was answered, as its attempts say, or when
    /// it was dropped after its request may have left.
    pub(crate) fn note_requests(&self, now: Instant, n: u64) {
        let inner = &*self.inner;
        let (epoch, own) = inner.window.count(now, n);
        let Some(fire_at) = inner.fire_at else {
            return;
        };
        // Counted in a step before the latest one checked (a response that arrived just
        // before a step began, its call ended just after another call was counted in the new
        // step): that step's cached sum of its earlier steps may lack these requests, and the
        // window is judged as it stands at that step, these included. The larger sum shrinks
        // the shares `surely_below` holds that step's counts to: marked now, before the total
        // is read, so no later request of that step skips the check on the old ones.
        if let Some(latest) = inner.window.checked_after(epoch) {
            let others = inner.window.recount_others(latest);
            inner.window.mark_if_near(latest, others, fire_at);
            let total = || inner.window.total_at(latest);
            return self.check_rate(now, total(), total);
        }
        // The window's total is only needed to check it against a quota, and only worked out
        // (reading every thread's count) when a warning may be due or re-armed.
        if inner.rate_warned.load(Ordering::Relaxed)
            || !inner.window.surely_below(epoch, own, fire_at)
        {
            let total = || inner.window.total_at(epoch);
            self.check_rate(now, total(), total);
        }
    }

    /// A final response (or error) with HTTP 429 and this code.
    pub(crate) fn note_rejection(&self, code: i64) {
        lock(&self.inner.rejections).note(code);
    }

    /// Counts a call's final answer among the rejections when it is a 429: under its Kling
    /// `code`, or apart when it carried no envelope (a proxy's page). A code Kling sends with
    /// HTTP 429 (1100–1102, 1302–1304) is one whatever the status it came with (a gateway's
    /// rewrite, a 200 carrying it), as the `kling_responses_total` series select it by code.
    /// Code 0 under HTTP 429 is no rejection: the code decides (kling-core's `Disposition`, which
    /// the retry and slots layers read too, makes it a success), so a create answered so counts
    /// once, as the task it made ([`Monitor::observe_tasks`]).
    #[inline]
    pub(crate) fn note_final(&self, status: http::StatusCode, code: Option<i64>) {
        let rejection = match code {
            Some(0) => false,
            Some(code) => {
                status == http::StatusCode::TOO_MANY_REQUESTS
                    || Code::from_i64(code).documented_status()
                        == Some(http::StatusCode::TOO_MANY_REQUESTS)
            }
            None => status == http::StatusCode::TOO_MANY_REQUESTS,
        };
        if !rejection {
            return;
        }
        match code {
            Some(code) => self.note_rejection(code),
            None => lock(&self.inner.rejections).without_code += 1,
        }
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
        if create {
            let pool = self.inner.record_task_metrics.then(|| pool.to_shared());
            let seen = self.seconds(now);
            for task in tasks {
                let entry = Tracked {
                    since: now,
                    seen,
                    pool: pool.clone(),
                };
                let id = task.id.as_bytes();
                let (hash, mut bucket) = self.bucket(id);
                // A task tracked already (a second create answering it: two calls naming one
                // external id) was counted when first answered: this answer reports on it as a
                // query's would, ending it or renewing its lease.
                if task.status.is_terminal() {
                    if let Some(tracked) = bucket.remove(hash, id) {
                        bucket.count_end(&task.status);
                        bucket.trim_places(&self.inner.free_places.0, &self.inner.scarce_places.0);
                        drop(bucket);
                        self.record_end(tracked, &task.status, now);
                        continue;
                    }
                    bucket.created += 1;
                    bucket.count_end(&task.status);
                    drop(bucket);
                    self.record_end(Ended::Entry(entry), &task.status, now);
                } else if bucket.renew(hash, id, seen) {
                    continue;
                } else if task.id.len() > MAX_TRACKED_ID {
                    // Far longer than Kling's ids (18 to 36 bytes): counted, not kept, so what
                    // a faulty upstream sends cannot grow the table by its bytes.
                    bucket.created += 1;
                    bucket.untracked += 1;
                } else {
                    bucket.created += 1;
                    self.track(hash, &task.id, entry, bucket);
                }
            }
            return;
        }
        // A query's or a list's reports: a task that ended stops being tracked; one still
        // running shows a sign of life, and its lease is renewed.
        let mut seen = None;
        for task in tasks {
            if task.status.is_terminal() {
                self.end_tracked(&task.id, &task.status, || now);
            } else if outcome.is_success() {
                let seen = *seen.get_or_insert_with(|| self.seconds(now));
                self.renew(&task.id, seen);
            }
        }
    }

    /// Renews the lease of `id`, if it is tracked: seen at `now` ([`Monitor::seconds`]).
    /// Returns whether it was.
    #[inline(never)]
    fn renew(&self, id: &str, now: u32) -> bool {
        let id = id.as_bytes();
        let (hash, mut bucket) = self.bucket(id);
        bucket.renew(hash, id, now)
    }

    /// Whole seconds from the monitor's start to `now`: when a tracked task was last seen.
    fn seconds(&self, now: Instant) -> u32 {
        let secs = now.saturating_duration_since(self.inner.started).as_secs();
        u32::try_from(secs).unwrap_or(u32::MAX)
    }

    /// Whether no sweep for tasks past their lease finished in the second of `now` (one
    /// running may not have given its places back yet).
    fn sweep_due(&self, now: Instant) -> bool {
        self.inner.swept.load(Ordering::Acquire) != self.seconds(now).saturating_add(1)
    }

    /// Stops tracking the tasks past their lease (no sign of life for it), counting them
    /// expired, and gives their places back; at most once a second (a lease is whole seconds).
    fn expire_idle_tasks(&self, at: Instant) {
        let inner = &*self.inner;
        let now = self.seconds(at);
        let last = inner.swept_at.load(Ordering::Relaxed);
        if last == now.saturating_add(1)
            || inner
                .swept_at
                .compare_exchange(
                    last,
                    now.saturating_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        let (free, scarce) = (&inner.free_places.0, &inner.scarce_places.0);
        // The expired tasks' entries, when their ends are recorded: after the locks.
        let mut ended = Vec::new();
        for bucket in inner.tasks.iter() {
            let mut state = lock(&bucket.0);
            let sink = inner.record_task_metrics.then_some(&mut ended);
            if state.len() > 0 && state.expire_idle(now, inner.task_lease_secs, sink) > 0 {
                state.trim_places(free, scarce);
            }
        }
        inner.swept.store(now.saturating_add(1), Ordering::Release);
        self.record_expired(ended, at);
    }

    /// Records the ends of tasks that expired at `now` (their entries are only collected when
    /// task ends are recorded); called with no bucket locked.
    fn record_expired(&self, ended: Vec<Tracked>, now: Instant) {
        for tracked in ended {
            Monitor::record_task_end(tracked, labels::TASK_EXPIRED, now);
        }
    }

    /// Records the metrics of a task's end, once its bucket counted it; inlined, so a monitor
    /// that does not record them costs a test of its flag.
    #[inline]
    fn record_end(&self, ended: Ended, status: &TaskStatus, now: Instant) {
        if self.inner.record_task_metrics {
            let tracked = ended.into_tracked();
            Monitor::record_task_end(tracked, labels::task_status(status), now);
        }
    }

    /// [`Monitor::record_end`] when task ends are recorded; `status` is the label value.
    #[inline(never)]
    fn record_task_end(tracked: Tracked, status: SharedString, now: Instant) {
        let pool = tracked.pool.unwrap_or(SharedString::const_str(""));
        let lifetime = now.saturating_duration_since(tracked.since);
        metrics::histogram!(TASK_LIFETIME, LABEL_POOL => pool.clone(), LABEL_STATUS => status.clone())
            .record(lifetime.as_secs_f64());
        metrics::counter!(TASKS_FINISHED, LABEL_POOL => pool, LABEL_STATUS => status).increment(1);
    }

    /// Fires or re-arms the rate warning for `requests` in the window at `now`; `fresh` reads
    /// the window again.
    ///
    /// A re-arm goes by a reading taken after the warning was seen fired: `requests` may have
    /// been read before another thread counted more and fired, and re-arming on it would let
    /// the next request fire the warning a second time in one crossing.
    fn check_rate(&self, now: Instant, requests: u64, fresh: impl FnOnce() -> u64) {
        let Some(quota) = self.inner.quota else {
            return;
        };
        let inner = &*self.inner;
        // The fleet's requests, as the last snapshot read them, count too: otherwise this
        // process's own count, far below the quota, would re-arm a warning the fleet fired.
        let fleet = inner.fleet.recent(&inner.window, now);
        let usage = requests.max(fleet) as f64 / f64::from(quota);
        let fresh = || fresh().max(fleet);
        let rearm_below = inner.threshold - inner.hysteresis;
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
        } else if usage < rearm_below
            && inner.rate_warned.load(Ordering::Acquire)
            && (fresh() as f64 / f64::from(quota)) < rearm_below
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

    /// Fires or re-arms each pool's warning on the snapshot's usage of it (a pool the snapshot
    /// shows with capacity 0, or not at all, is re-armed). Several sources may
    /// report one (account, pool) — stacks that share a monitor, each with its own slots — so
    /// each is judged once, on its highest usage: judged per report, one near full and one
    /// idle would fire and re-arm the warning on every snapshot.
    fn check_pools(&self, snapshot: &Snapshot) {
        let inner = &*self.inner;
        let mut highest: Vec<(&PoolUsage, f64)> = Vec::with_capacity(snapshot.pools.len());
        let mut seen: HashMap<(Option<&str>, &str), usize> = HashMap::new();
        for pool in &snapshot.pools {
            let Some(usage) = pool.usage() else { continue };
            match seen.entry((pool.account.as_deref(), pool.pool.as_str())) {
                Entry::Occupied(at) => {
                    let (_, most) = &mut highest[*at.get()];
                    *most = most.max(usage);
                }
                Entry::Vacant(at) => {
                    at.insert(highest.len());
                    highest.push((pool, usage));
                }
            }
        }
        let mut fired = Vec::new();
        {
            let mut warned = lock(&inner.pool_warned);
            // A pool no source reports now, or reports with no capacity, is not in use up to
            // any threshold: its warning is re-armed, so its next crossing warns again.
            if !warned.is_empty() {
                warned.retain(|(account, pool)| {
                    seen.contains_key(&(account.as_deref(), pool.as_str()))
                });
            }
            for (pool, usage) in highest {
                let key = (pool.account.clone(), pool.pool.clone());
                let was = warned.contains(&key);
                if usage >= inner.threshold && !was {
                    warned.insert(key);
                    fired.push(UsageWarning {
                        resource: Resource::Slots {
                            account: pool.account.clone(),
                            pool: pool.pool.clone(),
                        },
                        usage,
                        threshold: inner.threshold,
                    });
                } else if usage < inner.threshold - inner.hysteresis && was {
                    warned.remove(&key);
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

/// The bucket of a task id's hash: bits neither the overflow map's bucket index (low) nor its
/// tag (high) uses.
fn bucket_of(hash: u64) -> usize {
    (hash >> 32) as usize % TASK_BUCKETS
}

/// The fewest requests whose usage of `quota` (as [`Monitor::check_rate`] works it out)
/// reaches `threshold` (in (0, 1]).
fn fire_at(quota: u32, threshold: f64) -> u64 {
    let reaches = |requests: u64| requests as f64 / f64::from(quota) >= threshold;
    let mut requests = (threshold * f64::from(quota)).floor() as u64;
    while requests > 0 && reaches(requests - 1) {
        requests -= 1;
    }
    while !reaches(requests) {
        requests += 1;
    }
    requests
}

/// Locks a mutex; a panic elsewhere never poisons the monitor for good.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Buckets of the sliding window.
const BUCKETS: usize = 60;
/// Bits of a bucket word that hold the count; the rest hold the bucket's round.
const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
/// How many rounds a word can tell apart (the bits above the count).
const ROUNDS: u64 = 1 << (64 - COUNT_BITS);

/// A century (36,525 days), in nanoseconds.
const CENTURY_NANOS: u64 = 36_525 * 24 * 3600 * 1_000_000_000;

/// The shortest rate window. A word keeps the step's round (which pass over the 60 buckets)
/// in 40 bits, the bucket's index saying the rest, so a window's steps can be told apart for
/// 2^40 − 1 windows; from 3 ms on, that is more than a century. Past it, a round would wrap
/// and the counts read as another step's, 0 — as they did after 2^40 steps (13 days of
/// 60 µs windows) when words held the whole step number.
const MIN_RATE_WINDOW: Duration = Duration::from_millis(3);

// The last step of a century of the shortest window has its round in a word, with room for
// the `others` cache's round + 1.
const _: () = assert!(
    CENTURY_NANOS / (MIN_RATE_WINDOW.as_nanos() as u64 / BUCKETS as u64) + 1
        < (ROUNDS - 1) * BUCKETS as u64
);

fn pack(round: u64, count: u64) -> u64 {
    (round << COUNT_BITS) | count.min(COUNT_MASK)
}

fn unpack(word: u64) -> (u64, u64) {
    (word >> COUNT_BITS, word & COUNT_MASK)
}

/// The round of a step: which pass over the buckets it is in (its bucket is the rest).
fn round_of(epoch: u64) -> u64 {
    epoch / BUCKETS as u64
}

/// The bucket of a step.
fn slot_of(epoch: u64) -> usize {
    (epoch % BUCKETS as u64) as usize
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

/// Requests per sliding window, in 60 lock-free buckets per shard of threads.
///
/// Each bucket word packs the bucket's round (which step of the window it counts, with the
/// bucket's index: step = round × 60 + index) with its count, so a stale bucket is reset by the
/// same compare-and-swap that counts. A thread counts in its own shard (its own cache lines: a
/// count shared by every thread costs a cache-line transfer between cores on each request); the
/// window's total is the sum over the shards. The sum of the other 59 steps only changes when a
/// new step starts, so it is cached per step.
struct RateWindow {
    /// Tells this window's entry in [`EPOCH_CACHE`] from another's.
    id: u64,
    start: Instant,
    window: Duration,
    bucket_nanos: u64,
    shards: [Padded<[AtomicU64; BUCKETS]>; WINDOW_SHARDS],
    /// Per bucket, `pack(round + 1, sum of the other buckets within the window)` at the step
    /// of that round in that bucket (0: none yet).
    others: Padded<[AtomicU64; BUCKETS]>,
    /// The last step in which a shard's count reached its share of the requests left before
    /// a warning (see [`RateWindow::surely_below`]).
    near: AtomicU64,
    /// The latest step whose `others` sum was worked out, set before the sum is (see
    /// [`RateWindow::checked_after`]); on its own cache line, written once a step.
    latest: Padded<AtomicU64>,
}

/// Shards of the rate window's counts: one per lane, a thread counts in its lane's
/// ([`lanes::current`]).
const WINDOW_SHARDS: usize = lanes::LANES;

impl RateWindow {
    fn new(window: Duration, bucket_nanos: u64) -> Self {
        static IDS: AtomicU64 = AtomicU64::new(0);
        RateWindow {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            start: Instant::now(),
            window,
            bucket_nanos,
            shards: std::array::from_fn(|_| Padded(std::array::from_fn(|_| AtomicU64::new(0)))),
            others: Padded(std::array::from_fn(|_| AtomicU64::new(0))),
            near: AtomicU64::new(0),
            latest: Padded(AtomicU64::new(0)),
        }
    }

    /// Nanoseconds from the window's start to `now` (0 before it).
    fn nanos_since_start(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The step of the window `now` falls in: from this thread's cache of the last step seen
    /// when `now` is within it (two instant comparisons), else worked out (an instant
    /// subtraction and a division) and cached.
    /// Inlined: the cached case is a few comparisons, and the rest is out of line.
    #[inline]
    fn epoch(&self, now: Instant) -> u64 {
        if let Some(cached) = EPOCH_CACHE.get()
            && cached.window == self.id
            && cached.from <= now
            && now < cached.until
        {
            return cached.epoch;
        }
        self.epoch_uncached(now)
    }

    /// [`RateWindow::epoch`] when this thread's cache does not hold `now`: worked out and
    /// cached.
    #[cold]
    #[inline(never)]
    fn epoch_uncached(&self, now: Instant) -> u64 {
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
    #[cfg(test)]
    fn record(&self, now: Instant, n: u64) -> u64 {
        let (epoch, _) = self.count(now, n);
        self.total_at(epoch)
    }

    /// Counts `n` requests now in this thread's shard; returns the step and the requests in
    /// the shard's bucket. None are counted when the bucket holds a later step already: `now`
    /// is then a window or more before it, and the requests are outside the window.
    fn count(&self, now: Instant, n: u64) -> (u64, u64) {
        let epoch = self.epoch(now);
        let (round, slot) = (round_of(epoch), slot_of(epoch));
        let slot = &self.shards[lanes::current()].0[slot];
        let mut current = slot.load(Ordering::Relaxed);
        let count = loop {
            // One bucket: its rounds are in the order of its steps.
            let (r, c) = unpack(current);
            let next = match r.cmp(&round) {
                std::cmp::Ordering::Equal => pack(r, c.saturating_add(n)),
                std::cmp::Ordering::Less => pack(round, n),
                // The bucket counts a step a window or more after `now` already: requests
                // counted this late are outside the window (not in that step).
                std::cmp::Ordering::Greater => break 0,
            };
            match slot.compare_exchange_weak(current, next, Ordering::SeqCst, Ordering::Relaxed) {
                Ok(_) => break unpack(next).1,
                Err(actual) => current = actual,
            }
        };
        (epoch, count)
    }

    /// Whether the window surely holds fewer than `limit` requests at step `epoch`, given that
    /// this thread's shard counts `own` in it, without reading the other shards: the requests
    /// left before `limit` are split in equal shares, and while no shard's count reached its
    /// share the total is below `limit`. The first shard to reach its share marks the step
    /// (`near`), and from then on every call reads all shards.
    fn surely_below(&self, epoch: u64, own: u64, limit: u64) -> bool {
        let Some(left) = limit.checked_sub(self.others(epoch)) else {
            return false;
        };
        if own >= left / WINDOW_SHARDS as u64 {
            // Sequentially consistent with the counts' CAS and the loads of `total_at`: a call
            // that missed this mark counted before this call sums the shards.
            self.near.fetch_max(epoch, Ordering::SeqCst);
            return false;
        }
        self.near.load(Ordering::SeqCst) < epoch
    }

    /// Marks step `epoch` (`near`) when a shard's count in it reaches its share of what
    /// [`surely_below`](RateWindow::surely_below) leaves below `limit` with `others` (a sum
    /// just raised by requests counted late): those counts were held to larger shares, so
    /// none marked it, and another shard's request would skip a check the total may be due.
    /// A count this read misses was judged by its call on the raised sum (it read `others`
    /// after it was cached), or is seen by the check that follows the mark.
    #[cold]
    fn mark_if_near(&self, epoch: u64, others: u64, limit: u64) {
        let share = limit.saturating_sub(others) / WINDOW_SHARDS as u64;
        let (round, slot) = (round_of(epoch), slot_of(epoch));
        let reached = self.shards.iter().any(|shard| {
            let (r, count) = unpack(shard.0[slot].load(Ordering::SeqCst));
            r == round && count >= share
        });
        if reached {
            self.near.fetch_max(epoch, Ordering::SeqCst);
        }
    }

    /// The requests in the window at step `epoch`.
    fn total_at(&self, epoch: u64) -> u64 {
        self.others(epoch) + self.current(epoch)
    }

    /// The requests in the bucket of step `epoch`, over the shards.
    fn current(&self, epoch: u64) -> u64 {
        let (round, slot) = (round_of(epoch), slot_of(epoch));
        self.shards
            .iter()
            .map(|shard| unpack(shard.0[slot].load(Ordering::SeqCst)))
            .filter(|&(r, _)| r == round)
            .map(|(_, c)| c)
            .sum()
    }

    /// The requests in the buckets of the window at step `epoch` but its own.
    ///
    /// Worked out once a step and cached. Requests counted later in an earlier step (counted
    /// at the instant their answer arrived, a little before their call ended) are missing from
    /// the cache: the call that counts them sees the step [`checked_after`] theirs and
    /// [`recount_others`] it.
    ///
    /// [`checked_after`]: RateWindow::checked_after
    /// [`recount_others`]: RateWindow::recount_others
    fn others(&self, epoch: u64) -> u64 {
        let cache = &self.others.0[slot_of(epoch)];
        let (cached_round, cached) = unpack(cache.load(Ordering::SeqCst));
        if cached_round == round_of(epoch) + 1 {
            return cached;
        }
        self.recount_others(epoch)
    }

    /// Works out and caches [`RateWindow::others`] at step `epoch`; returns it. The step is
    /// published as the latest checked before the buckets are read, all sequentially
    /// consistent with the counts' CAS and [`RateWindow::checked_after`]'s load: requests this
    /// sum misses were counted after it was published, and their call sees the step. Sums of
    /// one step only grow with later reads, so the larger cached value wins.
    fn recount_others(&self, epoch: u64) -> u64 {
        self.latest.0.fetch_max(epoch, Ordering::SeqCst);
        let sum = self.sum(epoch, true);
        let word = pack(round_of(epoch) + 1, sum);
        let before = self.others.0[slot_of(epoch)].fetch_max(word, Ordering::SeqCst);
        match unpack(before) {
            (round, cached) if round == round_of(epoch) + 1 => cached.max(sum),
            _ => sum,
        }
    }

    /// The latest step whose earlier steps' sum was worked out, when it is after `epoch`, in
    /// which requests were just counted: that cached sum may lack them.
    fn checked_after(&self, epoch: u64) -> Option<u64> {
        let latest = self.latest.0.load(Ordering::SeqCst);
        (latest > epoch).then_some(latest)
    }

    /// The requests in the window ending now.
    fn total(&self, now: Instant) -> u64 {
        self.sum(self.epoch(now), false)
    }

    fn sum(&self, epoch: u64, skip_current: bool) -> u64 {
        let oldest = epoch.saturating_sub(BUCKETS as u64 - 1);
        self.shards
            .iter()
            .flat_map(|shard| shard.0.iter().enumerate())
            .map(|(slot, b)| {
                // Sequentially consistent: see `RateWindow::recount_others`.
                let (round, count) = unpack(b.load(Ordering::SeqCst));
                (round * BUCKETS as u64 + slot as u64, count)
            })
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

    /// What a create or an end of a task with an id of up to [`SLOT_ID_FIRST_LINE`] bytes
    /// touches is on the bucket's first cache line (which the mutex's layout could change).
    #[test]
    fn a_slot_task_of_a_short_id_is_on_the_locks_line() {
        let bucket = Bucket::default();
        let start = std::ptr::from_ref(&bucket) as usize;
        let state = lock(&bucket.0);
        let at = |field: usize| field - start;
        let first_line = [
            at(std::ptr::from_ref(&*state) as usize),
            at(std::ptr::from_ref(&state.created) as usize),
            at(std::ptr::from_ref(&state.places) as usize),
            at(std::ptr::from_ref(&state.overflowed) as usize),
            at(std::ptr::from_ref(&state.slot_since) as usize),
            at(std::ptr::from_ref(&state.slot_seen) as usize),
            at(std::ptr::from_ref(&state.slot_len) as usize),
        ];
        assert!(first_line.iter().all(|&at| at < 64), "{first_line:?}");
        let id = at(std::ptr::from_ref(&state.slot_id) as usize);
        assert_eq!(64 - id, SLOT_ID_FIRST_LINE);
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
            seen: 0,
            pool: Some(SharedString::const_str(pool)),
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
                    assert_eq!(
                        old.and_then(|t| t.pool),
                        expected.map(SharedString::const_str)
                    );
                } else {
                    let removed = table.remove(hash, id.as_bytes());
                    let expected = model.remove(&id);
                    assert_eq!(
                        removed.and_then(|t| t.pool),
                        expected.map(SharedString::const_str)
                    );
                }
                assert_eq!(table.len(), model.len());
            }
            assert!(model.len() > 10, "the run ends with tasks tracked");
        }
    }

    /// A bucket (its slot, then its overflow table) agrees with a plain map of ids: short and
    /// long ids, with and without a pool label, with real hashes and with hashes that collide,
    /// over a long run of random inserts and removes; the slot is used whenever it can be.
    #[test]
    fn a_bucket_agrees_with_a_map_of_ids_slot_or_overflow() {
        let hasher = foldhash::fast::RandomState::default();
        let long = "L".repeat(SLOT_ID);
        let origin = Instant::now();
        for (colliding, with_pools) in [(false, false), (true, false), (false, true), (true, true)]
        {
            let mut bucket = BucketState::default();
            let mut model: HashMap<String, (Option<&'static str>, Instant)> = HashMap::new();
            let mut state = 0x2545_f491_4f6c_dd1d_u64;
            let pools = ["a", "b", "c"];
            let (mut in_slot, mut in_overflow) = (0, 0);
            for step in 0..20_000 {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let n = (state >> 33) % 12;
                // Ids of the slot's longest length and one longer, and Kling-like ones.
                let id = match n % 4 {
                    0 => format!("{long}{n}"),
                    1 => format!("{}{n}", &long[..SLOT_ID - 1]),
                    _ => format!("86000000000000{n:04}"),
                };
                let hash = if colliding {
                    n % 2
                } else {
                    hasher.hash_one(id.as_bytes())
                };
                let pool = (with_pools && (state >> 40) & 1 == 0)
                    .then(|| pools[(state >> 20) as usize % 3]);
                let since =
                    origin + Duration::new(state >> 30, (state >> 8) as u32 % 1_000_000_000);
                let found = |entry: Option<Ended>| {
                    entry.map(Ended::into_tracked).map(|t| (t.pool, t.since))
                };
                let expected = |entry: Option<(Option<&'static str>, Instant)>| {
                    entry.map(|(pool, since)| (pool.map(SharedString::const_str), since))
                };
                if (state >> 50) & 1 == 0 {
                    let entry = Tracked {
                        since,
                        seen: 0,
                        pool: pool.map(SharedString::const_str),
                    };
                    let untracked = bucket.untracked;
                    bucket.insert(hash, &id, entry);
                    let was = model.insert(id.clone(), (pool, since));
                    // A task tracked already is replaced: the first goes untracked.
                    assert_eq!(
                        bucket.untracked - untracked,
                        u64::from(was.is_some()),
                        "{step}"
                    );
                } else {
                    let removed = bucket.remove(hash, id.as_bytes());
                    let was = model.remove(&id);
                    assert_eq!(found(removed), expected(was), "{step}");
                }
                for known in model.keys() {
                    let hash = if colliding {
                        (known.as_bytes()[known.len() - 1] - b'0') as u64 % 2
                    } else {
                        hasher.hash_one(known.as_bytes())
                    };
                    assert!(bucket.contains(hash, known.as_bytes()), "{step} {known}");
                }
                assert_eq!(bucket.len() as usize, model.len());
                let overflowed = bucket.overflow.as_ref().map_or(0, |table| table.len());
                assert_eq!(overflowed, bucket.overflowed as usize);
                // The slot holds only a task that fits it.
                if let Some(id) = bucket.slot_id() {
                    let id = std::str::from_utf8(id).unwrap();
                    assert!(id.len() <= SLOT_ID && model[id].0.is_none(), "{step} {id}");
                }
                in_slot += usize::from(bucket.slot_id().is_some());
                in_overflow += usize::from(bucket.overflowed > 0);
            }
            assert!(in_slot > 1_000 && in_overflow > 1_000, "both used");
        }
    }

    /// A task nobody follows stops counting as running at its lease, as the task slots give
    /// its slots back then, and its tracking place goes to the next task, whether a snapshot
    /// or a create that finds no place notices it first; a long id (kept apart from the
    /// bucket's slot) expires the same way.
    #[tokio::test(start_paused = true)]
    async fn a_task_nobody_follows_expires_at_its_lease_and_gives_its_place_back() {
        use std::time::Duration;

        let video = labels::pool(&crate::route::PoolRef::Product(kling_core::Product::Video));
        for (long, noticed_by_snapshot) in [(false, true), (false, false), (true, false)] {
            let monitor = Monitor::builder()
                .task_lease(Duration::from_secs(60))
                .max_tracked_tasks(1)
                .build()
                .unwrap();
            let id = |n: u32| {
                let pad = if long {
                    "x".repeat(SLOT_ID)
                } else {
                    String::new()
                };
                format!("{pad}{n}")
            };
            let create = |n: u32| {
                monitor.observe_tasks(true, &video, &outcome(&id(n), "submitted"), Instant::now());
            };
            create(1);
            // No place for a second task while the first is tracked.
            create(2);
            let tasks = monitor.snapshot().tasks;
            assert_eq!((tasks.created, tasks.running, tasks.expired), (2, 1, 0));

            // Whole seconds: past the lease, at most a second late.
            tokio::time::advance(Duration::from_secs(60)).await;
            assert_eq!(monitor.snapshot().tasks.running, 1, "not early");
            tokio::time::advance(Duration::from_secs(1)).await;
            if noticed_by_snapshot {
                let tasks = monitor.snapshot().tasks;
                assert_eq!((tasks.running, tasks.expired, tasks.finished), (0, 1, 0));
            }
            create(3);
            let tasks = monitor.snapshot().tasks;
            assert_eq!(
                (tasks.created, tasks.running, tasks.expired, tasks.finished),
                (3, 1, 1, 0),
                "long {long}, noticed by a snapshot {noticed_by_snapshot}"
            );
            // The expired task's end, seen later, is not counted: it is no longer tracked.
            monitor.observe_tasks(false, &video, &outcome(&id(1), "succeed"), Instant::now());
            assert_eq!(monitor.snapshot().tasks.finished, 0);
        }
    }

    /// A task a second create answers too (two calls naming one external id, a lookup's answer
    /// handed back as a create's) is one task: counted created once, a running answer renews
    /// its lease, and an ended one is its end, counted once, with its lifetime from the first
    /// answer; in the bucket's slot or its overflow map.
    #[tokio::test(start_paused = true)]
    async fn a_task_two_creates_answer_is_counted_once() {
        use std::time::Duration;

        let video = labels::pool(&crate::route::PoolRef::Product(kling_core::Product::Video));
        for long in [false, true] {
            let recorder = metrics_util::debugging::DebuggingRecorder::new();
            let snapshotter = recorder.snapshotter();
            let _guard = metrics::set_default_local_recorder(&recorder);
            let monitor = Monitor::builder()
                .task_lease(Duration::from_secs(60))
                .record_task_metrics(true)
                .build()
                .unwrap();
            let id = if long {
                "x".repeat(SLOT_ID + 1)
            } else {
                "860000000000000001".to_owned()
            };
            let create = |status: &str| {
                monitor.observe_tasks(true, &video, &outcome(&id, status), Instant::now());
            };
            let counts = || {
                let tasks = monitor.snapshot().tasks;
                (tasks.created, tasks.running, tasks.finished, tasks.expired)
            };
            create("submitted");
            tokio::time::advance(Duration::from_secs(50)).await;
            create("processing");
            assert_eq!(counts(), (1, 1, 0, 0), "long {long}");
            // Renewed by the second answer: not expired a lease after the first.
            tokio::time::advance(Duration::from_secs(30)).await;
            assert_eq!(counts(), (1, 1, 0, 0), "long {long}");
            create("succeed");
            assert_eq!(counts(), (1, 0, 1, 0), "long {long}");
            // Its query says so again: nothing more.
            monitor.observe_tasks(false, &video, &outcome(&id, "succeed"), Instant::now());
            assert_eq!(counts(), (1, 0, 1, 0), "long {long}");
            let lifetimes: Vec<f64> = snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .filter(|(key, ..)| key.key().name() == kling_core::metrics::TASK_LIFETIME)
                .flat_map(|(.., value)| match value {
                    metrics_util::debugging::DebugValue::Histogram(h) => {
                        h.into_iter().map(|v| v.into_inner()).collect()
                    }
                    _ => Vec::new(),
                })
                .collect();
            assert_eq!(lifetimes, [80.0], "long {long}");
        }
    }

    /// The exact path (taken when no place was free) finding the task tracked meanwhile, by
    /// another create answering it while no bucket was locked, counts no second task.
    #[tokio::test(start_paused = true)]
    async fn the_exact_path_counts_no_task_tracked_meanwhile() {
        let video = labels::pool(&crate::route::PoolRef::Product(kling_core::Product::Video));
        let monitor = Monitor::builder().max_tracked_tasks(1).build().unwrap();
        monitor.observe_tasks(true, &video, &outcome("t1", "submitted"), Instant::now());
        let (hash, bucket) = monitor.bucket(b"t1");
        drop(bucket);
        let entry = Tracked {
            since: Instant::now(),
            seen: 0,
            pool: None,
        };
        monitor.track_exactly(hash, "t1", entry);
        let tasks = monitor.snapshot().tasks;
        assert_eq!((tasks.created, tasks.running, tasks.finished), (1, 1, 0));
        assert!(monitor.task_finished("t1", &TaskStatus::Succeeded));
        let tasks = monitor.snapshot().tasks;
        assert_eq!((tasks.created, tasks.running, tasks.finished), (1, 0, 1));
    }

    /// A report that a task still runs renews its lease: it expires a lease after the last one.
    #[tokio::test(start_paused = true)]
    async fn a_running_report_renews_a_tasks_lease() {
        use std::time::Duration;

        let video = labels::pool(&crate::route::PoolRef::Product(kling_core::Product::Video));
        let monitor = Monitor::builder()
            .task_lease(Duration::from_secs(60))
            .build()
            .unwrap();
        let long = "y".repeat(SLOT_ID + 1);
        for id in ["t1", long.as_str()] {
            monitor.observe_tasks(true, &video, &outcome(id, "submitted"), Instant::now());
        }
        tokio::time::advance(Duration::from_secs(40)).await;
        for id in ["t1", long.as_str()] {
            monitor.observe_tasks(false, &video, &outcome(id, "processing"), Instant::now());
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        let tasks = monitor.snapshot().tasks;
        assert_eq!((tasks.running, tasks.expired), (2, 0));
        tokio::time::advance(Duration::from_secs(1)).await;
        let tasks = monitor.snapshot().tasks;
        assert_eq!((tasks.running, tasks.expired), (0, 2));
    }

    /// Seconds are counted whole: a task created late in a second still gets its whole lease
    /// (a lease under a second, as a speeded-up stack's may be, is one).
    #[tokio::test(start_paused = true)]
    async fn a_task_never_expires_before_its_lease() {
        use std::time::Duration;

        let video = labels::pool(&crate::route::PoolRef::Product(kling_core::Product::Video));
        let monitor = Monitor::builder()
            .task_lease(Duration::from_millis(500))
            .build()
            .unwrap();
        tokio::time::advance(Duration::from_millis(990)).await;
        monitor.observe_tasks(true, &video, &outcome("t1", "submitted"), Instant::now());
        // 20 ms on, the clock's second has changed: not expired.
        tokio::time::advance(Duration::from_millis(20)).await;
        assert_eq!(monitor.snapshot().tasks.running, 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(monitor.snapshot().tasks.expired, 1);
    }

    #[test]
    fn a_zero_task_lease_is_refused_and_a_fraction_of_a_second_rounds_up() {
        let err = Monitor::builder()
            .task_lease(std::time::Duration::ZERO)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("task_lease"), "{err}");
        let monitor = Monitor::builder()
            .task_lease(std::time::Duration::from_millis(1_500))
            .build()
            .unwrap();
        assert_eq!(monitor.inner.task_lease_secs, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn tasks_are_tracked_until_they_end_whatever_the_length_of_their_id() {
        let monitor = Monitor::default();
        let video = labels::pool(&crate::route::PoolRef::Product(kling_core::Product::Video));
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

    /// An id longer than any Kling sends is counted, never stored: the table's memory per task
    /// is bounded whatever an upstream answers.
    #[tokio::test(start_paused = true)]
    async fn a_task_id_longer_than_kling_sends_is_counted_not_kept() {
        let monitor = Monitor::default();
        let video = labels::pool(&crate::route::PoolRef::Product(kling_core::Product::Video));
        let kept = |monitor: &Monitor| -> u32 {
            monitor.inner.tasks.iter().map(|b| lock(&b.0).len()).sum()
        };
        monitor.observe_tasks(
            true,
            &video,
            &outcome(&"z".repeat(MAX_TRACKED_ID), "submitted"),
            Instant::now(),
        );
        assert_eq!(kept(&monitor), 1);
        monitor.observe_tasks(
            true,
            &video,
            &outcome(&"z".repeat(100_000), "submitted"),
            Instant::now(),
        );
        assert_eq!(kept(&monitor), 1, "the long one is not stored");
        let tasks = monitor.snapshot().tasks;
        assert_eq!((tasks.created, tasks.running, tasks.untracked), (2, 1, 1));
        // Its end is not seen (it was never tracked): it stays untracked.
        let long = outcome(&"z".repeat(100_000), "succeed");
        monitor.observe_tasks(false, &video, &long, Instant::now());
        let tasks = monitor.snapshot().tasks;
        assert_eq!((tasks.finished, tasks.untracked), (0, 1));
        assert_adds_up(&tasks);
    }

    /// A source's figure for the fleet counts against the quota: the snapshot fires the
    /// warning this process's own requests would not, the process's requests do not re-arm
    /// it while the figure is recent, a lower figure does, and a figure older than the window
    /// no longer counts.
    #[tokio::test(start_paused = true)]
    async fn the_fleets_requests_count_against_the_quota() {
        let fired = Arc::new(Mutex::new(Vec::new()));
        let fleet = Arc::new(AtomicU64::new(90));
        let monitor = {
            let fired = Arc::clone(&fired);
            Monitor::builder()
                .rate_quota(100, Duration::from_secs(60))
                .on_usage_warning(move |w| fired.lock().unwrap().push(w.usage))
                .build()
                .unwrap()
        };
        {
            let fleet = Arc::clone(&fleet);
            monitor.add_source(move |snapshot: &mut Snapshot| {
                snapshot.rate.fleet_requests = Some(fleet.load(Ordering::Relaxed));
            });
        }
        monitor.note_requests(Instant::now(), 5);
        let snapshot = monitor.snapshot();
        assert_eq!(
            (snapshot.rate.requests, snapshot.rate.fleet_requests),
            (5, Some(90))
        );
        assert_eq!(snapshot.rate.percent(), Some(90.0));
        assert_eq!(*fired.lock().unwrap(), [0.9]);
        // This process's requests alone are far below: they do not re-arm the warning.
        monitor.note_requests(Instant::now(), 1);
        fleet.store(90, Ordering::Relaxed);
        monitor.snapshot();
        assert_eq!(
            fired.lock().unwrap().len(),
            1,
            "fired again: re-armed by 6 requests"
        );
        // The fleet's requests fall: re-armed; they rise again: a second warning.
        fleet.store(10, Ordering::Relaxed);
        monitor.snapshot();
        fleet.store(85, Ordering::Relaxed);
        monitor.snapshot();
        assert_eq!(*fired.lock().unwrap(), [0.9, 0.85]);
        // A figure older than the window counts no more: this process's requests re-arm.
        tokio::time::advance(Duration::from_secs(61)).await;
        monitor.note_requests(Instant::now(), 1);
        assert!(!monitor.inner.rate_warned.load(Ordering::Relaxed));
    }

    /// A fleet's figure ages from when its source read it, not from the snapshot that showed
    /// it: a source showing its last read (Redis unreachable since) stops counting against the
    /// quota a window after that read.
    #[tokio::test(start_paused = true)]
    async fn a_fleet_figure_ages_from_its_read() {
        let monitor = Monitor::builder()
            .rate_quota(100, Duration::from_secs(60))
            .build()
            .unwrap();
        let read_at = Instant::now();
        monitor.add_source(move |snapshot: &mut Snapshot| {
            snapshot.rate.fleet_requests = Some(95);
            snapshot.rate.fleet_read_at = Some(read_at);
        });
        tokio::time::advance(Duration::from_secs(50)).await;
        monitor.snapshot();
        assert!(monitor.inner.rate_warned.load(Ordering::Relaxed));
        // 61 s after the read (11 after the snapshot): the figure is past its window, and
        // this process's few requests re-arm the warning.
        tokio::time::advance(Duration::from_secs(11)).await;
        monitor.note_requests(Instant::now(), 1);
        assert!(
            !monitor.inner.rate_warned.load(Ordering::Relaxed),
            "a figure read 61 s ago still counted"
        );
    }

    /// A figure a source read before the monitor was built (a source shared with an earlier
    /// stack) ages from that read too: noted as read at the monitor's start, it held the
    /// warning for as long again past its window.
    #[tokio::test(start_paused = true)]
    async fn a_fleet_figure_read_before_the_monitor_was_built_ages_from_its_read() {
        let read_at = Instant::now();
        tokio::time::advance(Duration::from_secs(30)).await;
        let monitor = Monitor::builder()
            .rate_quota(100, Duration::from_secs(60))
            .build()
            .unwrap();
        monitor.add_source(move |snapshot: &mut Snapshot| {
            snapshot.rate.fleet_requests = Some(95);
            snapshot.rate.fleet_read_at = Some(read_at);
        });
        monitor.snapshot();
        assert!(monitor.inner.rate_warned.load(Ordering::Relaxed));
        // 61 s after the read (31 after the monitor's start).
        tokio::time::advance(Duration::from_secs(31)).await;
        monitor.note_requests(Instant::now(), 1);
        assert!(
            !monitor.inner.rate_warned.load(Ordering::Relaxed),
            "a figure read 61 s ago still counted"
        );
    }

    /// The snapshot's usage counts a fleet figure as the warning does: not once it is a window
    /// older than its read (a source still showing its last read, its store unreachable since).
    #[tokio::test(start_paused = true)]
    async fn a_snapshots_usage_leaves_out_a_fleet_figure_older_than_the_window() {
        let monitor = Monitor::builder()
            .rate_quota(100, Duration::from_secs(60))
            .build()
            .unwrap();
        let read_at = Instant::now();
        monitor.add_source(move |snapshot: &mut Snapshot| {
            snapshot.rate.fleet_requests = Some(95);
            snapshot.rate.fleet_read_at = Some(read_at);
        });
        monitor.note_requests(Instant::now(), 5);
        tokio::time::advance(Duration::from_secs(59)).await;
        let fresh = monitor.snapshot().rate;
        assert_eq!(
            (fresh.fleet_requests, fresh.percent()),
            (Some(95), Some(95.0))
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        monitor.note_requests(Instant::now(), 3);
        let stale = monitor.snapshot().rate;
        assert_eq!(
            (stale.requests, stale.fleet_requests, stale.fleet_read_at),
            (3, None, None),
            "a figure read 61 s ago is still shown as the fleet's"
        );
        assert_eq!(stale.percent(), Some(3.0));
    }

    #[test]
    fn rejections_keep_documented_codes_and_a_bounded_number_of_others() {
        let monitor = Monitor::builder().build().unwrap();
        // An upstream answering 429s with a new code each time.
        for code in 0..100 {
            monitor.note_rejection(9_000 + code);
        }
        // Documented codes are counted by number however many others came first.
        monitor.note_rejection(1302);
        monitor.note_rejection(1302);
        monitor.note_rejection(1303);
        // A kept undocumented code goes on counting in its place.
        monitor.note_rejection(9_000);
        let snapshot = monitor.snapshot();
        assert_eq!(snapshot.rejections.len(), UNDOCUMENTED_REJECTION_CODES + 2);
        assert_eq!(snapshot.rejections_of(9_000), 2);
        assert_eq!(snapshot.rejections_of(9_031), 1);
        assert_eq!(snapshot.rejections_of(9_032), 0);
        assert_eq!(
            (snapshot.rejections_of(1302), snapshot.rejections_of(1303)),
            (2, 1)
        );
        assert_eq!(snapshot.rejections_other, 100 - 32);
        assert_eq!(snapshot.rejections_total(), 104);
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
        let video = labels::pool(&crate::route::PoolRef::Product(kling_core::Product::Video));
        let create = |id: &str| {
            monitor.observe_tasks(true, &video, &outcome(id, "submitted"), Instant::now())
        };
        for id in ["a", "b", "c", "d", "e"] {
            create(id);
        }
        // Answered by a second create: one task, one place.
        create("a");
        let tasks = monitor.snapshot().tasks;
        assert_eq!((tasks.created, tasks.running, tasks.untracked), (5, 3, 2));
        assert_adds_up(&tasks);
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
            (7, 2, 1, 2)
        );
        // "d", "e" and "g" found no place.
        assert_eq!(tasks.untracked, 3);
        assert_adds_up(&tasks);
    }

    /// Once every place is taken, creates are refused without locking every bucket (the exact
    /// path runs once, for the first refusal), and a place an end frees is taken by the next
    /// create, whichever bucket it falls in.
    #[tokio::test(start_paused = true)]
    async fn with_every_place_taken_creates_are_refused_without_the_exact_path() {
        let monitor = Monitor::builder().max_tracked_tasks(3).build().unwrap();
        let video = labels::pool(&crate::route::PoolRef::Product(kling_core::Product::Video));
        let create = |id: &str| {
            monitor.observe_tasks(true, &video, &outcome(id, "submitted"), Instant::now());
        };
        for id in ["a", "b", "c"] {
            create(id);
        }
        let exact_runs = || monitor.inner.exact_runs.load(Ordering::Relaxed);
        assert_eq!(exact_runs(), 0);
        for n in 0..200 {
            create(&format!("refused-{n}"));
        }
        assert_eq!(exact_runs(), 1, "only the first refusal locks every bucket");
        assert_places(&monitor, 3, 3);
        for n in 0..50 {
            assert!(monitor.task_finished(["a", "b", "c"][n % 3], &TaskStatus::Succeeded));
            create(&format!("next-{n}"));
            create(&format!("refused-again-{n}"));
            assert!(!monitor.task_finished(&format!("refused-again-{n}"), &TaskStatus::Failed));
            assert!(monitor.task_finished(&format!("next-{n}"), &TaskStatus::Failed));
            create(["a", "b", "c"][n % 3]);
        }
        assert_places(&monitor, 3, 3);
        assert_eq!(exact_runs(), 1);
        let tasks = monitor.snapshot().tasks;
        assert_eq!(
            (tasks.created, tasks.finished, tasks.failed, tasks.running),
            (3 + 200 + 150, 100, 50, 3)
        );
        // Refused on the exact path once, then without it.
        assert_eq!(tasks.untracked, 200 + 50);
        assert_adds_up(&tasks);
    }

    #[test]
    fn concurrent_calls_count_every_task_once() {
        let monitor = Monitor::default();
        let video = labels::pool(&crate::route::PoolRef::Product(kling_core::Product::Video));
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
        assert_places(&monitor, DEFAULT_MAX_TRACKED_TASKS, 0);
    }

    /// One thread creates tasks while two others end each one as soon as it is created,
    /// racing for it, through buckets holding several tasks (slot and overflow, short and long
    /// ids): each task's end is counted once, and the counts and places add up.
    #[test]
    fn tasks_ended_by_racing_threads_are_counted_once() {
        // Rounds, so a lost race shows: a check and a removal under two locks (both enders
        // told they ended the task) failed 3 runs in 4 with 8 rounds.
        for _ in 0..24 {
            tasks_ended_by_racing_threads_are_counted_once_in(&Monitor::default());
        }
    }

    fn tasks_ended_by_racing_threads_are_counted_once_in(monitor: &Monitor) {
        const IDS: usize = 6_000;
        let video = labels::pool(&crate::route::PoolRef::Product(kling_core::Product::Video));
        let ids: Vec<String> = (0..IDS)
            .map(|n| match n % 7 {
                0 => format!("{}-{n}", "x".repeat(SLOT_ID)),
                _ => format!("8600000000{n:08}"),
            })
            .collect();
        let ended: Vec<AtomicUsize> = (0..IDS).map(|_| AtomicUsize::new(0)).collect();
        let created = AtomicUsize::new(0);
        let status = |n: usize| {
            if n.is_multiple_of(5) {
                TaskStatus::Failed
            } else {
                TaskStatus::Succeeded
            }
        };
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for (n, id) in ids.iter().enumerate() {
                    monitor.observe_tasks(true, &video, &outcome(id, "submitted"), Instant::now());
                    created.store(n + 1, Ordering::Release);
                }
            });
            for _ in 0..2 {
                scope.spawn(|| {
                    for (n, id) in ids.iter().enumerate() {
                        while created.load(Ordering::Acquire) <= n {
                            std::thread::yield_now();
                        }
                        if monitor.task_finished(id, &status(n)) {
                            ended[n].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        for (n, count) in ended.iter().enumerate() {
            assert_eq!(count.load(Ordering::Relaxed), 1, "{}", ids[n]);
        }
        let tasks = monitor.snapshot().tasks;
        assert_eq!(
            (tasks.created, tasks.finished, tasks.failed, tasks.running),
            (IDS as u64, IDS as u64, IDS as u64 / 5, 0)
        );
        assert_places(monitor, DEFAULT_MAX_TRACKED_TASKS, 0);
    }

    /// Two threads create and end tasks with few places (so creates often take the exact path,
    /// which locks every bucket) while a third takes snapshots: no snapshot sees the finished
    /// count fall, or more tasks finished and running than created. (A create counted before
    /// the exact path, rather than under its locks, read as finished meanwhile: this failed in
    /// its first round.)
    #[test]
    fn snapshots_taken_meanwhile_never_see_a_count_fall() {
        let video = labels::pool(&crate::route::PoolRef::Product(kling_core::Product::Video));
        for _ in 0..2 {
            let monitor = Monitor::builder().max_tracked_tasks(8).build().unwrap();
            let done = AtomicBool::new(false);
            let snapshots = AtomicUsize::new(0);
            let (new, ended) = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..2)
                    .map(|thread| {
                        let (monitor, video) = (&monitor, &video);
                        scope.spawn(move || {
                            // Creates of a task not tracked (a thread's ids are its own, so
                            // whether one is tracked changes only here): a create answering
                            // a tracked one is no new task.
                            // And the ends seen, counted apart from the snapshot, whose
                            // finished tasks are its creates neither running, expired nor
                            // untracked: with them, `untracked` is checked.
                            let (mut new, mut ended) = (0, 0);
                            for n in 0..3_000 {
                                let id = format!("t{thread}-{}", n % 16);
                                let (hash, bucket) = monitor.bucket(id.as_bytes());
                                new += u64::from(!bucket.contains(hash, id.as_bytes()));
                                drop(bucket);
                                let created = outcome(&id, "submitted");
                                monitor.observe_tasks(true, video, &created, Instant::now());
                                if n % 2 == 1 {
                                    let id = format!("t{thread}-{}", (n + 5) % 16);
                                    ended += u64::from(
                                        monitor.task_finished(&id, &TaskStatus::Succeeded),
                                    );
                                }
                            }
                            (new, ended)
                        })
                    })
                    .collect();
                scope.spawn(|| {
                    let mut last = 0;
                    while !done.load(Ordering::Acquire) {
                        let tasks = monitor.snapshot().tasks;
                        assert!(tasks.finished >= last, "{} then {}", last, tasks.finished);
                        assert!(tasks.created >= tasks.finished + tasks.running);
                        last = tasks.finished;
                        snapshots.fetch_add(1, Ordering::Relaxed);
                    }
                });
                let counted: Vec<(u64, u64)> =
                    workers.into_iter().map(|w| w.join().unwrap()).collect();
                done.store(true, Ordering::Release);
                counted
                    .iter()
                    .fold((0, 0), |(new, ended), (n, e)| (new + n, ended + e))
            });
            let tasks = monitor.snapshot().tasks;
            assert_eq!(tasks.created, new);
            assert!(new > 1_000, "{new}");
            assert_eq!(tasks.finished, ended);
            assert!(tasks.untracked > 0, "{tasks:?}");
            assert_eq!(tasks.created, ended + tasks.running + tasks.untracked);
            assert_places(&monitor, 8, tasks.running as usize);
            assert!(snapshots.load(Ordering::Relaxed) > 10);
        }
    }

    /// The fewest requests that fire a warning, as `check_rate` works usage out.
    #[test]
    fn fire_at_is_the_fewest_requests_whose_usage_reaches_the_threshold() {
        for quota in [1, 2, 3, 7, 10, 60, 100, 997, 1_000_000, u32::MAX] {
            for threshold in [0.01, 0.1, 0.3, 0.5, 0.7, 0.8, 0.95, 0.999, 1.0] {
                let at = fire_at(quota, threshold);
                let usage = |n: u64| n as f64 / f64::from(quota);
                assert!(usage(at) >= threshold, "{quota} {threshold}");
                assert!(usage(at - 1) < threshold, "{quota} {threshold}");
            }
        }
    }

    /// Pools that crossed the threshold and came back under it (one per model name, say)
    /// leave no warning state behind.
    #[test]
    fn pools_back_under_the_threshold_leave_no_warning_state() {
        use std::sync::atomic::AtomicU32;
        let monitor = Monitor::builder()
            .usage_threshold(0.8)
            .hysteresis(0.1)
            .build()
            .unwrap();
        let round = Arc::new(AtomicU32::new(0));
        let source = Arc::clone(&round);
        // Round n shows model n's pool full and model n - 1's empty.
        monitor.add_source(move |s: &mut Snapshot| {
            let n = source.load(Ordering::Relaxed);
            s.pools
                .push(crate::PoolUsage::new(format!("video:m-{n}"), 5, 5, 0));
            if n > 0 {
                s.pools
                    .push(crate::PoolUsage::new(format!("video:m-{}", n - 1), 0, 5, 0));
            }
        });
        for n in 0..100 {
            round.store(n, Ordering::Relaxed);
            monitor.snapshot();
        }
        // Only the pool still full is remembered as warned.
        assert_eq!(lock(&monitor.inner.pool_warned).len(), 1);
    }

    /// Requests noted one at a time, from threads in turn (so from several shards): the
    /// warning fires at the request that brings usage to the threshold, and only then.
    #[test]
    fn the_rate_warning_fires_at_the_request_that_reaches_the_threshold_whatever_the_thread() {
        for (quota, threshold) in [(100, 0.8), (1_000, 0.5), (37, 0.9), (5, 1.0), (4_000, 0.99)] {
            let fired = Arc::new(Mutex::new(Vec::new()));
            let monitor = {
                let fired = Arc::clone(&fired);
                Monitor::builder()
                    .rate_quota(quota, Duration::from_secs(3600))
                    .usage_threshold(threshold)
                    .on_usage_warning(move |warning| fired.lock().unwrap().push(warning.usage))
                    .build()
                    .unwrap()
            };
            let at = fire_at(quota, threshold);
            let mut sent = 0;
            for thread in 0..2 * WINDOW_SHARDS as u64 {
                std::thread::scope(|scope| {
                    scope.spawn(|| {
                        // Unequal runs, so shards reach their shares at different times.
                        for _ in 0..(u64::from(quota) / 7 + thread % 3) {
                            monitor.note_requests(Instant::now(), 1);
                            sent += 1;
                            let fired = fired.lock().unwrap();
                            assert_eq!(fired.len(), usize::from(sent >= at), "{quota} {sent}");
                        }
                    });
                });
            }
            assert_eq!(monitor.snapshot().rate.requests, sent);
            if sent >= at {
                assert_eq!(fired.lock().unwrap()[0], at as f64 / f64::from(quota));
            }
        }
    }

    /// A reading older than the firing of the warning (another thread counted more and fired
    /// meanwhile) does not re-arm it, so the next request does not fire it again.
    #[tokio::test(start_paused = true)]
    async fn a_reading_from_before_the_warning_fired_does_not_rearm_it() {
        let fired = Arc::new(AtomicUsize::new(0));
        let monitor = {
            let fired = Arc::clone(&fired);
            Monitor::builder()
                .rate_quota(10, Duration::from_secs(60))
                .on_usage_warning(move |_| {
                    fired.fetch_add(1, Ordering::Relaxed);
                })
                .build()
                .unwrap()
        };
        for _ in 0..8 {
            monitor.note_requests(Instant::now(), 1);
        }
        assert_eq!(fired.load(Ordering::Relaxed), 1);
        // What a thread that summed the window at 3 requests, before the others were counted,
        // asks once it sees the warning fired.
        let now = Instant::now();
        let epoch = monitor.inner.window.epoch(now);
        monitor.check_rate(now, 3, || monitor.inner.window.total_at(epoch));
        monitor.note_requests(Instant::now(), 1);
        assert_eq!(fired.load(Ordering::Relaxed), 1, "one warning per crossing");
        // A fresh reading below the hysteresis re-arms it: the window moved on.
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(monitor.snapshot().rate.requests, 0);
        for _ in 0..8 {
            monitor.note_requests(Instant::now(), 1);
        }
        assert_eq!(fired.load(Ordering::Relaxed), 2);
    }

    /// A request counted in an earlier step than one whose earlier steps' sum is cached (a
    /// response that arrived just before a step began, its future polled just after another
    /// call was counted in the new step) is seen by the warning at once: the request that takes
    /// the window to the threshold fires it, whichever step it lands in, and the next request
    /// of the new step counts it too.
    #[tokio::test(start_paused = true)]
    async fn a_request_counted_in_an_earlier_step_is_seen_by_the_warning_at_once() {
        let second = |n: u64| Instant::now() + Duration::from_millis(n * 1000 + 500);
        for late_first in [true, false] {
            let fired = Arc::new(AtomicUsize::new(0));
            let monitor = {
                let fired = Arc::clone(&fired);
                Monitor::builder()
                    .rate_quota(10, Duration::from_secs(60))
                    .on_usage_warning(move |_| {
                        fired.fetch_add(1, Ordering::Relaxed);
                    })
                    .build()
                    .unwrap()
            };
            if late_first {
                // 7 at 3.5 s, then 1 answered at 2.5 s, a step earlier: 8 of 10 in the window.
                monitor.note_requests(second(3), 7);
                assert_eq!(fired.load(Ordering::Relaxed), 0);
                monitor.note_requests(second(2), 1);
                assert_eq!(
                    fired.load(Ordering::Relaxed),
                    1,
                    "the late request fires it"
                );
            } else {
                // 6 at 3.5 s, 1 answered at 2.5 s (7), then the 8th at 3.5 s.
                monitor.note_requests(second(3), 6);
                monitor.note_requests(second(2), 1);
                assert_eq!(fired.load(Ordering::Relaxed), 0);
                monitor.note_requests(second(3), 1);
                assert_eq!(fired.load(Ordering::Relaxed), 1, "the 8th request fires it");
            }
            assert_eq!(monitor.inner.window.total(second(3)), 8);
        }
    }

    /// Requests counted late into an earlier step raise the sum of the current step's earlier
    /// steps, so each shard's share of the requests left before a warning shrinks: a shard
    /// whose count passed its new share unmarked let another shard's request skip the check
    /// and the warning fire late. Three threads in turn, on two shards: 20 requests at 3.5 s
    /// on one (below its share of 200), 179 answered at 2.5 s and counted after (199), then
    /// the 200th at 3.5 s on the other shard, which must fire it.
    #[tokio::test(start_paused = true)]
    async fn a_request_after_late_counts_fires_the_warning_it_reaches_on_any_shard() {
        let fired = Arc::new(Mutex::new(Vec::new()));
        let monitor = {
            let fired = Arc::clone(&fired);
            Monitor::builder()
                .rate_quota(250, Duration::from_secs(60))
                .on_usage_warning(move |warning| fired.lock().unwrap().push(warning.usage))
                .build()
                .unwrap()
        };
        assert_eq!(monitor.inner.fire_at, Some(200));
        let second = |n: u64| Instant::now() + Duration::from_millis(n * 1000 + 500);
        let (now, before) = (second(3), second(2));
        // Runs `work` on a new thread whose lane (shard) is not `avoid`; returns its lane.
        let on_a_thread = |avoid: Option<usize>, work: &(dyn Fn() + Sync)| loop {
            let lane = std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        let lane = lanes::current();
                        if Some(lane) != avoid {
                            work();
                        }
                        lane
                    })
                    .join()
                    .unwrap()
            });
            if Some(lane) != avoid {
                return lane;
            }
        };
        let first = on_a_thread(None, &|| {
            for _ in 0..20 {
                monitor.note_requests(now, 1);
            }
        });
        on_a_thread(None, &|| monitor.note_requests(before, 179));
        assert!(fired.lock().unwrap().is_empty(), "199 of 200");
        on_a_thread(Some(first), &|| monitor.note_requests(now, 1));
        assert_eq!(*fired.lock().unwrap(), [0.8], "the 200th request fires it");
        assert_eq!(monitor.inner.window.total(now), 200);
    }

    /// Two threads hammering the window (in its shards) at once: the snapshot counts every
    /// request, and a warning due is fired once.
    #[test]
    fn concurrent_requests_are_all_counted_and_a_due_warning_fires_once() {
        for quota in [None, Some(30_000), Some(u32::MAX)] {
            let fired = Arc::new(AtomicUsize::new(0));
            let mut builder = Monitor::builder();
            if let Some(quota) = quota {
                let fired = Arc::clone(&fired);
                builder = builder
                    .rate_quota(quota, Duration::from_secs(3600))
                    .usage_threshold(0.5)
                    .on_usage_warning(move |_| {
                        fired.fetch_add(1, Ordering::Relaxed);
                    });
            }
            let monitor = builder.build().unwrap();
            std::thread::scope(|scope| {
                for _ in 0..2 {
                    scope.spawn(|| {
                        for n in 0..10_000 {
                            monitor.note_requests(Instant::now(), 1 + n % 2);
                        }
                    });
                }
            });
            assert_eq!(monitor.snapshot().rate.requests, 30_000);
            let due = quota == Some(30_000);
            assert_eq!(fired.load(Ordering::Relaxed), usize::from(due), "{quota:?}");
        }
    }

    /// Checks that the places free and held add up to `max` and that `running` are tracked.
    fn assert_places(monitor: &Monitor, max: usize, running: usize) {
        let inner = &*monitor.inner;
        let (mut held, mut tracked) = (0, 0);
        for bucket in &inner.tasks {
            let state = lock(&bucket.0);
            assert!(state.places >= state.len());
            held += state.places as usize;
            tracked += state.len() as usize;
        }
        assert_eq!(tracked, running);
        assert_eq!(inner.free_places.0.load(Ordering::Relaxed) + held, max);
    }

    /// The places taken in chunks agree with one count of tracked tasks against the maximum
    /// (what the monitor did before chunks): random creates (some of ids tracked already) and
    /// ends, for small and large maximums, so both the chunks and the exact path run.
    #[tokio::test(start_paused = true)]
    async fn tracking_in_chunks_agrees_with_one_count_against_the_maximum() {
        let video = labels::pool(&crate::route::PoolRef::Product(kling_core::Product::Video));
        let mut state = 0x853c_49e6_748f_ea9b_u64;
        for max in [0, 1, 3, 17, 64, 65, 300, 5_000] {
            let monitor = Monitor::builder().max_tracked_tasks(max).build().unwrap();
            let mut model: HashMap<String, Instant> = HashMap::new();
            // Creates, ends and failed ends seen (the snapshot counts them all), and creates
            // refused a place.
            let (mut created, mut finished, mut failed, mut untracked) = (0, 0, 0, 0);
            for step in 0..6_000u32 {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let id = format!("t{}", (state >> 33) % 400);
                let now = Instant::now();
                if (state >> 20).is_multiple_of(11) {
                    // A create answered failed: the end of a task tracked already, else a task
                    // counted and ended at once, never tracked.
                    monitor.observe_tasks(true, &video, &outcome(&id, "failed"), now);
                    created += u64::from(model.remove(&id).is_none());
                    (finished, failed) = (finished + 1, failed + 1);
                } else if !(state >> 20).is_multiple_of(3) {
                    monitor.observe_tasks(true, &video, &outcome(&id, "submitted"), now);
                    // A task tracked already is not created again; another one is tracked
                    // only while a place is free.
                    if !model.contains_key(&id) {
                        created += 1;
                        if model.len() < max {
                            model.insert(id, now);
                        } else {
                            untracked += 1;
                        }
                    }
                } else {
                    let ended = monitor.task_finished(&id, &TaskStatus::Succeeded);
                    assert_eq!(ended, model.remove(&id).is_some(), "{max} {step} {id}");
                    finished += u64::from(ended);
                }
                if step % 97 == 0 {
                    assert_places(&monitor, max, model.len());
                    let tasks = monitor.snapshot().tasks;
                    assert_eq!(
                        (tasks.created, tasks.finished, tasks.failed, tasks.running),
                        (created, finished, failed, model.len() as u64),
                        "{max} {step}"
                    );
                    assert_eq!(tasks.untracked, untracked, "{max} {step}");
                    tokio::time::advance(Duration::from_millis(1)).await;
                }
            }
            assert_places(&monitor, max, model.len());
            let tasks = monitor.snapshot().tasks;
            assert_eq!(
                (tasks.created, tasks.finished, tasks.failed, tasks.running),
                (created, finished, failed, model.len() as u64),
                "{max}"
            );
            assert_eq!(tasks.untracked, untracked, "{max}");
            assert_adds_up(&tasks);
        }
    }

    /// Every created task is finished, running, expired or untracked.
    fn assert_adds_up(tasks: &TaskCounts) {
        assert_eq!(
            tasks.created,
            tasks.finished + tasks.running + tasks.expired + tasks.untracked,
            "{tasks:?}"
        );
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

    /// Requests counted late, at an instant a window or more before a later step already
    /// counted in their bucket, are outside the window: they are not added to that later
    /// step's count.
    #[tokio::test(start_paused = true)]
    async fn requests_counted_a_window_late_are_not_counted_in_a_later_step() {
        let window = RateWindow::new(Duration::from_secs(60), 1_000_000_000);
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);
        assert_eq!(window.record(at(61_500), 1), 1);
        // The same bucket, a window earlier: it left the window before it was counted.
        window.count(at(1_500), 3);
        assert_eq!(window.total(at(61_500)), 1);
        assert_eq!(window.total(at(62_500)), 1);
        // A step later than the bucket's is counted afresh.
        assert_eq!(window.record(at(121_500), 2), 2);
        assert_eq!(window.total(at(121_500)), 2);
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

    /// A window whose steps could not be told apart for a century (a word keeps 40 bits of a
    /// step's round) is refused, naming the field; the shortest allowed, the usual ones and
    /// the longest are accepted.
    #[test]
    fn rate_windows_too_short_to_last_a_century_are_refused() {
        let build = |window| Monitor::builder().rate_quota(10, window).build();
        for window in [
            Duration::from_nanos(60),
            Duration::from_micros(60),
            MIN_RATE_WINDOW - Duration::from_nanos(1),
            Duration::from_secs(366 * 24 * 3600),
        ] {
            let err = build(window).unwrap_err();
            assert_eq!(err.field(), "rate_quota", "{window:?}");
            assert!(err.to_string().contains("between 3 ms and a year"), "{err}");
        }
        for window in [
            MIN_RATE_WINDOW,
            Duration::from_millis(60),
            Duration::from_secs(1),
            Duration::from_secs(60),
            Duration::from_secs(365 * 24 * 3600),
        ] {
            assert!(build(window).is_ok(), "{window:?}");
        }
    }

    /// The window counts right however long the process has run: past 2^40 steps (two years
    /// of the shortest window; 13 days of a 60 µs one, when it was allowed, after which every
    /// count read 0) and up to a century, and it still forgets a step a window later.
    #[test]
    fn the_window_counts_right_for_a_century_of_its_shortest_steps() {
        const YEAR: u64 = 365 * 24 * 3600;
        for length in [
            MIN_RATE_WINDOW,
            Duration::from_millis(60),
            Duration::from_secs(60),
        ] {
            for after in [
                Duration::from_secs(13 * 24 * 3600),
                Duration::from_secs(2 * YEAR),
                Duration::from_secs(50 * YEAR),
                Duration::from_nanos(CENTURY_NANOS) - length * 2,
            ] {
                let window = RateWindow::new(length, length.as_nanos() as u64 / BUCKETS as u64);
                let at = window.start + after;
                let step = Duration::from_nanos(window.bucket_nanos);
                assert_eq!(window.record(at, 3), 3, "{length:?} after {after:?}");
                assert_eq!(window.record(at + step, 2), 5, "{length:?} after {after:?}");
                assert_eq!(window.total(at + step), 5, "{length:?} after {after:?}");
                // A window after the first step, only the second's requests are left.
                assert_eq!(window.total(at + length), 2, "{length:?} after {after:?}");
                assert_eq!(
                    window.total(at + length + step),
                    0,
                    "{length:?} after {after:?}"
                );
            }
        }
    }
}
