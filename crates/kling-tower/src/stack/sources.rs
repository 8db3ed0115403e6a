//! The stack's [`SnapshotSource`]s: the task slots' pools and the rate limiter's queues (and a
//! fleet's requests), read without waiting, from a remote backend as its last read found them.

use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use kling_concurrency::SlotsHandle;
use kling_concurrency::backend::PoolSnapshot;
use kling_core::AccountId;
use kling_metrics::{PoolUsage, QueueDepth, Refresh, Snapshot, SnapshotSource};
use kling_ratelimit::GcraHandle;
use tokio::time::Instant;

/// A task-slots handle as a [`SnapshotSource`]: every pool's slots in use, believed capacity
/// and waiters, and a queue depth per pool (`slots:{account}:{pool}`).
///
/// A snapshot must not wait. The in-process backend answers at once. A remote backend (the
/// fleet's pools in Redis) takes a round trip: a snapshot shows the pools as its source read
/// them last, and starts the next read (one at a time, on the current tokio runtime or the
/// one the source was made on), so a periodic scrape sees them at most one period old;
/// [`Monitor::refreshed_snapshot`] reads them first.
///
/// A backend shared by several accounts (one Redis and key prefix under the stacks of a
/// gateway) holds every account's pools: [`account`](SlotsSource::account) keeps one
/// account's, as a [`KlingLayer`](crate::KlingLayer)'s monitor does.
///
/// [`Monitor::refreshed_snapshot`]: kling_metrics::Monitor::refreshed_snapshot
#[derive(Clone, Debug)]
pub struct SlotsSource<B = kling_concurrency::backend::InProcess> {
    handle: SlotsHandle<B>,
    account: Option<AccountId>,
    last: Arc<LastRead<Vec<PoolSnapshot>>>,
}

impl<B> SlotsSource<B> {
    /// A source reading `handle`: every account's pools the backend holds.
    pub fn new(handle: SlotsHandle<B>) -> Self {
        SlotsSource {
            handle,
            account: None,
            last: Arc::default(),
        }
    }

    /// Shows only `account`'s pools (and their queues).
    pub fn account(mut self, account: AccountId) -> Self {
        self.account = Some(account);
        self
    }
}

impl<B: kling_concurrency::backend::SlotBackend> SnapshotSource for SlotsSource<B> {
    fn fill(&self, snapshot: &mut Snapshot) {
        if let Some((pools, _)) = self
            .last
            .now_or_last(self.handle.backend().snapshot(), None)
        {
            add_pools(snapshot, &pools, self.account.as_ref());
        }
    }

    fn refresh(&self) -> Refresh<'_> {
        Box::pin(async move {
            let read = self.handle.backend().snapshot().await;
            self.last.keep(read.ok());
        })
    }
}

/// Adds each pool's usage, and its waiters as a queue, to `snapshot`: `only` that account's
/// when given.
fn add_pools(snapshot: &mut Snapshot, pools: &[PoolSnapshot], only: Option<&AccountId>) {
    for pool in pools {
        if only.is_some_and(|account| *account != pool.key.account) {
            continue;
        }
        let account = pool.key.account.as_str();
        let name = pool.key.pool.to_string();
        snapshot.queues.push(QueueDepth::new(
            format!("slots:{account}:{name}"),
            pool.waiters as u64,
        ));
        snapshot.pools.push(
            PoolUsage::new(
                name,
                pool.in_use,
                pool.capacity,
                u32::try_from(pool.waiters).unwrap_or(u32::MAX),
            )
            .with_account(account),
        );
    }
}

/// What a source read last from a backend that takes a round trip, when, and whether a read
/// is under way.
#[derive(Debug)]
struct LastRead<T> {
    value: std::sync::Mutex<Option<(T, Instant)>>,
    reading: std::sync::atomic::AtomicBool,
    /// The runtime the source was made on: a read starts there when a snapshot is taken off
    /// any runtime (a thread of its own serving `/metrics`, say).
    runtime: Option<tokio::runtime::Handle>,
}

impl<T> Default for LastRead<T> {
    fn default() -> Self {
        LastRead {
            value: std::sync::Mutex::new(None),
            reading: std::sync::atomic::AtomicBool::new(false),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }
}

impl<T: Clone + Send + 'static> LastRead<T> {
    /// Keeps a read's answer. A failed read (`None`: Redis unreachable) keeps the previous
    /// one rather than none: the slots of a fleet do not vanish with the connection (a
    /// caller that needs a recent figure says how old it may be).
    fn keep(&self, read: Option<T>) {
        if let Some(value) = read {
            *self.lock() = Some((value, Instant::now()));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(T, Instant)>> {
        self.value.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Polls `read` once: its answer if it has one already. Otherwise what the last read
    /// found, if it is no older than `max_age`, with `read` started to answer the next call
    /// (unless a read is under way) on the current runtime, or else on the source's. With
    /// the time of the read.
    fn now_or_last<F, E>(
        self: &Arc<Self>,
        mut read: F,
        max_age: Option<Duration>,
    ) -> Option<(T, Instant)>
    where
        F: std::future::Future<Output = Result<T, E>> + Send + Unpin + 'static,
    {
        let mut cx = Context::from_waker(Waker::noop());
        match std::pin::Pin::new(&mut read).poll(&mut cx) {
            Poll::Ready(Ok(value)) => {
                // A remote backend that answered at once this time: a later call that must
                // fall back on the last read shows this one, not an older one.
                let now = Instant::now();
                let mut last = self.lock();
                if last.is_some() {
                    *last = Some((value.clone(), now));
                }
                return Some((value, now));
            }
            Poll::Ready(Err(_)) => {}
            Poll::Pending => {
                let runtime = tokio::runtime::Handle::try_current()
                    .ok()
                    .or_else(|| self.runtime.clone());
                if let Some(runtime) = runtime
                    && !self.reading.swap(true, std::sync::atomic::Ordering::AcqRel)
                {
                    let reading = Reading(Arc::clone(self));
                    runtime.spawn(async move { reading.0.keep(read.await.ok()) });
                }
            }
        }
        let last = self.lock();
        let (value, read_at) = last.as_ref()?;
        if max_age.is_some_and(|max| read_at.elapsed() > max) {
            return None;
        }
        Some((value.clone(), *read_at))
    }
}

/// A read under way; it lets the next one start when it ends, also if its runtime drops it.
struct Reading<T>(Arc<LastRead<T>>);

impl<T> Drop for Reading<T> {
    fn drop(&mut self) {
        self.0
            .reading
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

/// A rate-limiter handle as a [`SnapshotSource`]: the queue depth of each listed account
/// (`ratelimit:{account}`), and, for a backend a fleet shares (Redis), the requests the
/// whole fleet sent for them over the window ([`RateUsage::fleet_requests`]), as its last
/// read found them: like [`SlotsSource`], each snapshot starts the next read, and
/// [`Monitor::refreshed_snapshot`] reads first. List one account per monitor: the monitor's
/// quota is an account's.
///
/// [`RateUsage::fleet_requests`]: kling_metrics::RateUsage::fleet_requests
/// [`Monitor::refreshed_snapshot`]: kling_metrics::Monitor::refreshed_snapshot
#[derive(Clone, Debug)]
pub struct RateLimitSource<Bk = kling_ratelimit::InProcess> {
    handle: GcraHandle<Bk>,
    accounts: Vec<AccountId>,
    fleet: Arc<LastRead<u64>>,
}

impl<Bk> RateLimitSource<Bk> {
    /// A source reading `handle`'s queues for `accounts`.
    pub fn new(handle: GcraHandle<Bk>, accounts: Vec<AccountId>) -> Self {
        RateLimitSource {
            handle,
            accounts,
            fleet: Arc::default(),
        }
    }
}

impl<Bk: kling_ratelimit::Backend> RateLimitSource<Bk> {
    /// The fleet's requests of every listed account, read together; `None` for a backend of
    /// one process.
    fn fleet_read(
        &self,
    ) -> Option<impl std::future::Future<Output = Result<u64, ()>> + Send + Unpin + 'static> {
        let reads = self
            .accounts
            .iter()
            .map(|account| {
                let key = kling_ratelimit::BucketKey::account(Some(account.clone()));
                self.handle.backend().fleet_requests(&key)
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Box::pin(async move {
            let mut sum = 0;
            for read in reads {
                sum += read.await.map_err(|_| ())?;
            }
            Ok(sum)
        }))
    }
}

impl<Bk: kling_ratelimit::Backend> SnapshotSource for RateLimitSource<Bk> {
    fn fill(&self, snapshot: &mut Snapshot) {
        for account in &self.accounts {
            snapshot.queues.push(QueueDepth::new(
                format!("ratelimit:{account}"),
                self.handle.queue_depth(Some(account)) as u64,
            ));
        }
        if let Some(read) = self.fleet_read() {
            // A count over the window read longer ago than the window says nothing of now
            // (Redis has been unreachable since).
            let window = snapshot.rate.window;
            if let Some((requests, read_at)) = self.fleet.now_or_last(read, Some(window)) {
                snapshot.rate.fleet_requests = Some(requests);
                snapshot.rate.fleet_read_at = Some(read_at);
            }
        }
    }

    fn refresh(&self) -> Refresh<'_> {
        Box::pin(async move {
            if let Some(read) = self.fleet_read() {
                self.fleet.keep(read.await.ok());
            }
        })
    }
}
