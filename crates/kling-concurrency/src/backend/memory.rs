//! The in-process backend: one mutex-guarded map, a synchronous fast path, FIFO hand-off.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::{Future, Ready, ready};
use std::hash::{BuildHasherDefault, Hasher};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use kling_core::error::{ApiError, BoxError};
use kling_core::lanes::{self, LANES};
use kling_core::metrics::{self as names, call_recorder, each_completing};
use kling_core::signals::{CreateHalts, HaltedAccounts};
use kling_core::waitlist::{Removed, WaitList};
use kling_core::{AccountId, Outcome, TaskStatus};
use tokio::time::{Instant, Sleep};

use super::{
    Applied, CreatePath, PoolSnapshot, ReleaseReason, Released, ReportPath, Reservation,
    SlotBackend, SlotKey, SlotOp, TaskRef,
};
use crate::config::{MAX_DURATION, MAX_RECOVERY_DOUBLINGS, SlotsConfig};
use crate::error::{AcquireError, BackendError, ConfigError, Halted, OverCapacity, QueueFull};
use crate::id::SmallId;

/// The in-process slot backend: state in this process, behind one mutex.
///
/// Acquiring is synchronous when slots are free and nobody waits (one lock, no allocation once
/// the pool is known; the pool used last is found without hashing); otherwise the create joins
/// its pool's FIFO queue and released slots are handed to the queue's head in order. A task's
/// holding sits in a reused slot of its pool (one the same thread freed, when there is one: see
/// `Entry`) and is found by task id, or by external id within its account, through an index
/// keyed by the id's hash.
/// The holding keeps its ids inline when they are short (up to 38 bytes: Kling task ids,
/// generated external ids), copied from the `&str`s
/// [`hold_unread`](SlotBackend::hold_unread) borrows, so keeping and releasing a task
/// allocates nothing; only listing a release in [`Applied`] does (the list and the task id as
/// an `Arc<str>`), which [`apply_unread`](SlotBackend::apply_unread) skips. Leases and the
/// `1303` recovery are checked lazily, one pool at a time: when a create finds no free slot,
/// before it waits or is refused (so with [`SlotsConfig::max_queue`] `0`, where nothing ever
/// waits, the next create still finds the slots of a lease that ran out, or hidden by a `1303`
/// and due back, free); while creates wait, by the queue's head, which sleeps until the next
/// lease end or recovery step (one timer per pool, none per waiter); and in
/// [`snapshot`](SlotBackend::snapshot). Other changes (holds, reports, give-backs) do not, so
/// that keeping and reporting a task read no clock: a pool nobody creates in or snapshots shows
/// an expired task's slots in its `in_use` gauge until one does.
///
/// Nothing is recorded or logged under the lock: a change computes what its pool's gauges are
/// to show, and the thread that made it moves them (and counts finished tasks, and writes
/// warnings) once the lock is released, so a slow metrics recorder or subscriber holds up no
/// other create or query, and one that calls the backend back does not deadlock. A grant is
/// counted until its reservation comes back once: one that no grant holds frees no slot.
///
/// # Clone
///
/// Clones share the same state (an `Arc`).
#[derive(Clone)]
pub struct InProcess {
    shared: Arc<Mutex<State>>,
    /// The halts applied, for the classify step's check of creates granted before one
    /// ([`SlotBackend::create_halts`]).
    halts: Arc<CreateHalts>,
}

impl fmt::Debug for InProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("InProcess")
            .field("pools", &state.list.len())
            .field("halted", &state.halted.len())
            .field("ended", &state.ended.len())
            .finish_non_exhaustive()
    }
}

impl InProcess {
    /// A backend with the capacities, recovery interval and default account of `config`.
    pub fn new(config: SlotsConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let shared = Arc::new(Mutex::new(State {
            config,
            pools: FxMap::default(),
            list: Vec::new(),
            last: 0,
            ids: Index::default(),
            externals: Index::default(),
            halted: HashMap::new(),
            next_token: 0,
            ended: Ended::default(),
            freed: Freed::default(),
            displaced: 0,
        }));
        let halts = Arc::new(CreateHalts::new(HaltedIn(shared.clone())));
        Ok(InProcess { shared, halts })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a halt once it is in place (`halt`: the change applied is one), when the guard
    /// is dropped: after the change, also when it unwinds (a metrics recorder panicking once
    /// the lock is released), so creates granted before it are still refused below.
    #[inline]
    fn halted(&self, halt: bool) -> CountHalt<'_> {
        CountHalt(halt.then_some(&*self.halts))
    }
}

/// Counts a halt for the classify step when dropped ([`InProcess::halted`]).
struct CountHalt<'a>(Option<&'a CreateHalts>);

impl Drop for CountHalt<'_> {
    #[inline]
    fn drop(&mut self) {
        if let Some(halts) = self.0 {
            halts.halted();
        }
    }
}

/// Which accounts [`InProcess`] halts, for the classify step ([`CreateHalts`]).
struct HaltedIn(Arc<Mutex<State>>);

impl HaltedAccounts for HaltedIn {
    fn refusal(&self, account: &AccountId) -> Option<BoxError> {
        let state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let cause = state.halted.get(account)?;
        Some(Box::new(Halted::new(account.clone(), cause.clone())))
    }
}

/// FxHash (rustc's hasher): the maps are keyed by account and pool names and by Kling task ids,
/// none chosen by an attacker, and SipHash would cost more than the rest of the fast path.
#[derive(Clone, Copy, Default)]
struct FxHasher {
    hash: u64,
}

impl FxHasher {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(Self::SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(buf));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

struct Holding {
    weight: u32,
    since: Instant,
    lease_until: Instant,
    /// The ids it is kept under: inline when short, so keeping and releasing a task allocates
    /// and frees nothing.
    id: Option<SmallId>,
    external: Option<SmallId>,
    /// The [`IdHash`] of `id` and of `external` (0 without one), kept so that unfiling them
    /// hashes nothing again.
    hashes: [u64; 2],
    /// The create path it was sent to, as far as known: a report of another path's task does
    /// not find it by external id.
    path: CreatePath,
    /// Its external id is not filed in `State::externals`: another holding of the account,
    /// kept later under the same external id, took the entry (counted in
    /// `State::displaced`).
    displaced: bool,
    /// Adopted by a reconcile, not kept from a create's answer: the create's answer may still
    /// come (the server listed the task first), and its end is remembered for it.
    adopted: bool,
}

impl Holding {
    /// A holding of `weight` slots of `account` from `now`, of a create sent to `path`, its ids
    /// hashed (before the lock is taken, on the create path; the external id within the
    /// account).
    #[inline(always)]
    fn new(
        id: Option<SmallId>,
        external: Option<SmallId>,
        account: &AccountId,
        weight: u32,
        now: Instant,
        lease: Duration,
        path: CreatePath,
    ) -> Self {
        let id_hash = id.as_ref().map_or(0, |id| IdHash::hash(id.as_bytes()));
        let external_hash = external.as_ref().map_or(0, |ext| {
            hash_in::<IdHash>(scope_of(account), ext.as_bytes())
        });
        Holding {
            weight,
            since: now,
            lease_until: lease_end(now, lease),
            hashes: [id_hash, external_hash],
            id,
            external,
            path,
            displaced: false,
            adopted: false,
        }
    }

    /// A holding of `account` kept under the ids of `task` (an empty id is none).
    fn of(task: TaskRef, account: &AccountId, weight: u32, now: Instant, lease: Duration) -> Self {
        let id = task
            .id
            .filter(|id| !id.is_empty())
            .map(SmallId::from_string);
        let external = task
            .external_id
            .filter(|ext| !ext.is_empty())
            .map(SmallId::from_string);
        Holding::new(
            id,
            external,
            account,
            weight,
            now,
            lease,
            CreatePath::UNKNOWN,
        )
    }

    fn key(&self, which: Which) -> Option<&[u8]> {
        match which {
            Which::Id => self.id.as_ref().map(SmallId::as_bytes),
            Which::External => self.external.as_ref().map(SmallId::as_bytes),
        }
    }
}

/// When a lease of `lease` from `now` ends: a lease is at most a year (longer ones, which
/// [`SlotsConfig::validate`] refuses but a [`SlotOp`] may carry, are cut to a year), so the
/// sum never overflows the clock.
#[inline(always)]
fn lease_end(now: Instant, lease: Duration) -> Instant {
    now + lease.min(MAX_DURATION)
}

/// How many task ends [`Ended`] remembers at most, the oldest forgotten first.
const MAX_ENDS_KEPT: usize = 4096;

/// The tasks reported ended while no holding was found for them: a callback or query can
/// overtake the answer of the create that made the task, and the create's holding, filed
/// after, is then released at once instead of held until its lease ends (the Redis backend's
/// `P:ended`; the ends that freed a holding are in [`Freed`]).
///
/// An end is filed by task id, keyed as [`Index`] keys it (the id's [`IdHash`]); an end told by
/// `complete`, whose text may be a task id or an external id of its account, is filed under
/// both keys (twins): the task id's and the external id's within the account ([`hash_in`]).
/// The first holding one of them frees says which the text was, and the other is forgotten
/// (a task whose id is the text of an external id that ended is not ended by it). An end a
/// report told with the task's external id is filed under that external id within the
/// reporting account too (a pair), for a create whose answer was then lost, kept under its
/// external id only (only such a create: one answered with another task id is another task,
/// see [`Ended::names_a_task`]). A note under an external id frees one holding and is then
/// forgotten, as is the external id's note of a pair whose task id freed one: external ids are
/// the caller's, and a later create may carry the same one again.
///
/// Bounded by count and by age: at most [`MAX_ENDS_KEPT`] notes (an end told with its
/// external id takes two, as a `complete` does), each kept one lease (the
/// reporting change's) from its last report, the oldest forgotten first (as the Redis
/// backend's `ZADD` keeps it). An end reported again while remembered (a callback delivered
/// twice, a finished task queried again) is renewed in place, not noted again: re-sends take
/// no room from other ends. A task whose create's answer comes later than that holds its
/// slots until its lease, as before. A hit is confirmed against the text and scope (two with
/// one hash: the later report replaces the earlier, whose holding then waits for its lease).
#[derive(Default)]
struct Ended {
    by_hash: FxMap<u64, EndedTask>,
    /// The keys in the order they were noted or renewed, each with the number of that note:
    /// the oldest go first. An entry whose note was renewed, replaced or forgotten since is
    /// skipped, and such entries are dropped in one pass once they outnumber the notes (and
    /// 64). Every note in `by_hash` has its entry here.
    order: VecDeque<(u64, u64)>,
    /// The number of the next note or renewal.
    next: u64,
}

struct EndedTask {
    id: SmallId,
    /// For a note keyed as an external id, its account (the key's scope); `None` for a task id.
    external_in: Option<AccountId>,
    /// For an end told by `complete` (a task id or an external id of this account): the
    /// account; the note has a twin under the other key.
    either: Option<AccountId>,
    /// For an end a report told with the task's external id: the key of the other note (the
    /// task id's for the external id's, and the other way round), each pointing at the other.
    paired: Option<u64>,
    until: Instant,
    /// The status reported (`None`: said ended by `complete`).
    status: Option<TaskStatus>,
    /// The number of its last note or renewal, as in `order`.
    seq: u64,
}

impl EndedTask {
    /// A note of `id`, ended at `now`, kept for `keep`, numbered when filed.
    fn new(
        id: &str,
        external_in: Option<AccountId>,
        either: Option<AccountId>,
        status: Option<TaskStatus>,
        now: Instant,
        keep: Duration,
    ) -> Self {
        EndedTask {
            id: SmallId::new(id),
            external_in,
            either,
            paired: None,
            until: lease_end(now, keep),
            status,
            seq: 0,
        }
    }

    fn scope(&self) -> &[u8] {
        self.external_in.as_ref().map_or(NO_SCOPE, scope_of)
    }

    fn is(&self, scope: &[u8], id: &[u8]) -> bool {
        self.id.as_bytes() == id && self.scope() == scope
    }
}

impl Ended {
    #[inline(always)]
    fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// Notes that the task `id` (of [`IdHash`] `hash`) ended at `now`, for `keep` from now, as
    /// a report of its status said; and, when the report named the task's external id in an
    /// account, that external id's end too (a create whose answer is lost is kept under its
    /// external id only), the two notes paired: the first holding either frees forgets the
    /// external id's ([`take`](Ended::take)).
    #[cold]
    fn note(
        &mut self,
        hash: u64,
        id: &str,
        external: Option<(&AccountId, &str)>,
        status: &TaskStatus,
        now: Instant,
        keep: Duration,
    ) {
        self.note_task(hash, id, Some(status), now, keep);
        let Some((account, ext)) = external else {
            return;
        };
        let scope = scope_of(account);
        let key = hash_in::<IdHash>(scope, ext.as_bytes());
        if key == hash {
            // (Two notes cannot share a key: the task id's is kept.)
            return;
        }
        if let Some(task) = self.live_mut(key, scope, ext.as_bytes(), now) {
            task.status.get_or_insert_with(|| status.clone());
            self.renew(key, now, keep);
        } else {
            let task = EndedTask::new(
                ext,
                Some(account.clone()),
                None,
                Some(status.clone()),
                now,
                keep,
            );
            self.insert(key, task, now);
        }
        // (Filing the second note may have forgotten the oldest, never the first: it is newer.)
        if let Some(task) = self.by_hash.get_mut(&key) {
            task.paired = Some(hash);
        }
        if let Some(task) = self.by_hash.get_mut(&hash) {
            task.paired = Some(key);
        }
    }

    /// Notes that the task `id` (of [`IdHash`] `hash`, known to be a task id) ended at `now`,
    /// for `keep` from now: with the status a report gave, or (`None`) as `complete` said.
    fn note_task(
        &mut self,
        hash: u64,
        id: &str,
        status: Option<&TaskStatus>,
        now: Instant,
        keep: Duration,
    ) {
        if let Some(task) = self.live_mut(hash, NO_SCOPE, id.as_bytes(), now) {
            // Noted already: it is a task id, whatever `complete` left open.
            task.either = None;
            if let Some(status) = status {
                task.status.get_or_insert_with(|| status.clone());
            }
            self.renew(hash, now, keep);
        } else {
            let task = EndedTask::new(id, None, None, status.cloned(), now, keep);
            self.insert(hash, task, now);
        }
    }

    /// Notes that `complete` said `id` ended in `account` (of [`IdHash`] `hash`), a task id or
    /// an external id of the account: filed as both, unless either is noted already (then
    /// renewed).
    #[cold]
    fn note_either(
        &mut self,
        hash: u64,
        id: &str,
        account: &AccountId,
        now: Instant,
        keep: Duration,
    ) {
        let scope = scope_of(account);
        let external = hash_in::<IdHash>(scope, id.as_bytes());
        let as_id = self.live_mut(hash, NO_SCOPE, id.as_bytes(), now).is_some();
        let as_external = self.live_mut(external, scope, id.as_bytes(), now).is_some();
        if as_id || as_external {
            if as_id {
                self.renew(hash, now, keep);
            }
            if as_external {
                self.renew(external, now, keep);
            }
            return;
        }
        let either = Some(account.clone());
        let as_id = EndedTask::new(id, None, either.clone(), None, now, keep);
        self.insert(hash, as_id, now);
        let as_external = EndedTask::new(id, Some(account.clone()), either, None, now, keep);
        self.insert(external, as_external, now);
    }

    /// Files a new note under `key`.
    fn insert(&mut self, key: u64, mut task: EndedTask, now: Instant) {
        self.forget(now, MAX_ENDS_KEPT - 1);
        task.seq = self.sequence();
        self.order.push_back((key, task.seq));
        self.by_hash.insert(key, task);
    }

    /// Keeps the live note under `key` for `keep` from `now`, moved to the back of `order`.
    fn renew(&mut self, key: u64, now: Instant, keep: Duration) {
        self.forget(now, MAX_ENDS_KEPT);
        let seq = self.sequence();
        let Some(task) = self.by_hash.get_mut(&key) else {
            return;
        };
        task.until = lease_end(now, keep);
        task.seq = seq;
        self.order.push_back((key, seq));
    }

    fn sequence(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Forgets the oldest notes while they ran out by `now` or more than `room` are kept, and
    /// drops the entries of `order` that name no note any more.
    fn forget(&mut self, now: Instant, room: usize) {
        while let Some(&(front, seq)) = self.order.front() {
            let live = self.by_hash.get(&front).filter(|task| task.seq == seq);
            if live.is_some_and(|task| task.until > now) && self.by_hash.len() <= room {
                break;
            }
            self.order.pop_front();
            if live.is_some() {
                self.by_hash.remove(&front);
            }
        }
        if self.order.len() > 2 * self.by_hash.len() + 64 {
            let by_hash = &self.by_hash;
            self.order
                .retain(|(key, seq)| by_hash.get(key).is_some_and(|task| task.seq == *seq));
        }
    }

    /// The note of `id` in `scope` (of key `hash`), if remembered at `now`.
    fn live_mut(
        &mut self,
        hash: u64,
        scope: &[u8],
        id: &[u8],
        now: Instant,
    ) -> Option<&mut EndedTask> {
        let task = self.by_hash.get_mut(&hash)?;
        (task.is(scope, id) && task.until > now).then_some(task)
    }

    /// The status reported for `id` in `scope` (of key `hash`: a task id in no scope, an
    /// external id in its account's), if its end is remembered at `now`: `Some(None)` for an
    /// end `complete` reported.
    fn get(&self, hash: u64, scope: &[u8], id: &[u8], now: Instant) -> Option<Option<&TaskStatus>> {
        let task = self.by_hash.get(&hash)?;
        (task.is(scope, id) && task.until > now).then_some(task.status.as_ref())
    }

    /// [`get`](Ended::get) for a holding the end frees: an end `complete` told is now known
    /// to name what it matched, and its twin under the other key is forgotten. An external
    /// id's note is spent (forgotten), whichever of a pair was matched: the caller's external
    /// ids may name another create later (one sent again, a job that reuses its id), which a
    /// note left behind would free at once while its task runs. A task id's note stays (task
    /// ids are the server's, never reused), so a list that ran behind the report adopts nothing.
    fn take(
        &mut self,
        hash: u64,
        scope: &[u8],
        id: &[u8],
        now: Instant,
    ) -> Option<Option<TaskStatus>> {
        let task = self.live_mut(hash, scope, id, now)?;
        let status = task.status.clone();
        let external = task.external_in.is_some();
        let (either, paired) = (task.either.take(), task.paired.take());
        if let Some(other) = paired
            && self
                .by_hash
                .get(&other)
                .is_some_and(|t| t.paired == Some(hash) && t.external_in.is_some())
        {
            // The external id's note of the task id just matched. (Its entry in `order`, as
            // every removed note's, is skipped when it comes up.)
            self.by_hash.remove(&other);
        }
        if external {
            // Spent.
            self.by_hash.remove(&hash);
        }
        if let Some(account) = either {
            let twin = if external {
                (IdHash::hash(id), NO_SCOPE)
            } else {
                let scope = scope_of(&account);
                (hash_in::<IdHash>(scope, id), scope)
            };
            if self
                .by_hash
                .get(&twin.0)
                .is_some_and(|t| t.either.is_some() && t.is(twin.1, id))
            {
                self.by_hash.remove(&twin.0);
            }
        }
        Some(status)
    }

    /// Whether the note of the external id `id` in `scope` (of key `hash`), remembered at
    /// `now`, is a pair's: told by a report that named the task's id too (`complete`'s notes
    /// are not).
    fn names_a_task(&self, hash: u64, scope: &[u8], id: &[u8], now: Instant) -> bool {
        self.by_hash
            .get(&hash)
            .is_some_and(|task| task.is(scope, id) && task.until > now && task.paired.is_some())
    }

    fn len(&self) -> usize {
        self.by_hash.len()
    }
}

/// The task ids whose holding a report released (the Redis backend files them in `P:ended`
/// too): a reconcile's list answered before the end (the server's list may run behind, also
/// when the reconcile began after the end) names the task running, and an
/// [`Adopt`](SlotOp::Adopt) of it must hold nothing.
///
/// A ring per thread lane ([`lanes::current`]) of the last [`MAX_ENDS_KEPT`] such ends its
/// threads filed, each kept one lease (the reporting change's) from its report: filing one is
/// a copy into the next place of the filing thread's ring (no hashing, no eviction pass: every
/// task's end passes here, on the query path), and only an adopt, rare, looks through them
/// all. Each ring lies alone on its cache lines, so that the two cores of a runtime filing ends
/// write their own: one shared ring had them take turns writing its place and its entries, and
/// its place shared a line of [`State`] with fields every create's hold reads. Kept apart from
/// [`Ended`], which every create's hold consults: the usual ends leave it empty, and push none
/// of the ends that overtake a create's answer out.
///
/// What the bound costs: an end pushed out by 4096 later ones filed on its lane before an
/// adopt looks for it lets a list that named the task running adopt it, its slot held until
/// the lease. The rings together keep at least the last 4096 ends of every lane, and so the
/// last 4096 in all (a lane's are those of every thread on it: threads beyond [`LANES`] share
/// lanes), and at most [`LANES`] times that many. A reconcile adopts each page's tasks as soon
/// as the page is answered, so that takes 4096 ends within one page's round trip, or a list
/// that far behind the ends; not 4096 over the whole reconcile, as when it adopted only after
/// its last page.
struct Freed(Box<[FreedRing; LANES]>);

impl Default for Freed {
    fn default() -> Self {
        Freed(Box::new(std::array::from_fn(|_| FreedRing::default())))
    }
}

/// One lane's ring of [`Freed`] ends.
#[derive(Default)]
#[repr(align(128))]
struct FreedRing {
    ring: Vec<FreedTask>,
    /// Where the next end goes (the oldest, once the ring is full).
    next: usize,
}

struct FreedTask {
    /// The task id's [`IdHash`].
    hash: u64,
    id: SmallId,
    until: Instant,
}

impl Freed {
    /// Files the end of the task `id` (of [`IdHash`] `hash`), reported at `now`, for `keep`,
    /// in this thread's lane's ring.
    #[inline]
    fn note(&mut self, hash: u64, id: SmallId, now: Instant, keep: Duration) {
        self.0[lanes::current()].note(hash, id, now, keep);
    }

    /// Whether the end of the task `id` (of [`IdHash`] `hash`) is remembered at `now`, in any
    /// lane's ring.
    fn contains(&self, hash: u64, id: &[u8], now: Instant) -> bool {
        self.0.iter().any(|ring| ring.contains(hash, id, now))
    }

    /// How many ends the rings hold (expired ones included).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.iter().map(|ring| ring.ring.len()).sum()
    }
}

impl FreedRing {
    #[inline]
    fn note(&mut self, hash: u64, id: SmallId, now: Instant, keep: Duration) {
        let task = FreedTask {
            hash,
            id,
            until: lease_end(now, keep),
        };
        if self.ring.len() < MAX_ENDS_KEPT {
            self.ring.push(task);
        } else {
            self.ring[self.next] = task;
        }
        self.next = (self.next + 1) % MAX_ENDS_KEPT;
    }

    fn contains(&self, hash: u64, id: &[u8], now: Instant) -> bool {
        self.ring
            .iter()
            .any(|task| task.hash == hash && task.until > now && task.id.as_bytes() == id)
    }
}

/// The end of a free list.
const NONE: usize = usize::MAX;

/// A pool's slot for one holding, alone on its cache lines (a multiple of two: adjacent-line
/// prefetching pairs them): with the slot reused by the thread that freed it (see
/// [`FreeList`]), two threads' holdings never share a line, and a create finds the slot it
/// writes in its own core's cache instead of on the other core, where the other thread last
/// wrote it.
#[repr(align(128))]
struct Entry {
    held: Option<Holding>,
    /// While vacant: the next slot of the free list it is on ([`NONE`] at the end).
    next: usize,
}

impl Entry {
    fn held(&self) -> Option<&Holding> {
        self.held.as_ref()
    }
}

/// The first slot of one lane's list of vacant slots, chained through [`Entry::next`], and
/// the grants the lane's thread handed out; alone on its cache lines, so that each thread
/// writes only its own. A thread's lane ([`lanes::current`]) picks the list it takes vacant
/// slots from and puts the slots it frees on; threads beyond [`LANES`] share lanes, which is
/// still correct: every list is only touched under the lock.
#[repr(align(128))]
struct FreeList {
    head: usize,
    /// Grants handed out on this lane and not yet handed back (token and weight; none of
    /// weight 0): only a reservation of one of them frees slots ([`PoolState::settle`]). A
    /// create is usually settled by the thread that was granted it, which finds it here, on
    /// lines of its own.
    grants: Vec<(u64, u32)>,
}

/// Which of a holding's ids an [`Index`] maps.
#[derive(Clone, Copy)]
enum Which {
    Id,
    External,
}

/// Task ids (or external ids) → where the holding kept under them is.
///
/// An id is filed within a *scope*: none (empty) for task ids, which the server makes unique,
/// and the account for external ids, which are the caller's and unique per account only (two
/// accounts' holdings under one external id are two entries, and a lookup finds its own
/// account's). Keyed by a 64-bit hash of the id in its scope ([`hash_in`]) rather than the id
/// itself: the holding already owns the text, so the index copies nothing, and a hit is
/// confirmed against the holding's own id and scope. An id whose hash equals a different held
/// id's goes to `spill`, keyed by its scope and text.
///
/// Invariant: every entry names a live holding whose id (of this index's kind) and scope are
/// the entry's.
#[repr(C)]
struct Index<H = IdHash> {
    by_hash: Table,
    spill: Spill,
    hash: PhantomData<H>,
}

impl<H> Default for Index<H> {
    fn default() -> Self {
        Index {
            by_hash: Table::default(),
            spill: Spill::default(),
            hash: PhantomData,
        }
    }
}

/// An [`Index`]'s ids filed by their scope and text (those whose hash another held id has:
/// rare), the map made on first use, so that an index takes 40 bytes and the state every
/// create and query writes fits one cache line (see [`State`]).
#[derive(Default)]
struct Spill(Option<Box<FxMap<Box<[u8]>, Place>>>);

/// The key of `text` in `scope` in a [`Spill`]: the scope's length, the scope, the text (so no
/// two pairs share one). Made only on the rare paths that use the spill.
fn spill_key(scope: &[u8], text: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + scope.len() + text.len());
    key.extend_from_slice(&(scope.len() as u64).to_le_bytes());
    key.extend_from_slice(scope);
    key.extend_from_slice(text);
    key
}

impl Spill {
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|map| map.is_empty())
    }

    fn get(&self, scope: &[u8], text: &[u8]) -> Option<&Place> {
        self.0.as_ref()?.get(spill_key(scope, text).as_slice())
    }

    fn remove(&mut self, scope: &[u8], text: &[u8]) -> Option<Place> {
        self.0.as_mut()?.remove(spill_key(scope, text).as_slice())
    }

    fn insert(&mut self, scope: &[u8], text: &[u8], place: Place) {
        let key = spill_key(scope, text).into_boxed_slice();
        self.0.get_or_insert_default().insert(key, place);
    }
}

/// One [`Table`] entry; a vacant one has `place.0 == usize::MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Filed {
    hash: u64,
    place: Place,
}

impl Filed {
    const VACANT: Filed = Filed {
        hash: 0,
        place: (usize::MAX, 0),
    };

    fn is_vacant(&self) -> bool {
        self.place.0 == usize::MAX
    }
}

/// A map from id hashes (already well mixed) to places: open addressing with linear probing,
/// at most half full, deletion by backward shift (no tombstones). An [`Index`] does one or two
/// of its operations per create and per query: the key is used as its own hash (no second
/// hashing) and a lookup is usually one probe.
///
/// Its operations, like the other small steps of the create and query paths here, are
/// `#[inline(always)]`: left to the compiler they stayed calls, whose entry and exit cost about
/// as much as their bodies (`valgrind --tool=callgrind target/release/kling-bench profile
/// TaskSlotsLayer 4000 1`, against 8000: ~80 instructions per request less with them inlined).
///
/// `len`, which every insert and removal writes, comes first (see [`State`]).
#[derive(Default)]
#[repr(C)]
struct Table {
    len: usize,
    /// A power of two long (or empty).
    entries: Vec<Filed>,
}

impl Table {
    fn mask(&self) -> usize {
        self.entries.len().wrapping_sub(1)
    }

    fn home(&self, hash: u64) -> usize {
        // The high bits: the id hash's best mixed, and not what `Colliding` varies in tests.
        (hash.rotate_left(32) as usize) & self.mask()
    }

    /// The entry index of `hash`, if filed.
    #[inline(always)]
    fn find(&self, hash: u64) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let mask = self.mask();
        let mut i = self.home(hash);
        loop {
            let entry = &self.entries[i];
            if entry.is_vacant() {
                return None;
            }
            if entry.hash == hash {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    fn get(&self, hash: u64) -> Option<Place> {
        self.find(hash).map(|i| self.entries[i].place)
    }

    /// Files `hash`, which must not be filed yet.
    #[inline(always)]
    fn insert_new(&mut self, hash: u64, place: Place) {
        if (self.len + 1) * 2 > self.entries.len() {
            self.grow();
        }
        let mask = self.mask();
        let mut i = self.home(hash);
        while !self.entries[i].is_vacant() {
            i = (i + 1) & mask;
        }
        self.entries[i] = Filed { hash, place };
        self.len += 1;
    }

    #[inline(never)]
    fn grow(&mut self) {
        let size = (self.entries.len() * 2).max(16);
        let old = std::mem::replace(&mut self.entries, vec![Filed::VACANT; size]);
        self.len = 0;
        for entry in old.into_iter().filter(|e| !e.is_vacant()) {
            self.insert_new(entry.hash, entry.place);
        }
    }

    /// Unfiles entry `i` (from [`find`](Table::find)); returns its place.
    #[inline(always)]
    fn remove_at(&mut self, mut i: usize) -> Place {
        let place = self.entries[i].place;
        self.len -= 1;
        let mask = self.mask();
        // Backward shift: move up each later entry of the run that may sit in the hole.
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let entry = self.entries[j];
            if entry.is_vacant() {
                break;
            }
            let home = self.home(entry.hash);
            // The entry stays when its home lies cyclically in (i, j].
            let stays = if i <= j {
                i < home && home <= j
            } else {
                i < home || home <= j
            };
            if !stays {
                self.entries[i] = entry;
                i = j;
            }
        }
        self.entries[i] = Filed::VACANT;
        place
    }
}

/// How an [`Index`] hashes ids (a test uses one that collides).
trait HashId {
    fn hash(text: &[u8]) -> u64;
}

/// The hash of ids: a word at a time, the tail read as one (overlapping) word, each step mixed
/// by a folded multiply. Collisions cost a trip to `spill`, never a wrong answer.
struct IdHash;

impl HashId for IdHash {
    fn hash(text: &[u8]) -> u64 {
        const K: u64 = 0x9e37_79b9_7f4a_7c15;
        fn mix(x: u64) -> u64 {
            let m = u128::from(x) * u128::from(0xa076_1d64_78bd_642f_u64);
            (m as u64) ^ ((m >> 64) as u64)
        }
        let bytes = text;
        let mut hash = (bytes.len() as u64).wrapping_mul(K);
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            hash = mix(hash ^ u64::from_le_bytes(word.try_into().expect("8 bytes")));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let tail = match bytes.len().checked_sub(8) {
                Some(start) => u64::from_le_bytes(bytes[start..].try_into().expect("8 bytes")),
                None => rest.iter().fold(0, |acc, &b| (acc << 8) | u64::from(b)),
            };
            hash = mix(hash ^ tail ^ K);
        }
        hash
    }
}

/// The hash of a create path ([`CreatePath::legacy`]).
pub(super) fn path_hash(path: &[u8]) -> u64 {
    IdHash::hash(path)
}

/// Where an [`Index`] confirms a hit: the scope and id a place holds.
trait Keys {
    fn key(&self, place: Place) -> Option<(&[u8], &[u8])>;
}

/// No scope: task ids are the server's, unique in every account.
const NO_SCOPE: &[u8] = &[];

/// The scope of external ids kept in `account`'s pools: external ids are the caller's, unique
/// per account only.
fn scope_of(account: &AccountId) -> &[u8] {
    account.as_str().as_bytes()
}

/// The ids of one kind held in the pools: task ids in no scope, external ids in their pool's
/// account.
struct Kept<'a>(&'a [PoolState], Which);

impl Keys for Kept<'_> {
    fn key(&self, (index, slot): Place) -> Option<(&[u8], &[u8])> {
        let pool = self.0.get(index)?;
        let text = pool.holdings.get(slot)?.held()?.key(self.1)?;
        let scope = match self.1 {
            Which::Id => NO_SCOPE,
            Which::External => scope_of(&pool.key.account),
        };
        Some((scope, text))
    }
}

/// The hash an [`Index`] files `text` under in `scope`: `H::hash(text)` in no scope (so a task
/// id's hash is its plain [`IdHash`]), else mixed with the scope's.
#[inline(always)]
fn hash_in<H: HashId>(scope: &[u8], text: &[u8]) -> u64 {
    let hash = H::hash(text);
    if scope.is_empty() {
        return hash;
    }
    hash ^ H::hash(scope)
        .rotate_left(29)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl<H: HashId> Index<H> {
    /// Where `text` is held in `scope`.
    fn get(&self, scope: &[u8], text: &[u8], keys: &impl Keys) -> Option<Place> {
        self.get_hashed(hash_in::<H>(scope, text), scope, text, keys)
    }

    /// [`get`](Index::get) of a `text` whose [`hash_in`] `scope` is `hash`.
    fn get_hashed(&self, hash: u64, scope: &[u8], text: &[u8], keys: &impl Keys) -> Option<Place> {
        if let Some(place) = self.by_hash.get(hash)
            && keys.key(place) == Some((scope, text))
        {
            return Some(place);
        }
        if self.spill.is_empty() {
            return None;
        }
        self.spill.get(scope, text).copied()
    }

    /// Files `text` in `scope` under `place`; returns the holding filed under it before, if
    /// any.
    #[cfg(test)]
    fn insert(
        &mut self,
        scope: &[u8],
        text: &[u8],
        place: Place,
        keys: &impl Keys,
    ) -> Option<Place> {
        self.insert_hashed(hash_in::<H>(scope, text), scope, text, place, keys)
    }

    /// `insert` of a `text` whose [`hash_in`] `scope` is `hash`.
    #[inline(always)]
    fn insert_hashed(
        &mut self,
        hash: u64,
        scope: &[u8],
        text: &[u8],
        place: Place,
        keys: &impl Keys,
    ) -> Option<Place> {
        let spilled = if self.spill.is_empty() {
            None
        } else {
            self.spill.remove(scope, text)
        };
        match self.by_hash.find(hash) {
            None => {
                self.by_hash.insert_new(hash, place);
                spilled
            }
            Some(i) => {
                let there = self.by_hash.entries[i].place;
                if keys.key(there) == Some((scope, text)) {
                    self.by_hash.entries[i].place = place;
                    Some(there)
                } else {
                    // Another id with the same hash: file this one by its scope and text.
                    self.spill.insert(scope, text, place);
                    spilled
                }
            }
        }
    }

    /// Where `text` is held in `scope`, unfiled from here (one lookup instead of a `get` and a
    /// `remove`).
    #[cfg(test)]
    fn take(&mut self, scope: &[u8], text: &[u8], keys: &impl Keys) -> Option<Place> {
        self.take_hashed(hash_in::<H>(scope, text), scope, text, keys)
    }

    /// `take` of a `text` whose [`hash_in`] `scope` is `hash`.
    #[inline(always)]
    fn take_hashed(
        &mut self,
        hash: u64,
        scope: &[u8],
        text: &[u8],
        keys: &impl Keys,
    ) -> Option<Place> {
        match self.by_hash.find(hash) {
            Some(i) if keys.key(self.by_hash.entries[i].place) == Some((scope, text)) => {
                Some(self.by_hash.remove_at(i))
            }
            _ if self.spill.is_empty() => None,
            _ => self.spill.remove(scope, text),
        }
    }

    /// Unfiles `text` in `scope` if it still names `place`.
    #[cfg(test)]
    fn remove(&mut self, scope: &[u8], text: &[u8], place: Place) {
        self.remove_hashed(hash_in::<H>(scope, text), scope, text, place);
    }

    /// `remove` of a `text` whose [`hash_in`] `scope` is `hash`.
    #[inline(always)]
    fn remove_hashed(&mut self, hash: u64, scope: &[u8], text: &[u8], place: Place) {
        match self.by_hash.find(hash) {
            Some(i) if self.by_hash.entries[i].place == place => {
                self.by_hash.remove_at(i);
            }
            _ => {
                if !self.spill.is_empty() && self.spill.get(scope, text) == Some(&place) {
                    self.spill.remove(scope, text);
                }
            }
        }
    }

    fn contains(&self, scope: &[u8], text: &[u8], keys: &impl Keys) -> bool {
        self.get(scope, text, keys).is_some()
    }
}

/// Pools kept before a new key takes an idle pool's place ([`State::index_by_hash`]).
const POOLS_BEFORE_REUSE: usize = 64;

/// One pool. The fields a create or a query writes come first, on one cache line (the struct
/// is aligned to 128 bytes: see [`FreeList`]), with the few that only the changes writing
/// that line read; what the others read follows, from the next line on, where no thread
/// writes on those paths, so both cores keep valid copies. (The key used to start on the
/// written line: a release read it there, a miss on the other core's copy, and then wrote the
/// line, a second trip for the same line.)
#[repr(C)]
struct PoolState {
    in_use: u32,
    /// Slots believed held by someone else after a 1303.
    hidden: u32,
    configured: u32,
    /// The slots in use, the refused create's included, at the last 1303 (0: none since the
    /// last proof that more fit). Read by a hold that proves a level, which writes this line.
    refused_level: u32,
    /// What the three gauges were last told to show (in use, capacity, waiters): a gauge is
    /// moved only when its value changed, so the layer's create and query leave the capacity
    /// and waiters gauges (shared metric state a recorder keeps) untouched.
    shown: (u32, u32, usize),
    /// Live holdings.
    tasks: usize,
    /// No lease ends before this (may be early after renewals; then rescanned).
    next_lease: Option<Instant>,
    /// 1303s in a row at or below `refused_level` (capped at [`MAX_RECOVERY_DOUBLINGS`]): each
    /// doubles the recovery interval, and while there is one an ended task brings no hidden slot
    /// back. See [`PoolState::congested`]. Read by a release, which writes this line.
    streak: u32,
    // Read on those paths, from the next line on.
    key: SlotKey,
    /// Waiters (their tickets are their tokens, taken from the state's counter just before
    /// they join at the back, so in order) with the weight each asks for.
    queue: WaitList<u32>,
    /// Holdings, by slot (a vacant slot is reused: no hashing, no allocation once grown).
    holdings: Vec<Entry>,
    gauges: Gauges,
    // Rare.
    /// When the last hidden slot came back by time (or the last 1303).
    recovered_at: Instant,
    /// The last token handed out when the last 1303 that was no part of a burst came
    /// ([`State::token`]): a create whose grant's token is no greater was granted before it,
    /// and was on its way with it.
    refused_after: u64,
    /// How many 1303s that were no part of a burst the pool has had: a waiter granted before
    /// the last of them is told apart by it when it picks its grant up.
    refusals: u64,
    /// Grants handed to waiters that have not picked them up yet.
    /// With the pool's `refusals` when each was granted.
    granted: Vec<(u64, u64)>,
    /// Waiters refused because a lowered capacity is below their weight, with that capacity,
    /// until they pick the refusal up.
    refused: Vec<(u64, u32)>,
    /// The vacant slots of `holdings`, and the grants handed out, per thread lane
    /// ([`FreeList`]).
    free: [FreeList; LANES],
}

/// A pool's metric handles. Registered under the lock (once per pool, and per status of the
/// finished-task metrics); recorded only once it is released ([`Record`]).
struct Gauges {
    labels: [(&'static str, String); 2],
    /// The pool's gauges, shared with the records waiting to move them.
    shown: Arc<Shown>,
    /// Finished-task metrics by status, registered on first use.
    finished: Vec<(String, metrics::Counter, metrics::Histogram)>,
    /// Where in `finished` the usual reasons are ([`Why::known`]), once registered.
    known: [Option<usize>; 4],
}

impl Gauges {
    /// Counts a task that finished, once the lock is released.
    fn finished(&mut self, why: Why<'_>, lifetime: Lifetime) {
        // The usual reasons are found by number, the others by their label.
        let known = why.known();
        let i = match known.and_then(|k| self.known[k]) {
            Some(i) => i,
            None => self.register(why.label(), known),
        };
        let (_, counter, histogram) = &self.finished[i];
        finished_later((counter.clone(), histogram.clone(), lifetime));
    }

    /// The index in `finished` of the metrics labelled `status`, registered if new.
    #[cold]
    fn register(&mut self, status: &str, known: Option<usize>) -> usize {
        let i = match self.finished.iter().position(|(s, ..)| s == status) {
            Some(i) => i,
            None => {
                let labels = [
                    (names::LABEL_POOL, self.labels[1].1.clone()),
                    (names::LABEL_STATUS, status.to_owned()),
                ];
                self.finished.push((
                    status.to_owned(),
                    metrics::counter!(names::TASKS_FINISHED, &labels),
                    metrics::histogram!(names::TASK_LIFETIME, &labels),
                ));
                self.finished.len() - 1
            }
        };
        if let Some(k) = known {
            self.known[k] = Some(i);
        }
        i
    }
}

/// Why a holding is released, borrowed from the report: the [`ReleaseReason`] is built only
/// when a release is listed.
#[derive(Clone, Copy)]
enum Why<'a> {
    Ended(&'a TaskStatus),
    Completed,
    LeaseExpired,
    /// A lookup by external id found no task: the create held under it never happened. Its
    /// slots are given back, listed as [`ReleaseReason::Completed`], but no task ended: none
    /// counts as finished, and no hidden slot comes back for it.
    NeverMade,
}

impl<'a> Why<'a> {
    fn reason(self) -> ReleaseReason {
        match self {
            Why::Ended(status) => ReleaseReason::Ended(status.clone()),
            Why::Completed | Why::NeverMade => ReleaseReason::Completed,
            Why::LeaseExpired => ReleaseReason::LeaseExpired,
        }
    }

    /// The `status` label: [`ReleaseReason::as_str`] of [`reason`](Why::reason).
    fn label(self) -> &'a str {
        match self {
            Why::Ended(status) => status.as_str(),
            Why::Completed | Why::NeverMade => "completed",
            Why::LeaseExpired => "expired",
        }
    }

    /// Its index in [`Gauges::known`], for the reasons a release usually has.
    fn known(self) -> Option<usize> {
        match self {
            Why::Ended(TaskStatus::Succeeded) => Some(0),
            Why::Ended(TaskStatus::Failed) => Some(1),
            Why::Ended(_) | Why::NeverMade => None,
            Why::Completed => Some(2),
            Why::LeaseExpired => Some(3),
        }
    }
}

/// What the reports of one [`SlotOp::Update`] or [`SlotOp::Observed`] share.
struct Reports<'a> {
    /// The account they come from: external ids are looked up within it.
    account: &'a AccountId,
    /// The create path of the tasks they report, as far as known: a task is found by external
    /// id among holdings of that path only (read only then).
    path: ReportPath<'a>,
    lease: Duration,
    /// Read before the lock was taken, or else once, when a report first finds its task.
    now: Option<Instant>,
    applied: Applied,
    /// Releases are not listed in `applied`.
    unread: bool,
    /// Whether an end that finds no holding is remembered ([`Ended`]): only from a report of
    /// one task (a callback, a query of it), the way an end overtakes its create's answer. A
    /// batch answer reports many tasks long released, and would push the ends that matter out;
    /// so does a list page, of any length ([`SlotBackend::observe_list_on`]): one naming a
    /// single task long ended (a legacy list's last page) would free a later create of unknown
    /// outcome under its external id.
    note_ends: bool,
}

impl<'a> Reports<'a> {
    fn new(
        account: &'a AccountId,
        lease: Duration,
        now: Option<Instant>,
        unread: bool,
        tasks: usize,
    ) -> Self {
        Reports {
            account,
            path: ReportPath::Known(CreatePath::UNKNOWN),
            lease,
            now,
            applied: Applied::default(),
            unread,
            note_ends: tasks == 1,
        }
    }
}

/// Where a task id or external id is held: its pool's index in `State::list` and its slot in
/// the pool's `holdings`.
type Place = (usize, usize);

/// What the lock guards. The fields every create and query writes come first, on one cache
/// line, then those they read, on a line no thread writes on those paths: with two threads
/// taking turns at the lock, each line the other thread wrote since a thread's last turn is a
/// miss on the other core's copy, so the fewer lines a turn touches, the shorter the turn (and
/// the less the other thread waits). (Aligned
/// to 64 bytes, not 128: with 128, one task's requests took about 30 ns more, `kling-bench
/// profile TaskSlotsLayer 300000 1` A/B, for no gain with 64 tasks.)
#[repr(C, align(64))]
struct State {
    // Written by creates and queries: the first line.
    next_token: u64,
    ids: Index,
    externals: Index,
    // Read by them.
    list: Vec<PoolState>,
    /// The index of the pool used last.
    last: usize,
    // Read on those paths, written only on rare ones.
    halted: HashMap<AccountId, ApiError>,
    config: SlotsConfig,
    /// Each pool's index in `list`. A pool is never removed, so indices stay valid; an idle
    /// one may be given to a new key ([`State::index_by_hash`]).
    pools: FxMap<SlotKey, usize>,
    /// Tasks reported ended before a holding of theirs was filed.
    ended: Ended,
    /// Tasks whose holding a report ended, so that a reconcile's list that ran behind the
    /// report adopts nothing.
    freed: Freed,
    /// Holdings kept under an external id that another holding of their account took in
    /// `externals` ([`Holding::displaced`]): external ids may be unique per create path only
    /// (a legacy task is looked up at `{create path}/{external id}`), so one account may hold
    /// two tasks under one. While there are any, a report that finds its task by external id
    /// looks at every holding of the account (`State::by_external`), and a create kept under
    /// one replaces every earlier attempt among them (`State::supersede_displaced`); with none
    /// (the usual case), the index names the only holding under each external id.
    displaced: usize,
}

/// Moves `gauge` by `by` (an integer, exact in an `f64`); whether it did.
///
/// This runs in drops too (a waiter's, a grant given back by a future dropped in a panic):
/// while the thread unwinds, a metrics recorder's panic is caught ([`call_recorder`]), and the
/// caller owes the move, so the next record makes it.
fn move_gauge(gauge: &metrics::Gauge, by: i64) -> bool {
    call_recorder(|| {
        if by > 0 {
            gauge.increment(by as f64);
        } else {
            gauge.decrement(-by as f64);
        }
    })
}

/// A pool's three gauges (in use, capacity, waiters), shared by the pool and by the
/// [`Record`]s of its changes.
///
/// Moved once the backend's lock is released, never under it: a slow recorder (a blocked
/// exporter, a log of every move) would hold up every create and query of every pool, and one
/// that reads the limiter from a record (a snapshot) would deadlock on the lock. Under the lock
/// a change computes each gauge's move from what the pool told it last (`PoolState::shown`),
/// and the record makes the move after: moves add up whatever order threads make them in, so a
/// gauge ends exact (a scrape between two changes' records may see them in either order), and
/// the pools that share a series (`video:other`) add up in it. A move a recorder panics at is
/// owed, and made with the pool's next record.
///
/// Alone on its cache lines (aligned as [`FreeList`] is), apart from its `Arc`'s counts and
/// from whatever the allocator puts beside it: every create and ended task reads its gauge
/// handles and owed moves, on both cores, and nothing writes them but a recorder's panic.
/// Sharing a line with other data, the first of those reads took nearly all of
/// `Shown::record`'s samples with 64 tasks on two workers (`perf annotate`, the bench's Pro
/// stack): a miss on a line the other core had written.
#[repr(align(128))]
struct Shown {
    /// Moves told and not made (a recorder panicked at them).
    owed: [AtomicI64; 3],
    gauges: [metrics::Gauge; 3],
}

impl Shown {
    /// Moves each gauge by `by`, and by what it owes.
    ///
    /// Always inlined: called, it took `by` through memory the caller had just written in
    /// narrower stores, and its first read of it waited for them (a store-forwarding stall:
    /// half its samples, `perf annotate`, `kling-bench profile TaskSlotsLayer 300000 64`).
    #[inline(always)]
    fn record(&self, mut by: [i64; 3]) {
        // (Plain loads first: nothing is owed but after a panic, and a swap is a locked write.)
        if self
            .owed
            .iter()
            .any(|owed| owed.load(Ordering::Acquire) != 0)
        {
            for (by, owed) in by.iter_mut().zip(&self.owed) {
                *by += owed.swap(0, Ordering::AcqRel);
            }
        }
        let mut moving = Moving {
            shown: self,
            by,
            next: 0,
        };
        while moving.next < 3 {
            let by = moving.by[moving.next];
            if by != 0 && !move_gauge(&self.gauges[moving.next], by) {
                // Caught while the thread unwinds: owed, with the rest.
                return;
            }
            moving.next += 1;
        }
    }
}

/// The moves of one [`Shown::record`] from `next` on, owed unless it makes them (a recorder
/// panicked at the one at `next`).
struct Moving<'a> {
    shown: &'a Shown,
    by: [i64; 3],
    next: usize,
}

impl Drop for Moving<'_> {
    fn drop(&mut self) {
        for which in self.next..3 {
            if self.by[which] != 0 {
                self.shown.owed[which].fetch_add(self.by[which], Ordering::AcqRel);
            }
        }
    }
}

impl Drop for Shown {
    /// Makes what the pool's gauges still owe, the pool gone (its record was its last
    /// reference, or the whole backend went).
    fn drop(&mut self) {
        let owed = self
            .owed
            .each_mut()
            .map(|owed| std::mem::take(owed.get_mut()));
        if owed != [0; 3] {
            self.record(owed);
        }
    }
}

impl Drop for PoolState {
    /// Takes what the pool told its gauges back out of them: a pool whose backend is gone no
    /// longer counts in them. (One that makes way for another is taken out once the lock is
    /// released: see [`State::index_by_hash`].)
    fn drop(&mut self) {
        let (in_use, capacity, waiters) = std::mem::take(&mut self.shown);
        if (in_use, capacity, waiters) != (0, 0, 0) {
            let by = [-i64::from(in_use), -i64::from(capacity), -(waiters as i64)];
            self.gauges.shown.record(by);
        }
    }
}

/// A metric, or a log line, that a change made under the backend's lock leaves to be recorded
/// once the lock is released (see [`Shown`]), by the thread that made it, before its call
/// returns ([`after_unlock`]).
enum Record {
    /// A pool's gauges move (in use, capacity, waiters) by what its changes told them.
    Pool(Arc<Shown>, [i64; 3]),
    /// A task finished: counted, and its lifetime recorded.
    Finished(metrics::Counter, metrics::Histogram, Lifetime),
    /// A reservation that no grant of the backend's holds now was handed back: ignored.
    Stale(StaleReservation),
}

impl Record {
    /// Makes the record; while the thread unwinds, a panic of the recorder or subscriber is
    /// caught ([`call_recorder`]).
    fn make(self) {
        match self {
            Record::Pool(shown, by) => shown.record(by),
            Record::Finished(counter, histogram, lifetime) => {
                count_finished((counter, histogram, lifetime));
            }
            Record::Stale(stale) => {
                call_recorder(|| stale.warn());
            }
        }
    }
}

/// A reservation handed back (given back, kept, or refused by the server) that no grant of the
/// backend holds: given back or kept already (a stale copy: [`Reservation`] is plain data), of
/// another pool, account or backend, or made up. It frees no slot, so that no create gets in
/// past the pool's limit, and is logged as the caller's error.
struct StaleReservation {
    change: &'static str,
    key: SlotKey,
    weight: u32,
    token: u64,
}

impl StaleReservation {
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

/// Logs `reservation`, handed back by `change` and held by no grant, once the lock is
/// released.
#[cold]
#[inline(never)]
fn stale(reservation: &Reservation, change: &'static str) {
    record_later(Record::Stale(StaleReservation {
        change,
        key: reservation.key.clone(),
        weight: reservation.weight,
        token: reservation.token,
    }));
}

/// What a thread left to record once it releases the lock.
struct Pending {
    /// The gauges of the pool the thread recorded last, kept for its next changes: while a
    /// thread keeps to a pool, its changes add their moves to `by` (no record made, no
    /// reference count written). Dropped only once the lock is released, as a pool's last
    /// reference may be.
    last: Option<Arc<Shown>>,
    /// The moves of `last`'s gauges left to make (none without `last`).
    by: [i64; 3],
    /// A task that finished (the usual query ends one): its count and lifetime.
    finished: Option<Finished>,
    /// The other records ([`Record`]).
    records: Vec<Record>,
}

/// A finished task's counter and lifetime histogram (of its pool and status), and its lifetime.
type Finished = (metrics::Counter, metrics::Histogram, Lifetime);

/// When a finished task's holding began and ended: its lifetime in seconds is worked out once
/// the lock is released (a subtraction of instants, a call, and a division, which every ended
/// task made the other threads wait for under the lock).
#[derive(Clone, Copy)]
struct Lifetime {
    since: Instant,
    until: Instant,
}

impl Lifetime {
    fn secs(self) -> f64 {
        self.until
            .saturating_duration_since(self.since)
            .as_secs_f64()
    }
}

/// Counts `finished`, once the lock is released.
#[inline]
fn finished_later(finished: Finished) {
    let mut finished = Some(finished);
    let _ = PENDING.try_with(|pending| {
        if let Ok(mut pending) = pending.try_borrow_mut()
            && pending.finished.is_none()
        {
            pending.finished = finished.take();
        }
    });
    match finished {
        None => left(),
        Some((counter, histogram, lifetime)) => {
            record_later(Record::Finished(counter, histogram, lifetime));
        }
    }
}

/// Counts a finished task; while the thread unwinds, a recorder's panic is caught.
fn count_finished((counter, histogram, lifetime): Finished) {
    call_recorder(|| {
        counter.increment(1);
        histogram.record(lifetime.secs());
    });
}

impl Drop for Pending {
    /// The thread is going: what it left is made (its panics caught).
    fn drop(&mut self) {
        let by = std::mem::take(&mut self.by);
        let (last, records) = (self.last.take(), std::mem::take(&mut self.records));
        let finished = self.finished.take();
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if let Some(last) = last {
                last.record(by);
            }
            if let Some(finished) = finished {
                count_finished(finished);
            }
            each_completing(records.into_iter(), Record::make);
        }));
    }
}

thread_local! {
    static PENDING: RefCell<Pending> = const {
        RefCell::new(Pending {
            last: None,
            by: [0; 3],
            finished: None,
            records: Vec::new(),
        })
    };
    /// The records of a backend call made while this thread makes its pending moves (a
    /// recorder that calls the backend back), made as that call returns.
    static REENTERED: RefCell<Vec<Record>> = const { RefCell::new(Vec::new()) };
    /// Whether the thread left anything to record since it last made its records: a call
    /// that changed nothing shown (a task kept, a lease renewed) looks no further. (No
    /// destructor: read without a check of the thread's state.)
    static LEFT: Cell<bool> = const { Cell::new(false) };
}

/// Notes that the thread left something to record ([`LEFT`]).
#[inline(always)]
fn left() {
    LEFT.with(|left| left.set(true));
}

/// Leaves `record` to be made once the lock is released.
fn record_later(record: Record) {
    let mut record = Some(record);
    let _ = PENDING.try_with(|pending| {
        if let Ok(mut pending) = pending.try_borrow_mut() {
            pending.records.extend(record.take());
        }
    });
    left();
    if record.is_some() {
        reentered(record);
    }
}

/// Leaves `record` for [`REENTERED`]: the thread is making its pending moves, and a recorder
/// called the backend.
#[cold]
#[inline(never)]
fn reentered(mut record: Option<Record>) {
    left();
    let _ = REENTERED.try_with(|records| {
        if let Ok(mut records) = records.try_borrow_mut() {
            records.extend(record.take());
        }
    });
    if let Some(record) = record {
        // The thread is going (its locals are gone): made now, a panic caught.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| record.make()));
    }
}

/// Leaves the gauges of `shown` to move by `by` once the lock is released.
#[inline(always)]
fn record_pool_later(shown: &Arc<Shown>, by: [i64; 3]) {
    let queued = PENDING.try_with(|pending| {
        let Ok(mut pending) = pending.try_borrow_mut() else {
            return false;
        };
        let pending = &mut *pending;
        match &pending.last {
            Some(last) if Arc::ptr_eq(last, shown) => {
                for (total, by) in pending.by.iter_mut().zip(by) {
                    *total += by;
                }
            }
            _ => pending.records.push(Record::Pool(shown.clone(), by)),
        }
        true
    });
    left();
    if !matches!(queued, Ok(true)) {
        reentered(Some(Record::Pool(shown.clone(), by)));
    }
}

/// A panic caught, to go on once the rest is done.
type Panic = Box<dyn Any + Send>;

/// Makes what this thread left to record ([`Pending`]): every record, even when one panics,
/// and then the first panic goes on. Call it without the lock.
///
/// Made in place, the thread's records borrowed: a recorder that calls the backend back
/// leaves that call's records apart ([`REENTERED`]), made as it returns.
#[inline]
fn record_pending() {
    if !LEFT.with(|left| left.replace(false)) {
        return;
    }
    let called_back = PENDING.try_with(|pending| {
        let Ok(mut pending) = pending.try_borrow_mut() else {
            return true;
        };
        let Pending {
            last,
            by,
            finished,
            records,
        } = &mut *pending;
        let moves = std::mem::take(by);
        let (finished, more) = (finished.take(), !records.is_empty());
        let shown = last.as_deref().filter(|_| moves != [0; 3]);
        // The moves are made as this is dropped: after the count, or should the count panic.
        let moving = MoveOnDrop(shown, moves);
        if !more {
            // The usual: a create's move, a task's end and its move.
            if let Some(finished) = finished {
                count_finished(finished);
            }
            return false;
        }
        // Every one made even should one panic (what a gauge did not make is owed, and made
        // with the pool's next moves).
        let made = std::panic::AssertUnwindSafe(|| {
            if let Some(finished) = finished {
                count_finished(finished);
            }
            drop(moving);
        });
        let first = std::panic::catch_unwind(made).err();
        make_records(records, last, *by);
        if let Some(panic) = first {
            std::panic::resume_unwind(panic);
        }
        false
    });
    if called_back == Ok(true) {
        make_reentered();
    }
}

/// Makes the moves of a pool's gauges when dropped (also in a panic: see [`move_gauge`]).
struct MoveOnDrop<'a>(Option<&'a Shown>, [i64; 3]);

impl Drop for MoveOnDrop<'_> {
    #[inline]
    fn drop(&mut self) {
        if let Some(shown) = self.0 {
            shown.record(self.1);
        }
    }
}

/// Makes `records` (a thread's changes of another pool than the last, finished tasks, stale
/// reservations) in place, every one even should one panic; the gauges of the last pool among
/// them become the thread's `last` unless it has moves left to make (`by`).
#[inline(never)]
fn make_records(records: &mut Vec<Record>, last: &mut Option<Arc<Shown>>, by: [i64; 3]) {
    each_completing(records.drain(..), |record| match record {
        Record::Pool(shown, moves) => {
            shown.record(moves);
            if by == [0; 3] {
                // (One it replaces goes here, the lock released: it may be a gone pool's
                // last.)
                *last = Some(shown);
            }
        }
        record => record.make(),
    });
}

/// Makes the records of a call made back by a recorder ([`REENTERED`]).
#[cold]
#[inline(never)]
fn make_reentered() {
    let records = REENTERED.try_with(|records| {
        let mut records = records.try_borrow_mut().ok()?;
        (!records.is_empty()).then(|| std::mem::take(&mut *records))
    });
    if let Ok(Some(records)) = records {
        each_completing(records.into_iter(), Record::make);
    }
}

/// Once the lock is released: writes the warnings of the leases that ran out and makes the
/// records left under it. Should one panic (a subscriber's, a recorder's), the others are
/// still made, `on_panic` runs (what the caller took under the lock, a create's grant, is
/// plain data, and would be lost with its slots), and the first panic goes on; while the
/// thread already unwinds, a second panic would abort, so they are caught, and `on_panic`
/// does not run (the caller keeps what it took).
#[inline]
fn after_unlock(ran_out: &[LeaseRanOut], on_panic: impl FnOnce()) {
    let warned = if ran_out.is_empty() {
        None
    } else {
        warn_leases_ran_out(ran_out)
    };
    let mut guard = OnPanic(Some(on_panic));
    record_pending();
    let on_panic = guard.0.take();
    if let (Some(panic), Some(on_panic)) = (warned, on_panic) {
        go_on(panic, on_panic);
    }
}

/// Runs its closure if dropped in a panic ([`after_unlock`]: one of the records'; while the
/// thread already unwinds, they catch theirs).
struct OnPanic<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for OnPanic<F> {
    #[inline]
    fn drop(&mut self) {
        if let Some(on_panic) = self.0.take()
            && std::thread::panicking()
        {
            on_panic();
        }
    }
}

#[cold]
#[inline(never)]
fn go_on(panic: Panic, on_panic: impl FnOnce()) {
    if std::thread::panicking() {
        return;
    }
    on_panic();
    std::panic::resume_unwind(panic);
}

impl PoolState {
    fn new(key: &SlotKey, configured: u32) -> Self {
        let labels = [
            (
                names::LABEL_ACCOUNT,
                names::account_label(key.account.as_str()).to_owned(),
            ),
            (
                names::LABEL_POOL,
                names::pool_label(Some(&key.pool)).to_owned(),
            ),
        ];
        // Nothing hidden, in use or waiting yet: the capacity is shown once the lock is
        // released (the gauges move by differences, so that pools sharing a label add up).
        let shown = Arc::new(Shown {
            owed: [0, 0, 0].map(AtomicI64::new),
            gauges: [
                metrics::gauge!(names::SLOTS_IN_USE, &labels),
                metrics::gauge!(names::SLOTS_CAPACITY, &labels),
                metrics::gauge!(names::SLOTS_WAITERS, &labels),
            ],
        });
        record_pool_later(&shown, [0, i64::from(configured), 0]);
        PoolState {
            key: key.clone(),
            configured,
            hidden: 0,
            recovered_at: Instant::now(),
            refused_level: 0,
            streak: 0,
            refused_after: 0,
            refusals: 0,
            in_use: 0,
            queue: WaitList::new(),
            granted: Vec::new(),
            refused: Vec::new(),
            holdings: Vec::new(),
            free: std::array::from_fn(|_| FreeList {
                head: NONE,
                grants: Vec::new(),
            }),
            tasks: 0,
            next_lease: None,
            shown: (0, configured, 0),
            gauges: Gauges {
                shown,
                finished: Vec::new(),
                known: [None; 4],
                labels,
            },
        }
    }

    fn capacity(&self) -> u32 {
        self.configured.saturating_sub(self.hidden)
    }

    fn free(&self) -> u32 {
        self.capacity().saturating_sub(self.in_use)
    }

    /// Takes `weight` slots as the grant of `token` if they are free and nobody waits ahead;
    /// whether it did. (The gauge moves once the lock is released: should the recorder panic
    /// then, the caller gives the grant back, see [`after_unlock`].)
    #[inline(always)]
    fn grant_at_once(&mut self, weight: u32, token: u64) -> bool {
        if self.queue.is_empty() && self.free() >= weight {
            self.in_use += weight;
            self.granted_to(token, weight);
            self.show_in_use();
            return true;
        }
        false
    }

    /// Notes the grant of `token`, of `weight` slots counted in use, as handed out (on this
    /// thread's lane).
    #[inline(always)]
    fn granted_to(&mut self, token: u64, weight: u32) {
        if weight > 0 {
            self.free[lanes::current()].grants.push((token, weight));
        }
    }

    /// Takes the grant of `reservation` (whose key named this pool) off those handed out:
    /// whether it was one, and so whether its slots may go back or be kept under a task. A
    /// grant of no slots counts nothing either way.
    #[inline(always)]
    fn settle(&mut self, reservation: &Reservation) -> bool {
        let grant = (reservation.token, reservation.weight);
        if grant.1 == 0 {
            return true;
        }
        // Usually on this thread's lane (the thread that was granted it), among few: a lane
        // lists only the grants of its creates not yet answered. The list is not kept in
        // grant order (`swap_remove`): kept in order (a `VecDeque`, the oldest checked first)
        // it cost more instructions than the search it saved.
        let lane = lanes::current();
        let grants = &mut self.free[lane].grants;
        if let Some(i) = grants.iter().position(|&g| g == grant) {
            grants.swap_remove(i);
            return true;
        }
        self.settle_elsewhere(lane, grant)
    }

    /// [`settle`](PoolState::settle) of a grant handed out on another lane than `lane`, or
    /// none.
    #[cold]
    fn settle_elsewhere(&mut self, lane: usize, grant: (u64, u32)) -> bool {
        for (other, list) in self.free.iter_mut().enumerate() {
            if other != lane
                && let Some(i) = list.grants.iter().position(|&g| g == grant)
            {
                list.grants.swap_remove(i);
                return true;
            }
        }
        false
    }

    /// Whether nothing is held, waits, is granted, refused or hidden: the pool may make way
    /// for another.
    fn is_idle(&self) -> bool {
        self.in_use == 0
            && self.tasks == 0
            && self.hidden == 0
            && self.queue.is_empty()
            && self.granted.is_empty()
            && self.refused.is_empty()
    }

    /// Has the gauges whose values changed since they were last told moved, by the change,
    /// once the lock is released ([`Shown`]): a gauge shows the sum over the pools that share
    /// its labels (one, unless they share [`other_model_label`](names::other_model_label)).
    fn publish(&mut self) {
        let values = (self.in_use, self.capacity(), self.waiting());
        let shown = std::mem::replace(&mut self.shown, values);
        if values != shown {
            let by = |value: u32, shown: u32| i64::from(value) - i64::from(shown);
            let by = [
                by(values.0, shown.0),
                by(values.1, shown.1),
                values.2 as i64 - shown.2 as i64,
            ];
            record_pool_later(&self.gauges.shown, by);
        }
    }

    /// [`publish`](PoolState::publish) after a change of the slots in use only.
    #[inline(always)]
    fn show_in_use(&mut self) {
        let shown = std::mem::replace(&mut self.shown.0, self.in_use);
        if shown != self.in_use {
            let by = i64::from(self.in_use) - i64::from(shown);
            record_pool_later(&self.gauges.shown, [by, 0, 0]);
        }
    }

    /// Hands free slots to the queue's head, in order.
    #[inline(always)]
    fn dispatch(&mut self) {
        if !self.queue.is_empty() {
            self.dispatch_queued();
        }
    }

    /// [`dispatch`](PoolState::dispatch) when someone waits.
    fn dispatch_queued(&mut self) {
        let mut moved = false;
        while let Some(front) = self.queue.front() {
            if front.value > self.free() {
                break;
            }
            let waiter = self.queue.pop_front().expect("front exists");
            self.in_use += waiter.value;
            self.granted.push((waiter.ticket, self.refusals));
            if let Some(waker) = waiter.waker {
                waker.wake();
            }
            moved = true;
        }
        if moved {
            self.head_changed();
        }
    }

    /// Only the queue's head sleeps until maintenance has work (nobody behind it can be granted
    /// first), so a waiter carries no timer: a new head is woken to arm its own when there is
    /// maintenance to wait for.
    fn head_changed(&self) {
        if let Some(waker) = self.queue.front().and_then(|head| head.waker.as_ref())
            && self.has_maintenance()
        {
            waker.wake_by_ref();
        }
    }

    /// Whether lazy maintenance may have work some time: a lease to end or a hidden slot to
    /// bring back.
    fn has_maintenance(&self) -> bool {
        self.tasks > 0 || self.hidden > 0
    }

    /// The interval at which hidden slots come back now: the configured one, doubled for each
    /// 1303 in a row at the same level ([`PoolState::congested`]).
    fn recovery_interval(&self, configured: Duration) -> Duration {
        configured.saturating_mul(1 << self.streak)
    }

    /// A 1303 answered a create of `weight` (already given back) whose token is `token`, with
    /// `last_token` the last one handed out: what we thought free is held by someone we cannot
    /// see, so the pool is believed to hold only what we hold now.
    ///
    /// A 1303 again at no more slots than the last one's, for a create granted after it,
    /// is evidence that the hidden slots are not coming back soon (another client's
    /// long-running work, or a capacity set higher than the account has): each such 1303
    /// doubles the recovery interval, up to 2^[`MAX_RECOVERY_DOUBLINGS`] times, and ended tasks
    /// of ours stop bringing hidden slots back. Without it, told twice the slots it has, the
    /// pool met a 1303 after about every ended task. The 1303s of creates already on their way
    /// (a burst) are one refusal: each lowers the level, none lengthens the streak. A create
    /// that succeeds at the refused level or above ends the streak ([`PoolState::prove_level`]).
    fn congested(&mut self, weight: u32, token: u64, last_token: u64, now: Instant) {
        let level = self.in_use.saturating_add(weight);
        let same_burst = self.refused_level > 0 && token <= self.refused_after;
        if !same_burst {
            if self.refused_level > 0 && level <= self.refused_level {
                self.streak = (self.streak + 1).min(MAX_RECOVERY_DOUBLINGS);
            } else {
                self.streak = 0;
            }
            self.refused_after = last_token;
            self.refusals += 1;
        }
        self.refused_level = level;
        self.hidden = self.configured.saturating_sub(self.in_use);
        self.recovered_at = now;
    }

    /// A create of ours succeeded: when the tasks we hold now (not the creates still awaiting
    /// an answer, which may yet meet a 1303) fill the last 1303's level, more fit than that 1303
    /// said, so the streak of 1303s ends, and hidden slots come back at the configured interval
    /// from `now` (not recounted from the last step at the longer one).
    #[inline(always)]
    fn prove_level(&mut self, now: Instant) {
        let level = self.refused_level;
        if level > 0 && self.in_use >= level && self.held_reach(level) {
            self.end_streak(now);
        }
    }

    /// Forgets what the 1303s said (a create proved more fit, or the capacity was set): hidden
    /// slots come back at the configured interval from `now`, not recounted in short steps
    /// over the time spent at the longer one.
    fn end_streak(&mut self, now: Instant) {
        self.refused_level = 0;
        if self.streak > 0 {
            self.streak = 0;
            self.recovered_at = now;
            // Hidden slots now come back sooner than the head's timer says.
            self.head_changed();
        }
    }

    /// Whether the holdings weigh `level` or more (counted only when their number falls short,
    /// as image tasks weigh more than one).
    #[cold]
    fn held_reach(&self, level: u32) -> bool {
        self.tasks >= level as usize
            || self.live().map(|(_, h)| u64::from(h.weight)).sum::<u64>() >= u64::from(level)
    }

    /// A holding's lease now ends at `lease_until`, sooner than every lease `next_lease` knew
    /// of: noted, and the queue's head woken to wait for it when its timer waits longer.
    #[cold]
    fn lease_sooner(&mut self, lease_until: Instant, interval: Duration) {
        let sooner =
            !self.queue.is_empty() && self.next_wake(interval).is_none_or(|t| lease_until < t);
        self.next_lease = Some(lease_until);
        if sooner {
            self.head_changed();
        }
    }

    /// The next instant lazy maintenance has something to do.
    fn next_wake(&self, interval: Duration) -> Option<Instant> {
        let interval = self.recovery_interval(interval);
        // (An interval too long for the clock never comes.)
        let recovery = (self.hidden > 0)
            .then(|| self.recovered_at.checked_add(interval))
            .flatten();
        match (self.next_lease, recovery) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn give_back(&mut self, weight: u32) {
        self.in_use = self.in_use.saturating_sub(weight);
    }

    /// Creates waiting (the queue less its tombstones).
    fn waiting(&self) -> usize {
        self.queue.waiting()
    }

    /// The waiter of `token` gives up: the head leaves (and the next is told), any other
    /// leaves a tombstone. False when it was not waiting.
    fn remove_waiter(&mut self, token: u64) -> bool {
        match self.queue.remove(token) {
            Removed::NotWaiting => false,
            Removed::Head => {
                self.head_changed();
                true
            }
            Removed::Behind => true,
        }
    }

    /// Takes the grant of the waiter of `token`, if it has one: the pool's `refusals` when it
    /// was granted.
    fn take_grant(&mut self, token: u64) -> Option<u64> {
        let i = self.granted.iter().position(|&(t, _)| t == token)?;
        Some(self.granted.swap_remove(i).1)
    }

    /// The capacity that refused the waiter of `token`, if one did (taken: it is told once).
    fn take_refusal(&mut self, token: u64) -> Option<u32> {
        let i = self.refused.iter().position(|&(t, _)| t == token)?;
        Some(self.refused.swap_remove(i).1)
    }

    /// The waiter of `token`, of `weight` slots, gives up wherever it stands: waiting, granted
    /// (its slots go back) or refused. The caller dispatches and publishes.
    fn leave(&mut self, token: u64, weight: u32) {
        if self.remove_waiter(token) {
            return;
        }
        if self.take_grant(token).is_some() {
            // (Never handed out: not among `grants`.)
            self.give_back(weight);
            return;
        }
        self.take_refusal(token);
    }

    /// Refuses the waiters that need more than `configured` slots, the pool's capacity just
    /// lowered (above 0): they could never be served, and would hold up everyone behind them.
    /// Each leaves the queue and is woken to fail with [`OverCapacity`].
    #[cold]
    fn refuse_heavier(&mut self, configured: u32) {
        if configured == 0 || self.queue.iter().all(|w| w.value <= configured) {
            return;
        }
        let heavy: Vec<(u64, Option<Waker>)> = self
            .queue
            .iter()
            .filter(|w| w.value > configured)
            .map(|w| (w.ticket, w.waker.clone()))
            .collect();
        for (ticket, waker) in heavy {
            self.remove_waiter(ticket);
            self.refused.push((ticket, configured));
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }

    /// Files a holding in a vacant slot, one this thread's lane freed when there is one;
    /// returns the slot.
    ///
    /// A lane with no vacant slot adds one while fewer than [`LANES`] are vacant in the other
    /// lanes, else takes another lane's list: each thread soon has slots of its own (taking
    /// the other's only vacant slot would hand one slot back and forth between the threads,
    /// its lines with it), and the slots never outnumber the most held at once by more than
    /// [`LANES`], whichever threads keep and end the tasks.
    #[inline(always)]
    fn put(&mut self, holding: Holding) -> usize {
        let lane = lanes::current();
        let mut slot = self.free[lane].head;
        if slot == NONE && self.holdings.len() - self.tasks >= LANES {
            slot = self.adopt_free(lane);
        }
        self.tasks += 1;
        if slot == NONE {
            self.holdings.push(Entry {
                held: Some(holding),
                next: NONE,
            });
            return self.holdings.len() - 1;
        }
        let entry = &mut self.holdings[slot];
        self.free[lane].head = entry.next;
        entry.held = Some(holding);
        slot
    }

    /// Moves another lane's whole free list to `lane`'s (which is empty), so that vacant
    /// slots are reused whichever thread freed them; returns its first slot, or [`NONE`] when
    /// every list is empty.
    #[cold]
    fn adopt_free(&mut self, lane: usize) -> usize {
        let Some(other) = self.free.iter().position(|list| list.head != NONE) else {
            return NONE;
        };
        let head = std::mem::replace(&mut self.free[other].head, NONE);
        self.free[lane].head = head;
        head
    }

    /// Puts the vacant `slot` on this thread's lane's free list.
    #[inline(always)]
    fn free_slot(&mut self, slot: usize) {
        self.tasks -= 1;
        let list = &mut self.free[lanes::current()];
        self.holdings[slot].next = std::mem::replace(&mut list.head, slot);
    }

    /// Takes the holding out of `slot`, if there is one.
    fn take(&mut self, slot: usize) -> Option<Holding> {
        let holding = self.holdings.get_mut(slot)?.held.take()?;
        self.free_slot(slot);
        Some(holding)
    }

    /// Drops the holding in `slot`, which must be there (read in place first: no copy).
    fn clear(&mut self, slot: usize) {
        // (Not `= None`, which compiles to a copy of a whole `None` holding from the stack.)
        drop(self.holdings[slot].held.take());
        self.free_slot(slot);
    }

    fn live(&self) -> impl Iterator<Item = (usize, &Holding)> {
        self.holdings
            .iter()
            .enumerate()
            .filter_map(|(slot, entry)| entry.held().map(|h| (slot, h)))
    }
}

/// `a == b`, decided without comparing text when both name the same memory (an interned
/// account, the pool's model `Arc`): the usual case on the create path, where a key equal to
/// the pool used last is looked up twice per create.
fn same_key(a: &SlotKey, b: &SlotKey) -> bool {
    fn same(a: &str, b: &str) -> bool {
        std::ptr::eq(a, b) || a == b
    }
    same(a.account.as_str(), b.account.as_str())
        && a.pool.product() == b.pool.product()
        && match (a.pool.model(), b.pool.model()) {
            (Some(a), Some(b)) => same(a, b),
            (a, b) => a.is_none() && b.is_none(),
        }
}

/// A task whose slots went back because its lease ran out, kept to be logged once the lock is
/// released: a subscriber may be slow (a blocked pipe, a slow disk), and while the lock is
/// held every create and query of every pool waits for it.
struct LeaseRanOut {
    key: SlotKey,
    id: Option<SmallId>,
    external: Option<SmallId>,
    weight: u32,
    held_for: Duration,
}

/// Says, for each of `ran_out`, that a task's slots went back because its lease ran out:
/// nothing reported the task for a whole lease (no query, callback or listing), so it may
/// still run on the server, and the freed slot may meet a `1303`. Usually a sign that tasks
/// are not followed, or that the lease is shorter than they run. Call it without the lock
/// ([`after_unlock`]); every one is written even when the subscriber panics at one, and the
/// first panic is returned.
#[cold]
#[inline(never)]
fn warn_leases_ran_out(ran_out: &[LeaseRanOut]) -> Option<Panic> {
    let warn_all = || each_completing(ran_out.iter(), warn_lease_ran_out);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(warn_all)).err()
}

fn warn_lease_ran_out(lease: &LeaseRanOut) {
    tracing::warn!(
        account = %lease.key.account,
        pool = %lease.key.pool,
        task_id = lease
            .id
            .as_ref()
            .map_or("(unknown: its create's answer was lost)", SmallId::as_str),
        external_id = lease.external.as_ref().map(SmallId::as_str),
        weight = lease.weight,
        held_secs = lease.held_for.as_secs(),
        "task slot released at the end of its lease, the task never reported ended: it may \
         still be running on the server"
    );
}

impl State {
    /// The index of `key`'s pool, made on first use: the pool used last is checked first (its
    /// account and pool names are usually the very same `Arc`s, compared by address), else one
    /// hash lookup.
    #[inline(always)]
    fn index(&mut self, key: &SlotKey) -> usize {
        if self
            .list
            .get(self.last)
            .is_some_and(|pool| same_key(&pool.key, key))
        {
            return self.last;
        }
        self.index_by_hash(key)
    }

    /// [`index`](State::index) of a pool other than the one used last.
    ///
    /// A new key's pool takes the place of an idle one once there are
    /// [`POOLS_BEFORE_REUSE`] pools: a pool is named by the path's model on new-style
    /// creates, so a client sending many model names (typos, or through a gateway on purpose)
    /// would otherwise leave a pool behind for each. An idle pool holds nothing a later
    /// create would miss: its capacity comes from the configuration, and nothing refers to
    /// its index (no holding, waiter or grant).
    #[inline(never)]
    fn index_by_hash(&mut self, key: &SlotKey) -> usize {
        let i = match self.pools.get(key) {
            Some(&i) => i,
            None => {
                let configured = self.config.capacity_of(&key.account, &key.pool);
                let fresh = PoolState::new(key, configured);
                let idle = if self.list.len() >= POOLS_BEFORE_REUSE {
                    self.list.iter().position(PoolState::is_idle)
                } else {
                    None
                };
                let i = match idle {
                    Some(i) => {
                        // Its gauges are taken out once the lock is released (the record
                        // holds them), not as it is dropped here.
                        let idle = &mut self.list[i];
                        let (in_use, capacity, waiters) = std::mem::take(&mut idle.shown);
                        let by = [-i64::from(in_use), -i64::from(capacity), -(waiters as i64)];
                        record_pool_later(&idle.gauges.shown, by);
                        let old = std::mem::replace(&mut self.list[i], fresh);
                        self.pools.remove(&old.key);
                        i
                    }
                    None => {
                        self.list.push(fresh);
                        self.list.len() - 1
                    }
                };
                self.pools.insert(key.clone(), i);
                i
            }
        };
        self.last = i;
        i
    }

    #[inline(always)]
    fn pool_mut(&mut self, key: &SlotKey) -> &mut PoolState {
        let i = self.index(key);
        &mut self.list[i]
    }

    /// The index of `key`'s pool, if there is one (none is made).
    #[inline(always)]
    fn pool_of(&self, key: &SlotKey) -> Option<usize> {
        if self
            .list
            .get(self.last)
            .is_some_and(|pool| same_key(&pool.key, key))
        {
            return Some(self.last);
        }
        self.pools.get(key).copied()
    }

    /// Grants `weight` slots of the pool at `index` under a new token if they are free and
    /// nobody waits ahead; the token, if it did.
    #[inline(always)]
    fn grant_at_once(&mut self, index: usize, weight: u32) -> Option<u64> {
        let token = self.next_token + 1;
        if !self.list[index].grant_at_once(weight, token) {
            return None;
        }
        self.next_token = token;
        Some(token)
    }

    /// The pool of `reservation`, its grant taken off those handed out, when it is one of
    /// them: its slots may go back, or be kept under a task. Else none (nothing counted for
    /// it is still counted), and the `change` that handed it back is logged once the lock is
    /// released; a reservation of no slots needs no grant.
    #[inline(always)]
    fn settle(&mut self, reservation: &Reservation, change: &'static str) -> Option<usize> {
        let index = self.pool_of(&reservation.key);
        if let Some(index) = index
            && self.list[index].settle(reservation)
        {
            return Some(index);
        }
        if reservation.weight > 0 {
            stale(reservation, change);
        }
        None
    }

    /// Files the holding of a create granted `reservation` ([`hold`](State::hold)): its slots
    /// were counted in use when granted. For a reservation no grant holds (a stale copy,
    /// settled already; of another pool; made up), nothing counted is still counted, and the
    /// task may run all the same: its slots are counted now, so that its end frees what its
    /// holding took, never a slot another create holds.
    #[inline(always)]
    fn hold_granted(
        &mut self,
        reservation: &Reservation,
        mut holding: Holding,
        out: Option<&mut Vec<Released>>,
    ) {
        if self.settle(reservation, "hold").is_none() {
            self.count_held(&reservation.key, &mut holding);
        }
        self.hold(&reservation.key, holding, true, out);
    }

    /// Counts the slots of `holding` in use in `key`'s pool (a weight past what the count
    /// holds is cut to it: the holding gives back what it added).
    #[cold]
    fn count_held(&mut self, key: &SlotKey, holding: &mut Holding) {
        let pool = self.pool_mut(key);
        holding.weight = holding.weight.min(u32::MAX - pool.in_use);
        pool.in_use += holding.weight;
        pool.publish();
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// Releases one holding (exactly once: it is removed here), and reports it in `out` unless
    /// the caller reads no report. `id_unfiled`: the caller already took its task id out of
    /// the index.
    fn release(
        &mut self,
        place: Place,
        why: Why<'_>,
        now: Instant,
        out: Option<&mut Vec<Released>>,
        id_unfiled: bool,
    ) {
        let (index, slot) = place;
        // The holding is read where it lies and then cleared, not moved out: no copy of it.
        let State {
            list,
            ids,
            externals,
            displaced,
            ..
        } = self;
        let Some(pool) = list.get_mut(index) else {
            return;
        };
        let Some(holding) = pool.holdings.get(slot).and_then(Entry::held) else {
            return;
        };
        let (weight, since) = (holding.weight, holding.since);
        if holding.displaced {
            *displaced -= 1;
        }
        if let Some(id) = &holding.id
            && !id_unfiled
        {
            ids.remove_hashed(holding.hashes[0], NO_SCOPE, id.as_bytes(), place);
        }
        if let Some(ext) = &holding.external {
            let account = scope_of(&pool.key.account);
            externals.remove_hashed(holding.hashes[1], account, ext.as_bytes(), place);
        }
        let task = out.is_some().then(|| {
            let id = holding.id.as_ref().or(holding.external.as_ref());
            id.map(|id| Arc::from(id.as_str()))
        });
        pool.clear(slot);
        pool.give_back(weight);
        let ended = !matches!(why, Why::NeverMade);
        // Tasks ending is also how slots held by others come back: one per ended task, unless
        // 1303s in a row said they are not coming back that way (`PoolState::congested`).
        if ended && pool.streak == 0 {
            pool.hidden = pool.hidden.saturating_sub(1);
        }
        pool.dispatch();
        pool.publish();
        if ended {
            let lifetime = Lifetime { since, until: now };
            pool.gauges.finished(why, lifetime);
        }
        if let Some(out) = out {
            out.push(Released {
                key: pool.key.clone(),
                task: task.flatten(),
                weight,
                held_for: now.saturating_duration_since(since),
                reason: why.reason(),
            });
        }
    }

    /// Expires leases and brings hidden slots back by time, for one pool; the leases that ran
    /// out are added to `ran_out`, for the caller to log once it releases the lock.
    fn maintain(&mut self, index: usize, now: Instant, ran_out: &mut Vec<LeaseRanOut>) {
        let interval = self.config.recovery_interval;
        let Some(pool) = self.list.get_mut(index) else {
            return;
        };
        if pool.hidden > 0 {
            let interval = pool.recovery_interval(interval);
            let elapsed = now.saturating_duration_since(pool.recovered_at);
            let steps = elapsed.as_nanos() / interval.as_nanos().max(1);
            let steps = u32::try_from(steps).unwrap_or(u32::MAX).min(pool.hidden);
            if steps > 0 {
                pool.hidden -= steps;
                pool.recovered_at = if pool.hidden == 0 {
                    now
                } else {
                    pool.recovered_at + interval * steps
                };
            }
        }
        if pool.next_lease.is_some_and(|at| at <= now) {
            let expired: Vec<usize> = pool
                .live()
                .filter(|(_, h)| h.lease_until <= now)
                .map(|(slot, _)| slot)
                .collect();
            each_completing(expired.into_iter(), |slot| {
                let pool = &self.list[index];
                if let Some(holding) = pool.holdings.get(slot).and_then(Entry::held) {
                    ran_out.push(LeaseRanOut {
                        key: pool.key.clone(),
                        id: holding.id.clone(),
                        external: holding.external.clone(),
                        weight: holding.weight,
                        held_for: now.saturating_duration_since(holding.since),
                    });
                }
                self.release((index, slot), Why::LeaseExpired, now, None, false);
            });
            let pool = &mut self.list[index];
            pool.next_lease = pool.live().map(|(_, h)| h.lease_until).min();
        }
        let pool = &mut self.list[index];
        pool.dispatch();
        pool.publish();
    }

    /// Files `holding` in the pool of `key`; `answered`: the server just made it (a create's
    /// answer, not a task adopted by a reconcile). A holding of a task already reported ended
    /// ([`Ended`]) is released at once, and the release reported in `out` unless the caller
    /// reads no report.
    fn hold(
        &mut self,
        key: &SlotKey,
        holding: Holding,
        answered: bool,
        out: Option<&mut Vec<Released>>,
    ) {
        let index = self.index(key);
        let (lease_until, hashes) = (holding.lease_until, holding.hashes);
        let pool = &mut self.list[index];
        // The head waits with no timer, or until later than this lease ends (a later lease's
        // end, or a hidden slot's return when the lease is shorter than the recovery interval):
        // it has a sooner instant to wait for now. (Read only while someone waits.)
        let sooner = !pool.queue.is_empty()
            && (!pool.has_maintenance()
                || pool
                    .next_wake(self.config.recovery_interval)
                    .is_none_or(|t| lease_until < t));
        // Only a task id proves the slots fit, not a create kept under a lease because its
        // outcome is unknown.
        let proves = answered && holding.id.is_some();
        let since = holding.since;
        let slot = pool.put(holding);
        // Nothing a gauge shows changed: the slots were counted when granted.
        pool.next_lease = Some(pool.next_lease.map_or(lease_until, |t| t.min(lease_until)));
        if sooner {
            pool.head_changed();
        }
        let place = (index, slot);
        // A task id names one task, and so does an external id within an account and a pool
        // (a create sent again goes to the same path, so to the same pool): a holding already
        // under either is this same task's earlier create, whose outcome was unknown and which
        // was sent again. It gives its slots back now instead of hiding them until its lease.
        // (External ids are filed within the account: another account's holding under the
        // same external id is another task, and stays filed. A holding of the account under
        // the external id whose task id is known (a task that runs), or in another pool (a
        // create on another path: external ids may be unique per create path only), stays
        // too, displaced from the index: see `State::displaced`.)
        let list = &self.list;
        let holding = list[index].holdings[slot].held().expect("just filed");
        let earlier = [
            holding.id.as_ref().and_then(|id| {
                let keys = &Kept(list, Which::Id);
                self.ids
                    .insert_hashed(hashes[0], NO_SCOPE, id.as_bytes(), place, keys)
            }),
            holding.external.as_ref().and_then(|ext| {
                let keys = &Kept(list, Which::External);
                let account = scope_of(&key.account);
                self.externals
                    .insert_hashed(hashes[1], account, ext.as_bytes(), place, keys)
            }),
        ];
        let [by_id, by_external] = earlier;
        if by_id.is_some() || by_external.is_some() || self.displaced > 0 {
            self.file_after_earlier(place, key, earlier, proves, since, out);
            return;
        }
        if proves {
            self.list[index].prove_level(since);
        }
        if !self.ended.is_empty() {
            self.release_if_ended(place, since, out);
        }
    }

    /// The rest of [`hold`](State::hold) for a holding filed where earlier ones of the same
    /// task may be (under its ids, or displaced): each step runs even when one before it
    /// panics (nothing under the lock calls out: metrics are recorded once it is released), so
    /// that no earlier attempt, nor a task reported ended already, keeps its slots until its
    /// lease.
    #[cold]
    fn file_after_earlier(
        &mut self,
        place: Place,
        key: &SlotKey,
        [by_id, by_external]: [Option<Place>; 2],
        proves: bool,
        since: Instant,
        mut out: Option<&mut Vec<Released>>,
    ) {
        each_completing(0..5u8, |step| match step {
            0 => {
                if let Some(old) = by_id {
                    self.supersede_other(old, place, key);
                }
            }
            1 => {
                if let Some(old) = by_external {
                    self.supersede_unknown(old, place);
                }
            }
            2 => {
                if self.displaced > 0 {
                    // Holdings under the external id that the index no longer names (another
                    // path's create took the entry after them) may be earlier attempts too:
                    // every one that fits gives its slots back, as in Redis, not only the one
                    // named last.
                    self.supersede_displaced(place);
                }
            }
            3 => {
                if proves {
                    // After the same task's earlier holding gave its slots back: what is held
                    // now.
                    self.list[place.0].prove_level(since);
                }
            }
            _ => {
                if !self.ended.is_empty() {
                    self.release_if_ended(place, since, out.take());
                }
            }
        });
    }

    /// Releases the holding just filed at `place` if a report said its task ended before
    /// (an answer overtaken by a callback or query of the task, or by `complete` naming its
    /// task id or its external id).
    #[cold]
    fn release_if_ended(&mut self, place: Place, now: Instant, out: Option<&mut Vec<Released>>) {
        let pool = &self.list[place.0];
        let Some(holding) = pool.holdings[place.1].held() else {
            return;
        };
        let by_id = holding.id.as_ref().and_then(|id| {
            self.ended
                .take(holding.hashes[0], NO_SCOPE, id.as_bytes(), now)
        });
        let status = match by_id {
            Some(status) => status,
            None => {
                let Some(ext) = &holding.external else {
                    return;
                };
                let scope = scope_of(&pool.key.account);
                if holding.id.is_some()
                    && self
                        .ended
                        .names_a_task(holding.hashes[1], scope, ext.as_bytes(), now)
                {
                    // A report of another task under the same external id (of another create
                    // path, or an id reused): this task's id was not the one it named.
                    return;
                }
                match self
                    .ended
                    .take(holding.hashes[1], scope, ext.as_bytes(), now)
                {
                    Some(status) => status,
                    None => return,
                }
            }
        };
        let why = match &status {
            Some(status) => Why::Ended(status),
            None => Why::Completed,
        };
        self.release(place, why, now, out, false);
    }

    /// Supersedes the holding at `old` if it is another one of `key`'s account.
    #[cold]
    fn supersede_other(&mut self, old: Place, place: Place, key: &SlotKey) {
        if old != place && self.list[old.0].key.account == key.account {
            self.supersede(old);
        }
    }

    /// Supersedes the holding at `old`, found under the external id of the holding just filed
    /// at `place` (in the same account: the index files external ids within it), if it is in
    /// the same pool and its task id is unknown (a create of unknown outcome, sent again); else
    /// it stays, displaced from the index. One whose task id an answer or report gave is a task
    /// that runs until it is reported ended: a create under its external id again (the caller
    /// reused it, the server made another task) does not end it, unless a reconcile adopted it
    /// in a pool of the same product and this create's task id is unknown (see below). One in
    /// another pool is otherwise another create path's create (external ids may be unique per
    /// create path only).
    #[cold]
    fn supersede_unknown(&mut self, old: Place, place: Place) {
        if old == place {
            return;
        }
        if old.0 == place.0 && !self.has_task_id(old) && self.same_path(old, place) {
            self.supersede(old);
            return;
        }
        let product = |index: usize| self.list[index].key.pool.product();
        if product(old.0) == product(place.0)
            && self.is_adopted(old)
            && !self.has_task_id(place)
            && self.same_path(old, place)
        {
            // A task a reconcile listed under this external id, and now a create under it
            // whose outcome is unknown (its answer lost after the list named the task): the
            // same task, as an adopt finds such a create's holding the other way round (of
            // the path it was listed on, where known). The create's holding takes its task
            // id, so the task's end frees it. Of the same product, in any of its pools: a
            // list does not say the model, so the plan's pool may be another model's.
            self.take_over(old, place);
            return;
        }
        if let Some(holding) = self
            .list
            .get_mut(old.0)
            .and_then(|pool| pool.holdings.get_mut(old.1))
            .and_then(|entry| entry.held.as_mut())
            && !holding.displaced
        {
            holding.displaced = true;
            self.displaced += 1;
        }
    }

    /// Supersedes every displaced holding ([`Holding::displaced`]) of the pool of the holding
    /// just filed at `place` under its external id, whose task id is unknown and which may
    /// have been sent to its create path: earlier attempts of the same create, as
    /// [`supersede_unknown`](State::supersede_unknown) finds the one the index names. (One
    /// account may hold several creates under one external id, on several paths; a create of
    /// a path not known may be an attempt of any of them.)
    #[cold]
    fn supersede_displaced(&mut self, place: Place) {
        let pool = &self.list[place.0];
        let Some(new) = pool.holdings[place.1].held() else {
            return;
        };
        let Some(ext) = new.external.as_ref().map(SmallId::as_bytes) else {
            return;
        };
        let earlier: Vec<usize> = pool
            .live()
            .filter(|&(slot, old)| {
                slot != place.1
                    && old.displaced
                    && old.id.is_none()
                    && old.path.may_be(new.path)
                    && old.external.as_ref().map(SmallId::as_bytes) == Some(ext)
            })
            .map(|(slot, _)| slot)
            .collect();
        // Every one, even should one panic: the rest would otherwise hide theirs until their
        // lease.
        each_completing(earlier.into_iter(), |slot| self.supersede((place.0, slot)));
    }

    /// Drops a holding that a newer one of the same task replaces: its slots go back, and it
    /// counts as no finished task.
    fn supersede(&mut self, place: Place) {
        let Some(pool) = self.list.get_mut(place.0) else {
            return;
        };
        let Some(old) = pool.take(place.1) else {
            return;
        };
        if old.displaced {
            self.displaced -= 1;
        }
        pool.give_back(old.weight);
        pool.dispatch();
        pool.publish();
        if let Some(id) = &old.id {
            self.ids
                .remove_hashed(old.hashes[0], NO_SCOPE, id.as_bytes(), place);
        }
        if let Some(ext) = &old.external {
            let account = scope_of(&self.list[place.0].key.account);
            self.externals
                .remove_hashed(old.hashes[1], account, ext.as_bytes(), place);
        }
    }

    /// Where the task a report of `account` names is held: by id (unless the caller looked
    /// already), else by external id within `account` ([`by_external`](State::by_external):
    /// for a report that names a task id, or a lookup that found none, only a holding whose
    /// task id is unknown; for `complete`'s text, any).
    #[allow(clippy::too_many_arguments)]
    fn find(
        &self,
        account: &AccountId,
        path: ReportPath<'_>,
        id: &str,
        hash: u64,
        external: Option<&str>,
        by_complete: bool,
        id_looked_up: bool,
    ) -> Option<Place> {
        let list = &self.list;
        if !id_looked_up
            && let Some(place) =
                self.ids
                    .get_hashed(hash, NO_SCOPE, id.as_bytes(), &Kept(list, Which::Id))
        {
            return Some(place);
        }
        if external.is_none() && !by_complete {
            return None;
        }
        // Read only for a lookup by external id.
        let path = path.create_path();
        // `complete`'s text (no status, not empty) may be a task id or an external id: a
        // holding known by another task id may be the one it names. Any other report names
        // a task id (or, empty, none: a lookup that found nothing), which a holding known by
        // its task id was not found by: another task.
        let any = by_complete && !id.is_empty();
        if let Some(ext) = external
            && let Some(place) = self.by_external(account, path, ext, false)
        {
            return Some(place);
        }
        if by_complete {
            // `complete` may name a task by its external id.
            return self.by_external(account, path, id, any);
        }
        None
    }

    /// The one holding of `account` a report of a task created on `path` may name by the
    /// external id `ext` alone: one whose task id is unknown (a create of unknown outcome), or
    /// (`any`) any, sent to that path (when both are known). External ids may be unique per
    /// create path only (the mock's rule; a legacy task is looked up at
    /// `{create path}/{external id}`), and a callback or `complete` names no path: when two
    /// such holdings carry `ext` (creates on two paths), it names neither, so that it never
    /// ends the wrong one (each still ends by its task id, a report of its path, or its
    /// lease).
    fn by_external(
        &self,
        account: &AccountId,
        path: CreatePath,
        ext: &str,
        any: bool,
    ) -> Option<Place> {
        let fits = |holding: &Holding| (any || holding.id.is_none()) && holding.path.may_be(path);
        if self.displaced == 0 {
            // The index names the only holding of the account under `ext`.
            let list = &self.list;
            let keys = &Kept(list, Which::External);
            let place = self
                .externals
                .get(scope_of(account), ext.as_bytes(), keys)?;
            let holding = list[place.0].holdings[place.1].held()?;
            return fits(holding).then_some(place);
        }
        self.by_external_among_all(account, ext, fits)
    }

    /// The holdings of `key`'s account and product under the external id `ext` that a task a
    /// reconcile listed in `key`'s pool, on `path`, may be: one whose task id is unknown, or
    /// (`any`) any. Whether there is one, and where, when there is exactly one. A holding of
    /// another product (an image create, for a video task), or of another known path (an
    /// image2video create, for a task a text2video list names), is another create path's
    /// create: external ids may be unique per create path only. (Another model's pool of the
    /// product may be the task's: a list does not say its model.)
    fn listed_by_external(
        &self,
        key: &SlotKey,
        path: CreatePath,
        ext: &str,
        any: bool,
    ) -> (bool, Option<Place>) {
        let product = key.pool.product();
        let fits = |holding: &Holding| (any || holding.id.is_none()) && holding.path.may_be(path);
        if self.displaced == 0 {
            // The index names the only holding of the account under `ext`.
            let keys = &Kept(&self.list, Which::External);
            let place = self
                .externals
                .get(scope_of(&key.account), ext.as_bytes(), keys)
                .filter(|&(index, slot)| {
                    let pool = &self.list[index];
                    pool.key.pool.product() == product
                        && pool.holdings[slot].held().is_some_and(fits)
                });
            return (place.is_some(), place);
        }
        let mut found = self
            .list
            .iter()
            .enumerate()
            .filter(|(_, pool)| {
                pool.key.account == key.account && pool.key.pool.product() == product
            })
            .flat_map(|(index, pool)| pool.live().map(move |(slot, held)| ((index, slot), held)))
            .filter(|(_, holding)| {
                holding
                    .external
                    .as_ref()
                    .is_some_and(|own| own.as_bytes() == ext.as_bytes())
                    && fits(holding)
            });
        match (found.next(), found.next()) {
            (Some((place, _)), None) => (true, Some(place)),
            (first, _) => (first.is_some(), None),
        }
    }

    /// [`by_external`](State::by_external) while holdings are displaced from the index: every
    /// holding of the account is looked at.
    #[cold]
    fn by_external_among_all(
        &self,
        account: &AccountId,
        ext: &str,
        fits: impl Fn(&Holding) -> bool,
    ) -> Option<Place> {
        let mut found = None;
        for (index, pool) in self.list.iter().enumerate() {
            if pool.key.account != *account {
                continue;
            }
            for (slot, holding) in pool.live() {
                if holding
                    .external
                    .as_ref()
                    .is_some_and(|own| own.as_bytes() == ext.as_bytes())
                    && fits(holding)
                {
                    if found.is_some() {
                        // Two creates under `ext`: which one the report names is unknown.
                        return None;
                    }
                    found = Some((index, slot));
                }
            }
        }
        found
    }

    /// Whether the holdings at `a` and `b` may be creates sent to the same path.
    #[cold]
    fn same_path(&self, a: Place, b: Place) -> bool {
        let path = |(index, slot): Place| {
            self.list[index].holdings[slot]
                .held()
                .map_or(CreatePath::UNKNOWN, |holding| holding.path)
        };
        path(a).may_be(path(b))
    }

    /// Whether the holding at `place` was adopted by a reconcile.
    #[cold]
    fn is_adopted(&self, place: Place) -> bool {
        self.list
            .get(place.0)
            .and_then(|pool| pool.holdings.get(place.1))
            .and_then(Entry::held)
            .is_some_and(|holding| holding.adopted)
    }

    /// The holding just filed at `place`, of unknown task id, takes the task id of the
    /// adopted holding at `old` (the same task), which gives its slots back.
    #[cold]
    fn take_over(&mut self, old: Place, place: Place) {
        let Some((id, hash)) = self.list[old.0].holdings[old.1]
            .held()
            .and_then(|held| Some((held.id.clone()?, held.hashes[0])))
        else {
            return;
        };
        let Some(new) = self.list[place.0].holdings[place.1].held.as_mut() else {
            return;
        };
        new.id = Some(id);
        new.hashes[0] = hash;
        let list = &self.list;
        let id = list[place.0].holdings[place.1]
            .held()
            .and_then(|held| held.id.as_ref())
            .expect("just set");
        // Filed under the task id in place of the adopted holding, which `supersede` then
        // leaves filed under neither id.
        self.ids
            .insert_hashed(hash, NO_SCOPE, id.as_bytes(), place, &Kept(list, Which::Id));
        self.supersede(old);
    }

    /// Whether the holding at `place` knows its task id.
    #[cold]
    fn has_task_id(&self, place: Place) -> bool {
        self.list
            .get(place.0)
            .and_then(|pool| pool.holdings.get(place.1))
            .and_then(Entry::held)
            .is_some_and(|holding| holding.id.is_some())
    }

    /// One report of a task: a terminal status releases it, a running one renews its lease.
    /// A report with no task id (a lookup by external id that found nothing) ends only a
    /// holding whose task id is unknown: a create of unknown outcome.
    /// `hash`: the [`IdHash`] of `id` (computed before the lock where the caller can).
    fn report(
        &mut self,
        id: &str,
        hash: u64,
        external: Option<&str>,
        status: Option<&TaskStatus>,
        reports: &mut Reports<'_>,
    ) {
        let terminal = status.is_none_or(TaskStatus::is_terminal);
        // A task that ended and is known by its id (the usual query) is found and unfiled in
        // one lookup.
        let taken = if terminal {
            let keys = &Kept(&self.list, Which::Id);
            self.ids.take_hashed(hash, NO_SCOPE, id.as_bytes(), keys)
        } else {
            None
        };
        let by_complete = status.is_none();
        let Some(mut place) = taken.or_else(|| {
            let (account, path) = (reports.account, reports.path);
            self.find(account, path, id, hash, external, by_complete, terminal)
        }) else {
            // (An empty id is no task's: a lookup that found nothing under an external id.)
            if terminal && reports.note_ends && !id.is_empty() {
                // The create's answer may still come (a callback can overtake it): its
                // holding is released when it does.
                let now = *reports.now.get_or_insert_with(Instant::now);
                match status {
                    Some(status) => {
                        let external = external
                            .filter(|ext| !ext.is_empty())
                            .map(|ext| (reports.account, ext));
                        self.ended
                            .note(hash, id, external, status, now, reports.lease);
                    }
                    // `complete`, by task id or by an external id of the account.
                    None => {
                        let account = reports.account;
                        self.ended
                            .note_either(hash, id, account, now, reports.lease);
                    }
                }
            }
            return;
        };
        if id.is_empty() && self.has_task_id(place) {
            // A lookup by external id that found nothing (a legacy query on another create
            // path, a lookup the server has not indexed yet) says nothing of a task whose id
            // its create's answer (or a report) gave: it exists, and may still run.
            return;
        }
        let mut id_unfiled = taken.is_some();
        if let Some(ext) = external.filter(|ext| !ext.is_empty() && !id.is_empty())
            && self.is_adopted_without_external(place)
        {
            (place, id_unfiled) = self.join_listed(place, id, hash, ext, reports, id_unfiled);
        }
        let now = *reports.now.get_or_insert_with(Instant::now);
        let (lease, applied) = (reports.lease, &mut reports.applied);
        applied.changed = true;
        if terminal {
            // A reconcile's list, answered before this end (maybe read before the reconcile
            // began: the server's list may run behind), may name the task as running.
            self.note_released_end(place, id, hash, status, now, lease);
            let why = match status {
                Some(status) => Why::Ended(status),
                // (An empty id: a lookup by external id that found no task.)
                None if id.is_empty() => Why::NeverMade,
                None => Why::Completed,
            };
            let out = (!reports.unread).then_some(&mut applied.released);
            self.release(place, why, now, out, id_unfiled);
            return;
        }
        // Still running: renew the lease, and learn the task id of a create whose outcome was
        // unknown.
        self.running(place, id, hash, now, lease);
    }

    /// The task held at `place` (of id `id`, of [`IdHash`] `hash`) was reported running at
    /// `now`: its lease runs `lease` from now, and a holding of unknown task id learns `id`.
    fn running(&mut self, place: Place, id: &str, hash: u64, now: Instant, lease: Duration) {
        let Some(pool) = self.list.get_mut(place.0) else {
            return;
        };
        let Some(holding) = pool
            .holdings
            .get_mut(place.1)
            .and_then(|entry| entry.held.as_mut())
        else {
            return;
        };
        let lease_until = lease_end(now, lease);
        // Usually renewed later: `next_lease`, below the old lease, stays below the new one,
        // and is not read (it lies on the pool's line that creates on other threads write).
        let shorter = lease_until < holding.lease_until;
        holding.lease_until = lease_until;
        // (An empty id is no task's.)
        let learns = holding.id.is_none() && !id.is_empty();
        if learns {
            holding.id = Some(SmallId::new(id));
            holding.hashes[0] = hash;
        }
        if shorter && pool.next_lease.is_none_or(|at| lease_until < at) {
            // Renewed to end sooner than any lease the pool's timer waits for (a shorter
            // lease than its hold's): it must end then, not when that one does.
            pool.lease_sooner(lease_until, self.config.recovery_interval);
        }
        if learns {
            // Known by its task id from now on (an older holding filed under the same id, in
            // another account, is no longer found by it).
            let keys = &Kept(&self.list, Which::Id);
            self.ids
                .insert_hashed(hash, NO_SCOPE, id.as_bytes(), place, keys);
        }
    }

    /// Whether the holding at `place` was adopted by a reconcile whose list did not give its
    /// external id.
    fn is_adopted_without_external(&self, place: Place) -> bool {
        self.list
            .get(place.0)
            .and_then(|pool| pool.holdings.get(place.1))
            .and_then(Entry::held)
            .is_some_and(|holding| holding.adopted && holding.external.is_none())
    }

    /// A report of the task `id` under the external id `ext` found, by its task id, the
    /// holding at `place` that a reconcile adopted from a list that did not give its external
    /// id. A create of unknown outcome of the same product that its account holds under `ext`
    /// (its answer lost) is that same task, held twice: the create's holding takes the task id
    /// and the adopted one gives its slots back, as [`take_over`](State::take_over) does when
    /// the create's holding comes second. Returns where the task is held now, and whether its
    /// task id is out of the index (`unfiled`: the report took it out).
    #[cold]
    fn join_listed(
        &mut self,
        place: Place,
        id: &str,
        hash: u64,
        ext: &str,
        reports: &Reports<'_>,
        unfiled: bool,
    ) -> (Place, bool) {
        // Among creates of the path the task was listed on, where known (else the report's):
        // one of another path is another task, whose external id may be the same.
        let listed_on = self.list[place.0].holdings[place.1]
            .held()
            .map_or(CreatePath::UNKNOWN, |holding| holding.path);
        let path = match listed_on {
            CreatePath::UNKNOWN => reports.path.create_path(),
            listed_on => listed_on,
        };
        let Some(create) = self.by_external(reports.account, path, ext, false) else {
            return (place, unfiled);
        };
        // Of the same account and product: a create of another product is another create
        // path's, whose external ids may be the same.
        let (created, listed) = (&self.list[create.0].key, &self.list[place.0].key);
        if create == place
            || created.account != listed.account
            || created.pool.product() != listed.pool.product()
        {
            return (place, unfiled);
        }
        let Some(held) = self.list[create.0].holdings[create.1].held.as_mut() else {
            return (place, unfiled);
        };
        held.id = Some(SmallId::new(id));
        held.hashes[0] = hash;
        // Filed under the task id in place of the adopted holding, which `supersede` then
        // leaves filed under neither id.
        let keys = &Kept(&self.list, Which::Id);
        self.ids
            .insert_hashed(hash, NO_SCOPE, id.as_bytes(), create, keys);
        self.supersede(place);
        (create, false)
    }

    /// Notes the end of the task held at `place`, which a report (of `id`, of [`IdHash`]
    /// `hash`) is about to release, by its task id: the holding's, else the report's (a
    /// report's id is a task id; `complete`'s may be an external id, and then notes nothing),
    /// as the Redis backend files every end it releases in `P:ended` ([`Freed`]): an
    /// [`Adopt`](SlotOp::Adopt) of it, from a list the server answered before the end, holds
    /// nothing, whenever the reconcile began.
    fn note_released_end(
        &mut self,
        place: Place,
        id: &str,
        hash: u64,
        status: Option<&TaskStatus>,
        now: Instant,
        keep: Duration,
    ) {
        let State {
            list, freed, ended, ..
        } = self;
        let Some(holding) = list
            .get(place.0)
            .and_then(|pool| pool.holdings.get(place.1))
            .and_then(Entry::held)
        else {
            return;
        };
        match &holding.id {
            Some(own) => {
                freed.note(holding.hashes[0], own.clone(), now, keep);
                if holding.adopted {
                    // Listed before its create's answer came, that answer may still come:
                    // remembered where it looks, it releases what it keeps at once (rare:
                    // only adopted tasks are noted so). By its external id too, when it has
                    // one: that answer may be lost, and the create then kept under it alone.
                    let account = &list[place.0].key.account;
                    match (status, &holding.external) {
                        (Some(status), Some(ext)) => {
                            let external = Some((account, ext.as_str()));
                            let hash = holding.hashes[0];
                            ended.note(hash, own.as_str(), external, status, now, keep);
                        }
                        _ => ended.note_task(holding.hashes[0], own.as_str(), status, now, keep),
                    }
                }
            }
            None if status.is_some() && !id.is_empty() => {
                freed.note(hash, SmallId::new(id), now, keep);
            }
            None => {}
        }
    }

    /// Applies one change; with `unread`, releases are not listed in the result. `now`: the
    /// time read before the lock, for reports.
    fn apply(&mut self, op: SlotOp, now: Option<Instant>, unread: bool) -> Applied {
        self.apply_on(op, now, unread, CreatePath::UNKNOWN)
    }

    /// [`apply`](State::apply) of a change whose reports are of tasks created on `path`.
    fn apply_on(
        &mut self,
        op: SlotOp,
        now: Option<Instant>,
        unread: bool,
        path: CreatePath,
    ) -> Applied {
        let mut applied = Applied::default();
        match op {
            SlotOp::GiveBack(res) => {
                // Only a grant handed out and not yet settled frees slots: a stale copy or a
                // made-up reservation would let creates in past the pool's limit.
                if let Some(index) = self.settle(&res, "give back") {
                    let pool = &mut self.list[index];
                    pool.give_back(res.weight);
                    pool.dispatch();
                    pool.publish();
                    applied.changed = true;
                }
            }
            SlotOp::Hold {
                reservation,
                task,
                lease,
            } => {
                let key = &reservation.key;
                let holding = Holding::of(
                    task,
                    &key.account,
                    reservation.weight,
                    Instant::now(),
                    lease,
                );
                let out = (!unread).then_some(&mut applied.released);
                self.hold_granted(&reservation, holding, out);
                applied.changed = true;
            }
            SlotOp::Congested(res) => {
                let last_token = self.next_token;
                // A stale one was counted when its grant was settled (or never was one).
                let Some(index) = self.settle(&res, "1303") else {
                    return applied;
                };
                let pool = &mut self.list[index];
                pool.give_back(res.weight);
                pool.congested(res.weight, res.token, last_token, Instant::now());
                pool.dispatch();
                // The head may sleep until a later instant (a lease of ours ending) or with no
                // timer: the slots just hidden come back by time, maybe sooner. (A 1303 is
                // rare; this is one wake.)
                pool.head_changed();
                pool.publish();
                applied.changed = true;
            }
            SlotOp::Halt { reservation, cause } => {
                let account = reservation.key.account.clone();
                // Halted whatever the reservation: the server refused the account.
                self.halted.insert(account.clone(), cause);
                let settled = self.settle(&reservation, "halt");
                if let Some(index) = settled {
                    self.list[index].give_back(reservation.weight);
                }
                // Wake the account's waiters: they fail with `Halted`.
                for pool in &mut self.list {
                    if pool.key.account == account {
                        for waker in pool.queue.iter().filter_map(|w| w.waker.as_ref()) {
                            waker.wake_by_ref();
                        }
                    }
                }
                applied.changed = true;
                if let Some(index) = settled {
                    self.list[index].publish();
                }
            }
            SlotOp::Observed {
                account,
                outcome,
                lease,
            } => {
                let mut reports = Reports::new(&account, lease, now, unread, outcome.tasks().len());
                reports.path = ReportPath::Known(path);
                each_completing(outcome.tasks().iter(), |task| {
                    let (ext, status) = (task.external_id.as_deref(), Some(&task.status));
                    let hash = IdHash::hash(task.id.as_bytes());
                    self.report(&task.id, hash, ext, status, &mut reports);
                });
                applied = reports.applied;
            }
            SlotOp::Update {
                account,
                updates,
                lease,
            } => {
                let mut reports = Reports::new(&account, lease, now, unread, updates.len());
                reports.path = ReportPath::Known(path);
                each_completing(updates.iter(), |update| {
                    let (ext, status) = (update.external_id.as_deref(), update.status.as_ref());
                    let hash = IdHash::hash(update.id.as_bytes());
                    self.report(&update.id, hash, ext, status, &mut reports);
                });
                applied = reports.applied;
            }
            SlotOp::Adopt {
                key,
                task,
                weight,
                lease,
            } => {
                let list = &self.list;
                let account = scope_of(&key.account);
                let now = Instant::now();
                // (An empty id is no task's, and filed nowhere.)
                let id = task.id.as_deref().filter(|id| !id.is_empty());
                // Held, or reported ended already (the server's list ran behind the report).
                // By its external id: a holding whose task id is unknown may be it; one known
                // by another task id is another task (of another create path, whose external
                // ids may be the same), and so is an end a report of another task id told.
                let known_by_id = id.is_some_and(|id| {
                    let (id, hash) = (id.as_bytes(), IdHash::hash(id.as_bytes()));
                    self.ids.contains(NO_SCOPE, id, &Kept(list, Which::Id))
                        || (self.ended.get(hash, NO_SCOPE, id, now)).is_some()
                        || self.freed.contains(hash, id, now)
                });
                // By its external id, only a holding of the listed task's product and list
                // path: one of another is another create path's create.
                let (held_by_external, listed) =
                    task.external_id.as_deref().map_or((false, None), |ext| {
                        self.listed_by_external(&key, path, ext, id.is_none())
                    });
                let known = known_by_id
                    || held_by_external
                    || task.external_id.as_deref().is_some_and(|ext| {
                        let hash = hash_in::<IdHash>(account, ext.as_bytes());
                        let (ext_bytes, any) = (ext.as_bytes(), id.is_none());
                        self.ended.get(hash, account, ext_bytes, now).is_some()
                            && (any || !self.ended.names_a_task(hash, account, ext_bytes, now))
                    });
                if let (false, Some(id), Some(place)) = (known_by_id, id, listed) {
                    // Held under its external id alone (a create whose answer was lost): the
                    // list names its task id, learnt as a report of the task running teaches
                    // it, so that an end told by task id alone (`complete`, a callback without
                    // the external id) frees it.
                    let hash = IdHash::hash(id.as_bytes());
                    self.running(place, id, hash, now, lease);
                }
                if !known {
                    let pool = self.pool_mut(&key);
                    // (A weight past what the count holds is cut to it: the holding gives back
                    // what it added.)
                    let weight = weight.min(u32::MAX - pool.in_use);
                    pool.in_use += weight;
                    let mut holding = Holding::of(task, &key.account, weight, now, lease);
                    holding.adopted = true;
                    // Of the path it was listed on: a create or report of another path under
                    // its external id is another task.
                    holding.path = path;
                    self.hold(&key, holding, false, None);
                    self.pool_mut(&key).publish();
                    applied.changed = true;
                }
            }
            SlotOp::SetCapacity {
                account,
                pool,
                capacity,
            } => {
                match &account {
                    Some(account) => {
                        self.config
                            .accounts
                            .insert((account.clone(), pool.clone()), capacity);
                    }
                    None => {
                        self.config.pools.insert(pool.clone(), capacity);
                    }
                }
                let config = &self.config;
                let matches = |state: &PoolState| {
                    let key = &state.key;
                    account.as_ref().is_none_or(|a| *a == key.account)
                        && (key.pool == pool
                            || (pool.model().is_none() && key.pool.product() == pool.product()))
                };
                for state in self.list.iter_mut().filter(|state| matches(state)) {
                    let key = &state.key;
                    let configured = config.capacity_of(&key.account, &key.pool);
                    applied.changed |= configured != state.configured;
                    state.configured = configured;
                    state.hidden = state.hidden.min(configured);
                    // What earlier 1303s said about the old capacity is no evidence now.
                    state.end_streak(Instant::now());
                    // Waiters the new capacity can never serve fail now rather than hold
                    // up those behind them.
                    state.refuse_heavier(configured);
                    state.dispatch();
                }
                for state in self.list.iter_mut().filter(|state| matches(state)) {
                    state.publish();
                }
            }
            SlotOp::ResetHalt(account) => {
                applied.changed = self.halted.remove(&account).is_some();
            }
        }
        applied
    }
}

/// How many of a response's task ids [`InProcess::observe_unread`] hashes before it takes the
/// lock (the rest are hashed under it).
const PREHASHED: usize = 4;

/// The time reports renew leases from, read before the lock is taken (the clock stays out of
/// the critical section); `None` for changes that report no task.
fn report_time(op: &SlotOp) -> Option<Instant> {
    match op {
        SlotOp::Observed { outcome, .. } if !outcome.tasks().is_empty() => Some(Instant::now()),
        SlotOp::Update { updates, .. } if !updates.is_empty() => Some(Instant::now()),
        _ => None,
    }
}

impl InProcess {
    /// The reports of `outcome`, an answer to a request of `account` for tasks created on
    /// `path`, read in place under one lock (none when it reports no task); of a list page
    /// (`list`), an end that finds no holding is not remembered.
    #[inline]
    fn observe(
        &self,
        account: &AccountId,
        outcome: &Outcome,
        lease: Duration,
        path: ReportPath<'_>,
        list: bool,
    ) -> Ready<Result<Applied, BackendError>> {
        let tasks = outcome.tasks();
        if tasks.is_empty() {
            return ready(Ok(Applied::default()));
        }
        // The answer's arrival is the time its reports speak of: no clock read.
        let mut reports = Reports::new(
            account,
            lease,
            Some(outcome.received_at()),
            true,
            tasks.len(),
        );
        reports.path = path;
        reports.note_ends &= !list;
        // The ids are hashed before the lock is taken (the first few: a query reports one).
        let mut hashes = [0; PREHASHED];
        for (hash, task) in hashes.iter_mut().zip(tasks) {
            *hash = IdHash::hash(task.id.as_bytes());
        }
        let mut state = self.lock();
        each_completing(tasks.iter().enumerate(), |(i, task)| {
            let (ext, status) = (task.external_id.as_deref(), Some(&task.status));
            let hash = match hashes.get(i) {
                Some(&hash) => hash,
                None => IdHash::hash(task.id.as_bytes()),
            };
            state.report(&task.id, hash, ext, status, &mut reports);
        });
        drop(state);
        after_unlock(&[], || {});
        ready(Ok(reports.applied))
    }
}

impl SlotBackend for InProcess {
    type Acquire = InProcessAcquire;
    type Apply = Ready<Result<Applied, BackendError>>;
    type Snapshot = Ready<Result<Vec<PoolSnapshot>, BackendError>>;

    fn acquire(&self, key: SlotKey, weight: u32) -> InProcessAcquire {
        InProcessAcquire {
            shared: self.shared.clone(),
            key: Some(key),
            weight,
            token: None,
            sleep: None,
        }
    }

    /// Grants under one lock, with no future built (no `Arc` clone), when slots are free,
    /// nobody waits and no account is halted; otherwise the first poll of
    /// [`acquire`](SlotBackend::acquire), which decides it all again.
    fn acquire_now(
        &self,
        key: SlotKey,
        weight: u32,
    ) -> Result<Result<Reservation, AcquireError>, InProcessAcquire> {
        {
            let mut state = self.lock();
            if state.halted.is_empty() {
                let index = state.index(&key);
                // (A create heavier than its pool never fits in `free`: the slow path refuses it.)
                if let Some(token) = state.grant_at_once(index, weight) {
                    drop(state);
                    let reservation = Reservation { key, weight, token };
                    after_unlock(&[], || give_back_unreceived(&self.shared, &reservation));
                    return Ok(Ok(reservation));
                }
            }
        }
        let mut acquire = self.acquire(key, weight);
        match Pin::new(&mut acquire).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(result) => Ok(result),
            Poll::Pending => Err(acquire),
        }
    }

    fn apply(&self, op: SlotOp) -> Self::Apply {
        let now = report_time(&op);
        let _count = self.halted(matches!(op, SlotOp::Halt { .. }));
        let applied = self.lock().apply(op, now, false);
        after_unlock(&[], || {});
        ready(Ok(applied))
    }

    /// As [`apply`](SlotBackend::apply), without building the list of released tasks (no
    /// allocation on the layer's create + query path).
    fn apply_unread(&self, op: SlotOp) -> Self::Apply {
        let now = report_time(&op);
        let _count = self.halted(matches!(op, SlotOp::Halt { .. }));
        let applied = self.lock().apply(op, now, true);
        after_unlock(&[], || {});
        ready(Ok(applied))
    }

    /// As `apply_unread`, a task reported found by external id among the holdings of creates
    /// sent to `path` (or to a path not known) only.
    fn apply_unread_on(&self, op: SlotOp, path: CreatePath) -> Self::Apply {
        let now = report_time(&op);
        let _count = self.halted(matches!(op, SlotOp::Halt { .. }));
        let applied = self.lock().apply_on(op, now, true, path);
        after_unlock(&[], || {});
        ready(Ok(applied))
    }

    /// As `apply`, a listed task taken by its external id for a holding of `path` (or of a
    /// path not known) only, and kept with that path.
    fn adopt_on(&self, op: SlotOp, path: CreatePath) -> Self::Apply {
        let now = report_time(&op);
        let _count = self.halted(matches!(op, SlotOp::Halt { .. }));
        let applied = self.lock().apply_on(op, now, false, path);
        after_unlock(&[], || {});
        ready(Ok(applied))
    }

    /// Its halts: a create granted before one is refused by the classify step, unsent, while
    /// its account stays halted.
    fn create_halts(&self) -> Option<Arc<CreateHalts>> {
        Some(self.halts.clone())
    }

    /// As `apply_unread` of [`SlotOp::Hold`], the ids copied inline (no allocation for ids up
    /// to 38 bytes).
    fn hold_unread(
        &self,
        reservation: Reservation,
        id: Option<&str>,
        external_id: Option<&str>,
        lease: Duration,
        answered_at: Option<Instant>,
    ) -> Self::Apply {
        self.hold_unread_on(
            reservation,
            id,
            external_id,
            lease,
            answered_at,
            CreatePath::UNKNOWN,
        )
    }

    /// As `hold_unread`, the holding found by external id only by a report of a task created
    /// on `path` (or on a path not known).
    fn hold_unread_on(
        &self,
        reservation: Reservation,
        id: Option<&str>,
        external_id: Option<&str>,
        lease: Duration,
        answered_at: Option<Instant>,
        path: CreatePath,
    ) -> Self::Apply {
        // An empty id is none (as `Holding::of` reads it): answers may echo `""`.
        let id = id.filter(|id| !id.is_empty());
        let external_id = external_id.filter(|ext| !ext.is_empty());
        let (id, external) = (id.map(SmallId::new), external_id.map(SmallId::new));
        let now = answered_at.unwrap_or_else(Instant::now);
        let account = &reservation.key.account;
        let weight = reservation.weight;
        let holding = Holding::new(id, external, account, weight, now, lease, path);
        self.lock().hold_granted(&reservation, holding, None);
        after_unlock(&[], || {});
        ready(Ok(Applied {
            released: Vec::new(),
            changed: true,
        }))
    }

    /// As `apply_unread` of [`SlotOp::Observed`], with no change built or matched: the
    /// reports are read from the outcome in place, under one lock (none when it reports no
    /// task).
    fn observe_unread(
        &self,
        account: &AccountId,
        outcome: &Outcome,
        lease: Duration,
    ) -> Self::Apply {
        self.observe_unread_on(account, outcome, lease, CreatePath::UNKNOWN)
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
        self.observe_unread_of(account, outcome, lease, ReportPath::Known(path))
    }

    /// As `observe_unread_on`, the path read only for a task not found by its task id.
    fn observe_unread_of(
        &self,
        account: &AccountId,
        outcome: &Outcome,
        lease: Duration,
        path: ReportPath<'_>,
    ) -> Self::Apply {
        self.observe(account, outcome, lease, path, false)
    }

    /// As `observe_unread_on`, an end of a task not held here never remembered.
    fn observe_list_on(
        &self,
        account: &AccountId,
        outcome: &Outcome,
        lease: Duration,
        path: CreatePath,
    ) -> Self::Apply {
        self.observe(account, outcome, lease, ReportPath::Known(path), true)
    }

    fn snapshot(&self) -> Self::Snapshot {
        let mut state = self.lock();
        let now = Instant::now();
        let count = state.list.len();
        let mut ran_out = Vec::new();
        let mut pools = Vec::with_capacity(count);
        for index in 0..count {
            state.maintain(index, now, &mut ran_out);
            let pool = &state.list[index];
            pools.push(PoolSnapshot {
                in_use: pool.in_use,
                capacity: pool.capacity(),
                configured: pool.configured,
                waiters: pool.waiting(),
                tasks: pool.tasks,
                key: pool.key.clone(),
            });
        }
        drop(state);
        after_unlock(&ran_out, || {});
        pools.sort_by(|a, b| a.key.cmp(&b.key));
        ready(Ok(pools))
    }
}

/// The future of [`InProcess::acquire`]: grants at once when it can, else waits in the pool's
/// FIFO queue. Dropping it holds nothing.
pub struct InProcessAcquire {
    shared: Arc<Mutex<State>>,
    key: Option<SlotKey>,
    weight: u32,
    /// Set once the future joined the queue.
    token: Option<u64>,
    /// Until lazy maintenance has work; only while this waiter is its queue's head.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl fmt::Debug for InProcessAcquire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InProcessAcquire")
            .field("key", &self.key)
            .field("weight", &self.weight)
            .field("queued", &self.token.is_some())
            .finish()
    }
}

impl InProcessAcquire {
    fn halted(state: &State, key: &SlotKey) -> Option<AcquireError> {
        if state.halted.is_empty() {
            return None;
        }
        state
            .halted
            .get(&key.account)
            .map(|cause| AcquireError::Halted(Halted::new(key.account.clone(), cause.clone())))
    }
}

impl Future for InProcessAcquire {
    type Output = Result<Reservation, AcquireError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut ran_out = Vec::new();
        let poll = self.poll_locked(cx, &mut ran_out);
        // The lock is released: a slow subscriber or recorder holds up no other create or
        // query.
        after_unlock(&ran_out, || {
            if let Poll::Ready(Ok(granted)) = &poll {
                give_back_unreceived(&self.shared, granted);
            }
        });
        poll
    }
}

impl InProcessAcquire {
    /// [`poll`](Future::poll) under the lock, which is released on return; the leases that
    /// ran out meanwhile are added to `ran_out`.
    fn poll_locked(
        &mut self,
        cx: &mut Context<'_>,
        ran_out: &mut Vec<LeaseRanOut>,
    ) -> Poll<Result<Reservation, AcquireError>> {
        let this = self;
        let Some(key) = this.key.as_ref() else {
            panic!("InProcessAcquire polled after completion");
        };
        let mut state = this.shared.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(err) = Self::halted(&state, key) {
                if let Some(token) = this.token.take() {
                    let pool = state.pool_mut(key);
                    pool.leave(token, this.weight);
                    pool.dispatch();
                    pool.publish();
                }
                this.key = None;
                return Poll::Ready(Err(err));
            }
            let weight = this.weight;
            let token = match this.token {
                None => {
                    let token = state.token();
                    let max_queue = state.config.max_queue;
                    let index = state.index(key);
                    let pool = &mut state.list[index];
                    if pool.configured > 0 && weight > pool.configured {
                        let err = OverCapacity::new(key.pool.clone(), weight, pool.configured)
                            .in_account(key.account.clone());
                        this.key = None;
                        return Poll::Ready(Err(AcquireError::OverCapacity(err)));
                    }
                    if pool.grant_at_once(weight, token) {
                        // The fast path: free slots and nobody ahead.
                        let key = this.key.take().expect("checked above");
                        return Poll::Ready(Ok(Reservation { key, weight, token }));
                    }
                    if let Some(max) = max_queue
                        && pool.waiting() >= max
                    {
                        // About to refuse: first end the leases that ran out and bring back
                        // the hidden slots that are due, which nothing else does for a pool
                        // nobody waits in (with a bound of 0, nobody ever does).
                        state.maintain(index, Instant::now(), ran_out);
                        let pool = &mut state.list[index];
                        if pool.grant_at_once(weight, token) {
                            let key = this.key.take().expect("checked above");
                            return Poll::Ready(Ok(Reservation { key, weight, token }));
                        }
                        if pool.waiting() >= max {
                            let key = this.key.take().expect("checked above");
                            let err = QueueFull::new(key.account, key.pool, max);
                            return Poll::Ready(Err(AcquireError::QueueFull(err)));
                        }
                    }
                    let pool = &mut state.list[index];
                    pool.queue.push_back(token, weight, cx.waker().clone());
                    // Dropping this future takes the waiter (or the grant it gets) out.
                    this.token = Some(token);
                    pool.publish();
                    token
                }
                Some(token) => token,
            };
            let now = Instant::now();
            let index = state.index(key);
            state.maintain(index, now, ran_out);
            let interval = state.config.recovery_interval;
            let pool = &mut state.list[index];
            if let Some(refusals) = pool.take_grant(token) {
                this.token = None;
                let key = this.key.take().expect("checked above");
                // Tokens follow the grants, which is how a 1303 tells the creates granted
                // after the last one from those already on their way (`PoolState::congested`):
                // a grant made since the pool's last 1303 takes a new token; one made before it
                // keeps the waiter's, taken when it joined, before that 1303.
                let fresh = refusals == pool.refusals;
                let token = if fresh { state.token() } else { token };
                state.list[index].granted_to(token, weight);
                return Poll::Ready(Ok(Reservation { key, weight, token }));
            }
            if let Some(capacity) = pool.take_refusal(token) {
                // The pool's capacity was lowered below this create's weight while it waited.
                this.token = None;
                let key = this.key.take().expect("checked above");
                let err = OverCapacity::new(key.pool, weight, capacity).in_account(key.account);
                return Poll::Ready(Err(AcquireError::OverCapacity(err)));
            }
            let mut head = false;
            if let Some(i) = pool.queue.position(token) {
                head = i == 0;
                pool.queue.set_waker(i, cx.waker());
            }
            // The head sleeps until maintenance has work (a lease ends, a hidden slot comes
            // back); the others wait their turn, woken when they become the head.
            let Some(wake_at) = pool.next_wake(interval).filter(|_| head) else {
                this.sleep = None;
                return Poll::Pending;
            };
            let sleep = match &mut this.sleep {
                Some(sleep) => {
                    if sleep.deadline() != wake_at {
                        sleep.as_mut().reset(wake_at);
                    }
                    sleep
                }
                slot @ None => slot.insert(Box::pin(tokio::time::sleep_until(wake_at))),
            };
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl Drop for InProcessAcquire {
    fn drop(&mut self) {
        let (Some(key), Some(token)) = (self.key.as_ref(), self.token) else {
            return;
        };
        let mut state = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let pool = state.pool_mut(key);
        pool.leave(token, self.weight);
        // The head may have changed: let the next waiters in.
        pool.dispatch();
        pool.publish();
        drop(state);
        after_unlock(&[], || {});
    }
}

/// Gives back `granted`, a grant its caller never received: a panic after the lock was
/// released (a recorder's, a subscriber's) went through its hand-over. Its own records are
/// made (a panic of theirs, while the first unwinds, caught).
#[cold]
#[inline(never)]
fn give_back_unreceived(shared: &Mutex<State>, granted: &Reservation) {
    let mut state = shared.lock().unwrap_or_else(PoisonError::into_inner);
    state.apply(SlotOp::GiveBack(granted.clone()), None, true);
    drop(state);
    record_pending();
}

#[cfg(test)]
mod tests {
    use super::*;
    use kling_core::waitlist::MAX_TOMBSTONES_KEPT;
    use kling_core::{Outcome, Pool, Product};
    use proptest::prelude::*;

    fn key() -> SlotKey {
        SlotKey::new(AccountId::new("a"), Pool::new(Product::Video))
    }

    /// The tokens of the waiters still waiting in `pool`'s queue (not its tombstones).
    fn live_tokens(pool: &PoolState) -> Vec<u64> {
        pool.queue.iter().map(|w| w.ticket).collect()
    }

    /// Behind a head that never moves, creates that give up leave no more tombstones than
    /// there are waiters (beyond a few), and the rest are still found in order.
    #[test]
    fn tombstones_behind_a_waiting_head_stay_bounded() {
        let mut pool = PoolState::new(&key(), 1);
        for token in 1..=1_000 {
            pool.queue.push_back(token, 1, Waker::noop().clone());
        }
        // Every create but the head and every tenth gives up, from the back half first.
        let leaving: Vec<u64> = (501..=1_000)
            .chain(2..=500)
            .filter(|t| t % 10 != 0)
            .collect();
        for (n, &token) in leaving.iter().enumerate() {
            assert!(pool.remove_waiter(token));
            let waiting = 1_000 - (n + 1);
            assert_eq!(pool.waiting(), waiting);
            assert!(
                pool.queue.records() <= 2 * waiting + MAX_TOMBSTONES_KEPT + 1,
                "{} entries for {waiting} waiters",
                pool.queue.records()
            );
        }
        let live = live_tokens(&pool);
        assert_eq!(live.len(), 101);
        assert_eq!(live[0], 1, "the head stays");
        for (i, &token) in live.iter().enumerate() {
            let at = pool.queue.position(token).expect("still waiting");
            assert_eq!(pool.queue.get(at).map(|w| w.ticket), Some(token));
            if i > 0 {
                assert!(live[i - 1] < token, "still in arrival order");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fast_path_and_hand_off() {
        let backend = InProcess::new(SlotsConfig::new(1)).unwrap();
        let first = backend.acquire(key(), 1).await.unwrap();
        let mut second = tokio_test::task::spawn(backend.acquire(key(), 1));
        assert!(second.poll().is_pending());
        backend.apply(SlotOp::GiveBack(first)).await.unwrap();
        assert!(second.is_woken());
        let granted = match second.poll() {
            Poll::Ready(Ok(r)) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(granted.weight, 1);
        let snap = backend.snapshot().await.unwrap();
        assert_eq!((snap[0].in_use, snap[0].waiters), (1, 0));
    }

    /// The output of a future that is ready at once.
    fn now<F: Future + Unpin>(mut future: F) -> F::Output {
        match Pin::new(&mut future).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(output) => output,
            Poll::Pending => panic!("not ready"),
        }
    }

    fn pool(backend: &InProcess, account: &str) -> (u32, usize) {
        let snap = now(backend.snapshot()).unwrap();
        snap.iter()
            .find(|p| p.key.account.as_str() == account)
            .map_or((0, 0), |p| (p.in_use, p.tasks))
    }

    fn hold(backend: &InProcess, key: SlotKey, id: Option<&str>, ext: Option<&str>) {
        let reservation = now(backend.acquire(key, 1)).unwrap();
        let op = SlotOp::Hold {
            reservation,
            task: TaskRef {
                id: id.map(str::to_owned),
                external_id: ext.map(str::to_owned),
            },
            lease: Duration::from_secs(600),
        };
        now(backend.apply(op)).unwrap();
    }

    fn ended(id: &str) -> SlotOp {
        SlotOp::Update {
            account: key().account,
            updates: vec![super::super::TaskUpdate {
                id: id.to_owned(),
                external_id: None,
                status: Some(TaskStatus::Succeeded),
            }],
            lease: Duration::from_secs(600),
        }
    }

    /// A client sending many model names leaves no pool behind for each: once there are
    /// `POOLS_BEFORE_REUSE` pools, a new one takes an idle one's place. A pool that holds a
    /// task, or has a create waiting, keeps its own, and both are served as before.
    #[tokio::test(start_paused = true)]
    async fn idle_pools_make_way_for_new_ones() {
        let backend = InProcess::new(SlotsConfig::new(1)).unwrap();
        let model = |name: &str| {
            SlotKey::new(
                AccountId::new("a"),
                Pool::with_model(Product::Video, name.to_owned()),
            )
        };
        hold(&backend, model("busy"), Some("t-busy"), None);
        let mut waiter = tokio_test::task::spawn(backend.acquire(model("busy"), 1));
        assert!(waiter.poll().is_pending());
        for n in 0..500 {
            let key = model(&format!("typo-{n}"));
            let reservation = now(backend.acquire(key, 1)).unwrap();
            now(backend.apply(SlotOp::GiveBack(reservation))).unwrap();
        }
        let pools = backend.lock().list.len();
        assert!(
            pools <= POOLS_BEFORE_REUSE + 1,
            "{pools} pools for 501 models"
        );
        let snapshot = now(backend.snapshot()).unwrap();
        let busy = snapshot.iter().find(|p| p.key == model("busy")).unwrap();
        assert_eq!((busy.in_use, busy.tasks, busy.waiters), (1, 1, 1));
        // The busy pool's task ends: its waiter is served.
        now(backend.apply(ended("t-busy"))).unwrap();
        assert!(waiter.is_woken());
        assert!(matches!(waiter.poll(), Poll::Ready(Ok(_))));
        // A model seen before, whose pool made way, gets a fresh one at its configured size.
        let again = now(backend.acquire(model("typo-0"), 1)).unwrap();
        assert!(
            now(backend.snapshot())
                .unwrap()
                .iter()
                .any(|p| p.key == model("typo-0") && (p.in_use, p.capacity) == (1, 1))
        );
        now(backend.apply(SlotOp::GiveBack(again))).unwrap();
    }

    /// The queue's head alone sleeps until a lease ends; whoever becomes the head is woken to
    /// arm its own timer when there is a lease to wait for, and served in turn.
    #[tokio::test(start_paused = true)]
    async fn only_the_head_sleeps_and_each_new_head_is_served_when_leases_end() {
        let lease = Duration::from_secs(600);
        let backend = InProcess::new(SlotsConfig::new(1)).unwrap();
        hold(&backend, key(), Some("t0"), None);
        let mut w1 = tokio_test::task::spawn(backend.acquire(key(), 1));
        let mut w2 = tokio_test::task::spawn(backend.acquire(key(), 1));
        let mut w3 = tokio_test::task::spawn(backend.acquire(key(), 1));
        assert!(w1.poll().is_pending() && w2.poll().is_pending() && w3.poll().is_pending());
        tokio::time::advance(lease).await;
        assert!(w1.is_woken(), "the head sleeps until the lease ends");
        assert!(!w2.is_woken() && !w3.is_woken(), "the others have no timer");
        let Poll::Ready(Ok(r1)) = w1.poll() else {
            panic!("the head is served when the lease ends")
        };
        assert!(!w2.is_woken(), "no lease left to wait for");
        let op = |reservation, id: &str| SlotOp::Hold {
            reservation,
            task: TaskRef {
                id: Some(id.to_owned()),
                external_id: None,
            },
            lease,
        };
        backend.apply(op(r1, "t1")).await.unwrap();
        assert!(w2.is_woken(), "the new head has a lease to wait for");
        assert!(w2.poll().is_pending());
        // The head leaves: the next one takes over the timer.
        drop(w2);
        assert!(w3.is_woken());
        assert!(w3.poll().is_pending());
        tokio::time::advance(lease).await;
        assert!(w3.is_woken());
        assert!(matches!(w3.poll(), Poll::Ready(Ok(_))));
        assert_eq!(pool(&backend, "a"), (1, 0));
    }

    /// Leases count from when the answer arrived: the create's and the query's.
    #[tokio::test(start_paused = true)]
    async fn leases_count_from_the_answers_arrival() {
        let lease = Duration::from_secs(600);
        let backend = InProcess::new(SlotsConfig::new(2)).unwrap();
        tokio::time::advance(Duration::from_secs(1_000)).await;
        let answered = Instant::now() - Duration::from_secs(100);
        let reservation = now(backend.acquire(key(), 1)).unwrap();
        now(backend.hold_unread(reservation, Some("t1"), None, lease, Some(answered))).unwrap();
        let reservation = now(backend.acquire(key(), 1)).unwrap();
        now(backend.hold_unread(reservation, Some("t2"), None, lease, None)).unwrap();
        // t2 is reported running by an answer that arrived 50 s ago.
        tokio::time::advance(Duration::from_secs(450)).await;
        let running = Outcome::parse(
            http::StatusCode::OK,
            &http::HeaderMap::new(),
            br#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t2","task_status":"processing"}}"#,
            Instant::now() - Duration::from_secs(50),
        )
        .unwrap();
        now(backend.observe_unread(&key().account, &running, lease)).unwrap();
        assert_eq!(pool(&backend, "a"), (2, 2));
        tokio::time::advance(Duration::from_secs(50)).await;
        assert_eq!(
            pool(&backend, "a"),
            (1, 1),
            "t1's lease ran from its answer"
        );
        tokio::time::advance(Duration::from_secs(499)).await;
        assert_eq!(pool(&backend, "a"), (1, 1));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            pool(&backend, "a"),
            (0, 0),
            "t2's lease ran from the query's answer"
        );
    }

    /// An end reported before the create's hold releases the holding when it is filed, by
    /// either hold path, listed with the reported status; an adopt of the task holds nothing.
    #[tokio::test(start_paused = true)]
    async fn a_hold_of_a_task_reported_ended_first_is_released_at_once() {
        let backend = InProcess::new(SlotsConfig::new(3)).unwrap();
        for id in ["t1", "t2", "t3"] {
            let applied = backend.apply(ended(id)).await.unwrap();
            assert!(!applied.changed && applied.released.is_empty());
        }
        hold(&backend, key(), Some("t0"), None);
        hold(&backend, key(), Some("t1"), None);
        let reservation = now(backend.acquire(key(), 1)).unwrap();
        let applied = backend
            .apply(SlotOp::Hold {
                reservation,
                task: TaskRef {
                    id: Some("t2".to_owned()),
                    external_id: None,
                },
                lease: Duration::from_secs(600),
            })
            .await
            .unwrap();
        assert_eq!(applied.released.len(), 1);
        assert_eq!(applied.released[0].task.as_deref(), Some("t2"));
        assert_eq!(
            applied.released[0].reason,
            ReleaseReason::Ended(TaskStatus::Succeeded)
        );
        let reservation = now(backend.acquire(key(), 1)).unwrap();
        let lease = Duration::from_secs(600);
        now(backend.hold_unread(reservation, Some("t3"), None, lease, None)).unwrap();
        let adopt = SlotOp::Adopt {
            key: key(),
            task: TaskRef {
                id: Some("t1".to_owned()),
                external_id: None,
            },
            weight: 1,
            lease,
        };
        assert!(!backend.apply(adopt).await.unwrap().changed);
        assert_eq!(pool(&backend, "a"), (1, 1), "only t0 holds its slot");
    }

    /// `complete` by an external id before the create's answer came: the end is kept as the
    /// external id it may be, within its account, and frees the holding of the create that
    /// carries that external id when it is kept (answered, or its outcome unknown), not the
    /// holding of another account's create under it. Once the text has turned out to be an
    /// external id, a task whose id is the same text is not ended by it.
    #[tokio::test(start_paused = true)]
    async fn an_early_complete_by_external_id_frees_the_create_that_carries_it() {
        let backend = InProcess::new(SlotsConfig::new(4)).unwrap();
        let lease = Duration::from_secs(600);
        let b = SlotKey::new(AccountId::new("b"), Pool::new(Product::Video));
        let complete = |account: &AccountId, id: &str| SlotOp::Update {
            account: account.clone(),
            updates: vec![super::super::TaskUpdate {
                id: id.to_owned(),
                external_id: None,
                status: None,
            }],
            lease,
        };
        let hold_now = |key: SlotKey, id: Option<&str>, ext: Option<&str>| {
            let reservation = now(backend.acquire(key, 1)).unwrap();
            now(backend.hold_unread(reservation, id, ext, lease, None)).unwrap();
        };
        for ext in ["job-1", "job-2", "x"] {
            let applied = now(backend.apply(complete(&key().account, ext))).unwrap();
            assert!(!applied.changed && applied.released.is_empty());
        }
        now(backend.apply(complete(&b.account, "job-3"))).unwrap();
        // The answer names the task and echoes the external id.
        hold_now(key(), Some("t1"), Some("job-1"));
        assert_eq!(pool(&backend, "a"), (0, 0), "job-1's create is freed");
        // The answer was lost: kept under the external id alone.
        hold_now(key(), None, Some("job-2"));
        assert_eq!(pool(&backend, "a"), (0, 0), "job-2's create is freed");
        // Another account's end by `job-3` is not this account's.
        hold_now(key(), Some("t3"), Some("job-3"));
        assert_eq!(pool(&backend, "a"), (1, 1));
        // `x` turns out to be an external id; a task named `x` later is another task.
        hold_now(key(), Some("t4"), Some("x"));
        assert_eq!(pool(&backend, "a"), (1, 1));
        hold_now(key(), Some("x"), None);
        assert_eq!(pool(&backend, "a"), (2, 2), "task `x` holds its slot");
        // A `complete` by task id before the answer still frees that task's create.
        now(backend.apply(complete(&key().account, "t5"))).unwrap();
        hold_now(key(), Some("t5"), Some("job-5"));
        assert_eq!(pool(&backend, "a"), (2, 2));
    }

    /// An end reported again (a callback delivered again, a finished task queried again) is
    /// renewed in place: the re-sends take no more room than one note (the memory of ends
    /// stays bounded by the ends, not the reports) and push out no other end, such as that of
    /// a task whose create's answer is still on its way. The end counts one lease from its
    /// last report.
    #[tokio::test(start_paused = true)]
    async fn an_end_reported_again_is_renewed_not_noted_again() {
        let lease = Duration::from_secs(600);
        let backend = InProcess::new(SlotsConfig::new(2).lease(lease)).unwrap();
        now(backend.apply(ended("t1"))).unwrap();
        for i in 0..MAX_ENDS_KEPT + 10 {
            now(backend.apply(ended("t2"))).unwrap();
            if i % 2 == 0 {
                tokio::time::advance(Duration::from_millis(1)).await;
            }
            let state = backend.lock();
            assert_eq!(state.ended.len(), 2);
            assert!(
                state.ended.order.len() <= 2 * 2 + 64 + 1,
                "bounded by the notes"
            );
        }
        hold(&backend, key(), Some("t1"), None);
        assert_eq!(pool(&backend, "a"), (0, 0), "t1's end was still remembered");
        // t2 was last reported now: it counts a lease from here, past t1's.
        tokio::time::advance(lease - Duration::from_secs(1)).await;
        hold(&backend, key(), Some("t2"), None);
        assert_eq!(
            pool(&backend, "a"),
            (0, 0),
            "t2's end counts from its last report"
        );
    }

    /// A report of many tasks (a list page, a batch answer), long released most of them, does
    /// not push out the end a single report remembered for a create still on its way.
    #[tokio::test(start_paused = true)]
    async fn ends_in_a_report_of_many_tasks_are_not_remembered() {
        let backend = InProcess::new(SlotsConfig::new(3)).unwrap();
        backend.apply(ended("t1")).await.unwrap();
        let page = SlotOp::Update {
            account: key().account,
            updates: (0..5000)
                .map(|i| super::super::TaskUpdate {
                    id: format!("old-{i}"),
                    external_id: None,
                    status: Some(TaskStatus::Succeeded),
                })
                .collect(),
            lease: Duration::from_secs(600),
        };
        backend.apply(page).await.unwrap();
        let reservation = now(backend.acquire(key(), 1)).unwrap();
        let applied = backend
            .apply(SlotOp::Hold {
                reservation,
                task: TaskRef {
                    id: Some("t1".to_owned()),
                    external_id: None,
                },
                lease: Duration::from_secs(600),
            })
            .await
            .unwrap();
        assert_eq!(applied.released.len(), 1, "t1's end was still remembered");
        assert_eq!(pool(&backend, "a").0, 0);
    }

    /// A task whose holding a report ends is remembered by its task id (a create of unknown
    /// outcome's too, by the id the report gives; one `complete` names by its external id, by
    /// the holding's task id; a page of many tasks' too), so that a reconcile's list answered
    /// before the end adopts nothing for it, whether the reconcile began before the end or
    /// after (the server's list may run behind). Before, only ends told while a reconcile
    /// listed were remembered (the Redis backend remembers every one); a lease's end notes
    /// nothing. The ends that freed no holding in a page of many tasks are still not noted.
    #[tokio::test(start_paused = true)]
    async fn ends_that_free_a_holding_are_remembered_for_a_later_listing() {
        let backend = InProcess::new(SlotsConfig::new(9)).unwrap();
        let update = |id: &str, ext: Option<&str>, tasks: usize| SlotOp::Update {
            account: key().account,
            updates: (0..tasks)
                .map(|i| super::super::TaskUpdate {
                    id: if i == 0 {
                        id.to_owned()
                    } else {
                        format!("old-{i}")
                    },
                    external_id: ext.map(str::to_owned),
                    status: Some(TaskStatus::Succeeded),
                })
                .collect(),
            lease: Duration::from_secs(600),
        };
        hold(&backend, key(), Some("t1"), None);
        now(backend.apply(ended("t1"))).unwrap();
        assert_eq!(
            backend.lock().freed.len(),
            1,
            "t1 noted, no listing running"
        );
        hold(&backend, key(), Some("t2"), None);
        hold(&backend, key(), None, Some("e3"));
        hold(&backend, key(), Some("t4"), None);
        hold(&backend, key(), Some("t7"), Some("e7"));
        let complete_e7 = SlotOp::Update {
            account: key().account,
            updates: vec![super::super::TaskUpdate {
                id: "e7".to_owned(),
                external_id: None,
                status: None,
            }],
            lease: Duration::from_secs(600),
        };
        assert!(now(backend.apply(complete_e7)).unwrap().changed);
        now(backend.apply(ended("t2"))).unwrap();
        now(backend.apply(update("t3", Some("e3"), 1))).unwrap();
        now(backend.apply(update("t4", None, 3))).unwrap();
        hold(&backend, key(), Some("t5"), None);
        now(backend.apply(ended("t5"))).unwrap();
        // The listing begins after every end (the default: nothing to count).
        backend.begin_listing();
        hold(&backend, key(), Some("t6"), None);
        let reservation = now(backend.acquire(key(), 1)).unwrap();
        // A lease that runs out is no report: the task may still run, and is adopted.
        let short = Duration::from_secs(1);
        now(backend.hold_unread(reservation, Some("t8"), None, short, None)).unwrap();
        tokio::time::advance(short).await;
        assert_eq!(pool(&backend, "a"), (1, 1), "t6 runs, t8's lease ran out");
        now(backend.apply(ended("t6"))).unwrap();
        backend.end_listing();
        assert_eq!(pool(&backend, "a"), (0, 0));
        let adopt = |id: &str| SlotOp::Adopt {
            key: key(),
            task: TaskRef {
                id: Some(id.to_owned()),
                external_id: None,
            },
            weight: 1,
            lease: Duration::from_secs(600),
        };
        let adopted: Vec<&str> = ["t1", "t2", "t3", "t4", "t5", "t6", "t7", "t8"]
            .into_iter()
            .filter(|id| now(backend.apply(adopt(id))).unwrap().changed)
            .collect();
        assert_eq!(adopted, ["t8"], "only the task no report ended");
        assert_eq!(backend.lock().freed.len(), 7);
        assert_eq!(
            backend.lock().ended.len(),
            0,
            "no end came before its holding"
        );
    }

    /// The ends that freed a holding are remembered for one lease, the last `MAX_ENDS_KEPT`
    /// of them: an older one's task, listed, is adopted.
    #[tokio::test(start_paused = true)]
    async fn ends_that_free_a_holding_are_bounded_by_count_and_age() {
        let lease = Duration::from_secs(600);
        let backend = InProcess::new(SlotsConfig::new(1).lease(lease)).unwrap();
        for i in 0..=MAX_ENDS_KEPT {
            hold(&backend, key(), Some(&format!("t{i}")), None);
            now(backend.apply(ended(&format!("t{i}")))).unwrap();
        }
        assert_eq!(backend.lock().freed.len(), MAX_ENDS_KEPT);
        let adopt = |id: &str| SlotOp::Adopt {
            key: key(),
            task: TaskRef {
                id: Some(id.to_owned()),
                external_id: None,
            },
            weight: 1,
            lease,
        };
        let adopted = |id: &str| now(backend.apply(adopt(id))).unwrap().changed;
        assert!(adopted("t0"), "the oldest end was forgotten");
        assert!(!adopted("t1") && !adopted(&format!("t{MAX_ENDS_KEPT}")));
        tokio::time::advance(lease).await;
        assert!(adopted("t1"), "a lease after its report");
    }

    /// A lease longer than a year, which the configuration refuses but a change may carry,
    /// is cut to a year rather than overflow the clock (on hold and on renewal).
    #[tokio::test(start_paused = true)]
    async fn a_lease_past_a_year_in_a_change_is_cut_to_a_year() {
        let backend = InProcess::new(SlotsConfig::new(1)).unwrap();
        let reservation = now(backend.acquire(key(), 1)).unwrap();
        let lease = Duration::MAX;
        now(backend.hold_unread(reservation, Some("t1"), None, lease, None)).unwrap();
        let running = SlotOp::Update {
            account: key().account,
            updates: vec![super::super::TaskUpdate {
                id: "t1".to_owned(),
                external_id: None,
                status: Some(TaskStatus::Processing),
            }],
            lease,
        };
        now(backend.apply(running)).unwrap();
        tokio::time::advance(MAX_DURATION).await;
        assert_eq!(pool(&backend, "a"), (0, 0));
    }

    /// A task reported running renews its lease to the report's lease from then, also when
    /// that is sooner than the lease it had (another layer's shorter lease over the same
    /// backend): it ends then, and a create waiting for its slot is served then.
    #[tokio::test(start_paused = true)]
    async fn a_lease_renewed_shorter_ends_when_renewed_to() {
        let backend = InProcess::new(SlotsConfig::new(1)).unwrap();
        hold(&backend, key(), Some("t1"), None);
        let mut waiter = tokio_test::task::spawn(backend.acquire(key(), 1));
        assert!(waiter.poll().is_pending());
        let running = SlotOp::Update {
            account: key().account,
            updates: vec![super::super::TaskUpdate {
                id: "t1".to_owned(),
                external_id: None,
                status: Some(TaskStatus::Processing),
            }],
            lease: Duration::from_secs(60),
        };
        now(backend.apply(running)).unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(
            waiter.is_woken(),
            "the head is woken when the renewed lease ends"
        );
        assert!(matches!(waiter.poll(), Poll::Ready(Ok(_))));
        drop(waiter);
        let snap = now(backend.snapshot()).unwrap();
        assert_eq!(
            (snap[0].in_use, snap[0].tasks),
            (1, 0),
            "t1 ended by its lease"
        );
    }

    /// A renewal that pushes one lease later leaves the pool's timer below every other lease:
    /// the other task's lease still ends when it runs out, and frees the waiter then.
    #[tokio::test(start_paused = true)]
    async fn a_lease_renewed_later_keeps_no_other_lease_past_its_end() {
        let backend = InProcess::new(SlotsConfig::new(2)).unwrap();
        hold(&backend, key(), Some("t1"), None);
        tokio::time::advance(Duration::from_secs(10)).await;
        hold(&backend, key(), Some("t2"), None);
        let mut waiter = tokio_test::task::spawn(backend.acquire(key(), 1));
        assert!(waiter.poll().is_pending());
        tokio::time::advance(Duration::from_secs(10)).await;
        let running = SlotOp::Update {
            account: key().account,
            updates: vec![super::super::TaskUpdate {
                id: "t1".to_owned(),
                external_id: None,
                status: Some(TaskStatus::Processing),
            }],
            lease: Duration::from_secs(600),
        };
        now(backend.apply(running)).unwrap();
        // t1's old lease ends: nothing to do, and the timer moves to t2's.
        tokio::time::advance(Duration::from_secs(580)).await;
        assert!(waiter.poll().is_pending());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(waiter.is_woken(), "t2's lease ends 610 s in");
        assert!(matches!(waiter.poll(), Poll::Ready(Ok(_))));
        drop(waiter);
        let snap = now(backend.snapshot()).unwrap();
        assert_eq!(
            (snap[0].in_use, snap[0].tasks),
            (2, 1),
            "t1 renewed, t2 ended"
        );
    }

    /// The ends remembered are bounded by count (the oldest forgotten first) and by age (one
    /// lease from the report).
    #[tokio::test(start_paused = true)]
    async fn remembered_ends_are_bounded_by_count_and_age() {
        let lease = Duration::from_secs(600);
        let backend = InProcess::new(SlotsConfig::new(1).lease(lease)).unwrap();
        // One report each (a callback each): ends in a report of many are not remembered.
        let report = |i: usize| SlotOp::Update {
            account: key().account,
            updates: vec![super::super::TaskUpdate {
                id: format!("t{i}"),
                external_id: None,
                status: Some(TaskStatus::Failed),
            }],
            lease,
        };
        for i in 0..MAX_ENDS_KEPT + 100 {
            now(backend.apply(report(i))).unwrap();
        }
        {
            let state = backend.lock();
            assert_eq!(state.ended.len(), MAX_ENDS_KEPT);
            assert!(state.ended.order.len() <= MAX_ENDS_KEPT);
            let t = Instant::now();
            let known = |i: usize| {
                let id = format!("t{i}");
                let hash = IdHash::hash(id.as_bytes());
                state.ended.get(hash, NO_SCOPE, id.as_bytes(), t).is_some()
            };
            assert!(!known(0) && !known(99), "the oldest are forgotten");
            assert!(known(100) && known(MAX_ENDS_KEPT + 99));
        }
        // Past a lease, an end is no longer found, and the next note forgets the old ones.
        tokio::time::advance(lease).await;
        hold(&backend, key(), Some("t200"), None);
        assert_eq!(
            pool(&backend, "a"),
            (1, 1),
            "an end a lease old is forgotten"
        );
        now(backend.apply(ended("t-late"))).unwrap();
        let state = backend.lock();
        assert_eq!((state.ended.len(), state.ended.order.len()), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unread_apply_releases_the_same_but_lists_nothing() {
        let backend = InProcess::new(SlotsConfig::new(2)).unwrap();
        hold(&backend, key(), Some("t1"), Some("e1"));
        hold(&backend, key(), Some("t2"), None);
        assert_eq!(pool(&backend, "a"), (2, 2));
        let unread = backend.apply_unread(ended("t1")).await.unwrap();
        assert!(unread.changed && unread.released.is_empty());
        assert_eq!(pool(&backend, "a"), (1, 1));
        // Released exactly once, however it was applied.
        assert!(!backend.apply(ended("t1")).await.unwrap().changed);
        let read = backend.apply(ended("t2")).await.unwrap();
        assert_eq!(read.released.len(), 1);
        assert_eq!(read.released[0].task.as_deref(), Some("t2"));
        assert_eq!(pool(&backend, "a"), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_create_sent_again_replaces_its_earlier_holding_in_its_account_only() {
        let backend = InProcess::new(SlotsConfig::new(3)).unwrap();
        let other = SlotKey::new(AccountId::new("b"), Pool::new(Product::Video));
        // Unknown outcomes, held under their external id.
        hold(&backend, other, None, Some("e1"));
        hold(&backend, key(), None, Some("e1"));
        // Sent again in account `a`: the answer names the task and the same external id.
        hold(&backend, key(), Some("t1"), Some("e1"));
        assert_eq!(
            pool(&backend, "a"),
            (1, 1),
            "the earlier holding is given back"
        );
        assert_eq!(pool(&backend, "b"), (1, 1), "another account's is not");
        // The superseded holding's slot is filled again, and both end by their ids.
        hold(&backend, key(), Some("t2"), Some("e2"));
        assert_eq!(pool(&backend, "a"), (2, 2));
        let released = backend.apply(ended("t1")).await.unwrap().released;
        assert_eq!(released[0].task.as_deref(), Some("t1"));
        backend.apply(ended("t2")).await.unwrap();
        assert_eq!(pool(&backend, "a"), (0, 0));
        // Account `b`'s holding runs until its lease.
        assert_eq!(pool(&backend, "b"), (1, 1));
        tokio::time::advance(Duration::from_secs(600)).await;
        assert_eq!(pool(&backend, "b"), (0, 0));
    }

    /// An empty task id (in a `TaskRef` a caller built: kling-core's readers now report no
    /// task for `"task_id":""`) is no id either: creates answered with one do not replace each other as "the
    /// same task" (each keeps its slot under its external id or its lease), a report of a task
    /// with one ends none of them, and a running report does not file it.
    #[tokio::test(start_paused = true)]
    async fn an_empty_task_id_names_no_task() {
        let backend = InProcess::new(SlotsConfig::new(5)).unwrap();
        let lease = Duration::from_secs(600);
        hold(&backend, key(), Some(""), None);
        hold(&backend, key(), Some(""), None);
        let reservation = now(backend.acquire(key(), 1)).unwrap();
        now(backend.hold_unread(reservation, Some(""), None, lease, None)).unwrap();
        let reservation = now(backend.acquire(key(), 1)).unwrap();
        now(backend.hold_unread(reservation, Some(""), Some("e1"), lease, None)).unwrap();
        let adopt = SlotOp::Adopt {
            key: key(),
            task: TaskRef {
                id: Some(String::new()),
                external_id: None,
            },
            weight: 1,
            lease,
        };
        assert!(now(backend.apply(adopt)).unwrap().changed);
        assert_eq!(pool(&backend, "a"), (5, 5), "five tasks, five slots");
        // A running report names `e1`'s task by an empty id: not filed under it.
        let report = |status| SlotOp::Update {
            account: key().account,
            updates: vec![super::super::TaskUpdate {
                id: String::new(),
                external_id: Some("e1".to_owned()),
                status: Some(status),
            }],
            lease,
        };
        now(backend.apply(report(TaskStatus::Processing))).unwrap();
        now(backend.apply(ended(""))).unwrap();
        assert_eq!(pool(&backend, "a"), (5, 5));
        // Found by its external id, it ends.
        now(backend.apply(report(TaskStatus::Succeeded))).unwrap();
        assert_eq!(pool(&backend, "a"), (4, 4));
    }

    /// An adopted task of an absurd weight (a `SlotOp::Adopt` built by hand) does not
    /// overflow the slots in use (a panic under the lock): it counts what fits, and gives that
    /// back when it ends.
    #[tokio::test(start_paused = true)]
    async fn an_adopt_of_an_absurd_weight_does_not_overflow() {
        let backend = InProcess::new(SlotsConfig::new(2)).unwrap();
        let granted = now(backend.acquire(key(), 1)).unwrap();
        let adopt = SlotOp::Adopt {
            key: key(),
            task: TaskRef {
                id: Some("t1".to_owned()),
                external_id: None,
            },
            weight: u32::MAX,
            lease: Duration::from_secs(600),
        };
        assert!(now(backend.apply(adopt)).unwrap().changed);
        assert_eq!(pool(&backend, "a"), (u32::MAX, 1));
        now(backend.apply(ended("t1"))).unwrap();
        assert_eq!(
            pool(&backend, "a"),
            (1, 0),
            "the grant's slot is still counted"
        );
        now(backend.apply(SlotOp::GiveBack(granted))).unwrap();
        assert_eq!(pool(&backend, "a"), (0, 0));
    }

    /// An empty external id (an answer or list echoing `"external_task_id":""` for a create
    /// that named none) is no id: tasks kept, borrowed or adopted with one do not replace each
    /// other as "the same create", and a report of another task with one ends none of them.
    #[tokio::test(start_paused = true)]
    async fn an_empty_external_id_names_no_task() {
        let backend = InProcess::new(SlotsConfig::new(4)).unwrap();
        hold(&backend, key(), Some("t1"), Some(""));
        hold(&backend, key(), Some("t2"), Some(""));
        let reservation = now(backend.acquire(key(), 1)).unwrap();
        let lease = Duration::from_secs(600);
        now(backend.hold_unread(reservation, Some("t3"), Some(""), lease, None)).unwrap();
        let adopt = SlotOp::Adopt {
            key: key(),
            task: TaskRef {
                id: Some("t4".to_owned()),
                external_id: Some(String::new()),
            },
            weight: 1,
            lease,
        };
        assert!(now(backend.apply(adopt)).unwrap().changed);
        assert_eq!(pool(&backend, "a"), (4, 4), "four tasks, four slots");
        let other_ended = SlotOp::Update {
            account: key().account,
            updates: vec![super::super::TaskUpdate {
                id: "old".to_owned(),
                external_id: Some(String::new()),
                status: Some(TaskStatus::Succeeded),
            }],
            lease,
        };
        assert!(now(backend.apply(other_ended)).unwrap().released.is_empty());
        assert_eq!(pool(&backend, "a"), (4, 4));
    }

    /// External ids are unique per account only: each account's holding under one is filed
    /// and found apart from another's, whichever was kept first.
    #[tokio::test(start_paused = true)]
    async fn external_ids_are_filed_and_found_within_their_account() {
        let backend = InProcess::new(SlotsConfig::new(3)).unwrap();
        let b = SlotKey::new(AccountId::new("b"), Pool::new(Product::Video));
        let lease = Duration::from_secs(600);
        let by_external = |account: &SlotKey, id: &str, external: Option<&str>| SlotOp::Update {
            account: account.account.clone(),
            updates: vec![super::super::TaskUpdate {
                id: id.to_owned(),
                external_id: external.map(str::to_owned),
                status: None,
            }],
            lease,
        };
        // Unknown outcomes under `e1`: account `a`'s first, then `b`'s.
        hold(&backend, key(), None, Some("e1"));
        hold(&backend, b.clone(), None, Some("e1"));
        // `a`'s create sent again and answered: it replaces `a`'s earlier holding, not `b`'s.
        hold(&backend, key(), Some("t1"), Some("e1"));
        assert_eq!((pool(&backend, "a"), pool(&backend, "b")), ((1, 1), (1, 1)));
        // `b`'s lookup finds no task under its `e1`: `b`'s holding ends, `a`'s stays.
        let released = now(backend.apply(by_external(&b, "", Some("e1"))))
            .unwrap()
            .released;
        assert_eq!(released.len(), 1);
        assert_eq!(
            (&released[0].key, released[0].task.as_deref()),
            (&b, Some("e1"))
        );
        assert_eq!((pool(&backend, "a"), pool(&backend, "b")), ((1, 1), (0, 0)));
        // Reconcile in `b` finds a task under `e1`: not `a`'s, so adopted.
        let adopt = SlotOp::Adopt {
            key: b.clone(),
            task: TaskRef {
                id: Some("t9".to_owned()),
                external_id: Some("e1".to_owned()),
            },
            weight: 1,
            lease,
        };
        assert!(now(backend.apply(adopt)).unwrap().changed);
        assert_eq!(pool(&backend, "b"), (1, 1));
        // `complete` by external id ends the holding of the account it names.
        let stranger = SlotKey::new(AccountId::new("c"), Pool::new(Product::Video));
        assert!(
            !now(backend.apply(by_external(&stranger, "e1", None)))
                .unwrap()
                .changed
        );
        let released = now(backend.apply(by_external(&key(), "e1", None)))
            .unwrap()
            .released;
        assert_eq!(released[0].task.as_deref(), Some("t1"));
        assert_eq!((pool(&backend, "a"), pool(&backend, "b")), ((0, 0), (1, 1)));
        // A task id is the server's, unique everywhere: found from any account.
        assert!(
            now(backend.apply(by_external(&stranger, "t9", None)))
                .unwrap()
                .changed
        );
        assert_eq!(pool(&backend, "b"), (0, 0));
    }

    /// Without the paths (a `Hold` built by a caller), creates of unknown outcome under one
    /// external id in two pools of an account are two creates (external ids may be unique per
    /// create path only, and a create sent again goes to its own pool): the later one keeps
    /// the earlier one's slots held. In one pool, the later one replaces it, as before.
    #[tokio::test(start_paused = true)]
    async fn a_create_of_unknown_outcome_in_another_pool_is_no_earlier_attempt() {
        let backend = InProcess::new(SlotsConfig::new(5)).unwrap();
        let image = SlotKey::new(AccountId::new("a"), Pool::new(Product::Image));
        hold(&backend, key(), None, Some("job-7"));
        hold(&backend, image.clone(), None, Some("job-7"));
        hold(&backend, image.clone(), None, Some("job-7"));
        let snap = now(backend.snapshot()).unwrap();
        let tasks = |key: &SlotKey| snap.iter().find(|p| p.key == *key).map(|p| p.tasks);
        assert_eq!((tasks(&key()), tasks(&image)), (Some(1), Some(1)));
    }

    /// Two creates of unknown outcome under one external id in one pool, on two create paths,
    /// both stay (external ids may be unique per path only). A create under that external id
    /// whose path is not known (a `Hold` a caller built) may be an attempt of either: both give
    /// their slots back, as in Redis, not only the one the index named last. One of a known
    /// path replaces that path's only, also once the holding the index named has ended.
    #[tokio::test(start_paused = true)]
    async fn a_create_sent_again_replaces_every_earlier_attempt_it_may_be() {
        let backend = InProcess::new(SlotsConfig::new(5)).unwrap();
        let lease = Duration::from_secs(600);
        let (text, image) = (
            CreatePath::legacy("/v1/videos/text2video"),
            CreatePath::legacy("/v1/videos/image2video"),
        );
        let hold_on = |path: CreatePath| {
            let reservation = now(backend.acquire(key(), 1)).unwrap();
            now(backend.hold_unread_on(reservation, None, Some("job"), lease, None, path)).unwrap();
        };
        hold_on(text);
        hold_on(image);
        assert_eq!(pool(&backend, "a"), (2, 2), "two paths' creates");
        hold(&backend, key(), None, Some("job"));
        assert_eq!(
            pool(&backend, "a"),
            (1, 1),
            "both replaced by the one sent again"
        );

        // The index names the image create last; it ends (a lookup on its path finds
        // nothing), and the text create sent again still replaces its earlier attempt.
        let backend = InProcess::new(SlotsConfig::new(5)).unwrap();
        let hold_on = |path: CreatePath| {
            let reservation = now(backend.acquire(key(), 1)).unwrap();
            now(backend.hold_unread_on(reservation, None, Some("job"), lease, None, path)).unwrap();
        };
        hold_on(text);
        hold_on(image);
        let none_found = SlotOp::Update {
            account: key().account,
            updates: vec![super::super::TaskUpdate {
                id: String::new(),
                external_id: Some("job".to_owned()),
                status: None,
            }],
            lease,
        };
        now(backend.apply_unread_on(none_found, image)).unwrap();
        assert_eq!(
            pool(&backend, "a"),
            (1, 1),
            "the image create never happened"
        );
        hold_on(text);
        assert_eq!(
            pool(&backend, "a"),
            (1, 1),
            "the text create's earlier attempt replaced"
        );
        assert_eq!(backend.lock().displaced, 0);
    }

    /// A reconcile's list names a running task under an external id that a task of another
    /// create path, known here by its own task id, carries too (external ids may be unique
    /// per path only): the listed task is adopted, not taken for the one held. So is one whose
    /// external id an ended report of another task id named. A holding whose task id is
    /// unknown may be the listed task, and is taken for it, as before: one of the listed
    /// task's product only (a video create is no image task's).
    #[tokio::test(start_paused = true)]
    async fn an_adopt_under_another_tasks_external_id_is_adopted() {
        let backend = InProcess::new(SlotsConfig::new(5)).unwrap();
        let lease = Duration::from_secs(600);
        let image = SlotKey::new(AccountId::new("a"), Pool::new(Product::Image));
        let adopt = |id: &str, ext: &str| SlotOp::Adopt {
            key: image.clone(),
            task: TaskRef {
                id: Some(id.to_owned()),
                external_id: Some(ext.to_owned()),
            },
            weight: 1,
            lease,
        };
        hold(&backend, key(), Some("tv"), Some("job-7"));
        assert!(now(backend.apply(adopt("ti", "job-7"))).unwrap().changed);
        // An image task `t8` under `job-8` ended (its slot freed elsewhere, or never here).
        let report = SlotOp::Update {
            account: key().account,
            updates: vec![super::super::TaskUpdate {
                id: "t8".to_owned(),
                external_id: Some("job-8".to_owned()),
                status: Some(TaskStatus::Succeeded),
            }],
            lease,
        };
        now(backend.apply(report)).unwrap();
        assert!(now(backend.apply(adopt("t9", "job-8"))).unwrap().changed);
        // An image create of unknown outcome under `job-9`: the listed `t10` under it may be
        // its task, and is known by its id from then on.
        hold(&backend, image.clone(), None, Some("job-9"));
        assert!(!now(backend.apply(adopt("t10", "job-9"))).unwrap().changed);
        // A video create of unknown outcome under `job-10` is no image task's create (another
        // path's): the image `t11` listed under `job-10` is adopted, and the video create
        // learns no task id of it.
        hold(&backend, key(), None, Some("job-10"));
        assert!(now(backend.apply(adopt("t11", "job-10"))).unwrap().changed);
        let snap = now(backend.snapshot()).unwrap();
        let tasks = |key: &SlotKey| snap.iter().find(|p| p.key == *key).map(|p| p.tasks);
        assert_eq!(
            tasks(&key()),
            Some(2),
            "tv and the video create of unknown outcome"
        );
        assert_eq!(
            tasks(&image),
            Some(4),
            "ti, t9, the image create (t10) and t11"
        );
        let released = now(backend.apply(ended("t10"))).unwrap().released;
        assert_eq!(released.len(), 1, "t10 is the image create's task");
        assert_eq!(released[0].key, image);
        let released = now(backend.apply(ended("t11"))).unwrap().released;
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].key, image, "not the video create");
    }

    /// A reconcile adopted `t1` (under `job-9`) into the pool its plan names for the product,
    /// then `t1`'s create, of another model's pool, lost its answer and was kept under `job-9`
    /// alone: one task, held once, by the create's pool, and freed by its task id. (Before,
    /// the create's holding took the adopted task's id only in the same pool: both held, and
    /// the create's slot stayed in use for its whole lease after `t1` ended.)
    #[tokio::test(start_paused = true)]
    async fn a_lost_create_of_another_models_pool_takes_over_its_adopted_task() {
        let backend = InProcess::new(SlotsConfig::new(5)).unwrap();
        let lease = Duration::from_secs(600);
        let model =
            |name: &str| SlotKey::new(AccountId::new("a"), Pool::with_model(Product::Video, name));
        let (listed, created) = (model("kling-3.0"), model("kling-2.6"));
        let reservation = now(backend.acquire(created.clone(), 1)).unwrap();
        let adopt = SlotOp::Adopt {
            key: listed.clone(),
            task: TaskRef {
                id: Some("t1".to_owned()),
                external_id: Some("job-9".to_owned()),
            },
            weight: 1,
            lease,
        };
        let path = CreatePath::NEW_STYLE;
        assert!(now(backend.adopt_on(adopt, path)).unwrap().changed);
        now(backend.hold_unread_on(reservation, None, Some("job-9"), lease, None, path)).unwrap();
        let snap = now(backend.snapshot()).unwrap();
        let held = |key: &SlotKey| {
            snap.iter()
                .find(|p| p.key == *key)
                .map_or((0, 0), |p| (p.in_use, p.tasks))
        };
        assert_eq!(
            held(&listed),
            (0, 0),
            "the adopted holding gave its slot back"
        );
        assert_eq!(held(&created), (1, 1), "t1 held once, by its create");
        let released = now(backend.apply(ended("t1"))).unwrap().released;
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].key, created);
        let snap = now(backend.snapshot()).unwrap();
        assert!(
            snap.iter().all(|p| p.in_use == 0 && p.tasks == 0),
            "{snap:?}"
        );
    }

    /// A waiter refused by a lowered capacity and dropped before it was polled again leaves
    /// nothing behind: no refusal kept, the pool idle (free to make way for another).
    #[tokio::test(start_paused = true)]
    async fn a_waiter_refused_by_a_lowered_capacity_and_dropped_leaves_nothing() {
        let backend = InProcess::new(SlotsConfig::new(2)).unwrap();
        let held = now(backend.acquire(key(), 1)).unwrap();
        let mut heavy = tokio_test::task::spawn(backend.acquire(key(), 2));
        assert!(heavy.poll().is_pending());
        let lower = SlotOp::SetCapacity {
            account: None,
            pool: Pool::new(Product::Video),
            capacity: 1,
        };
        assert!(now(backend.apply(lower)).unwrap().changed);
        assert!(heavy.is_woken());
        {
            let state = backend.lock();
            assert_eq!(state.list[0].refused, [(2, 1)]);
            assert_eq!(state.list[0].waiting(), 0);
        }
        drop(heavy);
        now(backend.apply(SlotOp::GiveBack(held))).unwrap();
        let state = backend.lock();
        assert!(state.list[0].refused.is_empty());
        assert!(state.list[0].is_idle());
    }

    #[derive(Clone, Debug)]
    enum TableOp {
        Insert(u64),
        Remove(u64),
    }

    /// Hashes that crowd a few homes (long runs that wrap around the end), and well spread ones.
    fn table_hash() -> impl Strategy<Value = u64> {
        prop_oneof![
            (0u64..40).prop_map(|n| n << 32),
            (0u64..40).prop_map(|n| (n << 32) | 0xffff_ffff),
            (0u64..8).prop_map(|n| (n.wrapping_sub(4) << 32) | n),
            any::<u64>(),
        ]
    }

    proptest! {
        #[test]
        fn the_table_maps_hashes_as_a_hash_map_does(
            ops in proptest::collection::vec(
                prop_oneof![
                    table_hash().prop_map(TableOp::Insert),
                    table_hash().prop_map(TableOp::Remove),
                ],
                1..300,
            )
        ) {
            let mut table = Table::default();
            let mut model: HashMap<u64, Place> = HashMap::new();
            for (n, op) in ops.into_iter().enumerate() {
                match op {
                    TableOp::Insert(hash) => match table.find(hash) {
                        Some(i) => {
                            prop_assert!(model.contains_key(&hash));
                            table.entries[i].place = (n, n);
                            model.insert(hash, (n, n));
                        }
                        None => {
                            prop_assert!(!model.contains_key(&hash));
                            table.insert_new(hash, (n, n));
                            model.insert(hash, (n, n));
                        }
                    },
                    TableOp::Remove(hash) => {
                        let removed = table.find(hash).map(|i| table.remove_at(i));
                        prop_assert_eq!(removed, model.remove(&hash));
                    }
                }
                prop_assert_eq!(table.len, model.len());
                for (&hash, &place) in &model {
                    prop_assert_eq!(table.get(hash), Some(place));
                }
            }
        }
    }

    /// The ids an index test files: place → (scope, id).
    struct Model(HashMap<Place, (&'static str, &'static str)>);

    impl Keys for Model {
        fn key(&self, place: Place) -> Option<(&[u8], &[u8])> {
            let (scope, id) = self.0.get(&place)?;
            Some((scope.as_bytes(), id.as_bytes()))
        }
    }

    #[derive(Clone, Debug)]
    enum IndexOp {
        /// A new holding filed under this id in this scope (the one filed before there stays
        /// held, unfiled).
        File(usize, usize),
        /// The n-th live holding is released.
        Release(usize),
        /// The holding filed under this id in this scope is found, unfiled and released (a
        /// query saying the task ended).
        End(usize, usize),
    }

    const IDS: [&str; 6] = [
        "",
        "t1",
        "t2",
        "8600000000000000001",
        "8600000000000000002",
        "job",
    ];

    /// The scopes ids are filed in: none (task ids) and accounts (external ids), one whose
    /// name is also an id.
    const SCOPES: [&str; 3] = ["", "acct", "job"];

    fn index_ops() -> impl Strategy<Value = Vec<IndexOp>> {
        proptest::collection::vec(
            prop_oneof![
                (0..IDS.len(), 0..SCOPES.len()).prop_map(|(i, s)| IndexOp::File(i, s)),
                any::<usize>().prop_map(IndexOp::Release),
                (0..IDS.len(), 0..SCOPES.len()).prop_map(|(i, s)| IndexOp::End(i, s)),
            ],
            1..60,
        )
    }

    /// Ids of the same length collide (in any scope of the same length too): `spill` does the
    /// work.
    struct Colliding;

    impl HashId for Colliding {
        fn hash(text: &[u8]) -> u64 {
            text.len() as u64 % 2
        }
    }

    fn check_index<H: HashId>(ops: Vec<IndexOp>) -> Result<(), TestCaseError> {
        let mut index = Index::<H>::default();
        let mut held = Model(HashMap::new());
        let mut filed: HashMap<(&str, &str), Place> = HashMap::new();
        let mut next = 0;
        for op in ops {
            match op {
                IndexOp::File(i, s) => {
                    next += 1;
                    let place = (next % 3, next);
                    let (scope, id) = (SCOPES[s], IDS[i]);
                    held.0.insert(place, (scope, id));
                    let before = index.insert(scope.as_bytes(), id.as_bytes(), place, &held);
                    prop_assert_eq!(before, filed.insert((scope, id), place));
                }
                IndexOp::Release(n) if !held.0.is_empty() => {
                    let mut places: Vec<Place> = held.0.keys().copied().collect();
                    places.sort_unstable();
                    let place = places[n % places.len()];
                    let (scope, id) = held.0.remove(&place).expect("live");
                    index.remove(scope.as_bytes(), id.as_bytes(), place);
                    if filed.get(&(scope, id)) == Some(&place) {
                        filed.remove(&(scope, id));
                    }
                }
                IndexOp::Release(_) => {}
                IndexOp::End(i, s) => {
                    let (scope, id) = (SCOPES[s], IDS[i]);
                    let taken = index.take(scope.as_bytes(), id.as_bytes(), &held);
                    prop_assert_eq!(taken, filed.remove(&(scope, id)));
                    if let Some(place) = taken {
                        let kept = held.0.remove(&place);
                        prop_assert_eq!(kept, Some((scope, id)));
                    }
                }
            }
            for scope in SCOPES {
                for id in IDS {
                    prop_assert_eq!(
                        index.get(scope.as_bytes(), id.as_bytes(), &held),
                        filed.get(&(scope, id)).copied(),
                        "{} in {:?}",
                        id,
                        scope
                    );
                }
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn the_index_finds_what_a_map_of_ids_finds(ops in index_ops()) {
            check_index::<IdHash>(ops)?;
        }

        #[test]
        fn the_index_finds_what_a_map_of_ids_finds_when_hashes_collide(ops in index_ops()) {
            check_index::<Colliding>(ops)?;
        }
    }

    /// The trait's provided `acquire_now`, `hold_unread` and `apply_unread` over `InProcess`
    /// (which overrides all three).
    #[derive(Clone)]
    struct Provided(InProcess);

    impl SlotBackend for Provided {
        type Acquire = InProcessAcquire;
        type Apply = Ready<Result<Applied, BackendError>>;
        type Snapshot = Ready<Result<Vec<PoolSnapshot>, BackendError>>;

        fn acquire(&self, key: SlotKey, weight: u32) -> InProcessAcquire {
            self.0.acquire(key, weight)
        }

        fn apply(&self, op: SlotOp) -> Self::Apply {
            self.0.apply(op)
        }

        fn snapshot(&self) -> Self::Snapshot {
            self.0.snapshot()
        }
    }

    /// Ids short enough to be kept inline, exactly as long as the inline room, and longer.
    const LONG_IDS: [&str; 5] = [
        "8600000000000000001",
        "kr-0123456789abcdef0123456789abcdef",
        "kr-0123456789abcdef0123456789abcdef-xy",
        "kr-0123456789abcdef0123456789abcdef-and-then-some",
        "kr-0123456789abcdef0123456789abcdef-and-then-more",
    ];

    #[derive(Clone, Debug)]
    enum HoldOp {
        /// A create answered with these ids (task id, external id) by index into `LONG_IDS`.
        Hold(Option<usize>, Option<usize>),
        /// A report of a task: `(id, external, ended)`.
        Report(usize, Option<usize>, bool),
        /// `complete` by an id (task id or external id).
        Complete(usize),
        /// A query's answer reporting a task, read in place: `(id, external, ended)`.
        Observe(usize, Option<usize>, bool),
    }

    fn hold_ops() -> impl Strategy<Value = Vec<HoldOp>> {
        let id = 0..LONG_IDS.len();
        proptest::collection::vec(
            prop_oneof![
                (
                    proptest::option::of(id.clone()),
                    proptest::option::of(id.clone())
                )
                    .prop_map(|(i, e)| HoldOp::Hold(i, e)),
                (id.clone(), proptest::option::of(id.clone()), any::<bool>())
                    .prop_map(|(i, e, end)| HoldOp::Report(i, e, end)),
                id.clone().prop_map(HoldOp::Complete),
                (id.clone(), proptest::option::of(id), any::<bool>())
                    .prop_map(|(i, e, end)| HoldOp::Observe(i, e, end)),
            ],
            1..40,
        )
    }

    /// Every holding's external id is filed in the index, unless the holding is counted as
    /// displaced.
    fn check_externals(backend: &InProcess) {
        let state = backend.lock();
        let mut displaced = 0;
        for (index, pool) in state.list.iter().enumerate() {
            for (slot, holding) in pool.live() {
                let Some(ext) = &holding.external else {
                    assert!(!holding.displaced);
                    continue;
                };
                if holding.displaced {
                    displaced += 1;
                    continue;
                }
                let keys = &Kept(&state.list, Which::External);
                let found = state
                    .externals
                    .get(scope_of(&pool.key.account), ext.as_bytes(), keys);
                assert_eq!(found, Some((index, slot)));
            }
        }
        assert_eq!(state.displaced, displaced);
    }

    fn run_holds<B: SlotBackend>(
        backend: &B,
        ops: &[HoldOp],
        check: &dyn Fn(&B),
    ) -> Vec<(Vec<Released>, usize)> {
        let lease = Duration::from_secs(600);
        let mut seen = Vec::new();
        for op in ops {
            let released = match op {
                HoldOp::Hold(id, ext) => {
                    // Unread: what a create's answer does to the slots.
                    // A full pool: the acquire waits, and dropping it holds nothing.
                    let mut acquire = backend.acquire(key(), 1);
                    let polled =
                        Pin::new(&mut acquire).poll(&mut Context::from_waker(Waker::noop()));
                    let Poll::Ready(Ok(reservation)) = polled else {
                        continue;
                    };
                    // With a task id, as answered (the answer's arrival given); else as kept
                    // after an unknown outcome.
                    let answered = id.map(|_| Instant::now());
                    let (id, ext) = (id.map(|i| LONG_IDS[i]), ext.map(|i| LONG_IDS[i]));
                    let applied = now(backend.hold_unread(reservation, id, ext, lease, answered));
                    let applied = applied.unwrap();
                    assert!(applied.changed);
                    Vec::new()
                }
                HoldOp::Report(id, ext, end) => {
                    let update = super::super::TaskUpdate {
                        id: LONG_IDS[*id].to_owned(),
                        external_id: ext.map(|i| LONG_IDS[i].to_owned()),
                        status: Some(if *end {
                            TaskStatus::Succeeded
                        } else {
                            TaskStatus::Processing
                        }),
                    };
                    let op = SlotOp::Update {
                        account: key().account,
                        updates: vec![update],
                        lease,
                    };
                    now(backend.apply(op)).unwrap().released
                }
                HoldOp::Observe(id, ext, end) => {
                    let info = ext.map_or(String::new(), |e| {
                        format!(r#","task_info":{{"external_task_id":"{}"}}"#, LONG_IDS[e])
                    });
                    let status = if *end { "succeed" } else { "processing" };
                    let body = format!(
                        r#"{{"code":0,"message":"SUCCEED","request_id":"r","data":{{"task_id":"{}","task_status":"{status}"{info}}}}}"#,
                        LONG_IDS[*id]
                    );
                    let outcome = Outcome::parse(
                        http::StatusCode::OK,
                        &http::HeaderMap::new(),
                        body.as_bytes(),
                        Instant::now(),
                    )
                    .unwrap();
                    assert_eq!(outcome.tasks().len(), 1);
                    // Unread: `InProcess` lists nothing, the provided method's `apply` does.
                    now(backend.observe_unread(&key().account, &outcome, lease)).unwrap();
                    Vec::new()
                }
                HoldOp::Complete(id) => {
                    let op = SlotOp::Update {
                        account: key().account,
                        updates: vec![super::super::TaskUpdate {
                            id: LONG_IDS[*id].to_owned(),
                            external_id: None,
                            status: None,
                        }],
                        lease,
                    };
                    now(backend.apply(op)).unwrap().released
                }
            };
            let tasks = now(backend.snapshot())
                .unwrap()
                .first()
                .map_or(0, |p| p.tasks);
            check(backend);
            seen.push((released, tasks));
        }
        seen
    }

    proptest! {
        /// `InProcess::hold_unread` (ids copied inline, or boxed when long) keeps tasks as the
        /// provided method's `SlotOp::Hold` with owned ids does, and `InProcess::observe_unread`
        /// (the outcome read in place) ends and renews them as the provided `SlotOp::Observed`.
        #[test]
        fn a_borrowed_hold_keeps_tasks_as_an_owned_one_does(ops in hold_ops()) {
            let runtime = paused_runtime();
            let _entered = runtime.enter();
            let fast = InProcess::new(SlotsConfig::new(8)).unwrap();
            let provided = Provided(InProcess::new(SlotsConfig::new(8)).unwrap());
            let a = run_holds(&fast, &ops, &check_externals);
            let b = run_holds(&provided, &ops, &|_| ());
            let strip = |runs: Vec<(Vec<Released>, usize)>| -> Vec<(Vec<Option<Arc<str>>>, usize)> {
                runs.into_iter()
                    .map(|(r, n)| (r.into_iter().map(|r| r.task).collect(), n))
                    .collect()
            };
            prop_assert_eq!(strip(a), strip(b));
        }
    }

    #[derive(Clone, Debug)]
    enum AcquireOp {
        /// A create of this weight in pool `0` or `1` takes its slots at once or joins the queue.
        Acquire(bool, u32),
        /// The n-th granted reservation is given back.
        GiveBack(usize),
        /// The queued acquires are polled again.
        Poll,
        /// The n-th queued acquire is dropped.
        Drop(usize),
        /// The account is halted (by the n-th reservation, or by nothing held) or the halt lifted.
        Halt(usize),
        ResetHalt,
    }

    fn acquire_ops() -> impl Strategy<Value = Vec<AcquireOp>> {
        proptest::collection::vec(
            prop_oneof![
                4 => (any::<bool>(), 0..5u32).prop_map(|(p, w)| AcquireOp::Acquire(p, w)),
                2 => any::<usize>().prop_map(AcquireOp::GiveBack),
                1 => Just(AcquireOp::Poll),
                1 => any::<usize>().prop_map(AcquireOp::Drop),
                1 => any::<usize>().prop_map(AcquireOp::Halt),
                1 => Just(AcquireOp::ResetHalt),
            ],
            1..50,
        )
    }

    /// What each step of `ops` returned and left, as text.
    fn run_acquires<B: SlotBackend>(backend: &B, ops: &[AcquireOp]) -> Vec<String> {
        let pools = [
            key(),
            SlotKey::new(AccountId::new("a"), Pool::new(Product::Image)),
        ];
        let refused = Outcome::parse(
            http::StatusCode::TOO_MANY_REQUESTS,
            &http::HeaderMap::new(),
            br#"{"code":1102,"message":"no balance","request_id":"r"}"#,
            Instant::now(),
        )
        .unwrap();
        let cause = ApiError::from_outcome(&refused);
        let mut granted: Vec<Reservation> = Vec::new();
        let mut queued: Vec<B::Acquire> = Vec::new();
        let mut trace = Vec::new();
        for op in ops {
            let step = match op {
                AcquireOp::Acquire(p, weight) => {
                    match backend.acquire_now(pools[usize::from(*p)].clone(), *weight) {
                        Ok(Ok(reservation)) => {
                            granted.push(reservation.clone());
                            format!("granted {reservation:?}")
                        }
                        Ok(Err(error)) => format!("refused {error:?}"),
                        Err(acquire) => {
                            queued.push(acquire);
                            "queued".to_owned()
                        }
                    }
                }
                AcquireOp::GiveBack(n) if !granted.is_empty() => {
                    let reservation = granted.remove(n % granted.len());
                    format!("{:?}", now(backend.apply(SlotOp::GiveBack(reservation))))
                }
                AcquireOp::Poll => {
                    let mut out = String::new();
                    let mut still = Vec::new();
                    for mut acquire in queued.drain(..) {
                        match Pin::new(&mut acquire).poll(&mut Context::from_waker(Waker::noop())) {
                            Poll::Ready(Ok(reservation)) => {
                                out += &format!("granted {reservation:?}; ");
                                granted.push(reservation);
                            }
                            Poll::Ready(Err(error)) => out += &format!("refused {error:?}; "),
                            Poll::Pending => still.push(acquire),
                        }
                    }
                    queued = still;
                    out
                }
                AcquireOp::Drop(n) if !queued.is_empty() => {
                    drop(queued.remove(n % queued.len()));
                    "dropped".to_owned()
                }
                AcquireOp::Halt(n) if !granted.is_empty() => {
                    let reservation = granted.remove(n % granted.len());
                    let cause = cause.clone();
                    format!(
                        "{:?}",
                        now(backend.apply(SlotOp::Halt { reservation, cause }))
                    )
                }
                AcquireOp::ResetHalt => {
                    format!(
                        "{:?}",
                        now(backend.apply(SlotOp::ResetHalt(AccountId::new("a"))))
                    )
                }
                _ => continue,
            };
            let snapshot = now(backend.snapshot()).unwrap();
            trace.push(format!("{op:?}: {step} -> {snapshot:?}"));
        }
        trace
    }

    proptest! {
        /// `InProcess::acquire_now` (a grant under one lock, no future built) answers as the
        /// provided method, the first poll of `acquire`, does: grants, tokens, queueing,
        /// refusals (halted, too heavy) and what the pools hold.
        #[test]
        fn acquiring_now_answers_as_the_first_poll_of_an_acquire(ops in acquire_ops()) {
            let runtime = paused_runtime();
            let _entered = runtime.enter();
            let config = || SlotsConfig::new(3);
            let fast = InProcess::new(config()).unwrap();
            let provided = Provided(InProcess::new(config()).unwrap());
            prop_assert_eq!(run_acquires(&fast, &ops), run_acquires(&provided, &ops));
        }
    }

    /// One step of [`waiters_and_tasks_keep_their_invariants`].
    #[derive(Clone, Debug)]
    enum ModelOp {
        Acquire(usize, u32),
        Hold(usize),
        End(usize),
        Renew(usize),
        GiveBack(usize),
        Congested(usize),
        Halt(usize),
        ResetHalt,
        SetCap(usize, u32),
        Drop(usize),
        Advance(u64),
        EarlyEnd,
        EarlyComplete,
    }

    fn model_ops() -> impl Strategy<Value = Vec<ModelOp>> {
        proptest::collection::vec(
            prop_oneof![
                5 => (0..2usize, 1..10u32).prop_map(|(p, w)| ModelOp::Acquire(p, w)),
                3 => any::<usize>().prop_map(ModelOp::Hold),
                2 => any::<usize>().prop_map(ModelOp::End),
                1 => any::<usize>().prop_map(ModelOp::Renew),
                1 => any::<usize>().prop_map(ModelOp::GiveBack),
                1 => any::<usize>().prop_map(ModelOp::Congested),
                1 => any::<usize>().prop_map(ModelOp::Halt),
                1 => Just(ModelOp::ResetHalt),
                1 => (0..2usize, 0..11u32).prop_map(|(p, c)| ModelOp::SetCap(p, c)),
                1 => any::<usize>().prop_map(ModelOp::Drop),
                2 => prop_oneof![Just(1u64), Just(20), Just(100), Just(300), Just(700)]
                    .prop_map(ModelOp::Advance),
                1 => Just(ModelOp::EarlyEnd),
                1 => Just(ModelOp::EarlyComplete),
            ],
            1..60,
        )
    }

    proptest! {
        /// Random creates (weights 1 to 9 in a pool of 9), holds, ends, renewals, give-backs,
        /// 1303s, halts, capacity changes, dropped waiters, ends reported (again) before the hold
        /// by task id or by `complete` with the create's external id, and time passing, with
        /// and without a queue bound: after every step the slots in use are
        /// exactly what is granted, held and handed to waiters; no grant goes past the capacity;
        /// no waiter is served before one ahead of it; no lease ends early and no ended task
        /// holds; a waiter that was not woken is still pending when polled (no missed wake-up);
        /// and once everything ends, every waiter is served.
        #[test]
        fn waiters_and_tasks_keep_their_invariants(
            ops in model_ops(),
            mq in proptest::option::of(0..3usize),
            ri in prop_oneof![Just(5u64), Just(20), Just(1000)],
        ) {
            run_model(&ops, mq, ri)?;
        }
    }

    /// The run of [`waiters_and_tasks_keep_their_invariants`]: `mq`, the queue bound; `ri`, the
    /// recovery interval in seconds.
    fn run_model(ops: &[ModelOp], mq: Option<usize>, ri: u64) -> Result<(), TestCaseError> {
        let runtime = paused_runtime();
        let _entered = runtime.enter();
        let lease = Duration::from_secs(600);
        let image = Pool::new(Product::Image);
        let keys = [SlotKey::new(AccountId::new("a"), image.clone()), key()];
        let mut config = SlotsConfig::new(3)
            .pool_capacity(image, 9)
            .recovery_interval(Duration::from_secs(ri));
        if let Some(mq) = mq {
            config = config.max_queue(mq);
        }
        let backend = InProcess::new(config).unwrap();
        let cause = ApiError::from_outcome(
            &Outcome::parse(
                http::StatusCode::TOO_MANY_REQUESTS,
                &http::HeaderMap::new(),
                br#"{"code":1102,"message":"no balance","request_id":"r"}"#,
                Instant::now(),
            )
            .unwrap(),
        );
        let mut queued: Vec<(tokio_test::task::Spawn<InProcessAcquire>, usize, u32)> = Vec::new();
        let mut granted: Vec<Reservation> = Vec::new();
        let mut tasks: Vec<String> = Vec::new();
        let mut leases: HashMap<String, Instant> = HashMap::new();
        let mut early: HashMap<String, Instant> = HashMap::new();
        let mut next_id = 0;
        for op in ops {
            let before: Vec<(u32, u32)> = {
                let st = backend.lock();
                keys.iter()
                    .map(|k| {
                        st.pools
                            .get(k)
                            .map_or((0, 0), |&i| (st.list[i].in_use, st.list[i].capacity()))
                    })
                    .collect()
            };
            match op {
                ModelOp::Acquire(p, w) => {
                    let w = if *p == 1 { 1 } else { *w };
                    let mut f = tokio_test::task::spawn(backend.acquire(keys[*p].clone(), w));
                    match f.poll() {
                        Poll::Ready(Ok(r)) => granted.push(r),
                        Poll::Ready(Err(_)) => {}
                        Poll::Pending => queued.push((f, *p, w)),
                    }
                }
                ModelOp::Hold(n) if !granted.is_empty() => {
                    let r = granted.remove(n % granted.len());
                    next_id += 1;
                    let id = format!("t{next_id}");
                    if early.get(&id).is_none_or(|&t| t + lease <= Instant::now()) {
                        tasks.push(id.clone());
                        leases.insert(id.clone(), Instant::now() + lease);
                    }
                    now(backend.apply(SlotOp::Hold {
                        reservation: r,
                        task: TaskRef {
                            id: Some(id),
                            external_id: Some(format!("e{next_id}")),
                        },
                        lease,
                    }))
                    .unwrap();
                }
                ModelOp::End(n) | ModelOp::Renew(n) if !tasks.is_empty() => {
                    let end = matches!(op, ModelOp::End(_));
                    let id = if end {
                        tasks.remove(n % tasks.len())
                    } else {
                        tasks[n % tasks.len()].clone()
                    };
                    if end {
                        leases.remove(&id);
                    } else if leases[&id] > Instant::now() {
                        leases.insert(id.clone(), Instant::now() + lease);
                    }
                    let st = if end {
                        TaskStatus::Succeeded
                    } else {
                        TaskStatus::Processing
                    };
                    now(backend.apply(SlotOp::Update {
                        account: AccountId::new("a"),
                        updates: vec![super::super::TaskUpdate {
                            id,
                            external_id: None,
                            status: Some(st),
                        }],
                        lease,
                    }))
                    .unwrap();
                }
                ModelOp::GiveBack(n) if !granted.is_empty() => {
                    let r = granted.remove(n % granted.len());
                    now(backend.apply(SlotOp::GiveBack(r))).unwrap();
                }
                ModelOp::Congested(n) if !granted.is_empty() => {
                    let r = granted.remove(n % granted.len());
                    now(backend.apply(SlotOp::Congested(r))).unwrap();
                }
                ModelOp::Halt(n) if !granted.is_empty() => {
                    let r = granted.remove(n % granted.len());
                    now(backend.apply(SlotOp::Halt {
                        reservation: r,
                        cause: cause.clone(),
                    }))
                    .unwrap();
                }
                ModelOp::ResetHalt => {
                    now(backend.apply(SlotOp::ResetHalt(AccountId::new("a")))).unwrap();
                }
                ModelOp::SetCap(p, c) => {
                    now(backend.apply(SlotOp::SetCapacity {
                        account: None,
                        pool: keys[*p].pool.clone(),
                        capacity: *c,
                    }))
                    .unwrap();
                }
                ModelOp::Drop(n) if !queued.is_empty() => {
                    drop(queued.remove(n % queued.len()));
                }
                ModelOp::EarlyComplete => {
                    // `complete` by the next create's external id, before its answer.
                    early.insert(format!("t{}", next_id + 1), Instant::now());
                    now(backend.apply(SlotOp::Update {
                        account: AccountId::new("a"),
                        updates: vec![super::super::TaskUpdate {
                            id: format!("e{}", next_id + 1),
                            external_id: None,
                            status: None,
                        }],
                        lease,
                    }))
                    .unwrap();
                }
                ModelOp::EarlyEnd => {
                    let id = format!("t{}", next_id + 1);
                    early.insert(id.clone(), Instant::now());
                    now(backend.apply(SlotOp::Update {
                        account: AccountId::new("a"),
                        updates: vec![super::super::TaskUpdate {
                            id,
                            external_id: None,
                            status: Some(TaskStatus::Failed),
                        }],
                        lease,
                    }))
                    .unwrap();
                }
                ModelOp::Advance(s) => {
                    runtime.block_on(tokio::time::advance(Duration::from_secs(*s)));
                }
                _ => continue,
            }
            // Settle: poll woken futures until none is woken.
            let mut granted_now = Vec::new();
            loop {
                let mut any = false;
                let mut i = 0;
                while i < queued.len() {
                    if queued[i].0.is_woken() {
                        any = true;
                        match queued[i].0.poll() {
                            Poll::Ready(Ok(r)) => {
                                granted.push(r);
                                let q = queued.remove(i);
                                granted_now.push((q.1, q.0.token));
                                continue;
                            }
                            Poll::Ready(Err(_)) => {
                                drop(queued.remove(i));
                                continue;
                            }
                            Poll::Pending => {}
                        }
                    }
                    i += 1;
                }
                if !any {
                    break;
                }
            }
            for (p, t) in &granted_now {
                for q in &queued {
                    prop_assert!(
                        !(q.1 == *p && q.0.token.is_some() && q.0.token < *t),
                        "FIFO broken after {:?}",
                        op
                    );
                }
            }
            // Accounting (before any unwoken poll, which may run maintenance).
            {
                let st = backend.lock();
                let t = Instant::now();
                // Ends reported again take no room of their own.
                prop_assert!(st.ended.order.len() <= 2 * st.ended.len() + 64 + 1);
                for (id, until) in &leases {
                    let held = st
                        .ids
                        .contains(NO_SCOPE, id.as_bytes(), &Kept(&st.list, Which::Id));
                    prop_assert!(held || *until <= t, "{} released early", id);
                }
                for pool in &st.list {
                    for (_, h) in pool.live() {
                        let id = h.id.as_ref().unwrap().as_str().to_owned();
                        prop_assert!(leases.contains_key(&id), "{} held but ended", id);
                    }
                }
                for (pi, k) in keys.iter().enumerate() {
                    let Some(&i) = st.pools.get(k) else { continue };
                    let pool = &st.list[i];
                    let res: u32 = granted
                        .iter()
                        .filter(|r| r.key == *k)
                        .map(|r| r.weight)
                        .sum();
                    let held: u32 = pool.live().map(|(_, h)| h.weight).sum();
                    let pending: u32 = queued
                        .iter()
                        .filter(|q| {
                            q.1 == pi
                                && q.0
                                    .token
                                    .is_some_and(|t| pool.granted.iter().any(|g| g.0 == t))
                        })
                        .map(|q| q.2)
                        .sum();
                    prop_assert_eq!(
                        pool.in_use,
                        res + held + pending,
                        "accounting {:?} {:?}",
                        k,
                        op
                    );
                    prop_assert_eq!(pool.tasks, pool.live().count());
                    let (b_in, _) = before[pi];
                    prop_assert!(
                        pool.in_use <= pool.capacity()
                            || pool.in_use <= b_in
                            || matches!(op, ModelOp::SetCap(..)),
                        "over capacity {} > {} after {:?}",
                        pool.in_use,
                        pool.capacity(),
                        op
                    );
                }
            }
            // Missed wakeups: an unwoken future must still be pending.
            for (i, q) in queued.iter_mut().enumerate() {
                let r = q.0.poll();
                prop_assert!(
                    r.is_pending(),
                    "missed wakeup of #{} ({:?}) after {:?}: {:?}",
                    i,
                    q.1,
                    op,
                    r
                );
            }
        }
        // Liveness: everything ends, every waiter is served in time.
        now(backend.apply(SlotOp::ResetHalt(AccountId::new("a")))).unwrap();
        now(backend.apply(SlotOp::SetCapacity {
            account: None,
            pool: keys[0].pool.clone(),
            capacity: 9,
        }))
        .unwrap();
        now(backend.apply(SlotOp::SetCapacity {
            account: None,
            pool: keys[1].pool.clone(),
            capacity: 3,
        }))
        .unwrap();
        for id in tasks.drain(..) {
            now(backend.apply(SlotOp::Update {
                account: AccountId::new("a"),
                updates: vec![super::super::TaskUpdate {
                    id,
                    external_id: None,
                    status: None,
                }],
                lease,
            }))
            .unwrap();
        }
        for _ in 0..200 {
            for r in granted.drain(..) {
                now(backend.apply(SlotOp::GiveBack(r))).unwrap();
            }
            runtime.block_on(tokio::time::advance(Duration::from_secs(ri * 40)));
            let mut i = 0;
            while i < queued.len() {
                if queued[i].0.is_woken() {
                    match queued[i].0.poll() {
                        Poll::Ready(Ok(r)) => {
                            granted.push(r);
                            drop(queued.remove(i));
                            continue;
                        }
                        Poll::Ready(Err(_)) => {
                            drop(queued.remove(i));
                            continue;
                        }
                        Poll::Pending => {}
                    }
                }
                i += 1;
            }
            if queued.is_empty() {
                break;
            }
        }
        let snap = now(backend.snapshot()).unwrap();
        prop_assert!(
            queued.is_empty(),
            "stuck: {} waiters, {:?}",
            queued.len(),
            snap
        );
        Ok(())
    }

    /// A current-thread runtime with paused time, for tests that drive a backend directly.
    fn paused_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    }

    /// Runs `f` with a [`MetricLog`] as this thread's recorder, inside a paused runtime, on a
    /// backend of `slots` slots.
    fn with_metric_log(
        slots: u32,
        f: impl FnOnce(&MetricLog, &tokio::runtime::Runtime, &InProcess),
    ) {
        let log = MetricLog::default();
        let _recorder = metrics::set_default_local_recorder(&log);
        let runtime = paused_runtime();
        let _entered = runtime.enter();
        let backend = InProcess::new(SlotsConfig::new(slots)).unwrap();
        f(&log, &runtime, &backend);
    }

    /// Each way a task ends counts under its own status, the second time too (when its
    /// metrics are found by number rather than registered).
    #[test]
    fn each_ended_task_counts_under_its_status() {
        with_metric_log(9, |log, runtime, backend| {
            let end = |id: &str, status: Option<TaskStatus>| {
                let update = super::super::TaskUpdate {
                    id: id.to_owned(),
                    external_id: None,
                    status,
                };
                let lease = Duration::from_secs(600);
                let op = SlotOp::Update {
                    account: key().account,
                    updates: vec![update],
                    lease,
                };
                now(backend.apply_unread(op)).unwrap();
            };
            for round in 0..2 {
                let id = |n: u32| format!("t{round}-{n}");
                for n in 0..4 {
                    hold(backend, key(), Some(&id(n)), None);
                }
                end(&id(0), Some(TaskStatus::Succeeded));
                end(&id(1), Some(TaskStatus::Failed));
                end(&id(2), None);
                runtime.block_on(tokio::time::advance(Duration::from_secs(601)));
                now(backend.snapshot()).unwrap();
            }
            let counted = std::mem::take(&mut *log.statuses.lock().unwrap());
            let once = ["succeeded", "failed", "completed", "expired"];
            assert_eq!(counted, [once, once].concat());
        });
    }

    /// A lookup by external id that finds nothing gives back the slots of the create held
    /// under it: that create never happened, so no task ended. None counts as finished (it
    /// counted as a `completed` task, with a lifetime), and no slot hidden by a `1303` comes
    /// back for it (it brought one back, as a task of ours ending does).
    #[test]
    fn a_create_that_never_happened_is_no_finished_task_and_brings_no_hidden_slot_back() {
        with_metric_log(3, |log, _runtime, backend| {
            let state = |backend: &InProcess| {
                let pool = &now(backend.snapshot()).unwrap()[0];
                (pool.in_use, pool.capacity)
            };
            hold(backend, key(), None, Some("job-1"));
            let refused = now(backend.acquire(key(), 1)).unwrap();
            now(backend.apply(SlotOp::Congested(refused))).unwrap();
            assert_eq!(state(backend), (1, 1), "two slots hidden");
            let lookup = SlotOp::Update {
                account: key().account,
                updates: vec![super::super::TaskUpdate {
                    id: String::new(),
                    external_id: Some("job-1".to_owned()),
                    status: None,
                }],
                lease: Duration::from_secs(600),
            };
            now(backend.apply_unread(lookup)).unwrap();
            assert_eq!(state(backend), (0, 1), "given back; still two hidden");
            assert!(log.statuses.lock().unwrap().is_empty());
        });
    }

    #[test]
    fn a_borrowed_reason_labels_as_the_reason_it_stands_for() {
        let other = TaskStatus::Other("paused".to_owned());
        let statuses = [TaskStatus::Succeeded, TaskStatus::Failed, other];
        let mut whys: Vec<Why<'_>> = statuses.iter().map(Why::Ended).collect();
        whys.extend([Why::Completed, Why::LeaseExpired]);
        for why in &whys {
            assert_eq!(why.label(), why.reason().as_str());
        }
        let known: std::collections::HashSet<_> = whys.iter().filter_map(|w| w.known()).collect();
        assert_eq!(known.len(), 4, "one slot per usual reason");
    }

    /// Logs every increment of a counter by its `status` label (the finished-task counter),
    /// and every move of a gauge as (gauge name and pool label, the value it moved to), each
    /// series keeping its value as a recorder does.
    #[derive(Clone, Default)]
    struct MetricLog {
        statuses: Arc<Mutex<Vec<String>>>,
        gauges: Arc<Mutex<Vec<(String, f64)>>>,
        values: Arc<Mutex<HashMap<String, f64>>>,
        /// The gauge whose next move panics (once), moving nothing: in any of its series.
        fails: Arc<Mutex<Option<String>>>,
        /// The backend's lock, once set: each record notes whether it was held then.
        watched: Arc<Mutex<Option<Arc<Mutex<State>>>>>,
        /// Records made while the watched lock was held.
        under_lock: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl MetricLog {
        /// Notes a record made while the watched backend's lock is held (a try, not a wait:
        /// on this thread a held lock would deadlock a `lock()`).
        fn note_lock(&self) {
            let watched = self.watched.lock().unwrap().clone();
            if let Some(shared) = watched
                && matches!(shared.try_lock(), Err(std::sync::TryLockError::WouldBlock))
            {
                self.under_lock
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }

        fn moved(&self, series: &str, by: f64) {
            self.note_lock();
            let mut fails = self.fails.lock().unwrap();
            if fails.as_deref() == series.split(' ').next() {
                *fails = None;
                drop(fails);
                panic!("the metrics recorder panics");
            }
            drop(fails);
            let mut values = self.values.lock().unwrap();
            let value = values.entry(series.to_owned()).or_default();
            *value += by;
            self.gauges
                .lock()
                .unwrap()
                .push((series.to_owned(), *value));
        }
    }

    struct LoggedCounter(String, MetricLog);

    impl metrics::CounterFn for LoggedCounter {
        fn increment(&self, value: u64) {
            self.1.note_lock();
            for _ in 0..value {
                self.1.statuses.lock().unwrap().push(self.0.clone());
            }
        }
        fn absolute(&self, _: u64) {}
    }

    struct LoggedGauge(String, MetricLog);

    impl metrics::GaugeFn for LoggedGauge {
        fn increment(&self, by: f64) {
            self.1.moved(&self.0, by);
        }
        fn decrement(&self, by: f64) {
            self.1.moved(&self.0, -by);
        }
        fn set(&self, _: f64) {
            panic!("a pool's gauge moves by differences: pools may share its series");
        }
    }

    impl metrics::Recorder for MetricLog {
        fn describe_counter(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_gauge(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_histogram(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn register_counter(
            &self,
            key: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Counter {
            let status = key.labels().find(|l| l.key() == names::LABEL_STATUS);
            let status = status.map_or("", |l| l.value()).to_owned();
            metrics::Counter::from_arc(Arc::new(LoggedCounter(status, self.clone())))
        }
        fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            let pool = key.labels().find(|l| l.key() == names::LABEL_POOL);
            let name = match pool.map(metrics::Label::value) {
                Some(pool) if pool.ends_with(":other") => format!("{} {pool}", key.name()),
                _ => key.name().to_owned(),
            };
            metrics::Gauge::from_arc(Arc::new(LoggedGauge(name, self.clone())))
        }
        fn register_histogram(
            &self,
            _: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Histogram {
            metrics::Histogram::from_arc(Arc::new(LoggedHistogram(self.clone())))
        }
    }

    struct LoggedHistogram(MetricLog);

    impl metrics::HistogramFn for LoggedHistogram {
        fn record(&self, _: f64) {
            self.0.note_lock();
        }
    }

    #[test]
    fn a_gauge_is_set_when_its_value_changes_and_only_then() {
        with_metric_log(2, |log, _, backend| {
            let take = || std::mem::take(&mut *log.gauges.lock().unwrap());
            let granted = |r: Result<Result<Reservation, AcquireError>, InProcessAcquire>| match r {
                Ok(Ok(reservation)) => reservation,
                _ => panic!("not granted"),
            };
            let (used, cap, waiting) = (
                names::SLOTS_IN_USE,
                names::SLOTS_CAPACITY,
                names::SLOTS_WAITERS,
            );
            let s = |name: &str, v: f64| (name.to_owned(), v);
            // A new pool shows its capacity.
            let first = granted(backend.acquire_now(key(), 1));
            assert_eq!(take(), [s(cap, 2.0), s(used, 1.0)]);
            let second = granted(backend.acquire_now(key(), 1));
            assert_eq!(take(), [s(used, 2.0)]);
            // A create that waits: only the waiters changed.
            let Err(mut third) = backend.acquire_now(key(), 1) else {
                panic!("granted");
            };
            assert_eq!(take(), [s(waiting, 1.0)]);
            // Its slot is handed over: in use stays 2.
            now(backend.apply(SlotOp::GiveBack(first))).unwrap();
            assert_eq!(take(), [s(waiting, 0.0)]);
            let third = match Pin::new(&mut third).poll(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(Ok(reservation)) => reservation,
                other => panic!("{other:?}"),
            };
            assert_eq!(take(), []);
            // `1303`: in use and capacity change.
            now(backend.apply(SlotOp::Congested(second))).unwrap();
            assert_eq!(take(), [s(used, 1.0), s(cap, 1.0)]);
            now(backend.apply(SlotOp::GiveBack(third))).unwrap();
            assert_eq!(take(), [s(used, 0.0)]);
            // What the gauges show is what the pool holds.
            let snap = now(backend.snapshot()).unwrap();
            assert_eq!(
                (snap[0].in_use, snap[0].capacity, snap[0].waiters),
                (0, 1, 0)
            );
        });
    }

    /// Model pools past the named ones share one series per product: each gauge shows their
    /// sum, and a pool that is gone takes its share back out.
    /// A recorder that panics at a pool's second gauge leaves the first one right. Before,
    /// the pool noted what its gauges showed only once all three had moved: after a panic at
    /// the capacity gauge, the in-use gauge, moved already, was moved by the same change again
    /// at the next publish, and showed a slot fewer than held for good (here -1).
    #[test]
    fn a_gauge_moved_before_the_recorder_panics_is_not_moved_twice() {
        with_metric_log(2, |log, _, backend| {
            let granted = |r: Result<Result<Reservation, AcquireError>, InProcessAcquire>| match r {
                Ok(Ok(reservation)) => reservation,
                _ => panic!("not granted"),
            };
            let value = |series: &str| log.values.lock().unwrap().get(series).copied();
            let first = granted(backend.acquire_now(key(), 1));
            let second = granted(backend.acquire_now(key(), 1));
            // A `1303`: in use and capacity both change; the capacity gauge panics.
            *log.fails.lock().unwrap() = Some(names::SLOTS_CAPACITY.to_owned());
            let congested = std::panic::AssertUnwindSafe(|| {
                now(backend.apply(SlotOp::Congested(second))).unwrap();
            });
            assert!(std::panic::catch_unwind(congested).is_err());
            assert_eq!(value(names::SLOTS_IN_USE), Some(1.0));
            now(backend.apply(SlotOp::GiveBack(first))).unwrap();
            assert_eq!(value(names::SLOTS_IN_USE), Some(0.0), "what the pool holds");
            assert_eq!(value(names::SLOTS_CAPACITY), Some(1.0), "caught up");
        });
    }

    #[test]
    fn pools_sharing_a_label_add_up_in_its_gauges() {
        let log = MetricLog::default();
        let _recorder = metrics::set_default_local_recorder(&log);
        let runtime = paused_runtime();
        let _entered = runtime.enter();
        let backend = InProcess::new(SlotsConfig::new(2)).unwrap();
        let value = |series: &str| log.values.lock().unwrap().get(series).copied();
        let other = |name: &str| format!("{name} video:other");
        let (used, cap, waiting) = (
            other(names::SLOTS_IN_USE),
            other(names::SLOTS_CAPACITY),
            other(names::SLOTS_WAITERS),
        );
        // Names longer than any labelled by name: labelled `video:other` however many models
        // this process has labelled.
        let model = |n: u32| {
            let name = format!("{n}{}", "m".repeat(names::MODEL_LABEL_MAX_LEN));
            SlotKey::new(AccountId::new("a"), Pool::with_model(Product::Video, name))
        };
        let take = |key: SlotKey| match backend.acquire_now(key, 1) {
            Ok(Ok(reservation)) => reservation,
            _ => panic!("not granted"),
        };
        let a = take(model(1));
        let b = take(model(2));
        let _b2 = take(model(2));
        let Err(waiter) = backend.acquire_now(model(2), 1) else {
            panic!("granted");
        };
        assert_eq!(
            (value(&used), value(&cap), value(&waiting)),
            (Some(3.0), Some(4.0), Some(1.0))
        );
        drop(waiter);
        now(backend.apply(SlotOp::GiveBack(a))).unwrap();
        now(backend.apply(SlotOp::Congested(b))).unwrap();
        assert_eq!(
            (value(&used), value(&cap), value(&waiting)),
            (Some(1.0), Some(3.0), Some(0.0))
        );
        // The backend goes: its pools leave the series at zero.
        drop(backend);
        assert_eq!(
            (value(&used), value(&cap), value(&waiting)),
            (Some(0.0), Some(0.0), Some(0.0))
        );
    }

    #[test]
    fn the_id_hash_tells_apart_ids_that_differ_anywhere() {
        let ids = [
            "",
            "a",
            "b",
            "ab",
            "ba",
            "abcdefgh",
            "abcdefgi",
            "abcdefghi",
            "xbcdefghi",
        ];
        let hashes: std::collections::HashSet<u64> =
            ids.iter().map(|id| IdHash::hash(id.as_bytes())).collect();
        assert_eq!(hashes.len(), ids.len());
    }

    /// Keys built every way a caller builds them: interned or counted accounts, shared or
    /// separate model names, texts that differ or not.
    fn slot_keys() -> impl Strategy<Value = Vec<SlotKey>> {
        let account = (prop::sample::select(vec!["a", "b", "ab"]), any::<bool>()).prop_map(
            |(name, interned)| {
                if interned {
                    AccountId::interned(name)
                } else {
                    AccountId::new(name)
                }
            },
        );
        let model: Arc<str> = Arc::from("kling-v2");
        let pool = (0..5u8).prop_map(move |which| match which {
            0 => Pool::new(Product::Video),
            1 => Pool::new(Product::Image),
            2 => Pool::with_model(Product::Video, Arc::clone(&model)),
            3 => Pool::with_model(Product::Video, "kling-v2"),
            _ => Pool::with_model(Product::Video, "kling-v1"),
        });
        prop::collection::vec(
            (account, pool).prop_map(|(account, pool)| SlotKey::new(account, pool)),
            2..8,
        )
    }

    proptest! {
        #[test]
        fn the_key_shortcut_answers_as_key_equality(keys in slot_keys()) {
            for a in &keys {
                for b in &keys {
                    prop_assert_eq!(same_key(a, b), a == b, "{:?} {:?}", a, b);
                }
            }
        }
    }

    /// Two threads taking turns at keeping and ending a task each keep to a slot of their own,
    /// rather than take the one the other just freed (and its lines from the other's core).
    #[test]
    fn threads_taking_turns_keep_to_their_own_slots() {
        let backend = InProcess::new(SlotsConfig::new(10)).unwrap();
        let turns = std::sync::Barrier::new(2);
        let lives = |me: usize| {
            let mut used = Vec::new();
            for life in 0..200 {
                if me == 1 {
                    turns.wait();
                }
                let id = format!("t{me}-{life}");
                hold(&backend, key(), Some(&id), None);
                let state = backend.lock();
                let place = state
                    .ids
                    .get(NO_SCOPE, id.as_bytes(), &Kept(&state.list, Which::Id));
                used.push(place.expect("held").1);
                drop(state);
                assert_eq!(now(backend.apply(ended(&id))).unwrap().released.len(), 1);
                if me == 0 {
                    turns.wait();
                }
                turns.wait();
            }
            (lanes::current(), used)
        };
        let ((lane0, used0), (lane1, used1)) = std::thread::scope(|s| {
            let first = s.spawn(|| lives(0));
            let second = s.spawn(|| lives(1));
            (first.join().unwrap(), second.join().unwrap())
        });
        if lane0 == lane1 {
            // Threads of other tests took lanes in between (not under nextest): nothing to see.
            return;
        }
        assert!(used0.iter().all(|&slot| slot == used0[0]), "{used0:?}");
        assert!(used1.iter().all(|&slot| slot == used1[0]), "{used1:?}");
        assert_ne!(used0[0], used1[0]);
        assert_eq!(slots(&backend), 2);
    }

    /// The fields every create and query writes stay on the lines the layout puts them on
    /// (one line of a pool and one of the state, the state's read fields on the next; a
    /// pool's key, read by every change of the pool, off its written line), and each lane's
    /// slots, free list and ring of ended tasks on lines of their own, as are a pool's gauges.
    #[test]
    fn the_hot_fields_stay_on_their_cache_lines() {
        use std::mem::{align_of, offset_of, size_of};
        let pool_written = offset_of!(PoolState, streak) + size_of::<u32>();
        assert!(pool_written <= 64, "{pool_written}");
        assert!(offset_of!(PoolState, key) >= 64);
        assert!(offset_of!(PoolState, next_lease) < 64);
        assert!(align_of::<PoolState>() >= 64);
        assert!(align_of::<FreedRing>() >= 128 && align_of::<Shown>() >= 128);
        let externals = offset_of!(State, externals);
        let state_written = externals + offset_of!(Index, by_hash) + size_of::<usize>();
        assert!(state_written <= 64, "{state_written}");
        assert_eq!(offset_of!(Table, len), 0);
        let state_read = offset_of!(State, last) + size_of::<usize>();
        assert!(state_read <= 128, "{state_read}");
        assert!(align_of::<State>() >= 64);
        assert!(size_of::<Index>() <= 40);
        assert!(align_of::<Entry>() >= 128 && align_of::<FreeList>() >= 128);
    }

    /// How many slots the pool's holdings have (held or vacant).
    fn slots(backend: &InProcess) -> usize {
        backend.lock().list[0].holdings.len()
    }

    /// Holdings kept on one thread and ended on another, then both at once: a slot freed on
    /// one thread is reused on the other (the holdings grow only to the most held at once and
    /// a few per lane, however the threads share the work), no slot is handed out twice (each
    /// task is released once, by its own report), and every slot comes back.
    #[test]
    fn slots_freed_on_one_thread_are_reused_on_the_other_and_never_twice() {
        use std::sync::mpsc::sync_channel;
        const LIVES: usize = 20_000;
        // Held at once, at most: those in the channel, one kept but not sent, one received
        // but not ended yet (per direction).
        const QUEUED: usize = 4;
        let backend = InProcess::new(SlotsConfig::new(1_000)).unwrap();
        let release = |id: &str| {
            let applied = now(backend.apply(ended(id))).unwrap();
            assert_eq!(applied.released.len(), 1, "{id} released once");
        };
        // One thread keeps, the other ends: the ending thread's free list is the only one
        // that ever has slots.
        std::thread::scope(|s| {
            let (sent, received) = sync_channel::<String>(QUEUED);
            let (release, backend) = (&release, &backend);
            s.spawn(move || {
                for life in 0..LIVES {
                    let id = format!("one-{life}");
                    hold(backend, key(), Some(&id), None);
                    sent.send(id).unwrap();
                }
            });
            s.spawn(move || received.iter().for_each(|id| release(&id)));
        });
        assert_eq!(pool(&backend, "a"), (0, 0), "every slot came back");
        assert!(
            slots(&backend) <= QUEUED + 2 + LANES,
            "{} slots",
            slots(&backend)
        );
        // Both keep, each ends half of its own tasks and every task the other sends it.
        std::thread::scope(|s| {
            let (to_b, from_a) = sync_channel::<String>(QUEUED);
            let (to_a, from_b) = sync_channel::<String>(QUEUED);
            for (name, to, from) in [("a", to_b, from_b), ("b", to_a, from_a)] {
                let release = &release;
                let backend = &backend;
                s.spawn(move || {
                    for life in 0..LIVES {
                        let id = format!("{name}-{life}");
                        hold(backend, key(), Some(&id), None);
                        if life % 2 == 0 {
                            release(&id);
                        } else {
                            to.send(id).unwrap();
                        }
                        if life % 2 == 1 {
                            release(&from.recv().unwrap());
                        }
                    }
                });
            }
        });
        assert_eq!(pool(&backend, "a"), (0, 0), "every slot came back");
        assert!(
            slots(&backend) <= 2 * (QUEUED + 2) + LANES,
            "{} slots",
            slots(&backend)
        );
    }

    /// Notes, for each WARN this crate writes, whether the backend's lock was free then (a
    /// subscriber that takes it, or stalls on a slow writer, must not hold up every pool).
    struct LockWatch {
        shared: Arc<Mutex<State>>,
        free_at_warn: Arc<Mutex<Vec<bool>>>,
    }

    impl tracing::Subscriber for LockWatch {
        fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
            *metadata.level() <= tracing::Level::WARN
                && metadata.target().starts_with("kling_concurrency")
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, _: &tracing::Event<'_>) {
            // A try, not a wait: on this thread a held lock would deadlock a `lock()`.
            let free = self.shared.try_lock().is_ok();
            self.free_at_warn.lock().unwrap().push(free);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// The warning of a lease that ran out is written once the backend's lock is released,
    /// whichever path ends the lease: a snapshot, a waiting create's poll, and a create about
    /// to be refused by a full queue.
    #[tokio::test(start_paused = true)]
    async fn a_lease_that_runs_out_is_logged_outside_the_lock() {
        let lease = Duration::from_secs(600);
        let backend = InProcess::new(SlotsConfig::new(1).max_queue(1)).unwrap();
        let free_at_warn = Arc::new(Mutex::new(Vec::new()));
        let watch = LockWatch {
            shared: backend.shared.clone(),
            free_at_warn: free_at_warn.clone(),
        };
        let _guard = tracing::subscriber::set_default(watch);
        let warned = || std::mem::take(&mut *free_at_warn.lock().unwrap());

        // A snapshot.
        hold(&backend, key(), Some("t-snapshot"), None);
        tokio::time::advance(lease).await;
        assert_eq!(pool(&backend, "a"), (0, 0));
        assert_eq!(warned(), [true], "a snapshot");

        // A create waiting for the slot.
        hold(&backend, key(), Some("t-waited-for"), None);
        let mut waiting = tokio_test::task::spawn(backend.acquire(key(), 1));
        assert!(waiting.poll().is_pending());
        assert_eq!(warned(), Vec::<bool>::new(), "no lease ran out yet");
        tokio::time::advance(lease).await;
        let Poll::Ready(Ok(granted)) = waiting.poll() else {
            panic!("served when the lease ends")
        };
        assert_eq!(warned(), [true], "a waiting create");

        // A create the full queue would refuse, but for the lease that ran out.
        let op = SlotOp::Hold {
            reservation: granted,
            task: TaskRef {
                id: Some("t-queue-full".to_owned()),
                external_id: None,
            },
            lease,
        };
        now(backend.apply(op)).unwrap();
        let mut queued = tokio_test::task::spawn(backend.acquire(key(), 1));
        assert!(queued.poll().is_pending());
        tokio::time::advance(lease).await;
        // The freed slot goes to the create queued first, and this one joins the queue.
        let mut next = tokio_test::task::spawn(backend.acquire(key(), 1));
        assert!(next.poll().is_pending(), "not refused: the queue moved");
        assert_eq!(warned(), [true], "a create at a full queue");
        assert!(matches!(queued.poll(), Poll::Ready(Ok(_))));
    }

    /// Panics on every WARN of this crate, as a broken subscriber or layer would, counting
    /// them first.
    #[derive(Default)]
    struct PanicsOnWarn(Arc<std::sync::atomic::AtomicUsize>);

    impl tracing::Subscriber for PanicsOnWarn {
        fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
            *metadata.level() <= tracing::Level::WARN
                && metadata.target().starts_with("kling_concurrency")
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, _: &tracing::Event<'_>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            panic!("the subscriber fails");
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// A waiting create granted the slot of a lease that ran out, whose warning the subscriber
    /// panics on, gives the grant back before the panic goes on: the grant is plain data, and
    /// dropped in the unwinding it would keep the slot taken for good. Given back once: the
    /// future is done, and its drop gives nothing back again (another task's slot stays
    /// counted, where a second give-back would free it).
    #[tokio::test(start_paused = true)]
    async fn a_subscriber_panicking_on_the_lease_warning_keeps_no_slot() {
        let lease = Duration::from_secs(600);
        let backend = InProcess::new(SlotsConfig::new(2)).unwrap();
        hold(&backend, key(), Some("t-ran-out"), None);
        tokio::time::advance(Duration::from_secs(60)).await;
        hold(&backend, key(), Some("t-still-held"), None);
        let mut waiting = tokio_test::task::spawn(backend.acquire(key(), 1));
        assert!(waiting.poll().is_pending());
        tokio::time::advance(lease - Duration::from_secs(60)).await;
        let polled = {
            let _guard = tracing::subscriber::set_default(PanicsOnWarn::default());
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| waiting.poll()))
        };
        assert!(polled.is_err(), "the subscriber's panic goes on");
        drop(waiting);
        assert_eq!(
            pool(&backend, "a"),
            (1, 1),
            "the grant was given back, once"
        );
        assert!(
            now(backend.acquire(key(), 1)).is_ok(),
            "and is granted again"
        );
        let mut over = tokio_test::task::spawn(backend.acquire(key(), 1));
        assert!(over.poll().is_pending(), "and no slot was freed twice");
    }

    /// A create still waiting when the subscriber panics on the warning (the slot freed is
    /// too few for it) stays in the queue: polled again it still waits, and dropped it leaves,
    /// taking nothing along and holding up no create behind it.
    #[tokio::test(start_paused = true)]
    async fn a_subscriber_panicking_on_the_lease_warning_leaves_a_waiter_waiting() {
        let lease = Duration::from_secs(600);
        let backend = InProcess::new(SlotsConfig::new(2)).unwrap();
        hold(&backend, key(), Some("t-ran-out"), None);
        tokio::time::advance(Duration::from_secs(60)).await;
        hold(&backend, key(), Some("t-still-held"), None);
        let mut waiting = tokio_test::task::spawn(backend.acquire(key(), 2));
        assert!(waiting.poll().is_pending());
        tokio::time::advance(lease - Duration::from_secs(60)).await;
        let polled = {
            let _guard = tracing::subscriber::set_default(PanicsOnWarn::default());
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| waiting.poll()))
        };
        assert!(polled.is_err(), "the subscriber's panic goes on");
        let waiters = || now(backend.snapshot()).unwrap()[0].waiters;
        assert_eq!((pool(&backend, "a"), waiters()), ((1, 1), 1));
        assert!(waiting.poll().is_pending(), "still waiting");
        drop(waiting);
        assert_eq!((pool(&backend, "a"), waiters()), ((1, 1), 0));
        assert!(now(backend.acquire(key(), 1)).is_ok(), "nobody left ahead");
    }

    /// Polled while the thread already unwinds (a drop that finishes a create), a subscriber's
    /// panic on the warning is caught rather than aborting the process, and the create keeps
    /// the slot it was granted (given back, it would be counted free while the caller holds
    /// it).
    #[tokio::test(start_paused = true)]
    async fn a_lease_warning_panicking_while_unwinding_is_caught_and_the_grant_kept() {
        struct PollOnDrop<'a> {
            waiting: &'a mut tokio_test::task::Spawn<InProcessAcquire>,
            polled: &'a mut Option<Poll<Result<Reservation, AcquireError>>>,
        }
        impl Drop for PollOnDrop<'_> {
            fn drop(&mut self) {
                let _guard = tracing::subscriber::set_default(PanicsOnWarn::default());
                *self.polled = Some(self.waiting.poll());
            }
        }
        let lease = Duration::from_secs(600);
        let backend = InProcess::new(SlotsConfig::new(1)).unwrap();
        hold(&backend, key(), Some("t-ran-out"), None);
        let mut waiting = tokio_test::task::spawn(backend.acquire(key(), 1));
        assert!(waiting.poll().is_pending());
        tokio::time::advance(lease).await;
        let mut polled = None;
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _poll_on_drop = PollOnDrop {
                waiting: &mut waiting,
                polled: &mut polled,
            };
            panic!("the caller's own panic");
        }));
        assert!(unwound.is_err());
        assert!(matches!(polled, Some(Poll::Ready(Ok(_)))), "{polled:?}");
        assert_eq!(pool(&backend, "a"), (1, 0), "the create holds its grant");
    }

    /// One warning's panic leaves no other lease that ran out unwritten (the two of a
    /// snapshot), and then goes on; the slots are back all the same.
    #[tokio::test(start_paused = true)]
    async fn every_lease_is_warned_of_when_one_warning_panics() {
        let backend = InProcess::new(SlotsConfig::new(2)).unwrap();
        hold(&backend, key(), Some("t-first"), None);
        hold(&backend, key(), Some("t-second"), None);
        tokio::time::advance(Duration::from_secs(600)).await;
        let subscriber = PanicsOnWarn::default();
        let warned = subscriber.0.clone();
        let snapshot = {
            let _guard = tracing::subscriber::set_default(subscriber);
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| now(backend.snapshot())))
        };
        assert!(snapshot.is_err(), "the subscriber's panic goes on");
        assert_eq!(warned.load(std::sync::atomic::Ordering::Relaxed), 2);
        assert_eq!(pool(&backend, "a"), (0, 0));
    }

    /// The reservation a create of `key` is granted at once, if it is.
    fn granted_now(backend: &InProcess, key: SlotKey, weight: u32) -> Option<Reservation> {
        match backend.acquire_now(key, weight) {
            Ok(Ok(reservation)) => Some(reservation),
            Ok(Err(error)) => panic!("{error}"),
            Err(_waiting) => None,
        }
    }

    /// A reservation frees its slots once: given back again (a stale copy), forged (a token no
    /// grant has, a live grant's token with another weight), or named under another account's
    /// or pool's key, it frees nothing, changes nothing, and the pool stays at its limit; a
    /// stale `1303` hides no slot either. Before, every give-back took its weight off the
    /// count in use, whatever it named: a stale copy of a grant whose slot was granted again
    /// let one create more in than the pool has, to meet a `1303`.
    #[test]
    fn a_stale_or_forged_give_back_frees_no_slot() {
        let runtime = paused_runtime();
        let _entered = runtime.enter();
        let backend = InProcess::new(SlotsConfig::new(1)).unwrap();
        let first = granted_now(&backend, key(), 1).expect("the free slot");
        let stale = first.clone();
        assert!(now(backend.apply(SlotOp::GiveBack(first))).unwrap().changed);
        let second = granted_now(&backend, key(), 1).expect("the slot given back");
        let other_account = SlotKey::new(AccountId::new("b"), key().pool);
        let image = SlotKey::new(key().account, Pool::new(Product::Image));
        let forged = [
            stale.clone(),
            Reservation {
                token: second.token + 1_000,
                ..second.clone()
            },
            Reservation {
                weight: 2,
                ..second.clone()
            },
            Reservation {
                key: other_account,
                ..second.clone()
            },
            Reservation {
                key: image,
                ..second.clone()
            },
        ];
        for reservation in forged {
            let applied = now(backend.apply(SlotOp::GiveBack(reservation.clone()))).unwrap();
            assert!(
                granted_now(&backend, key(), 1).is_none(),
                "a slot past the limit after {reservation:?}"
            );
            assert_eq!(pool(&backend, "a"), (1, 0), "{reservation:?}");
            assert!(!applied.changed, "{reservation:?}");
        }
        now(backend.apply(SlotOp::Congested(stale))).unwrap();
        let snapshot = now(backend.snapshot()).unwrap();
        let video = snapshot.iter().find(|p| p.key == key()).unwrap();
        assert_eq!(
            (video.in_use, video.capacity),
            (1, 1),
            "no slot freed or hidden"
        );
        // The grant itself still goes back, once.
        assert!(
            now(backend.apply(SlotOp::GiveBack(second.clone())))
                .unwrap()
                .changed
        );
        assert_eq!(pool(&backend, "a"), (0, 0));
        let third = granted_now(&backend, key(), 1).expect("the slot given back");
        assert!(
            !now(backend.apply(SlotOp::GiveBack(second)))
                .unwrap()
                .changed
        );
        assert!(granted_now(&backend, key(), 1).is_none());
        now(backend.apply(SlotOp::GiveBack(third))).unwrap();
    }

    /// A stale reservation kept under a task (the same grant held twice, or held after it was
    /// given back) counts its slots: the task may run, and its end frees what the hold took,
    /// never a slot another create holds. Before, the hold took nothing (the slots were
    /// counted at the grant, long given back) and the task's end freed another's slot.
    #[test]
    fn a_stale_reservation_held_counts_its_slots() {
        let runtime = paused_runtime();
        let _entered = runtime.enter();
        let backend = InProcess::new(SlotsConfig::new(1)).unwrap();
        let first = granted_now(&backend, key(), 1).expect("the free slot");
        let stale = first.clone();
        now(backend.apply(SlotOp::GiveBack(first))).unwrap();
        let second = granted_now(&backend, key(), 1).expect("the slot given back");
        let op = SlotOp::Hold {
            reservation: stale,
            task: TaskRef {
                id: Some("t-stale".to_owned()),
                external_id: None,
            },
            lease: Duration::from_secs(600),
        };
        now(backend.apply(op)).unwrap();
        assert_eq!(pool(&backend, "a"), (2, 1), "the task counts");
        now(backend.apply(ended("t-stale"))).unwrap();
        assert_eq!(
            pool(&backend, "a"),
            (1, 0),
            "the create still holds its slot"
        );
        assert!(
            granted_now(&backend, key(), 1).is_none(),
            "none past the limit"
        );
        now(backend.apply(SlotOp::GiveBack(second))).unwrap();
        assert_eq!(pool(&backend, "a"), (0, 0));
    }

    /// Every metric (the gauges' moves, a finished task's count and lifetime) is recorded once
    /// the backend's lock is released: a slow recorder holds up no other create or query, and
    /// one that reads the limiter from a record (a snapshot) does not deadlock. The gauges still
    /// end at what the pool holds.
    #[test]
    fn metrics_are_recorded_once_the_lock_is_released() {
        with_metric_log(2, |log, runtime, backend| {
            *log.watched.lock().unwrap() = Some(backend.shared.clone());
            let value = |series: &str| log.values.lock().unwrap().get(series).copied();
            // A new pool, a grant, a hold, a query ending it.
            hold(backend, key(), Some("t-1"), None);
            now(backend.apply(ended("t-1"))).unwrap();
            // A create waiting, served by a give-back.
            let first = now(backend.acquire(key(), 1)).unwrap();
            let second = now(backend.acquire(key(), 1)).unwrap();
            let mut third = tokio_test::task::spawn(backend.acquire(key(), 1));
            assert!(third.poll().is_pending());
            now(backend.apply(SlotOp::GiveBack(first))).unwrap();
            let Poll::Ready(Ok(third)) = third.poll() else {
                panic!("served")
            };
            // A `1303`, a capacity set at run time, a task adopted.
            now(backend.apply(SlotOp::Congested(second))).unwrap();
            let capacity = SlotOp::SetCapacity {
                account: None,
                pool: key().pool,
                capacity: 4,
            };
            now(backend.apply(capacity)).unwrap();
            let adopt = SlotOp::Adopt {
                key: key(),
                task: TaskRef {
                    id: Some("t-adopted".to_owned()),
                    external_id: None,
                },
                weight: 1,
                lease: Duration::from_secs(600),
            };
            now(backend.apply(adopt)).unwrap();
            // A lease that runs out, seen by a snapshot, and one by a waiting create.
            let op = SlotOp::Hold {
                reservation: third,
                task: TaskRef {
                    id: Some("t-2".to_owned()),
                    external_id: None,
                },
                lease: Duration::from_secs(600),
            };
            now(backend.apply(op)).unwrap();
            let a = now(backend.acquire(key(), 1)).unwrap();
            let mut waiting = tokio_test::task::spawn(backend.acquire(key(), 1));
            assert!(waiting.poll().is_pending());
            runtime.block_on(tokio::time::advance(Duration::from_secs(601)));
            let Poll::Ready(Ok(b)) = waiting.poll() else {
                panic!("served when the leases end")
            };
            now(backend.snapshot()).unwrap();
            now(backend.apply(SlotOp::GiveBack(a))).unwrap();
            now(backend.apply(SlotOp::GiveBack(b))).unwrap();
            let under_lock = log.under_lock.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(under_lock, 0, "records made under the lock");
            assert!(
                log.statuses.lock().unwrap().len() >= 3,
                "finished tasks counted"
            );
            let snapshot = &now(backend.snapshot()).unwrap()[0];
            let held = (snapshot.in_use, snapshot.capacity, snapshot.waiters);
            assert_eq!(held.0, 0);
            assert_eq!(
                (
                    value(names::SLOTS_IN_USE),
                    value(names::SLOTS_CAPACITY),
                    value(names::SLOTS_WAITERS)
                ),
                (Some(0.0), Some(held.1.into()), Some(0.0))
            );
        });
    }

    /// A metrics recorder that panics as a lease runs out (its slots move the in-use gauge)
    /// leaves the lease's warning written, once the lock is released; the panic goes on, and
    /// the gauge catches up at the next change. Before, the panic unwound past the warnings
    /// collected to be written after the lock: the lease ended silently.
    #[test]
    fn a_lease_that_runs_out_is_warned_of_when_a_recorder_panics() {
        with_metric_log(1, |log, runtime, backend| {
            let value = |series: &str| log.values.lock().unwrap().get(series).copied();
            let free_at_warn = Arc::new(Mutex::new(Vec::new()));
            let watch = LockWatch {
                shared: backend.shared.clone(),
                free_at_warn: free_at_warn.clone(),
            };
            let _guard = tracing::subscriber::set_default(watch);
            hold(backend, key(), Some("t-ran-out"), None);
            runtime.block_on(tokio::time::advance(Duration::from_secs(600)));
            *log.fails.lock().unwrap() = Some(names::SLOTS_IN_USE.to_owned());
            let snapshot =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| now(backend.snapshot())));
            assert!(snapshot.is_err(), "the recorder's panic goes on");
            assert_eq!(*free_at_warn.lock().unwrap(), [true], "warned of, unlocked");
            assert_eq!(pool(backend, "a"), (0, 0));
            let granted = granted_now(backend, key(), 1).expect("the slot freed");
            now(backend.apply(SlotOp::GiveBack(granted))).unwrap();
            assert_eq!(value(names::SLOTS_IN_USE), Some(0.0));
        });
    }

    /// A metrics recorder that panics as a new pool's capacity is first shown leaves the
    /// capacity gauge right once it records again, and no slot taken by the create the panic
    /// went through. Before, the pool was dropped in the unwinding and took out of the gauge
    /// the capacity it never put in: the series showed minus the capacity, and zero once the
    /// pool was made again, for good.
    #[test]
    fn a_new_pools_capacity_is_shown_after_a_recorder_panics_on_it() {
        with_metric_log(2, |log, _, backend| {
            let value = |series: &str| log.values.lock().unwrap().get(series).copied();
            *log.fails.lock().unwrap() = Some(names::SLOTS_CAPACITY.to_owned());
            let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                granted_now(backend, key(), 1)
            }));
            assert!(first.is_err(), "the recorder's panic goes on");
            assert_eq!(pool(backend, "a"), (0, 0), "no slot kept for it");
            let granted = granted_now(backend, key(), 1).expect("a free slot");
            assert_eq!(
                (value(names::SLOTS_IN_USE), value(names::SLOTS_CAPACITY)),
                (Some(1.0), Some(2.0))
            );
            now(backend.apply(SlotOp::GiveBack(granted))).unwrap();
            assert_eq!(
                (value(names::SLOTS_IN_USE), value(names::SLOTS_CAPACITY)),
                (Some(0.0), Some(2.0))
            );
        });
    }

    /// A metrics recorder that panics as an idle pool makes way for a new one leaves nothing
    /// of the old pool in the gauges, and the new pool found by its key. Before, the panic at
    /// the first gauge the old pool took out (in use, at zero) left its capacity in the
    /// series for good, and the new pool unfiled.
    #[test]
    fn a_pool_making_way_leaves_nothing_behind_when_a_recorder_panics() {
        with_metric_log(1, |log, _, backend| {
            let total = |name: &str| -> f64 {
                let values = log.values.lock().unwrap();
                values
                    .iter()
                    .filter(|(series, _)| series.starts_with(name))
                    .map(|(_, value)| value)
                    .sum()
            };
            let model = |n: usize| {
                SlotKey::new(
                    AccountId::new("a"),
                    Pool::with_model(Product::Video, format!("making-way-{n}")),
                )
            };
            for n in 0..POOLS_BEFORE_REUSE {
                let granted = granted_now(backend, model(n), 1).expect("a free slot");
                now(backend.apply(SlotOp::GiveBack(granted))).unwrap();
            }
            let pools = POOLS_BEFORE_REUSE as f64;
            assert_eq!(total(names::SLOTS_CAPACITY), pools);
            for (n, series) in [names::SLOTS_IN_USE, names::SLOTS_CAPACITY]
                .into_iter()
                .enumerate()
            {
                let n = POOLS_BEFORE_REUSE + n;
                *log.fails.lock().unwrap() = Some(series.to_owned());
                let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    granted_now(backend, model(n), 1)
                }));
                assert!(made.is_err(), "the recorder's panic goes on ({series})");
                let granted = granted_now(backend, model(n), 1).expect("a free slot");
                assert_eq!(backend.lock().list.len(), POOLS_BEFORE_REUSE, "{series}");
                assert_eq!(total(names::SLOTS_CAPACITY), pools, "{series}");
                assert_eq!(total(names::SLOTS_IN_USE), 1.0, "{series}");
                now(backend.apply(SlotOp::GiveBack(granted))).unwrap();
                assert_eq!(total(names::SLOTS_IN_USE), 0.0, "{series}");
            }
        });
    }

    /// A metrics recorder that panics as a create is granted (at once, or served from the
    /// queue) takes no slot along: the grant goes back before the panic goes on, once.
    #[test]
    fn a_recorder_panicking_on_a_grant_keeps_no_slot() {
        with_metric_log(1, |log, runtime, backend| {
            let value = |series: &str| log.values.lock().unwrap().get(series).copied();
            let fail = |series: &str| *log.fails.lock().unwrap() = Some(series.to_owned());
            // Granted at once.
            granted_now(backend, key(), 1).map(|r| now(backend.apply(SlotOp::GiveBack(r))));
            fail(names::SLOTS_IN_USE);
            let at_once = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                granted_now(backend, key(), 1)
            }));
            assert!(at_once.is_err(), "the recorder's panic goes on");
            assert_eq!(pool(backend, "a"), (0, 0));
            // Served from the queue, as a lease runs out.
            hold(backend, key(), Some("t-ran-out"), None);
            let mut waiting = tokio_test::task::spawn(backend.acquire(key(), 1));
            assert!(waiting.poll().is_pending());
            runtime.block_on(tokio::time::advance(Duration::from_secs(600)));
            fail(names::SLOTS_WAITERS);
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| waiting.poll()));
            assert!(served.is_err(), "the recorder's panic goes on");
            drop(waiting);
            assert_eq!(pool(backend, "a"), (0, 0));
            let last = granted_now(backend, key(), 1).expect("the free slot");
            assert!(granted_now(backend, key(), 1).is_none(), "freed once");
            now(backend.apply(SlotOp::GiveBack(last))).unwrap();
            assert_eq!(
                (value(names::SLOTS_IN_USE), value(names::SLOTS_WAITERS)),
                (Some(0.0), Some(0.0))
            );
        });
    }

    /// Runs `f` on a new thread whose lane is not `lane` (threads take lanes in turn, so a few
    /// new threads reach another one whatever other tests' threads took meanwhile).
    fn on_another_lane<T: Send>(lane: usize, f: impl FnOnce() -> T + Send) -> T {
        let f = Mutex::new(Some(f));
        std::thread::scope(|s| {
            loop {
                let run = || {
                    (lanes::current() != lane).then(|| (f.lock().unwrap().take().expect("once"))())
                };
                if let Some(done) = s.spawn(run).join().unwrap() {
                    return done;
                }
            }
        })
    }

    /// A grant is settled where the runtime moved its task: granted on one worker thread
    /// (at once, or handed to a waiter there) and given back, kept under a task, or refused
    /// by a `1303` on another, it is one the backend handed out, and frees or keeps its slots
    /// once; the gauges end at what the pool holds.
    #[test]
    fn grants_settled_on_another_thread_free_their_slots_once() {
        let log = MetricLog::default();
        let value = |series: &str| log.values.lock().unwrap().get(series).copied();
        let backend = InProcess::new(SlotsConfig::new(3)).unwrap();
        let (backend, log) = (&backend, &log);
        // One thread: the pool's three slots granted, a fourth create waiting.
        let (lane, granted, waiting) = std::thread::scope(|s| {
            let grants = s.spawn(|| {
                let _recorder = metrics::set_default_local_recorder(log);
                let granted: Vec<Reservation> = (0..3)
                    .map(|_| granted_now(backend, key(), 1).expect("a free slot"))
                    .collect();
                let Err(waiting) = backend.acquire_now(key(), 1) else {
                    panic!("the pool is full")
                };
                (lanes::current(), granted, waiting)
            });
            grants.join().unwrap()
        });
        // Another: one given back (the waiter served), one kept, one refused by a 1303; the
        // waiter picks its grant up here.
        let served = on_another_lane(lane, move || {
            let _recorder = metrics::set_default_local_recorder(log);
            let [first, second, third]: [Reservation; 3] = granted.try_into().unwrap();
            let given_back = now(backend.apply(SlotOp::GiveBack(first))).unwrap();
            assert!(given_back.changed, "a grant of another thread goes back");
            let op = SlotOp::Hold {
                reservation: second,
                task: TaskRef {
                    id: Some("t-moved".to_owned()),
                    external_id: None,
                },
                lease: Duration::from_secs(600),
            };
            now(backend.apply(op)).unwrap();
            assert_eq!(pool(backend, "a"), (3, 1), "kept, not counted anew");
            let mut waiting = waiting;
            let Poll::Ready(Ok(served)) =
                Pin::new(&mut waiting).poll(&mut Context::from_waker(Waker::noop()))
            else {
                panic!("served by the give-back")
            };
            let refused = now(backend.apply(SlotOp::Congested(third))).unwrap();
            assert!(refused.changed, "a 1303 of another thread's grant counts");
            assert_eq!(pool(backend, "a"), (2, 1));
            (lanes::current(), served)
        });
        // And back: the waiter's grant, picked up on the second lane, goes back on a third
        // thread, then the task ends.
        let _recorder = metrics::set_default_local_recorder(log);
        let (second_lane, served) = served;
        on_another_lane(second_lane, || {
            let given_back = now(backend.apply(SlotOp::GiveBack(served))).unwrap();
            assert!(given_back.changed, "a waiter's grant goes back where it is");
        });
        assert_eq!(
            now(backend.apply(ended("t-moved"))).unwrap().released.len(),
            1
        );
        assert_eq!(pool(backend, "a"), (0, 0), "every slot back, none twice");
        let snapshot = &now(backend.snapshot()).unwrap()[0];
        assert_eq!(
            (
                value(names::SLOTS_IN_USE),
                value(names::SLOTS_CAPACITY),
                value(names::SLOTS_WAITERS)
            ),
            (Some(0.0), Some(snapshot.capacity.into()), Some(0.0))
        );
    }

    /// A lane's grants settled in any order (its list is not kept in grant order) each free
    /// their slot once: a stale copy of a settled one frees nothing, and the others are still
    /// listed and found.
    #[test]
    fn grants_settled_out_of_order_each_free_their_slot_once() {
        let runtime = paused_runtime();
        let _entered = runtime.enter();
        let backend = InProcess::new(SlotsConfig::new(4)).unwrap();
        let granted: Vec<Reservation> = (0..4)
            .map(|_| granted_now(&backend, key(), 1).expect("a free slot"))
            .collect();
        let lane = lanes::current();
        let listed = || -> Vec<u64> {
            let state = backend.lock();
            let mut tokens: Vec<u64> = state.list[0].free[lane]
                .grants
                .iter()
                .map(|g| g.0)
                .collect();
            tokens.sort_unstable();
            tokens
        };
        let order = [2, 0, 3, 1];
        for (n, &i) in order.iter().enumerate() {
            let give_back = || now(backend.apply(SlotOp::GiveBack(granted[i].clone())));
            assert!(give_back().unwrap().changed, "grant {i}");
            assert!(!give_back().unwrap().changed, "grant {i} again");
            let left: Vec<u64> = (0..4)
                .filter(|j| !order[..=n].contains(j))
                .map(|j| granted[j].token)
                .collect();
            assert_eq!(listed(), left);
            assert_eq!(pool(&backend, "a"), (3 - n as u32, 0));
        }
    }

    /// Ends filed on another thread's lane are remembered as those filed here: a listing's
    /// adopt on any thread finds them, and a lane's ring keeps its own last `MAX_ENDS_KEPT`
    /// (the ends another thread files push none of them out).
    #[test]
    fn ends_freed_on_another_thread_are_remembered_for_a_listing_here() {
        let runtime = paused_runtime();
        let _entered = runtime.enter();
        let backend = InProcess::new(SlotsConfig::new(4)).unwrap();
        let backend = &backend;
        hold(backend, key(), Some("t-here"), None);
        hold(backend, key(), Some("t-there"), None);
        now(backend.apply(ended("t-here"))).unwrap();
        let last = format!("x{}", MAX_ENDS_KEPT - 1);
        on_another_lane(lanes::current(), || {
            let runtime = paused_runtime();
            let _entered = runtime.enter();
            now(backend.apply(ended("t-there"))).unwrap();
            // More ends than a ring holds, after it: the first is pushed out of this lane's.
            for i in 0..MAX_ENDS_KEPT {
                let id = format!("x{i}");
                hold(backend, key(), Some(&id), None);
                now(backend.apply(ended(&id))).unwrap();
            }
        });
        assert_eq!(backend.lock().freed.len(), MAX_ENDS_KEPT + 1);
        let adopted = |id: &str| {
            let adopt = SlotOp::Adopt {
                key: key(),
                task: TaskRef {
                    id: Some(id.to_owned()),
                    external_id: None,
                },
                weight: 1,
                lease: Duration::from_secs(600),
            };
            now(backend.apply(adopt)).unwrap().changed
        };
        assert!(!adopted(&last), "filed on the other lane, found here");
        assert!(!adopted("x0"));
        assert!(!adopted("t-here"), "kept on this lane");
        assert!(adopted("t-there"), "pushed out of the other lane's ring");
    }

    /// Two threads create, give back, keep, end, meet `1303`s, drop waiting creates and set
    /// the capacity in a seeded interleaving, passing grants and tasks to each other: every
    /// grant handed back is one the backend handed out (it frees its slots, once, wherever it
    /// was granted), every task ends once, and the gauges end at what the pool holds.
    #[test]
    fn interleaved_changes_on_two_threads_leave_slots_and_gauges_exact() {
        use std::sync::atomic::AtomicU64;
        use std::sync::mpsc::{Receiver, Sender, channel};
        const STEPS: u64 = 10_000;
        enum Passed {
            Grant(Reservation),
            Task(String),
        }
        let log = MetricLog::default();
        let value = |series: &str| log.values.lock().unwrap().get(series).copied();
        let backend = InProcess::new(SlotsConfig::new(6)).unwrap();
        let backend = &backend;
        let log = &log;
        // How far each thread got (`u64::MAX` once it stops, also in a panic).
        let progress = [AtomicU64::new(0), AtomicU64::new(0)];
        struct Stopped<'a>(&'a AtomicU64);
        impl Drop for Stopped<'_> {
            fn drop(&mut self) {
                self.0.store(u64::MAX, Ordering::Release);
            }
        }
        let progress = &progress;
        let run = |me: usize, seed: u64, to: Sender<Passed>, from: Receiver<Passed>| {
            let (mine, other) = (&progress[me], &progress[1 - me]);
            let _stopped = Stopped(mine);
            let name = ["a", "b"][me];
            let _recorder = metrics::set_default_local_recorder(log);
            // Waiters behind a held task or a hidden slot arm a timer.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let _entered = runtime.enter();
            let mut rng = seed;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let (mut grants, mut tasks) = (Vec::new(), Vec::new());
            let mut waiting: Option<InProcessAcquire> = None;
            let give_back = |r: Reservation| {
                let applied = now(backend.apply_unread(SlotOp::GiveBack(r.clone()))).unwrap();
                assert!(applied.changed, "{r:?} handed out, given back");
            };
            for step in 0..STEPS {
                // Every call made its records before it returned.
                let left = PENDING
                    .with_borrow(|p| (p.records.len(), p.by, p.finished.is_some(), LEFT.get()));
                assert_eq!(left, (0, [0; 3], false, false), "left after step {step}");
                // In step, so that each takes what the other passes it.
                mine.store(step, Ordering::Release);
                while other.load(Ordering::Acquire).saturating_add(8) < step {
                    std::thread::yield_now();
                }
                while let Ok(passed) = from.try_recv() {
                    match passed {
                        Passed::Grant(r) => grants.push(r),
                        Passed::Task(id) => tasks.push(id),
                    }
                }
                match next() % 10 {
                    0 | 1 if waiting.is_none() => {
                        match backend.acquire_now(key(), 1 + (next() % 2) as u32) {
                            Ok(Ok(r)) => grants.push(r),
                            Ok(Err(error)) => panic!("{error}"),
                            Err(acquire) => waiting = Some(acquire),
                        }
                    }
                    2 => grants.pop().into_iter().for_each(give_back),
                    3 => {
                        if let Some(r) = grants.pop() {
                            to.send(Passed::Grant(r)).unwrap();
                        }
                    }
                    4 | 5 => {
                        if let Some(reservation) = grants.pop() {
                            let id = format!("{name}-{step}");
                            let op = SlotOp::Hold {
                                reservation,
                                task: TaskRef {
                                    id: Some(id.clone()),
                                    external_id: None,
                                },
                                lease: Duration::from_secs(600),
                            };
                            now(backend.apply_unread(op)).unwrap();
                            if next() % 2 == 0 {
                                tasks.push(id);
                            } else {
                                to.send(Passed::Task(id)).unwrap();
                            }
                        }
                    }
                    6 | 7 => {
                        if let Some(id) = tasks.pop() {
                            let released = now(backend.apply(ended(&id))).unwrap().released;
                            assert_eq!(released.len(), 1, "{id} ends once");
                        }
                    }
                    0 | 1 if next() % 4 == 0 => {
                        // A create that gives up: it leaves the queue, or its grant goes back.
                        waiting = None;
                    }
                    0 | 1 | 8 => {
                        if let Some(mut acquire) = waiting.take() {
                            let mut cx = Context::from_waker(Waker::noop());
                            match Pin::new(&mut acquire).poll(&mut cx) {
                                Poll::Ready(Ok(r)) => grants.push(r),
                                Poll::Ready(Err(error)) => panic!("{error}"),
                                Poll::Pending => waiting = Some(acquire),
                            }
                        }
                    }
                    _ => match next() % 8 {
                        0 => {
                            if let Some(r) = grants.pop() {
                                let op = SlotOp::Congested(r.clone());
                                let applied = now(backend.apply_unread(op)).unwrap();
                                assert!(applied.changed, "{r:?} handed out, refused");
                            }
                        }
                        1 => {
                            let op = SlotOp::SetCapacity {
                                account: None,
                                pool: key().pool,
                                capacity: 5 + (next() % 2) as u32,
                            };
                            now(backend.apply_unread(op)).unwrap();
                        }
                        _ => {}
                    },
                }
            }
            drop(waiting);
            grants.into_iter().for_each(give_back);
            for id in tasks {
                assert_eq!(now(backend.apply(ended(&id))).unwrap().released.len(), 1);
            }
            from
        };
        let (to_b, from_a) = channel();
        let (to_a, from_b) = channel();
        let (left_a, left_b) = std::thread::scope(|s| {
            let a = s.spawn(move || run(0, 0x9e37_79b9_7f4a_7c15, to_b, from_b));
            let b = s.spawn(move || run(1, 0xd1b5_4a32_d192_ed03, to_a, from_a));
            (a.join().unwrap(), b.join().unwrap())
        });
        // What each passed the other after it finished.
        let _recorder = metrics::set_default_local_recorder(log);
        for passed in left_a.try_iter().chain(left_b.try_iter()) {
            match passed {
                Passed::Grant(r) => {
                    let applied = now(backend.apply(SlotOp::GiveBack(r))).unwrap();
                    assert!(applied.changed);
                }
                Passed::Task(id) => {
                    assert_eq!(now(backend.apply(ended(&id))).unwrap().released.len(), 1);
                }
            }
        }
        let snapshot = &now(backend.snapshot()).unwrap()[0];
        assert_eq!(
            (snapshot.in_use, snapshot.tasks, snapshot.waiters),
            (0, 0, 0)
        );
        assert_eq!(
            (
                value(names::SLOTS_IN_USE),
                value(names::SLOTS_CAPACITY),
                value(names::SLOTS_WAITERS)
            ),
            (Some(0.0), Some(snapshot.capacity.into()), Some(0.0))
        );
        let grants: usize = backend.lock().list[0]
            .free
            .iter()
            .map(|l| l.grants.len())
            .sum();
        assert_eq!(grants, 0, "no grant left on any lane");
    }
}
