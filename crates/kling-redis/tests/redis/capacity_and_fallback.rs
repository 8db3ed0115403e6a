//! Task slots in Redis: where a pool's capacity comes from, and the fallback share while Redis
//! is away once leases run out.

use std::time::Duration;

use kling_concurrency::SlotsConfig;
use kling_concurrency::backend::{SlotBackend, SlotKey, SlotOp, TaskRef, TaskUpdate};
use kling_core::metrics::TASKS_FINISHED;
use kling_core::{AccountId, Pool, Product, TaskStatus};
use kling_redis::{RedisSlots, WhenUnreachable};

use crate::support::{connect, connect_with_timeout, gated_relay, redis};

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
/// outage given back, and one for all the tasks created and ended in it: a grant's
/// registration is replaced by the change that settles it, so it is kept only while its create
/// is on its way (at most the process's share), and a task's end by a merged give-back of its
/// hold. Replayed, the fleet holds nothing of them.
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
    // A give-back per create given back, and one for every task created and ended.
    assert_eq!(slots.pending(), creates / 2 + 1);
    // A create on its way: its registration is kept until it is settled.
    let on_its_way = slots.acquire(key.clone(), 1).await.unwrap();
    assert_eq!(slots.pending(), creates / 2 + 2);
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
/// its task's hold is kept too (a task created and ended within the outage, not merged with
/// its end: here a kept end of another task under the same external id names it too), a
/// give-back takes the hold's place: replayed, the hold would hold the slot for its whole
/// lease.
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
    let ended = |id: String, ext: Option<&str>| SlotOp::Update {
        account: key.account.clone(),
        updates: vec![TaskUpdate {
            id,
            external_id: ext.map(str::to_owned),
            status: Some(TaskStatus::Succeeded),
        }],
        lease: Duration::from_secs(60),
    };
    // An earlier task under the same external id (external ids may be reused).
    slots
        .apply(ended("t9".to_owned(), Some("job-0")))
        .await
        .unwrap();
    let granted = slots.acquire(key.clone(), 1).await.unwrap();
    slots
        .apply(SlotOp::Hold {
            reservation: granted,
            task: TaskRef {
                id: Some("t0".to_owned()),
                external_id: Some("job-0".to_owned()),
            },
            lease: Duration::from_secs(600),
        })
        .await
        .unwrap();
    slots
        .apply(ended("t0".to_owned(), Some("job-0")))
        .await
        .unwrap();
    assert_eq!(
        slots.pending(),
        3,
        "t9's end, t0's hold and end: not merged"
    );
    for n in 0..kling_redis::MAX_PENDING_REPORTS {
        slots
            .apply(ended(format!("other-{n}"), None))
            .await
            .unwrap();
    }
    // t9's and t0's ends went; what took t0's hold's place, and the later ends, stay.
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

/// A process under `Fallback` (capacity 4) that reaches `server` through a relay whose gate
/// holds Redis's answers back when shut (commands still run), with a 300 ms command timeout;
/// its maintenance held (only the test's passes replay), its store marked alive.
async fn behind_a_gate(
    server: &kling_redis::testing::RedisServer,
) -> (RedisSlots, tokio::sync::watch::Sender<bool>) {
    let (port, gate) = gated_relay(server.port()).await;
    let conn = connect_with_timeout(
        format!("redis://127.0.0.1:{port}/"),
        Duration::from_millis(300),
    )
    .await;
    let slots = RedisSlots::new(conn, SlotsConfig::new(4))
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_secs(60))
        .grace(Duration::from_millis(300))
        .when_unreachable(WhenUnreachable::fallback(1));
    kling_redis::testing::hold_maintenance(&slots, true);
    let warm = slots.acquire(kling3("a"), 1).await.unwrap();
    slots.apply(SlotOp::GiveBack(warm)).await.unwrap();
    (slots, gate)
}

/// Tasks created and ended while Redis answers nothing (its replies held back: each ask ran,
/// and granted, with its answer lost; the process granted from its share under `Fallback`)
/// leave one change for replay, not a hold and an end each. Replayed, it gives back the grants
/// Redis made for the lost asks (the fleet holds nothing), notes the ends (a reconcile whose
/// list ran behind adopts none of the tasks), and each end is counted once.
#[tokio::test]
async fn tasks_created_and_ended_while_redis_is_away_leave_one_change_for_replay() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let Some(server) = redis() else { return };
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (slots, gate) = behind_a_gate(&server).await;
    let key = kling3("a");
    gate.send(false).unwrap();
    let tasks = 6;
    for i in 0..tasks {
        let granted = slots.acquire(key.clone(), 1).await.unwrap();
        slots
            .apply(SlotOp::Hold {
                reservation: granted,
                task: TaskRef {
                    id: Some(format!("t{i}")),
                    external_id: Some(format!("job-{i}")),
                },
                lease: Duration::from_secs(600),
            })
            .await
            .unwrap();
        slots
            .apply(SlotOp::Update {
                account: key.account.clone(),
                updates: vec![TaskUpdate {
                    id: format!("t{i}"),
                    external_id: Some(format!("job-{i}")),
                    status: Some(TaskStatus::Succeeded),
                }],
                lease: Duration::from_secs(600),
            })
            .await
            .unwrap();
    }
    assert_eq!(slots.pending(), 1, "one change for the tasks of the outage");
    gate.send(true).unwrap();
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
    assert_eq!(in_use(slots.clone()).await, 0, "the lost asks' grants hold");
    // Another process's reconcile, its list behind the ends: the tasks are not adopted.
    let other = backend(&server, SlotsConfig::new(4)).await;
    for i in 0..tasks {
        other
            .apply(SlotOp::Adopt {
                key: key.clone(),
                task: TaskRef {
                    id: Some(format!("t{i}")),
                    external_id: None,
                },
                weight: 1,
                lease: Duration::from_secs(600),
            })
            .await
            .unwrap();
    }
    assert_eq!(in_use(other.clone()).await, 0, "an ended task adopted");
    let finished: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| match value {
            DebugValue::Counter(n) if key.key().name() == TASKS_FINISHED => Some(n),
            _ => None,
        })
        .sum();
    assert_eq!(finished, tasks as u64, "each end counted once");
}

/// A task's end is not merged with its kept hold while another kept change names the task
/// (here a reconcile's adopt of it, its list answered before the create's answer came):
/// replayed without the hold (which takes the adopted holding's place) and the end, the adopt
/// would hold the ended task's slot for its whole lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_is_not_merged_with_its_hold_past_a_kept_change_naming_the_task() {
    let Some(server) = redis() else { return };
    let (slots, gate) = behind_a_gate(&server).await;
    let key = kling3("a");
    gate.send(false).unwrap();
    let task = TaskRef {
        id: Some("t0".to_owned()),
        external_id: None,
    };
    let granted = slots.acquire(key.clone(), 1).await.unwrap();
    slots
        .apply(SlotOp::Adopt {
            key: key.clone(),
            task: task.clone(),
            weight: 1,
            lease: Duration::from_secs(600),
        })
        .await
        .unwrap();
    slots
        .apply(SlotOp::Hold {
            reservation: granted,
            task,
            lease: Duration::from_secs(600),
        })
        .await
        .unwrap();
    slots
        .apply(SlotOp::Update {
            account: key.account.clone(),
            updates: vec![TaskUpdate {
                id: "t0".to_owned(),
                external_id: None,
                status: Some(TaskStatus::Succeeded),
            }],
            lease: Duration::from_secs(600),
        })
        .await
        .unwrap();
    assert_eq!(slots.pending(), 3, "the adopt, the hold and the end");
    gate.send(true).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = slots.maintain().await {
        assert!(tokio::time::Instant::now() < deadline, "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(slots.pending(), 0, "replayed");
    let snapshot = slots.snapshot().await.unwrap();
    let in_use: u32 = snapshot.iter().map(|p| p.in_use).sum();
    assert_eq!(in_use, 0, "the ended task is held");
}

/// Holds `slots`' next changes in its replay queue: a report of a task nobody holds, sent
/// through the closed gate (it runs in Redis, its answer lost), is kept, and every change
/// after it queues behind it unsent.
async fn queue_from_now(slots: &RedisSlots, key: &SlotKey) {
    slots
        .apply(SlotOp::Update {
            account: key.account.clone(),
            updates: vec![TaskUpdate {
                id: "nobody".to_owned(),
                external_id: None,
                status: Some(TaskStatus::Processing),
            }],
            lease: Duration::from_secs(600),
        })
        .await
        .unwrap();
    assert_eq!(slots.pending(), 1, "the report kept");
}

/// Opens the gate and replays `slots`' queue.
async fn replay_through(slots: &RedisSlots, gate: &tokio::sync::watch::Sender<bool>) {
    gate.send(true).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = slots.maintain().await {
        assert!(tokio::time::Instant::now() < deadline, "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(slots.pending(), 0, "replayed");
}

/// A task created and ended while its process could not reach Redis, which another process's
/// reconcile adopted meanwhile (Redis had no holding of it): the merged give-back frees the
/// adopted holding too, as the task's hold replayed did (it took the adopted holding's place),
/// and the other process, reporting the end later, counts it no second time.
#[tokio::test]
async fn a_merged_give_back_frees_the_holding_another_process_adopted() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let Some(server) = redis() else { return };
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (slots, gate) = behind_a_gate(&server).await;
    let other = backend(&server, SlotsConfig::new(4)).await;
    let key = kling3("a");
    gate.send(false).unwrap();
    queue_from_now(&slots, &key).await;
    let granted = slots.acquire(key.clone(), 1).await.unwrap();
    let task = TaskRef {
        id: Some("t0".to_owned()),
        external_id: Some("job-0".to_owned()),
    };
    slots
        .apply(SlotOp::Hold {
            reservation: granted,
            task: task.clone(),
            lease: Duration::from_secs(600),
        })
        .await
        .unwrap();
    // The other process's list names the task running: Redis knows nothing of it.
    other
        .apply(SlotOp::Adopt {
            key: key.clone(),
            task: task.clone(),
            weight: 1,
            lease: Duration::from_secs(600),
        })
        .await
        .unwrap();
    assert_eq!(
        configured(&other, &key).await.1,
        2,
        "the lost ask's grant and the adopted task"
    );
    let end = |process: &RedisSlots| {
        process.apply(SlotOp::Update {
            account: key.account.clone(),
            updates: vec![TaskUpdate {
                id: "t0".to_owned(),
                external_id: Some("job-0".to_owned()),
                status: Some(TaskStatus::Succeeded),
            }],
            lease: Duration::from_secs(600),
        })
    };
    end(&slots).await.unwrap();
    assert_eq!(slots.pending(), 2, "the report and the merged give-back");
    replay_through(&slots, &gate).await;
    assert_eq!(
        configured(&other, &key).await.1,
        0,
        "the ended task is held"
    );
    // The other process's list then names the task ended.
    end(&other).await.unwrap();
    let finished: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| match value {
            DebugValue::Counter(n) if key.key().name() == TASKS_FINISHED => Some(n),
            _ => None,
        })
        .sum();
    assert_eq!(finished, 1, "the end counted once");
}

/// A create sent again while its process could not reach Redis (the first attempt's answer
/// lost, its hold in Redis under the external id alone), its task ended within the outage:
/// the merged give-back frees the first attempt's holding too, as the task's hold replayed did
/// (the same create's earlier attempt), instead of leaving it held for its lease.
#[tokio::test]
async fn a_merged_give_back_frees_the_earlier_attempt_of_its_create() {
    let Some(server) = redis() else { return };
    let (slots, gate) = behind_a_gate(&server).await;
    let key = kling3("a");
    let first = slots.acquire(key.clone(), 1).await.unwrap();
    slots
        .apply(SlotOp::Hold {
            reservation: first,
            task: TaskRef {
                id: None,
                external_id: Some("job-0".to_owned()),
            },
            lease: Duration::from_secs(600),
        })
        .await
        .unwrap();
    assert_eq!(
        configured(&slots, &key).await.1,
        1,
        "the first attempt held"
    );
    gate.send(false).unwrap();
    queue_from_now(&slots, &key).await;
    let again = slots.acquire(key.clone(), 1).await.unwrap();
    slots
        .apply(SlotOp::Hold {
            reservation: again,
            task: TaskRef {
                id: Some("t0".to_owned()),
                external_id: Some("job-0".to_owned()),
            },
            lease: Duration::from_secs(600),
        })
        .await
        .unwrap();
    assert_eq!(slots.held_here(), 1, "the first attempt superseded here");
    slots
        .apply(SlotOp::Update {
            account: key.account.clone(),
            updates: vec![TaskUpdate {
                id: "t0".to_owned(),
                external_id: Some("job-0".to_owned()),
                status: Some(TaskStatus::Succeeded),
            }],
            lease: Duration::from_secs(600),
        })
        .await
        .unwrap();
    assert_eq!(slots.pending(), 2, "the report and the merged give-back");
    replay_through(&slots, &gate).await;
    assert_eq!(
        configured(&slots, &key).await.1,
        0,
        "the first attempt is held"
    );
}

/// A task whose hold reached Redis as Redis went away (its answer lost, so kept for replay)
/// and which ended within the outage, its end merged with that hold: another process that
/// reports the end meanwhile (its reconcile's list names the task ended) releases the holding
/// Redis has and counts the end; the merged give-back, replayed, counts it no second time.
#[tokio::test]
async fn an_end_merged_while_away_is_not_counted_again_after_another_process_counted_it() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let Some(server) = redis() else { return };
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (slots, gate) = behind_a_gate(&server).await;
    let other = backend(&server, SlotsConfig::new(4)).await;
    let key = kling3("a");
    let granted = slots.acquire(key.clone(), 1).await.unwrap();
    gate.send(false).unwrap();
    slots
        .apply(SlotOp::Hold {
            reservation: granted,
            task: TaskRef {
                id: Some("t0".to_owned()),
                external_id: Some("job-0".to_owned()),
            },
            lease: Duration::from_secs(600),
        })
        .await
        .unwrap();
    assert_eq!(slots.pending(), 1, "the hold, its answer lost");
    let end = |process: &RedisSlots| {
        process.apply(SlotOp::Update {
            account: key.account.clone(),
            updates: vec![TaskUpdate {
                id: "t0".to_owned(),
                external_id: Some("job-0".to_owned()),
                status: Some(TaskStatus::Succeeded),
            }],
            lease: Duration::from_secs(600),
        })
    };
    end(&slots).await.unwrap();
    assert_eq!(slots.pending(), 1, "merged");
    let released = end(&other).await.unwrap().released;
    assert_eq!(released.len(), 1, "the holding Redis has released");
    replay_through(&slots, &gate).await;
    assert_eq!(configured(&slots, &key).await.1, 0);
    let finished: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| match value {
            DebugValue::Counter(n) if key.key().name() == TASKS_FINISHED => Some(n),
            _ => None,
        })
        .sum();
    assert_eq!(finished, 1, "the end counted once");
}

/// A merged give-back whose answer is lost as it is replayed (Redis ran it, counting its
/// ends) is sent again: skipped then, it answers with the ends it counted, and each is
/// counted once, neither lost nor counted twice.
#[tokio::test]
async fn a_merged_give_back_replayed_again_after_its_answer_was_lost_counts_its_end_once() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let Some(server) = redis() else { return };
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (slots, gate) = behind_a_gate(&server).await;
    let other = backend(&server, SlotsConfig::new(4)).await;
    let key = kling3("a");
    let granted = slots.acquire(key.clone(), 1).await.unwrap();
    gate.send(false).unwrap();
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
    slots
        .apply(SlotOp::Update {
            account: key.account.clone(),
            updates: vec![TaskUpdate {
                id: "t0".to_owned(),
                external_id: None,
                status: Some(TaskStatus::Succeeded),
            }],
            lease: Duration::from_secs(600),
        })
        .await
        .unwrap();
    assert_eq!(
        slots.pending(),
        1,
        "the hold (its answer lost) merged with the end"
    );
    // Replayed through the closed gate: it runs in Redis, its answer lost.
    assert_eq!(configured(&other, &key).await.1, 1, "the hold in Redis");
    assert!(slots.maintain().await.is_err());
    assert_eq!(configured(&other, &key).await.1, 0, "the give-back ran");
    assert_eq!(slots.pending(), 1, "its answer lost, it is kept");
    // A task created and ended now is not added to the give-back sent (skipped when sent
    // again): its ask's grant (the ask ran, its answer lost) would stay held.
    let granted = slots.acquire(key.clone(), 1).await.unwrap();
    slots
        .apply(SlotOp::Hold {
            reservation: granted,
            task: TaskRef {
                id: Some("t1".to_owned()),
                external_id: None,
            },
            lease: Duration::from_secs(600),
        })
        .await
        .unwrap();
    slots
        .apply(SlotOp::Update {
            account: key.account.clone(),
            updates: vec![TaskUpdate {
                id: "t1".to_owned(),
                external_id: None,
                status: Some(TaskStatus::Succeeded),
            }],
            lease: Duration::from_secs(600),
        })
        .await
        .unwrap();
    replay_through(&slots, &gate).await;
    assert_eq!(configured(&other, &key).await.1, 0, "a grant held");
    let finished: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| match value {
            DebugValue::Counter(n) if key.key().name() == TASKS_FINISHED => Some(n),
            _ => None,
        })
        .sum();
    assert_eq!(finished, 2, "each end counted once");
}
