//! State-machine property test of the in-process backend: random creates, grants, reports,
//! callbacks, completes, 1303s, cancellations and lease deadlines, checked against a model.

use std::task::Poll;
use std::time::Duration;

use kling_concurrency::SlotsConfig;
use kling_concurrency::backend::{
    InProcess, InProcessAcquire, ReleaseReason, Reservation, SlotBackend, SlotKey, SlotOp, TaskRef,
    TaskUpdate,
};
use kling_core::{AccountId, Pool, Product, TaskStatus};
use proptest::prelude::*;
use tokio::time::Instant;
use tokio_test::task::{Spawn, spawn};

const LEASE: Duration = Duration::from_secs(600);
const CAPACITY: u32 = 4;

#[derive(Clone, Debug)]
enum Op {
    /// A create asks for `weight` slots of pool `pool`.
    Acquire { pool: usize, weight: u32 },
    /// A waiting create is dropped.
    Cancel { index: usize },
    /// A granted create's response arrives.
    Settle { index: usize, how: Settle },
    /// A task is reported (query / callback / complete).
    Report {
        index: usize,
        ended: bool,
        by_complete: bool,
    },
    /// Time passes (leases end, hidden slots come back).
    Advance { secs: u64 },
}

#[derive(Clone, Copy, Debug)]
enum Settle {
    Created,
    Unknown,
    GiveBack,
    Congested,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize, 1..=3u32).prop_map(|(pool, weight)| Op::Acquire { pool, weight }),
        1 => any::<usize>().prop_map(|index| Op::Cancel { index }),
        4 => (any::<usize>(), prop_oneof![
                4 => Just(Settle::Created),
                1 => Just(Settle::Unknown),
                1 => Just(Settle::GiveBack),
                1 => Just(Settle::Congested),
            ]).prop_map(|(index, how)| Op::Settle { index, how }),
        3 => (any::<usize>(), any::<bool>(), any::<bool>())
            .prop_map(|(index, ended, by_complete)| Op::Report { index, ended, by_complete }),
        2 => (0..700u64).prop_map(|secs| Op::Advance { secs }),
    ]
}

struct Task {
    id: String,
    key: SlotKey,
    weight: u32,
    lease_until: Instant,
    ended: bool,
}

fn keys() -> [SlotKey; 2] {
    let account = AccountId::new("a");
    [
        SlotKey::new(account.clone(), Pool::new(Product::Video)),
        SlotKey::new(account, Pool::new(Product::Image)),
    ]
}

async fn check(
    backend: &InProcess,
    granted: &[Reservation],
    tasks: &[Task],
) -> Result<(), TestCaseError> {
    let now = Instant::now();
    for pool in backend.snapshot().await.unwrap() {
        prop_assert!(pool.in_use <= pool.capacity, "{pool:?}");
        prop_assert!(pool.capacity <= CAPACITY);
        let reserved: u32 = granted
            .iter()
            .filter(|r| r.key == pool.key)
            .map(|r| r.weight)
            .sum();
        let held: u32 = tasks
            .iter()
            .filter(|t| t.key == pool.key && !t.ended && t.lease_until > now)
            .map(|t| t.weight)
            .sum();
        prop_assert_eq!(pool.in_use, reserved + held, "{:?}", pool);
    }
    Ok(())
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let backend = InProcess::new(
        SlotsConfig::new(CAPACITY)
            .lease(LEASE)
            .recovery_interval(Duration::from_secs(30)),
    )
    .unwrap();
    let keys = keys();
    let mut waiting: Vec<Spawn<InProcessAcquire>> = Vec::new();
    let mut granted: Vec<Reservation> = Vec::new();
    let mut tasks: Vec<Task> = Vec::new();
    let mut next_id = 0;

    for op in ops {
        match op {
            Op::Acquire { pool, weight } => {
                waiting.push(spawn(backend.acquire(keys[pool].clone(), weight)));
            }
            Op::Cancel { index } if !waiting.is_empty() => {
                let index = index % waiting.len();
                drop(waiting.remove(index));
            }
            Op::Settle { index, how } if !granted.is_empty() => {
                let reservation = granted.remove(index % granted.len());
                let now = Instant::now();
                let op = match how {
                    Settle::Created | Settle::Unknown => {
                        next_id += 1;
                        let id = format!("t{next_id}");
                        tasks.push(Task {
                            id: id.clone(),
                            key: reservation.key.clone(),
                            weight: reservation.weight,
                            lease_until: now + LEASE,
                            ended: false,
                        });
                        let task = match how {
                            Settle::Created => TaskRef {
                                id: Some(id),
                                external_id: None,
                            },
                            _ => TaskRef {
                                id: None,
                                external_id: Some(id),
                            },
                        };
                        SlotOp::Hold {
                            reservation,
                            task,
                            lease: LEASE,
                        }
                    }
                    Settle::GiveBack => SlotOp::GiveBack(reservation),
                    Settle::Congested => SlotOp::Congested(reservation),
                };
                backend.apply(op).await.unwrap();
            }
            Op::Report {
                index,
                ended,
                by_complete,
            } if !tasks.is_empty() => {
                let now = Instant::now();
                let n = tasks.len();
                let task = &mut tasks[index % n];
                let alive = !task.ended && task.lease_until > now;
                let update = if by_complete {
                    TaskUpdate {
                        id: task.id.clone(),
                        external_id: None,
                        status: None,
                    }
                } else {
                    let status = if ended {
                        TaskStatus::Succeeded
                    } else {
                        TaskStatus::Processing
                    };
                    // Reports carry the id (for holdings under an external id, the external
                    // id too, as the tasks here use the same text for both).
                    TaskUpdate {
                        id: task.id.clone(),
                        external_id: Some(task.id.clone()),
                        status: Some(status),
                    }
                };
                let releases = ended || by_complete;
                let applied = backend
                    .apply(SlotOp::Update {
                        account: AccountId::new("a"),
                        updates: vec![update],
                        lease: LEASE,
                    })
                    .await
                    .unwrap();
                let mine: Vec<_> = applied
                    .released
                    .iter()
                    .filter(|r| r.reason != ReleaseReason::LeaseExpired)
                    .collect();
                if releases && alive {
                    prop_assert_eq!(mine.len(), 1, "an alive task ends exactly once");
                    prop_assert_eq!(mine[0].weight, task.weight);
                    task.ended = true;
                } else {
                    prop_assert!(mine.is_empty(), "a dead task is never released again");
                    if alive {
                        task.lease_until = now + LEASE;
                    }
                }
            }
            Op::Advance { secs } => tokio::time::advance(Duration::from_secs(secs)).await,
            _ => {}
        }
        // Let every waiter that was handed slots pick them up.
        let mut still = Vec::new();
        for mut w in waiting.drain(..) {
            match w.poll() {
                Poll::Ready(Ok(r)) => granted.push(r),
                Poll::Ready(Err(e)) => return Err(TestCaseError::fail(format!("{e}"))),
                Poll::Pending => still.push(w),
            }
        }
        waiting = still;
        check(&backend, &granted, &tasks).await?;
    }

    // Wind down: every grant given back, every lease run out: nothing is left held.
    drop(waiting);
    for reservation in granted.drain(..) {
        backend.apply(SlotOp::GiveBack(reservation)).await.unwrap();
    }
    tokio::time::advance(LEASE + Duration::from_secs(3600)).await;
    for pool in backend.snapshot().await.unwrap() {
        prop_assert_eq!(
            (pool.in_use, pool.waiters, pool.tasks),
            (0, 0, 0),
            "{:?}",
            pool
        );
        prop_assert_eq!(pool.capacity, CAPACITY);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn slots_never_exceed_capacity_and_are_released_exactly_once(ops in proptest::collection::vec(op(), 1..80)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(run(ops))?;
    }
}
