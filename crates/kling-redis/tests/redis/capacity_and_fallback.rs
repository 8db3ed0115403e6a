//! Task slots in Redis: where a pool's capacity comes from, and the fallback share while Redis
//! is away once leases run out.

use std::time::Duration;

use kling_concurrency::SlotsConfig;
use kling_concurrency::backend::{SlotBackend, SlotKey, SlotOp, TaskRef, TaskUpdate};
use kling_core::{AccountId, Pool, Product, TaskStatus};
use kling_redis::{RedisSlots, WhenUnreachable};

use crate::support::{connect, redis};

fn kling3(account: &str) -> SlotKey {
    SlotKey::new(
        AccountId::new(account),
        Pool::with_model(Product::Video, "kling-3.0"),
    )
}

async fn backend(server: &kling_redis::testing::RedisServer, config: SlotsConfig) -> RedisSlots {
    RedisSlots::new(connect(server).await, config)
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_millis(50))
        .grace(Duration::from_millis(300))
}

/// `(configured, in use)` of `key`'s pool, as `backend` reads it.
async fn configured(backend: &RedisSlots, key: &SlotKey) -> (u32, u32) {
    let snapshot = backend.snapshot().await.unwrap();
    let pool = snapshot.iter().find(|p| p.key == *key).expect("pool used");
    (pool.configured, pool.in_use)
}

/// An account's capacity for a product, set at run time or configured, reaches that
/// account's model pools (a second create waits), and not another account's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_product_capacity_reaches_its_model_pools() {
    let Some(server) = redis() else { return };
    let video = Pool::new(Product::Video);
    let configs = [
        SlotsConfig::new(5),
        SlotsConfig::new(5).account_capacity(AccountId::new("b"), video.clone(), 1),
    ];
    for (account, config) in ["a", "b"].into_iter().zip(configs) {
        let slots = backend(&server, config).await;
        if account == "a" {
            slots
                .apply(SlotOp::SetCapacity {
                    account: Some(AccountId::new("a")),
                    pool: video.clone(),
                    capacity: 1,
                })
                .await
                .unwrap();
        }
        let first = slots.acquire(kling3(account), 1).await.unwrap();
        assert_eq!(
            configured(&slots, &kling3(account)).await,
            (1, 1),
            "{account}"
        );
        let second = tokio::time::timeout(
            Duration::from_millis(300),
            slots.acquire(kling3(account), 1),
        )
        .await;
        assert!(second.is_err(), "{account}: the second create waits");
        slots.apply(SlotOp::GiveBack(first)).await.unwrap();
        let other = slots.acquire(kling3("c"), 1).await.unwrap();
        assert_eq!(configured(&slots, &kling3("c")).await, (5, 1));
        slots.apply(SlotOp::GiveBack(other)).await.unwrap();
    }
}

/// While Redis is away, a holding whose lease ran out no longer counts against the process's
/// fallback share: the next create is granted instead of waiting for the whole outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_away_a_lease_that_ran_out_frees_the_fallback_share() {
    let Some(mut server) = redis() else { return };
    let lease = Duration::from_millis(200);
    let slots = backend(&server, SlotsConfig::new(1).lease(lease))
        .await
        .maintain_every(Duration::from_secs(60))
        .when_unreachable(WhenUnreachable::fallback(1));
    let key = kling3("a");
    let granted = slots.acquire(key.clone(), 1).await.unwrap();
    let task = TaskRef {
        id: Some("t1".to_owned()),
        external_id: None,
    };
    slots
        .apply(SlotOp::Hold {
            reservation: granted,
            task,
            lease,
        })
        .await
        .unwrap();
    server.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let next = tokio::time::timeout(Duration::from_secs(1), slots.acquire(key, 1)).await;
    assert!(
        matches!(next, Ok(Ok(_))),
        "granted from the share: {next:?}"
    );
    assert_eq!(slots.held_here(), 2, "t1 stays on record until Redis says");
}

/// While Redis is away under `Fallback`, the replay queue keeps one change per create of the
/// outage (its hold, or its give-back) and one per end reported: a grant's registration is
/// replaced by the change that settles it, so it is kept only while its create is on its way
/// (at most the process's share). Replayed, the fleet holds nothing of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_away_a_fallback_grant_keeps_one_change_for_replay() {
    let Some(mut server) = redis() else { return };
    let slots = backend(&server, SlotsConfig::new(2))
        .await
        .maintain_every(Duration::from_secs(60))
        .when_unreachable(WhenUnreachable::fallback(1));
    // Only this test's passes replay.
    kling_redis::testing::hold_maintenance(&slots, true);
    let key = kling3("a");
    let warm = slots.acquire(key.clone(), 1).await.unwrap();
    slots.apply(SlotOp::GiveBack(warm)).await.unwrap();
    server.stop();
    let creates = 20;
    for i in 0..creates {
        let granted = slots.acquire(key.clone(), 1).await.unwrap();
        let before = slots.pending();
        if i % 2 == 0 {
            let id = format!("t{i}");
            let task = TaskRef {
                id: Some(id.clone()),
                external_id: None,
            };
            slots
                .apply(SlotOp::Hold {
                    reservation: granted,
                    task,
                    lease: Duration::from_secs(60),
                })
                .await
                .unwrap();
            assert_eq!(
                slots.pending(),
                before,
                "the hold took the registration's place"
            );
            slots
                .apply(SlotOp::Update {
                    account: key.account.clone(),
                    updates: vec![TaskUpdate {
                        id,
                        external_id: None,
                        status: Some(TaskStatus::Succeeded),
                    }],
                    lease: Duration::from_secs(60),
                })
                .await
                .unwrap();
        } else {
            slots.apply(SlotOp::GiveBack(granted)).await.unwrap();
            assert_eq!(
                slots.pending(),
                before,
                "the give-back took the registration's place"
            );
        }
    }
    // A hold or a give-back per create, and an end per task.
    assert_eq!(slots.pending(), creates + creates / 2);
    // A create on its way: its registration is kept until it is settled.
    let on_its_way = slots.acquire(key.clone(), 1).await.unwrap();
    assert_eq!(slots.pending(), creates + creates / 2 + 1);
    server.restart().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = slots.maintain().await {
        assert!(tokio::time::Instant::now() < deadline, "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(slots.pending(), 0, "replayed");
    let in_use = |slots: RedisSlots| async move {
        let snapshot = slots.snapshot().await.unwrap();
        snapshot.iter().map(|p| p.in_use).sum::<u32>()
    };
    assert_eq!(
        in_use(slots.clone()).await,
        1,
        "only the create on its way holds"
    );
    slots.apply(SlotOp::GiveBack(on_its_way)).await.unwrap();
    assert_eq!(in_use(slots.clone()).await, 0);
}

/// Past `MAX_PENDING_REPORTS` ends kept while Redis is away, the oldest end is dropped. When
/// its task's hold is kept too (a task created and ended within the outage), a give-back takes
/// the hold's place: replayed, the hold would hold the slot for its whole lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_away_an_end_dropped_from_the_replay_queue_takes_its_hold_along() {
    let Some(mut server) = redis() else { return };
    let slots = backend(&server, SlotsConfig::new(2))
        .await
        .maintain_every(Duration::from_secs(60))
        .when_unreachable(WhenUnreachable::fallback(1));
    // Only this test's passes replay.
    kling_redis::testing::hold_maintenance(&slots, true);
    let key = kling3("a");
    let warm = slots.acquire(key.clone(), 1).await.unwrap();
    slots.apply(SlotOp::GiveBack(warm)).await.unwrap();
    server.stop();
    let ended = |id: String| SlotOp::Update {
        account: key.account.clone(),
        updates: vec![TaskUpdate {
            id,
            external_id: None,
            status: Some(TaskStatus::Succeeded),
        }],
        lease: Duration::from_secs(60),
    };
    let granted = slots.acquire(key.clone(), 1).await.unwrap();
    slots
        .apply(SlotOp::Hold {
            reservation: granted,
            task: TaskRef {
                id: Some("t0".to_owned()),
                external_id: None,
            },
            lease: Duration::from_secs(600),
        })
        .await
        .unwrap();
    slots.apply(ended("t0".to_owned())).await.unwrap();
    for n in 0..kling_redis::MAX_PENDING_REPORTS {
        slots.apply(ended(format!("other-{n}"))).await.unwrap();
    }
    // t0's end went; what took its hold's place, and the later ends, stay.
    assert_eq!(slots.pending(), kling_redis::MAX_PENDING_REPORTS + 1);
    server.restart().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Err(e) = slots.maintain().await {
        assert!(tokio::time::Instant::now() < deadline, "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(slots.pending(), 0, "replayed");
    let snapshot = slots.snapshot().await.unwrap();
    let in_use: u32 = snapshot.iter().map(|p| p.in_use).sum();
    assert_eq!(in_use, 0, "the ended task's hold holds its slot");
}

/// As above, with the task also adopted by a reconcile while Redis is away (its list named the
/// task before, or after, the create's answer came): replayed, the adopt found neither the
/// task's hold (a give-back now) nor its end, and held the slot for its whole lease. The
/// dropped end takes the task's adopts along too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_away_an_end_dropped_from_the_replay_queue_takes_an_adopt_before_its_hold_along()
{
    an_end_dropped_from_the_replay_queue_takes_the_adopts_along(true, true).await;
}

/// The adopt queued after the hold: the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_away_an_end_dropped_from_the_replay_queue_takes_an_adopt_after_its_hold_along()
{
    an_end_dropped_from_the_replay_queue_takes_the_adopts_along(false, true).await;
}

/// `known`: the create's answer came (its hold and end name the task id), else it was lost
/// (its hold and end name the external id alone).
async fn an_end_dropped_from_the_replay_queue_takes_the_adopts_along(
    adopt_first: bool,
    known: bool,
) {
    let Some(mut server) = redis() else { return };
    let slots = backend(&server, SlotsConfig::new(2))
        .await
        .maintain_every(Duration::from_secs(60))
        .when_unreachable(WhenUnreachable::fallback(1));
    kling_redis::testing::hold_maintenance(&slots, true);
    let key = kling3("a");
    let warm = slots.acquire(key.clone(), 1).await.unwrap();
    slots.apply(SlotOp::GiveBack(warm)).await.unwrap();
    server.stop();
    let task = |known: bool| TaskRef {
        id: known.then(|| "t0".to_owned()),
        external_id: Some("x0".to_owned()),
    };
    let adopt = || SlotOp::Adopt {
        key: key.clone(),
        task: task(true),
        weight: 1,
        lease: Duration::from_secs(600),
    };
    let ended = |id: String| SlotOp::Update {
        account: key.account.clone(),
        updates: vec![TaskUpdate {
            id,
            external_id: None,
            status: Some(TaskStatus::Succeeded),
        }],
        lease: Duration::from_secs(60),
    };
    let granted = slots.acquire(key.clone(), 1).await.unwrap();
    if adopt_first {
        // The list named the task while its create's answer was on its way.
        slots.apply(adopt()).await.unwrap();
    }
    slots
        .apply(SlotOp::Hold {
            reservation: granted,
            task: task(known),
            lease: Duration::from_secs(600),
        })
        .await
        .unwrap();
    if !adopt_first {
        slots.apply(adopt()).await.unwrap();
    }
    let end = SlotOp::Update {
        account: key.account.clone(),
        updates: vec![TaskUpdate {
            id: if known { "t0" } else { "" }.to_owned(),
            external_id: Some("x0".to_owned()),
            status: Some(TaskStatus::Succeeded),
        }],
        lease: Duration::from_secs(60),
    };
    slots.apply(end).await.unwrap();
    for n in 0..kling_redis::MAX_PENDING_REPORTS {
        slots.apply(ended(format!("other-{n}"))).await.unwrap();
    }
    server.restart().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Err(e) = slots.maintain().await {
        assert!(tokio::time::Instant::now() < deadline, "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(slots.pending(), 0, "replayed");
    let snapshot = slots.snapshot().await.unwrap();
    let in_use: u32 = snapshot.iter().map(|p| p.in_use).sum();
    assert_eq!(in_use, 0, "the ended task's adopt holds its slot");
}

/// The holdings `test:pool:*` keeps in Redis, with their lease deadlines (fleet time, µs),
/// and Redis's clock now (µs).
async fn leases_in_redis(server: &kling_redis::testing::RedisServer) -> (Vec<(String, i64)>, i64) {
    let mut raw = crate::support::raw(server).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("test:pool:*:l")
        .query_async(&mut raw)
        .await
        .unwrap();
    let mut leases = Vec::new();
    for key in keys {
        let scored: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut raw)
            .await
            .unwrap();
        leases.extend(scored.into_iter().map(|(h, at)| (h, at as i64)));
    }
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut raw).await.unwrap();
    (leases, secs * 1_000_000 + micros)
}

/// A grant this process drops from its record because its lease ran out, while Redis still
/// keeps its holding, is counted by no decision of the fleet. The one way a process drops a
/// grant by its lease while Redis has it: a fallback grant whose ask ran in Redis, its answer
/// lost (a timeout), registered only after its lease ran out (re-registration after Redis lost
/// its state is the other drop, and `mine` releases what came back). Redis's lease began at
/// that ask, before the process's own, so it is over there too: the holding stays in the
/// pool's hash (no script maintained the pool) and the grant's later hold counts anew, yet the
/// next ask (any process's) releases it before it counts the pool's use, so the fleet counts
/// the task alone. The control: the pool, full with the task and that ask's grant, makes a
/// third create wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_dropped_at_its_lease_end_is_counted_by_no_decision() {
    let Some(server) = redis() else { return };
    let lease = Duration::from_millis(300);
    let slots = backend(&server, SlotsConfig::new(2).lease(lease))
        .await
        .maintain_every(Duration::from_secs(60))
        .when_unreachable(WhenUnreachable::fallback(1));
    // Only this test's pass replays.
    kling_redis::testing::hold_maintenance(&slots, true);
    let other = backend(&server, SlotsConfig::new(2)).await;
    let key = kling3("a");
    let warm = slots.acquire(key.clone(), 1).await.unwrap();
    slots.apply(SlotOp::GiveBack(warm)).await.unwrap();
    // The ask runs in Redis, its answer is lost: the process grants from its share under the
    // same holding, and keeps its registration for replay.
    kling_redis::testing::lose_acquire_answers(&slots, 1);
    let granted = slots.acquire(key.clone(), 1).await.unwrap();
    assert_eq!(slots.pending(), 1, "the fallback grant's registration");
    assert_eq!(slots.held_here(), 1);
    let (leases, _) = leases_in_redis(&server).await;
    assert_eq!(leases.len(), 1, "Redis granted the lost ask: {leases:?}");
    let (grant, granted_until) = leases[0].clone();
    // Its lease runs out (here and, earlier, in Redis) before the registration is replayed,
    // which drops it from the record and sends nothing.
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    slots.maintain().await.unwrap();
    assert_eq!(slots.pending(), 0);
    assert_eq!(slots.held_here(), 0, "dropped at its lease's end");
    let (leases, redis_now) = leases_in_redis(&server).await;
    assert_eq!(
        leases,
        vec![(grant.clone(), granted_until)],
        "Redis keeps the grant"
    );
    assert!(
        granted_until <= redis_now,
        "its lease in Redis is over too: until {granted_until}, now {redis_now}"
    );
    // The grant, held: no grant of the record, so counted anew under a holding of its own.
    slots
        .apply(SlotOp::Hold {
            reservation: granted,
            task: TaskRef {
                id: Some("t1".to_owned()),
                external_id: None,
            },
            lease: Duration::from_secs(60),
        })
        .await
        .unwrap();
    assert_eq!(slots.held_here(), 1);
    let (leases, _) = leases_in_redis(&server).await;
    assert_eq!(leases.len(), 2, "the old grant and the task: {leases:?}");
    // The fleet counts the task alone: the second slot is another process's at once.
    let second = tokio::time::timeout(Duration::from_secs(2), other.acquire(key.clone(), 1))
        .await
        .expect("the second slot is free");
    assert!(second.is_ok(), "{second:?}");
    let (leases, _) = leases_in_redis(&server).await;
    assert!(
        !leases.iter().any(|(h, _)| *h == grant),
        "the ask released the old grant: {leases:?}"
    );
    assert_eq!(configured(&other, &key).await, (2, 2));
    let third =
        tokio::time::timeout(Duration::from_millis(300), other.acquire(key.clone(), 1)).await;
    assert!(third.is_err(), "the pool is full: {third:?}");
    slots
        .apply(SlotOp::Update {
            account: key.account.clone(),
            updates: vec![TaskUpdate {
                id: "t1".to_owned(),
                external_id: None,
                status: Some(TaskStatus::Succeeded),
            }],
            lease: Duration::from_secs(60),
        })
        .await
        .unwrap();
    assert_eq!(
        configured(&other, &key).await,
        (2, 1),
        "t1's end frees its slot"
    );
}
