//! [`RedisSlots`]: the task-slot [`SlotBackend`] in Redis.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::Poll;
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use kling_concurrency::SlotsConfig;
use kling_concurrency::backend::{
    Applied, CreatePath, PoolSnapshot, ReleaseReason, Released, Reservation, SlotBackend, SlotKey,
    SlotOp, TaskRef,
};
use kling_concurrency::error::{AcquireError, BackendError, Halted, OverCapacity, QueueFull};
use kling_core::error::{ApiError, BoxError};
use kling_core::metrics::{self as names, call_recorder, each_completing};
use kling_core::signals::{CreateHalts, HaltedAccounts};
use kling_core::{AccountId, Outcome, Pool, TaskStatus};
use redis::{Script, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::conn::{Connection, MAX_DURATION, micros, segment};
use crate::error::{ConfigError, StoreError};
use crate::slots_lua;
use crate::unreachable::{DEFAULT_RETRY_EVERY, WhenUnreachable};

/// How often a waiting create asks Redis again when no release was announced, by default.
pub const DEFAULT_POLL_EVERY: Duration = Duration::from_secs(1);
/// How often each process replays what it could not send, checks Redis kept its state and
/// prunes its own record of the slots it holds, by default.
pub const DEFAULT_MAINTAIN_EVERY: Duration = Duration::from_secs(1);
/// How long new creates wait after Redis lost its state, so every process can register the
/// slots it holds again first, by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3);
/// How long a waiting create's place in the fleet's queue outlives its process's last ask, by
/// default, as a multiple of [`poll_every`](RedisSlots::poll_every).
pub const DEFAULT_PLACE_TTL_POLLS: u32 = 3;
/// How many task reports (one per task: a later report of a task replaces its earlier
/// renewal) a process keeps for replay while Redis is away. Past it, the oldest renewal is
/// dropped (the task's next query renews its lease again), then, with no renewal left, the
/// oldest report of an end (that task's slots stay held until its lease runs out; its hold,
/// if kept too, becomes a give-back; the end of a task whose hold is on its way to Redis is
/// kept, and the next dropped instead). A replayed report that fails again is held to it too.
/// Other changes (grants given back, tasks held, halts, capacities) are never dropped: they
/// follow this process's own creates.
pub const MAX_PENDING_REPORTS: usize = 4096;

/// The task slots' state in Redis, shared by every process of a fleet: implements
/// [`kling_concurrency::backend::SlotBackend`] for
/// [`TaskSlotsLayer::with_backend`](kling_concurrency::TaskSlotsLayer::with_backend).
///
/// - **Weighted slots per account and pool**, each holding recorded with its lease in a sorted
///   set by deadline; every change is one atomic script. A task's slots are released exactly
///   once by task id (or external id, within the reporting account: external ids are unique
///   per account only), whichever of query, callback, `complete` or lease comes first; a task
///   reported running renews its lease; expired leases are released (and hidden slots that
///   are due come back) in the next script that touches the pool, a create's included: with
///   `max_queue(0)` a create is refused only after that.
/// - **Waiting**: FIFO within the process (only the head of a pool asks Redis); the head
///   sleeps until a release is announced on the `PREFIX:freed` channel (pub/sub), the next
///   lease deadline or recovery step, or at the latest [`poll_every`](Self::poll_every). A
///   renewal that brings the next deadline forward is announced there too.
/// - **Fleet order**: across processes, freed slots go to creates in the order they arrived
///   (fleet time). Each waiting head holds a place in the pool's queue in Redis, renewed by
///   every ask; a create that gives up leaves it at once, and a place whose process stopped
///   asking ends after [`place_ttl`](Self::place_ttl). [`arrival_order(false)`](Self::arrival_order)
///   serves whoever asks first instead.
/// - **Shared learning**: a 1303 lowers the pool's capacity in Redis for the whole fleet (with
///   kling-concurrency's rule, streak of 1303s at the same level included); a 1102 halts the account for every process until
///   [`SlotsHandle::reset_halt`](kling_concurrency::SlotsHandle::reset_halt), broadcast on
///   `PREFIX:halted` (a reset on `PREFIX:unhalted`) so that every process stops at once the
///   creates it granted already and still holds below the slots; run-time capacities are
///   stored in Redis.
/// - **State loss**: every process keeps a record of the slots it holds; when a script finds
///   Redis has lost its state (restart without persistence) or come back older (a restart from
///   a snapshot, a failover: another server's `run_id`, or a script number no greater than one
///   seen before), the fleet registers its slots again (with the task ids they are held
///   under) during a [`grace`](Self::grace) in which no create is admitted; each process
///   releases its own holdings that came back although it gave them up and reports again the
///   ends it reported lately, and a task reported ended is not registered or held again.
/// - **Unreachable Redis**: see [`WhenUnreachable`]; changes that could not be sent are kept
///   in order and replayed when Redis is back.
/// - **Reservations** are checked: a give-back, `1303` or `1102` frees only the grant of the
///   reservation's pool and weight under its token, in the script (a stale copy of a grant
///   given back or kept under a task already, or a forged one, frees and hides nothing; its
///   `1102` still halts the account), and a hold of one no grant of this process holds counts
///   its slots anew, under a holding of its own; each is logged as a warning.
/// - **Gauges**: each process records the slots it holds and its waiting creates (summed over
///   the fleet, the fleet's use and queue) and the fleet's capacity of its pools as its
///   maintenance pass last read it (one process's figure is the fleet's).
///
/// # Clone
///
/// Clones share the connection, the local queues, the record of held slots and the replay
/// queue.
#[derive(Clone)]
pub struct RedisSlots {
    inner: Arc<Inner>,
}

/// This process's pools kept before the unused ones are dropped ([`Inner::local`]).
const LOCAL_POOLS_BEFORE_DROPPING: usize = 64;

struct PoolLocal {
    key: SlotKey,
    fifo: tokio::sync::Mutex<()>,
    notify: Notify,
    waiters: AtomicUsize,
    /// Whether the queue's head was last told to wait (no free slot): while it is, this
    /// process's creates in flight are all waiting, and `max_queue` counts them.
    blocked: AtomicBool,
    gauges: PoolGauges,
}

/// The `kling_slots_waiters` and `kling_slots_capacity` gauges of one of this process's pools.
///
/// Each process shows its own waiting creates, so summed over the fleet the waiters gauge is
/// the fleet's queue; each shows the fleet's capacity as it last read it (the configured one
/// until its first maintenance pass), so a dashboard takes one process's figure, or the
/// largest. Both move by differences, as the in-process backend's do: pools past the first
/// model names share one label, and their figures add up.
///
/// They move in drops too (a waiting create's, a pool's): while the thread unwinds, a metrics
/// recorder's panic is caught ([`call_recorder`]: one escaping a drop then would abort the
/// process), and a move the recorder did not make is made with the next one.
struct PoolGauges {
    waiters: metrics::Gauge,
    capacity: metrics::Gauge,
    /// The capacity this pool last added to its gauge.
    shown_capacity: Mutex<u32>,
    /// The moves of the waiters gauge the recorder did not make (it panicked), made with the
    /// next one.
    waiters_owed: AtomicI64,
}

impl PoolGauges {
    fn new(key: &SlotKey, capacity: u32) -> Self {
        let labels = pool_labels(key);
        let gauges = PoolGauges {
            waiters: metrics::gauge!(names::SLOTS_WAITERS, &labels),
            capacity: metrics::gauge!(names::SLOTS_CAPACITY, &labels),
            // (Nothing shown yet: should the recorder panic now, the drop takes nothing out.)
            shown_capacity: Mutex::new(0),
            waiters_owed: AtomicI64::new(0),
        };
        gauges.show_capacity(capacity);
        gauges
    }

    /// Moves the capacity gauge to `capacity` for this pool.
    fn show_capacity(&self, capacity: u32) {
        let mut shown = lock(&self.shown_capacity);
        if *shown != capacity
            && call_recorder(|| {
                self.capacity
                    .increment(f64::from(capacity) - f64::from(*shown));
            })
        {
            *shown = capacity;
        }
    }

    /// Moves the waiters gauge by `by`, and by the moves owed. Should the recorder panic, the
    /// whole move is owed to the next one.
    fn move_waiters(&self, by: i64) {
        let total = by + self.waiters_owed.swap(0, Ordering::Relaxed);
        let apply = std::panic::AssertUnwindSafe(|| {
            if total != 0 {
                self.waiters.increment(total as f64);
            }
        });
        if let Err(panic) = std::panic::catch_unwind(apply) {
            self.waiters_owed.fetch_add(total, Ordering::Relaxed);
            if !std::thread::panicking() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

impl Drop for PoolGauges {
    /// A pool this process forgets takes its share out of the capacity gauge (it has no
    /// waiters: each holds the pool).
    fn drop(&mut self) {
        let shown = *lock(&self.shown_capacity);
        if shown != 0 {
            call_recorder(|| self.capacity.decrement(f64::from(shown)));
        }
    }
}

/// The holdings this process has, by holding id, and the `kling_slots_in_use` gauge they move:
/// each process shows the slots it holds, so summed over the fleet the gauge is the fleet's
/// use (a holding another process released leaves at the next maintenance pass). Only
/// `insert`, `remove` and `retain` change the set, so the gauge follows every change.
///
/// The gauge follows in [`show`](Registry::show), called once the change is made whole (sent
/// to Redis or queued for it, the reply's bookkeeping done): a metrics recorder that panics
/// there loses no change, and a move it did not make is made at the next `show`.
#[derive(Debug, Default)]
struct Registry {
    held: HashMap<String, Held>,
    /// The moves of the in-use gauges not shown yet, by pool.
    unshown: HashMap<SlotKey, i64>,
}

impl Registry {
    fn insert(&mut self, h: String, held: Held) {
        self.moved(&held.key, i64::from(held.weight));
        if let Some(old) = self.held.insert(h, held) {
            self.moved(&old.key, -i64::from(old.weight));
        }
    }

    fn remove(&mut self, h: &str) -> Option<Held> {
        let old = self.held.remove(h)?;
        self.moved(&old.key, -i64::from(old.weight));
        Some(old)
    }

    fn retain(&mut self, mut keep: impl FnMut(&String, &Held) -> bool) {
        let mut gone = Vec::new();
        self.held.retain(|h, held| {
            let kept = keep(h, held);
            if !kept {
                gone.push((held.key.clone(), held.weight));
            }
            kept
        });
        for (key, weight) in gone {
            self.moved(&key, -i64::from(weight));
        }
    }

    /// Notes a move of `key`'s in-use gauge, shown by [`show`](Registry::show).
    fn moved(&mut self, key: &SlotKey, by: i64) {
        *self.unshown.entry(key.clone()).or_default() += by;
    }

    /// Moves the in-use gauges by what the set changed since they were last shown. Each
    /// pool's move is forgotten once made: a recorder that panics leaves it for the next call.
    fn show(&mut self) {
        while let Some((key, by)) = self.unshown.iter().next().map(|(k, by)| (k.clone(), *by)) {
            if by != 0 {
                in_use_gauge(&key).increment(by as f64);
            }
            self.unshown.remove(&key);
        }
    }

    /// A holding, to note its task id or that Redis has it (never its key or weight).
    fn get_mut(&mut self, h: &str) -> Option<&mut Held> {
        self.held.get_mut(h)
    }
}

impl std::ops::Deref for Registry {
    type Target = HashMap<String, Held>;

    fn deref(&self) -> &HashMap<String, Held> {
        &self.held
    }
}

/// The labels of `key`'s pool's gauges, as the in-process backend labels them.
/// (Both interned: no allocation for a hold's or a release's gauge.)
fn pool_labels(key: &SlotKey) -> [(&'static str, &'static str); 2] {
    [
        (
            names::LABEL_ACCOUNT,
            names::account_label(key.account.as_str()),
        ),
        (names::LABEL_POOL, names::pool_label(Some(&key.pool))),
    ]
}

/// The in-use gauge of `key`'s pool.
fn in_use_gauge(key: &SlotKey) -> metrics::Gauge {
    metrics::gauge!(names::SLOTS_IN_USE, &pool_labels(key))
}

/// A holding this process has (its record, for replay and re-registration).
#[derive(Clone, Debug)]
struct Held {
    key: SlotKey,
    pk: String,
    weight: u32,
    id: Option<String>,
    ext: Option<String>,
    /// The create path it was sent to, as the scripts keep it ([`path_arg`]; empty: not
    /// known): a report of another path's task does not find it by external id.
    path: String,
    task: bool,
    since: Instant,
    lease: Duration,
    /// When a report of ours last said the task runs (`None`: not since `since`): its lease
    /// runs from then.
    renewed: Option<Instant>,
    /// The lease Redis had for it when a maintenance pass last read it: when the pass read
    /// it, and when that lease ends. Another process's report of the task (a query, a
    /// callback) renews it there, unseen by `renewed`.
    in_redis: Option<(Instant, Instant)>,
    /// Known to exist in Redis (pruned when it no longer does).
    registered: bool,
    /// A task a reconcile adopted: a create of unknown outcome under its external id, in a
    /// pool of its account and product, is the same task (see `APPLY`'s `supersede_ext`).
    adopted: bool,
}

impl Held {
    /// What is left of its lease at `now`, as far as this process knows: from its own last
    /// word on the task, or to the end of the lease Redis had when a maintenance pass read it
    /// after that word, if later (a report of the task by another process renewed it there);
    /// `None` once it ran out. Never sooner than its own word: a report of ours made before
    /// the pass may have reached Redis after it.
    fn lease_left(&self, now: Instant) -> Option<Duration> {
        let from = self.renewed.unwrap_or(self.since);
        let end = match (from.checked_add(self.lease), self.in_redis) {
            (Some(own), Some((read, until))) if read >= from => Some(own.max(until)),
            (own, _) => own,
        };
        match end {
            Some(end) => Some(end.checked_duration_since(now)?).filter(|left| !left.is_zero()),
            None => Some(self.lease),
        }
    }
}

/// Where this process's numbering stood when it sent a script ([`Inner::saw_state`]).
#[derive(Clone, Copy, Debug)]
struct SentIn {
    generation: i64,
    seq: i64,
}

/// What a script's number says, given where this process stood when it sent the script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Numbered {
    /// The script met a new generation (`lost`): numbers start afresh from it.
    Afresh,
    /// No greater than one seen before sending, in the same generation: the store went back.
    WentBack,
    /// A later number (or one in a generation another answer told of since it was sent).
    Later,
}

/// [`Inner::saw_state`]'s rule for a script numbered `seq` in `generation`, sent in `before`.
fn numbered(lost: bool, generation: i64, seq: i64, before: SentIn) -> Numbered {
    if lost {
        Numbered::Afresh
    } else if generation == before.generation && before.seq > 0 && seq <= before.seq {
        Numbered::WentBack
    } else {
        Numbered::Later
    }
}

/// How long the end of a reported task is remembered, by the process that reported it and in
/// `P:ended` (whose expiry a process only ever lengthens): this process's lease, at least the
/// default, since a holding that comes back with an older snapshot would hold its slots that
/// long.
fn ends_kept_for(config: &SlotsConfig) -> Duration {
    config.get_lease().max(kling_concurrency::DEFAULT_LEASE)
}
/// How many reported ends a process remembers, the oldest forgotten first.
const MAX_ENDS_KEPT: usize = 4096;

/// The arguments an `upd` command starts with: the command, the lease, the account, `"1"` if
/// an end that finds no holding is noted ([`notes_unheld_ends`]; ends sent again, as first
/// reported), the change's id (`""`: none; see [`Inner::change_id`]), and the create path of
/// the tasks reported ([`path_arg`]); the reports follow, four arguments each.
fn upd_head(
    lease: Duration,
    account: &AccountId,
    note: bool,
    once: String,
    path: &str,
) -> [String; 6] {
    [
        "upd".to_owned(),
        micros(lease).to_string(),
        account.as_str().to_owned(),
        if note { "1" } else { "0" }.to_owned(),
        once,
        path.to_owned(),
    ]
}

/// A [`CreatePath`] as the scripts keep it: its number in decimal, empty when not known.
/// Every process of a fleet must number paths alike (kling-concurrency's hash of the path),
/// which the README's section on mixed versions says.
fn path_arg(path: CreatePath) -> String {
    if path == CreatePath::UNKNOWN {
        return String::new();
    }
    path.number().to_string()
}

/// Whether a holding of the create path `held` may be a task a report of `report` names (both
/// as [`path_arg`] gives them; empty: not known, either).
fn may_be(held: &str, report: &str) -> bool {
    held.is_empty() || report.is_empty() || held == report
}

/// Whether an `upd` of `reports` tasks `heard` notes an end that finds no holding: only a
/// report of one task does (a callback, a query of it: the way an end overtakes its create's
/// answer; a batch's many long-released tasks would push those out of `P:ended`), never a list
/// page, however few tasks it names (one naming a task long ended alone, a legacy list's last
/// page, would free a later create of unknown outcome under its external id), as in the
/// in-process backend.
fn notes_unheld_ends(heard: Heard, reports: usize) -> bool {
    heard == Heard::Report && reports == 1
}

/// What told of the tasks an `upd` reports ([`notes_unheld_ends`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Heard {
    /// A report of its tasks: a query's or a batch's answer, a callback, `complete`.
    Report,
    /// A list page ([`SlotBackend::observe_list_on`]).
    List,
}

/// The end of a task this process reported (an `upd` report).
#[derive(Clone, Debug)]
struct ReportedEnd {
    account: AccountId,
    /// The create path of the task, as its report gave it ([`path_arg`]).
    path: String,
    /// As `upd` was sent it: task id, external id, status (empty: said ended, with no
    /// status), and `"1"` (ended).
    report: [String; 4],
    at: Instant,
    /// Whether its report released the task in Redis, counting its end here: sent again
    /// after a new generation, it tells Redis so, and a registration of the task that finds
    /// it ended then gives the slots back without counting the end a second time.
    counted: bool,
    /// Whether its report noted the end of a task held nowhere ([`notes_unheld_ends`]): sent
    /// again, an end that neither did nor released a holding (a list page's, a batch's) notes
    /// nothing either, else it would free a later create of unknown outcome under its external
    /// id.
    noted_unheld: bool,
}

/// A halt (1102) this process knows of.
#[derive(Clone, Debug)]
struct LocalHalt {
    cause: ApiError,
    /// Its number: a reply without a halt ends only the halt it was asked under.
    n: u64,
    /// The generation of the store in which Redis has it (its script ran, or Redis told of
    /// it). In any other (its script on the way; Redis lost it in a restart, and this process
    /// has not sent it again yet), creates of the account are refused here without asking
    /// Redis, which would grant them.
    stored_in: Option<i64>,
    /// When it was made ([`Inner::made_at`], or as Redis had it for one Redis told of; empty:
    /// not known): sent again after a new generation, it does not undo a reset made after it.
    at: String,
}

/// Where a `halt` change's number is in its arguments (after those the script reads).
const HALT_NUMBER: usize = 8;
/// Where a `rehalt` change's halts start in its arguments: quadruples of the halt key, the
/// cause, the halt's number (which the script does not read) and when it was made.
const REHALT_HALTS: usize = 4;
/// The operations whose last two arguments are when the change was made ([`Inner::made_at`])
/// and whether it is replayed: a replayed one made before the latest of its kind that Redis
/// applied (a reset before a later halt, a capacity before a later setting) is dropped.
const STAMPED: [&str; 3] = ["halt", "unhalt", "cap"];
/// The operations that settle a grant (`ARGV[6]` its holding): queued behind its registration,
/// they take its place (see [`Inner::queue`]), unless they settled no grant (a stale or forged
/// reservation's).
const SETTLES: [&str; 4] = ["hold", "give", "cong", "halt"];

/// A change that could not be sent yet.
#[derive(Clone, Debug)]
enum Pending {
    /// `APPLY` arguments (the time at index 1 is stamped when they are sent), and when the
    /// change was made ([`Inner::made`]).
    Args(Vec<String>, u64),
    /// Register a holding granted while Redis was away, and when it was granted.
    Register(String, u64),
}

impl Pending {
    /// When the change was made ([`Inner::made`]).
    fn made(&self) -> u64 {
        match self {
            Pending::Args(_, made) | Pending::Register(_, made) => *made,
        }
    }
}

/// A change sent to Redis at once ([`Inner::send_now`]), until its answer is handled.
struct OnItsWay<'a> {
    inner: &'a Inner,
    made: u64,
}

impl Drop for OnItsWay<'_> {
    fn drop(&mut self) {
        {
            let _pending = lock(&self.inner.pending);
            lock(&self.inner.sending).remove(&self.made);
        }
        self.inner.answered.notify_waiters();
    }
}

/// A change the replay took off the queue, until Redis answers it. Dropped before (the
/// replay's future dropped: a [`RedisSlots::maintain`] cut short by a timeout), it goes back
/// in the queue as a failed send does, and the replay's marks are cleared: else the change was
/// lost (a task's hold or end, its slot held until its lease ran out), new changes queued
/// behind a replay that no longer ran, and the bound on kept reports still spared the end of
/// the task it held.
struct Replayed<'a> {
    inner: &'a Inner,
    change: Pending,
    /// Whether Redis answered it (or refused it), or the send failed: the replay then decides.
    answered: bool,
}

impl Drop for Replayed<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let mut pending = lock(&self.inner.pending);
        *lock(&self.inner.replay_sending) = None;
        self.inner.requeue(&mut pending, self.change.clone());
        self.inner.replaying.store(false, Ordering::Release);
    }
}

/// Inserts `entry` behind the changes made before it, ahead of those made after it: changes
/// that fail together are queued in whatever order their tasks see the failures, and a
/// replayed change that fails again may find one made before it queued meanwhile. Every entry
/// is numbered, so none keeps a change made earlier behind one made later.
fn insert_in_order(pending: &mut VecDeque<Pending>, entry: Pending) {
    let made = entry.made();
    let at = pending
        .iter()
        .rposition(|old| old.made() < made)
        .map_or(0, |at| at + 1);
    pending.insert(at, entry);
}

struct Inner {
    conn: Connection,
    config: SlotsConfig,
    when_unreachable: WhenUnreachable,
    retry_every: Duration,
    poll_every: Duration,
    maintain_every: Duration,
    grace: Duration,
    arrival_order: bool,
    place_ttl: Option<Duration>,
    instance: String,
    next: AtomicU64,
    pools: Mutex<HashMap<String, Arc<PoolLocal>>>,
    registry: Mutex<Registry>,
    /// The halts (1102) this process knows of, by account: its own, from when it records them
    /// (before Redis has them), and those Redis told it of.
    halts: Arc<Mutex<HashMap<AccountId, LocalHalt>>>,
    /// The halts this process applied or learnt from Redis (another process's, broadcast on
    /// `PREFIX:halted` or at an ask it refused), counted for the classify step's check of
    /// creates granted before one
    /// ([`SlotBackend::create_halts`]): asked about, an account is halted while `halts` holds
    /// it.
    create_halts: Arc<CreateHalts>,
    /// The number of the next halt this process records.
    next_halt: AtomicU64,
    /// The number of the next change that Redis must apply once ([`Inner::change_id`]).
    next_change: AtomicU64,
    /// The number of the next change made ([`Inner::prepare`]): changes are kept for replay
    /// in this order ([`Inner::queue`]).
    made: AtomicU64,
    /// When this process's last stamped change was made ([`Inner::made_at`]).
    last_made_at: std::sync::atomic::AtomicI64,
    /// The capacities set at run time (`PREFIX:cap`, field → slots) as this process last read
    /// or set them: what it checks a create against and shares out while Redis is away.
    caps: Mutex<HashMap<String, u32>>,
    /// The ends of tasks this process reported lately, reported again after Redis came back
    /// with a new generation. Locked after `registry` where both are held.
    ends: Mutex<VecDeque<ReportedEnd>>,
    pending: Mutex<VecDeque<Pending>>,
    /// Whether a replay runs: new changes queue behind it (read and written under `pending`'s
    /// lock).
    replaying: AtomicBool,
    /// When the changes sent to Redis at once (not replayed) and not answered yet were made
    /// (read and written under `pending`'s lock): the replay sends no change made after one of
    /// them, which, failing later, is queued and would be replayed behind it (a task's hold
    /// after its end, holding the slot until its lease ran out). With each, the arguments of
    /// a change that holds a task ([`holds_a_task`]), for the bound on kept reports.
    sending: Mutex<BTreeMap<u64, Option<Vec<String>>>>,
    /// The arguments of the change the replay is sending, when it holds a task
    /// ([`holds_a_task`]; read and written under `pending`'s lock). Off the queue, it cannot
    /// become a give-back when the bound on kept reports drops its task's end, so that end
    /// is kept instead ([`Inner::bound_reports`]).
    replay_sending: Mutex<Option<Vec<String>>>,
    /// Wakes a replay waiting for one of `sending` to be answered.
    answered: Notify,
    /// How long the replay waits before sending each change (`testing::delay_replay`).
    #[cfg(feature = "testing")]
    replay_delay: Mutex<Duration>,
    /// How many acquire answers to drop after Redis ran the ask
    /// ([`testing::lose_acquire_answers`](crate::testing::lose_acquire_answers)).
    #[cfg(feature = "testing")]
    lose_acquire_answers: std::sync::atomic::AtomicU32,
    /// Whether the subscriber ignores halts broadcast on `PREFIX:halted` and skips the
    /// re-read after it subscribes ([`testing::miss_halt_broadcasts`](crate::testing::miss_halt_broadcasts)).
    #[cfg(feature = "testing")]
    miss_halt_broadcasts: AtomicBool,
    /// Whether the background maintenance task skips its passes
    /// ([`testing::hold_maintenance`](crate::testing::hold_maintenance)).
    #[cfg(feature = "testing")]
    maintenance_held: AtomicBool,
    /// Whether reports were dropped from the replay queue since it was last empty (warned once).
    overflowed: AtomicBool,
    out: AtomicBool,
    /// Whether Redis refused the credentials since it last answered ([`Inner::note`]).
    refused: AtomicBool,
    started: AtomicBool,
    init: tokio::sync::OnceCell<()>,
    needs_register: AtomicBool,
    generation: std::sync::atomic::AtomicI64,
    /// Held through a maintenance pass.
    maintaining: tokio::sync::Mutex<()>,
    /// The largest script number seen (see [`Inner::saw_state`]).
    max_seq: std::sync::atomic::AtomicI64,
    /// The generation of a store seen going back to an older state, until the maintenance
    /// pass starts a new one (`i64::MIN`: none).
    went_back: std::sync::atomic::AtomicI64,
    wake_maintenance: Arc<Notify>,
    shutdown: Arc<Notify>,
    acquire: Script,
    apply: Script,
    snapshot: Script,
    read_halts: Script,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.notify_waiters();
        self.shutdown.notify_one();
    }
}

impl fmt::Debug for RedisSlots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSlots")
            .field("conn", &self.inner.conn)
            .field("instance", &self.inner.instance)
            .field("when_unreachable", &self.inner.when_unreachable)
            .field("arrival_order", &self.inner.arrival_order)
            .field("held", &lock(&self.inner.registry).len())
            .field("pending", &lock(&self.inner.pending).len())
            .field("pools", &lock(&self.inner.pools).len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A process-unique id: the prefix of holding ids, and a process's place in fleet queues.
pub(crate) fn instance_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:x}.{:x}.{n}", std::process::id(), nanos)
}

/// Options of [`RedisSlots`], applied with its builder methods.
#[derive(Clone, Copy, Debug)]
struct Options {
    when_unreachable: WhenUnreachable,
    retry_every: Duration,
    poll_every: Duration,
    maintain_every: Duration,
    grace: Duration,
    arrival_order: bool,
    place_ttl: Option<Duration>,
}

impl RedisSlots {
    /// A backend on `conn` with the capacities, lease (also the lease of a grant not yet
    /// settled) and recovery interval of `config`; fails closed by waiting while Redis is away.
    ///
    /// Background work (the subscriber to releases, halts and resets, and the maintenance
    /// loop) starts on first use, on the tokio runtime of the caller, and ends when the last
    /// clone is dropped.
    pub fn new(conn: Connection, config: SlotsConfig) -> Result<Self, ConfigError> {
        config.validate().map_err(|_| {
            ConfigError::new("slots_config", "is invalid (see SlotsConfig::validate)")
        })?;
        Ok(RedisSlots::build(
            conn,
            config,
            Options {
                when_unreachable: WhenUnreachable::default(),
                retry_every: DEFAULT_RETRY_EVERY,
                poll_every: DEFAULT_POLL_EVERY,
                maintain_every: DEFAULT_MAINTAIN_EVERY,
                grace: DEFAULT_GRACE,
                arrival_order: true,
                place_ttl: None,
            },
        ))
    }

    fn build(conn: Connection, config: SlotsConfig, options: Options) -> Self {
        let ended_for = ends_kept_for(&config);
        let halts = Arc::new(Mutex::new(HashMap::new()));
        let create_halts = Arc::new(CreateHalts::new(HaltedHere(Arc::clone(&halts))));
        RedisSlots {
            inner: Arc::new(Inner {
                conn,
                config,
                when_unreachable: options.when_unreachable,
                retry_every: options.retry_every,
                poll_every: options.poll_every,
                maintain_every: options.maintain_every,
                grace: options.grace,
                arrival_order: options.arrival_order,
                place_ttl: options.place_ttl,
                instance: instance_id(),
                next: AtomicU64::new(0),
                pools: Mutex::new(HashMap::new()),
                registry: Mutex::new(Registry::default()),
                halts,
                create_halts,
                next_halt: AtomicU64::new(0),
                next_change: AtomicU64::new(0),
                made: AtomicU64::new(0),
                last_made_at: std::sync::atomic::AtomicI64::new(i64::MIN),
                caps: Mutex::new(HashMap::new()),
                ends: Mutex::new(VecDeque::new()),
                pending: Mutex::new(VecDeque::new()),
                overflowed: AtomicBool::new(false),
                replaying: AtomicBool::new(false),
                sending: Mutex::new(BTreeMap::new()),
                replay_sending: Mutex::new(None),
                answered: Notify::new(),
                #[cfg(feature = "testing")]
                replay_delay: Mutex::new(Duration::ZERO),
                #[cfg(feature = "testing")]
                lose_acquire_answers: std::sync::atomic::AtomicU32::new(0),
                #[cfg(feature = "testing")]
                miss_halt_broadcasts: AtomicBool::new(false),
                #[cfg(feature = "testing")]
                maintenance_held: AtomicBool::new(false),
                out: AtomicBool::new(false),
                refused: AtomicBool::new(false),
                started: AtomicBool::new(false),
                init: tokio::sync::OnceCell::new(),
                needs_register: AtomicBool::new(false),
                generation: std::sync::atomic::AtomicI64::new(i64::MIN),
                maintaining: tokio::sync::Mutex::new(()),
                max_seq: std::sync::atomic::AtomicI64::new(0),
                went_back: std::sync::atomic::AtomicI64::new(i64::MIN),
                wake_maintenance: Arc::new(Notify::new()),
                shutdown: Arc::new(Notify::new()),
                acquire: Script::new(&slots_lua::acquire(ended_for)),
                apply: Script::new(&slots_lua::apply(ended_for)),
                snapshot: Script::new(&slots_lua::snapshot(ended_for)),
                read_halts: Script::new(slots_lua::READ_HALTS),
            }),
        }
    }

    fn options(&self) -> Options {
        let i = &self.inner;
        Options {
            when_unreachable: i.when_unreachable,
            retry_every: i.retry_every,
            poll_every: i.poll_every,
            maintain_every: i.maintain_every,
            grace: i.grace,
            arrival_order: i.arrival_order,
            place_ttl: i.place_ttl,
        }
    }

    fn with(self, f: impl FnOnce(&mut Options)) -> Self {
        let mut options = self.options();
        f(&mut options);
        RedisSlots::build(self.inner.conn.clone(), self.inner.config.clone(), options)
    }

    /// What to do while Redis is unreachable (default [`WhenUnreachable::Wait`]).
    pub fn when_unreachable(self, choice: WhenUnreachable) -> Self {
        self.with(|o| o.when_unreachable = choice)
    }

    /// How often a waiting create asks an unreachable Redis again (default 100 ms).
    pub fn retry_every(self, every: Duration) -> Self {
        self.with(|o| o.retry_every = every.clamp(Duration::from_millis(1), MAX_DURATION))
    }

    /// The polling fallback: a waiting create asks Redis again at least this often even when
    /// no release was announced (default [`DEFAULT_POLL_EVERY`]).
    pub fn poll_every(self, every: Duration) -> Self {
        self.with(|o| o.poll_every = every.clamp(Duration::from_millis(1), MAX_DURATION))
    }

    /// How often the maintenance loop runs (default [`DEFAULT_MAINTAIN_EVERY`]).
    pub fn maintain_every(self, every: Duration) -> Self {
        self.with(|o| o.maintain_every = every.clamp(Duration::from_millis(1), MAX_DURATION))
    }

    /// How long creates wait after Redis lost its state, while the fleet registers its slots
    /// again (default [`DEFAULT_GRACE`]; keep it above `maintain_every`). At most a year, as the
    /// other durations: the generation a restart starts is the grace's end in microseconds,
    /// which a longer one would carry past what the scripts' numbers hold.
    pub fn grace(self, grace: Duration) -> Self {
        self.with(|o| o.grace = grace.min(MAX_DURATION))
    }

    /// Whether freed slots go to the fleet's waiting creates in the order they arrived
    /// (default `true`). With `false`, whichever process's waiting create asks Redis first
    /// after a release gets the slot: a create that has waited minutes in one process can lose
    /// every race to fresh ones in another. Every process sharing a pool should choose the
    /// same; one that does not take part is still kept behind the waiting creates of those
    /// that do, as if each of its asks had just arrived.
    pub fn arrival_order(self, on: bool) -> Self {
        self.with(|o| o.arrival_order = on)
    }

    /// How long a waiting create keeps its place in the fleet's queue after its process last
    /// asked (default [`DEFAULT_PLACE_TTL_POLLS`] × [`poll_every`](Self::poll_every)). A waiting
    /// process asks at least every `poll_every`, so keep it well above that: it bounds how long
    /// the fleet waits for a create whose process stopped (crashed, or stalled).
    pub fn place_ttl(self, ttl: Duration) -> Self {
        self.with(|o| o.place_ttl = Some(ttl.max(Duration::from_millis(1))))
    }

    /// The connection.
    pub fn connection(&self) -> &Connection {
        &self.inner.conn
    }

    /// Whether the last command found Redis unreachable.
    pub fn is_out(&self) -> bool {
        self.inner.out.load(Ordering::Relaxed)
    }

    /// Slots this process believes it holds (tasks and grants), over all pools.
    pub fn held_here(&self) -> u32 {
        lock(&self.inner.registry).values().map(|h| h.weight).sum()
    }

    /// Changes waiting to be replayed once Redis is back, not counting the one a replay is
    /// sending at that moment (it is put back in the order changes were made if the send
    /// fails, or the replay is dropped).
    pub fn pending(&self) -> usize {
        lock(&self.inner.pending).len()
    }

    /// See [`testing::delay_replay`](crate::testing::delay_replay).
    #[cfg(feature = "testing")]
    pub(crate) fn delay_replay(&self, by: Duration) {
        *lock(&self.inner.replay_delay) = by;
    }

    /// See [`testing::lose_acquire_answers`](crate::testing::lose_acquire_answers).
    #[cfg(feature = "testing")]
    pub(crate) fn lose_acquire_answers(&self, answers: u32) {
        self.inner
            .lose_acquire_answers
            .store(answers, Ordering::Release);
    }

    /// See [`testing::miss_halt_broadcasts`](crate::testing::miss_halt_broadcasts).
    #[cfg(feature = "testing")]
    pub(crate) fn miss_halt_broadcasts(&self, miss: bool) {
        self.inner
            .miss_halt_broadcasts
            .store(miss, Ordering::Release);
    }

    /// See [`testing::hold_maintenance`](crate::testing::hold_maintenance).
    #[cfg(feature = "testing")]
    pub(crate) fn hold_maintenance(&self, held: bool) {
        self.inner.maintenance_held.store(held, Ordering::Release);
    }

    /// Runs one maintenance pass now: replays what could not be sent, registers held slots
    /// again if Redis lost its state, prunes the record of held slots.
    pub async fn maintain(&self) -> Result<(), StoreError> {
        self.inner.maintain().await
    }

    /// Applies `op`, whose hold or reports are of a create sent to `path` ([`CreatePath`]).
    fn apply_on(&self, op: SlotOp, path: CreatePath) -> SlotsFuture<Applied, BackendError> {
        self.apply_heard(op, path, Heard::Report)
    }

    /// [`apply_on`](Self::apply_on), its reports `heard` from a report or a list page.
    fn apply_heard(
        &self,
        op: SlotOp,
        path: CreatePath,
        heard: Heard,
    ) -> SlotsFuture<Applied, BackendError> {
        let path = path_arg(path);
        let inner = Arc::clone(&self.inner);
        inner.start();
        // The change starts now, even if the returned future is never polled.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let task = inner.start_op(op, &path, heard, &handle);
                Box::pin(async move {
                    task.await.unwrap_or_else(|e| {
                        Err(BackendError::new(format!("task slot change lost: {e}")))
                    })
                })
            }
            Err(_) => Box::pin(std::future::ready(Err(BackendError::new(
                "no tokio runtime to send the change on",
            )))),
        }
    }
}

impl Inner {
    fn pk(&self, key: &SlotKey) -> String {
        self.conn.key(&format!(
            "pool:{}:{}",
            segment(key.account.as_str()),
            segment(&key.pool.to_string())
        ))
    }

    /// The id of a change Redis must apply once (see `APPLY`): a replay of one whose answer
    /// was lost after Redis ran it would undo a later change of the fleet (another process's
    /// capacity, halt or reset), hide again the slots a 1303 hid and that came back since, or
    /// file again the note of an end whose holding it released.
    fn change_id(&self) -> String {
        let n = self.next_change.fetch_add(1, Ordering::Relaxed);
        format!("{}#{n}", self.instance)
    }

    /// When a change is made, in fleet time (µs), to tell a late replay of it from a later
    /// change of another process; empty before the first measurement of the server's clock (a
    /// process's own clock may be minutes off): such a change applies as it comes.
    /// Strictly later than this process's previous one: a new measurement of the server's
    /// clock may move fleet time back a little (half a slow probe's round trip), and a reset
    /// stamped before the halt it follows would be dropped behind it when both are replayed.
    fn made_at(&self) -> String {
        if !self.conn.is_calibrated() {
            return String::new();
        }
        let now = self.conn.now_us();
        let next = |last: i64| next_made_at(last, now);
        let last = self
            .last_made_at
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| Some(next(last)))
            .unwrap_or_else(|last| last);
        next(last).to_string()
    }

    fn holding(&self, token: u64) -> String {
        format!("{}.{token}", self.instance)
    }

    fn local(&self, pk: &str, key: &SlotKey) -> Arc<PoolLocal> {
        let mut pools = lock(&self.pools);
        if let Some(pool) = pools.get(pk) {
            return Arc::clone(pool);
        }
        // Past 64 pools, those no create of this process uses any more are dropped: a pool is
        // named by a new-style create's model, and a client may name any number of them.
        if pools.len() >= LOCAL_POOLS_BEFORE_DROPPING {
            pools.retain(|_, pool| Arc::strong_count(pool) > 1);
        }
        let pool = Arc::new(PoolLocal {
            key: key.clone(),
            fifo: tokio::sync::Mutex::new(()),
            notify: Notify::new(),
            waiters: AtomicUsize::new(0),
            blocked: AtomicBool::new(false),
            gauges: PoolGauges::new(key, self.capacity_of(key)),
        });
        pools.insert(pk.to_owned(), Arc::clone(&pool));
        pool
    }

    fn wake(&self, pk: &str) {
        let pools = lock(&self.pools);
        if pk == "*" {
            for pool in pools.values() {
                pool.notify.notify_waiters();
            }
        } else if let Some(pool) = pools.get(pk) {
            pool.notify.notify_waiters();
        }
    }

    /// Where `key`'s pool's capacity comes from: the `PREFIX:cap` fields to look up in order,
    /// and the configured capacity that applies when none of them is set.
    ///
    /// The levels are [`SlotsConfig::capacity_of`]'s, most specific first: the account's
    /// setting for the pool, the account's for the pool's product (when the pool names a
    /// model), the setting for the pool, the one for its product, the default. At each level a
    /// capacity set at run time comes before the configured one (as the in-process backend's
    /// `set_capacity` replaces the configured setting), so the fields stop at the first level
    /// the configuration sets, and that setting (else the default) is the fallback.
    fn cap_lookup(&self, key: &SlotKey) -> (u32, Vec<String>) {
        let account = segment(key.account.as_str());
        let product = key.pool.model().map(|_| Pool::new(key.pool.product()));
        let levels = [
            (Some(&key.account), Some(&key.pool)),
            (Some(&key.account), product.as_ref()),
            (None, Some(&key.pool)),
            (None, product.as_ref()),
        ];
        let mut fields = Vec::with_capacity(levels.len());
        for (level_account, pool) in levels {
            let Some(pool) = pool else { continue };
            fields.push(match level_account {
                Some(_) => format!("{account}|{pool}"),
                None => format!("*|{pool}"),
            });
            if let Some(configured) = self.config.capacity_setting(level_account, pool) {
                return (configured, fields);
            }
        }
        (self.config.get_default_capacity(), fields)
    }

    /// `key`'s pool's capacity as [`cap_lookup`](Self::cap_lookup) finds it in `caps` (the
    /// run-time capacities as read or set).
    fn capacity_in(&self, caps: &HashMap<String, u32>, key: &SlotKey) -> u32 {
        let (configured, fields) = self.cap_lookup(key);
        fields
            .iter()
            .find_map(|field| caps.get(field).copied())
            .unwrap_or(configured)
    }

    /// `key`'s pool's capacity: the run-time one this process last read or set, else the
    /// configured one.
    fn capacity_of(&self, key: &SlotKey) -> u32 {
        let caps = lock(&self.caps);
        if caps.is_empty() {
            return self.config.capacity_of(&key.account, &key.pool);
        }
        self.capacity_in(&caps, key)
    }

    /// Replaces the record of run-time capacities with `PREFIX:cap` as read (flat field/value).
    fn saw_caps(&self, flat: &[Value]) {
        let caps = flat
            .chunks_exact(2)
            .map(|pair| (text(&pair[0]), u32::try_from(int(&pair[1])).unwrap_or(0)))
            .collect();
        *lock(&self.caps) = caps;
    }

    fn halt_key(&self, account: &AccountId) -> String {
        self.conn
            .key(&format!("halt:{}", segment(account.as_str())))
    }

    /// The arguments every script starts with: the prefix, fleet time `now_us` (from
    /// [`now_us`](Self::now_us)) and the grace.
    fn head(&self, now_us: i64) -> [String; 3] {
        [
            self.conn.prefix().to_owned(),
            now_us.to_string(),
            micros(self.grace).to_string(),
        ]
    }

    /// [`head`](Self::head) for `APPLY` arguments, which [`apply_args`](Self::apply_args)
    /// stamps with the time when it sends them (a change kept for replay is sent later). The
    /// time is empty until then: a script that got it unstamped fails instead of running at
    /// a wrong time.
    fn unstamped_head(&self) -> [String; 3] {
        [
            self.conn.prefix().to_owned(),
            String::new(),
            micros(self.grace).to_string(),
        ]
    }

    /// Fleet time for a script: a [`lazy`](Connection::lazy) connection's first call waits
    /// for the offset to the server's clock, so no script runs on this process's own clock. A
    /// failed measurement is noted like a failed script, and each path treats it as it treats
    /// the script's own failure (an unreachable Redis: [`WhenUnreachable`]).
    async fn now_us(&self) -> Result<i64, StoreError> {
        let result = self.conn.calibrated_now_us().await;
        if result.is_err() {
            self.note(&result);
        }
        result
    }

    fn note<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Err(e) if e.is_unreachable() => {
                if !self.out.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "redis unreachable: task slots {:?}", self.when_unreachable);
                }
            }
            // Reached, but not shared again: every create fails, and changes are kept until
            // the credentials are accepted (which the connection logs).
            Err(e) if e.is_auth_refused() => {
                self.refused.store(true, Ordering::Relaxed);
                if self.out.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "redis reachable again but refuses the credentials: task slots fail, changes kept"
                    );
                }
            }
            Err(_) => {}
            Ok(_) => {
                let refused = self.refused.load(Ordering::Relaxed)
                    && self.refused.swap(false, Ordering::Relaxed);
                if self.out.swap(false, Ordering::Relaxed) {
                    tracing::info!("redis reachable again: task slots shared again");
                    self.conn.recalibrate_soon();
                    self.wake_maintenance.notify_one();
                } else if refused {
                    // The changes it refused are replayed now, as after an outage, not at the
                    // next pass (`maintain_every`): meanwhile a slot given back stays taken.
                    self.wake_maintenance.notify_one();
                }
            }
        }
    }

    /// What a script's state is compared with: the generation and the largest number this
    /// process had seen before sending it.
    fn sent_in(&self) -> SentIn {
        SentIn {
            generation: self.generation.load(Ordering::Acquire),
            seq: self.max_seq.load(Ordering::Acquire),
        }
    }

    /// Notes a script's `generation:number` (sent in `before`): a new generation means Redis
    /// lost its state; a number no greater than `before`'s in the same generation that the
    /// store went back to an older state (a restart from a snapshot, a failover to a lagging
    /// replica), for which the next maintenance pass starts a new generation. A script sent
    /// before another's answer told of a new generation is numbered in the new one: two
    /// scripts in flight across a restart start one generation, not a second.
    fn saw_state(&self, value: Option<&Value>, before: SentIn) -> bool {
        let state = value.map(text).unwrap_or_default();
        let (generation, seq) = match state.split_once(':') {
            Some((g, n)) => (g.parse().unwrap_or(0), n.parse().unwrap_or(0)),
            None => (state.parse().unwrap_or(0), 0),
        };
        let lost = self.saw_generation(generation);
        if seq > 0 {
            match numbered(lost, generation, seq, before) {
                Numbered::Afresh => self.max_seq.store(seq, Ordering::Release),
                Numbered::WentBack => {
                    self.max_seq.store(seq, Ordering::Release);
                    if self.went_back.swap(generation, Ordering::AcqRel) == i64::MIN {
                        tracing::warn!(
                            "redis came back with older state: starting a new generation"
                        );
                    }
                    self.wake_maintenance.notify_one();
                }
                Numbered::Later => {
                    self.max_seq.fetch_max(seq, Ordering::AcqRel);
                }
            }
        }
        lost
    }

    /// Notes the store's generation; a change means Redis lost its state.
    fn saw_generation(&self, generation: i64) -> bool {
        let previous = self.generation.swap(generation, Ordering::AcqRel);
        let lost = previous != i64::MIN && previous != generation;
        if lost {
            self.state_lost();
        }
        lost
    }

    fn state_lost(&self) {
        if !self.needs_register.swap(true, Ordering::Relaxed) {
            tracing::warn!("redis lost its state: registering held task slots again");
        }
        self.wake_maintenance.notify_one();
    }

    async fn run(&self, script: &Script, args: &[String]) -> Result<Value, StoreError> {
        let result = self.conn.run::<Value>(script, &[], args).await;
        self.note(&result);
        result
    }

    /// Runs a script whose reply is an array that starts with the store's state, and notes
    /// that state ([`Inner::saw_state`]): the reply's items, and whether Redis lost its state.
    async fn run_noting_state(
        &self,
        script: &Script,
        args: &[String],
    ) -> Result<(Vec<Value>, bool), StoreError> {
        let before = self.sent_in();
        let items = array(self.run(script, args).await?)?;
        let lost = self.saw_state(items.first(), before);
        Ok((items, lost))
    }

    /// Runs `APPLY` stamped with fleet time now; parses `{lost, changed, released}`, with the
    /// tasks it released to count in the finished-task metrics once the reply's bookkeeping
    /// is done ([`Reply::finished`]).
    async fn apply_args(&self, args: &mut [String]) -> Result<Reply, StoreError> {
        self.apply_args_counting(args, true).await
    }

    /// [`apply_args`](Self::apply_args), counting the released tasks only when `count`.
    async fn apply_args_counting(
        &self,
        args: &mut [String],
        count: bool,
    ) -> Result<Reply, StoreError> {
        let now_us = self.now_us().await?;
        args[1] = now_us.to_string();
        let (items, _) = self.run_noting_state(&self.apply, args).await?;
        let changed = int_at(&items, 1)? == 1;
        let (released, holdings, finished) = released_by(items.get(2), now_us, count);
        Ok(Reply {
            changed,
            released,
            holdings,
            finished,
        })
    }

    /// Moves the in-use gauges by the changes to the record of held slots not shown yet: after
    /// a change is sent or queued, and after a reply's bookkeeping ([`Registry::show`]).
    fn show_in_use(&self) {
        lock(&self.registry).show();
    }

    fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.started.store(false, Ordering::Release);
            return;
        };
        handle.spawn(subscriber(Arc::downgrade(self), Arc::clone(&self.shutdown)));
        handle.spawn(maintenance(
            Arc::downgrade(self),
            Arc::clone(&self.shutdown),
        ));
    }

    /// The arguments of an operation on a holding.
    fn hold_args(
        &self,
        op: &str,
        pk: &str,
        holding: &str,
        held: &Held,
        lease: Duration,
    ) -> Vec<String> {
        let [p, now, grace] = self.unstamped_head();
        vec![
            p,
            now,
            grace,
            op.to_owned(),
            pk.to_owned(),
            holding.to_owned(),
            held.weight.to_string(),
            held.id.clone().unwrap_or_default(),
            held.ext.clone().unwrap_or_default(),
            micros(lease).to_string(),
            held.key.account.as_str().to_owned(),
            held.key.pool.to_string(),
            if held.task { "t" } else { "g" }.to_owned(),
            held.path.clone(),
        ]
    }

    /// Translates an operation into `APPLY` arguments, and records it in the local record of
    /// held slots. `path`: the create path of a hold, or of the tasks a report names
    /// ([`path_arg`]); `heard`: what told of the tasks an update reports.
    fn prepare(&self, op: SlotOp, path: &str, heard: Heard) -> Prepared {
        let made = self.made.fetch_add(1, Ordering::Relaxed);
        let [p, now, grace] = self.unstamped_head();
        let mut args = vec![p, now, grace];
        let mut local = Applied {
            released: Vec::new(),
            changed: true,
        };
        let mut wake = None;
        let mut stale = None;
        match op {
            SlotOp::GiveBack(res) => {
                let pk = self.pk(&res.key);
                let h = self.holding(res.token);
                // Sent either way: the script frees only a grant of this weight (one Redis
                // has and this process no longer does: an ask whose answer was lost).
                if self.settle(&res) {
                    wake = Some(pk.clone());
                } else {
                    local.changed = false;
                    stale = StaleReservation::of(&res, "give back");
                }
                args.extend(["give".to_owned(), pk, h, res.weight.to_string()]);
            }
            SlotOp::Congested(res) if !self.settle(&res) => {
                // No grant of this process's: a give-back (which the script checks, and finds
                // no grant of this weight), hiding nothing.
                local.changed = false;
                stale = StaleReservation::of(&res, "1303");
                let pk = self.pk(&res.key);
                let h = self.holding(res.token);
                args.extend(["give".to_owned(), pk, h, res.weight.to_string()]);
            }
            SlotOp::Congested(res) => {
                let pk = self.pk(&res.key);
                let h = self.holding(res.token);
                let (configured, fields) = self.cap_lookup(&res.key);
                args.extend([
                    "cong".to_owned(),
                    pk,
                    h,
                    res.weight.to_string(),
                    configured.to_string(),
                    self.change_id(),
                ]);
                args.extend(fields);
            }
            SlotOp::Halt { reservation, cause } => {
                let pk = self.pk(&reservation.key);
                let h = self.holding(reservation.token);
                // Halted whatever the reservation: the server refused the account.
                if !self.settle(&reservation) {
                    stale = StaleReservation::of(&reservation, "halt");
                }
                let halt = self.halt_key(&reservation.key.account);
                let n = self.next_halt.fetch_add(1, Ordering::Relaxed);
                args.extend(["halt".to_owned(), pk, h, halt, encode_cause(&cause)]);
                args.push(n.to_string());
                args.push(self.change_id());
                args.push(reservation.weight.to_string());
                let at = self.made_at();
                args.extend([at.clone(), "0".to_owned()]);
                let halt = LocalHalt {
                    cause,
                    n,
                    stored_in: None,
                    at,
                };
                lock(&self.halts).insert(reservation.key.account, halt);
                // In place: a create of the account granted before now and held below the
                // slots (in a rate limiter) is refused by the classify step, unsent.
                self.create_halts.halted();
                wake = Some("*".to_owned());
            }
            SlotOp::Hold {
                reservation,
                task,
                lease,
            } => {
                let pk = self.pk(&reservation.key);
                // A reservation no grant of this process's holds (kept under a task already,
                // given back, made up) counts its slots anew, under a holding of its own: the
                // task may run, and its end must free what it took, never the holding of the
                // reservation's token (another task's, or a grant of another pool).
                let h = if self.settle(&reservation) {
                    self.holding(reservation.token)
                } else {
                    stale = StaleReservation::of(&reservation, "hold");
                    self.holding(self.next.fetch_add(1, Ordering::Relaxed))
                };
                let mut held = Held {
                    pk: pk.clone(),
                    weight: reservation.weight,
                    id: task.id,
                    ext: task.external_id,
                    path: path.to_owned(),
                    task: true,
                    since: Instant::now(),
                    renewed: None,
                    in_redis: None,
                    lease,
                    registered: false,
                    adopted: false,
                    key: reservation.key,
                };
                args = self.hold_args("hold", &pk, &h, &held, lease);
                // Replayed after Redis ran it, it is skipped (see `APPLY`).
                args.push(self.change_id());
                let mut registry = lock(&self.registry);
                // A create of unknown outcome under the external id of a task a reconcile
                // adopted in a pool of its account and product (listed on its path, where
                // known) is that task (its answer lost after the list named it): it takes the
                // task id, and the adopted holding goes, as in Redis. Any model's pool: a
                // list does not say the model.
                if held.id.is_none() && held.ext.is_some() {
                    let adopted = registry.iter().find(|(_, old)| {
                        old.adopted
                            && old.id.is_some()
                            && old.ext == held.ext
                            && old.key.pool.product() == held.key.pool.product()
                            && old.key.account == held.key.account
                            && may_be(&old.path, &held.path)
                    });
                    if let Some((old, adopted)) = adopted {
                        held.id.clone_from(&adopted.id);
                        let old = old.clone();
                        registry.remove(&old);
                    }
                }
                // An earlier create of the same task (sent again) is superseded, as in Redis: by
                // its task id, or by its external id if its task id is unknown (one known by
                // its task id runs until reported ended, whatever a later create carries) and it
                // was sent to the same pool and path, where known (external ids may be unique
                // per create path only).
                registry.retain(|other, old| {
                    *other == h
                        || old.key.account != held.key.account
                        || !((held.id.is_some() && old.id == held.id)
                            || (held.ext.is_some()
                                && old.ext == held.ext
                                && old.id.is_none()
                                && old.pk == held.pk
                                && may_be(&old.path, &held.path)))
                });
                registry.insert(h, held);
            }
            SlotOp::Adopt {
                key,
                task,
                weight,
                lease,
            } => {
                // By its external id, a holding of the task's product whose task id is unknown
                // may be the task; one known by another task id, or of another product or known
                // create path than the list's, is another task (of another create path).
                let known = {
                    let mut registry = lock(&self.registry);
                    let by_id = task.id.is_some() && registry.values().any(|h| h.id == task.id);
                    let by_ext: Vec<(String, bool)> = registry
                        .iter()
                        .filter(|(_, held)| {
                            task.external_id.is_some()
                                && held.ext == task.external_id
                                && held.key.account == key.account
                                && held.key.pool.product() == key.pool.product()
                                && may_be(&held.path, path)
                                && (task.id.is_none() || held.id.is_none())
                        })
                        .map(|(h, held)| (h.clone(), held.id.is_none()))
                        .collect();
                    if let (false, Some(id), [(h, true)]) = (by_id, &task.id, by_ext.as_slice())
                        && let Some(held) = registry.get_mut(h)
                    {
                        // Held under its external id alone (a create whose answer was lost):
                        // it learns the task id the list names, as in Redis.
                        held.id = Some(id.clone());
                        held.renewed = Some(Instant::now());
                    }
                    by_id || !by_ext.is_empty()
                };
                let pk = self.pk(&key);
                let h = self.holding(self.next.fetch_add(1, Ordering::Relaxed));
                let held = Held {
                    pk: pk.clone(),
                    weight,
                    id: task.id,
                    ext: task.external_id,
                    // The path it was listed on (where known), as in kling-concurrency.
                    path: path.to_owned(),
                    task: true,
                    since: Instant::now(),
                    renewed: None,
                    in_redis: None,
                    lease,
                    registered: false,
                    adopted: true,
                    key,
                };
                args = self.hold_args("adopt", &pk, &h, &held, lease);
                local.changed = !known;
                return Prepared {
                    args,
                    made,
                    local,
                    wake,
                    adopt: Some((h, held)),
                    stale,
                };
            }
            SlotOp::Update {
                account,
                updates,
                lease,
            } => {
                let reports = updates
                    .iter()
                    .map(|u| (u.id.as_str(), u.external_id.as_deref(), u.status.as_ref()));
                let note = notes_unheld_ends(heard, reports.len());
                args.extend(self.upd_head_for(lease, &account, path, note, reports.clone()));
                local = self.local_update(&account, path, note, reports, &mut args);
            }
            SlotOp::Observed {
                account,
                outcome,
                lease,
            } => {
                let reports = outcome
                    .tasks()
                    .iter()
                    .map(|t| (t.id.as_str(), t.external_id.as_deref(), Some(&t.status)));
                let note = notes_unheld_ends(heard, reports.len());
                args.extend(self.upd_head_for(lease, &account, path, note, reports.clone()));
                local = self.local_update(&account, path, note, reports, &mut args);
            }
            SlotOp::SetCapacity {
                account,
                pool,
                capacity,
            } => {
                let field = match &account {
                    Some(account) => format!("{}|{pool}", segment(account.as_str())),
                    None => format!("*|{pool}"),
                };
                lock(&self.caps).insert(field.clone(), capacity);
                // The account and pool as the pools' meta hashes hold them: the pools the new
                // capacity covers forget their streaks of 1303s.
                let account = account.as_ref().map_or("", AccountId::as_str).to_owned();
                args.extend([
                    "cap".to_owned(),
                    field,
                    capacity.to_string(),
                    account,
                    pool.to_string(),
                    self.change_id(),
                    self.made_at(),
                    "0".to_owned(),
                ]);
                wake = Some("*".to_owned());
            }
            SlotOp::ResetHalt(account) => {
                local.changed = lock(&self.halts).remove(&account).is_some();
                let halt = self.halt_key(&account);
                args.extend([
                    "unhalt".to_owned(),
                    halt,
                    self.change_id(),
                    self.made_at(),
                    "0".to_owned(),
                ]);
            }
        }
        Prepared {
            args,
            made,
            local,
            wake,
            adopt: None,
            stale,
        }
    }

    /// Takes the grant of `reservation` off this process's record, if it is one: a grant
    /// (not yet kept under a task) of its pool and weight under its token's holding. Whether
    /// it was; if not, the record is left as it is (the holding of that token may be a task
    /// the reservation was kept under already, or a grant of another pool or weight). The
    /// record holds every grant this process has and has not settled: a grant is filed when
    /// Redis (or the fallback share) grants it and leaves only when it is settled here, or
    /// when Redis no longer has it (its lease ran out); no other process settles it.
    fn settle(&self, reservation: &Reservation) -> bool {
        let h = self.holding(reservation.token);
        let mut registry = lock(&self.registry);
        let granted = registry.get(&h).is_some_and(|held| {
            !held.task && held.weight == reservation.weight && held.key == reservation.key
        });
        if granted {
            registry.remove(&h);
        }
        granted
    }

    /// The head of the `upd` of `reports`, noting an end that finds no holding when `note`
    /// ([`notes_unheld_ends`]). Reports with an end carry an id: replayed after their answer
    /// was lost (a timeout after Redis ran them), their holdings released, they would file
    /// their notes again, which would free a later create under the same external id; skipped,
    /// they answer with the tasks they released, whose ends this process then counts.
    fn upd_head_for<'a>(
        &self,
        lease: Duration,
        account: &AccountId,
        path: &str,
        note: bool,
        mut reports: impl Iterator<Item = Report<'a>>,
    ) -> [String; 6] {
        let ends = reports.any(|(_, _, status)| status.is_none_or(TaskStatus::is_terminal));
        let once = if ends {
            self.change_id()
        } else {
            String::new()
        };
        upd_head(lease, account, note, once, path)
    }

    /// Adds the reports of `account` to `args`, and applies them to the local record: what the
    /// process would release if Redis were away. A task is found by its task id, else by its
    /// external id within `account` (external ids are unique per account only), as in Redis:
    /// only a create of unknown outcome (or any holding, by `complete`'s text), of the
    /// reports' create `path` where known, and only the one holding that may be it.
    /// `noted_unheld`: whether Redis notes their ends that find no holding, kept with the ends
    /// to send them again alike.
    fn local_update<'a>(
        &self,
        account: &AccountId,
        path: &str,
        noted_unheld: bool,
        reports: impl Iterator<Item = Report<'a>>,
        args: &mut Vec<String>,
    ) -> Applied {
        let mut applied = Applied::default();
        let mut registry = lock(&self.registry);
        let now = Instant::now();
        for (id, ext, status) in reports {
            let terminal = status.is_none_or(TaskStatus::is_terminal);
            let report = [
                id.to_owned(),
                ext.unwrap_or_default().to_owned(),
                status.map_or_else(String::new, |s| s.as_str().to_owned()),
                if terminal { "1" } else { "0" }.to_owned(),
            ];
            if terminal {
                let mut ends = lock(&self.ends);
                if ends.len() >= MAX_ENDS_KEPT {
                    ends.pop_front();
                }
                ends.push_back(ReportedEnd {
                    account: account.clone(),
                    path: path.to_owned(),
                    report: report.clone(),
                    at: now,
                    counted: false,
                    noted_unheld,
                });
            }
            args.extend(report);
            // The one holding of the account under `text` a report of tasks created on `on`
            // may name by it: one whose task id is unknown, or (`any`) any, of that path where
            // known.
            let by_external_on = |on: &str, text: &str, any: bool| {
                let mut fits = registry.iter().filter(|(_, held)| {
                    held.key.account == *account
                        && held.ext.as_deref() == Some(text)
                        && (any || held.id.is_none())
                        && may_be(&held.path, on)
                });
                match (fits.next(), fits.next()) {
                    (Some((h, _)), None) => Some(h.clone()),
                    _ => None,
                }
            };
            let by_external = |text: &str, any: bool| by_external_on(path, text, any);
            // (An empty id is no task's: a lookup by external id that found nothing, which
            // says nothing of a holding whose task id is known.)
            let found = registry
                .iter()
                .find(|(_, held)| !id.is_empty() && held.id.as_deref() == Some(id))
                .map(|(h, _)| h.clone())
                .or_else(|| ext.and_then(|ext| by_external(ext, false)))
                .or_else(|| {
                    status
                        .is_none()
                        .then(|| by_external(id, !id.is_empty()))
                        .flatten()
                });
            // A task adopted from a list that did not give its external id, and its create
            // of unknown outcome of the same product (and of the path it was listed on, where
            // known, else the reports') under that external id: one task, joined as in Redis
            // (`upd`).
            let adopted_alone = |h: &String| {
                registry.get(h).is_some_and(|held| {
                    held.adopted && held.ext.is_none() && held.key.account == *account
                })
            };
            let product = |h: &String| registry.get(h).map(|held| held.key.pool.product());
            let listed_on = |h: &String| {
                registry.get(h).map_or(path, |held| {
                    if held.path.is_empty() {
                        path
                    } else {
                        &held.path
                    }
                })
            };
            let create = match (&found, ext) {
                (Some(h), Some(ext)) if !ext.is_empty() && !id.is_empty() && adopted_alone(h) => {
                    by_external_on(listed_on(h), ext, false)
                        .filter(|create| create != h && product(create) == product(h))
                }
                _ => None,
            };
            let found = match (found, create) {
                (Some(adopted), Some(create)) => {
                    registry.remove(&adopted);
                    if let Some(held) = registry.get_mut(&create) {
                        held.id = Some(id.to_owned());
                    }
                    Some(create)
                }
                (found, _) => found,
            };
            if let Some(h) = found {
                applied.changed = true;
                if terminal && let Some(held) = registry.remove(&h) {
                    applied.released.push(Released {
                        key: held.key,
                        task: held.id.or(held.ext).map(|s| Arc::from(s.as_str())),
                        weight: held.weight,
                        held_for: now.saturating_duration_since(held.since),
                        reason: match status {
                            Some(status) => ReleaseReason::Ended(status.clone()),
                            None => ReleaseReason::Completed,
                        },
                    });
                } else if let Some(held) = registry.get_mut(&h) {
                    // Running: its lease is renewed from now (in Redis too, or when replayed).
                    held.renewed = Some(now);
                    if held.id.is_none() && !id.is_empty() {
                        held.id = Some(id.to_owned());
                    }
                }
            }
        }
        applied
    }

    /// Applies an operation: records it here at once (a halt refuses this process's next
    /// create from now), then sends it on `handle`'s runtime. `path`, `heard`: as
    /// [`Inner::prepare`]'s.
    fn start_op(
        self: &Arc<Self>,
        op: SlotOp,
        path: &str,
        heard: Heard,
        handle: &tokio::runtime::Handle,
    ) -> tokio::task::JoinHandle<Result<Applied, BackendError>> {
        let prepared = self.prepare(op, path, heard);
        self.start_prepared(prepared, handle)
    }

    /// [`start_op`](Self::start_op) of an operation [`prepare`](Self::prepare)d.
    fn start_prepared(
        self: &Arc<Self>,
        prepared: Prepared,
        handle: &tokio::runtime::Handle,
    ) -> tokio::task::JoinHandle<Result<Applied, BackendError>> {
        if let Some(pk) = &prepared.wake {
            self.wake(pk);
        }
        let task = handle.spawn(Arc::clone(self).send_op(prepared));
        // Only once the change is on its way: a metrics recorder that panics here loses none.
        // (Not while unwinding, a grant given back as its acquire unwinds: a recorder's
        // second panic would abort. The next change shows it.)
        if !std::thread::panicking() {
            self.show_in_use();
        }
        task
    }

    /// Sends an operation [`prepare`](Self::prepare)d: to Redis, or (Redis away) to the replay
    /// queue, answering with its effect on the local record.
    async fn send_op(self: Arc<Self>, prepared: Prepared) -> Result<Applied, BackendError> {
        let Prepared {
            mut args,
            made,
            local,
            wake: _,
            adopt,
            stale,
        } = prepared;
        // Behind the replay while it runs, even when its last change is in flight and the
        // queue looks empty: a change sent now could overtake it.
        let on_its_way = self.send_now(made, &args);
        let queued = on_its_way.is_none();
        let result = if queued {
            // Keep the order: behind what is waiting to be replayed.
            Err(StoreError::protocol(
                "queued behind changes waiting for redis",
            ))
        } else {
            self.apply_args(&mut args).await
        };
        let applied = match result {
            Ok(Reply {
                changed,
                released,
                holdings,
                finished,
            }) => {
                // A stale give-back or 1303 changes nothing (the script, sent a give-back the
                // grant of which it does not have, may still say it gave back nothing).
                let changed = changed && (stale.is_none() || local.changed);
                {
                    let mut registry = lock(&self.registry);
                    for h in &holdings {
                        registry.remove(h);
                    }
                    if let Some((h, mut held)) = adopt
                        && changed
                    {
                        held.registered = true;
                        registry.insert(h, held);
                    }
                    if args[3] == "hold"
                        && let Some(held) = registry.get_mut(&args[5])
                    {
                        held.registered = true;
                    }
                }
                self.halt_stored(&args);
                self.ends_counted(&args, &released);
                for r in &released {
                    let pk = self.pk(&r.key);
                    self.wake(&pk);
                }
                // The metrics last: a recorder that panics leaves the record whole.
                self.show_in_use();
                finished.record();
                Ok(Applied { released, changed })
            }
            Err(e) if e.keeps_changes() || queued => {
                if let Some((h, held)) = adopt
                    && local.changed
                {
                    lock(&self.registry).insert(h, held);
                }
                self.queue(args, made);
                for r in &local.released {
                    let pk = self.pk(&r.key);
                    self.wake(&pk);
                }
                self.show_in_use();
                match self.when_unreachable {
                    // A refused authentication fails in every mode: waiting does not fix it.
                    _ if e.is_auth_refused() => Err(e.into_slots()),
                    WhenUnreachable::Fail if !queued => Err(e.into_slots()),
                    _ => Ok(local),
                }
            }
            Err(e) => Err(e.into_slots()),
        };
        // After the call, its bookkeeping done: a subscriber that panics loses none of it.
        if let Some(stale) = &stale {
            stale.warn();
        }
        applied
    }

    /// After the reports `args` ran in Redis (counting `released`): notes which of the ends
    /// this process reported were counted by their release.
    fn ends_counted(&self, args: &[String], released: &[Released]) {
        if args[3] != "upd" || released.is_empty() {
            return;
        }
        let mut ends = lock(&self.ends);
        for r in released {
            let Some(task) = r.task.as_deref() else {
                continue;
            };
            // Just reported: among the last ends noted.
            let end = ends.iter_mut().rev().find(|end| {
                let [id, ext, ..] = &end.report;
                end.account == r.key.account && (id == task || (!ext.is_empty() && ext == task))
            });
            if let Some(end) = end {
                end.counted = true;
            }
        }
    }

    /// After the change `args` ran in Redis: if it was a halt (or halts sent again after a
    /// new generation), Redis has it now, in the generation its reply told of (unless this
    /// process recorded a later one for the account since, or lifted it).
    fn halt_stored(&self, args: &[String]) {
        let sent: Vec<(&String, &String)> = match args[3].as_str() {
            "halt" => vec![(&args[6], &args[HALT_NUMBER])],
            "rehalt" => args[REHALT_HALTS..]
                .chunks_exact(4)
                .map(|halt| (&halt[0], &halt[2]))
                .collect(),
            _ => return,
        };
        let generation = self.generation.load(Ordering::Acquire);
        let mut halts = lock(&self.halts);
        for (account, halt) in halts.iter_mut() {
            let key = self.halt_key(account);
            if sent
                .iter()
                .any(|(k, n)| **k == key && **n == halt.n.to_string())
            {
                halt.stored_in = Some(generation);
            }
        }
    }

    /// A halt was reset (by any process): `reset` is its key and the halt it deleted. This
    /// process forgets that halt at once, so that a restart before its next maintenance pass
    /// does not make it send the halt again. A later halt of the account (another cause: its
    /// `request_id` differs) stays.
    fn halt_reset(&self, reset: &str) {
        let Some((account, cause)) = self
            .split_halt_key(reset)
            .and_then(|(account, cause)| Some((account, decode_cause(cause)?)))
        else {
            tracing::warn!(
                channel = %self.conn.key("unhalted"),
                bytes = reset.len(),
                "ignoring a malformed halt reset (not a halt key and a 1102, a line each)"
            );
            return;
        };
        let cause = encode_cause(&cause);
        let mut halts = lock(&self.halts);
        if halts
            .get(&account)
            .is_some_and(|halt| encode_cause(&halt.cause) == cause)
        {
            halts.remove(&account);
        }
    }

    /// Records a halt Redis has in `generation` (another process's, told by an ask's reply or
    /// broadcast on `PREFIX:halted`), unless this process knows of a halt of the account
    /// already. Learnt, it counts for the halt gate: a create of the account this process
    /// granted before, still held below the slots (in a rate limiter), is refused by the
    /// classify step, unsent, as after its own halt. A known one that Redis has in that
    /// generation takes the cause Redis has now (a later `1102` replaced it there), so that
    /// the reset of that one, broadcast with its cause, ends it here too; one Redis does not
    /// have yet (this process's own, its script on the way) stays as recorded.
    ///
    /// `at` is when Redis says the halt was made (its `PREFIX:stamps` field; empty: not read
    /// with it). Sent again after Redis lost its state, the halt carries it, so that a reset
    /// made after it in the new generation is not undone. A known halt whose time is not
    /// known takes it; one replaced by the cause Redis has takes that one's.
    fn learn_halt(&self, account: &AccountId, cause: &ApiError, generation: i64, at: &str) -> bool {
        let learnt = match lock(&self.halts).entry(account.clone()) {
            Entry::Occupied(mut known) => {
                let known = known.get_mut();
                if known.stored_in == Some(generation) {
                    if encode_cause(&known.cause) != encode_cause(cause) {
                        known.cause = cause.clone();
                        at.clone_into(&mut known.at);
                    } else if known.at.is_empty() {
                        at.clone_into(&mut known.at);
                    }
                }
                false
            }
            Entry::Vacant(vacant) => {
                vacant.insert(LocalHalt {
                    cause: cause.clone(),
                    n: self.next_halt.fetch_add(1, Ordering::Relaxed),
                    stored_in: Some(generation),
                    at: at.to_owned(),
                });
                true
            }
        };
        if learnt {
            self.create_halts.halted();
        }
        learnt
    }

    /// The account whose halt key (`PREFIX:halt:LEN.ACCOUNT`, [`halt_key`](Self::halt_key))
    /// starts `text` and what follows the key's line (read by the name's length: an account's
    /// name may hold a newline), if a halt key of this prefix starts it.
    fn split_halt_key<'a>(&self, text: &'a str) -> Option<(AccountId, &'a str)> {
        let segment = text
            .strip_prefix(self.conn.prefix())?
            .strip_prefix(":halt:")?;
        let (len, rest) = segment.split_once('.')?;
        let len: usize = len.parse().ok()?;
        let account = rest.get(..len)?;
        let after = rest.get(len..)?.strip_prefix('\n')?;
        Some((AccountId::new(account), after))
    }

    /// A halt broadcast on `PREFIX:halted` (generation, halt key and halt, a line each): a
    /// process that set it in Redis tells the fleet at once. Malformed (not this crate's
    /// script's, or another prefix's), it is ignored with a warning. Of another generation than
    /// the one this process knows (sent before Redis lost its state, or by another database
    /// under the same prefix: pub/sub ignores databases), it is not taken: its account is
    /// returned, for the subscriber to read the halt from Redis
    /// ([`read_halts`](Self::read_halts)), else this process would refuse the account's creates
    /// without asking, a halt no maintenance pass checks and no reset reaches. Taken, its
    /// account is returned too while the halt's time is not known, for the subscriber to read
    /// it ([`learn_halt`](Self::learn_halt)); should that read fail, the account's next ask
    /// here, refused, tells it.
    fn halt_broadcast(&self, payload: Option<&str>) -> Option<AccountId> {
        #[cfg(feature = "testing")]
        if self.miss_halt_broadcasts.load(Ordering::Acquire) {
            return None;
        }
        let parsed = payload.and_then(|payload| {
            let (generation, rest) = payload.split_once('\n')?;
            let (account, cause) = self.split_halt_key(rest)?;
            Some((
                generation.parse::<i64>().ok()?,
                account,
                decode_cause(cause)?,
            ))
        });
        match parsed {
            Some((generation, account, cause)) => {
                if generation != self.generation.load(Ordering::Acquire) {
                    return Some(account);
                }
                self.learn_halt(&account, &cause, generation, "");
                // Learnt at once (the broadcast carries no stamp, for processes older than
                // stamps); when it was made is read with the halt right after.
                let unstamped = lock(&self.halts)
                    .get(&account)
                    .is_some_and(|halt| halt.stored_in == Some(generation) && halt.at.is_empty());
                if unstamped {
                    return Some(account);
                }
            }
            None => tracing::warn!(
                channel = %self.conn.key("halted"),
                bytes = payload.map_or(0, str::len),
                "ignoring a malformed halt broadcast (not a generation, a halt key of this \
                 prefix and a 1102, a line each)"
            ),
        }
        None
    }

    /// After the subscriber (re)subscribed: reads the halts of the accounts this process has
    /// pools or holdings of, which Redis may have broadcast while it was not listening, and
    /// learns those set ([`learn_halt`](Self::learn_halt)). One `MGET` per 256 accounts, per
    /// subscription; a reset missed meanwhile is the maintenance pass's (woken with it).
    async fn reread_halts(&self) -> Result<(), StoreError> {
        #[cfg(feature = "testing")]
        if self.miss_halt_broadcasts.load(Ordering::Acquire) {
            return Ok(());
        }
        let accounts: Vec<AccountId> = {
            let mut accounts: std::collections::HashSet<AccountId> = lock(&self.pools)
                .values()
                .map(|pool| pool.key.account.clone())
                .collect();
            accounts.extend(lock(&self.registry).values().map(|h| h.key.account.clone()));
            let halts = lock(&self.halts);
            accounts.retain(|account| !halts.contains_key(account));
            accounts.into_iter().collect()
        };
        self.read_halts(&accounts).await
    }

    /// Reads the halts of `accounts` from Redis, with its generation and when each was made,
    /// and learns those set ([`learn_halt`](Self::learn_halt)). One script
    /// ([`READ_HALTS`](slots_lua::READ_HALTS)) per 256 accounts.
    async fn read_halts(&self, accounts: &[AccountId]) -> Result<(), StoreError> {
        for chunk in accounts.chunks(256) {
            let mut args = vec![self.conn.key("stamps"), self.conn.key("alive")];
            args.extend(chunk.iter().map(|account| self.halt_key(account)));
            let (values, stamps): (Vec<Option<String>>, Vec<Option<String>>) =
                self.conn.run(&self.read_halts, &[], &args).await?;
            // No generation: Redis lost its state, halts included (those who knew send them
            // again, broadcast).
            let Some(generation) = values
                .first()
                .and_then(Option::as_deref)
                .and_then(|g| g.parse::<i64>().ok())
            else {
                return Ok(());
            };
            for (i, (account, cause)) in chunk.iter().zip(values.iter().skip(1)).enumerate() {
                let Some(cause) = cause else { continue };
                let at = stamps.get(i).cloned().flatten().unwrap_or_default();
                match decode_cause(cause) {
                    Some(cause) => {
                        self.learn_halt(account, &cause, generation, &at);
                    }
                    None => tracing::warn!(
                        "ignoring a malformed halt in redis (not a 1102 as this crate writes it)"
                    ),
                }
            }
        }
        Ok(())
    }

    /// After a new generation: queues the halts this process knows of to be sent again (Redis
    /// lost them with its state; until they are back, every process would grant the halted
    /// accounts' creates), unless such a change waits already. Queued, it keeps its order with
    /// a reset made here meanwhile, which goes behind it.
    fn queue_halts_again(&self) {
        let mut pending = lock(&self.pending);
        let waiting = pending
            .iter()
            .any(|p| matches!(p, Pending::Args(args, _) if args[3] == "rehalt"));
        let halts = lock(&self.halts);
        if halts.is_empty() || waiting {
            return;
        }
        let mut args = Vec::from(self.unstamped_head());
        args.push("rehalt".to_owned());
        for (account, halt) in halts.iter() {
            args.extend([
                self.halt_key(account),
                encode_cause(&halt.cause),
                halt.n.to_string(),
                halt.at.clone(),
            ]);
        }
        let made = self.made.fetch_add(1, Ordering::Relaxed);
        pending.push_back(Pending::Args(args, made));
    }

    /// Keeps `args`, made `made`th ([`Inner::made`]), for replay, in the order changes were
    /// made. Task reports (`upd`) are kept once per task: a report
    /// replaces the earlier renewals of the same tasks (replayed later, it renews the lease
    /// from then, or ends the task); at most [`MAX_PENDING_REPORTS`] are kept. A halt, reset or
    /// capacity is marked replayed ([`STAMPED`]): Redis drops it if a later one came meanwhile.
    fn queue(&self, mut args: Vec<String>, made: u64) {
        if STAMPED.contains(&args[3].as_str())
            && let Some(replayed) = args.last_mut()
        {
            *replayed = "1".to_owned();
        }
        // A change that settled no grant (a stale or forged reservation: the record still has
        // the grant of its token, of another pool or weight) does not take its registration's
        // place: that grant is still on its way, and must be registered.
        let settles = SETTLES.contains(&args[3].as_str())
            && lock(&self.registry)
                .get(&args[5])
                .is_none_or(|held| held.task);
        let mut pending = lock(&self.pending);
        if settles {
            // The registration of this grant (made while Redis was away) is this change's now:
            // replayed, it would register nothing (the holding is off the record) or register
            // what the hold, right behind it, creates anyway.
            let holding = &args[5];
            pending.retain(|entry| !matches!(entry, Pending::Register(h, _) if h == holding));
        }
        if args[3] == "upd" {
            let account = &args[5];
            let new: Vec<&[String]> = args[UPD_REPORTS..].chunks_exact(4).collect();
            let mut emptied = false;
            for entry in pending.iter_mut() {
                // (Only those made before it: see the insertion below.)
                if let Pending::Args(old, before) = entry
                    && *before < made
                    && old[3] == "upd"
                    && old[5] == *account
                {
                    let before = old.len();
                    retain_reports(old, |q| {
                        !(q[3] == "0" && new.iter().any(|n| n[0] == q[0] && n[1] == q[1]))
                    });
                    emptied |= before > UPD_REPORTS && old.len() == UPD_REPORTS;
                }
            }
            if emptied {
                drop_emptied_reports(&mut pending);
            }
            insert_in_order(&mut pending, Pending::Args(args, made));
            self.bound_reports(&mut pending);
            return;
        }
        // In the order the changes were made, not the order their failures were seen: the
        // changes on one connection fail together, and their tasks queue them in any order (a
        // task's end queued before its hold would find no task, and the hold replayed after it
        // would keep the slot held until its lease ran out).
        insert_in_order(&mut pending, Pending::Args(args, made));
    }

    /// Holds the task reports kept for replay to [`MAX_PENDING_REPORTS`]: drops the oldest
    /// renewal, else the oldest end, whose task's hold or adopts, kept too, become a give-back
    /// ([`give_back_instead_of_hold`]). An end of a task whose hold or adopt is on its way to
    /// Redis (sent at once, or by the replay) is kept and the next dropped instead: off the
    /// queue, that change cannot become a give-back, and would hold the slot until its lease
    /// ran out.
    fn bound_reports(&self, pending: &mut VecDeque<Pending>) {
        let mut reports = pending
            .iter()
            .map(|entry| match entry {
                Pending::Args(old, _) if old[3] == "upd" => (old.len() - UPD_REPORTS) / 4,
                _ => 0,
            })
            .sum::<usize>();
        if reports <= MAX_PENDING_REPORTS {
            return;
        }
        let on_their_way: Vec<Vec<String>> = lock(&self.sending)
            .values()
            .flatten()
            .cloned()
            .chain(lock(&self.replay_sending).clone())
            .collect();
        let mut dropped = 0;
        while reports > MAX_PENDING_REPORTS {
            if drop_oldest_report(pending, "0", &[]).is_none() {
                let Some((account, end)) = drop_oldest_report(pending, "1", &on_their_way) else {
                    break;
                };
                // Its task's hold or adopts, kept too, would hold the slot until its lease
                // ran out.
                give_back_instead_of_hold(pending, &account, &end);
            }
            reports -= 1;
            dropped += 1;
        }
        if dropped > 0 {
            drop_emptied_reports(pending);
            if !self.overflowed.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max = MAX_PENDING_REPORTS,
                    "redis away: dropping the oldest task reports kept for replay"
                );
            }
        }
    }

    /// Puts a replayed change Redis could not take again back in the queue, in the order
    /// changes were made and held to the bound on kept reports, as a change queued anew is:
    /// reports queued while it was on its way, put back past the bound, would grow the queue
    /// at every replay of a long outage that fails again. Its renewals that a report made after
    /// it replaced go first, as they would have had it been queued ([`Inner::queue`]).
    fn requeue(&self, pending: &mut VecDeque<Pending>, mut entry: Pending) {
        let Pending::Args(args, made) = &mut entry else {
            insert_in_order(pending, entry);
            return;
        };
        if args[3] != "upd" {
            insert_in_order(pending, entry);
            return;
        }
        let made = *made;
        let replaced = |quad: &[String]| {
            pending.iter().any(|later| {
                matches!(later, Pending::Args(new, after)
                    if *after > made
                        && new[3] == "upd"
                        && new[5] == args[5]
                        && new[UPD_REPORTS..]
                            .chunks_exact(4)
                            .any(|n| n[0] == quad[0] && n[1] == quad[1]))
            })
        };
        let gone: Vec<bool> = args[UPD_REPORTS..]
            .chunks_exact(4)
            .map(|quad| quad[3] == "0" && replaced(quad))
            .collect();
        let mut each = gone.into_iter();
        retain_reports(args, |_| !each.next().unwrap_or(false));
        if args.len() == UPD_REPORTS {
            return;
        }
        insert_in_order(pending, entry);
        self.bound_reports(pending);
    }

    /// Marks the store alive once per backend. A store with no generation starts one with a
    /// grace, as after a loss: an empty store looks the same whether it is new or lost its
    /// state, and creates admitted before the fleet registers its slots again meet 1303s.
    async fn init(&self) -> Result<(), StoreError> {
        self.init
            .get_or_try_init(|| async {
                let [p, now, grace] = self.unstamped_head();
                let mut args = vec![p, now, grace, "init".to_owned()];
                self.apply_args(&mut args).await.map(|_| ())
            })
            .await
            .map(|_| ())
    }

    /// Replays what could not be sent, in order. While it runs, new changes queue behind it
    /// (`replaying`, set and cleared under the queue's lock). The metrics move once it is
    /// done (a recorder that panics leaves no change half made).
    async fn replay(&self) -> Result<(), StoreError> {
        let mut finished = Finished::default();
        let replayed = self.replay_counting(&mut finished).await;
        self.show_in_use();
        finished.record();
        replayed
    }

    /// Whether the change `args` made `made`th may be sent to Redis now: not while changes
    /// wait to be replayed or a replay runs. Sent, it is on its way until the guard returned
    /// drops, after its failure is queued.
    fn send_now(&self, made: u64, args: &[String]) -> Option<OnItsWay<'_>> {
        let pending = lock(&self.pending);
        if !pending.is_empty() || self.replaying.load(Ordering::Acquire) {
            return None;
        }
        let holds = holds_a_task(args).then(|| args.to_vec());
        lock(&self.sending).insert(made, holds);
        Some(OnItsWay { inner: self, made })
    }

    /// The next change to replay, once no change made before it is on its way to Redis (its
    /// failure would queue it ahead); none when the queue is empty, which ends the replay.
    async fn next_to_replay(&self) -> Option<Pending> {
        loop {
            let mut answered = pin!(self.answered.notified());
            answered.as_mut().enable();
            {
                let mut pending = lock(&self.pending);
                let sent_before = |front: &Pending| {
                    lock(&self.sending)
                        .first_key_value()
                        .is_some_and(|(&made, _)| made < front.made())
                };
                if !pending.front().is_some_and(sent_before) {
                    let next = pending.pop_front();
                    if next.is_none() {
                        self.replaying.store(false, Ordering::Release);
                    }
                    *lock(&self.replay_sending) = match &next {
                        Some(Pending::Args(args, _)) if holds_a_task(args) => Some(args.clone()),
                        _ => None,
                    };
                    return next;
                }
            }
            answered.await;
        }
    }

    /// [`replay`](Self::replay), the releases to count added to `finished`.
    async fn replay_counting(&self, finished: &mut Finished) -> Result<(), StoreError> {
        {
            let pending = lock(&self.pending);
            if !pending.is_empty() {
                self.replaying.store(true, Ordering::Release);
            }
        }
        loop {
            let next = self.next_to_replay().await;
            let Some(change) = next else { break };
            let mut replayed = Replayed {
                inner: self,
                change,
                answered: false,
            };
            #[cfg(feature = "testing")]
            {
                let delay = *lock(&self.replay_delay);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
            }
            let result = match &replayed.change {
                Pending::Args(args, _) => {
                    let mut args = args.clone();
                    self.apply_args(&mut args).await.map(|reply| {
                        let Reply {
                            released,
                            holdings,
                            finished: counted,
                            ..
                        } = reply;
                        finished.extend(counted);
                        self.ends_counted(&args, &released);
                        let mut registry = lock(&self.registry);
                        for h in holdings {
                            registry.remove(&h);
                        }
                        if matches!(args[3].as_str(), "hold" | "adopt")
                            && let Some(held) = registry.get_mut(&args[5])
                        {
                            held.registered = true;
                        }
                        drop(registry);
                        self.halt_stored(&args);
                    })
                }
                Pending::Register(h, _) => {
                    let held = lock(&self.registry).get(h).cloned();
                    match held.map(|held| (held.lease_left(Instant::now()), held)) {
                        Some((None, _)) => {
                            // Its lease ran out while Redis was away: nothing to register.
                            // Redis has it only if the ask that granted it ran, its answer
                            // lost; its lease there began at that ask, before this one, so it
                            // is over there too, and the pool's next ask releases it before
                            // counting the pool's use: no decision counts it, and its hold
                            // counts anew
                            // (`a_grant_dropped_at_its_lease_end_is_counted_by_no_decision`).
                            lock(&self.registry).remove(h);
                            Ok(())
                        }
                        Some((Some(lease), held)) => {
                            let mut args = self.hold_args("reg", &held.pk, h, &held, lease);
                            self.apply_args(&mut args).await.map(|reply| {
                                finished.extend(reply.finished);
                                if let Some(held) = lock(&self.registry).get_mut(h) {
                                    held.registered = true;
                                }
                            })
                        }
                        None => Ok(()),
                    }
                }
            };
            replayed.answered = true;
            let mut queue = lock(&self.pending);
            *lock(&self.replay_sending) = None;
            if let Err(e) = result {
                if e.keeps_changes() {
                    // In the order changes were made, not at the front: a change made before
                    // it may have been queued while it was on its way (its own send failed
                    // later), and must still go first.
                    self.requeue(&mut queue, replayed.change.clone());
                    self.replaying.store(false, Ordering::Release);
                    return Err(e);
                }
                drop(queue);
                tracing::warn!(error = %e, "dropping a task slot change redis refused");
            }
        }
        self.overflowed.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// The maintenance pass's check that Redis kept its state (`alive`), which also asks
    /// whether the halts Redis had in this generation are still set: one that is not was
    /// reset (by another process), and is forgotten here, so that a restart does not make
    /// this process send it again.
    async fn alive(&self) -> Result<(), StoreError> {
        let generation = self.generation.load(Ordering::Acquire);
        let checked: Vec<(AccountId, u64)> = lock(&self.halts)
            .iter()
            .filter(|(_, halt)| halt.stored_in == Some(generation))
            .map(|(account, halt)| (account.clone(), halt.n))
            .collect();
        let [p, now, grace] = self.unstamped_head();
        let mut args = vec![p, now, grace, "alive".to_owned()];
        args.extend(checked.iter().map(|(account, _)| self.halt_key(account)));
        args[1] = self.now_us().await?.to_string();
        let (items, lost) = self.run_noting_state(&self.apply, &args).await?;
        if lost || self.generation.load(Ordering::Acquire) != generation {
            return Ok(());
        }
        if let Some(Value::Array(flags)) = items.get(3) {
            let mut halts = lock(&self.halts);
            for ((account, n), flag) in checked.iter().zip(flags) {
                if int(flag) == 0
                    && halts
                        .get(account)
                        .is_some_and(|halt| halt.n == *n && halt.stored_in == Some(generation))
                {
                    halts.remove(account);
                }
            }
        }
        Ok(())
    }

    /// One maintenance pass; one at a time (the loop's and [`RedisSlots::maintain`]'s): a
    /// pass that prunes while another registers the holdings again would drop the holdings
    /// not registered yet.
    async fn maintain(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.maintaining.lock().await;
        // Every pass reads fleet time (`init` or `alive` at least), which also starts the
        // periodic clock measurement when it is due.
        self.init().await?;
        // 1. Replay, in order.
        self.replay().await?;
        // 2. Did Redis keep its state? (Every script checks; this one runs while idle too.)
        let went_back = self.went_back.swap(i64::MIN, Ordering::AcqRel);
        if went_back == i64::MIN {
            self.alive().await?;
        } else {
            // The store went back to an older state: a new generation, so every process
            // registers its slots again.
            let [p, now, grace] = self.unstamped_head();
            let mut args = vec![p, now, grace, "newgen".to_owned(), went_back.to_string()];
            if let Err(e) = self.apply_args(&mut args).await {
                let _ = self.went_back.compare_exchange(
                    i64::MIN,
                    went_back,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                return Err(e);
            }
        }
        if self.needs_register.swap(false, Ordering::AcqRel) {
            let mut finished = Finished::default();
            let registered = self.register_again(&mut finished).await;
            if registered.is_err() {
                self.needs_register.store(true, Ordering::Release);
            }
            // The metrics last: a recorder that panics leaves the registration whole.
            self.show_in_use();
            finished.record();
            return registered;
        }
        // 3. Prune what others released for us (a query of theirs, a lease), and note the
        // lease Redis has for the rest (a query of theirs renews it there).
        if let Some(read) = self.read_holdings().await?
            && !self.prune(read)
        {
            return Ok(());
        }
        // 4. The fleet's capacity of this process's pools, for their gauges.
        self.show_capacities().await
    }

    /// The maintenance pass's read of this process's registered holdings in Redis (`ex`):
    /// whether each is there, and the lease Redis has for it. `None` when it registered none.
    async fn read_holdings(&self) -> Result<Option<HoldingsRead>, StoreError> {
        let registered: Vec<(String, String, (Instant, bool))> = lock(&self.registry)
            .iter()
            .filter(|(_, held)| held.registered)
            .map(|(h, held)| (held.pk.clone(), h.clone(), (held.since, held.task)))
            .collect();
        if registered.is_empty() {
            return Ok(None);
        }
        let now_us = self.now_us().await?;
        let read = Instant::now();
        let [p, now, grace] = self.head(now_us);
        let mut args = vec![p, now, grace, "ex".to_owned()];
        for (pk, h, _) in &registered {
            args.push(pk.clone());
            args.push(h.clone());
        }
        let (items, lost) = self.run_noting_state(&self.apply, &args).await?;
        Ok(Some(HoldingsRead {
            registered,
            items,
            lost,
            read,
            now_us,
        }))
    }

    /// Drops from the record the holdings `read` found missing in Redis (another process's
    /// report released them, or their lease ran out there), and notes the lease Redis has for
    /// the rest. `false` when a loss of state was noticed since (by the read or any script
    /// meanwhile): nothing is pruned, and the pass ends (the next registers the holdings
    /// again).
    fn prune(&self, read: HoldingsRead) -> bool {
        let HoldingsRead {
            registered,
            items,
            lost,
            read,
            now_us,
        } = read;
        if lost
            || self.went_back.load(Ordering::Acquire) != i64::MIN
            || self.needs_register.load(Ordering::Acquire)
        {
            return false;
        }
        if let Some(Value::Array(flags)) = items.get(2) {
            let untils = match items.get(3) {
                Some(Value::Array(untils)) => untils.as_slice(),
                _ => &[],
            };
            let mut registry = lock(&self.registry);
            for (i, ((_, h, which), flag)) in registered.iter().zip(flags).enumerate() {
                // Only the record read, not one a hold made since under the same id: Redis
                // may have answered for the grant, the hold still on its way. Read missing
                // (its lease ran out there), the grant is no more; the hold's script, run
                // after the read, counts the task's slots anew, and its record stays.
                let read_here = |held: &Held| (held.since, held.task) == *which;
                if int(flag) == 0 {
                    if registry.get(h).is_some_and(read_here) {
                        registry.remove(h);
                    }
                    continue;
                }
                let until = untils.get(i).map_or(-1, int);
                if until >= 0
                    && let Some(held) = registry.get_mut(h)
                    && read_here(held)
                {
                    let until = self.conn.to_instant(until, read, now_us);
                    held.in_redis = Some((read, until));
                }
            }
        }
        self.show_in_use();
        true
    }

    /// After Redis lost its state (or went back): sends again the halts this process knows of,
    /// registers its holdings again, then [`after_new_generation`](Self::after_new_generation).
    /// The releases to count are added to `finished`.
    async fn register_again(&self, finished: &mut Finished) -> Result<(), StoreError> {
        // The halts first: Redis lost them too.
        self.queue_halts_again();
        self.replay().await?;
        let held: Vec<(String, Held)> = lock(&self.registry)
            .iter()
            .map(|(h, held)| (h.clone(), held.clone()))
            .collect();
        for (h, held) in held {
            // What is left of its lease (as far as the last pass read it in Redis: another
            // process's report renews a task's there): one that ran out is not registered
            // again. (A grant an older state brought back has run out there too, its lease
            // begun no later than this process's; and `mine`, below, releases it.)
            let Some(lease) = held.lease_left(Instant::now()) else {
                lock(&self.registry).remove(&h);
                continue;
            };
            let mut args = self.hold_args("reg", &held.pk, &h, &held, lease);
            // (An adopted task stays one: see `APPLY`'s `supersede_ext`.)
            if held.adopted {
                args.push("1".to_owned());
            }
            let reply = self.apply_args(&mut args).await?;
            finished.extend(reply.finished);
            let mut registry = lock(&self.registry);
            // A task whose end was reported first is not registered again.
            for h in &reply.holdings {
                registry.remove(h);
            }
            if let Some(held) = registry.get_mut(&h) {
                held.registered = true;
            }
        }
        self.after_new_generation().await
    }

    /// After this process registered its holdings in a new generation: releases those Redis
    /// brought back although this process no longer has them (given back or ended after the
    /// snapshot it loaded), and reports again the ends of tasks it reported recently (their
    /// reports may be older than the snapshot: a task ended elsewhere would come back).
    async fn after_new_generation(&self) -> Result<(), StoreError> {
        let [p, now, grace] = self.unstamped_head();
        let mut args = vec![
            p,
            now,
            grace,
            "mine".to_owned(),
            format!("{}.", self.instance),
        ];
        args.extend(lock(&self.registry).keys().cloned());
        self.apply_args(&mut args).await?;
        let cutoff = Instant::now().checked_sub(ends_kept_for(&self.config));
        let ends: Vec<ReportedEnd> = {
            // `registry` before `ends`, the order `local_update` takes them in: taken the
            // other way round, a report made while this pass ran could deadlock the two
            // threads.
            let registry = lock(&self.registry);
            let mut ends = lock(&self.ends);
            if let Some(cutoff) = cutoff {
                ends.retain(|end| end.at >= cutoff);
            }
            // An end reported by external id alone (a lookup that found no task), or told by
            // `complete` by a text that may be one, is not sent again once this process holds
            // a later create under that id: the create sent again made the task, which `upd`
            // (or its registration) would find by that id and end while it runs.
            ends.retain(|end| {
                let [id, ext, status, _] = &end.report;
                let external = if id.is_empty() {
                    ext
                } else if ext.is_empty() && status.is_empty() {
                    id
                } else {
                    return true;
                };
                !registry.values().any(|held| {
                    held.key.account == end.account
                        && held.ext.as_deref() == Some(external.as_str())
                        && held.since >= end.at
                })
            });
            ends.iter().cloned().collect()
        };
        // (By account, create path and whether an end that finds no holding is noted: an
        // `upd`'s reports share all three.)
        type Batch<'e> = (&'e AccountId, &'e str, bool);
        let mut by_account: HashMap<Batch<'_>, Vec<&ReportedEnd>> = HashMap::new();
        for end in &ends {
            // Noted if it finds no holding as when first reported: by a report of it alone,
            // or because it released one (a restored snapshot may bring the task back).
            let note = end.noted_unheld || end.counted;
            let at = (&end.account, end.path.as_str(), note);
            by_account.entry(at).or_default().push(end);
        }
        for ((account, path, note), ends) in by_account {
            for chunk in ends.chunks(256) {
                let mut args = Vec::from(self.unstamped_head());
                // (No id: Redis lost or went back before them.)
                args.extend(upd_head(
                    self.config.get_lease(),
                    account,
                    note,
                    String::new(),
                    path,
                ));
                for end in chunk {
                    let [id, ext, status, _] = end.report.clone();
                    let flag = if end.counted { "2" } else { "3" };
                    args.extend([id, ext, status, flag.to_owned()]);
                }
                // Counted when they were first reported: a task the older state brought back
                // is released again here, but it ended once.
                let Reply {
                    released, holdings, ..
                } = self.apply_args_counting(&mut args, false).await?;
                let mut registry = lock(&self.registry);
                for h in &holdings {
                    registry.remove(h);
                }
                drop(registry);
                for r in &released {
                    self.wake(&self.pk(&r.key));
                }
            }
        }
        Ok(())
    }

    /// Reads the fleet's capacity of each pool this process has sent creates to (less what a
    /// 1303 hides, as recovered by now) and moves the pool's gauge to it.
    async fn show_capacities(&self) -> Result<(), StoreError> {
        let pools: Vec<(String, Arc<PoolLocal>)> = lock(&self.pools)
            .iter()
            .map(|(pk, pool)| (pk.clone(), Arc::clone(pool)))
            .collect();
        if pools.is_empty() {
            return Ok(());
        }
        let [p, now, grace] = self.head(self.now_us().await?);
        let mut args = vec![
            p,
            now,
            grace,
            "caps".to_owned(),
            micros(self.config.get_recovery_interval())
                .max(1)
                .to_string(),
        ];
        for (pk, pool) in &pools {
            let key = &pool.key;
            let (configured, fields) = self.cap_lookup(key);
            args.push(pk.clone());
            args.push(configured.to_string());
            args.push(fields.len().to_string());
            args.extend(fields);
        }
        let (items, lost) = self.run_noting_state(&self.apply, &args).await?;
        if lost {
            return Ok(());
        }
        let Some(Value::Array(caps)) = items.get(2) else {
            return Err(StoreError::protocol(format!(
                "expected the pools' capacities, got {items:?}"
            )));
        };
        if let Some(Value::Array(flat)) = items.get(3) {
            self.saw_caps(flat);
        }
        for ((_, pool), capacity) in pools.iter().zip(caps) {
            pool.gauges
                .show_capacity(u32::try_from(int(capacity)).unwrap_or(0));
        }
        Ok(())
    }

    /// Tries a grant from this process's share while Redis is away.
    fn fallback_grant(
        &self,
        key: &SlotKey,
        pk: &str,
        holding: &str,
        weight: u32,
        processes: u32,
    ) -> bool {
        let capacity = self.capacity_of(key);
        let share = capacity / processes.max(1);
        let now = Instant::now();
        let mut registry = lock(&self.registry);
        // Holdings whose lease ran out hold nothing: Redis, once back, finds them expired (and
        // the maintenance pass prunes them), and counted here they would hold the share for
        // the whole outage.
        let used: u32 = registry
            .values()
            .filter(|held| held.pk == pk && held.lease_left(now).is_some())
            .map(|held| held.weight)
            .sum();
        if used + weight > share {
            return false;
        }
        registry.insert(
            holding.to_owned(),
            Held {
                key: key.clone(),
                pk: pk.to_owned(),
                weight,
                id: None,
                ext: None,
                path: String::new(),
                task: false,
                since: Instant::now(),
                renewed: None,
                in_redis: None,
                lease: self.config.get_lease(),
                registered: false,
                adopted: false,
            },
        );
        drop(registry);
        // Numbered under the queue's lock: every change queued already was made before it.
        let mut pending = lock(&self.pending);
        let made = self.made.fetch_add(1, Ordering::Relaxed);
        pending.push_back(Pending::Register(holding.to_owned(), made));
        true
    }
}

/// When a change is made, `now` fleet time, after one made at `last`: `now`, or just after
/// `last` when fleet time went back by less than the fleet's clocks may differ (a new
/// measurement). Further back (the server's clock itself moved: a failover), `now`: Redis does
/// not trust stamps that far ahead of its scripts' time.
fn next_made_at(last: i64, now: i64) -> i64 {
    let slack = micros(slots_lua::STAMP_SLACK);
    if last < now || last.saturating_sub(now) >= slack {
        now
    } else {
        last.saturating_add(1)
    }
}

/// A report of a task for `upd`: task id, external id, status (`None`: said ended).
type Report<'a> = (&'a str, Option<&'a str>, Option<&'a TaskStatus>);

/// Where an `upd`'s reports start in its arguments (then quads: id, ext, status, terminal).
const UPD_REPORTS: usize = 9;

/// Keeps the reports of the `upd` arguments `args` for which `keep` is true.
fn retain_reports(args: &mut Vec<String>, mut keep: impl FnMut(&[String]) -> bool) {
    let reports = args.split_off(UPD_REPORTS);
    for quad in reports.chunks_exact(4) {
        if keep(quad) {
            args.extend_from_slice(quad);
        }
    }
}

/// Drops the `upd` changes whose reports all went.
fn drop_emptied_reports(pending: &mut VecDeque<Pending>) {
    pending.retain(|entry| {
        !matches!(entry, Pending::Args(old, _) if old[3] == "upd" && old.len() <= UPD_REPORTS)
    });
}

/// Drops the oldest kept report whose terminal flag is `terminal`: its account and its quad
/// (id, ext, status, flag); none if none is kept. The oldest report of the task of each of
/// `spared` (changes that hold a task, [`holds_a_task`]) stays.
fn drop_oldest_report(
    pending: &mut VecDeque<Pending>,
    terminal: &str,
    spared: &[Vec<String>],
) -> Option<(String, Vec<String>)> {
    let mut spent = vec![false; spared.len()];
    for entry in pending.iter_mut() {
        let Pending::Args(old, _) = entry else {
            continue;
        };
        if old[3] != "upd" {
            continue;
        }
        let at = old[UPD_REPORTS..].chunks_exact(4).position(|q| {
            if q[3] != terminal {
                return false;
            }
            let spare =
                (0..spared.len()).find(|&i| !spent[i] && names_task(&spared[i], &old[5], q));
            if let Some(i) = spare {
                spent[i] = true;
            }
            spare.is_none()
        });
        if let Some(at) = at {
            let start = UPD_REPORTS + at * 4;
            let quad = old.drain(start..start + 4).collect();
            return Some((old[5].clone(), quad));
        }
    }
    None
}

/// Where a `hold`'s task id, external id and account are in its arguments ([`Inner::hold_args`]).
const HOLD_ID: usize = 7;
const HOLD_EXT: usize = 8;
const HOLD_ACCOUNT: usize = 10;

/// A task's end `end` (id, ext, status, flag) of `account` dropped from the replay queue: the
/// hold of that task, if one is kept too (the task created and ended while Redis was away, or
/// its hold queued behind such changes), becomes a give-back of its holding. Replayed, the
/// hold would hold the slot until its lease ran out; the give-back frees the grant Redis may
/// have and holds nothing. Only a hold the end names alone: by its task id, or (a hold with no
/// task id) by its external id. The adopts of its task id kept go too (a reconcile listed the
/// task, before or after the hold): replayed, one would find neither the hold nor the end and
/// hold the slot until its lease ran out.
fn give_back_instead_of_hold(pending: &mut VecDeque<Pending>, account: &str, end: &[String]) {
    let is = |entry: &Pending, op: &str| match entry {
        Pending::Args(args, _) => args[3] == op && names_task(args, account, end),
        Pending::Register(..) => false,
    };
    pending.retain(|entry| !is(entry, "adopt"));
    let mut found = pending
        .iter()
        .enumerate()
        .filter(|(_, entry)| is(entry, "hold"))
        .map(|(at, _)| at);
    let (Some(at), None) = (found.next(), found.next()) else {
        return;
    };
    if let Some(Pending::Args(args, _)) = pending.get_mut(at) {
        // (Pool key and holding, as a give-back carries them, and no weight: the hold may
        // have run in Redis, its answer lost (a timeout), and made the grant a task, which a
        // give-back of a weight, freeing only a grant, would leave held until its lease ran
        // out. The holding is this hold's own: whatever it is goes.)
        args.truncate(6);
        args[3] = "give".to_owned();
        args.push(String::new());
    }
}

/// Whether `args` hold a task's slots once Redis applies them: a `hold` or an `adopt`.
fn holds_a_task(args: &[String]) -> bool {
    matches!(args.get(3).map(String::as_str), Some("hold" | "adopt"))
}

/// Whether the end `end` (id, ext, status, flag) of `account` names the task that `change`
/// holds ([`holds_a_task`]) alone: by its task id, or (a hold with no task id) by its
/// external id.
fn names_task(change: &[String], account: &str, end: &[String]) -> bool {
    let [id, ext, ..] = end else { return false };
    if !holds_a_task(change) || change.len() <= HOLD_ACCOUNT || change[HOLD_ACCOUNT] != account {
        return false;
    }
    let by_id = !id.is_empty() && change[HOLD_ID] == *id;
    let by_ext = change[3] == "hold"
        && change[HOLD_ID].is_empty()
        && !ext.is_empty()
        && change[HOLD_EXT] == *ext;
    by_id || by_ext
}

struct Prepared {
    args: Vec<String>,
    /// When it was made ([`Inner::made`]).
    made: u64,
    local: Applied,
    wake: Option<String>,
    adopt: Option<(String, Held)>,
    /// A reservation handed back that no grant of this process's holds, logged once the
    /// change is sent or queued.
    stale: Option<StaleReservation>,
}

/// A reservation handed back (given back, kept, or refused by the server) that no grant of
/// this process holds: given back or kept already (a stale copy: [`Reservation`] is plain
/// data), of another pool, account, weight or backend, or made up. It frees no slot, so that
/// no create gets in past the pool's limit, and is logged as the caller's error, as the
/// in-process backend logs it.
#[derive(Debug)]
struct StaleReservation {
    change: &'static str,
    key: SlotKey,
    weight: u32,
    token: u64,
}

impl StaleReservation {
    /// `reservation`, handed back by `change`; none for one of no slots, which frees nothing
    /// either way.
    #[cold]
    fn of(reservation: &Reservation, change: &'static str) -> Option<Self> {
        (reservation.weight > 0).then(|| StaleReservation {
            change,
            key: reservation.key.clone(),
            weight: reservation.weight,
            token: reservation.token,
        })
    }

    fn warn(&self) {
        tracing::warn!(
            account = %self.key.account,
            pool = %self.key.pool,
            weight = self.weight,
            token = self.token,
            change = self.change,
            "a reservation no grant holds was handed back (settled already, of another pool \
             or backend, or made up): it frees no slot"
        );
    }
}

fn encode_cause(cause: &ApiError) -> String {
    let body = serde_json::json!({
        "code": cause.code().as_i64(),
        "message": cause.message(),
        "request_id": cause.request_id(),
    });
    format!("{}\n{body}", cause.status().as_u16())
}

fn decode_cause(text: &str) -> Option<ApiError> {
    let (status, body) = text.split_once('\n')?;
    let status = StatusCode::from_u16(status.parse().ok()?).ok()?;
    let outcome =
        Outcome::parse(status, &HeaderMap::new(), body.as_bytes(), Instant::now()).ok()?;
    Some(ApiError::from_outcome(&outcome))
}

fn array(value: Value) -> Result<Vec<Value>, StoreError> {
    match value {
        Value::Array(items) => Ok(items),
        other => Err(StoreError::protocol(format!(
            "expected an array, got {other:?}"
        ))),
    }
}

fn int(value: &Value) -> i64 {
    match value {
        Value::Int(n) => *n,
        Value::BulkString(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

fn int_at(items: &[Value], i: usize) -> Result<i64, StoreError> {
    items
        .get(i)
        .map(int)
        .ok_or_else(|| StoreError::protocol(format!("reply too short: {items:?}")))
}

fn text(value: &Value) -> String {
    text_in(value).into_owned()
}

/// [`text`] borrowed from the reply where it can be (UTF-8 text), for a value read and not kept.
fn text_in(value: &Value) -> Cow<'_, str> {
    match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes),
        Value::SimpleString(s) => Cow::Borrowed(s),
        Value::Int(n) => Cow::Owned(n.to_string()),
        _ => Cow::Borrowed(""),
    }
}

/// How long the subscriber waits before it connects again after a failure (or a subscription
/// that lasted less than [`RESUBSCRIBE_MAX`]), at first; it doubles with each failure in a row
/// up to [`RESUBSCRIBE_MAX`].
const RESUBSCRIBE_FIRST: Duration = Duration::from_millis(100);
/// The longest wait between two attempts of the subscriber to connect.
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(1);

/// Listens on `PREFIX:freed` and wakes the heads of the pools named, on `PREFIX:halted` and
/// learns the halts set elsewhere, and on `PREFIX:unhalted` and forgets the halts reset
/// elsewhere. It reconnects on loss (backing off while it fails) and then wakes every head (a
/// release may have been missed), reads the halts it may have missed
/// ([`Inner::reread_halts`]) and wakes the maintenance pass (which finds a missed reset).
/// Ends when the backend is dropped.
async fn subscriber(inner: Weak<Inner>, shutdown: Arc<Notify>) {
    let mut stopped = pin!(shutdown.notified_owned());
    let mut backoff = RESUBSCRIBE_FIRST;
    // Whether the last attempt to connect was refused the credentials (logged once).
    let mut refused = false;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let client = strong.conn.client().clone();
        let channel = strong.conn.key("freed");
        let halted = strong.conn.key("halted");
        let unhalted = strong.conn.key("unhalted");
        let timeout = strong.conn.command_timeout();
        drop(strong);
        let connected = tokio::time::timeout(timeout, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&[&channel, &halted, &unhalted]).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        // A refused password is said once (not in the commands' errors, which may still be
        // answered over their connection): wake-ups wait for it, and creates poll meanwhile.
        match &connected {
            Ok(Err(e)) if !refused && StoreError::from_redis(e).is_auth_refused() => {
                refused = true;
                tracing::warn!(
                    error = %StoreError::from_redis(e),
                    "redis refused the task slots' wake-up connection: creates poll for free slots until it accepts the credentials"
                );
            }
            Ok(Ok(_)) if refused => {
                refused = false;
                tracing::info!("redis accepts the task slots' wake-up connection again");
            }
            _ => {}
        }
        // Subscribed first, then the halts read: one set in between is read or broadcast.
        let reread = match connected {
            Ok(Ok(pubsub)) => match inner.upgrade() {
                Some(strong) => {
                    strong.wake("*");
                    strong.wake_maintenance.notify_one();
                    let read = strong.reread_halts().await;
                    drop(strong);
                    read.map(|()| pubsub).map_err(|e| {
                        tracing::debug!(error = %e, "could not read the halts after subscribing");
                    })
                }
                None => return,
            },
            _ => Err(()),
        };
        let Ok(pubsub) = reread else {
            let sleep = pin!(tokio::time::sleep(backoff));
            backoff = (backoff * 2).min(RESUBSCRIBE_MAX);
            if wait_either(stopped.as_mut(), sleep).await {
                return;
            }
            continue;
        };
        let subscribed = tokio::time::Instant::now();
        let mut stream = pubsub.into_on_message();
        loop {
            let next = std::future::poll_fn(|cx| {
                if stopped.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                match futures_core::Stream::poll_next(Pin::new(&mut stream), cx) {
                    Poll::Ready(Some(msg)) => Poll::Ready(Some(Some(msg))),
                    Poll::Ready(None) => Poll::Ready(Some(None)),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            match next {
                None => return,
                Some(Some(msg)) => {
                    let Some(strong) = inner.upgrade() else {
                        return;
                    };
                    let payload = msg.get_payload::<String>().ok();
                    let name = msg.get_channel_name();
                    if name == halted {
                        if let Some(account) = strong.halt_broadcast(payload.as_deref())
                            && let Err(e) = strong.read_halts(&[account]).await
                        {
                            // Missed: the next ask of the account learns it from Redis.
                            tracing::debug!(error = %e, "could not read a halt broadcast");
                        }
                    } else if name == unhalted {
                        strong.halt_reset(payload.as_deref().unwrap_or_default());
                    } else {
                        strong.wake(payload.as_deref().unwrap_or_default());
                    }
                }
                Some(None) => break,
            }
        }
        if let Some(strong) = inner.upgrade() {
            strong.wake("*");
        }
        // A subscription dropped soon after it was made (a server that closes it at once, a
        // subscriber too slow for its output buffer) backs off too: each one wakes every head
        // and reads the halts again.
        if subscribed.elapsed() >= RESUBSCRIBE_MAX {
            backoff = RESUBSCRIBE_FIRST;
        } else {
            let sleep = pin!(tokio::time::sleep(backoff));
            backoff = (backoff * 2).min(RESUBSCRIBE_MAX);
            if wait_either(stopped.as_mut(), sleep).await {
                return;
            }
        }
    }
}

/// `true` when `stopped` fired first.
async fn wait_either(
    mut stopped: Pin<&mut tokio::sync::futures::OwnedNotified>,
    mut other: Pin<&mut impl Future<Output = ()>>,
) -> bool {
    std::future::poll_fn(|cx| {
        if stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(true);
        }
        other.as_mut().poll(cx).map(|()| false)
    })
    .await
}

/// Runs [`Inner::maintain`] every `maintain_every`, and at once when woken.
async fn maintenance(inner: Weak<Inner>, shutdown: Arc<Notify>) {
    let mut stopped = pin!(shutdown.notified_owned());
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let every = strong.maintain_every;
        #[cfg(feature = "testing")]
        let held = strong.maintenance_held.load(Ordering::Acquire);
        #[cfg(not(feature = "testing"))]
        let held = false;
        if !held {
            // A pass that panics (a metrics recorder's) is over, and the next runs as usual:
            // the task ending would end the replays, registrations and pruning for good.
            let mut pass = pin!(strong.maintain());
            std::future::poll_fn(|cx| {
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    pass.as_mut().poll(cx)
                })) {
                    Ok(Poll::Pending) => Poll::Pending,
                    Ok(Poll::Ready(_)) | Err(_) => Poll::Ready(()),
                }
            })
            .await;
        }
        let woken = Arc::clone(&strong.wake_maintenance).notified_owned();
        drop(strong);
        let wait = pin!(async move {
            let _ = tokio::time::timeout(every, woken).await;
        });
        if wait_either(stopped.as_mut(), wait).await {
            return;
        }
    }
}

/// Gives a possibly received grant back if the acquire future is dropped (or fails) while
/// its script may have run, and gives up the create's place in the fleet's queue.
struct GrantGuard {
    inner: Arc<Inner>,
    key: SlotKey,
    token: u64,
    weight: u32,
    armed: bool,
    /// Holds a place in the fleet's queue.
    queued: bool,
}

impl Drop for GrantGuard {
    fn drop(&mut self) {
        if !self.armed && !self.queued {
            return;
        }
        let op = SlotOp::GiveBack(Reservation {
            key: self.key.clone(),
            weight: self.weight,
            token: self.token,
        });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            // Most often a grant this process never filed (its ask's answer lost, or none
            // made: a place in the queue given up): no stale reservation, the script gives
            // back what Redis granted it, if anything.
            let mut prepared = self.inner.prepare(op, "", Heard::Report);
            prepared.stale = None;
            drop(self.inner.start_prepared(prepared, &handle));
        }
    }
}

/// Counts a create of a pool, from its arrival until it is granted or refused, for snapshots
/// and the waiters gauge.
struct WaiterCount {
    pool: Arc<PoolLocal>,
    /// How many of this process's creates of the pool were counted before it.
    ahead: usize,
}

impl WaiterCount {
    /// Counted before the gauge moves: should a metrics recorder panic there, dropping it
    /// takes the create out of the count again (and the gauge's move it owes cancels out).
    fn new(pool: Arc<PoolLocal>) -> Self {
        let ahead = pool.waiters.fetch_add(1, Ordering::Relaxed);
        let count = WaiterCount { pool, ahead };
        count.pool.gauges.move_waiters(1);
        count
    }
}

impl Drop for WaiterCount {
    /// Also while unwinding (a waiting create dropped in a panic): the gauge moves then too,
    /// or, should the recorder panic again, at the next move.
    fn drop(&mut self) {
        self.pool.waiters.fetch_sub(1, Ordering::Relaxed);
        self.pool.gauges.move_waiters(-1);
    }
}

/// A create refused because `max` creates of its pool already wait in this process.
fn queue_full(key: SlotKey, max: usize) -> AcquireError {
    AcquireError::QueueFull(QueueFull::new(key.account, key.pool, max))
}

/// A maintenance pass's read of this process's holdings in Redis ([`Inner::read_holdings`]),
/// for [`Inner::prune`].
struct HoldingsRead {
    /// The holdings read: pool key, holding id, and which record of it (its `since` and
    /// whether it was a task).
    registered: Vec<(String, String, (Instant, bool))>,
    /// The `ex` reply.
    items: Vec<Value>,
    /// Whether the reply told of a new generation.
    lost: bool,
    /// When it was read, here and in fleet time (µs).
    read: Instant,
    now_us: i64,
}

/// An `APPLY` reply ([`Inner::apply_args`]).
struct Reply {
    changed: bool,
    released: Vec<Released>,
    /// The holdings of `released`.
    holdings: Vec<String>,
    /// `released` to count in the finished-task metrics, after the reply's bookkeeping.
    finished: Finished,
}

/// The boxed futures of [`RedisSlots`].
pub type SlotsFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// Releases to count in the finished-task metrics ([`released_by`]), counted with
/// [`record`](Finished::record) once the bookkeeping of the reply that told of them is done: a
/// metrics recorder that panics there loses no change.
#[derive(Debug, Default)]
#[must_use = "released tasks are counted by `record`"]
struct Finished(Vec<FinishedTask>);

/// A released task to count: its pool, its status label, how long it was held, and, when its
/// lease ran out, what the warning names.
#[derive(Debug)]
struct FinishedTask {
    pool: Pool,
    status: String,
    held_for: Duration,
    ran_out: Option<RanOut>,
    /// Whether it is counted; else only warned of: a grant whose lease ran out is no task
    /// that ended (should its create be answered, its hold counts the task anew).
    counted: bool,
}

/// A task whose lease ran out, as its warning names it.
#[derive(Debug)]
struct RanOut {
    account: String,
    /// `None`: its create's answer never came (or its grant was never held).
    task_id: Option<String>,
    external_id: Option<String>,
    /// Its holding id, which begins with the instance id of the process that held it: a
    /// grant left by a process that stopped has no other id.
    holding: String,
    weight: u32,
}

impl Finished {
    /// Counts the releases in the finished-task metrics, and logs those whose lease ran out.
    ///
    /// Every one, even when the recorder (or the subscriber) panics at one (the first panic
    /// resumes after): one answer ends several tasks.
    fn record(self) {
        each_completing(self.0.into_iter(), |task| {
            if let Some(ran_out) = &task.ran_out {
                warn_lease_ran_out(ran_out, &task.pool, task.held_for);
            }
            if !task.counted {
                return;
            }
            let labels = [
                (
                    names::LABEL_POOL,
                    names::pool_label(Some(&task.pool)).to_owned(),
                ),
                (names::LABEL_STATUS, task.status),
            ];
            metrics::counter!(names::TASKS_FINISHED, &labels).increment(1);
            metrics::histogram!(names::TASK_LIFETIME, &labels).record(task.held_for.as_secs_f64());
        });
    }

    fn extend(&mut self, other: Finished) {
        self.0.extend(other.0);
    }
}

/// Says that a task's slots went back because its lease ran out, as the in-process backend
/// says it: nothing reported the task for a whole lease (no query, callback or listing, in any
/// process), so it may still run on the server, and the freed slot may meet a `1303`. Logged
/// once in the fleet, by the process whose script released it.
#[cold]
fn warn_lease_ran_out(task: &RanOut, pool: &Pool, held_for: Duration) {
    tracing::warn!(
        account = %task.account,
        pool = %pool,
        task_id = task
            .task_id
            .as_deref()
            .unwrap_or("(unknown: its create's answer was lost)"),
        external_id = task.external_id.as_deref(),
        holding = task.holding.as_str(),
        weight = task.weight,
        held_secs = held_for.as_secs(),
        "task slot released at the end of its lease, the task never reported ended: it may still \
         be running on the server"
    );
}

/// A release's reason as a script gives it when the lease ran out (see `maintain`), with its
/// task field: the task's ids, else `None` (another reason). Borrowed: every release of a
/// reply is read here, and only those whose lease ran out are copied for their warning.
fn ran_out_ids<'a>(reason: &'a str, task: &'a str) -> Option<(Option<&'a str>, Option<&'a str>)> {
    let task = (!task.is_empty()).then_some(task);
    match reason {
        "expired" => Some((task, None)),
        "expired?" => Some((None, task)),
        _ => reason
            .strip_prefix("expired:")
            .map(|external| (task, Some(external))),
    }
}

/// The tasks a script released (flat septuples: account, pool, task, weight, since, reason,
/// holding), and their holdings. Each release is reported to the one process whose script
/// made it, which counts it in its finished-task metrics (when `count`: those returned, to
/// [`record`](Finished::record)), so the fleet counts it once, and logs it once when its
/// lease ran out.
fn released_by(
    flat: Option<&Value>,
    now_us: i64,
    count: bool,
) -> (Vec<Released>, Vec<String>, Finished) {
    let mut released = Vec::new();
    let mut holdings = Vec::new();
    let mut finished = Finished::default();
    let Some(Value::Array(flat)) = flat else {
        return (released, holdings, finished);
    };
    for chunk in flat.chunks_exact(7) {
        let account = text(&chunk[0]);
        // Read in place: only the account and the holding are kept.
        let Some(pool) = Pool::parse(&text_in(&chunk[1])) else {
            continue;
        };
        let task = text_in(&chunk[2]);
        let weight = u32::try_from(int(&chunk[3])).unwrap_or(0);
        let since = int(&chunk[4]);
        let reason = text_in(&chunk[5]);
        // `=`: not to be counted: its end was counted already (by the release its report made
        // before Redis lost its state), or no task ended (a lookup found its create never
        // happened; a grant's lease ran out, `=expired`, warned of all the same).
        let (counted_before, reason) = match reason.strip_prefix('=') {
            Some(reason) => (true, reason),
            None => (false, &*reason),
        };
        let ran_out = ran_out_ids(reason, &task);
        let reason = match reason.strip_prefix("ended:") {
            Some(status) => ReleaseReason::Ended(TaskStatus::parse(status)),
            None if reason == "completed" => ReleaseReason::Completed,
            None => ReleaseReason::LeaseExpired,
        };
        let holding = text(&chunk[6]);
        let held_for = Duration::from_micros(now_us.saturating_sub(since).max(0) as u64);
        let counted = count && !counted_before;
        if counted || (count && ran_out.is_some()) {
            let ran_out = ran_out.map(|(task_id, external_id)| RanOut {
                account: account.clone(),
                task_id: task_id.map(str::to_owned),
                external_id: external_id.map(str::to_owned),
                holding: holding.clone(),
                weight,
            });
            finished.0.push(FinishedTask {
                pool: pool.clone(),
                status: reason.as_str().to_owned(),
                held_for,
                ran_out,
                counted,
            });
        }
        released.push(Released {
            key: SlotKey::new(AccountId::new(account), pool),
            task: (!task.is_empty()).then(|| Arc::from(&*task)),
            weight,
            held_for,
            reason,
        });
        holdings.push(holding);
    }
    (released, holdings, finished)
}

enum Verdict {
    Granted,
    Wait(Option<i64>),
    /// The halt's cause and when it was made (empty: not known).
    Halted(String, String),
    Over(u32),
}

/// The accounts this process knows halted (its own `1102`s, and another process's once
/// broadcast or an ask of this one was refused by it, until a reset), for the classify step
/// ([`CreateHalts`]): another process's halt stops a create this one granted already from
/// when it is learnt here (the broadcast's delivery, a millisecond on a LAN).
struct HaltedHere(Arc<Mutex<HashMap<AccountId, LocalHalt>>>);

impl HaltedAccounts for HaltedHere {
    fn refusal(&self, account: &AccountId) -> Option<BoxError> {
        let cause = lock(&self.0).get(account)?.cause.clone();
        Some(Box::new(Halted::new(account.clone(), cause)))
    }
}

impl SlotBackend for RedisSlots {
    type Acquire = SlotsFuture<Reservation, AcquireError>;
    type Apply = SlotsFuture<Applied, BackendError>;
    type Snapshot = SlotsFuture<Vec<PoolSnapshot>, BackendError>;

    /// This process's halts: a create it granted before its own `1102` of the account (or
    /// before it learnt of another process's, broadcast or at an ask Redis refused), and held
    /// below the slots, is refused by the classify step, unsent, while the halt stands.
    fn create_halts(&self) -> Option<Arc<CreateHalts>> {
        Some(Arc::clone(&self.inner.create_halts))
    }

    fn acquire(&self, key: SlotKey, weight: u32) -> Self::Acquire {
        let inner = Arc::clone(&self.inner);
        inner.start();
        Box::pin(async move {
            // When this create arrived; in fleet time (its place in the fleet's order) from
            // the first ask that has the server's clock, and the same at every ask after.
            let arrived = Instant::now();
            let mut arrival = None;
            let pk = inner.pk(&key);
            let local = inner.local(&pk, &key);
            let waiting = WaiterCount::new(Arc::clone(&local));
            let ahead = waiting.ahead;
            let max_queue = inner.config.get_max_queue();
            if let Some(max) = max_queue
                && max > 0
                && ahead >= max
                && local.blocked.load(Ordering::Relaxed)
            {
                return Err(queue_full(key, max));
            }
            // FIFO within the process: only the head asks Redis.
            let _turn = local.fifo.lock().await;
            // A fresh store is marked alive first (an unreachable one is retried below).
            let _ = inner.init().await;
            let token = inner.next.fetch_add(1, Ordering::Relaxed);
            let holding = inner.holding(token);
            let mut guard = GrantGuard {
                inner: Arc::clone(&inner),
                key: key.clone(),
                token,
                weight,
                armed: false,
                queued: false,
            };
            // No check against the capacity here: the script checks it against the run-time
            // one in Redis (set by any process), and answers `{4, capacity}`.
            let (configured, cap_fields) = inner.cap_lookup(&key);
            let halt_key = inner.halt_key(&key.account);
            let place_ttl = micros(
                inner
                    .place_ttl
                    .unwrap_or(inner.poll_every * DEFAULT_PLACE_TTL_POLLS),
            )
            .max(1)
            .to_string();
            // A create that will not wait takes no place; nor does any without the fleet order.
            let join = inner.arrival_order && max_queue != Some(0);
            let mut unanswered = false;
            loop {
                let mut notified = pin!(local.notify.notified());
                notified.as_mut().enable();
                // A halt recorded here that Redis may not have yet (its script in flight, or
                // queued behind changes waiting for Redis), or not any more (lost in a restart,
                // not sent again yet): refused without asking, since Redis would grant it. One
                // Redis has is Redis's to answer (it may have been reset).
                let halt_before = {
                    let halts = lock(&inner.halts);
                    let generation = inner.generation.load(Ordering::Acquire);
                    match halts.get(&key.account) {
                        Some(halt) if halt.stored_in != Some(generation) => {
                            return Err(AcquireError::Halted(Halted::new(
                                key.account.clone(),
                                halt.cause.clone(),
                            )));
                        }
                        Some(halt) => Some(halt.n),
                        None => None,
                    }
                };
                // Never on this process's own clock: the first ask of a lazy connection waits
                // for the offset to the server's (failing, it is an unreachable Redis's case).
                let asked = inner.now_us().await;
                let now = Instant::now();
                let asked = match asked {
                    Ok(now_us) => {
                        let arrival = *arrival
                            .get_or_insert_with(|| inner.conn.to_fleet(arrived, now, now_us));
                        let [p, time, grace] = inner.head(now_us);
                        let mut args = vec![
                            p,
                            time,
                            grace,
                            pk.clone(),
                            holding.clone(),
                            weight.to_string(),
                            configured.to_string(),
                            halt_key.clone(),
                            micros(inner.config.get_recovery_interval())
                                .max(1)
                                .to_string(),
                            micros(inner.config.get_lease()).to_string(),
                            key.account.as_str().to_owned(),
                            key.pool.to_string(),
                            // Without a place, a create counts as arriving at each ask: behind
                            // every create that holds one.
                            if inner.arrival_order { arrival } else { now_us }.to_string(),
                            place_ttl.clone(),
                            if join { "1" } else { "0" }.to_owned(),
                        ];
                        args.extend(cap_fields.iter().cloned());
                        guard.armed = true;
                        let before = inner.sent_in();
                        let answer = inner.run(&inner.acquire, &args).await;
                        #[cfg(feature = "testing")]
                        let answer = answer.and_then(|value| {
                            let lose = inner.lose_acquire_answers.fetch_update(
                                Ordering::AcqRel,
                                Ordering::Acquire,
                                |n| n.checked_sub(1),
                            );
                            match lose {
                                Ok(_) => Err(StoreError::timed_out(Duration::ZERO)),
                                Err(_) => Ok(value),
                            }
                        });
                        answer.map(|value| (value, now_us, before))
                    }
                    Err(e) => Err(e),
                };
                let (verdict, now_us) = match asked {
                    Ok((value, now_us, before)) => {
                        let items =
                            array(value).map_err(|e| AcquireError::Backend(e.into_slots()))?;
                        let verdict =
                            int_at(&items, 0).map_err(|e| AcquireError::Backend(e.into_slots()))?;
                        let lost = if verdict == 0 {
                            items.get(1)
                        } else {
                            items.get(2)
                        };
                        // Leases the script found run out (counted; their holdings are
                        // others' or pruned by the next maintenance pass).
                        let expired = if verdict == 0 { 2 } else { 3 };
                        let (_, _, finished) = released_by(items.get(expired), now_us, true);
                        inner.saw_state(lost, before);
                        // (Should a metrics recorder panic, the guard gives a grant back.)
                        finished.record();
                        // Redis answered with no halt set: the one Redis had when this was
                        // asked, in the generation it answered in, was reset (perhaps by
                        // another process), and must not refuse creates later while Redis is
                        // away. A halt recorded here since, or one Redis lost in a restart
                        // this answer tells of, is not Redis's answer's to end: the create is
                        // refused (what it may have been granted is given back), and the
                        // maintenance pass sends the halt again.
                        if verdict != 3 {
                            let generation = inner.generation.load(Ordering::Acquire);
                            let mut halts = lock(&inner.halts);
                            match halts.get(&key.account) {
                                Some(halt) if halt.stored_in != Some(generation) => {
                                    guard.armed = true;
                                    return Err(AcquireError::Halted(Halted::new(
                                        key.account.clone(),
                                        halt.cause.clone(),
                                    )));
                                }
                                Some(halt) if Some(halt.n) == halt_before => {
                                    halts.remove(&key.account);
                                }
                                _ => {}
                            }
                        }
                        let verdict = match verdict {
                            0 => Verdict::Granted,
                            1 | 2 => Verdict::Wait(items.get(1).map(int).filter(|&t| t >= 0)),
                            3 => Verdict::Halted(
                                items.get(1).map(text).unwrap_or_default(),
                                items.get(4).map(text).unwrap_or_default(),
                            ),
                            4 => Verdict::Over(
                                u32::try_from(items.get(1).map_or(0, int)).unwrap_or(0),
                            ),
                            other => {
                                return Err(AcquireError::Backend(
                                    StoreError::protocol(format!("acquire verdict {other}"))
                                        .into_slots(),
                                ));
                            }
                        };
                        (verdict, now_us)
                    }
                    Err(e) if e.is_unreachable() => {
                        // The ask may have run, and granted, with its answer lost.
                        unanswered = true;
                        let halt = lock(&inner.halts)
                            .get(&key.account)
                            .map(|h| h.cause.clone());
                        if let Some(cause) = halt {
                            return Err(AcquireError::Halted(Halted::new(
                                key.account.clone(),
                                cause,
                            )));
                        }
                        // The capacity as this process last read or set it.
                        let capacity = inner.capacity_of(&key);
                        if capacity > 0 && weight > capacity {
                            let over = OverCapacity::new(key.pool.clone(), weight, capacity);
                            let over = over.in_account(key.account.clone());
                            return Err(AcquireError::OverCapacity(over));
                        }
                        match inner.when_unreachable {
                            WhenUnreachable::Fail => {
                                return Err(AcquireError::Backend(e.into_slots()));
                            }
                            WhenUnreachable::Fallback { processes }
                                if inner.fallback_grant(
                                    &key,
                                    &pk,
                                    &holding,
                                    weight,
                                    processes.get(),
                                ) =>
                            {
                                // A place taken before Redis went away ends with its TTL
                                // (giving it back would give back this grant too).
                                guard.queued = false;
                                local.blocked.store(false, Ordering::Relaxed);
                                // The gauges move while the guard would give the grant back:
                                // should a metrics recorder panic, it is not held for nobody.
                                inner.show_in_use();
                                drop(waiting);
                                guard.armed = false;
                                return Ok(Reservation { key, weight, token });
                            }
                            _ => {}
                        }
                        let wake = Instant::now() + inner.retry_every;
                        let _ = tokio::time::timeout_at(wake, notified).await;
                        continue;
                    }
                    Err(e) => return Err(AcquireError::Backend(e.into_slots())),
                };
                match verdict {
                    Verdict::Granted => {
                        // The script took the create out of the fleet's queue.
                        guard.queued = false;
                        local.blocked.store(false, Ordering::Relaxed);
                        lock(&inner.registry).insert(
                            holding.clone(),
                            Held {
                                key: key.clone(),
                                pk: pk.clone(),
                                weight,
                                id: None,
                                ext: None,
                                path: String::new(),
                                task: false,
                                since: Instant::now(),
                                renewed: None,
                                in_redis: None,
                                lease: inner.config.get_lease(),
                                registered: true,
                                adopted: false,
                            },
                        );
                        // The gauges move while the guard would give the grant back: should a
                        // metrics recorder panic, it is not held for nobody until its lease.
                        inner.show_in_use();
                        drop(waiting);
                        guard.armed = false;
                        return Ok(Reservation { key, weight, token });
                    }
                    Verdict::Halted(cause, halt_made_at) => {
                        // An earlier ask whose answer was lost may have been granted before
                        // the halt was set (the script checks the halt first): its grant is
                        // given back (a give-back of none changes nothing).
                        guard.armed = unanswered;
                        guard.queued = false;
                        let cause = decode_cause(&cause).unwrap_or_else(|| {
                            let body = r#"{"code":1102,"message":"resource pack exhausted","request_id":null}"#;
                            let outcome = Outcome::parse(
                                StatusCode::TOO_MANY_REQUESTS,
                                &HeaderMap::new(),
                                body.as_bytes(),
                                Instant::now(),
                            )
                            .expect("a valid envelope");
                            ApiError::from_outcome(&outcome)
                        });
                        // Kept as recorded if this process recorded one since it asked.
                        let generation = inner.generation.load(Ordering::Acquire);
                        inner.learn_halt(&key.account, &cause, generation, &halt_made_at);
                        return Err(AcquireError::Halted(Halted::new(
                            key.account.clone(),
                            cause,
                        )));
                    }
                    Verdict::Over(capacity) => {
                        guard.armed = false;
                        guard.queued = false;
                        let over = OverCapacity::new(key.pool.clone(), weight, capacity);
                        let over = over.in_account(key.account.clone());
                        return Err(AcquireError::OverCapacity(over));
                    }
                    Verdict::Wait(next) => {
                        guard.armed = false;
                        guard.queued = join;
                        local.blocked.store(true, Ordering::Relaxed);
                        if max_queue == Some(0) {
                            return Err(queue_full(key, 0));
                        }
                        let mut wake = now + inner.poll_every;
                        if let Some(next) = next {
                            let at =
                                inner.conn.to_instant(next, now, now_us) + Duration::from_millis(1);
                            wake = wake.min(at);
                        }
                        let _ = tokio::time::timeout_at(wake, notified).await;
                    }
                }
            }
        })
    }

    fn apply(&self, op: SlotOp) -> Self::Apply {
        self.apply_on(op, CreatePath::UNKNOWN)
    }

    /// As `hold_unread`, the create's path kept with its holding in Redis: a report of another
    /// create path's task under the same external id does not end it.
    fn hold_unread_on(
        &self,
        reservation: Reservation,
        id: Option<&str>,
        external_id: Option<&str>,
        lease: Duration,
        answered_at: Option<Instant>,
        path: CreatePath,
    ) -> Self::Apply {
        // (The lease runs on the fleet's clock, from when Redis keeps the holding.)
        let _ = answered_at;
        let task = TaskRef {
            id: id.map(str::to_owned),
            external_id: external_id.map(str::to_owned),
        };
        let op = SlotOp::Hold {
            reservation,
            task,
            lease,
        };
        self.apply_on(op, path)
    }

    /// As `observe_unread`, a task found by external id among the holdings of creates sent to
    /// `path` (or to a path not known) only.
    fn observe_unread_on(
        &self,
        account: &AccountId,
        outcome: &Outcome,
        lease: Duration,
        path: CreatePath,
    ) -> Self::Apply {
        let op = SlotOp::Observed {
            account: account.clone(),
            outcome: outcome.clone(),
            lease,
        };
        self.apply_on(op, path)
    }

    /// As `observe_unread_on`, the end of a task not held in the fleet never noted in
    /// `PREFIX:ended`: a list page's ends are long past (a legacy list keeps tasks for days),
    /// not ends that overtook a create's answer.
    fn observe_list_on(
        &self,
        account: &AccountId,
        outcome: &Outcome,
        lease: Duration,
        path: CreatePath,
    ) -> Self::Apply {
        let op = SlotOp::Observed {
            account: account.clone(),
            outcome: outcome.clone(),
            lease,
        };
        self.apply_heard(op, path, Heard::List)
    }

    /// As `apply_unread`, a task reported found by external id among the holdings of creates
    /// sent to `path` (or to a path not known) only.
    fn apply_unread_on(&self, op: SlotOp, path: CreatePath) -> Self::Apply {
        self.apply_on(op, path)
    }

    /// As `apply`, a listed task taken by its external id for a holding of `path` (or of a
    /// path not known) only, and kept with that path in Redis.
    fn adopt_on(&self, op: SlotOp, path: CreatePath) -> Self::Apply {
        self.apply_on(op, path)
    }

    fn snapshot(&self) -> Self::Snapshot {
        let inner = Arc::clone(&self.inner);
        inner.start();
        Box::pin(async move {
            let now_us = inner.now_us().await.map_err(StoreError::into_slots)?;
            let [p, now, grace] = inner.head(now_us);
            let args = [
                p,
                now,
                grace,
                micros(inner.config.get_recovery_interval())
                    .max(1)
                    .to_string(),
            ];
            let (items, _) = inner
                .run_noting_state(&inner.snapshot, &args)
                .await
                .map_err(StoreError::into_slots)?;
            // Leases the script found run out: counted here, once.
            released_by(items.get(3), now_us, true).2.record();
            let mut caps = HashMap::new();
            if let Some(Value::Array(flat)) = items.get(1) {
                inner.saw_caps(flat);
                for pair in flat.chunks_exact(2) {
                    caps.insert(text(&pair[0]), u32::try_from(int(&pair[1])).unwrap_or(0));
                }
            }
            let pools = lock(&inner.pools)
                .iter()
                .map(|(pk, local)| (pk.clone(), local.waiters.load(Ordering::Relaxed)))
                .collect::<HashMap<_, _>>();
            let mut out = Vec::new();
            if let Some(Value::Array(flat)) = items.get(2) {
                for chunk in flat.chunks_exact(5) {
                    let Some(pool) = Pool::parse(&text(&chunk[1])) else {
                        continue;
                    };
                    let key = SlotKey::new(AccountId::new(text(&chunk[0])), pool);
                    let configured = inner.capacity_in(&caps, &key);
                    let hidden = u32::try_from(int(&chunk[3])).unwrap_or(0).min(configured);
                    let pk = inner.pk(&key);
                    out.push(PoolSnapshot {
                        in_use: u32::try_from(int(&chunk[2])).unwrap_or(0),
                        capacity: configured - hidden,
                        configured,
                        waiters: pools.get(&pk).copied().unwrap_or(0),
                        tasks: usize::try_from(int(&chunk[4])).unwrap_or(0),
                        key,
                    });
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change queued after a grant's registration, though made before it (its failure seen
    /// late), goes ahead of the changes made after it: the registration kept it behind them (a
    /// hold behind its task's end, which found no task, held its slot to its lease).
    #[test]
    fn a_change_made_earlier_is_queued_ahead_of_a_later_grants_registration() {
        let args = |op: &str, made| Pending::Args(vec![op.to_owned()], made);
        let mut pending = VecDeque::from([args("upd", 6), Pending::Register("g".to_owned(), 7)]);
        insert_in_order(&mut pending, args("hold", 5));
        insert_in_order(&mut pending, args("give", 8));
        let order: Vec<u64> = pending.iter().map(Pending::made).collect();
        assert_eq!(order, [5, 6, 7, 8]);
        assert!(matches!(&pending[0], Pending::Args(a, _) if a[0] == "hold"));
    }

    /// A process stamps its changes in order across a new measurement that moved fleet time
    /// back a little; moved back further (the server's clock itself), it stamps fleet time,
    /// which Redis does not compare with stamps that far ahead.
    #[test]
    fn a_change_is_made_after_the_last_unless_fleet_time_went_far_back() {
        assert_eq!(next_made_at(i64::MIN, 5), 5);
        assert_eq!(next_made_at(100, 200), 200);
        assert_eq!(next_made_at(100, 100), 101);
        assert_eq!(next_made_at(100, 90), 101);
        let slack = micros(slots_lua::STAMP_SLACK);
        assert_eq!(next_made_at(100 + slack, 100), 100);
        assert_eq!(next_made_at(i64::MAX, 0), 0);
    }

    /// A grace past a year is a year, as the other durations are: `Duration::MAX` would put the
    /// generation (the grace's end in microseconds) past what the scripts' numbers hold.
    /// A create path reaches the scripts as its number (the same in every process of one
    /// version): none for an unknown one, which matches any; one path's legacy creates and
    /// queries alike; two paths apart.
    #[test]
    fn a_create_path_is_sent_as_its_number() {
        assert_eq!(path_arg(CreatePath::UNKNOWN), "");
        assert_eq!(path_arg(CreatePath::NEW_STYLE), "1");
        let video = path_arg(CreatePath::legacy("/v1/videos/text2video"));
        let query = CreatePath::of_legacy_query("/v1/videos/text2video/job-7");
        assert_eq!(path_arg(query), video);
        assert_ne!(
            path_arg(CreatePath::legacy("/v1/images/generations")),
            video
        );
        assert!(video.parse::<u64>().unwrap() > 1);
        assert!(may_be(&video, "") && may_be("", &video) && !may_be(&video, "1"));
    }

    /// A halt broadcast is learnt only when it is a generation, a halt key of this prefix and a
    /// 1102, a line each; anything else is ignored (logged), never a panic; the halt keys of
    /// accounts whose names hold dots or newlines read back as those accounts.
    #[tokio::test]
    async fn a_malformed_halt_broadcast_is_ignored() {
        let conn =
            Connection::lazy(crate::RedisConfig::new("redis://127.0.0.1:1/").prefix("p")).unwrap();
        let slots = RedisSlots::new(conn, SlotsConfig::new(1)).unwrap();
        let inner = &slots.inner;
        let cause = encode_cause(
            &decode_cause("429\n{\"code\":1102,\"message\":\"m\",\"request_id\":\"r\"}").unwrap(),
        );
        let key = inner.halt_key(&AccountId::new("a.b\nc"));
        for junk in [
            None,
            Some(""),
            Some("\n\n"),
            Some("7"),
            Some("x\np:halt:1.a\n".to_owned() + &cause).as_deref(),
            Some(format!("7\n{key}")).as_deref(),
            Some(format!("7\n{key}\nnot a cause")).as_deref(),
            Some(format!("7\n{key}\n429\n{{}}")).as_deref(),
            Some(format!("7\nother:halt:1.a\n{cause}")).as_deref(),
            Some(format!("7\np:halt:9.a\n{cause}")).as_deref(),
            Some(format!("7\np:halt:x.a\n{cause}")).as_deref(),
            Some(format!("7\np:halted\n{cause}")).as_deref(),
        ] {
            inner.halt_broadcast(junk);
            assert!(lock(&inner.halts).is_empty(), "{junk:?}");
            assert_eq!(inner.create_halts.stamp(), 0, "{junk:?}");
        }
        inner.halt_reset("no line");
        inner.halt_reset("p:halt:1.a\nnot a cause");
        // Of another generation than the one known here: read from Redis, not taken.
        inner.generation.store(7, Ordering::Release);
        assert_eq!(
            inner.halt_broadcast(Some(&format!("6\n{key}\n{cause}"))),
            Some(AccountId::new("a.b\nc"))
        );
        assert!(lock(&inner.halts).is_empty());
        assert_eq!(inner.create_halts.stamp(), 0);
        inner.halt_broadcast(Some(&format!("7\n{key}\n{cause}")));
        let halts = lock(&inner.halts);
        let halt = halts.get(&AccountId::new("a.b\nc")).expect("learnt");
        assert_eq!(halt.stored_in, Some(7));
        assert_eq!(halt.cause.request_id(), Some("r"));
        drop(halts);
        assert_eq!(inner.create_halts.stamp(), 1);
        // Told again: known already, not counted again.
        inner.halt_broadcast(Some(&format!("7\n{key}\n{cause}")));
        assert_eq!(inner.create_halts.stamp(), 1);
        // Reset (`PREFIX:unhalted`: the key and the halt deleted), by the name's length too.
        inner.halt_reset(&format!("{key}\n{cause}"));
        assert!(lock(&inner.halts).is_empty());
    }

    /// Slots on a Redis that never answers (port 1), and their inner state.
    #[cfg(feature = "testing")]
    fn unreachable_slots() -> (RedisSlots, Arc<Inner>) {
        let conn = Connection::lazy(crate::RedisConfig::new("redis://127.0.0.1:1/")).unwrap();
        let slots = RedisSlots::new(conn, SlotsConfig::new(1)).unwrap();
        let inner = Arc::clone(&slots.inner);
        (slots, inner)
    }

    /// The arguments of a change `op` of holding `h` in pool `pool`.
    #[cfg(feature = "testing")]
    fn change_of_h(inner: &Inner, op: &str) -> Vec<String> {
        let [p, now, grace] = inner.unstamped_head();
        vec![
            p,
            now,
            grace,
            op.to_owned(),
            "pool".to_owned(),
            "h".to_owned(),
        ]
    }

    /// The queue's changes in order: when each was made, and its operation.
    #[cfg(feature = "testing")]
    fn queued(inner: &Inner) -> Vec<(u64, String)> {
        lock(&inner.pending)
            .iter()
            .map(|entry| match entry {
                Pending::Args(args, made) => (*made, args[3].clone()),
                Pending::Register(h, made) => (*made, format!("reg {h}")),
            })
            .collect()
    }

    /// A replayed change that fails again goes back in the order changes were made, not to
    /// the front: a change made before it may have been queued while it was on its way (its
    /// own send failed later), and the next replay would send a task's end ahead of its hold,
    /// which, found no task, held the slot until its lease ran out.
    #[cfg(feature = "testing")]
    #[tokio::test(start_paused = true)]
    async fn a_replayed_change_that_fails_again_goes_back_behind_one_made_before_it() {
        let (_slots, inner) = unreachable_slots();
        let change = |op: &str| change_of_h(&inner, op);
        // The task's end, made 8th, is queued and the replay takes it.
        inner.queue(change("give"), 8);
        *lock(&inner.replay_delay) = Duration::from_secs(1);
        let replay = tokio::spawn({
            let inner = Arc::clone(&inner);
            async move { inner.replay().await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(lock(&inner.pending).is_empty(), "the replay took the end");
        // Meanwhile its hold, made 5th, whose own send failed later.
        inner.queue(change("hold"), 5);
        let failed = replay.await.unwrap().unwrap_err();
        assert!(failed.keeps_changes(), "{failed}");
        assert_eq!(
            queued(&inner),
            [(5, "hold".to_owned()), (8, "give".to_owned())]
        );
    }

    /// The replay sends no change made after one still on its way to Redis: that one, failing
    /// later, is queued, and replayed behind a task's end already applied, its hold would hold
    /// the slot until its lease ran out. One made later on its way holds nothing up.
    #[cfg(feature = "testing")]
    #[tokio::test(start_paused = true)]
    async fn the_replay_waits_for_a_change_made_before_its_next_one_to_be_answered() {
        let (_slots, inner) = unreachable_slots();
        let change = |op: &str| change_of_h(&inner, op);
        // A task's hold, made 5th, and another change, made 9th, are on their way to Redis.
        let hold_on_its_way = inner
            .send_now(5, &change("hold"))
            .expect("nothing queued yet");
        let _later_on_its_way = inner
            .send_now(9, &change("give"))
            .expect("nothing queued yet");
        // The task's end, made 8th, failed at once and is queued; a replay starts.
        inner.queue(change("give"), 8);
        let replay = tokio::spawn({
            let inner = Arc::clone(&inner);
            async move { inner.replay().await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !replay.is_finished(),
            "the end was sent before its hold's answer"
        );
        assert_eq!(lock(&inner.pending).len(), 1, "the end waits, queued");
        // The hold fails: it is queued before its answer is handled, and goes first, while
        // the change made 9th is still on its way.
        inner.queue(change("hold"), 5);
        drop(hold_on_its_way);
        let failed = tokio::time::timeout(Duration::from_secs(60), replay)
            .await
            .expect("a change made later on its way held the replay up")
            .unwrap()
            .unwrap_err();
        assert!(failed.keeps_changes(), "{failed}");
        assert_eq!(
            queued(&inner),
            [(5, "hold".to_owned()), (8, "give".to_owned())]
        );
    }

    /// An `upd` of `account` reporting `tasks` (task id, terminal flag).
    #[cfg(feature = "testing")]
    fn reports(inner: &Inner, account: &str, tasks: &[(String, &str)]) -> Vec<String> {
        let [p, now, grace] = inner.unstamped_head();
        let mut args = vec![p, now, grace];
        args.extend(upd_head(
            Duration::from_secs(60),
            &AccountId::new(account),
            false,
            String::new(),
            "",
        ));
        assert_eq!(args.len(), UPD_REPORTS);
        for (id, terminal) in tasks {
            let status = if *terminal == "1" {
                "succeed"
            } else {
                "processing"
            };
            args.extend([
                id.clone(),
                String::new(),
                status.to_owned(),
                (*terminal).to_owned(),
            ]);
        }
        args
    }

    /// The task reports kept: (account, task id, terminal flag), oldest first.
    #[cfg(feature = "testing")]
    fn kept_reports(inner: &Inner) -> Vec<(String, String, String)> {
        lock(&inner.pending)
            .iter()
            .filter_map(|entry| match entry {
                Pending::Args(args, _) if args[3] == "upd" => Some(args),
                _ => None,
            })
            .flat_map(|args| {
                args[UPD_REPORTS..]
                    .chunks_exact(4)
                    .map(|q| (args[5].clone(), q[0].clone(), q[3].clone()))
            })
            .collect()
    }

    /// `n` task ids starting `from`, reported with the terminal flag `terminal`.
    fn tasks(from: usize, n: usize, terminal: &str) -> Vec<(String, &str)> {
        (from..from + n)
            .map(|i| (format!("t{i}"), terminal))
            .collect()
    }

    /// Starts a replay that takes the queue's first change and holds it a second before it
    /// sends it (to a Redis that never answers), and waits until it took it.
    #[cfg(feature = "testing")]
    async fn replay_taking_the_first(
        inner: &Arc<Inner>,
    ) -> tokio::task::JoinHandle<Result<(), StoreError>> {
        *lock(&inner.replay_delay) = Duration::from_secs(1);
        let queued = lock(&inner.pending).len();
        let replay = tokio::spawn({
            let inner = Arc::clone(inner);
            async move { inner.replay().await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(lock(&inner.pending).len(), queued - 1, "the replay took it");
        replay
    }

    /// A replayed report that fails again goes back held to `MAX_PENDING_REPORTS`, as a report
    /// queued anew is: reports queued while it was on its way filled the queue, and put back
    /// past the bound, each failed replay of a long outage grew the queue by its reports. A
    /// renewal of it that a later report replaced goes first, as it would have had it been
    /// queued then, and no other report goes in its place.
    #[cfg(feature = "testing")]
    #[tokio::test(start_paused = true)]
    async fn a_replayed_report_that_fails_again_is_held_to_the_bound() {
        let (_slots, inner) = unreachable_slots();
        let mut first = tasks(1, 2, "0");
        first.extend(tasks(0, 1, "0"));
        first.extend(tasks(3, 1, "1"));
        inner.queue(reports(&inner, "acct", &first), 1);
        let replay = replay_taking_the_first(&inner).await;
        // Meanwhile t0 is renewed again, and other tasks end, two short of the bound.
        let mut later = tasks(0, 1, "0");
        later.extend(tasks(100, MAX_PENDING_REPORTS - 3, "1"));
        inner.queue(reports(&inner, "acct", &later), 2);
        assert_eq!(kept_reports(&inner).len(), MAX_PENDING_REPORTS - 2);
        let failed = replay.await.unwrap().unwrap_err();
        assert!(failed.keeps_changes(), "{failed}");
        let kept = kept_reports(&inner);
        assert_eq!(kept.len(), MAX_PENDING_REPORTS, "held to the bound");
        // t0's first renewal was replaced by its later one; for the bound went the oldest
        // renewal, t1's, and only it.
        let oldest: Vec<&str> = kept[..4].iter().map(|(_, id, _)| id.as_str()).collect();
        assert_eq!(oldest, ["t2", "t3", "t0", "t100"]);
    }

    /// The hold of `acct`'s task `id` (holding `h`, one slot of `video:kling-2.6`).
    #[cfg(feature = "testing")]
    fn hold_of_acct(inner: &Inner, id: &str) -> Vec<String> {
        let mut args = change_of_h(inner, "hold");
        args.extend(
            ["1", id, "", "60000000", "acct", "video:kling-2.6", "t", ""].map(String::from),
        );
        assert_eq!(
            (&args[HOLD_ID], &args[HOLD_ACCOUNT]),
            (&id.to_owned(), &"acct".to_owned())
        );
        args
    }

    /// The end of a task whose hold the replay is sending (off the queue, where it could
    /// become a give-back) is kept when the bound drops an end, and the next oldest dropped
    /// instead: dropped, the hold, applied or put back, held the slot until its lease ran out.
    /// An end of a task whose hold waits in the queue is still dropped, its hold a give-back.
    #[cfg(feature = "testing")]
    #[tokio::test(start_paused = true)]
    async fn the_end_of_a_task_whose_hold_is_replayed_is_kept_past_the_bound() {
        let (_slots, inner) = unreachable_slots();
        let hold = |id: &str, holding: &str| {
            let mut args = hold_of_acct(&inner, id);
            args[5] = holding.to_owned();
            args
        };
        inner.queue(hold("t0", "h0"), 1);
        inner.queue(hold("t1", "h1"), 2);
        let replay = replay_taking_the_first(&inner).await;
        // t0 and t1 end; then the queue fills past the bound with other ends.
        inner.queue(reports(&inner, "acct", &tasks(0, 2, "1")), 3);
        inner.queue(
            reports(&inner, "acct", &tasks(100, MAX_PENDING_REPORTS - 1, "1")),
            4,
        );
        let kept = kept_reports(&inner);
        assert_eq!(kept.len(), MAX_PENDING_REPORTS);
        assert_eq!(
            kept[0].1, "t0",
            "the end of the task whose hold is on its way stays"
        );
        assert!(
            !kept.iter().any(|(_, id, _)| id == "t1"),
            "{:?}",
            &kept[..2]
        );
        let ops: Vec<String> = queued(&inner).into_iter().map(|(_, op)| op).collect();
        assert_eq!(ops[0], "give", "t1's hold, queued, gives the slot back");
        let failed = replay.await.unwrap().unwrap_err();
        assert!(failed.keeps_changes(), "{failed}");
        let queued = queued(&inner);
        assert_eq!(
            queued[0],
            (1, "hold".to_owned()),
            "t0's hold goes back first"
        );
        assert_eq!(queued[1], (2, "give".to_owned()));
        assert_eq!(kept_reports(&inner)[0].1, "t0", "and its end behind it");
        // Nothing on its way any more: t0's end is the oldest, and goes with its hold.
        inner.queue(reports(&inner, "acct", &tasks(5000, 1, "1")), 5);
        assert!(!kept_reports(&inner).iter().any(|(_, id, _)| id == "t0"));
        assert_eq!(
            lock(&inner.pending)
                .iter()
                .filter(|e| matches!(e, Pending::Args(a, _) if a[3] == "hold"))
                .count(),
            0
        );
    }

    /// The same for a hold sent at once (not replayed) that has not been answered.
    #[cfg(feature = "testing")]
    #[tokio::test(start_paused = true)]
    async fn the_end_of_a_task_whose_hold_is_on_its_way_is_kept_past_the_bound() {
        let (_slots, inner) = unreachable_slots();
        let hold = hold_of_acct(&inner, "t0");
        let on_its_way = inner.send_now(1, &hold).expect("nothing queued yet");
        inner.queue(reports(&inner, "acct", &tasks(0, 1, "1")), 2);
        inner.queue(
            reports(&inner, "acct", &tasks(100, MAX_PENDING_REPORTS, "1")),
            3,
        );
        let kept = kept_reports(&inner);
        assert_eq!(kept.len(), MAX_PENDING_REPORTS);
        assert_eq!(
            kept[0].1, "t0",
            "the end of the task whose hold is on its way stays"
        );
        assert_eq!(kept[1].1, "t101", "the next oldest went instead");
        drop(on_its_way);
    }

    /// A replay dropped while its change is on its way (a `maintain` cut short by a timeout)
    /// puts that change back, as a failed send does, and leaves nothing marked on its way:
    /// the change was lost (a task's hold, holding nothing in Redis; its end, the slot until
    /// its lease ran out), new changes queued behind a replay that no longer ran, and the
    /// bound on kept reports kept the end of a task whose hold was nowhere, dropping another.
    #[cfg(feature = "testing")]
    #[tokio::test(start_paused = true)]
    async fn a_replay_dropped_while_its_change_is_on_its_way_puts_it_back() {
        let (_slots, inner) = unreachable_slots();
        let hold = hold_of_acct(&inner, "t0");
        inner.queue(hold, 1);
        let replay = replay_taking_the_first(&inner).await;
        replay.abort();
        assert!(replay.await.unwrap_err().is_cancelled());
        assert_eq!(queued(&inner), [(1, "hold".to_owned())], "put back");
        assert!(lock(&inner.replay_sending).is_none());
        assert!(!inner.replaying.load(Ordering::Acquire));
        // Its task's end, dropped past the bound, now turns it into a give-back.
        inner.queue(reports(&inner, "acct", &tasks(0, 1, "1")), 2);
        inner.queue(
            reports(&inner, "acct", &tasks(100, MAX_PENDING_REPORTS, "1")),
            3,
        );
        assert!(!kept_reports(&inner).iter().any(|(_, id, _)| id == "t0"));
        assert_eq!(queued(&inner)[0], (1, "give".to_owned()));
    }

    #[tokio::test]
    async fn a_grace_past_a_year_is_a_year() {
        let conn = Connection::lazy(crate::RedisConfig::new("redis://127.0.0.1:1/")).unwrap();
        let slots = RedisSlots::new(conn, SlotsConfig::new(1)).unwrap();
        assert_eq!(slots.grace(Duration::MAX).inner.grace, MAX_DURATION);
    }

    /// Two scripts sent before a restart: the first answer tells of the new generation, and
    /// the second, numbered after it in that generation, is no sign that the store went back,
    /// though its number is below what the process had seen before sending it.
    #[test]
    fn a_script_sent_before_a_new_generation_is_numbered_in_it() {
        let before = SentIn {
            generation: 7,
            seq: 20,
        };
        assert_eq!(numbered(true, 9, 1, before), Numbered::Afresh);
        assert_eq!(numbered(false, 9, 2, before), Numbered::Later);
        // The same generation, numbered no later than before: the store went back.
        assert_eq!(numbered(false, 7, 20, before), Numbered::WentBack);
        assert_eq!(numbered(false, 7, 3, before), Numbered::WentBack);
        assert_eq!(numbered(false, 7, 21, before), Numbered::Later);
        // Nothing seen before: nothing to go back from.
        let first = SentIn {
            generation: i64::MIN,
            seq: 0,
        };
        assert_eq!(numbered(false, 7, 1, first), Numbered::Later);
    }

    /// The script frees only a grant of the weight a change names: told to give back, or to
    /// take a `1303` for, a holding that is a task (a grant's stale copy, once the grant was
    /// kept under a task) or a grant of another weight (a forged reservation), it frees and
    /// hides nothing, whatever the process sending it believes. The grant itself still goes
    /// back. (A process sends the 1303 of a grant it no longer has as a give-back: this is the
    /// script's own check, in the step that would free the slots.)
    #[cfg(feature = "testing")]
    #[tokio::test]
    async fn the_script_frees_only_a_grant_of_the_weight_a_change_names() {
        let Some(server) =
            crate::testing::RedisServer::start_or_skip().expect("CI=true requires a redis-server")
        else {
            return;
        };
        let conn = Connection::connect(crate::RedisConfig::new(server.url()).prefix("unit"))
            .await
            .unwrap();
        let slots = RedisSlots::new(conn, SlotsConfig::new(3))
            .unwrap()
            .grace(Duration::from_millis(50));
        let key = SlotKey::new(
            AccountId::new("acct"),
            Pool::new(kling_core::Product::Video),
        );
        let kept = slots.acquire(key.clone(), 1).await.unwrap();
        let op = SlotOp::Hold {
            reservation: kept.clone(),
            task: TaskRef {
                id: Some("t1".to_owned()),
                external_id: None,
            },
            lease: Duration::from_secs(60),
        };
        slots.apply(op).await.unwrap();
        let granted = slots.acquire(key.clone(), 1).await.unwrap();
        let inner = &slots.inner;
        let pk = inner.pk(&key);
        let pool = async || {
            let snapshot = slots.snapshot().await.unwrap();
            (snapshot[0].in_use, snapshot[0].capacity)
        };
        assert_eq!(pool().await, (2, 3));
        let (configured, fields) = inner.cap_lookup(&key);
        let change = |op: &str, h: &str, weight: &str| {
            let mut args = Vec::from(inner.unstamped_head());
            args.extend([op.to_owned(), pk.clone(), inner.holding(h.parse().unwrap())]);
            args.push(weight.to_owned());
            if op == "cong" {
                args.extend([configured.to_string(), inner.change_id()]);
                args.extend(fields.iter().cloned());
            }
            args
        };
        let (task, grant) = (kept.token.to_string(), granted.token.to_string());
        for mut args in [
            change("cong", &task, "1"),
            change("give", &task, "1"),
            change("cong", &grant, "2"),
            change("give", &grant, "2"),
        ] {
            let reply = inner.apply_args(&mut args).await.unwrap();
            assert_eq!(pool().await, (2, 3), "nothing freed or hidden: {args:?}");
            assert!(!reply.changed, "{args:?}");
        }
        let reply = inner
            .apply_args(&mut change("give", &grant, "1"))
            .await
            .unwrap();
        assert!(reply.changed);
        assert_eq!(pool().await, (1, 3), "the grant goes back");
    }

    /// A queued hold turned into a give-back (its task's end dropped from the replay queue
    /// past [`MAX_PENDING_REPORTS`]) frees its holding even when Redis ran that hold already,
    /// its answer lost (a timeout): the holding is a task then, not a grant, and a give-back
    /// of a weight, which frees only a grant, left the task's slot held until its lease ran
    /// out.
    #[cfg(feature = "testing")]
    #[tokio::test]
    async fn a_hold_turned_give_back_frees_the_task_it_made_in_redis() {
        let Some(server) =
            crate::testing::RedisServer::start_or_skip().expect("CI=true requires a redis-server")
        else {
            return;
        };
        let conn = Connection::connect(crate::RedisConfig::new(server.url()).prefix("unit"))
            .await
            .unwrap();
        let slots = RedisSlots::new(conn, SlotsConfig::new(3)).unwrap();
        slots.hold_maintenance(true);
        let key = SlotKey::new(
            AccountId::new("acct"),
            Pool::new(kling_core::Product::Video),
        );
        let granted = slots.acquire(key.clone(), 1).await.unwrap();
        let lease = Duration::from_secs(60);
        let op = SlotOp::Hold {
            reservation: granted.clone(),
            task: TaskRef {
                id: Some("t0".to_owned()),
                external_id: None,
            },
            lease,
        };
        // Redis ran the hold; its answer lost, the process queued it for replay.
        slots.apply(op).await.unwrap();
        let inner = &slots.inner;
        let h = inner.holding(granted.token);
        let held = lock(&inner.registry).get(&h).cloned().unwrap();
        assert!(held.task);
        let mut hold = inner.hold_args("hold", &held.pk, &h, &held, lease);
        hold.push(inner.change_id());
        inner.queue(hold, 1);
        // The task ends, and the bound on kept reports drops its end: the hold gives back.
        inner.queue(reports(inner, "acct", &[("t0".to_owned(), "1")]), 2);
        inner.queue(
            reports(inner, "acct", &tasks(100, MAX_PENDING_REPORTS, "1")),
            3,
        );
        assert_eq!(queued(inner)[0], (1, "give".to_owned()));
        let in_use = async || slots.snapshot().await.unwrap()[0].in_use;
        assert_eq!(in_use().await, 1);
        inner.replay().await.unwrap();
        assert_eq!(in_use().await, 0, "the task the hold made is freed");
    }

    /// A stale or forged reservation's settlement queued while Redis is away leaves the
    /// registration of the grant its token names (of another pool, or another weight): that
    /// grant is still on its way, and Redis must count it once back. Before, the settlement
    /// took the registration's place and the grant was never registered: the fleet let a
    /// create in past the pool's limit.
    #[cfg(feature = "testing")]
    #[tokio::test(start_paused = true)]
    async fn a_forged_settlement_queued_keeps_the_registration_of_the_grant_it_names() {
        let conn = Connection::lazy(crate::RedisConfig::new("redis://127.0.0.1:1/")).unwrap();
        let slots = RedisSlots::new(conn, SlotsConfig::new(2))
            .unwrap()
            .when_unreachable(WhenUnreachable::fallback(1));
        let inner = Arc::clone(&slots.inner);
        let key = SlotKey::new(
            AccountId::new("acct"),
            Pool::new(kling_core::Product::Video),
        );
        let granted = slots.acquire(key.clone(), 1).await.unwrap();
        let h = inner.holding(granted.token);
        assert_eq!(queued(&inner), [(0, format!("reg {h}"))]);
        let image = SlotKey::new(key.account.clone(), Pool::new(kling_core::Product::Image));
        for forged in [
            Reservation {
                key: image,
                ..granted.clone()
            },
            Reservation {
                weight: 2,
                ..granted.clone()
            },
        ] {
            slots.apply(SlotOp::GiveBack(forged.clone())).await.unwrap();
            slots
                .apply(SlotOp::Congested(forged.clone()))
                .await
                .unwrap();
            let halt = SlotOp::Halt {
                reservation: forged,
                cause: ApiError::from_outcome(
                    &Outcome::parse(
                        StatusCode::TOO_MANY_REQUESTS,
                        &HeaderMap::new(),
                        br#"{"code":1102,"message":"x","request_id":null}"#,
                        Instant::now(),
                    )
                    .unwrap(),
                ),
            };
            slots.apply(halt).await.unwrap();
        }
        let ops = queued(&inner);
        assert_eq!(ops[0], (0, format!("reg {h}")), "{ops:?}");
        assert_eq!(ops.len(), 7, "{ops:?}");
        assert_eq!(slots.held_here(), 1);
        // The grant itself takes its registration's place.
        slots.apply(SlotOp::GiveBack(granted)).await.unwrap();
        let ops = queued(&inner);
        assert!(!ops.iter().any(|(_, op)| op.starts_with("reg")), "{ops:?}");
        assert_eq!(slots.held_here(), 0);
    }

    /// A create's hold on its way while the maintenance pass reads its grant missing in Redis
    /// (the grant's lease ran out there, the create slower than it: the hold's script runs
    /// after the read, and counts the task's slots anew) keeps its task on the owner's
    /// record: the pass prunes only the records it read. Before, it dropped the task's: the
    /// owner forgot a task Redis counted, and after Redis lost its state registered nothing
    /// for it, the task running on no slot. The control: a grant read missing with no hold
    /// since is pruned.
    #[cfg(feature = "testing")]
    #[tokio::test]
    async fn a_hold_on_its_way_as_the_pass_reads_its_grant_missing_keeps_its_task() {
        let Some(mut server) =
            crate::testing::RedisServer::start_or_skip().expect("CI=true requires a redis-server")
        else {
            return;
        };
        let conn = Connection::connect(crate::RedisConfig::new(server.url()).prefix("unit"))
            .await
            .unwrap();
        let lease = Duration::from_millis(300);
        let slots = RedisSlots::new(conn, SlotsConfig::new(2).lease(lease))
            .unwrap()
            .grace(Duration::from_millis(50));
        slots.hold_maintenance(true);
        let key = SlotKey::new(
            AccountId::new("acct"),
            Pool::new(kling_core::Product::Video),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let slow = slots.acquire(key.clone(), 1).await.unwrap();
        let left = slots.acquire(key.clone(), 1).await.unwrap();
        let in_use = async || {
            let snapshot = slots.snapshot().await.unwrap();
            snapshot.iter().map(|pool| pool.in_use).sum::<u32>()
        };
        // Both creates outlast the grant's lease: Redis releases the grants (here at a
        // snapshot; in a fleet at any process's ask or snapshot).
        tokio::time::sleep(lease + Duration::from_millis(100)).await;
        assert_eq!(in_use().await, 0, "the grants' leases ran out");
        let inner = &slots.inner;
        // The pass reads both grants missing...
        let read = inner.read_holdings().await.unwrap().expect("two grants");
        // ... and the slow create's answer comes: its hold runs in Redis after that read.
        let hold = SlotOp::Hold {
            reservation: slow.clone(),
            task: TaskRef {
                id: Some("t1".to_owned()),
                external_id: None,
            },
            lease: Duration::from_secs(60),
        };
        slots.apply(hold).await.unwrap();
        assert_eq!(in_use().await, 1, "the hold counts the task anew");
        assert!(inner.prune(read));
        let t1 = inner.holding(slow.token);
        assert!(
            lock(&inner.registry).get(&t1).is_some_and(|held| held.task),
            "t1 kept on record"
        );
        assert!(
            !lock(&inner.registry).contains_key(&inner.holding(left.token)),
            "the grant with no hold is pruned"
        );
        assert_eq!(slots.held_here(), 1);
        // Redis loses its state: the owner registers t1 again.
        server.restart().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while slots.maintain().await.is_err() || slots.maintain().await.is_err() {
            assert!(Instant::now() < deadline, "redis back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(in_use().await, 1, "t1 holds its slot");
    }
}
