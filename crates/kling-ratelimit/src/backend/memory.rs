//! The in-process backend: one governor GCRA limiter per key, on tokio time read once per
//! decision (governor's clock hands back the instant the backend read under its lock).

use std::collections::HashMap;
use std::fmt;
use std::future::{Ready, ready};
use std::sync::atomic::{AtomicU64, Ordering};
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
use crate::policy::AdaptiveState;
use crate::quota::Quota;

/// The smallest number of decisions between two sweeps for idle keys.
const SWEEP_EVERY: usize = 1024;
/// How long the adaptive state of a key without traffic is kept, by default.
const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(600);
/// The state cell's "no measurement yet".
const EMPTY: u64 = u64::MAX;

/// One key's two cells, in nanoseconds since the key's start: the instant the backend decides
/// at (governor's clock reads it) and the theoretical arrival time (governor's state). Shared
/// by the limiter and the entry, so the backend can set the one and read the other. Every
/// access happens under the backend's lock: relaxed loads and stores suffice.
#[derive(Debug)]
struct Cells {
    now: AtomicU64,
    tat: AtomicU64,
}

/// governor's clock for one key: the instant the backend read under its lock, so a decision
/// costs no clock read of its own.
#[derive(Debug, Clone)]
struct DecidedAt(Arc<Cells>);

impl Clock for DecidedAt {
    /// Nanoseconds since the key's start (the limiter's own start reads 0).
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.0.now.load(Ordering::Relaxed))
    }
}

/// A governor state store whose theoretical arrival time the backend can read and carry over
/// when a key's quota changes.
#[derive(Debug, Clone)]
struct TatCell(Arc<Cells>);

impl StateStore for TatCell {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, _key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        // Every call happens under the backend's lock: a plain load and store suffice.
        let prev = self.0.tat.load(Ordering::Relaxed);
        let (result, next) = f((prev != EMPTY).then(|| Nanos::from(prev)))?;
        self.0.tat.store(next.as_u64(), Ordering::Relaxed);
        Ok(result)
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

/// The state of one key.
struct Entry {
    limiter: Limiter,
    cells: Arc<Cells>,
    /// The instant the limiter was built at (its clock's 0): the key was made or its quota
    /// last changed. No decision is earlier.
    start: Instant,
    applied: Quota,
    cooldown_until: Option<Instant>,
    streak: u32,
    last_pause: Option<Instant>,
    streak_expires: Option<Instant>,
    adaptive: Option<AdaptiveState>,
}

impl Entry {
    fn new(quota: Quota, now: Instant) -> Entry {
        let cells = Arc::new(Cells {
            now: AtomicU64::new(0),
            tat: AtomicU64::new(EMPTY),
        });
        Entry {
            limiter: Entry::limiter(quota, &cells),
            cells,
            start: now,
            applied: quota,
            cooldown_until: None,
            streak: 0,
            last_pause: None,
            streak_expires: None,
            adaptive: None,
        }
    }

    /// A governor limiter for `quota` on the key's cells, started at the clock's 0 (the
    /// caller's `start`).
    fn limiter(quota: Quota, cells: &Arc<Cells>) -> Limiter {
        cells.now.store(0, Ordering::Relaxed);
        RateLimiter::new(
            quota.to_governor(),
            TatCell(Arc::clone(cells)),
            DecidedAt(Arc::clone(cells)),
        )
    }

    /// The theoretical arrival time, absolute.
    fn tat(&self) -> Option<Instant> {
        let rel = self.cells.tat.load(Ordering::Relaxed);
        (rel != EMPTY).then(|| self.start + Duration::from_nanos(rel))
    }

    /// governor's `check` at `now`: the limiter's clock reads `now` from the key's cell, so
    /// governor decides at the instant the backend read; its earliest instant is turned back
    /// into tokio time through the key's start.
    fn check(&mut self, now: Instant) -> Decision {
        let at = nanos_since(now, self.start);
        self.cells.now.store(at, Ordering::Relaxed);
        match self.limiter.check() {
            Ok(()) => Decision::Admit,
            Err(not_until) => Decision::NotBefore {
                at: self.start + Duration::from(not_until.earliest_possible()),
                cooldown: false,
            },
        }
    }

    /// Admits a request at `now` or says when to ask again: the cooldown, then GCRA at the
    /// quota in force (changed first if the adaptive rate moved).
    fn decide(&mut self, policy: &Policy, now: Instant) -> Decision {
        if let Some(until) = self.cooldown_until {
            if until > now {
                return Decision::NotBefore {
                    at: until,
                    cooldown: true,
                };
            }
            self.cooldown_until = None;
        }
        let quota = self.effective(policy);
        if quota != self.applied {
            self.apply(quota, now);
        }
        self.check(now)
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
                policy.quota.at_most(state.rate())
            }
        }
    }

    /// Switches to a new quota, keeping the key's debt: the requests admitted but not yet
    /// paid off count the same number of emission intervals under the new quota.
    fn apply(&mut self, quota: Quota, now: Instant) {
        let debt = self.tat().filter(|tat| *tat > now).map(|tat| {
            let ratio = quota.period().as_secs_f64() / self.applied.period().as_secs_f64();
            (tat - now).mul_f64(ratio)
        });
        // The new limiter starts at `now`: the debt is its theoretical arrival time.
        let rel = debt.map_or(EMPTY, nanos);
        self.cells.tat.store(rel, Ordering::Relaxed);
        self.limiter = Entry::limiter(quota, &self.cells);
        self.start = now;
        self.applied = quota;
    }

    fn is_idle(&self, now: Instant, idle_ttl: Duration) -> bool {
        let paid_off = self.tat().unwrap_or(self.start);
        self.cooldown_until.is_none_or(|until| until <= now)
            && self.streak_expires.is_none_or(|at| at <= now)
            && paid_off <= now
            && (self.adaptive.is_none() || paid_off + idle_ttl <= now)
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("applied", &self.applied)
            .field("tat", &self.tat())
            .field("cooldown_until", &self.cooldown_until)
            .field("streak", &self.streak)
            .field("adaptive", &self.adaptive)
            .finish()
    }
}

#[derive(Debug, Default)]
struct State {
    /// foldhash rather than SipHash: one hash per decision is most of the map's cost, and the
    /// keys are the caller's own accounts (seeded per process all the same).
    ///
    /// The map holds each key's index in `entries`: a lookup copies an index out, so a known
    /// key costs one hash and no key clone (an account's reference count is shared by every
    /// call of that account).
    map: HashMap<BucketKey, usize, foldhash::fast::RandomState>,
    entries: Vec<(BucketKey, Entry)>,
    /// The key last looked up and its index: a run of calls of one account skips the hash.
    last: Option<(KeyId, usize)>,
    ops: usize,
}

/// A key known to `entries`, by the address of its account's text: `entries` holds a clone of
/// the key, so no other account can have that address while the entry lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KeyId {
    account: usize,
    class: Option<RequestKind>,
}

impl KeyId {
    fn of(key: &BucketKey) -> KeyId {
        KeyId {
            account: key
                .account_id()
                .map_or(0, |account| account.as_str().as_ptr() as usize),
            class: key.request_kind(),
        }
    }
}

/// The in-process [`Backend`]: one governor GCRA limiter per key on tokio time, with the key's
/// cooldown and adaptive state beside it, behind one mutex. The clock is read once per
/// decision, under the lock; the limiter's clock hands governor that instant.
///
/// Every decision is synchronous (its futures are [`Ready`]), so the success path takes one
/// uncontended lock and allocates nothing. Keys are dropped once idle — their GCRA state paid
/// off, no cooldown or streak running, and for adaptive keys no traffic for the idle TTL (ten
/// minutes unless set) — in sweeps that cost O(1) amortized per decision, so the map stays
/// bounded by the keys active recently.
#[derive(Debug, Default)]
pub struct InProcess {
    state: Mutex<State>,
    idle_ttl: Option<Duration>,
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
            effective: entry.applied,
            cooldown_until: entry.cooldown_until.filter(|until| *until > Instant::now()),
            streak: entry.streak,
            adaptive_rate: entry.adaptive.map(|a| a.rate()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sweep_locked(&self, state: &mut State) {
        let now = Instant::now();
        let ttl = self.idle_ttl.unwrap_or(DEFAULT_IDLE_TTL);
        state.entries.retain(|(_, entry)| !entry.is_idle(now, ttl));
        state.map.clear();
        state.last = None;
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
        let id = KeyId::of(key);
        let at = match state.last {
            Some((last, at)) if last == id => at,
            _ => match state.map.get(key) {
                Some(&at) => at,
                None => {
                    let at = state.entries.len();
                    state.map.insert(key.clone(), at);
                    state
                        .entries
                        .push((key.clone(), Entry::new(policy.quota, now)));
                    at
                }
            },
        };
        state.last = Some((id, at));
        &mut state.entries[at].1
    }

    /// [`Backend::acquire`], synchronously.
    pub fn acquire_now(&self, key: &BucketKey, policy: &Policy) -> Decision {
        self.acquire_decided(key, policy).0
    }

    /// [`Backend::acquire`], synchronously, with the instant it decided at: the clock is read
    /// under the lock, so the decisions of one key are made at instants that only move on.
    fn acquire_decided(&self, key: &BucketKey, policy: &Policy) -> (Decision, Instant) {
        let mut state = self.lock();
        let now = Instant::now();
        let entry = self.entry(&mut state, key, policy, now);
        (entry.decide(policy, now), now)
    }

    /// [`Backend::feedback`], synchronously.
    pub fn feedback_now(&self, key: &BucketKey, policy: &Policy, feedback: Feedback) -> Reported {
        let mut state = self.lock();
        let entry = self.entry(&mut state, key, policy, Instant::now());
        let ceiling = policy.quota.rate_per_second();
        match feedback {
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
                    let within = entry.streak > 0
                        && entry.last_pause.is_some_and(|last| {
                            received_at.saturating_duration_since(last) <= window
                        });
                    entry.streak = if within {
                        entry.streak.saturating_add(1)
                    } else {
                        1
                    };
                    entry.last_pause = Some(received_at);
                    entry.streak_expires = Some(received_at + window);
                    if let Some(config) = &policy.adaptive {
                        let adaptive = entry
                            .adaptive
                            .get_or_insert_with(|| AdaptiveState::new(config, ceiling));
                        adaptive.on_throttle(config, ceiling);
                    }
                }
                let until = pause_until(
                    &policy.cooldown,
                    entry.applied.period(),
                    entry.streak,
                    received_at,
                    resume_at,
                    throttled,
                );
                let extends =
                    until > Instant::now() && entry.cooldown_until.is_none_or(|c| until > c);
                if extends {
                    entry.cooldown_until = Some(until);
                }
                Reported {
                    cooldown_until: extends.then_some(until),
                    streak: entry.streak,
                }
            }
        }
    }
}

impl Backend for InProcess {
    type AcquireFuture = Ready<Result<Decision, BackendError>>;
    type FeedbackFuture = Ready<Result<Reported, BackendError>>;

    fn acquire(&self, key: &BucketKey, policy: &Policy) -> Self::AcquireFuture {
        ready(Ok(self.acquire_now(key, policy)))
    }

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

    fn feedback(
        &self,
        key: &BucketKey,
        policy: &Policy,
        feedback: Feedback,
    ) -> Self::FeedbackFuture {
        ready(Ok(self.feedback_now(key, policy, feedback)))
    }
}

#[cfg(test)]
mod tests {
    use kling_core::AccountId;

    use super::*;
    use crate::policy::Cooldown;

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
        let mut state = 0x853c_49e6_748f_ea9b_u64;
        let mut next = move |n: u64| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % n
        };
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
