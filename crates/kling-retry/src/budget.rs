//! The retry budget: retries may be at most a share of recent requests, plus a small floor, so
//! a failing API never multiplies its own load.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kling_core::lanes;
use tokio::time::Instant;

use crate::error::ConfigError;

/// How many buckets the window is split into; requests age out one bucket at a time.
const BUCKETS: usize = 10;

/// Deposit counters, one set per group of threads: every call deposits, and one counter that
/// every worker thread writes moves between their caches on each call.
const SHARDS: usize = 4;

/// One shard's buckets, on cache lines of their own.
#[derive(Default)]
#[repr(align(128))]
struct Shard([AtomicU64; BUCKETS]);

/// The deposit shard of the current thread: its lane's ([`lanes::current`]), lanes taking
/// shards in turn.
fn shard_index() -> usize {
    lanes::current() % SHARDS
}

/// A retry budget on tokio time, shared by clones.
///
/// Every logical request deposits one; every retry withdraws one (and gives it back if the
/// retry layer never sends it: the call dropped during its backoff, or ended by its deadline
/// first). A retry is allowed while the retries of the last `window` stay within
/// `min_per_sec × window + ratio × requests of the last window`. The defaults (10 s window,
/// 1 retry per second floor, ratio 0.2) let a healthy client retry its occasional 1302 or 5xx,
/// and limit a client facing a failing API to 1.2 requests per logical call plus the floor.
///
/// Deposits are lock-free (one atomic add on a bucket of the calling thread's shard, so threads
/// do not contend for one counter); withdrawals take a short lock, never held across an
/// `.await`.
///
/// # Clone
///
/// Clones share one budget (an `Arc`): every service a [`RetryLayer`](crate::RetryLayer) makes,
/// and every clone of those services, draws from it. Pass one budget to several layers to share
/// it among them too.
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<Inner>,
}

struct Inner {
    origin: Instant,
    bucket_nanos: u64,
    /// `u64::MAX / bucket_nanos`, to find a deposit's bucket without a division (see
    /// [`divide`]).
    reciprocal: u64,
    window: Duration,
    min_per_sec: u32,
    ratio: f64,
    floor: f64,
    deposits: [Shard; SHARDS],
    withdrawals: [AtomicU64; BUCKETS],
    withdraw_lock: Mutex<()>,
}

impl RetryBudget {
    /// A budget over a sliding `window`: at least `min_per_sec` retries per second, and beyond
    /// that `ratio` retries per request (0.2 = 20 %).
    ///
    /// `window` must be at least 10 ms and `ratio` finite and not negative.
    pub fn new(window: Duration, min_per_sec: u32, ratio: f64) -> Result<Self, ConfigError> {
        if window < Duration::from_millis(10) {
            return Err(ConfigError::new("budget.window", "must be at least 10 ms"));
        }
        if !(ratio.is_finite() && ratio >= 0.0) {
            return Err(ConfigError::new(
                "budget.ratio",
                "must be finite and not negative",
            ));
        }
        let bucket_nanos = (window / BUCKETS as u32)
            .as_nanos()
            .min(u128::from(u64::MAX)) as u64;
        Ok(RetryBudget {
            inner: Arc::new(Inner {
                origin: Instant::now(),
                bucket_nanos,
                reciprocal: u64::MAX / bucket_nanos,
                window,
                min_per_sec,
                ratio,
                floor: f64::from(min_per_sec) * window.as_secs_f64(),
                deposits: Default::default(),
                withdrawals: Default::default(),
                withdraw_lock: Mutex::new(()),
            }),
        })
    }

    /// A budget that allows every retry (the attempt limit and the deadline still apply).
    pub fn unlimited() -> Self {
        RetryBudget::new(Duration::from_secs(10), u32::MAX, f64::MAX).expect("valid")
    }

    /// Records one logical request.
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    pub(crate) fn deposit_at(&self, now: Instant) {
        let epoch = self.inner.epoch(now);
        let shard = &self.inner.deposits[shard_index()];
        add(&shard.0[epoch as usize % BUCKETS], epoch, 1);
    }

    /// Takes one retry from the budget; `false` when the budget is spent.
    pub fn try_withdraw(&self) -> bool {
        self.withdraw().is_some()
    }

    /// Takes one retry from the budget: the bucket it was counted in, for
    /// [`refund`](Self::refund), or `None` when the budget is spent.
    pub(crate) fn withdraw(&self) -> Option<u32> {
        let inner = &*self.inner;
        let now = Instant::now();
        let epoch = inner.epoch(now);
        let _serial = inner
            .withdraw_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let spent = sum(&inner.withdrawals, epoch);
        if spent as f64 + 1.0 > inner.allowance(epoch) {
            return None;
        }
        add(&inner.withdrawals[epoch as usize % BUCKETS], epoch, 1);
        Some(epoch)
    }

    /// Gives back a retry [`withdraw`](Self::withdraw) took in bucket `epoch` and that was
    /// never sent. A bucket restarted since (its epoch left the window) keeps nothing to give
    /// back from: the retry aged out with it.
    pub(crate) fn refund(&self, epoch: u32) {
        let slot = &self.inner.withdrawals[epoch as usize % BUCKETS];
        let mut current = slot.load(Ordering::Relaxed);
        loop {
            let (held, count) = unpack(current);
            if held != epoch || count == 0 {
                return;
            }
            let next = pack(epoch, count - 1);
            match slot.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// How many retries the budget would allow now.
    pub fn remaining(&self) -> u64 {
        let inner = &*self.inner;
        let epoch = inner.epoch(Instant::now());
        let allowance = inner.allowance(epoch).floor();
        let spent = sum(&inner.withdrawals, epoch) as f64;
        let left = (allowance - spent).max(0.0);
        if left >= u64::MAX as f64 {
            u64::MAX
        } else {
            left as u64
        }
    }
}

impl Default for RetryBudget {
    /// A 10 s window, a floor of 1 retry per second, and 20 % of requests.
    fn default() -> Self {
        RetryBudget::new(Duration::from_secs(10), 1, 0.2).expect("valid defaults")
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("window", &self.inner.window)
            .field("min_per_sec", &self.inner.min_per_sec)
            .field("ratio", &self.inner.ratio)
            .field("remaining", &self.remaining())
            .finish()
    }
}

impl Inner {
    fn epoch(&self, now: Instant) -> u32 {
        // u64 nanoseconds: 584 years.
        let elapsed = now.saturating_duration_since(self.origin).as_nanos() as u64;
        divide(elapsed, self.bucket_nanos, self.reciprocal) as u32
    }

    fn allowance(&self, epoch: u32) -> f64 {
        let deposits: u64 = self.deposits.iter().map(|shard| sum(&shard.0, epoch)).sum();
        self.floor + self.ratio * deposits as f64
    }
}

/// `n / d`, given `reciprocal` = `u64::MAX / d`: a multiplication and a correction. Every call
/// deposits, and a 64-bit hardware division takes tens of cycles.
///
/// The estimate `n × reciprocal / 2⁶⁴` is never above `n / d` and less than 2 below it, so it
/// is the quotient or one less.
fn divide(n: u64, d: u64, reciprocal: u64) -> u64 {
    let mut q = ((u128::from(n) * u128::from(reciprocal)) >> 64) as u64;
    while n - q * d >= d {
        q += 1;
    }
    q
}

fn pack(epoch: u32, count: u32) -> u64 {
    (u64::from(epoch) << 32) | u64::from(count)
}

fn unpack(value: u64) -> (u32, u32) {
    ((value >> 32) as u32, value as u32)
}

/// Adds `n` to a bucket, restarting it if it holds an older epoch.
fn add(slot: &AtomicU64, epoch: u32, n: u32) {
    let mut current = slot.load(Ordering::Relaxed);
    let (held, count) = unpack(current);
    if held == epoch && count < u32::MAX / 2 && n < u32::MAX / 4 {
        // The bucket is current and far from full: one add, no retry loop. (Were it restarted
        // meanwhile — a whole window later — the request counts in the new epoch: harmless.)
        slot.fetch_add(u64::from(n), Ordering::Relaxed);
        return;
    }
    loop {
        let (held, count) = unpack(current);
        let next = if held == epoch {
            pack(epoch, count.saturating_add(n))
        } else {
            pack(epoch, n)
        };
        match slot.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(actual) => current = actual,
        }
    }
}

/// The total of the buckets that belong to the window ending at `epoch`.
fn sum(slots: &[AtomicU64; BUCKETS], epoch: u32) -> u64 {
    slots
        .iter()
        .map(|slot| unpack(slot.load(Ordering::Relaxed)))
        .filter(|(held, _)| epoch.wrapping_sub(*held) < BUCKETS as u32)
        .map(|(_, count)| u64::from(count))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_share_of_requests_plus_a_floor() {
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.5).unwrap();
        assert!(!budget.try_withdraw(), "no requests yet, no floor");
        for _ in 0..4 {
            budget.deposit();
        }
        assert_eq!(budget.remaining(), 2);
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
        // The requests age out with the window, and the retries with them.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(budget.remaining(), 0);
        budget.deposit();
        budget.deposit();
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_allows_a_few_retries_without_requests() {
        let budget = RetryBudget::new(Duration::from_secs(2), 3, 0.0).unwrap();
        assert_eq!(budget.remaining(), 6);
        for _ in 0..6 {
            assert!(budget.try_withdraw());
        }
        assert!(!budget.try_withdraw());
        let clone = budget.clone();
        assert!(!clone.try_withdraw(), "clones share the budget");
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_from_every_thread_count() {
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0).unwrap();
        let threads: Vec<_> = (0..2 * SHARDS)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        budget.deposit_at(budget.inner.origin);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(budget.remaining(), 20 * SHARDS as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refund_gives_back_within_its_bucket_only() {
        let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.0).unwrap();
        let epoch = budget.withdraw().expect("the floor allows one");
        assert_eq!(budget.remaining(), 9);
        budget.refund(epoch);
        assert_eq!(budget.remaining(), 10);
        // Nothing more to give back from that bucket.
        budget.refund(epoch);
        assert_eq!(budget.remaining(), 10);
        // A bucket restarted by a later epoch keeps the later withdrawals.
        let old = budget.withdraw().unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        let new = budget.withdraw().unwrap();
        assert_eq!(old as usize % BUCKETS, new as usize % BUCKETS);
        budget.refund(old);
        assert_eq!(budget.remaining(), 9, "the later withdrawal stands");
    }

    #[test]
    fn a_current_bucket_adds_and_an_old_one_restarts() {
        let slot = AtomicU64::new(pack(3, 5));
        add(&slot, 3, 1);
        assert_eq!(unpack(slot.load(Ordering::Relaxed)), (3, 6));
        add(&slot, 4, 1);
        assert_eq!(unpack(slot.load(Ordering::Relaxed)), (4, 1));
        let full = AtomicU64::new(pack(4, u32::MAX - 1));
        add(&full, 4, 7);
        assert_eq!(
            unpack(full.load(Ordering::Relaxed)),
            (4, u32::MAX),
            "saturates"
        );
    }

    proptest::proptest! {
        /// The division by multiplication agrees with the hardware's, for any dividend and
        /// divisor (the budget's divisors are at least 1 ms).
        #[test]
        fn dividing_by_the_reciprocal_is_exact(n: u64, d in 1u64..) {
            proptest::prop_assert_eq!(divide(n, d, u64::MAX / d), n / d);
        }

        #[test]
        fn dividing_elapsed_nanoseconds_by_a_bucket_is_exact(
            n in 0u64..1 << 62,
            d in 1_000_000u64..100_000_000_000,
        ) {
            proptest::prop_assert_eq!(divide(n, d, u64::MAX / d), n / d);
        }
    }

    #[test]
    fn division_edges_are_exact() {
        for d in [
            1,
            2,
            3,
            7,
            1_000_000,
            1_000_000_007,
            u64::MAX / 2,
            u64::MAX - 1,
            u64::MAX,
        ] {
            for n in [0, 1, d - 1, d, d.saturating_add(1), u64::MAX - 1, u64::MAX] {
                assert_eq!(divide(n, d, u64::MAX / d), n / d, "{n} / {d}");
            }
            // Just below and at each multiple near the top.
            let top = u64::MAX / d * d;
            for n in [
                top,
                top - 1,
                top.saturating_sub(d),
                top.saturating_sub(d) + 1,
            ] {
                assert_eq!(divide(n, d, u64::MAX / d), n / d, "{n} / {d}");
            }
        }
    }

    #[test]
    fn invalid_settings_name_the_field() {
        let err = RetryBudget::new(Duration::ZERO, 1, 0.2).unwrap_err();
        assert_eq!(err.field(), "budget.window");
        let err = RetryBudget::new(Duration::from_secs(1), 1, f64::NAN).unwrap_err();
        assert_eq!(err.field(), "budget.ratio");
    }
}
