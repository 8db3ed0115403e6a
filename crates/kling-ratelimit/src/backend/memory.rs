//! The in-process backend: one governor GCRA limiter per key, on tokio time read once per
//! decision (governor's clock hands back the instant the deciding thread read).
//!
//! A key's governor state is one atomic cell (governor's own store is a compare-and-swap on an
//! atomic too), so the usual decision — a key this thread asked recently, no cooldown, the
//! quota unchanged, no adaptive rate below its ceiling — takes no lock and writes nothing but
//! that cell: the thread finds the key's limiter in a small per-thread list, without touching
//! the key table. Everything else (a new key, a cooldown, a quota change, adaptive keys below
//! their ceiling, feedback, sweeps) takes the backend's lock. A limiter that stops being the
//! key's (its quota changed, or the key was dropped as idle) is *retired*: its cell is swapped
//! for a mark that refuses every decision, so a thread still holding it asks the key table
//! instead and no two limiters of one key ever admit side by side.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::future::{Ready, ready};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use governor::RateLimiter;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use kling_core::RequestKind;
use tokio::time::Instant;

use super::{Backend, BucketKey, Decision, Feedback, KeyState, Policy, Reported, pause_until};
use crate::error::BackendError;
use crate::policy::{AdaptiveState, later};
use crate::quota::Quota;

/// The smallest number of locked decisions between two sweeps for idle keys.
const SWEEP_EVERY: usize = 1024;
/// How long the adaptive state of a key without traffic is kept, by default.
const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(600);
/// The state cell's "no measurement yet" (governor's `None`): once a request is admitted the
/// theoretical arrival time is at least one interval, never 0.
const EMPTY: u64 = 0;
/// The state cell of a retired limiter: every decision on it is refused (see [`TatCell`]).
const RETIRED: u64 = u64::MAX;
/// The largest burst tolerance (nanoseconds) a limiter may have and still be asked without the
/// lock: below it, a retired cell refuses every decision made within four centuries of its
/// start.
const LOCK_FREE_MAX_TAU: u64 = 1 << 62;
/// The keys a thread remembers per thread (over every backend): an account key and a class
/// key, for a couple of limiters.
const RECENT_KEYS: usize = 4;

/// A test's hook, run by a sweep between judging a key idle and retiring its limiter.
#[cfg(test)]
type SweepHook = Box<dyn FnMut(&Arc<Generation>)>;

#[cfg(test)]
thread_local! {
    /// Run by a sweep on this thread between judging a key idle and retiring its limiter: a
    /// test makes a decision there, as another thread could.
    static JUDGED_IDLE: RefCell<Option<SweepHook>> =
        const { RefCell::new(None) };
    /// Run by a decision on this thread as it ends a pause, between the burst's spending and
    /// the mark's clearing: a test makes a decision without the lock there, as another thread
    /// could.
    static ENDING_PAUSE: RefCell<Option<SweepHook>> =
        const { RefCell::new(None) };
}

thread_local! {
    /// The instant the calling thread decides at, in nanoseconds since its backend's base:
    /// governor's clock ([`DecidedAt`]) reads it, so a decision costs no second clock read.
    static DECIDING_AT: Cell<u64> = const { Cell::new(0) };
    /// The limiters this thread asked last (see [`Recent`]).
    static RECENT: RefCell<Recent> = const { RefCell::new(Recent::new()) };
    /// The state cell's value before and after this thread's last admission (a
    /// compare-and-swap [`TatCell`] made): [`InProcess::acquire_class_now`] gives a class turn
    /// back by swapping the one for the other, unless the cell moved on since.
    static TAKEN: Cell<(u64, u64)> = const { Cell::new((EMPTY, EMPTY)) };
}

/// governor's clock: the instant the deciding thread read (set in [`DECIDING_AT`] just before
/// each `check`, on the same thread).
#[derive(Debug, Clone, Copy)]
struct DecidedAt;

impl Clock for DecidedAt {
    /// Nanoseconds since the backend's base.
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(DECIDING_AT.with(Cell::get))
    }
}

/// A governor state store on one atomic cell holding the theoretical arrival time (relative to
/// the limiter's start), which the backend can also read, carry over and retire.
#[derive(Debug, Clone)]
struct TatCell(Arc<AtomicU64>);

impl StateStore for TatCell {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, _key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut prev = self.0.load(Ordering::Acquire);
        loop {
            if prev == RETIRED {
                // A theoretical arrival time at the end of time: governor refuses (for a
                // burst tolerance under `LOCK_FREE_MAX_TAU`, see `Generation::lock_free`), and
                // nothing is stored. The caller sees the mark and asks the key's current limiter.
                return f(Some(Nanos::from(RETIRED))).map(|(result, _)| result);
            }
            let (result, next) = f((prev != EMPTY).then(|| Nanos::from(prev)))?;
            match self.0.compare_exchange_weak(
                prev,
                next.as_u64(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    TAKEN.with(|taken| taken.set((prev, next.as_u64())));
                    return Ok(result);
                }
                Err(actual) => prev = actual,
            }
        }
    }
}

type Limiter = RateLimiter<NotKeyed, TatCell, DecidedAt, NoOpMiddleware<Nanos>>;

/// The nanoseconds from `start` to `now` (0 if `now` is earlier).
fn nanos_since(now: Instant, start: Instant) -> u64 {
    nanos(now.saturating_duration_since(start))
}

/// A duration in nanoseconds, without `as_nanos`'s u128 (saturating, past 584 years).
fn nanos(duration: Duration) -> u64 {
    duration
        .as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(duration.subsec_nanos()))
}

/// One key's governor limiter for one quota, from one start: a quota change or the key's
/// removal retires it and (for a change) makes the next.
struct Generation {
    limiter: Limiter,
    /// The limiter's state, shared with its store.
    tat: Arc<AtomicU64>,
    quota: Quota,
    /// governor's 0 for this limiter, in nanoseconds since the backend's base.
    start: u64,
    /// The end of the key's cooldown in nanoseconds since the base (0: none), so a decision
    /// without the lock sees a pause the locked path set.
    paused_until: AtomicU64,
    /// Whether a decision may skip the lock (see [`LOCK_FREE_MAX_TAU`]).
    lock_free: bool,
    /// governor's burst tolerance, `burst - 1` intervals, in nanoseconds.
    tau: u64,
    /// Whether the key's adaptive rate is at its ceiling, which this limiter's quota is, with
    /// nothing a success would change ([`Entry::mark_at_ceiling`]): an adaptive key then
    /// decides as a fixed quota does, without the lock, and its successes need no report. Set
    /// under the lock; cleared when the limiter is retired.
    at_ceiling: AtomicBool,
}

impl Generation {
    /// A limiter for `quota` started at `start`, owing `tat` (relative to `start`; [`EMPTY`]
    /// for none).
    fn new(quota: Quota, start: u64, tat: u64, paused_until: u64) -> Generation {
        let tat = Arc::new(AtomicU64::new(tat));
        let governor_quota = quota.to_governor();
        let tau = nanos(
            governor_quota
                .replenish_interval()
                .saturating_mul(governor_quota.burst_size().get().saturating_sub(1)),
        );
        // The limiter's start is its clock's reading now.
        DECIDING_AT.with(|at| at.set(start));
        Generation {
            limiter: RateLimiter::new(governor_quota, TatCell(Arc::clone(&tat)), DecidedAt),
            tat,
            quota,
            start,
            paused_until: AtomicU64::new(paused_until),
            lock_free: tau < LOCK_FREE_MAX_TAU,
            tau,
            at_ceiling: AtomicBool::new(false),
        }
    }

    /// governor's `check` at `now` (nanoseconds since the base): the limiter's clock reads it
    /// back, so governor decides at the instant the caller read. `None` when the limiter was
    /// retired (nothing taken: ask the key's current one).
    #[inline]
    fn check(&self, now: u64, base: Instant) -> Option<Decision> {
        DECIDING_AT.with(|at| at.set(now));
        match self.limiter.check() {
            Ok(()) => Some(Decision::Admit),
            Err(_) if self.tat.load(Ordering::Acquire) == RETIRED => None,
            Err(not_until) => Some(Decision::NotBefore {
                at: base + Duration::from(not_until.earliest_possible()),
                cooldown: false,
            }),
        }
    }

    /// Retires the limiter: from now on it refuses everything. Returns its last theoretical
    /// arrival time (relative to its start; [`EMPTY`] for none).
    fn retire(&self) -> u64 {
        self.at_ceiling.store(false, Ordering::Release);
        self.tat.swap(RETIRED, Ordering::AcqRel)
    }
}

/// The state of one key, under the backend's lock.
struct Entry {
    generation: Arc<Generation>,
    cooldown_until: Option<Instant>,
    streak: u32,
    last_pause: Option<Instant>,
    /// The end of the pause the streak's last 1302 set: the next 1302 adds to the streak when
    /// it comes within the window of it (the pause itself does not count).
    streak_pause_end: Option<Instant>,
    streak_expires: Option<Instant>,
    adaptive: Option<AdaptiveState>,
}

impl Entry {
    fn new(quota: Quota, now: u64) -> Entry {
        Entry {
            generation: Arc::new(Generation::new(quota, now, EMPTY, 0)),
            cooldown_until: None,
            streak: 0,
            last_pause: None,
            streak_pause_end: None,
            streak_expires: None,
            adaptive: None,
        }
    }

    /// The theoretical arrival time, absolute (the generation is never retired while the entry
    /// holds it).
    fn tat(&self, base: Instant) -> Option<Instant> {
        let generation = &self.generation;
        let rel = generation.tat.load(Ordering::Acquire);
        (rel != EMPTY && rel != RETIRED)
            .then(|| base + Duration::from_nanos(generation.start.saturating_add(rel)))
    }

    /// Admits a request at `now` or says when to ask again: the cooldown, then GCRA at the
    /// quota in force (changed first if the adaptive rate moved).
    fn decide(&mut self, policy: &Policy, now: Instant, base: Instant) -> Decision {
        if let Some(until) = self.cooldown_until {
            if until > now {
                return Decision::NotBefore {
                    at: until,
                    cooldown: true,
                };
            }
            self.cooldown_until = None;
            // The burst is spent before the mark that sends decisions without the lock here
            // is cleared: one made in between would find the burst whole.
            self.spend_burst_at(until, base);
            #[cfg(test)]
            ENDING_PAUSE.with_borrow_mut(|hook| {
                if let Some(hook) = hook {
                    hook(&self.generation);
                }
            });
            self.generation.paused_until.store(0, Ordering::Release);
        }
        let quota = self.effective(policy);
        let at = nanos_since(now, base);
        if quota != self.generation.quota {
            self.apply(quota, at);
        }
        if policy.adaptive.is_some() {
            self.mark_at_ceiling(policy);
        }
        self.generation
            .check(at, base)
            .expect("the key's own limiter is never retired")
    }

    /// Starts the key after a pause that ended at `until` with its burst spent: one request
    /// goes at `until`, the next ones an interval apart (the burst builds up again from then),
    /// rather than a whole burst at once into a server that just refused for going too fast.
    /// Done when the pause is over, not when it is set, so a quota change during the pause
    /// carries no pause in its debt.
    fn spend_burst_at(&mut self, until: Instant, base: Instant) {
        let generation = &self.generation;
        let spent = nanos_since(until, base)
            .saturating_add(generation.tau)
            .checked_sub(generation.start)
            .filter(|rel| *rel != EMPTY);
        if let Some(rel) = spent {
            // A retired cell (`RETIRED`, the largest value) stays retired.
            generation.tat.fetch_max(rel, Ordering::AcqRel);
        }
    }

    /// The quota to enforce now: the configured one, slowed to the adaptive rate.
    fn effective(&mut self, policy: &Policy) -> Quota {
        match &policy.adaptive {
            None => policy.quota,
            Some(config) => {
                let ceiling = policy.quota.rate_per_second();
                let state = self
                    .adaptive
                    .get_or_insert_with(|| AdaptiveState::new(config, ceiling));
                // A ceiling lowered since (`set_quota`) caps the rate the state holds too.
                state.cap(ceiling);
                policy.quota.at_most(state.rate())
            }
        }
    }

    /// Notes on the key's limiter whether its adaptive rate is at the ceiling with nothing a
    /// success would change: the limiter enforces the configured quota (the ceiling), no streak
    /// is running, and [`AdaptiveState::on_success`] leaves the state as it is (the rate grown
    /// is capped at the ceiling again, and nothing else moves: the rule is asked, not
    /// restated). Then neither a decision without the lock nor a success left unreported
    /// changes anything, until a 1302 (which clears the mark) or a quota change (which
    /// retires the limiter).
    fn mark_at_ceiling(&self, policy: &Policy) {
        let at_ceiling = self.streak == 0
            && self.generation.quota == policy.quota
            && match (&policy.adaptive, self.adaptive) {
                (Some(config), Some(state)) => {
                    let mut next = state;
                    next.on_success(config, policy.quota.rate_per_second());
                    next == state
                }
                _ => false,
            };
        self.generation
            .at_ceiling
            .store(at_ceiling, Ordering::Release);
    }

    /// Switches to a new quota at `now` (nanoseconds since the base), keeping the key's debt:
    /// the requests admitted but not yet paid off count the same number of emission intervals
    /// under the new quota. The old limiter is retired first, so nothing is admitted on it
    /// once its debt is read.
    fn apply(&mut self, quota: Quota, now: u64) {
        let old = &self.generation;
        let last = old.retire();
        let tat = (last != EMPTY)
            .then(|| old.start.saturating_add(last))
            .filter(|tat| *tat > now);
        let debt = tat.map(|tat| {
            // The intervals the limiters enforce: an unchecked quota's own may be zero or past
            // governor's range ([`Quota::to_governor`]), and an infinite ratio panicked.
            let interval = |quota: Quota| quota.to_governor().replenish_interval().as_secs_f64();
            let ratio = interval(quota) / interval(old.quota);
            Duration::from_nanos(tat - now).mul_f64(ratio)
        });
        // The new limiter starts at `now`: the debt is its theoretical arrival time.
        // (A debt of 0 decides as no debt: governor admits at once either way.)
        let rel = debt.map_or(EMPTY, nanos);
        let paused = old.paused_until.load(Ordering::Acquire);
        self.generation = Arc::new(Generation::new(quota, now, rel, paused));
    }

    fn is_idle(&self, now: Instant, idle_ttl: Duration, base: Instant) -> bool {
        let paid_off = self
            .tat(base)
            .unwrap_or(base + Duration::from_nanos(self.generation.start));
        // A pause no decision has cleared yet still owes its spent burst
        // ([`Entry::spend_burst_at`]): dropped before that is paid off, the key would come
        // back with its whole burst at the pause's end.
        let paid_off = self.cooldown_until.map_or(paid_off, |until| {
            paid_off.max(later(until, Duration::from_nanos(self.generation.tau)))
        });
        self.cooldown_until.is_none_or(|until| until <= now)
            && self.streak_expires.is_none_or(|at| at <= now)
            && paid_off <= now
            && (self.adaptive.is_none() || later(paid_off, idle_ttl) <= now)
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("applied", &self.generation.quota)
            .field("tat", &self.generation.tat.load(Ordering::Relaxed))
            .field("cooldown_until", &self.cooldown_until)
            .field("streak", &self.streak)
            .field("adaptive", &self.adaptive)
            .finish()
    }
}

#[derive(Debug, Default)]
struct State {
    /// foldhash rather than SipHash: one hash per locked decision is most of the map's cost,
    /// and the keys are the caller's own accounts (seeded per process all the same).
    ///
    /// The map holds each key's index in `entries`: a lookup copies an index out, so a known
    /// key costs one hash and no key clone.
    map: HashMap<BucketKey, usize, foldhash::fast::RandomState>,
    entries: Vec<(BucketKey, Entry)>,
    ops: usize,
}

/// A key by the address and length of its account's text: two keys with the same address and
/// length hold the same text, so they are the same key. [`Recent`] keeps a clone of the key
/// beside its id, so the address stays that text's while the id is remembered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KeyId {
    account: Option<(usize, usize)>,
    class: Option<RequestKind>,
}

impl KeyId {
    fn of(key: &BucketKey) -> KeyId {
        KeyId {
            account: key
                .account_id()
                .map(|account| (account.as_str().as_ptr() as usize, account.as_str().len())),
            class: key.request_kind(),
        }
    }
}

/// One remembered limiter: of which backend, for which key.
struct Remembered {
    backend: u64,
    id: KeyId,
    /// Keeps the account text at `id`'s address alive.
    _key: BucketKey,
    generation: Arc<Generation>,
}

/// The limiters a thread asked last, so the usual decision finds its key's limiter without the
/// key table (whose lookups would write its lock). A remembered limiter that was retired is
/// refused and replaced by the table's current one.
struct Recent {
    slots: [Option<Remembered>; RECENT_KEYS],
    /// The slot the next miss fills.
    next: usize,
}

impl Recent {
    const fn new() -> Recent {
        Recent {
            slots: [const { None }; RECENT_KEYS],
            next: 0,
        }
    }

    fn find(&self, backend: u64, id: KeyId) -> Option<&Arc<Generation>> {
        self.slots
            .iter()
            .flatten()
            .find(|slot| slot.backend == backend && slot.id == id)
            .map(|slot| &slot.generation)
    }

    fn remember(&mut self, backend: u64, key: &BucketKey, generation: Arc<Generation>) {
        let id = KeyId::of(key);
        let slot = match self.slots.iter().position(|slot| {
            slot.as_ref()
                .is_some_and(|s| s.backend == backend && s.id == id)
        }) {
            Some(at) => at,
            None => {
                let at = self.next;
                self.next = (at + 1) % RECENT_KEYS;
                at
            }
        };
        self.slots[slot] = Some(Remembered {
            backend,
            id,
            _key: key.clone(),
            generation,
        });
    }
}

/// The in-process [`Backend`]: one governor GCRA limiter per key on tokio time, with the key's
/// cooldown and adaptive state beside it. The clock is read once per decision; the limiter's
/// clock hands governor that instant.
///
/// Every decision is synchronous (its futures are [`Ready`]) and allocates nothing on the
/// success path. A key this thread asked recently, with no cooldown running, its quota
/// unchanged and no adaptive rate below its ceiling, is decided without a lock (one
/// compare-and-swap on the key's governor state); anything else takes one lock. An adaptive
/// key at its ceiling, where a success changes nothing, says so
/// ([`Backend::adaptive_at_ceiling`]), so its successes are not reported either. Keys are
/// dropped once idle — their GCRA state paid off (the burst a pause's end spends included),
/// no cooldown or streak running, and for adaptive keys no traffic for the idle TTL (ten
/// minutes unless set) — in sweeps that cost O(1) amortized per locked decision, so the map
/// stays bounded by the keys active recently.
///
/// Decisions of one key made at the same time on several threads may reach its state in
/// another order than their instants; GCRA still admits no more than the quota in any window
/// of decision instants (each admission moves the theoretical arrival time on by one interval,
/// and an earlier instant only makes the test stricter).
pub struct InProcess {
    state: Mutex<State>,
    idle_ttl: Option<Duration>,
    /// Instants are kept as nanoseconds since this one.
    base: Instant,
    /// Which backend a thread's remembered limiters belong to.
    id: u64,
}

impl Default for InProcess {
    fn default() -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        InProcess {
            state: Mutex::default(),
            idle_ttl: None,
            base: Instant::now(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl fmt::Debug for InProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InProcess")
            .field("state", &self.state)
            .field("idle_ttl", &self.idle_ttl)
            .finish()
    }
}

impl InProcess {
    /// An empty backend.
    pub fn new() -> Self {
        InProcess::default()
    }

    /// Keeps the adaptive state of a key without traffic for `ttl` (default ten minutes).
    pub fn with_idle_ttl(mut self, ttl: Duration) -> Self {
        self.idle_ttl = Some(ttl);
        self
    }

    /// The number of keys held.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every idle key now (otherwise done in passing).
    pub fn sweep(&self) {
        let mut state = self.lock();
        self.sweep_locked(&mut state);
    }

    /// A snapshot of one key's state.
    pub fn key_state(&self, key: &BucketKey) -> Option<KeyState> {
        let state = self.lock();
        let entry = &state.entries[*state.map.get(key)?].1;
        Some(KeyState {
            effective: entry.generation.quota,
            cooldown_until: entry.cooldown_until.filter(|until| *until > Instant::now()),
            streak: entry.streak,
            adaptive_rate: entry.adaptive.map(|a| a.rate()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the idle keys, retiring each one's limiter in the same step as its idleness is
    /// confirmed (a compare-and-swap from the paid-off state): a decision that slipped in
    /// between keeps the key.
    fn sweep_locked(&self, state: &mut State) {
        let now = Instant::now();
        let ttl = self.idle_ttl.unwrap_or(DEFAULT_IDLE_TTL);
        let base = self.base;
        state.entries.retain(|(_, entry)| {
            let observed = entry.generation.tat.load(Ordering::Acquire);
            if !entry.is_idle(now, ttl, base) {
                return true;
            }
            // A decision without the lock may land here, between the check and the retirement.
            #[cfg(test)]
            JUDGED_IDLE.with_borrow_mut(|hook| {
                if let Some(hook) = hook {
                    hook(&entry.generation);
                }
            });
            let retired = entry
                .generation
                .tat
                .compare_exchange(observed, RETIRED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
            if retired {
                entry.generation.at_ceiling.store(false, Ordering::Release);
            }
            !retired
        });
        state.map.clear();
        for (at, (key, _)) in state.entries.iter().enumerate() {
            state.map.insert(key.clone(), at);
        }
        state.ops = 0;
    }

    fn entry<'a>(
        &self,
        state: &'a mut State,
        key: &BucketKey,
        policy: &Policy,
        now: Instant,
    ) -> &'a mut Entry {
        state.ops += 1;
        if state.ops >= SWEEP_EVERY.max(state.map.len()) {
            self.sweep_locked(state);
        }
        let at = match state.map.get(key) {
            Some(&at) => at,
            None => {
                let at = state.entries.len();
                state.map.insert(key.clone(), at);
                let entry = Entry::new(policy.quota, nanos_since(now, self.base));
                state.entries.push((key.clone(), entry));
                at
            }
        };
        &mut state.entries[at].1
    }

    /// [`Backend::acquire`], synchronously.
    pub fn acquire_now(&self, key: &BucketKey, policy: &Policy) -> Decision {
        self.acquire_decided(key, policy).0
    }

    /// [`Backend::acquire`], synchronously, with the instant it decided at (read once).
    #[inline]
    fn acquire_decided(&self, key: &BucketKey, policy: &Policy) -> (Decision, Instant) {
        if let Some(decided) = self.decide_remembered_with(key, policy, Instant::now) {
            return decided;
        }
        self.acquire_locked(key, policy)
    }

    /// The decision without the lock, at the instant `now` reads (only once a limiter is
    /// found: a miss costs no clock read), on the limiter this thread remembers for `key`:
    /// `None` when there is none, or it was retired, or the key is paused or its quota changed,
    /// or its adaptive rate is not at the ceiling (the locked path decides those).
    fn decide_remembered_with(
        &self,
        key: &BucketKey,
        policy: &Policy,
        now: impl FnOnce() -> Instant,
    ) -> Option<(Decision, Instant)> {
        let id = KeyId::of(key);
        // (A thread tearing down its locals asks under the lock.)
        let recent = RECENT.try_with(|recent| {
            let recent = recent.borrow();
            let generation = recent.find(self.id, id)?;
            let now = now();
            let at = nanos_since(now, self.base);
            if !generation.lock_free
                || generation.quota != policy.quota
                // A pause that ended is cleared under the lock (the burst is spent then).
                || generation.paused_until.load(Ordering::Acquire) != 0
                // An adaptive rate below its ceiling moves with every success and 1302.
                || (policy.adaptive.is_some() && !generation.at_ceiling.load(Ordering::Acquire))
            {
                return None;
            }
            generation
                .check(at, self.base)
                .map(|decision| (decision, now))
        });
        recent.ok().flatten()
    }

    /// [`InProcess::decide_remembered_with`] at `now`.
    #[cfg(test)]
    fn decide_remembered(
        &self,
        key: &BucketKey,
        policy: &Policy,
        now: Instant,
    ) -> Option<Decision> {
        self.decide_remembered_with(key, policy, || now)
            .map(|(decision, _)| decision)
    }

    /// The limiter this thread remembers for `key`, if any.
    #[cfg(test)]
    fn remembered(&self, key: &BucketKey) -> Option<Arc<Generation>> {
        RECENT.with_borrow(|recent| recent.find(self.id, KeyId::of(key)).cloned())
    }

    /// The decision under the lock, at the instant read under it; remembers the key's limiter
    /// for this thread's next decisions.
    fn acquire_locked(&self, key: &BucketKey, policy: &Policy) -> (Decision, Instant) {
        let mut state = self.lock();
        let now = Instant::now();
        let base = self.base;
        let entry = self.entry(&mut state, key, policy, now);
        let decision = entry.decide(policy, now, base);
        let generation = &entry.generation;
        let remember = (generation.lock_free
            && (policy.adaptive.is_none() || generation.at_ceiling.load(Ordering::Relaxed)))
        .then(|| Arc::clone(generation));
        drop(state);
        if let Some(generation) = remember {
            let _ = RECENT.try_with(|recent| {
                recent.borrow_mut().remember(self.id, key, generation);
            });
        }
        (decision, now)
    }

    /// [`Backend::acquire_class_or_refuse`], synchronously, with the instant it decided at: the
    /// class key `class`'s turn and its account key `account`'s, both or neither. Decided under
    /// the lock; the class's turn, taken first, is given back when the account refuses, unless
    /// a decision of the class without the lock (another thread's) came in between, which then
    /// keeps it spent.
    pub fn acquire_class_now(
        &self,
        class: &BucketKey,
        class_policy: &Policy,
        account: &BucketKey,
        account_policy: &Policy,
    ) -> (Decision, Instant) {
        let mut state = self.lock();
        let now = Instant::now();
        let base = self.base;
        let entry = self.entry(&mut state, class, class_policy, now);
        let decision = entry.decide(class_policy, now, base);
        if decision != Decision::Admit {
            return (decision, now);
        }
        let (before, after) = TAKEN.with(Cell::get);
        // The limiter that decided (a quota change in `decide` makes a new one).
        let class_tat = Arc::clone(&entry.generation.tat);
        let entry = self.entry(&mut state, account, account_policy, now);
        let decision = entry.decide(account_policy, now, base);
        if decision != Decision::Admit {
            // Failing, another decision moved the cell on from this one's: it stays spent.
            let _ = class_tat.compare_exchange(after, before, Ordering::AcqRel, Ordering::Acquire);
        }
        (decision, now)
    }

    /// [`Backend::feedback`], synchronously.
    pub fn feedback_now(&self, key: &BucketKey, policy: &Policy, feedback: Feedback) -> Reported {
        let mut state = self.lock();
        let base = self.base;
        let entry = self.entry(&mut state, key, policy, Instant::now());
        let reported = Self::feedback_locked(entry, policy, feedback, base);
        if policy.adaptive.is_some() {
            // A 1302 takes the key off its ceiling at once, before its next decision (which
            // applies the lowered rate) and for a decision another thread makes without the
            // lock meanwhile.
            entry.mark_at_ceiling(policy);
        }
        reported
    }

    fn feedback_locked(
        entry: &mut Entry,
        policy: &Policy,
        feedback: Feedback,
        base: Instant,
    ) -> Reported {
        let ceiling = policy.quota.rate_per_second();
        match feedback {
            // A success of a request sent before the last pause began says nothing about the
            // rate since (as a 1302 sent then does not escalate the pause): the streak and the
            // adaptive rate are left alone.
            Feedback::Success { sent_at }
                if entry.last_pause.is_some_and(|last| sent_at < last) =>
            {
                Reported {
                    cooldown_until: None,
                    streak: entry.streak,
                }
            }
            Feedback::Success { .. } => {
                entry.streak = 0;
                entry.streak_expires = None;
                if let (Some(config), Some(adaptive)) = (&policy.adaptive, entry.adaptive.as_mut())
                {
                    adaptive.on_success(config, ceiling);
                }
                Reported {
                    cooldown_until: None,
                    streak: 0,
                }
            }
            Feedback::Pause {
                sent_at,
                received_at,
                resume_at,
                throttled,
            } => {
                let fresh = entry.last_pause.is_none_or(|last| sent_at >= last);
                if throttled && fresh {
                    let window = policy.cooldown.window;
                    // Measured from the end of the last pause, not its start: a pause as long as
                    // the window (the default ceiling is) must not end the streak it escalates.
                    let within = entry.streak > 0
                        && entry.streak_pause_end.is_some_and(|end| {
                            received_at.saturating_duration_since(end) <= window
                        });
                    entry.streak = if within {
                        entry.streak.saturating_add(1)
                    } else {
                        1
                    };
                    entry.last_pause = Some(received_at);
                    if let Some(config) = &policy.adaptive {
                        let adaptive = entry
                            .adaptive
                            .get_or_insert_with(|| AdaptiveState::new(config, ceiling));
                        // What the server asked for, from the answer's arrival: the cost of
                        // the refusal ([`Adaptive`](crate::Adaptive)'s caution).
                        let retry_after =
                            resume_at.map(|at| at.saturating_duration_since(received_at));
                        adaptive.on_throttle_retry_after(
                            config,
                            ceiling,
                            entry.streak,
                            &policy.cooldown,
                            retry_after,
                        );
                    }
                }
                let until = pause_until(
                    &policy.cooldown,
                    entry.generation.quota.period(),
                    entry.streak,
                    received_at,
                    resume_at,
                    throttled,
                );
                if throttled && fresh {
                    entry.streak_pause_end = Some(until);
                    entry.streak_expires = Some(later(until, policy.cooldown.window));
                }
                let extends =
                    until > Instant::now() && entry.cooldown_until.is_none_or(|c| until > c);
                if extends {
                    entry.cooldown_until = Some(until);
                    // Seen by decisions without the lock, which then take it.
                    entry
                        .generation
                        .paused_until
                        .store(nanos_since(until, base).max(1), Ordering::Release);
                }
                Reported {
                    cooldown_until: extends.then_some(until),
                    streak: entry.streak,
                }
            }
        }
    }

    /// [`Backend::adaptive_at_ceiling`]: what the limiter this thread remembers for `key` says
    /// (a key this thread has not decided on lately is not at its ceiling as far as this answer
    /// goes).
    #[inline]
    fn at_ceiling_now(&self, key: &BucketKey, policy: &Policy) -> bool {
        let id = KeyId::of(key);
        RECENT
            .try_with(|recent| {
                recent.borrow().find(self.id, id).is_some_and(|generation| {
                    generation.quota == policy.quota
                        && generation.at_ceiling.load(Ordering::Acquire)
                })
            })
            .unwrap_or(false)
    }
}

impl Backend for InProcess {
    type AcquireFuture = Ready<Result<Decision, BackendError>>;
    type FeedbackFuture = Ready<Result<Reported, BackendError>>;

    fn acquire(&self, key: &BucketKey, policy: &Policy) -> Self::AcquireFuture {
        ready(Ok(self.acquire_now(key, policy)))
    }

    #[inline]
    fn acquire_noting(
        &self,
        key: &BucketKey,
        policy: &Policy,
        decided_at: &mut Option<Instant>,
    ) -> Self::AcquireFuture {
        let (decision, at) = self.acquire_decided(key, policy);
        *decided_at = Some(at);
        ready(Ok(decision))
    }

    fn acquire_class_or_refuse(
        &self,
        class: &BucketKey,
        class_policy: &Policy,
        account: &BucketKey,
        account_policy: &Policy,
        decided_at: &mut Option<Instant>,
    ) -> Option<Self::AcquireFuture> {
        let (decision, at) = self.acquire_class_now(class, class_policy, account, account_policy);
        *decided_at = Some(at);
        Some(ready(Ok(decision)))
    }

    fn feedback(
        &self,
        key: &BucketKey,
        policy: &Policy,
        feedback: Feedback,
    ) -> Self::FeedbackFuture {
        ready(Ok(self.feedback_now(key, policy, feedback)))
    }

    #[inline]
    fn adaptive_at_ceiling(&self, key: &BucketKey, policy: &Policy) -> bool {
        self.at_ceiling_now(key, policy)
    }
}

#[cfg(test)]
mod tests {
    use kling_core::AccountId;

    use super::*;
    use crate::policy::Cooldown;

    /// A seeded generator of numbers below `n` (a 64-bit LCG's high bits): the same draws
    /// every run.
    fn below(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut state = seed;
        move |n| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % n
        }
    }

    fn policy(quota: Quota) -> Policy {
        Policy::new(quota, Cooldown::default())
    }

    #[tokio::test(start_paused = true)]
    async fn a_quota_change_keeps_the_debt_in_intervals() {
        let backend = InProcess::new();
        let key = BucketKey::account(None);
        let slow = policy(Quota::per_minute(1.0));
        assert_eq!(backend.acquire_now(&key, &slow), Decision::Admit);
        tokio::time::advance(Duration::from_secs(30)).await;
        // Half an interval still owed: 30 s at 1/min, 0.5 s at 1/s.
        let fast = policy(Quota::per_second(1.0));
        let start = Instant::now();
        match backend.acquire_now(&key, &fast) {
            Decision::NotBefore {
                at,
                cooldown: false,
            } => {
                assert_eq!(at - start, Duration::from_millis(500));
            }
            other => panic!("{other:?}"),
        }
    }

    /// The wiring: the backend decides as a governor limiter of its own on [`TokioClock`] does
    /// (which reads the clock itself), for random quotas (interval, burst) and random gaps
    /// between requests, both started at the same instant.
    ///
    /// [`TokioClock`]: kling_core::TokioClock
    #[tokio::test(start_paused = true)]
    async fn the_gcra_decisions_are_governors() {
        use governor::RateLimiter;
        use kling_core::{AccountId, TokioClock};
        let mut next = below(0x853c_49e6_748f_ea9b_u64);
        let backend = InProcess::new();
        let mut refused = 0;
        for round in 0..200 {
            let period = Duration::from_nanos(1 + next(5_000_000));
            let burst = 1 + next(5) as u32;
            let quota = Quota::with_period(period).with_burst(burst);
            let p = policy(quota);
            let key = BucketKey::account(Some(AccountId::new(format!("k{round}"))));
            let governor = RateLimiter::direct_with_clock(quota.to_governor(), TokioClock);
            // The key's first decision makes its limiter, at governor's start.
            assert_eq!(governor.check(), Ok(()));
            assert_eq!(backend.acquire_now(&key, &p), Decision::Admit);
            for _ in 0..50 {
                let gap = Duration::from_nanos(next(3 * period.as_nanos() as u64 / 2 + 1));
                tokio::time::advance(gap).await;
                let expected = match governor.check() {
                    Ok(()) => Decision::Admit,
                    Err(not_until) => {
                        refused += 1;
                        Decision::NotBefore {
                            at: not_until.earliest_possible().into_inner(),
                            cooldown: false,
                        }
                    }
                };
                assert_eq!(backend.acquire_now(&key, &p), expected, "{quota:?}");
            }
        }
        assert!(refused > 100, "the run is refused often enough: {refused}");
    }

    /// The last key's shortcut finds a key by its account's address: another copy of the same
    /// account is the same key, another account is not.
    #[tokio::test(start_paused = true)]
    async fn keys_are_their_account_whichever_copy_asks() {
        let backend = InProcess::new();
        let p = policy(Quota::per_second(1.0));
        let a = || BucketKey::account(Some(AccountId::new("a")));
        let b = BucketKey::account(Some(AccountId::new("b")));
        let none = BucketKey::account(None);
        let class = BucketKey::class(None, RequestKind::Account);
        for key in [&a(), &b, &none, &class] {
            assert_eq!(backend.acquire_now(key, &p), Decision::Admit);
        }
        for key in [&a(), &b, &a(), &none, &class, &none] {
            assert!(
                matches!(backend.acquire_now(key, &p), Decision::NotBefore { .. }),
                "{key:?}"
            );
        }
        assert_eq!(backend.len(), 4);
        backend.sweep();
        assert_eq!(backend.len(), 4, "every key still owes its interval");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(backend.acquire_now(&a(), &p), Decision::Admit);
        assert!(matches!(
            backend.acquire_now(&a(), &p),
            Decision::NotBefore { .. }
        ));
        assert_eq!(backend.acquire_now(&b, &p), Decision::Admit);
    }

    /// Whether admitted decision instants fit GCRA's bound: any `n` of them (sorted) span at
    /// least `n - burst` intervals.
    fn conform(admitted: &mut [Instant], quota: Quota) -> Result<(), String> {
        admitted.sort();
        let period = quota.period();
        let burst = quota.to_governor().burst_size().get() as usize;
        for i in 0..admitted.len() {
            for j in i + burst..admitted.len() {
                let need = period * (j - i + 1 - burst) as u32;
                if admitted[j] - admitted[i] < need {
                    return Err(format!(
                        "{} admitted within {:?}",
                        j - i + 1,
                        admitted[j] - admitted[i]
                    ));
                }
            }
        }
        Ok(())
    }

    /// Decisions made without the lock may reach the key's state in another order than their
    /// instants (two threads read the clock, the later one decides first). The guarantee that
    /// replaces "decisions in instant order": whatever the order, the admitted instants never
    /// beat the quota. Random quotas, random instants, decided in a shuffled order.
    #[tokio::test(start_paused = true)]
    async fn decisions_out_of_instant_order_never_beat_the_quota() {
        let mut next = below(0x2545_f491_4f6c_dd1d_u64);
        let backend = InProcess::new();
        let (mut admitted_total, mut refused_total) = (0, 0);
        for round in 0..100 {
            let period = Duration::from_nanos(1_000 + next(1_000_000));
            let quota = Quota::with_period(period).with_burst(1 + next(4) as u32);
            let p = policy(quota);
            let key = BucketKey::account(Some(AccountId::new(format!("k{round}"))));
            // The locked path makes the key and this thread remembers its limiter.
            let start = Instant::now();
            assert_eq!(backend.acquire_now(&key, &p), Decision::Admit);
            let mut admitted = vec![start];
            // Instants over a few intervals, each decided in a random order.
            let span = period.as_nanos() as u64 * 8;
            let mut instants: Vec<Instant> = (0..40)
                .map(|_| start + Duration::from_nanos(next(span)))
                .collect();
            for i in (1..instants.len()).rev() {
                instants.swap(i, next(i as u64 + 1) as usize);
            }
            for at in instants {
                match backend.decide_remembered(&key, &p, at) {
                    Some(Decision::Admit) => admitted.push(at),
                    Some(Decision::NotBefore { .. }) => refused_total += 1,
                    None => panic!("the remembered limiter decides"),
                }
            }
            admitted_total += admitted.len();
            conform(&mut admitted, quota).unwrap_or_else(|e| panic!("{quota:?}: {e}"));
        }
        assert!(
            admitted_total > 500 && refused_total > 500,
            "{admitted_total} / {refused_total}"
        );
    }

    /// The check above fails on a limiter that admits too much (its negative control).
    #[test]
    fn the_conformance_check_catches_an_excess() {
        let start = Instant::now();
        let quota = Quota::with_period(Duration::from_millis(10)).with_burst(2);
        let ms = |n| start + Duration::from_millis(n);
        assert!(conform(&mut [ms(0), ms(0), ms(10), ms(20)], quota).is_ok());
        assert!(conform(&mut [ms(0), ms(0), ms(9)], quota).is_err());
        assert!(conform(&mut [ms(20), ms(0), ms(5), ms(9)], quota).is_err());
    }

    /// Several threads deciding on one key at once, without the lock, in real time: the
    /// decision instants they were admitted at fit the quota.
    #[test]
    fn threads_deciding_at_once_stay_within_the_quota() {
        let backend = Arc::new(InProcess::new());
        let quota = Quota::with_period(Duration::from_micros(20)).with_burst(3);
        let p = policy(quota);
        let key = BucketKey::account(Some(AccountId::interned("shared")));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (backend, key) = (Arc::clone(&backend), key.clone());
                std::thread::spawn(move || {
                    let mut admitted = Vec::new();
                    for _ in 0..20_000 {
                        let (decision, at) = backend.acquire_decided(&key, &p);
                        if decision == Decision::Admit {
                            admitted.push(at);
                        }
                    }
                    admitted
                })
            })
            .collect();
        let mut admitted: Vec<Instant> = threads
            .into_iter()
            .flat_map(|t| t.join().expect("no panic"))
            .collect();
        assert!(admitted.len() > 10, "{}", admitted.len());
        conform(&mut admitted, quota).unwrap();
    }

    /// A limiter stops deciding once it is not its key's any more: after a quota change (the
    /// debt carries over to the new one) and after its key was dropped as idle; a thread that
    /// remembered it asks the key table and goes on with the key's current limiter.
    #[tokio::test(start_paused = true)]
    async fn a_retired_limiter_refuses_and_the_key_goes_on() {
        let backend = InProcess::new();
        let key = BucketKey::account(Some(AccountId::new("k")));
        let slow = policy(Quota::per_second(1.0));
        assert_eq!(backend.acquire_now(&key, &slow), Decision::Admit);
        let first = backend.remembered(&key).expect("remembered");
        let now = Instant::now();
        assert!(backend.decide_remembered(&key, &slow, now).is_some());
        // A quota change retires it; the debt (1 s at 1/s) becomes 0.5 s at 2/s.
        let fast = policy(Quota::per_second(2.0));
        assert!(
            backend.decide_remembered(&key, &fast, now).is_none(),
            "a changed quota"
        );
        assert_eq!(
            backend.acquire_now(&key, &fast),
            Decision::NotBefore {
                at: now + Duration::from_millis(500),
                cooldown: false
            }
        );
        assert_eq!(
            first.check(
                nanos_since(now, backend.base) + 10_000_000_000,
                backend.base
            ),
            None
        );
        let second = backend.remembered(&key).expect("remembered");
        assert!(!Arc::ptr_eq(&first, &second));
        // Idle, swept: the remembered limiter is retired and the key starts afresh.
        tokio::time::advance(Duration::from_secs(1)).await;
        backend.sweep();
        assert_eq!(backend.len(), 0);
        assert_eq!(backend.decide_remembered(&key, &fast, Instant::now()), None);
        assert_eq!(backend.acquire_now(&key, &fast), Decision::Admit);
        assert_eq!(backend.len(), 1);
        assert!(matches!(
            backend.acquire_now(&key, &fast),
            Decision::NotBefore {
                cooldown: false,
                ..
            }
        ));
    }

    /// A sweep keeps a key whose limiter admitted between its idleness check and its
    /// retirement: the retirement is a compare-and-swap from the state it judged idle. The
    /// decision is made inside the sweep, after the key was judged idle (as another thread's
    /// decision without the lock could be); the limiter that admitted it stays the key's.
    #[tokio::test(start_paused = true)]
    async fn a_sweep_retires_only_the_state_it_judged_idle() {
        let backend = InProcess::new();
        let key = BucketKey::account(None);
        let p = policy(Quota::per_second(1.0));
        assert_eq!(backend.acquire_now(&key, &p), Decision::Admit);
        tokio::time::advance(Duration::from_secs(2)).await;
        let slipped_in = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&slipped_in);
        let (base, at) = (backend.base, nanos_since(Instant::now(), backend.base));
        JUDGED_IDLE.set(Some(Box::new(move |generation: &Arc<Generation>| {
            // The sweep holds the lock: decide on the limiter itself, as a thread that
            // remembered it does.
            record.lock().unwrap().push(generation.check(at, base));
        })));
        backend.sweep();
        JUDGED_IDLE.set(None);
        assert_eq!(*slipped_in.lock().unwrap(), [Some(Decision::Admit)]);
        assert_eq!(backend.len(), 1, "the key owes an interval again");
        // The limiter that admitted is still the key's: the next decision is refused on it.
        assert!(matches!(
            backend.decide_remembered(&key, &p, Instant::now()),
            Some(Decision::NotBefore { .. })
        ));
    }

    /// A policy built without the layer's checks (durations past the clock's range) saturates
    /// instead of panicking: the streak window of a 1302, its pause, an adaptive key's idle TTL.
    #[tokio::test(start_paused = true)]
    async fn durations_past_the_clocks_range_saturate() {
        let backend = InProcess::new().with_idle_ttl(Duration::MAX);
        let key = BucketKey::account(None);
        let cooldown = Cooldown::new()
            .window(Duration::MAX)
            .ceiling(Duration::MAX)
            .backoff(Duration::MAX)
            .escalate_after(1);
        let p = Policy::new(Quota::per_second(1.0), cooldown)
            .with_adaptive(Some(crate::policy::Adaptive::new()));
        assert_eq!(backend.acquire_now(&key, &p), Decision::Admit);
        let now = Instant::now();
        let reported = backend.feedback_now(
            &key,
            &p,
            Feedback::Pause {
                sent_at: now,
                received_at: now,
                resume_at: None,
                throttled: true,
            },
        );
        let until = reported.cooldown_until.expect("paused");
        assert!(
            until >= now + Duration::from_secs(365 * 24 * 3600),
            "{until:?}"
        );
        // An adaptive key, paid off and without a pause: kept for the idle TTL, i.e. for good.
        let other = BucketKey::account(Some(AccountId::new("adaptive")));
        let adaptive = Policy::new(Quota::per_second(1.0), Cooldown::default())
            .with_adaptive(Some(crate::policy::Adaptive::new()));
        assert_eq!(backend.acquire_now(&other, &adaptive), Decision::Admit);
        tokio::time::advance(Duration::from_secs(10)).await;
        backend.sweep();
        assert_eq!(backend.len(), 2);
    }

    /// An outage met by a client that asks every two minutes, past the streak's window (60 s
    /// after the end of each pause): each 1302 is the first of its streak, yet together they
    /// lower the rate three times (the cooldown's `escalate_after`), not once each (thirty
    /// took a 4/s key to 0.03/s, out of reach of recovery).
    #[tokio::test(start_paused = true)]
    async fn sparse_1302s_of_an_outage_lower_the_rate_three_times() {
        let backend = InProcess::new();
        let key = BucketKey::account(Some(AccountId::interned("sparse-outage")));
        let quota = Quota::per_second(4.0);
        let p = Policy::new(quota, Cooldown::default())
            .with_adaptive(Some(crate::policy::Adaptive::new().start(quota)));
        assert_eq!(backend.acquire_now(&key, &p), Decision::Admit);
        for _ in 0..30 {
            let now = Instant::now();
            let reported = backend.feedback_now(
                &key,
                &p,
                Feedback::Pause {
                    sent_at: now,
                    received_at: now,
                    resume_at: None,
                    throttled: true,
                },
            );
            assert_eq!(reported.streak, 1, "each the first of its streak");
            tokio::time::advance(Duration::from_secs(120)).await;
        }
        let state = backend.key_state(&key).expect("held");
        assert_eq!(state.adaptive_rate, Some(4.0 * 0.85 * 0.85 * 0.85));
    }

    /// A ceiling lowered at run time (`set_quota`) under an adaptive key whose rate was above
    /// it: the key's next decision caps the rate it holds (its state read 4/s under a 1/s
    /// ceiling), and the next 1302 lowers the rate below the ceiling it was refused at.
    #[tokio::test(start_paused = true)]
    async fn a_1302_after_the_ceiling_is_lowered_lowers_the_rate_below_it() {
        let backend = InProcess::new();
        let key = BucketKey::account(Some(AccountId::interned("lowered-ceiling")));
        let high = Quota::per_second(4.0);
        let adaptive = Some(crate::policy::Adaptive::new().start(high));
        let p = Policy::new(high, Cooldown::default()).with_adaptive(adaptive);
        assert_eq!(backend.acquire_now(&key, &p), Decision::Admit);
        let low = Policy::new(Quota::per_second(1.0), Cooldown::default()).with_adaptive(adaptive);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(backend.acquire_now(&key, &low), Decision::Admit);
        let state = backend.key_state(&key).expect("held");
        assert_eq!(state.adaptive_rate, Some(1.0), "capped by the new ceiling");
        let now = Instant::now();
        backend.feedback_now(
            &key,
            &low,
            Feedback::Pause {
                sent_at: now,
                received_at: now,
                resume_at: None,
                throttled: true,
            },
        );
        let state = backend.key_state(&key).expect("held");
        assert_eq!(state.adaptive_rate, Some(0.85));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(backend.acquire_now(&key, &low), Decision::Admit);
        let state = backend.key_state(&key).expect("held");
        let rate = state.effective.rate_per_second();
        assert!((rate - 0.85).abs() < 1e-6, "{rate}");
    }

    /// A cooldown set by feedback reaches the decisions that skip the lock.
    #[tokio::test(start_paused = true)]
    async fn a_cooldown_reaches_decisions_without_the_lock() {
        let backend = InProcess::new();
        let key = BucketKey::account(Some(AccountId::interned("paused")));
        let p = policy(Quota::per_second(1000.0));
        assert_eq!(backend.acquire_now(&key, &p), Decision::Admit);
        let now = Instant::now();
        let resume = now + Duration::from_secs(3);
        let reported = backend.feedback_now(
            &key,
            &p,
            Feedback::Pause {
                sent_at: now,
                received_at: now,
                resume_at: Some(resume),
                throttled: false,
            },
        );
        assert_eq!(reported.cooldown_until, Some(resume));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(backend.decide_remembered(&key, &p, Instant::now()), None);
        assert_eq!(
            backend.acquire_now(&key, &p),
            Decision::NotBefore {
                at: resume,
                cooldown: true
            }
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(backend.acquire_now(&key, &p), Decision::Admit);
        assert!(
            backend
                .decide_remembered(&key, &p, Instant::now())
                .is_some()
        );
    }

    /// An account made per request and dropped leaves its text's address free for the next
    /// one: the next account, though at that address, is its own key.
    #[tokio::test(start_paused = true)]
    async fn an_account_at_a_freed_address_is_another_key() {
        let backend = InProcess::new();
        let p = policy(Quota::per_second(1.0));
        for i in 0..50 {
            // Two copies of one account: the table keeps the first, the request holds the second.
            let kept = BucketKey::account(Some(AccountId::new(format!("a{i:03}"))));
            assert_eq!(backend.acquire_now(&kept, &p), Decision::Admit);
            let asked = BucketKey::account(Some(AccountId::new(format!("a{i:03}"))));
            assert!(matches!(
                backend.acquire_now(&asked, &p),
                Decision::NotBefore { .. }
            ));
            let name = format!("b{i:03}");
            drop(asked);
            // Likely at the address `asked` had (the allocator reuses a freed block of a size).
            let other = BucketKey::account(Some(AccountId::new(name)));
            assert_eq!(
                backend.acquire_now(&other, &p),
                Decision::Admit,
                "round {i}"
            );
        }
    }

    /// Asks under the lock until the key admits, sleeping until each instant it names.
    async fn admitted_locked(backend: &InProcess, key: &BucketKey, p: &Policy) {
        loop {
            match backend.acquire_locked(key, p).0 {
                Decision::Admit => return,
                Decision::NotBefore { at, .. } => tokio::time::sleep_until(at).await,
            }
        }
    }

    /// An adaptive key whose rate is at its ceiling decides as a fixed quota does, without the
    /// lock, and says its successes need no report. A 1302 takes it off that path; while it
    /// recovers every decision takes the lock and every success counts; once its rate is back
    /// at the ceiling with nothing a success would change, it decides without the lock again.
    #[tokio::test(start_paused = true)]
    async fn an_adaptive_key_at_its_ceiling_decides_without_the_lock() {
        use crate::policy::Adaptive;
        let backend = InProcess::new();
        let quota = Quota::per_second(4.0);
        let p = Policy::new(quota, Cooldown::default())
            .with_adaptive(Some(Adaptive::new().start(quota)));
        let fixed = policy(quota);
        let key = BucketKey::account(Some(AccountId::interned("at-ceiling")));
        let other = BucketKey::account(Some(AccountId::interned("fixed")));
        // The first decision makes the key under the lock; the next ones skip it and decide
        // as the same quota without an adaptive rule does.
        assert_eq!(backend.acquire_now(&key, &p), Decision::Admit);
        assert_eq!(backend.acquire_now(&other, &fixed), Decision::Admit);
        assert!(backend.at_ceiling_now(&key, &p));
        for step in [0, 100, 150, 10, 400] {
            tokio::time::advance(Duration::from_millis(step)).await;
            let now = Instant::now();
            let decided = backend.decide_remembered(&key, &p, now);
            assert!(decided.is_some(), "at {step} ms: the lock was taken");
            assert_eq!(decided, backend.decide_remembered(&other, &fixed, now));
        }
        // A 1302: the key pauses and its rate falls below the ceiling.
        let now = Instant::now();
        let throttled = Feedback::Pause {
            sent_at: now,
            received_at: now,
            resume_at: None,
            throttled: true,
        };
        backend.feedback_now(&key, &p, throttled);
        assert!(!backend.at_ceiling_now(&key, &p));
        let mut successes = 0;
        loop {
            admitted_locked(&backend, &key, &p).await;
            if backend.at_ceiling_now(&key, &p) {
                break;
            }
            assert_eq!(
                backend.decide_remembered(&key, &p, Instant::now()),
                None,
                "below the ceiling, after {successes} successes"
            );
            let sent_at = Instant::now();
            backend.feedback_now(&key, &p, Feedback::Success { sent_at });
            successes += 1;
            assert!(successes < 200, "never back at the ceiling");
        }
        assert!(successes > 10, "{successes}");
        let state = backend.key_state(&key).expect("held");
        assert_eq!((state.effective, state.adaptive_rate), (quota, Some(4.0)));
        // Back at the ceiling: a success there changes nothing, and the key skips the lock.
        backend.feedback_now(
            &key,
            &p,
            Feedback::Success {
                sent_at: Instant::now(),
            },
        );
        assert_eq!(backend.key_state(&key), Some(state));
        tokio::time::advance(Duration::from_millis(250)).await;
        assert_eq!(
            backend.decide_remembered(&key, &p, Instant::now()),
            Some(Decision::Admit)
        );
        // A raised ceiling: the key is below it, so its successes count again, also before
        // its next decision retires the limiter this thread remembers.
        let raised = Policy::new(Quota::per_second(8.0), Cooldown::default())
            .with_adaptive(Some(Adaptive::new().start(quota)));
        assert!(!backend.at_ceiling_now(&key, &raised));
    }

    /// A key whose limiter enforces the ceiling is marked at it only when a success would change
    /// nothing: not with a rate a hair below the ceiling (its interval rounds to the
    /// ceiling's, but a success still grows the rate), nor with a streak a success would reset.
    #[tokio::test(start_paused = true)]
    async fn the_ceiling_mark_needs_a_success_to_change_nothing() {
        use crate::policy::{Adaptive, AdaptiveState};
        let backend = InProcess::new();
        let quota = Quota::per_second(4.0);
        let p = Policy::new(quota, Cooldown::default())
            .with_adaptive(Some(Adaptive::new().start(quota)));
        let key = BucketKey::account(Some(AccountId::interned("hair")));
        assert_eq!(backend.acquire_now(&key, &p), Decision::Admit);
        assert!(backend.at_ceiling_now(&key, &p));
        let set = |adaptive: AdaptiveState, streak: u32| {
            let mut state = backend.lock();
            let at = state.map[&key];
            let entry = &mut state.entries[at].1;
            entry.adaptive = Some(adaptive);
            entry.streak = streak;
        };
        let below = AdaptiveState::from_parts(4.0 * (1.0 - 1e-12), None);
        assert_eq!(quota.at_most(below.rate()), quota, "the same interval");
        for (adaptive, streak) in [(below, 0), (AdaptiveState::from_parts(4.0, None), 1)] {
            set(adaptive, streak);
            tokio::time::advance(Duration::from_secs(1)).await;
            assert_eq!(backend.acquire_locked(&key, &p).0, Decision::Admit);
            assert!(
                !backend.at_ceiling_now(&key, &p),
                "{adaptive:?}, streak {streak}"
            );
            assert_eq!(backend.decide_remembered(&key, &p, Instant::now()), None);
        }
        set(AdaptiveState::from_parts(4.0, None), 0);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(backend.acquire_locked(&key, &p).0, Decision::Admit);
        assert!(backend.at_ceiling_now(&key, &p));
    }

    /// An adaptive key that starts below its ceiling (a quarter of it, the default) decides
    /// under the lock and counts every success until slow start reaches the ceiling, as the
    /// rule alone says.
    #[tokio::test(start_paused = true)]
    async fn slow_start_takes_the_lock_and_counts_every_success() {
        use crate::policy::{Adaptive, AdaptiveState};
        let backend = InProcess::new();
        let quota = Quota::per_second(8.0);
        let config = Adaptive::new();
        let p = Policy::new(quota, Cooldown::default()).with_adaptive(Some(config));
        let key = BucketKey::account(Some(AccountId::interned("slow-start")));
        let mut model = AdaptiveState::new(&config, 8.0);
        let mut successes = 0;
        while model.rate() < 8.0 {
            admitted_locked(&backend, &key, &p).await;
            assert!(!backend.at_ceiling_now(&key, &p), "at {}", model.rate());
            assert_eq!(backend.decide_remembered(&key, &p, Instant::now()), None);
            backend.feedback_now(
                &key,
                &p,
                Feedback::Success {
                    sent_at: Instant::now(),
                },
            );
            model.on_success(&config, 8.0);
            successes += 1;
            let state = backend.key_state(&key).expect("held");
            assert_eq!(
                state.adaptive_rate,
                Some(model.rate()),
                "success {successes}"
            );
        }
        assert_eq!(successes, 29);
        admitted_locked(&backend, &key, &p).await;
        assert!(backend.at_ceiling_now(&key, &p));
    }

    /// A start below the floor (`ceiling / 1000`) paces the key's first requests at the floor,
    /// not at the start (1,000 s apart for a start of 0.001/s under 10/s, until a success).
    #[tokio::test(start_paused = true)]
    async fn a_start_below_the_floor_paces_at_the_floor() {
        use crate::policy::Adaptive;
        let backend = InProcess::new();
        let p = Policy::new(Quota::per_second(10.0), Cooldown::default())
            .with_adaptive(Some(Adaptive::new().start(Quota::per_second(0.001))));
        let key = BucketKey::account(Some(AccountId::interned("below-floor")));
        let start = Instant::now();
        assert_eq!(backend.acquire_now(&key, &p), Decision::Admit);
        assert_eq!(
            backend.acquire_now(&key, &p),
            Decision::NotBefore {
                at: start + Duration::from_secs(100),
                cooldown: false
            }
        );
        let state = backend.key_state(&key).expect("held");
        assert_eq!(state.adaptive_rate, Some(0.01));
    }

    /// The longest burst window a quota may have (interval × burst, about 146 years: see
    /// [`Quota`]) spent in full by a key 400 years old admits the burst and no more: governor's
    /// nanoseconds do not overflow (a 78-hour interval with a burst of 65535 did once the key
    /// was 78 hours old: every request admitted from then on, in release).
    #[tokio::test(start_paused = true)]
    async fn the_longest_burst_window_spent_by_an_old_key_admits_the_burst() {
        let burst = u32::from(u16::MAX);
        let quota = |nanos| Quota::with_period(Duration::from_nanos(nanos)).with_burst(burst);
        // The longest interval validation accepts with that burst.
        let (mut valid, mut invalid) = (1, 1 << 48);
        while invalid - valid > 1 {
            let mid = valid + (invalid - valid) / 2;
            if quota(mid).validate().is_ok() {
                valid = mid;
            } else {
                invalid = mid;
            }
        }
        let quota = quota(valid);
        let backend = InProcess::new();
        let p = policy(quota);
        let key = BucketKey::account(None);
        assert_eq!(backend.acquire_now(&key, &p), Decision::Admit);
        tokio::time::advance(Duration::from_secs(400 * 365 * 24 * 3600)).await;
        let admitted = (0..burst + 10)
            .filter(|_| backend.acquire_now(&key, &p) == Decision::Admit)
            .count();
        assert_eq!(admitted, burst as usize);
    }

    /// An adaptive rate at its floor (`ceiling / 1000`) slows a quota past the longest burst
    /// window validation accepts (see [`Quota`]): the slowed quota keeps to that window too.
    /// (A 1-per-282 s ceiling with a burst of 65535 at its floor, interval 78 hours, overflowed
    /// governor's nanoseconds once the key was 78 hours old and spent its burst.)
    #[tokio::test(start_paused = true)]
    async fn an_adaptive_floor_keeps_to_the_longest_burst_window() {
        use crate::policy::Adaptive;
        let burst = u32::from(u16::MAX);
        let quota = Quota::with_period(Duration::from_secs(282)).with_burst(burst);
        assert!(quota.validate().is_ok());
        let p = policy(quota).with_adaptive(Some(
            Adaptive::new().start(Quota::with_period(Duration::from_secs(1 << 40))),
        ));
        let backend = InProcess::new();
        let key = BucketKey::account(None);
        assert_eq!(backend.acquire_now(&key, &p), Decision::Admit);
        let slowed = backend.key_state(&key).expect("held").effective;
        assert!(slowed.period() > Duration::from_secs(3600), "{slowed:?}");
        tokio::time::advance(Duration::from_secs(400 * 365 * 24 * 3600)).await;
        let admitted = (0..burst + 10)
            .filter(|_| backend.acquire_now(&key, &p) == Decision::Admit)
            .count();
        assert_eq!(admitted, burst as usize);
    }

    /// A pause ends with the key's burst spent, though no decision came yet to spend it: a
    /// sweep after the pause's end, before the key's next decision, keeps the key, so the burst
    /// builds up from the pause's end. (Dropped as paid off, the key came back with its whole
    /// burst: five requests at once into a server that had just asked for a pause.) A
    /// `Retry-After`, and a 1302 once its streak's window is over.
    #[tokio::test(start_paused = true)]
    async fn a_sweep_after_a_pause_keeps_the_burst_spent() {
        let backend = InProcess::new();
        let cooldown = Cooldown::new().window(Duration::from_secs(1));
        let p = Policy::new(Quota::per_second(1.0).with_burst(5), cooldown);
        for throttled in [false, true] {
            let key = BucketKey::account(Some(AccountId::new(format!("{throttled}"))));
            assert_eq!(backend.acquire_now(&key, &p), Decision::Admit);
            let now = Instant::now();
            let resume = now + Duration::from_secs(70);
            let reported = backend.feedback_now(
                &key,
                &p,
                Feedback::Pause {
                    sent_at: now,
                    received_at: now,
                    resume_at: Some(resume),
                    throttled,
                },
            );
            assert_eq!(reported.cooldown_until, Some(resume));
            // Two seconds after the pause's end (past the 1 s streak window): one request
            // then and one a second since, so three, not the burst of five.
            tokio::time::advance(Duration::from_secs(72)).await;
            for expected in [3, 1, 1] {
                backend.sweep();
                let admitted = (0..5)
                    .filter(|_| backend.acquire_now(&key, &p) == Decision::Admit)
                    .count();
                assert_eq!(admitted, expected, "throttled: {throttled}");
                tokio::time::advance(Duration::from_secs(1)).await;
            }
        }
    }

    /// A pause ends with the burst spent for the decisions made without the lock too: one
    /// that another thread makes as the pause ends, while the deciding thread holds the lock,
    /// either sees the pause still marked (and asks under the lock) or the burst spent.
    /// (The mark was cleared first: a decision in between found the whole burst, and two
    /// requests went at the pause's end where one may.)
    #[tokio::test(start_paused = true)]
    async fn a_pause_ends_with_the_burst_spent_for_decisions_without_the_lock() {
        let backend = Arc::new(InProcess::new());
        let key = BucketKey::account(Some(AccountId::interned("ending")));
        let p = policy(Quota::per_second(1.0).with_burst(3));
        assert_eq!(backend.acquire_now(&key, &p), Decision::Admit);
        assert!(backend.remembered(&key).is_some());
        let now = Instant::now();
        let resume = now + Duration::from_secs(10);
        backend.feedback_now(
            &key,
            &p,
            Feedback::Pause {
                sent_at: now,
                received_at: now,
                resume_at: Some(resume),
                throttled: false,
            },
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        let slipped_in = Arc::new(Mutex::new(Vec::new()));
        let (record, other, key2, p2) = (
            Arc::clone(&slipped_in),
            Arc::clone(&backend),
            key.clone(),
            p,
        );
        ENDING_PAUSE.set(Some(Box::new(move |_: &Arc<Generation>| {
            // The lock is held: decide as a thread that remembers the limiter does.
            let decided = other.decide_remembered(&key2, &p2, Instant::now());
            record.lock().unwrap().push(decided);
        })));
        let decision = backend.acquire_now(&key, &p);
        ENDING_PAUSE.set(None);
        let slipped_in = slipped_in.lock().unwrap().clone();
        let admitted = slipped_in
            .iter()
            .chain([&Some(decision)])
            .filter(|d| **d == Some(Decision::Admit))
            .count();
        assert_eq!(
            admitted, 1,
            "one at the pause's end: {slipped_in:?} {decision:?}"
        );
    }

    /// A quota handed in unchecked (a `Policy` is public) decides, pauses and adapts without
    /// a panic: an interval past governor's 584 years panicked at the key's first decision.
    /// It is held to the slowest quota a valid one may be.
    #[tokio::test(start_paused = true)]
    async fn an_unchecked_quota_does_not_panic() {
        let backend = InProcess::new();
        let quotas = [
            Quota::with_period(Duration::MAX),
            Quota::with_period(Duration::MAX).with_burst(u32::MAX),
            Quota::with_period(Duration::from_secs(3600)).with_burst(u32::MAX),
            Quota::per_second(0.0),
            Quota::per_second(1.0).with_burst(0),
        ];
        for (i, quota) in quotas.into_iter().enumerate() {
            assert!(quota.validate().is_err(), "{quota:?}");
            let adaptive = Some(crate::policy::Adaptive::new());
            for (j, p) in [policy(quota), policy(quota).with_adaptive(adaptive)]
                .into_iter()
                .enumerate()
            {
                let key = BucketKey::account(Some(AccountId::new(format!("q{i}-{j}"))));
                assert_eq!(backend.acquire_now(&key, &p), Decision::Admit, "{quota:?}");
                let now = Instant::now();
                let pause = Feedback::Pause {
                    sent_at: now,
                    received_at: now,
                    resume_at: None,
                    throttled: true,
                };
                backend.feedback_now(&key, &p, pause);
                tokio::time::advance(Duration::from_secs(100)).await;
                let _ = backend.acquire_now(&key, &p);
                let success = Feedback::Success {
                    sent_at: Instant::now(),
                };
                backend.feedback_now(&key, &p, success);
            }
        }
        // Slowest: a day after its first request, the key of a 584-year interval waits still.
        let key = BucketKey::account(Some(AccountId::new("slowest")));
        let p = policy(Quota::with_period(Duration::MAX));
        assert_eq!(backend.acquire_now(&key, &p), Decision::Admit);
        tokio::time::advance(Duration::from_secs(24 * 3600)).await;
        assert!(matches!(
            backend.acquire_now(&key, &p),
            Decision::NotBefore {
                cooldown: false,
                ..
            }
        ));
        backend.sweep();
    }

    /// A key whose quota changes from or to one handed in unchecked carries its debt over
    /// without a panic: the debt was scaled by the quotas' own intervals, and a zero interval
    /// (`Quota::per_second(0.0)`) made the ratio infinite ("cannot convert float seconds to
    /// Duration"). Over any pair of quotas, valid or not, each with and without adaptation.
    #[test]
    fn a_quota_change_with_an_unchecked_quota_does_not_panic() {
        use proptest::prelude::*;

        let quota = || {
            (
                prop_oneof![
                    Just(Duration::ZERO),
                    Just(Duration::MAX),
                    (0u64..=u64::MAX).prop_map(Duration::from_nanos),
                    (1u64..=1 << 50).prop_map(Duration::from_nanos),
                ],
                prop_oneof![Just(0u32), Just(u32::MAX), 0u32..=70_000],
                any::<bool>(),
            )
                .prop_map(|(period, burst, adaptive)| {
                    let p = policy(Quota::with_period(period).with_burst(burst));
                    match adaptive {
                        true => p.with_adaptive(Some(crate::policy::Adaptive::new())),
                        false => p,
                    }
                })
        };
        let config = proptest::test_runner::Config {
            cases: 256,
            failure_persistence: None,
            ..Default::default()
        };
        let mut runner = proptest::test_runner::TestRunner::new(config);
        let cases = (prop::collection::vec(quota(), 2..4), 0u64..5_000);
        runner
            .run(&cases, |(policies, gap_ms)| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .start_paused(true)
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let backend = InProcess::new();
                    let key = BucketKey::account(Some(AccountId::interned("changing")));
                    for (i, p) in policies.iter().enumerate() {
                        for _ in 0..3 {
                            let _ = backend.acquire_now(&key, p);
                        }
                        if i == 0 {
                            let now = Instant::now();
                            let pause = Feedback::Pause {
                                sent_at: now,
                                received_at: now,
                                resume_at: None,
                                throttled: true,
                            };
                            backend.feedback_now(&key, p, pause);
                        }
                        tokio::time::advance(Duration::from_millis(gap_ms)).await;
                    }
                    backend.sweep();
                });
                Ok(())
            })
            .unwrap();
        // The case that panicked: a zero interval, then a valid quota, at one instant.
        let backend = InProcess::new();
        let key = BucketKey::account(Some(AccountId::interned("zero")));
        assert_eq!(
            backend.acquire_now(&key, &policy(Quota::per_second(0.0))),
            Decision::Admit
        );
        let _ = backend.acquire_now(&key, &policy(Quota::per_second(1.0)));
    }

    /// A key paused once and never asked again is still dropped: kept until the burst its
    /// pause's end spends would be paid off (a burst of 5 at 1/s: 4 s after the pause's end),
    /// not for ever; an adaptive one (slowed by the pause) an idle TTL after its own.
    #[tokio::test(start_paused = true)]
    async fn a_key_paused_and_abandoned_is_dropped_once_its_pause_is_paid_off() {
        let backend = InProcess::new().with_idle_ttl(Duration::from_secs(30));
        let quota = Quota::per_second(1.0).with_burst(5);
        let adaptive = policy(quota).with_adaptive(Some(crate::policy::Adaptive::new()));
        for (p, dropped_at) in [(policy(quota), 70 + 4), (adaptive, 10 * 60)] {
            let key = BucketKey::account(Some(AccountId::new("abandoned")));
            let start = Instant::now();
            assert_eq!(backend.acquire_now(&key, &p), Decision::Admit);
            let pause = Feedback::Pause {
                sent_at: start,
                received_at: start,
                resume_at: Some(start + Duration::from_secs(70)),
                throttled: false,
            };
            backend.feedback_now(&key, &p, pause);
            tokio::time::advance(Duration::from_secs(70 + 3)).await;
            backend.sweep();
            assert_eq!(backend.len(), 1, "kept while its spent burst is owed");
            tokio::time::sleep_until(start + Duration::from_secs(dropped_at)).await;
            backend.sweep();
            assert_eq!(backend.len(), 0, "dropped once paid off");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keys_are_dropped() {
        let backend = InProcess::new();
        let p = policy(Quota::per_second(10.0));
        for i in 0..5000 {
            let key = BucketKey::account(Some(format!("a{i}").into()));
            assert_eq!(backend.acquire_now(&key, &p), Decision::Admit);
        }
        assert!(backend.len() <= 5000);
        tokio::time::advance(Duration::from_secs(1)).await;
        backend.sweep();
        assert_eq!(backend.len(), 0);
    }
}
