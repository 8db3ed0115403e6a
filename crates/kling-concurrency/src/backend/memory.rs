//! The in-process backend: one mutex-guarded map, a synchronous fast path, FIFO hand-off.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::{Future, Ready, ready};
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use kling_core::error::ApiError;
use kling_core::metrics as names;
use kling_core::{AccountId, TaskStatus};
use tokio::time::{Instant, Sleep};

use super::{
    Applied, PoolSnapshot, ReleaseReason, Released, Reservation, SlotBackend, SlotKey, SlotOp,
    TaskRef,
};
use crate::config::SlotsConfig;
use crate::error::{AcquireError, BackendError, ConfigError, Halted, OverCapacity};

/// The in-process slot backend: state in this process, behind one mutex.
///
/// Acquiring is synchronous when slots are free and nobody waits (one lock, no allocation once
/// the pool is known); otherwise the create joins its pool's FIFO queue and released slots are
/// handed to the queue's head in order. Leases and the `1303` recovery are checked lazily: when
/// a create would wait (its future also sleeps until the next lease end or recovery step), on
/// every [`SlotOp`] touching the pool, and in [`snapshot`](SlotBackend::snapshot).
///
/// # Clone
///
/// Clones share the same state (an `Arc`).
#[derive(Clone)]
pub struct InProcess {
    shared: Arc<Mutex<State>>,
}

impl fmt::Debug for InProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("InProcess")
            .field("pools", &state.list.len())
            .field("halted", &state.halted.len())
            .finish_non_exhaustive()
    }
}

impl InProcess {
    /// A backend with the capacities, recovery interval and default account of `config`.
    pub fn new(config: SlotsConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(InProcess {
            shared: Arc::new(Mutex::new(State {
                config,
                pools: FxMap::default(),
                list: Vec::new(),
                ids: FxMap::default(),
                externals: FxMap::default(),
                halted: HashMap::new(),
                next_token: 0,
            })),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
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
    id: Option<Arc<str>>,
    external: Option<Arc<str>>,
}

struct Waiter {
    token: u64,
    weight: u32,
    waker: Waker,
}

struct PoolState {
    key: SlotKey,
    configured: u32,
    /// Slots believed held by someone else after a 1303.
    hidden: u32,
    /// When the last hidden slot came back by time (or the last 1303).
    recovered_at: Instant,
    in_use: u32,
    queue: VecDeque<Waiter>,
    /// Grants handed to waiters that have not picked them up yet.
    granted: Vec<u64>,
    /// Holdings by holding number.
    holdings: FxMap<u64, Holding>,
    /// No lease ends before this (may be early after renewals; then rescanned).
    next_lease: Option<Instant>,
    gauges: Gauges,
}

struct Gauges {
    labels: [(&'static str, String); 2],
    in_use: metrics::Gauge,
    capacity: metrics::Gauge,
    waiters: metrics::Gauge,
    /// Finished-task metrics by status, registered on first use.
    finished: Vec<(String, metrics::Counter, metrics::Histogram)>,
}

impl Gauges {
    fn finished(&mut self, status: &str, held_for: Duration) {
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
        let (_, counter, histogram) = &self.finished[i];
        counter.increment(1);
        histogram.record(held_for.as_secs_f64());
    }
}

/// Where a task id or external id is held: its pool's index in `State::list` and its holding
/// number.
type Place = (usize, u64);

struct State {
    config: SlotsConfig,
    /// Each pool's index in `list` (pools are never removed, so indices stay valid).
    pools: FxMap<SlotKey, usize>,
    list: Vec<PoolState>,
    ids: FxMap<Arc<str>, Place>,
    externals: FxMap<Arc<str>, Place>,
    halted: HashMap<AccountId, ApiError>,
    next_token: u64,
}

impl PoolState {
    fn new(key: &SlotKey, configured: u32) -> Self {
        let labels = [
            (names::LABEL_ACCOUNT, key.account.to_string()),
            (names::LABEL_POOL, key.pool.to_string()),
        ];
        let pool = PoolState {
            key: key.clone(),
            configured,
            hidden: 0,
            recovered_at: Instant::now(),
            in_use: 0,
            queue: VecDeque::new(),
            granted: Vec::new(),
            holdings: FxMap::default(),
            next_lease: None,
            gauges: Gauges {
                in_use: metrics::gauge!(names::SLOTS_IN_USE, &labels),
                capacity: metrics::gauge!(names::SLOTS_CAPACITY, &labels),
                waiters: metrics::gauge!(names::SLOTS_WAITERS, &labels),
                finished: Vec::new(),
                labels,
            },
        };
        pool.publish();
        pool
    }

    fn capacity(&self) -> u32 {
        self.configured.saturating_sub(self.hidden)
    }

    fn free(&self) -> u32 {
        self.capacity().saturating_sub(self.in_use)
    }

    fn publish(&self) {
        self.gauges.in_use.set(f64::from(self.in_use));
        self.gauges.capacity.set(f64::from(self.capacity()));
        self.gauges.waiters.set(self.queue.len() as f64);
    }

    /// Hands free slots to the queue's head, in order.
    fn dispatch(&mut self) {
        while let Some(front) = self.queue.front() {
            if front.weight > self.free() {
                break;
            }
            let waiter = self.queue.pop_front().expect("front exists");
            self.in_use += waiter.weight;
            self.granted.push(waiter.token);
            waiter.waker.wake();
        }
    }

    /// The next instant lazy maintenance has something to do.
    fn next_wake(&self, interval: Duration) -> Option<Instant> {
        let recovery = (self.hidden > 0).then(|| self.recovered_at + interval);
        match (self.next_lease, recovery) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn give_back(&mut self, weight: u32) {
        self.in_use = self.in_use.saturating_sub(weight);
    }

    fn remove_waiter(&mut self, token: u64) -> bool {
        if let Some(i) = self.queue.iter().position(|w| w.token == token) {
            self.queue.remove(i);
            return true;
        }
        false
    }

    fn take_grant(&mut self, token: u64) -> bool {
        if let Some(i) = self.granted.iter().position(|&t| t == token) {
            self.granted.swap_remove(i);
            return true;
        }
        false
    }
}

impl State {
    /// The index of `key`'s pool, made on first use (one hash lookup when known).
    fn index(&mut self, key: &SlotKey) -> usize {
        if let Some(&i) = self.pools.get(key) {
            return i;
        }
        let configured = self.config.capacity_of(&key.account, &key.pool);
        let i = self.list.len();
        self.list.push(PoolState::new(key, configured));
        self.pools.insert(key.clone(), i);
        i
    }

    fn pool_mut(&mut self, key: &SlotKey) -> &mut PoolState {
        let i = self.index(key);
        &mut self.list[i]
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// Releases one holding (exactly once: it is removed here).
    fn release(
        &mut self,
        index: usize,
        holding: u64,
        reason: ReleaseReason,
        now: Instant,
    ) -> Option<Released> {
        let pool = self.list.get_mut(index)?;
        let holding = pool.holdings.remove(&holding)?;
        pool.give_back(holding.weight);
        // Tasks ending is also how slots held by others come back: one per ended task.
        pool.hidden = pool.hidden.saturating_sub(1);
        pool.dispatch();
        pool.publish();
        let held_for = now.saturating_duration_since(holding.since);
        pool.gauges.finished(reason.as_str(), held_for);
        if let Some(id) = &holding.id {
            self.ids.remove(id);
        }
        if let Some(ext) = &holding.external {
            self.externals.remove(ext);
        }
        Some(Released {
            key: self.list[index].key.clone(),
            task: holding.id.or(holding.external),
            weight: holding.weight,
            held_for,
            reason,
        })
    }

    /// Expires leases and brings hidden slots back by time, for one pool.
    fn maintain(&mut self, index: usize, now: Instant, released: &mut Vec<Released>) {
        let interval = self.config.recovery_interval;
        let Some(pool) = self.list.get_mut(index) else {
            return;
        };
        if pool.hidden > 0 {
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
            let expired: Vec<u64> = pool
                .holdings
                .iter()
                .filter(|(_, h)| h.lease_until <= now)
                .map(|(&n, _)| n)
                .collect();
            for holding in expired {
                released.extend(self.release(index, holding, ReleaseReason::LeaseExpired, now));
            }
            let pool = &mut self.list[index];
            pool.next_lease = pool.holdings.values().map(|h| h.lease_until).min();
        }
        let pool = &mut self.list[index];
        pool.dispatch();
        pool.publish();
    }

    fn hold(&mut self, key: &SlotKey, task: TaskRef, weight: u32, lease: Duration, now: Instant) {
        let number = self.token();
        let id: Option<Arc<str>> = task.id.map(Arc::from);
        let external: Option<Arc<str>> = task.external_id.map(Arc::from);
        // A task id, and an external id within an account, name one task: a holding already
        // under either is this same task's earlier create, whose outcome was unknown and which
        // was sent again. It gives its slots back now instead of hiding them until its lease.
        let earlier = [
            id.as_ref().and_then(|n| self.ids.get(n)).cloned(),
            external
                .as_ref()
                .and_then(|n| self.externals.get(n))
                .cloned(),
        ];
        for place in earlier.into_iter().flatten() {
            if self.list[place.0].key.account == key.account {
                self.supersede(place);
            }
        }
        let index = self.index(key);
        if let Some(id) = &id {
            self.ids.insert(id.clone(), (index, number));
        }
        if let Some(ext) = &external {
            self.externals.insert(ext.clone(), (index, number));
        }
        let lease_until = now + lease;
        let pool = &mut self.list[index];
        pool.next_lease = Some(pool.next_lease.map_or(lease_until, |t| t.min(lease_until)));
        pool.holdings.insert(
            number,
            Holding {
                weight,
                since: now,
                lease_until,
                id,
                external,
            },
        );
        pool.publish();
    }

    /// Drops a holding that a newer one of the same task replaces: its slots go back, and it
    /// counts as no finished task.
    fn supersede(&mut self, (index, number): Place) {
        let Some(pool) = self.list.get_mut(index) else {
            return;
        };
        let Some(old) = pool.holdings.remove(&number) else {
            return;
        };
        pool.give_back(old.weight);
        pool.dispatch();
        pool.publish();
        if let Some(id) = &old.id
            && self.ids.get(id).is_some_and(|(_, n)| *n == number)
        {
            self.ids.remove(id);
        }
        if let Some(ext) = &old.external
            && self.externals.get(ext).is_some_and(|(_, n)| *n == number)
        {
            self.externals.remove(ext);
        }
    }

    /// Where the task a report names is held: by id, else by external id.
    fn find(&self, id: &str, external: Option<&str>, by_complete: bool) -> Option<Place> {
        if let Some(&place) = self.ids.get(id) {
            return Some(place);
        }
        if let Some(&place) = external.and_then(|ext| self.externals.get(ext)) {
            return Some(place);
        }
        if by_complete {
            // `complete` may name a task by its external id.
            return self.externals.get(id).cloned();
        }
        None
    }

    /// One report of a task: a terminal status releases it, a running one renews its lease.
    fn report(
        &mut self,
        id: &str,
        external: Option<&str>,
        status: Option<&TaskStatus>,
        lease: Duration,
        now: &mut Option<Instant>,
        applied: &mut Applied,
    ) {
        let Some((index, number)) = self.find(id, external, status.is_none()) else {
            return;
        };
        let now = *now.get_or_insert_with(Instant::now);
        applied.changed = true;
        if status.is_none_or(TaskStatus::is_terminal) {
            let reason = match status {
                Some(status) => ReleaseReason::Ended(status.clone()),
                None => ReleaseReason::Completed,
            };
            applied
                .released
                .extend(self.release(index, number, reason, now));
            return;
        }
        // Still running: renew the lease, and learn the task id of a create whose outcome was
        // unknown.
        let Some(holding) = self
            .list
            .get_mut(index)
            .and_then(|pool| pool.holdings.get_mut(&number))
        else {
            return;
        };
        holding.lease_until = now + lease;
        if holding.id.is_none() {
            let id: Arc<str> = Arc::from(id);
            holding.id = Some(id.clone());
            self.ids.insert(id, (index, number));
        }
    }

    fn apply(&mut self, op: SlotOp) -> Applied {
        let mut applied = Applied::default();
        let mut now = None;
        match op {
            SlotOp::GiveBack(res) => {
                let pool = self.pool_mut(&res.key);
                pool.give_back(res.weight);
                pool.dispatch();
                pool.publish();
                applied.changed = true;
            }
            SlotOp::Hold {
                reservation,
                task,
                lease,
            } => {
                let now = Instant::now();
                self.hold(&reservation.key, task, reservation.weight, lease, now);
                applied.changed = true;
            }
            SlotOp::Congested(res) => {
                let pool = self.pool_mut(&res.key);
                pool.give_back(res.weight);
                // What we thought free is held by someone we cannot see: believe the pool
                // holds only what we hold now.
                pool.hidden = pool.configured.saturating_sub(pool.in_use);
                pool.recovered_at = Instant::now();
                pool.dispatch();
                pool.publish();
                applied.changed = true;
            }
            SlotOp::Halt { reservation, cause } => {
                let account = reservation.key.account.clone();
                let pool = self.pool_mut(&reservation.key);
                pool.give_back(reservation.weight);
                pool.publish();
                self.halted.insert(account.clone(), cause);
                // Wake the account's waiters: they fail with `Halted`.
                for pool in &mut self.list {
                    if pool.key.account == account {
                        for waiter in &pool.queue {
                            waiter.waker.wake_by_ref();
                        }
                    }
                }
                applied.changed = true;
            }
            SlotOp::Observed { outcome, lease } => {
                for task in outcome.tasks() {
                    self.report(
                        &task.id,
                        task.external_id.as_deref(),
                        Some(&task.status),
                        lease,
                        &mut now,
                        &mut applied,
                    );
                }
            }
            SlotOp::Update { updates, lease } => {
                for update in &updates {
                    self.report(
                        &update.id,
                        update.external_id.as_deref(),
                        update.status.as_ref(),
                        lease,
                        &mut now,
                        &mut applied,
                    );
                }
            }
            SlotOp::Adopt {
                key,
                task,
                weight,
                lease,
            } => {
                let known = task
                    .id
                    .as_deref()
                    .is_some_and(|id| self.ids.contains_key(id))
                    || task
                        .external_id
                        .as_deref()
                        .is_some_and(|ext| self.externals.contains_key(ext));
                if !known {
                    self.pool_mut(&key).in_use += weight;
                    self.hold(&key, task, weight, lease, Instant::now());
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
                for state in &mut self.list {
                    let key = &state.key;
                    let matches = account.as_ref().is_none_or(|a| *a == key.account)
                        && (key.pool == pool
                            || (pool.model().is_none() && key.pool.product() == pool.product()));
                    if matches {
                        let configured = config.capacity_of(&key.account, &key.pool);
                        applied.changed |= configured != state.configured;
                        state.configured = configured;
                        state.hidden = state.hidden.min(configured);
                        state.dispatch();
                        state.publish();
                    }
                }
            }
            SlotOp::ResetHalt(account) => {
                applied.changed = self.halted.remove(&account).is_some();
            }
        }
        applied
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

    fn apply(&self, op: SlotOp) -> Self::Apply {
        ready(Ok(self.lock().apply(op)))
    }

    fn snapshot(&self) -> Self::Snapshot {
        let mut state = self.lock();
        let now = Instant::now();
        let count = state.list.len();
        let mut expired = Vec::new();
        let mut pools = Vec::with_capacity(count);
        for index in 0..count {
            state.maintain(index, now, &mut expired);
            let pool = &state.list[index];
            pools.push(PoolSnapshot {
                in_use: pool.in_use,
                capacity: pool.capacity(),
                configured: pool.configured,
                waiters: pool.queue.len(),
                tasks: pool.holdings.len(),
                key: pool.key.clone(),
            });
        }
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
        let this = &mut *self;
        let Some(key) = this.key.as_ref() else {
            panic!("InProcessAcquire polled after completion");
        };
        let mut state = this.shared.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(err) = Self::halted(&state, key) {
                if let Some(token) = this.token.take() {
                    let pool = state.pool_mut(key);
                    if !pool.remove_waiter(token) && pool.take_grant(token) {
                        pool.give_back(this.weight);
                    }
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
                    let pool = state.pool_mut(key);
                    if pool.configured > 0 && weight > pool.configured {
                        let err = OverCapacity::new(key.pool.clone(), weight, pool.configured);
                        this.key = None;
                        return Poll::Ready(Err(AcquireError::OverCapacity(err)));
                    }
                    if pool.queue.is_empty() && pool.free() >= weight {
                        // The fast path: free slots and nobody ahead.
                        pool.in_use += weight;
                        pool.gauges.in_use.set(f64::from(pool.in_use));
                        let key = this.key.take().expect("checked above");
                        return Poll::Ready(Ok(Reservation { key, weight, token }));
                    }
                    pool.queue.push_back(Waiter {
                        token,
                        weight,
                        waker: cx.waker().clone(),
                    });
                    pool.publish();
                    this.token = Some(token);
                    token
                }
                Some(token) => token,
            };
            let now = Instant::now();
            let mut expired = Vec::new();
            let index = state.index(key);
            state.maintain(index, now, &mut expired);
            let interval = state.config.recovery_interval;
            let pool = &mut state.list[index];
            if pool.take_grant(token) {
                this.token = None;
                let key = this.key.take().expect("checked above");
                return Poll::Ready(Ok(Reservation { key, weight, token }));
            }
            if let Some(waiter) = pool.queue.iter_mut().find(|w| w.token == token)
                && !waiter.waker.will_wake(cx.waker())
            {
                waiter.waker = cx.waker().clone();
            }
            // Sleep until maintenance has work (a lease ends, a hidden slot comes back).
            let Some(wake_at) = pool.next_wake(interval) else {
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
        if !pool.remove_waiter(token) && pool.take_grant(token) {
            pool.give_back(self.weight);
        }
        // The head may have changed: let the next waiters in.
        pool.dispatch();
        pool.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kling_core::{Pool, Product};

    fn key() -> SlotKey {
        SlotKey::new(AccountId::new("a"), Pool::new(Product::Video))
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
}
