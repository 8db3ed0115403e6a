//! The in-process backend: one governor GCRA limiter per key, on tokio time.

use std::collections::HashMap;
use std::fmt;
use std::future::{Ready, ready};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use governor::RateLimiter;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use kling_core::{TokioClock, TokioInstant};
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

/// A governor state store whose theoretical arrival time the backend can read and carry over
/// when a key's quota changes.
#[derive(Debug, Clone)]
struct TatCell(Arc<AtomicU64>);

impl StateStore for TatCell {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, _key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        // Every call happens under the backend's lock: a plain load and store suffice.
        let prev = self.0.load(Ordering::Relaxed);
        let (result, next) = f((prev != EMPTY).then(|| Nanos::from(prev)))?;
        self.0.store(next.as_u64(), Ordering::Relaxed);
        Ok(result)
    }
}

type Limiter = RateLimiter<NotKeyed, TatCell, TokioClock, NoOpMiddleware<TokioInstant>>;

/// The state of one key.
struct Entry {
    limiter: Limiter,
    tat: TatCell,
    /// Taken just before the limiter was built: governor's own start is this or later, so
    /// converting through it errs on the late side.
    start: Instant,
    applied: Quota,
    cooldown_until: Option<Instant>,
    streak: u32,
    last_pause: Option<Instant>,
    streak_expires: Option<Instant>,
    adaptive: Option<AdaptiveState>,
}

impl Entry {
    fn new(quota: Quota) -> Entry {
        let tat = TatCell(Arc::new(AtomicU64::new(EMPTY)));
        let start = Instant::now();
        Entry {
            limiter: RateLimiter::new(quota.to_governor(), tat.clone(), TokioClock),
            tat,
            start,
            applied: quota,
            cooldown_until: None,
            streak: 0,
            last_pause: None,
            streak_expires: None,
            adaptive: None,
        }
    }

    /// The theoretical arrival time, absolute.
    fn tat(&self) -> Option<Instant> {
        let rel = self.tat.0.load(Ordering::Relaxed);
        (rel != EMPTY).then(|| self.start + Duration::from_nanos(rel))
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

    /// Rebuilds the limiter for a new quota, keeping the key's debt: the requests admitted but
    /// not yet paid off count the same number of emission intervals under the new quota.
    fn apply(&mut self, quota: Quota) {
        let now = Instant::now();
        let tat = self.tat().filter(|tat| *tat > now).map(|tat| {
            let debt = tat - now;
            let ratio = quota.period().as_secs_f64() / self.applied.period().as_secs_f64();
            now + debt.mul_f64(ratio)
        });
        let start = Instant::now();
        let rel = tat.map_or(EMPTY, |tat| {
            tat.saturating_duration_since(start).as_nanos() as u64
        });
        self.tat.0.store(rel, Ordering::Relaxed);
        self.limiter = RateLimiter::new(quota.to_governor(), self.tat.clone(), TokioClock);
        self.start = start;
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
    map: HashMap<BucketKey, Entry, foldhash::fast::RandomState>,
    ops: usize,
}

/// The in-process [`Backend`]: one governor GCRA limiter per key on
/// [`TokioClock`], with the key's cooldown and adaptive state beside it, behind one mutex.
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
        self.lock().map.len()
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
        let entry = state.map.get(key)?;
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
        state.map.retain(|_, entry| !entry.is_idle(now, ttl));
        state.ops = 0;
    }

    fn entry<'a>(&self, state: &'a mut State, key: &BucketKey, policy: &Policy) -> &'a mut Entry {
        state.ops += 1;
        if state.ops >= SWEEP_EVERY.max(state.map.len()) {
            self.sweep_locked(state);
        }
        // One hash per decision; the key clone is a reference-count increment.
        state
            .map
            .entry(key.clone())
            .or_insert_with(|| Entry::new(policy.quota))
    }

    /// [`Backend::acquire`], synchronously.
    pub fn acquire_now(&self, key: &BucketKey, policy: &Policy) -> Decision {
        let mut state = self.lock();
        let entry = self.entry(&mut state, key, policy);
        if let Some(until) = entry.cooldown_until {
            if until > Instant::now() {
                return Decision::NotBefore {
                    at: until,
                    cooldown: true,
                };
            }
            entry.cooldown_until = None;
        }
        let quota = entry.effective(policy);
        if quota != entry.applied {
            entry.apply(quota);
        }
        match entry.limiter.check() {
            Ok(()) => Decision::Admit,
            Err(not_until) => Decision::NotBefore {
                at: not_until.earliest_possible().into_inner(),
                cooldown: false,
            },
        }
    }

    /// [`Backend::feedback`], synchronously.
    pub fn feedback_now(&self, key: &BucketKey, policy: &Policy, feedback: Feedback) -> Reported {
        let mut state = self.lock();
        let entry = self.entry(&mut state, key, policy);
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
