//! Task slots in Redis: shared by processes, released exactly once, woken by pub/sub, leases,
//! halts, 1303 capacity, and a restart that loses the state.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use kling_concurrency::SlotsConfig;
use kling_concurrency::backend::{
    ReleaseReason, Reservation, SlotBackend, SlotKey, SlotOp, TaskRef, TaskUpdate,
};
use kling_concurrency::error::AcquireError;
use kling_core::{AccountId, Outcome, Pool, Product, TaskStatus};
use kling_redis::RedisSlots;
use proptest::prelude::*;

use crate::support::{connect, far_process_gets_its_turn, pttl, redis};

fn video() -> SlotKey {
    SlotKey::new(AccountId::new("acct"), Pool::new(Product::Video))
}

async fn backend(server: &kling_redis::testing::RedisServer, capacity: u32) -> RedisSlots {
    RedisSlots::new(connect(server).await, SlotsConfig::new(capacity))
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_millis(50))
        .grace(Duration::from_millis(300))
}

fn hold(reservation: Reservation, id: &str, lease: Duration) -> SlotOp {
    SlotOp::Hold {
        reservation,
        task: TaskRef {
            id: Some(id.to_owned()),
            external_id: None,
        },
        lease,
    }
}

fn ended(id: &str, status: Option<TaskStatus>) -> SlotOp {
    SlotOp::Update {
        account: video().account,
        updates: vec![TaskUpdate {
            id: id.to_owned(),
            external_id: None,
            status,
        }],
        lease: Duration::from_secs(60),
    }
}

/// The first pool's slots in use and capacity, as `backend` reads them now.
async fn in_use_and_capacity(backend: &RedisSlots) -> (u32, u32) {
    let snapshot = backend.snapshot().await.unwrap();
    (snapshot[0].in_use, snapshot[0].capacity)
}

async fn in_use(backend: &RedisSlots) -> u32 {
    let snapshot = backend.snapshot().await.unwrap();
    snapshot.iter().map(|p| p.in_use).sum()
}

const LONG: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_slots_and_a_task_is_released_exactly_once() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 2).await;
    let two = backend(&server, 2).await;
    let a = one.acquire(video(), 1).await.unwrap();
    let b = two.acquire(video(), 1).await.unwrap();
    one.apply(hold(a, "t1", LONG)).await.unwrap();
    two.apply(hold(b, "t2", LONG)).await.unwrap();
    assert_eq!(in_use(&one).await, 2);
    // Full: a third create waits, in either process.
    let third = tokio::time::timeout(Duration::from_millis(100), one.acquire(video(), 1)).await;
    assert!(third.is_err(), "over capacity");

    // Process two sees t1 end (a query of its own); process one sees it again (a callback).
    let applied = two
        .apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(applied.released.len(), 1);
    assert_eq!(applied.released[0].task.as_deref(), Some("t1"));
    assert_eq!(
        applied.released[0].reason,
        ReleaseReason::Ended(TaskStatus::Succeeded)
    );
    assert_eq!(applied.released[0].key, video());
    let again = one
        .apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert!(again.released.is_empty(), "released twice: {again:?}");
    assert_eq!(in_use(&one).await, 1);
    let c = tokio::time::timeout(Duration::from_secs(2), one.acquire(video(), 1))
        .await
        .expect("the freed slot is granted")
        .unwrap();
    assert_eq!(c.weight, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_woken_by_a_release_in_another_process_not_by_polling() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 1).await;
    let two = backend(&server, 1).await;
    let held = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(held, "t1", LONG)).await.unwrap();
    let waiter = tokio::spawn({
        let two = two.clone();
        async move {
            let reservation = two.acquire(video(), 1).await.unwrap();
            (reservation, tokio::time::Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished());
    let released_at = tokio::time::Instant::now();
    one.apply(ended("t1", Some(TaskStatus::Failed)))
        .await
        .unwrap();
    let (_, granted_at) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woken")
        .unwrap();
    // The polling fallback is 30 s here: only the announcement can explain a prompt grant.
    let latency = granted_at - released_at;
    assert!(latency < Duration::from_secs(1), "{latency:?}");
}

/// `max_queue` bounds the creates of a pool waiting in one process: one more is refused at once
/// (with 0, any create that finds no free slot), and the waiter keeps its turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_beyond_a_full_queue_is_refused_at_once() {
    let Some(server) = redis() else { return };
    let bounded = |max| {
        let server = &server;
        async move {
            RedisSlots::new(connect(server).await, SlotsConfig::new(1).max_queue(max))
                .unwrap()
                .poll_every(Duration::from_secs(30))
        }
    };
    let one = bounded(1).await;
    let held = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(held, "t1", LONG)).await.unwrap();
    let waiter = tokio::spawn({
        let one = one.clone();
        async move { one.acquire(video(), 1).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "the first waiter waits");
    let refused = tokio::time::timeout(Duration::from_secs(1), one.acquire(video(), 1))
        .await
        .expect("refused at once, not queued");
    let Err(AcquireError::QueueFull(full)) = refused else {
        panic!("{refused:?}");
    };
    assert_eq!((full.pool(), full.max()), (&video().pool, 1));
    one.apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    let granted = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter keeps its turn")
        .unwrap();
    assert!(granted.is_ok(), "{granted:?}");

    // With no queue, a create that finds the pool full is refused; another process without
    // the bound (the control) waits.
    let none = bounded(0).await;
    let refused = tokio::time::timeout(Duration::from_secs(1), none.acquire(video(), 1))
        .await
        .expect("refused at once");
    assert!(
        matches!(&refused, Err(AcquireError::QueueFull(f)) if f.max() == 0),
        "{refused:?}"
    );
    let unbounded = backend(&server, 1).await;
    let waits =
        tokio::time::timeout(Duration::from_millis(300), unbounded.acquire(video(), 1)).await;
    assert!(waits.is_err(), "an unbounded create waits");
}

/// `holder` takes the pool's one slot for task `t1`.
async fn take_the_only_slot(holder: &RedisSlots) {
    let held = holder.acquire(video(), 1).await.unwrap();
    holder.apply(hold(held, "t1", LONG)).await.unwrap();
}

/// Task `t1` ends, freeing its slot.
async fn end_t1(holder: &RedisSlots) {
    holder
        .apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
}

/// A create of `process`, on a task of its own.
fn spawn_create(
    process: &RedisSlots,
) -> tokio::task::JoinHandle<Result<Reservation, AcquireError>> {
    let process = process.clone();
    tokio::spawn(async move { process.acquire(video(), 1).await })
}

/// Three processes on one slot: `holder` has it, `early`'s create waits, then `early` stalls
/// (its future is no longer polled, so it cannot ask again) and the slot is freed. Returns
/// whether `late`, whose create arrives after that, got the slot ahead of `early`'s; with the
/// fleet order it must wait until `early`'s create has had its turn.
async fn a_later_create_jumps_the_queue(
    server: &kling_redis::testing::RedisServer,
    arrival_order: bool,
) -> bool {
    let process = || async { backend(server, 1).await.arrival_order(arrival_order) };
    let (holder, early, late) = (process().await, process().await, process().await);
    take_the_only_slot(&holder).await;
    let mut first = std::pin::pin!(early.acquire(video(), 1));
    let asked = tokio::time::timeout(Duration::from_millis(300), &mut first).await;
    assert!(asked.is_err(), "the pool is full: early waits");
    end_t1(&holder).await;
    let second = spawn_create(&late);
    tokio::time::sleep(Duration::from_millis(500)).await;
    if second.is_finished() {
        assert!(second.await.unwrap().is_ok());
        return true;
    }
    // Early's process runs again: its create gets the slot, and gives it back.
    let granted = tokio::time::timeout(Duration::from_secs(2), &mut first)
        .await
        .expect("early is first in line")
        .unwrap();
    early.apply(SlotOp::GiveBack(granted)).await.unwrap();
    let later = tokio::time::timeout(Duration::from_secs(2), second)
        .await
        .expect("then late's turn")
        .unwrap();
    assert!(later.is_ok(), "{later:?}");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_processes_a_freed_slot_goes_to_the_create_that_arrived_first() {
    let Some(server) = redis() else { return };
    assert!(!a_later_create_jumps_the_queue(&server, true).await);
    // The control: served in the order they ask Redis, the later create takes the slot.
    let server = redis().expect("started above");
    assert!(a_later_create_jumps_the_queue(&server, false).await);
}

/// A waiting create whose process stopped asking loses its place after `place_ttl`; one that
/// gives up (its future dropped) leaves at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_in_the_fleet_queue_ends_when_its_create_gives_up_or_stops_asking() {
    let Some(server) = redis() else { return };
    let holder = backend(&server, 1).await;
    let stalled = backend(&server, 1)
        .await
        .place_ttl(Duration::from_millis(600));
    let late = backend(&server, 1).await;
    take_the_only_slot(&holder).await;
    let mut first = std::pin::pin!(stalled.acquire(video(), 1));
    let asked = tokio::time::timeout(Duration::from_millis(300), &mut first).await;
    assert!(asked.is_err(), "waits");
    end_t1(&holder).await;
    let started = tokio::time::Instant::now();
    let second = spawn_create(&late);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !second.is_finished(),
        "the stalled create still has its place"
    );
    let granted = tokio::time::timeout(Duration::from_secs(3), second)
        .await
        .expect("the place ends with its TTL")
        .unwrap()
        .unwrap();
    // Asked again when the place ended, not at the 30 s poll.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // A create that gives up takes its place with it: with a 90 s place, the next create still
    // gets a freed slot at once.
    let waiting = backend(&server, 1).await;
    let gave_up =
        tokio::time::timeout(Duration::from_millis(300), waiting.acquire(video(), 1)).await;
    assert!(gave_up.is_err(), "full: waited, then gave up");
    late.apply(SlotOp::GiveBack(granted)).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(1), holder.acquire(video(), 1))
        .await
        .expect("no place of the create that gave up is left ahead");
    assert!(next.is_ok(), "{next:?}");
}

/// Takes the one slot, holds it 50 ms and gives it back, over and over until `until`, as a
/// process whose creates always wait would. How many grants it got.
async fn grants_taken(backend: RedisSlots, until: tokio::time::Instant) -> usize {
    let mut taken = 0;
    while let Ok(granted) = tokio::time::timeout_at(until, backend.acquire(video(), 1)).await {
        taken += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        backend
            .apply(SlotOp::GiveBack(granted.unwrap()))
            .await
            .unwrap();
    }
    taken
}

/// Two processes whose creates always wait share one slot, one of them farther from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_far_from_redis_still_gets_its_turn_at_the_slots() {
    if redis().is_none() {
        return;
    }
    far_process_gets_its_turn(
        "grants",
        |conn, arrival_order| {
            RedisSlots::new(conn, SlotsConfig::new(1))
                .unwrap()
                .poll_every(Duration::from_secs(30))
                // A fresh store starts with a grace: keep it out of the 3 s measured.
                .grace(Duration::from_millis(10))
                .arrival_order(arrival_order)
        },
        grants_taken,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_lease_expires_and_lets_a_waiter_in() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 1).await;
    let two = backend(&server, 1).await;
    let held = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(held, "abandoned", Duration::from_millis(300)))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let granted = tokio::time::timeout(Duration::from_secs(5), two.acquire(video(), 1))
        .await
        .expect("the lease ends")
        .unwrap();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    assert!(waited < Duration::from_millis(1500), "{waited:?}");
    assert_eq!(granted.weight, 1);
    // Nothing releases it again.
    let late = one
        .apply(ended("abandoned", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert!(late.released.is_empty());
}

fn outcome(code: i64) -> kling_core::error::ApiError {
    let body =
        format!(r#"{{"code":{code},"message":"resource pack exhausted","request_id":"r-9"}}"#);
    let outcome = Outcome::parse(
        http::StatusCode::TOO_MANY_REQUESTS,
        &http::HeaderMap::new(),
        body.as_bytes(),
        tokio::time::Instant::now(),
    )
    .unwrap();
    kling_core::error::ApiError::from_outcome(&outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1102_halts_the_account_in_every_process_until_reset() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 5).await;
    let two = backend(&server, 5).await;
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(SlotOp::Halt {
        reservation: r,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    match two.acquire(video(), 1).await {
        Err(AcquireError::Halted(halted)) => {
            assert_eq!(halted.code(), kling_core::Code::ResourcePackExhausted);
            assert_eq!(halted.request_id(), Some("r-9"));
        }
        other => panic!("{other:?}"),
    }
    let applied = two
        .apply(SlotOp::ResetHalt(AccountId::new("acct")))
        .await
        .unwrap();
    assert!(applied.changed);
    // The other process had learnt the halt locally too; Redis is the truth once reset.
    assert!(one.acquire(video(), 1).await.is_ok());
}

/// A create this process granted before its own `1102` of the account, and that waited below
/// the slots (in a rate limiter), is refused by the classify step through the backend's halt
/// gate while the halt stands: the gate says the account is halted, another account is not,
/// and after a reset neither is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_granted_before_this_processs_1102_is_stopped_by_its_halt_gate() {
    use kling_core::lanes::Lanes;
    use kling_core::signals::HaltGate;
    let Some(server) = redis() else { return };
    let one = backend(&server, 5).await;
    let halts = Lanes::new(one.create_halts().expect("RedisSlots counts its halts"));
    // Granted (stamped) before the halt: one of the account, one of another.
    let before = HaltGate::new(halts.lane(), AccountId::new("acct"));
    let other = HaltGate::new(halts.lane(), AccountId::new("other"));
    assert!(before.refusal().is_none(), "no halt yet");
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(SlotOp::Halt {
        reservation: r,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    let refusal = before.refusal().expect("halted since the grant");
    let halted = refusal
        .downcast_ref::<kling_concurrency::error::Halted>()
        .expect("the slots' Halted");
    assert_eq!(halted.code(), kling_core::Code::ResourcePackExhausted);
    assert_eq!(
        kling_core::SendState::of(&*refusal),
        kling_core::SendState::NotSent
    );
    assert!(other.refusal().is_none(), "another account is not halted");
    // Stamped after the halt: the grant itself is refused (the backend's own check).
    let after = HaltGate::new(halts.lane(), AccountId::new("acct"));
    assert!(after.refusal().is_none());
    assert!(matches!(
        one.acquire(video(), 1).await,
        Err(AcquireError::Halted(_))
    ));
    one.apply(SlotOp::ResetHalt(AccountId::new("acct")))
        .await
        .unwrap();
    assert!(before.refusal().is_none(), "the halt was lifted");
}

/// Another process's `1102`, once this process learns of it (its next ask for the account's
/// slots is refused), stops the creates this process granted before and still holds below the
/// slots, as its own halt does: the gate's count moves when the halt is learnt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_learnt_from_another_process_stops_creates_granted_before_it() {
    use kling_core::lanes::Lanes;
    use kling_core::signals::HaltGate;
    let Some(server) = redis() else { return };
    let one = backend(&server, 5).await;
    let two = backend(&server, 5).await;
    let halts = Lanes::new(two.create_halts().expect("RedisSlots counts its halts"));
    // Granted in process two before the halt, then held below its slots.
    let before = HaltGate::new(halts.lane(), AccountId::new("acct"));
    let other = HaltGate::new(halts.lane(), AccountId::new("other"));
    let held = two.acquire(video(), 1).await.unwrap();
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(SlotOp::Halt {
        reservation: r,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    // Process two learns of the halt at its next ask (if the broadcast did not tell it first).
    assert!(matches!(
        two.acquire(video(), 1).await,
        Err(AcquireError::Halted(_))
    ));
    let refusal = before.refusal().expect("halted since the grant, as learnt");
    assert!(
        refusal
            .downcast_ref::<kling_concurrency::error::Halted>()
            .is_some_and(|h| h.request_id() == Some("r-9")),
        "the slots' Halted, with the 1102 that caused it: {refusal}"
    );
    assert!(other.refusal().is_none(), "another account is not halted");
    // Learnt again (another ask refused): nothing more to count, and still refused.
    assert!(matches!(
        two.acquire(video(), 1).await,
        Err(AcquireError::Halted(_))
    ));
    assert!(before.refusal().is_some());
    two.apply(SlotOp::GiveBack(held)).await.unwrap();
    one.apply(SlotOp::ResetHalt(AccountId::new("acct")))
        .await
        .unwrap();
    // Process two's next ask finds the halt gone (reset elsewhere), and forgets it.
    assert!(two.acquire(video(), 1).await.is_ok());
    assert!(before.refusal().is_none(), "the halt was lifted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1303_lowers_the_pool_for_the_whole_fleet() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 3).await;
    let two = backend(&server, 3).await;
    let a = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(a, "t1", LONG)).await.unwrap();
    let b = two.acquire(video(), 1).await.unwrap();
    two.apply(SlotOp::Congested(b)).await.unwrap();
    let snapshot = one.snapshot().await.unwrap();
    assert_eq!(
        (
            snapshot[0].in_use,
            snapshot[0].capacity,
            snapshot[0].configured
        ),
        (1, 1, 3)
    );
    let blocked = tokio::time::timeout(Duration::from_millis(150), one.acquire(video(), 1)).await;
    assert!(blocked.is_err(), "the fleet believes the pool full");
    // One of ours ends: one hidden slot comes back with it.
    two.apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    let snapshot = two.snapshot().await.unwrap();
    assert_eq!((snapshot[0].in_use, snapshot[0].capacity), (0, 2));
}

/// Two 1303s in a row at the same level: ended tasks stop bringing hidden slots back, and the
/// recovery interval doubles, for the whole fleet; a create that succeeds at the refused level
/// ends the streak (kling-concurrency's rule, in Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_1303_at_the_same_level_slows_the_fleets_recovery_until_a_create_proves_more_fit()
{
    let Some(server) = redis() else { return };
    let every = Duration::from_secs(2);
    let config = SlotsConfig::new(4).recovery_interval(every);
    let connect_one = || async {
        RedisSlots::new(connect(&server).await, config.clone())
            .unwrap()
            .poll_every(Duration::from_secs(30))
            .maintain_every(Duration::from_millis(50))
            .grace(Duration::from_millis(300))
    };
    let (one, two) = (connect_one().await, connect_one().await);
    for id in ["t1", "t2"] {
        let r = one.acquire(video(), 1).await.unwrap();
        one.apply(hold(r, id, LONG)).await.unwrap();
    }
    // Refused at 3 slots; the first 1303 is no pattern: an ended task brings a slot back.
    let r = two.acquire(video(), 1).await.unwrap();
    two.apply(SlotOp::Congested(r)).await.unwrap();
    assert_eq!(in_use_and_capacity(&one).await, (2, 2));
    two.apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(in_use_and_capacity(&one).await, (1, 3));
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(r, "t3", LONG)).await.unwrap();
    // Refused at 3 again: a streak.
    let r = two.acquire(video(), 1).await.unwrap();
    two.apply(SlotOp::Congested(r)).await.unwrap();
    let second_1303 = tokio::time::Instant::now();
    assert_eq!(in_use_and_capacity(&two).await, (2, 2));
    one.apply(ended("t2", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(
        in_use_and_capacity(&two).await,
        (1, 2),
        "an ended task brought a slot back"
    );
    assert!(
        second_1303.elapsed() < every,
        "too slow to tell the intervals apart"
    );

    // One slot back after twice the interval.
    tokio::time::sleep_until(second_1303 + every * 2 + Duration::from_millis(100)).await;
    assert_eq!(in_use_and_capacity(&one).await, (1, 3));
    // Creates succeed up to the refused level: more fit than the 1303s said, the streak ends,
    // and an ended task brings the last hidden slot back again.
    for id in ["t4", "t5"] {
        let r = one.acquire(video(), 1).await.unwrap();
        one.apply(hold(r, id, LONG)).await.unwrap();
    }
    two.apply(ended("t3", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert!(
        second_1303.elapsed() < every * 4,
        "too slow: the next step by time would bring it back too"
    );
    assert_eq!(in_use_and_capacity(&one).await, (2, 4));
}

/// The 1303s of creates granted before the first of them (a burst) are one refusal in Redis
/// too: no streak starts, so an ended task still brings a hidden slot back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_1303s_of_a_burst_count_as_one_in_the_fleet() {
    let Some(server) = redis() else { return };
    let (one, two) = (backend(&server, 5).await, backend(&server, 5).await);
    for id in ["t1", "t2"] {
        let r = one.acquire(video(), 1).await.unwrap();
        one.apply(hold(r, id, LONG)).await.unwrap();
    }
    let mut burst = Vec::new();
    for _ in 0..3 {
        burst.push(two.acquire(video(), 1).await.unwrap());
    }
    for refused in burst {
        two.apply(SlotOp::Congested(refused)).await.unwrap();
    }
    assert_eq!(in_use_and_capacity(&one).await, (2, 2));
    one.apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(in_use_and_capacity(&two).await, (1, 3));
}

/// A capacity set for the pool ends a streak of 1303s in Redis too: an ended task brings a
/// hidden slot back again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setting_the_capacity_ends_the_fleets_1303_streak() {
    let Some(server) = redis() else { return };
    let (one, two) = (backend(&server, 4).await, backend(&server, 4).await);
    for id in ["t1", "t2"] {
        let r = one.acquire(video(), 1).await.unwrap();
        one.apply(hold(r, id, LONG)).await.unwrap();
    }
    let r = two.acquire(video(), 1).await.unwrap();
    two.apply(SlotOp::Congested(r)).await.unwrap();
    one.apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(r, "t3", LONG)).await.unwrap();
    let r = two.acquire(video(), 1).await.unwrap();
    two.apply(SlotOp::Congested(r)).await.unwrap();
    assert_eq!(in_use_and_capacity(&one).await, (2, 2));
    // Set for the product, in the other process: it covers this pool.
    two.apply(SlotOp::SetCapacity {
        account: None,
        pool: Pool::new(Product::Video),
        capacity: 4,
    })
    .await
    .unwrap();
    one.apply(ended("t2", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(in_use_and_capacity(&one).await, (1, 3));
}

/// With a lease longer than the default, an ended task is remembered in Redis that long: a
/// holding of it that came back (a replay, an older snapshot) could hold its slots for the
/// whole lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_tasks_are_remembered_for_the_configured_lease() {
    let Some(server) = redis() else { return };
    let lease = Duration::from_secs(2 * 3600);
    let one = RedisSlots::new(connect(&server).await, SlotsConfig::new(2).lease(lease)).unwrap();
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(r, "t1", lease)).await.unwrap();
    one.apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    // The prefix is `test` (`support::connect`).
    let left_ms = pttl(&server, "test:ended").await;
    assert!(
        left_ms > 3600 * 1000 && left_ms <= 2 * 3600 * 1000,
        "kept {left_ms} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_loses_its_state_every_process_registers_its_slots_again() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 3).await;
    let two = backend(&server, 3).await;
    let a = one.acquire(video(), 2).await.unwrap();
    one.apply(hold(a, "t1", LONG)).await.unwrap();
    let b = two.acquire(video(), 1).await.unwrap();
    two.apply(hold(b, "t2", LONG)).await.unwrap();
    server.restart().unwrap();
    // The first script after the restart starts the grace; creates wait through it (all 3 s:
    // the timeout ran out).
    let third = tokio::time::timeout(Duration::from_secs(3), one.acquire(video(), 1)).await;
    assert!(
        third.is_err(),
        "admitted over the re-registered slots: {third:?}"
    );
    assert_eq!(
        in_use(&one).await,
        3,
        "both processes registered their slots again"
    );
    // And the registered tasks end as usual.
    let applied = one
        .apply(ended("t2", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(applied.released.len(), 1);
    assert_eq!(in_use(&two).await, 2);
}

/// A create whose outcome was unknown is kept under its external id; sent again and
/// answered, the same task's new holding replaces the old one in whichever process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_sent_again_supersedes_its_earlier_holding() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 3).await;
    let two = backend(&server, 3).await;
    let first = one.acquire(video(), 1).await.unwrap();
    one.apply(SlotOp::Hold {
        reservation: first,
        task: TaskRef {
            id: None,
            external_id: Some("job-7".to_owned()),
        },
        lease: LONG,
    })
    .await
    .unwrap();
    let again = two.acquire(video(), 1).await.unwrap();
    two.apply(SlotOp::Hold {
        reservation: again,
        task: TaskRef {
            id: Some("t7".to_owned()),
            external_id: Some("job-7".to_owned()),
        },
        lease: LONG,
    })
    .await
    .unwrap();
    assert_eq!(in_use(&one).await, 1, "one task, one slot");
    let applied = one
        .apply(ended("t7", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(applied.released.len(), 1);
    assert_eq!(in_use(&one).await, 0);
}

#[derive(Clone, Debug)]
enum Step {
    /// A create in process `p` of `weight` slots; `short` lease or not.
    Create { p: usize, weight: u32, short: bool },
    /// Process `p` learns that the `n`-th task ended (query, callback or `complete`).
    End { p: usize, n: usize, how: u8 },
    /// A query reports the `n`-th task still running (renews its lease).
    Running { p: usize, n: usize },
    /// Time passes beyond every short lease.
    Expire,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..2usize, 1..=3u32, any::<bool>()).prop_map(|(p, weight, short)| Step::Create { p, weight, short }),
        3 => (0..2usize, 0..12usize, 0..3u8).prop_map(|(p, n, how)| Step::End { p, n, how }),
        1 => (0..2usize, 0..12usize).prop_map(|(p, n)| Step::Running { p, n }),
        1 => Just(Step::Expire),
    ]
}

/// What the model knows of a live task's lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lease {
    /// Surely held.
    Long,
    /// Gone after the next `Expire`, maybe sooner.
    Short,
    /// Short, then renewed: held or expired, the model cannot tell.
    Unsure,
}

const CAPACITY: u32 = 3;
const SHORT: Duration = Duration::from_millis(40);
/// How soon a dropped acquire's give-back must show: a command's round trip on a loaded
/// machine, far from the 30 minutes (the default lease) a grant nobody gave back would hold
/// its slots, so a missing give-back still fails the checks.
const GIVE_BACK_WITHIN: Duration = Duration::from_millis(250);

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random creates, queries, callbacks, completions and lease expiries from two processes:
    /// Redis never holds more than the capacity, never less than the live long-lease tasks,
    /// and no task is ever released twice.
    #[test]
    fn slots_are_never_over_capacity_and_released_exactly_once(
        steps in proptest::collection::vec(step(), 1..30)
    ) {
        let Some(server) = redis() else { return Ok(()) };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let procs = [backend(&server, CAPACITY).await, backend(&server, CAPACITY).await];
            // n → (id, weight)
            let mut tasks: Vec<(String, u32)> = Vec::new();
            let mut live: HashMap<String, (u32, Lease)> = HashMap::new();
            let mut released: HashSet<String> = HashSet::new();
            for step in steps {
                match step {
                    Step::Create { p, weight, short } => {
                        let acquire = procs[p].acquire(video(), weight);
                        if let Ok(reservation) = tokio::time::timeout(Duration::from_millis(30), acquire).await {
                            let reservation = reservation.unwrap();
                            let id = format!("t{}", tasks.len());
                            let lease = if short { SHORT } else { LONG };
                            procs[p].apply(hold(reservation, &id, lease)).await.unwrap();
                            tasks.push((id.clone(), weight));
                            live.insert(id, (weight, if short { Lease::Short } else { Lease::Long }));
                        } else {
                            // Given up: a grant its script made as it was dropped (a slow
                            // machine's round trip can pass the 30 ms) is given back by a
                            // command the drop spawns. Wait for it, so the checks below see
                            // the pool without it.
                            let ceiling: u32 = live.values().map(|(w, _)| w).sum();
                            let deadline = tokio::time::Instant::now() + GIVE_BACK_WITHIN;
                            while in_use(&procs[0]).await > ceiling
                                && tokio::time::Instant::now() < deadline
                            {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                    }
                    Step::End { p, n, how } => {
                        let Some((id, _)) = tasks.get(n).cloned() else { continue };
                        let op = match how {
                            0 => ended(&id, Some(TaskStatus::Succeeded)),
                            1 => ended(&id, Some(TaskStatus::Failed)),
                            _ => ended(&id, None),
                        };
                        let applied = procs[p].apply(op).await.unwrap();
                        for r in &applied.released {
                            let task = r.task.as_deref().unwrap().to_owned();
                            assert!(released.insert(task.clone()), "{task} released twice");
                            let (weight, _) = live.remove(&task).expect("released a task that was not live");
                            assert_eq!(r.weight, weight);
                        }
                        // A long-lease live task is always found.
                        if let Some((_, Lease::Long)) = live.get(&id) {
                            panic!("live task {id} not released");
                        }
                        live.remove(&id);
                    }
                    Step::Running { p, n } => {
                        let Some((id, _)) = tasks.get(n).cloned() else { continue };
                        let applied = procs[p].apply(ended(&id, Some(TaskStatus::Processing))).await.unwrap();
                        assert!(applied.released.is_empty());
                        // Reported running: renewed to the long lease, unless its short one
                        // had already run out (real time passes between steps).
                        if let Some(task) = live.get_mut(&id)
                            && task.1 == Lease::Short
                        {
                            task.1 = Lease::Unsure;
                        }
                    }
                    Step::Expire => {
                        tokio::time::sleep(SHORT + Duration::from_millis(10)).await;
                        in_use(&procs[0]).await; // a snapshot expires leases
                        live.retain(|_, (_, lease)| *lease != Lease::Short);
                    }
                }
                let used = in_use(&procs[0]).await;
                let floor: u32 = live.values().filter(|(_, l)| *l == Lease::Long).map(|(w, _)| w).sum();
                let ceiling: u32 = live.values().map(|(w, _)| w).sum();
                assert!(used <= CAPACITY, "over capacity: {used}");
                assert!(used >= floor && used <= ceiling, "used {used}, live {live:?}");
            }
        });
    }
}

/// What the slots layer applies when a lookup by external id finds no task: an update with
/// no task id, the external id, and no status.
fn absent(external: &str) -> SlotOp {
    absent_in(&video().account, external)
}

/// [`absent`] for a lookup of `account`.
fn absent_in(account: &AccountId, external: &str) -> SlotOp {
    SlotOp::Update {
        account: account.clone(),
        updates: vec![TaskUpdate {
            id: String::new(),
            external_id: Some(external.to_owned()),
            status: None,
        }],
        lease: LONG,
    }
}

fn hold_unknown(reservation: Reservation, external: &str) -> SlotOp {
    SlotOp::Hold {
        reservation,
        task: TaskRef {
            id: None,
            external_id: Some(external.to_owned()),
        },
        lease: LONG,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_creates_end_when_a_lookup_finds_nothing_or_link_when_it_finds_the_task() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 2).await;
    let two = backend(&server, 2).await;
    // Two creates with unknown outcomes hold both slots under their external ids.
    let a = one.acquire(video(), 1).await.unwrap();
    one.apply(hold_unknown(a, "e1")).await.unwrap();
    let b = one.acquire(video(), 1).await.unwrap();
    one.apply(hold_unknown(b, "e2")).await.unwrap();
    assert_eq!(in_use(&one).await, 2);
    let waiter = tokio::spawn({
        let two = two.clone();
        async move { two.acquire(video(), 1).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished());

    // An unrelated external id ends nothing.
    let none = one.apply(absent("e9")).await.unwrap();
    assert!(none.released.is_empty(), "{none:?}");

    // The lookup of e1 finds no task: its slot goes to the waiter in the other process.
    let applied = one.apply(absent("e1")).await.unwrap();
    assert_eq!(applied.released.len(), 1, "{applied:?}");
    assert_eq!(applied.released[0].task.as_deref(), Some("e1"));
    let granted = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("the freed slot is granted")
        .unwrap();
    two.apply(SlotOp::GiveBack(granted)).await.unwrap();

    // The lookup of e2 finds the task running: the holding learns its id, and a query of
    // that id ending it releases it.
    one.apply(SlotOp::Update {
        account: video().account,
        updates: vec![TaskUpdate {
            id: "t7".to_owned(),
            external_id: Some("e2".to_owned()),
            status: Some(TaskStatus::Processing),
        }],
        lease: LONG,
    })
    .await
    .unwrap();
    let ended = two
        .apply(ended("t7", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(ended.released.len(), 1, "{ended:?}");
    assert_eq!(in_use(&one).await, 0);
}

/// A running report by external id alone (an empty task id, as a report built from a callback
/// that names only the external id) renews its holding without filing the empty text as its
/// task id: a later lookup that finds nothing under another external id (whose reports carry
/// an empty task id too) ends nothing else, in Redis or, while Redis is away, in the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_with_an_empty_task_id_files_no_task_id() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 2).await;
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(hold_unknown(r, "e1")).await.unwrap();
    let by_external = SlotOp::Update {
        account: video().account,
        updates: vec![TaskUpdate {
            id: String::new(),
            external_id: Some("e1".to_owned()),
            status: Some(TaskStatus::Processing),
        }],
        lease: LONG,
    };
    let renewed = one.apply(by_external).await.unwrap();
    assert!(renewed.changed);
    let none = one.apply(absent("e9")).await.unwrap();
    assert!(none.released.is_empty(), "{none:?}");
    assert_eq!(in_use(&one).await, 1);
    // The process's own record, used while Redis is away, matches alike.
    server.stop();
    let none = one.apply(absent("e8")).await.unwrap();
    assert!(none.released.is_empty(), "{none:?}");
    assert_eq!(one.held_here(), 1);
}

/// Past 64 pools, one that a create gave back and nothing else uses is forgotten, in Redis and
/// in the process: a client naming many models (a new-style create's pool is its model) leaves
/// no state behind for each. A pool in use stays.
#[tokio::test]
async fn pools_named_by_many_models_leave_nothing_behind() {
    let Some(server) = redis() else { return };
    let slots = backend(&server, 1).await;
    let model = |name: &str| {
        SlotKey::new(
            AccountId::new("acct"),
            Pool::with_model(Product::Video, name.to_owned()),
        )
    };
    let busy = slots.acquire(model("busy"), 1).await.unwrap();
    for n in 0..150 {
        let reservation = slots.acquire(model(&format!("typo-{n}")), 1).await.unwrap();
        slots.apply(SlotOp::GiveBack(reservation)).await.unwrap();
    }
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pools: usize = redis::cmd("SCARD")
        .arg("test:pools")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((2..=65).contains(&pools), "{pools} pools in redis");
    let snapshot = slots.snapshot().await.unwrap();
    assert!(snapshot.len() <= 65, "{} pools listed", snapshot.len());
    // The process's own record of its pools (its `Debug` counts them).
    let debug = format!("{slots:?}");
    let local: usize = debug
        .split("pools: ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(local <= 65, "{local} pools kept in the process");
    let listed = snapshot.iter().find(|p| p.key == model("busy")).unwrap();
    assert_eq!(listed.in_use, 1);
    slots.apply(SlotOp::GiveBack(busy)).await.unwrap();
    // A model seen before gets its pool again.
    let again = slots.acquire(model("typo-0"), 1).await.unwrap();
    let snapshot = slots.snapshot().await.unwrap();
    assert!(
        snapshot
            .iter()
            .any(|p| p.key == model("typo-0") && p.in_use == 1)
    );
    slots.apply(SlotOp::GiveBack(again)).await.unwrap();
}

/// Past 64 pools, a pool whose only create met a 1102 (its give-back is the halt's) is
/// forgotten as after any other give-back: each halt left one pool behind.
#[tokio::test]
async fn a_pool_past_the_first_64_is_forgotten_after_its_create_meets_a_1102() {
    let Some(server) = redis() else { return };
    let slots = backend(&server, 1).await;
    let model = |name: &str| {
        SlotKey::new(
            AccountId::new("acct"),
            Pool::with_model(Product::Video, name.to_owned()),
        )
    };
    // 65 pools in use stay: the next is past the first 64.
    let mut busy = Vec::new();
    for n in 0..65 {
        busy.push(slots.acquire(model(&format!("busy-{n}")), 1).await.unwrap());
    }
    let reservation = slots.acquire(model("halted"), 1).await.unwrap();
    slots
        .apply(SlotOp::Halt {
            reservation,
            cause: outcome(1102),
        })
        .await
        .unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pools: usize = redis::cmd("SCARD")
        .arg("test:pools")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(pools, 65, "the halted create's pool was kept");
    let metas: Vec<String> = redis::cmd("KEYS")
        .arg("test:pool:*halted*:m")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(metas.is_empty(), "{metas:?} left behind");
    drop(busy);
}

/// A debugging recorder set for this thread while the value lives (a current-thread test runs
/// every task, the backends' maintenance too, on it), and what it recorded.
struct Recording {
    snapshotter: metrics_util::debugging::Snapshotter,
    _set: metrics::LocalRecorderGuard<'static>,
}

fn recording() -> Recording {
    let recorder = Box::leak(Box::new(metrics_util::debugging::DebuggingRecorder::new()));
    Recording {
        snapshotter: recorder.snapshotter(),
        _set: metrics::set_default_local_recorder(recorder),
    }
}

/// The finished-task metrics of the fleet: each release is reported to the one process whose
/// script made it (a query's report, or a lease found run out by a create or a snapshot),
/// which counts it, so the fleet counts every task once.
#[tokio::test]
async fn every_task_that_ends_is_counted_once_in_the_fleet() {
    use kling_core::metrics::{LABEL_STATUS, TASK_LIFETIME, TASKS_FINISHED};
    use metrics_util::debugging::DebugValue;

    let Some(server) = redis() else { return };
    let recording = recording();
    let (one, two) = (backend(&server, 3).await, backend(&server, 3).await);
    let short = Duration::from_millis(200);
    // Ended by a report in the other process.
    let held = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(held, "t1", LONG)).await.unwrap();
    let done = two
        .apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(done.released.len(), 1);
    // A lease that runs out, found by the other process's next create.
    let held = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(held, "t2", short)).await.unwrap();
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    let _granted = two.acquire(video(), 1).await.unwrap();
    // And one found by a snapshot.
    let held = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(held, "t3", short)).await.unwrap();
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    two.snapshot().await.unwrap();

    let mut finished: HashMap<String, u64> = HashMap::new();
    let mut lifetimes = Vec::new();
    for (key, _, _, value) in recording.snapshotter.snapshot().into_vec() {
        let key = key.key();
        let status = key.labels().find(|l| l.key() == LABEL_STATUS);
        let status = status.map(|l| l.value().to_owned()).unwrap_or_default();
        match value {
            DebugValue::Counter(n) if key.name() == TASKS_FINISHED => {
                *finished.entry(status).or_default() += n;
            }
            DebugValue::Histogram(seen) if key.name() == TASK_LIFETIME => {
                lifetimes.extend(seen.into_iter().map(|s| (status.clone(), s.into_inner())));
            }
            _ => {}
        }
    }
    let expected: HashMap<String, u64> =
        HashMap::from([("succeeded".to_owned(), 1), ("expired".to_owned(), 2)]);
    assert_eq!(finished, expected);
    assert_eq!(lifetimes.len(), 3, "{lifetimes:?}");
    for (status, seconds) in &lifetimes {
        if status == "expired" {
            assert!(*seconds >= short.as_secs_f64(), "{lifetimes:?}");
        }
    }
}

/// The finished-task counts of the fleet, by status.
fn finished_by_status(recording: &Recording) -> HashMap<String, u64> {
    use kling_core::metrics::{LABEL_STATUS, TASKS_FINISHED};
    use metrics_util::debugging::DebugValue;

    let mut finished: HashMap<String, u64> = HashMap::new();
    for (key, _, _, value) in recording.snapshotter.snapshot().into_vec() {
        let key = key.key();
        if let DebugValue::Counter(n) = value
            && key.name() == TASKS_FINISHED
        {
            let status = key.labels().find(|l| l.key() == LABEL_STATUS);
            let status = status.map(|l| l.value().to_owned()).unwrap_or_default();
            *finished.entry(status).or_default() += n;
        }
    }
    finished
}

/// A grant whose lease runs out before its create is answered (a create slower than the
/// lease) is no finished task: Redis releases it (warned of, as every lease that runs out),
/// the create's hold then counts the task's slots anew, and the task is counted once, at its
/// end. Before, the grant's release counted an `expired` task too: one task counted twice.
/// The control: a task whose lease runs out is counted `expired`, once.
#[tokio::test]
async fn a_grant_whose_lease_ran_out_before_its_hold_counts_its_task_once() {
    let Some(server) = redis() else { return };
    let recording = recording();
    let (logs, _capture) = crate::support::capture_logs();
    let short = Duration::from_millis(300);
    let one = RedisSlots::new(connect(&server).await, SlotsConfig::new(3).lease(short))
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .grace(Duration::from_millis(300));
    kling_redis::testing::hold_maintenance(&one, true);
    let two = backend(&server, 3).await;
    let slow = one.acquire(video(), 1).await.unwrap();
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    assert_eq!(in_use(&two).await, 0, "the grant's lease ran out");
    one.apply(hold(slow, "t1", LONG)).await.unwrap();
    assert_eq!(in_use(&two).await, 1, "its hold counts the task anew");
    let done = two
        .apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(done.released.len(), 1);
    // The control: a task whose lease runs out.
    let held = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(held, "t2", short)).await.unwrap();
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    assert_eq!(in_use(&two).await, 0, "t2's lease ran out");
    let expected: HashMap<String, u64> =
        HashMap::from([("succeeded".to_owned(), 1), ("expired".to_owned(), 1)]);
    assert_eq!(finished_by_status(&recording), expected);
    let warnings = logs
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains("end of its lease"))
        .count();
    assert_eq!(warnings, 2, "the grant's and t2's leases are warned of");
}

/// A grant whose lease runs out before its create is answered brings no slot hidden by a
/// `1303` back: no task of it ended (should its create have made one, the hold counts it anew
/// and its end brings one back). Before, the grant's release brought one back as a task's end
/// does, and the task's end another: one task, two hidden slots back.
#[tokio::test]
async fn a_grant_whose_lease_ran_out_brings_no_hidden_slot_back() {
    let Some(server) = redis() else { return };
    let short = Duration::from_millis(300);
    let one = RedisSlots::new(connect(&server).await, SlotsConfig::new(3).lease(short))
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .grace(Duration::from_millis(300));
    kling_redis::testing::hold_maintenance(&one, true);
    let two = backend(&server, 3).await;
    // A create granted in process one, its answer slower than the lease.
    let slow = one.acquire(video(), 1).await.unwrap();
    // Another create, refused 1303 with the slow one's slot in use: two slots hidden.
    let refused = two.acquire(video(), 1).await.unwrap();
    two.apply(SlotOp::Congested(refused)).await.unwrap();
    assert_eq!(in_use_and_capacity(&two).await, (1, 1), "two slots hidden");
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    assert_eq!(
        in_use_and_capacity(&two).await,
        (0, 1),
        "the grant's lease ran out: no task ended, so no hidden slot came back"
    );
    // The control: the task its hold then counts anew brings one back at its end.
    one.apply(hold(slow, "t1", LONG)).await.unwrap();
    assert_eq!(in_use_and_capacity(&two).await, (1, 1));
    two.apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(
        in_use_and_capacity(&two).await,
        (0, 2),
        "its end brings one back"
    );
}

/// Each process's `kling_slots_in_use` shows the slots it holds, so the processes' gauges add
/// up to the fleet's use; a holding another process released leaves at its next maintenance.
#[tokio::test]
async fn the_in_use_gauges_of_the_processes_add_up_to_the_fleets_use() {
    use kling_core::metrics::SLOTS_IN_USE;
    use metrics_util::debugging::DebugValue;

    let Some(server) = redis() else { return };
    let recording = recording();
    // The debugging recorder hands a gauge's moves since the last snapshot over (both
    // processes' gauges are one series here, as a fleet's are once summed).
    let shown = std::cell::Cell::new(0.0);
    let in_use = || {
        for (key, _, _, value) in recording.snapshotter.snapshot().into_vec() {
            if let DebugValue::Gauge(moved) = value
                && key.key().name() == SLOTS_IN_USE
            {
                shown.set(shown.get() + moved.into_inner());
            }
        }
        shown.get()
    };
    let (one, two) = (backend(&server, 3).await, backend(&server, 3).await);
    let held = one.acquire(video(), 1).await.unwrap();
    assert_eq!(in_use(), 1.0);
    one.apply(hold(held, "t1", LONG)).await.unwrap();
    let held = two.acquire(video(), 2).await.unwrap();
    two.apply(hold(held, "t2", LONG)).await.unwrap();
    assert_eq!(in_use(), 3.0);
    // Process one sees t2 end: two's holding goes at two's next maintenance pass.
    let done = one
        .apply(ended("t2", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(done.released.len(), 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while in_use() != 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "{}", in_use());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    one.apply(ended("t1", Some(TaskStatus::Failed)))
        .await
        .unwrap();
    assert_eq!(in_use(), 0.0);
    assert_eq!(one.held_here() + two.held_here(), 0);
}

/// Each process's `kling_slots_waiters` shows its own waiting creates, so the processes'
/// gauges add up to the fleet's queue; each process's `kling_slots_capacity` shows the fleet's
/// capacity of the pool, lowered by a 1303 in any process and recovered with time, as its
/// maintenance pass reads it.
#[tokio::test]
async fn the_waiters_and_capacity_gauges_show_the_fleets_queue_and_capacity() {
    use kling_core::metrics::{SLOTS_CAPACITY, SLOTS_WAITERS};
    use metrics_util::debugging::DebugValue;

    let Some(server) = redis() else { return };
    let recording = recording();
    // Both processes' gauges are one series here (as a fleet's are once summed): the moves
    // since the last snapshot, added up.
    let shown = std::cell::RefCell::new(HashMap::<&str, f64>::new());
    let gauge = |name: &'static str| {
        for (key, _, _, value) in recording.snapshotter.snapshot().into_vec() {
            if let DebugValue::Gauge(moved) = value {
                for tracked in [SLOTS_WAITERS, SLOTS_CAPACITY] {
                    if key.key().name() == tracked {
                        *shown.borrow_mut().entry(tracked).or_default() += moved.into_inner();
                    }
                }
            }
        }
        shown.borrow().get(name).copied().unwrap_or_default()
    };
    let settles_at = |name: &'static str, value: f64| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        async move {
            while gauge(name) != value {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{name}: {} rather than {value}",
                    gauge(name)
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    // Long enough that a loaded machine still sees the lowered capacity before it recovers.
    let recovery = Duration::from_millis(1500);
    let process = || async {
        RedisSlots::new(
            connect(&server).await,
            SlotsConfig::new(3).recovery_interval(recovery),
        )
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_millis(50))
    };
    let (one, two) = (process().await, process().await);
    let held = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(held, "t1", LONG)).await.unwrap();
    let held = two.acquire(video(), 2).await.unwrap();
    two.apply(hold(held, "t2", LONG)).await.unwrap();
    // Each process that sent a create shows the pool's 3 slots.
    settles_at(SLOTS_CAPACITY, 6.0).await;
    assert_eq!(gauge(SLOTS_WAITERS), 0.0);

    // The pool is full: two creates wait in one process, one in the other.
    let mut waiting = [&one, &one, &two].map(|process| {
        let process = process.clone();
        tokio::spawn(async move {
            let granted = process.acquire(video(), 1).await;
            (process, granted)
        })
    });
    settles_at(SLOTS_WAITERS, 3.0).await;
    // A task ends: the create first in the fleet's order gets its slot and leaves the queue
    // (its task has finished once the gauge moved: one thread runs them all).
    one.apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    settles_at(SLOTS_WAITERS, 2.0).await;
    let first = waiting
        .iter()
        .position(|w| w.is_finished())
        .expect("granted");
    let (owner, granted) = (&mut waiting[first]).await.unwrap();
    let granted = granted.unwrap();
    // The other two give up.
    for (i, waiter) in waiting.iter().enumerate() {
        if i != first {
            waiter.abort();
        }
    }
    settles_at(SLOTS_WAITERS, 0.0).await;

    // A 1303 hides the free capacity for the whole fleet: with the grant sent back, the pool
    // shows its 2 slots in use as its capacity, in both processes.
    owner.apply(SlotOp::Congested(granted)).await.unwrap();
    settles_at(SLOTS_CAPACITY, 4.0).await;
    // The hidden slot comes back after the recovery interval, with no create to ask: 3 each.
    settles_at(SLOTS_CAPACITY, 6.0).await;
}

/// External ids are unique per account only: in Redis too, each account's holding under one
/// is filed and found apart from another's, whichever process kept it and whichever first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_ids_are_filed_and_found_within_their_account() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 3).await;
    let two = backend(&server, 3).await;
    let other = SlotKey::new(AccountId::new("other"), Pool::new(Product::Video));
    let in_pool = |backend: &RedisSlots, key: &SlotKey| {
        let (backend, key) = (backend.clone(), key.clone());
        async move {
            let snapshot = backend.snapshot().await.unwrap();
            snapshot
                .iter()
                .find(|p| p.key == key)
                .map_or(0, |p| p.in_use)
        }
    };
    // Unknown outcomes under `e1`: account `acct`'s first (process one), then `other`'s
    // (process two).
    let a = one.acquire(video(), 1).await.unwrap();
    one.apply(hold_unknown(a, "e1")).await.unwrap();
    let b = two.acquire(other.clone(), 1).await.unwrap();
    two.apply(hold_unknown(b, "e1")).await.unwrap();
    // `acct`'s create sent again and answered: it replaces `acct`'s earlier holding only.
    let again = one.acquire(video(), 1).await.unwrap();
    one.apply(SlotOp::Hold {
        reservation: again,
        task: TaskRef {
            id: Some("t1".to_owned()),
            external_id: Some("e1".to_owned()),
        },
        lease: LONG,
    })
    .await
    .unwrap();
    assert_eq!(
        in_pool(&one, &video()).await,
        1,
        "the earlier holding is given back"
    );
    assert_eq!(in_pool(&one, &other).await, 1, "another account's is not");

    // `other`'s lookup finds no task under its `e1`, in process one: `other`'s holding ends.
    let applied = one.apply(absent_in(&other.account, "e1")).await.unwrap();
    assert_eq!(applied.released.len(), 1, "{applied:?}");
    assert_eq!(applied.released[0].key, other);
    assert_eq!(in_pool(&one, &video()).await, 1, "not acct's e1");
    // A lookup in a third account ends nothing.
    let none = two
        .apply(absent_in(&AccountId::new("third"), "e1"))
        .await
        .unwrap();
    assert!(none.released.is_empty(), "{none:?}");
    // `acct`'s `complete` by external id ends its task.
    let done = two
        .apply(SlotOp::Update {
            account: video().account,
            updates: vec![TaskUpdate {
                id: "e1".to_owned(),
                external_id: None,
                status: None,
            }],
            lease: LONG,
        })
        .await
        .unwrap();
    assert_eq!(done.released.len(), 1, "{done:?}");
    assert_eq!(done.released[0].task.as_deref(), Some("t1"));
    assert_eq!(in_use(&one).await, 0);
}

/// With no queue (`max_queue(0)`), the acquire script ends leases that ran out and brings back
/// hidden slots that are due before it answers, so a create is never refused for good by a
/// task nobody followed or by a `1303` (the in-process backend needed this fixed; the Redis
/// one had it already).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_queue_an_expired_lease_and_a_hidden_slot_come_back() {
    let Some(server) = redis() else { return };
    let none = RedisSlots::new(
        connect(&server).await,
        SlotsConfig::new(1)
            .max_queue(0)
            .recovery_interval(Duration::from_millis(300)),
    )
    .unwrap()
    .poll_every(Duration::from_secs(30))
    .grace(Duration::from_millis(100));
    // A fresh store starts with a grace, in which a create that may not wait is refused.
    none.maintain().await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let held = none.acquire(video(), 1).await.unwrap();
    none.apply(hold(held, "t1", Duration::from_millis(300)))
        .await
        .unwrap();
    let refused = none.acquire(video(), 1).await;
    assert!(
        matches!(refused, Err(AcquireError::QueueFull(_))),
        "{refused:?}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let granted = none.acquire(video(), 1).await.expect("the lease ran out");
    // A 1303 with nothing else held: the pool's only slot is hidden, then comes back.
    none.apply(SlotOp::Congested(granted)).await.unwrap();
    let refused = none.acquire(video(), 1).await;
    assert!(
        matches!(refused, Err(AcquireError::QueueFull(_))),
        "{refused:?}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    none.acquire(video(), 1)
        .await
        .expect("the hidden slot came back");
}

/// Lowering a pool's capacity below the weight of a create waiting for it refuses that create
/// with `OverCapacity` (pool, weight, capacity) and serves the creates behind it, in the same
/// process and in another (the in-process backend needed this fixed; the Redis one had it
/// already: the change wakes every waiting head, whose next ask is refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_the_capacity_below_a_waiting_creates_weight_refuses_it_and_serves_the_rest() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 4).await;
    let two = backend(&server, 4).await;
    let held = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(held, "t1", LONG)).await.unwrap();
    let heavy = tokio::spawn({
        let one = one.clone();
        async move { one.acquire(video(), 4).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let behind = tokio::spawn({
        let one = one.clone();
        async move { one.acquire(video(), 1).await }
    });
    let elsewhere = tokio::spawn({
        let two = two.clone();
        async move { two.acquire(video(), 1).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!heavy.is_finished() && !behind.is_finished() && !elsewhere.is_finished());

    one.apply(SlotOp::SetCapacity {
        account: None,
        pool: Pool::new(Product::Video),
        capacity: 3,
    })
    .await
    .unwrap();
    let within = Duration::from_secs(2);
    let refused = tokio::time::timeout(within, heavy)
        .await
        .expect("refused")
        .unwrap();
    let Err(AcquireError::OverCapacity(over)) = refused else {
        panic!("{refused:?}");
    };
    assert_eq!(
        (over.pool(), over.weight(), over.capacity()),
        (&video().pool, 4, 3)
    );
    // Capacities may be set per account: the message says whose setting to raise.
    assert_eq!(over.account(), Some(&video().account));
    assert_eq!(
        over.to_string(),
        "create needs 4 slot(s) but pool video of account acct has only 3"
    );
    for waiter in [behind, elsewhere] {
        let granted = tokio::time::timeout(within, waiter)
            .await
            .expect("served")
            .unwrap();
        assert!(granted.is_ok(), "{granted:?}");
    }
    assert_eq!(in_use(&one).await, 3);
}

/// While Redis is away, a create too heavy for its pool's capacity (as this process last read
/// it) is refused at once, naming the account whose setting to raise, as when Redis refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_away_a_create_over_capacity_names_its_account() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 2).await;
    maintained(&one).await;
    server.stop();
    let refused = one.acquire(video(), 3).await;
    let Err(AcquireError::OverCapacity(over)) = refused else {
        panic!("{refused:?}");
    };
    assert_eq!(over.account(), Some(&video().account));
    assert_eq!(
        over.to_string(),
        "create needs 3 slot(s) but pool video of account acct has only 2"
    );
}

/// A task whose lease runs out is released by whichever process's script finds it, and that
/// process logs a warning naming it (account, pool, task id and external id, or the external
/// id alone of a create whose answer was lost, weight, time held): the task may still run on
/// the server, and the slot it frees may meet a `1303`. As kling-concurrency's
/// `a_lease_that_runs_out_is_logged_with_the_task_it_held`. A task reported ended before its
/// lease ran out is released without one (the negative control).
#[tokio::test]
async fn a_lease_that_runs_out_is_logged_with_the_task_it_held() {
    let Some(server) = redis() else { return };
    let (logs, _capture) = crate::support::capture_logs();
    let one = backend(&server, 3).await;
    let two = backend(&server, 3).await;
    let short = Duration::from_millis(1200);
    // (External ids holding the scripts' separators, `:` and `?`: the reason carries them.)
    for (id, ext) in [
        (Some("t-ended"), None),
        (Some("t-forgotten"), Some("job:f?")),
        (None, Some("job:lost?")),
    ] {
        let reservation = one.acquire(video(), 1).await.unwrap();
        let task = TaskRef {
            id: id.map(str::to_owned),
            external_id: ext.map(str::to_owned),
        };
        let hold = SlotOp::Hold {
            reservation,
            task,
            lease: short,
        };
        one.apply(hold).await.unwrap();
    }
    let applied = two
        .apply(ended("t-ended", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(applied.released.len(), 1, "{applied:?}");
    tokio::time::sleep(short + Duration::from_millis(300)).await;
    assert_eq!(in_use(&two).await, 0, "the leases ran out");
    let warnings: Vec<String> = logs
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains("end of its lease"))
        .cloned()
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:#?}");
    let forgotten = warnings
        .iter()
        .find(|line| line.contains(r#"task_id="t-forgotten""#))
        .unwrap_or_else(|| panic!("{warnings:#?}"));
    let lost = warnings
        .iter()
        .find(|line| line.contains(r#"external_id="job:lost?""#))
        .unwrap_or_else(|| panic!("{warnings:#?}"));
    for (warning, parts) in [
        (forgotten, [r#"external_id="job:f?""#, "account=acct"]),
        (
            lost,
            [
                r#"task_id="(unknown: its create's answer was lost)""#,
                "account=acct",
            ],
        ),
    ] {
        for part in parts.into_iter().chain(["pool=video", "weight=1"]) {
            assert!(warning.contains(part), "{part:?} in {warning}");
        }
        // Held a whole lease (1.2 s), give or take a loaded machine's delays.
        let held_secs: u64 = warning
            .split_once("held_secs=")
            .and_then(|(_, rest)| rest.split(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("held_secs in {warning}"));
        assert!((1..10).contains(&held_secs), "{warning}");
    }
}

/// A grant whose process stopped before its create was answered (no task id, no external id
/// yet) runs out in another process's script, which warns of it: by account and pool alone,
/// nothing led an operator to the process or the holding. The warning names the holding, whose
/// id begins with the stopped process's instance id. A grant given back before the process
/// stopped is not warned of (the negative control).
#[tokio::test]
async fn a_grant_left_by_a_stopped_process_is_logged_with_its_holding() {
    let Some(server) = redis() else { return };
    let (logs, _capture) = crate::support::capture_logs();
    let short = Duration::from_millis(1200);
    let survivor = backend(&server, 3).await;
    let stopped = RedisSlots::new(connect(&server).await, SlotsConfig::new(3).lease(short))
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_millis(50))
        .grace(Duration::from_millis(300));
    let instance = format!("{stopped:?}")
        .split_once("instance: \"")
        .and_then(|(_, rest)| Some(rest.split_once('"')?.0.to_owned()))
        .unwrap_or_else(|| panic!("no instance in {stopped:?}"));
    let left = stopped.acquire(video(), 2).await.unwrap();
    let given_back = stopped.acquire(video(), 1).await.unwrap();
    stopped.apply(SlotOp::GiveBack(given_back)).await.unwrap();
    // The process stops with its grant (a reservation is plain data: dropped, it gives
    // nothing back).
    let token = left.token;
    drop(left);
    drop(stopped);
    tokio::time::sleep(short + Duration::from_millis(300)).await;
    assert_eq!(in_use(&survivor).await, 0, "the grant's lease ran out");
    let warnings: Vec<String> = logs
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains("end of its lease"))
        .cloned()
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    let holding = format!(r#"holding="{instance}.{token}""#);
    for part in [
        holding.as_str(),
        "account=acct",
        "pool=video",
        r#"task_id="(unknown: its create's answer was lost)""#,
        "weight=2",
    ] {
        assert!(warnings[0].contains(part), "{part:?} in {}", warnings[0]);
    }
}

/// While Redis is away, a report applied to the process's own record finds a holding by its
/// external id within the report's account only, as the scripts do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_away_a_report_finds_external_ids_within_its_account_only() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 2).await;
    let held = one.acquire(video(), 1).await.unwrap();
    one.apply(hold_unknown(held, "e1")).await.unwrap();
    server.stop();
    // Another account's lookup of its own `e1` finds nothing: this account's holding stays.
    let other = one
        .apply(absent_in(&AccountId::new("other"), "e1"))
        .await
        .unwrap();
    assert!(other.released.is_empty(), "{other:?}");
    // Nor is a task another account's reconcile finds under its own `e1` known here already.
    let adopt = |account: &str| SlotOp::Adopt {
        key: SlotKey::new(AccountId::new(account), Pool::new(Product::Video)),
        task: TaskRef {
            id: None,
            external_id: Some("e1".to_owned()),
        },
        weight: 1,
        lease: LONG,
    };
    assert!(!one.apply(adopt("acct")).await.unwrap().changed, "known");
    assert!(
        one.apply(adopt("other")).await.unwrap().changed,
        "another account's task"
    );
    // This account's lookup does end its own (the control).
    let own = one.apply(absent("e1")).await.unwrap();
    assert_eq!(own.released.len(), 1, "{own:?}");
    assert_eq!(own.released[0].key, video());
    assert_eq!(one.held_here(), 1, "the adopted task of the other account");
}

/// Three minutes, µs.
const THREE_MINUTES_US: i64 = 180_000_000;

/// A process of one slot whose clock runs `ahead_us` off the real one, on a lazy connection (it
/// connects and measures the offset on first use); leases of a minute.
fn lazy_skewed(server: &kling_redis::testing::RedisServer, ahead_us: i64) -> RedisSlots {
    let conn = kling_redis::Connection::lazy(
        kling_redis::RedisConfig::new(server.url())
            .prefix("test")
            .command_timeout(Duration::from_secs(2)),
    )
    .unwrap();
    kling_redis::testing::skew_local_clock(&conn, ahead_us);
    RedisSlots::new(conn, SlotsConfig::new(1).lease(LONG))
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_millis(50))
}

/// A process whose clock is three minutes slow, on a lazy connection, takes the pool's one
/// slot: the grant's lease (a minute) runs on the server's clock, so another process's create
/// waits instead of releasing it as long expired and taking a second slot.
#[tokio::test]
async fn a_lazy_process_with_a_slow_clock_grants_a_lease_the_fleet_sees_running() {
    let Some(server) = redis() else { return };
    let slow = lazy_skewed(&server, -THREE_MINUTES_US);
    let other = backend(&server, 1).await;
    let granted = slow.acquire(video(), 1).await.unwrap();
    assert!(slow.connection().is_calibrated());
    let second = tokio::time::timeout(Duration::from_millis(300), other.acquire(video(), 1)).await;
    assert!(second.is_err(), "a second slot of one: {second:?}");
    assert_eq!(in_use(&other).await, 1);
    slow.apply(hold(granted, "slow", LONG)).await.unwrap();
    assert_eq!(in_use(&other).await, 1);
}

/// The same process's first act adopts a task found running: its lease, as another process
/// sees it, runs a minute from now, not a minute from three minutes ago.
#[tokio::test]
async fn a_lazy_process_with_a_slow_clock_adopts_a_task_whose_lease_is_not_already_over() {
    let Some(server) = redis() else { return };
    let slow = lazy_skewed(&server, -THREE_MINUTES_US);
    let other = backend(&server, 1).await;
    let adopted = slow
        .apply(SlotOp::Adopt {
            key: video(),
            task: TaskRef {
                id: Some("found".to_owned()),
                external_id: None,
            },
            weight: 1,
            lease: LONG,
        })
        .await
        .unwrap();
    assert!(adopted.changed);
    assert_eq!(in_use(&other).await, 1, "the adopted lease was released");
    let second = tokio::time::timeout(Duration::from_millis(300), other.acquire(video(), 1)).await;
    assert!(second.is_err(), "a second slot of one: {second:?}");
}

/// A process whose clock is three minutes fast, on a lazy connection, waits for a full pool:
/// its create arrived (fleet time) before one another process sends later, so the freed slot
/// is its own, not the later create's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_process_with_a_fast_clock_keeps_its_place_in_the_fleets_order() {
    let Some(server) = redis() else { return };
    let holder = backend(&server, 1).await;
    let late = backend(&server, 1).await;
    take_the_only_slot(&holder).await;
    let fast = lazy_skewed(&server, THREE_MINUTES_US);
    let early = spawn_create(&fast);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !early.is_finished(),
        "the pool is full: the fast process waits"
    );
    let second = spawn_create(&late);
    tokio::time::sleep(Duration::from_millis(100)).await;
    end_t1(&holder).await;
    let granted = tokio::time::timeout(Duration::from_secs(2), early)
        .await
        .expect("the earlier create gets the freed slot")
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "the later create took a slot too");
    fast.apply(SlotOp::GiveBack(granted)).await.unwrap();
    let later = tokio::time::timeout(Duration::from_secs(2), second)
        .await
        .expect("then the later create's turn")
        .unwrap();
    assert!(later.is_ok(), "{later:?}");
}

/// A lazy connection to a Redis that is not there cannot measure the offset: creates and
/// changes do what `when_unreachable` says, as when a script cannot be sent.
#[tokio::test]
async fn a_lazy_process_that_cannot_measure_the_offset_follows_when_unreachable() {
    let Some(mut server) = redis() else { return };
    server.stop();
    let conn = kling_redis::Connection::lazy(
        kling_redis::RedisConfig::new(server.url())
            .prefix("test")
            .command_timeout(Duration::from_millis(200))
            .connect_timeout(Duration::from_millis(200)),
    )
    .unwrap();
    let config = SlotsConfig::new(2);
    let fail = RedisSlots::new(conn.clone(), config.clone())
        .unwrap()
        .when_unreachable(kling_redis::WhenUnreachable::Fail);
    let refused = fail.acquire(video(), 1).await;
    assert!(
        matches!(refused, Err(AcquireError::Backend(_))),
        "{refused:?}"
    );
    assert!(fail.is_out());
    let fallback = RedisSlots::new(conn, config)
        .unwrap()
        .when_unreachable(kling_redis::WhenUnreachable::fallback(2));
    let granted = fallback.acquire(video(), 1).await.unwrap();
    fallback.apply(hold(granted, "t1", LONG)).await.unwrap();
    assert_eq!(fallback.held_here(), 1);
    assert!(fallback.pending() >= 1, "kept for replay");
    assert!(!fallback.connection().is_calibrated());
}

/// A process whose first script (`init`) reaches a restarted, empty Redis first starts the
/// new generation with a grace too: its creates wait while the fleet registers its slots
/// again, instead of being granted on the empty pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_on_an_empty_store_waits_through_the_grace() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 1)
        .await
        .maintain_every(Duration::from_secs(60));
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(r, "t1", LONG)).await.unwrap();
    server.restart().unwrap();
    let two = backend(&server, 1).await.grace(Duration::from_secs(2));
    two.maintain().await.unwrap();
    let create = tokio::time::timeout(Duration::from_millis(500), two.acquire(video(), 1)).await;
    assert!(
        create.is_err(),
        "granted before the fleet registered: {create:?}"
    );
}

/// A halt this process learnt from Redis ends with the reset another process made: the next
/// time Redis is away, its creates wait (`WhenUnreachable::Wait`) instead of failing with the
/// old 1102.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_reset_elsewhere_is_not_remembered_while_redis_is_away() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 5).await;
    let two = backend(&server, 5).await;
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(SlotOp::Halt {
        reservation: r,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    let halted = two.acquire(video(), 1).await;
    assert!(matches!(halted, Err(AcquireError::Halted(_))), "{halted:?}");
    one.apply(SlotOp::ResetHalt(AccountId::new("acct")))
        .await
        .unwrap();
    let granted = two.acquire(video(), 1).await.unwrap();
    two.apply(SlotOp::GiveBack(granted)).await.unwrap();
    server.stop();
    let create = tokio::time::timeout(Duration::from_millis(300), two.acquire(video(), 1)).await;
    assert!(create.is_err(), "not waiting: {create:?}");
}

/// A capacity set at run time counts in every process: a create that needs more than the
/// configured capacity but fits the new one is admitted, and while Redis is away each process
/// shares out the capacity it last read from Redis, not the configured one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacities_set_at_run_time_count_in_every_process_and_in_fallback_shares() {
    let Some(mut server) = redis() else { return };
    let image = SlotKey::new(AccountId::new("acct"), Pool::new(Product::Image));
    let one = backend(&server, 4).await;
    one.apply(SlotOp::SetCapacity {
        account: None,
        pool: Pool::new(Product::Image),
        capacity: 9,
    })
    .await
    .unwrap();
    let six = tokio::time::timeout(Duration::from_secs(2), one.acquire(image.clone(), 6))
        .await
        .expect("answered");
    assert!(six.is_ok(), "{six:?}");
    // Another process lowers video to 1; this one reads it at its next maintenance pass.
    let fallback = backend(&server, 4)
        .await
        .maintain_every(Duration::from_secs(60))
        .when_unreachable(kling_redis::WhenUnreachable::fallback(1));
    let first = fallback.acquire(video(), 1).await.unwrap();
    fallback.apply(SlotOp::GiveBack(first)).await.unwrap();
    one.apply(SlotOp::SetCapacity {
        account: None,
        pool: Pool::new(Product::Video),
        capacity: 1,
    })
    .await
    .unwrap();
    fallback.maintain().await.unwrap();
    server.stop();
    let granted = fallback.acquire(video(), 1).await;
    assert!(granted.is_ok(), "{granted:?}");
    let second =
        tokio::time::timeout(Duration::from_millis(300), fallback.acquire(video(), 1)).await;
    assert!(second.is_err(), "a share of the configured 4: {second:?}");
}

fn running(id: &str) -> SlotOp {
    SlotOp::Update {
        account: video().account,
        updates: vec![TaskUpdate {
            id: id.to_owned(),
            external_id: None,
            status: Some(TaskStatus::Processing),
        }],
        lease: Duration::from_secs(60),
    }
}

/// While Redis is away, the replay queue keeps one report per task (a poll answer that renews
/// a lease replaces the earlier one) and at most `MAX_PENDING_REPORTS` reports; what it keeps
/// is replayed when Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_away_the_replay_queue_keeps_one_report_per_task_and_is_bounded() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 5)
        .await
        .maintain_every(Duration::from_secs(60));
    for i in 0..5 {
        let r = one.acquire(video(), 1).await.unwrap();
        one.apply(hold(r, &format!("t{i}"), LONG)).await.unwrap();
    }
    server.stop();
    for n in 0..10_000 {
        one.apply(running(&format!("t{}", n % 5))).await.unwrap();
    }
    assert!(one.pending() <= 6, "{} changes kept", one.pending());
    one.apply(ended("t0", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert!(one.pending() <= 6, "{} changes kept", one.pending());
    for n in 0..kling_redis::MAX_PENDING_REPORTS + 100 {
        one.apply(running(&format!("other-{n}"))).await.unwrap();
    }
    assert!(
        one.pending() <= kling_redis::MAX_PENDING_REPORTS,
        "{} changes kept",
        one.pending()
    );
    server.restart().unwrap();
    maintained(&one).await;
    assert_eq!(one.pending(), 0, "replayed");
}

/// Runs maintenance passes until one succeeds (the first after a restart may find the old
/// connection broken).
async fn maintained(backend: &RedisSlots) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = backend.maintain().await {
        assert!(tokio::time::Instant::now() < deadline, "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After Redis came back, task `t1`, which `one` holds in the pool's only slot, is counted
/// as before: `one` keeps it on record, a create in `two` waits past the limit, and `t1`'s
/// end reported in `two` finds its holding and frees the slot.
async fn t1_holds_the_pools_slot_until_its_end(one: &RedisSlots, two: &RedisSlots, case: &str) {
    assert_eq!(one.held_here(), 1, "{case}: t1 kept on record");
    assert_eq!(in_use(two).await, 1, "{case}: t1 holds its slot");
    let past = tokio::time::timeout(Duration::from_millis(300), two.acquire(video(), 1)).await;
    assert!(past.is_err(), "{case}: a create past the limit");
    let done = two
        .apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(done.released.len(), 1, "{case}: t1's end found its holding");
    assert_eq!(in_use(two).await, 0, "{case}: t1's slot is free");
}

/// A Redis that comes back with older state (a restart from its snapshot) is a new
/// generation: the task created after the snapshot is registered again, and the one that ended
/// after it (reported by another process) does not come back to hold its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_comes_back_older_is_a_new_generation_that_keeps_live_tasks_only() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 2).await;
    let two = backend(&server, 2).await;
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(r, "t1", LONG)).await.unwrap();
    server.save().unwrap();
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(r, "t2", LONG)).await.unwrap();
    two.apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    server.restart_from_snapshot().unwrap();
    maintained(&one).await;
    maintained(&two).await;
    maintained(&one).await;
    maintained(&one).await;
    assert_eq!(one.held_here(), 1);
    assert_eq!(in_use(&one).await, 1);
    let applied = one
        .apply(ended("t2", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(applied.released.len(), 1, "t2 was registered again");
    assert_eq!(in_use(&one).await, 0, "t1 came back");
}

/// A task's end is counted once, even when Redis comes back older and the task with it: the
/// end its reporter sends again in the new generation releases the task a second time in
/// Redis, but counts it no second time.
#[tokio::test]
async fn an_end_sent_again_after_redis_came_back_older_is_not_counted_twice() {
    use kling_core::metrics::{TASK_LIFETIME, TASKS_FINISHED};
    use metrics_util::debugging::DebugValue;

    let Some(mut server) = redis() else { return };
    let recording = recording();
    let one = backend(&server, 2).await;
    let two = backend(&server, 2).await;
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(r, "t1", LONG)).await.unwrap();
    server.save().unwrap();
    let done = two
        .apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(done.released.len(), 1);
    // The owner learns that t1 was released (its next maintenance pass).
    maintained(&one).await;
    assert_eq!(one.held_here(), 0);
    server.restart_from_snapshot().unwrap();
    maintained(&two).await;
    maintained(&two).await;
    maintained(&one).await;
    assert_eq!(
        in_use(&one).await,
        0,
        "t1 came back, and its end was sent again"
    );

    let (mut finished, mut lifetimes) = (0, 0);
    for (key, _, _, value) in recording.snapshotter.snapshot().into_vec() {
        match value {
            DebugValue::Counter(n) if key.key().name() == TASKS_FINISHED => finished += n,
            DebugValue::Histogram(seen) if key.key().name() == TASK_LIFETIME => {
                lifetimes += seen.len();
            }
            _ => {}
        }
    }
    assert_eq!((finished, lifetimes), (1, 1));
}

/// An end reported by another process while Redis was away, replayed on the restarted, empty
/// store before the owner registers the task again, is not lost: the owner's registration
/// finds the task ended and gives its slot back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_replayed_before_the_owner_registers_again_frees_the_slot() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 2)
        .await
        .maintain_every(Duration::from_secs(60));
    let two = backend(&server, 2)
        .await
        .maintain_every(Duration::from_secs(60));
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(r, "t1", LONG)).await.unwrap();
    server.stop();
    two.apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(two.pending(), 1);
    server.restart().unwrap();
    maintained(&two).await;
    assert_eq!(two.pending(), 0);
    maintained(&one).await;
    maintained(&one).await;
    assert_eq!(in_use(&one).await, 0);
    assert_eq!(one.held_here(), 0);
}

/// A store that goes back to an older state on the same server (no restart to notice) is
/// caught by the scripts' sequence: the next maintenance pass starts a new generation and the
/// process registers the task the older state lacks, instead of forgetting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_whose_sequence_went_back_is_a_new_generation() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 2)
        .await
        .maintain_every(Duration::from_secs(60));
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(r, "t1", LONG)).await.unwrap();
    // The older state: no holding, an earlier sequence.
    let client = redis::Client::open(server.url()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("test:pool:*")
        .query_async(&mut raw)
        .await
        .unwrap();
    for key in keys.into_iter().chain(["test:ids".to_owned()]) {
        let () = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut raw)
            .await
            .unwrap();
    }
    let () = redis::cmd("SET")
        .arg("test:seq")
        .arg(1)
        .query_async(&mut raw)
        .await
        .unwrap();
    let _ = one.snapshot().await.unwrap();
    maintained(&one).await;
    maintained(&one).await;
    assert_eq!(one.held_here(), 1);
    assert_eq!(in_use(&one).await, 1, "t1 registered again");
}

/// A task another process reports running keeps its slot through a loss of Redis's state,
/// though the lease its owner's own record gave it ran out: each maintenance pass reads the
/// lease Redis has for the owner's holdings (renewed there by the other process's reports), and
/// the owner registers the task again with what is left of it, on an empty store or one come
/// back older (whose copy it keeps). Before, the owner dropped the task at the end of its own
/// lease (and released the copy an older store brought back): the task ran on holding no slot,
/// and the fleet let a create in past the pool's limit. The control: the pool, full with the
/// task, makes another create wait; and the task's end frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_renewed_by_another_process_keeps_its_slot_through_a_loss_of_state() {
    for older in [false, true] {
        let Some(mut server) = redis() else { return };
        let one = backend(&server, 1).await;
        let two = backend(&server, 1).await;
        let r = one.acquire(video(), 1).await.unwrap();
        let own = Duration::from_millis(500);
        one.apply(hold(r, "t1", own)).await.unwrap();
        // Another process's query of t1 (the owner's record does not see it) renews its lease
        // in Redis for a minute.
        two.apply(running("t1")).await.unwrap();
        tokio::time::sleep(own + Duration::from_millis(200)).await;
        one.maintain().await.unwrap();
        assert_eq!(in_use(&two).await, 1, "{older}: t1 runs, renewed");
        assert_eq!(one.held_here(), 1, "{older}");
        if older {
            server.save().unwrap();
            server.restart_from_snapshot().unwrap();
        } else {
            server.stop();
            server.restart().unwrap();
        }
        maintained(&one).await;
        maintained(&two).await;
        maintained(&one).await;
        maintained(&one).await;
        t1_holds_the_pools_slot_until_its_end(&one, &two, &format!("{older}")).await;
    }
}

/// A task another process renewed after Redis's snapshot keeps its slot when Redis comes back
/// with that snapshot: the copy it brings back carries the lease the snapshot had (over by
/// now), and the owner's registration, which keeps the copy, renews it to what is left of the
/// lease the owner last read in Redis. Before, the copy kept its old lease: the pool's next
/// ask (or any process's snapshot) released it as expired, the owner dropped the task at its
/// next pass, and the fleet let a create in past the pool's limit. The control: the pool,
/// full with the task, makes another create wait; and the task's end frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_renewed_after_the_snapshot_keeps_its_slot_when_redis_comes_back_older() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 1).await;
    let two = backend(&server, 1).await;
    let r = one.acquire(video(), 1).await.unwrap();
    let own = Duration::from_millis(500);
    one.apply(hold(r, "t1", own)).await.unwrap();
    // The snapshot holds t1 with its owner's lease.
    server.save().unwrap();
    // Another process's query of t1 renews its lease in Redis for a minute, after it.
    two.apply(running("t1")).await.unwrap();
    tokio::time::sleep(own + Duration::from_millis(200)).await;
    one.maintain().await.unwrap();
    assert_eq!(in_use(&two).await, 1, "t1 runs, renewed");
    server.restart_from_snapshot().unwrap();
    maintained(&one).await;
    maintained(&two).await;
    maintained(&one).await;
    assert_eq!(in_use(&two).await, 1, "t1 holds its slot");
    maintained(&one).await;
    t1_holds_the_pools_slot_until_its_end(&one, &two, "renewed").await;
}

/// A Redis restored from a snapshot taken between a create's grant and its hold brings the
/// holding back as a grant, with no task id: the owner's registration gives it back the task
/// id (and external id) the owner holds it under, so an end reported by task id in another
/// process finds it and frees the slot. Before, the registration renewed the grant's lease
/// only: the end found nothing, and the slot stayed counted until the lease ran out (30 min
/// by default), the fleet a create short. The control: the pool, full with the task, makes
/// another create wait until that end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_held_after_the_snapshot_is_found_by_its_ids_when_redis_comes_back_older() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 1).await;
    let two = backend(&server, 1).await;
    let r = one.acquire(video(), 1).await.unwrap();
    // The snapshot holds the grant.
    server.save().unwrap();
    let task = TaskRef {
        id: Some("t1".to_owned()),
        external_id: Some("job-1".to_owned()),
    };
    one.apply(SlotOp::Hold {
        reservation: r,
        task,
        lease: LONG,
    })
    .await
    .unwrap();
    server.restart_from_snapshot().unwrap();
    maintained(&one).await;
    maintained(&two).await;
    maintained(&one).await;
    maintained(&one).await;
    t1_holds_the_pools_slot_until_its_end(&one, &two, "held after the snapshot").await;
    // By its external id too: a second task, held after another snapshot, ended by a lookup
    // that names its external id alone.
    let r = one.acquire(video(), 1).await.unwrap();
    server.save().unwrap();
    let task = TaskRef {
        id: None,
        external_id: Some("job-2".to_owned()),
    };
    one.apply(SlotOp::Hold {
        reservation: r,
        task,
        lease: LONG,
    })
    .await
    .unwrap();
    server.restart_from_snapshot().unwrap();
    maintained(&one).await;
    maintained(&two).await;
    maintained(&one).await;
    maintained(&one).await;
    assert_eq!(in_use(&two).await, 1, "job-2 holds its slot");
    let done = two.apply(absent("job-2")).await.unwrap();
    assert_eq!(done.released.len(), 1, "job-2's lookup found its holding");
    assert_eq!(in_use(&two).await, 0, "job-2's slot is free");
}

/// Fleet time runs on the monotonic clock from the last measurement of the server's: a
/// system clock stepped two minutes forward after it (a resumed VM, `makestep`) does not run
/// a live lease out and grant its slot again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_of_the_system_clock_does_not_end_a_live_lease() {
    let Some(server) = redis() else { return };
    let conn = connect(&server).await;
    let one = RedisSlots::new(conn.clone(), SlotsConfig::new(1))
        .unwrap()
        .poll_every(Duration::from_millis(100))
        .grace(Duration::from_millis(50));
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(r, "t1", LONG)).await.unwrap();
    kling_redis::testing::skew_local_clock(&conn, 120_000_000);
    let second = tokio::time::timeout(Duration::from_millis(500), one.acquire(video(), 1)).await;
    assert!(second.is_err(), "the live lease ran out: {second:?}");
    assert_eq!(in_use(&one).await, 1);
}

/// A change made while the replay runs goes behind it, even while the replay's last change is
/// in flight and the queue looks empty: a capacity set after one that waited for Redis is the
/// one that stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_during_the_replay_does_not_overtake_it() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 4)
        .await
        .maintain_every(Duration::from_secs(60));
    let cap = |capacity| SlotOp::SetCapacity {
        account: None,
        pool: Pool::new(Product::Video),
        capacity,
    };
    one.apply(cap(4)).await.unwrap();
    // After the background loop's first pass (it then sleeps until woken).
    maintained(&one).await;
    server.stop();
    one.apply(cap(5)).await.unwrap();
    // Queued, not lost. A background pass woken by the failure may hold it for the moment
    // its replay fails (Redis is down): it puts it back at once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while one.pending() != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the change was not queued"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kling_redis::testing::delay_replay(&one, Duration::from_millis(300));
    server.restart().unwrap();
    // Connected again (a snapshot replays nothing; the maintenance it wakes does).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while one.snapshot().await.is_err() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let replay = tokio::spawn({
        let one = one.clone();
        async move { maintained(&one).await }
    });
    // The replay has taken `cap 5` and waits to send it: the queue looks empty.
    while one.pending() > 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    one.apply(cap(3)).await.unwrap();
    replay.await.unwrap();
    kling_redis::testing::delay_replay(&one, Duration::ZERO);
    maintained(&one).await;
    let client = redis::Client::open(server.url()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let stored: Option<String> = redis::cmd("HGET")
        .arg("test:cap")
        .arg("*|video")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(stored.as_deref(), Some("3"));
}

/// A lookup that found no task under an external id ends that holding; the create sent
/// again under the same id then makes the task. A new generation (Redis restarted) re-sends
/// the ends this process reported, but not that one: sent by external id, it would end the
/// task made since, which still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_generation_does_not_end_a_task_made_again_under_an_absent_external_id() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 2).await;
    let a = one.acquire(video(), 1).await.unwrap();
    one.apply(hold_unknown(a, "e1")).await.unwrap();
    one.apply(absent("e1")).await.unwrap();
    assert_eq!(in_use(&one).await, 0);
    let b = one.acquire(video(), 1).await.unwrap();
    one.apply(SlotOp::Hold {
        reservation: b,
        task: TaskRef {
            id: Some("t2".to_owned()),
            external_id: Some("e1".to_owned()),
        },
        lease: LONG,
    })
    .await
    .unwrap();
    assert_eq!(in_use(&one).await, 1);
    server.restart().unwrap();
    maintained(&one).await;
    maintained(&one).await;
    assert_eq!(
        in_use(&one).await,
        1,
        "the task made again still holds its slot"
    );
}

/// An ask granted in Redis whose answer was lost, then the account halted by another
/// process before the next ask: that ask is refused, and the grant the lost answer carried
/// is given back rather than held for the grant's lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_whose_answer_was_lost_is_given_back_when_the_next_ask_finds_a_halt() {
    let Some(server) = redis() else { return };
    // The ask whose answer is lost is asked again after `retry_every` (or when a release here
    // wakes it): long enough that the halt below is surely set first, even on a loaded machine.
    // At 500 ms a cold CI run once asked again before it, and was granted again.
    let one = backend(&server, 2)
        .await
        .retry_every(Duration::from_secs(3));
    let two = backend(&server, 2).await;
    let r = two.acquire(video(), 1).await.unwrap();
    assert_eq!(in_use(&one).await, 1);
    // Subscribed: the subscription's first wake of the waiting creates comes before the ask.
    crate::support::subscribed(&server, "freed", 2).await;
    kling_redis::testing::lose_acquire_answers(&one, 1);
    let asking = tokio::spawn({
        let one = one.clone();
        async move { one.acquire(video(), 1).await }
    });
    // The lost answer's grant holds the second slot; the other process meets a 1102, which
    // halts the account (and frees its slot, waking the first to ask again).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while in_use(&two).await < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the first ask ran");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    two.apply(SlotOp::Halt {
        reservation: r,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    let refused = asking.await.unwrap();
    assert!(
        matches!(refused, Err(AcquireError::Halted(_))),
        "{refused:?}"
    );
    while in_use(&two).await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lost answer's grant is still held"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Past 64 pools, one whose last task a report ended (rather than a create giving back) is
/// forgotten in Redis too.
#[tokio::test]
async fn pools_whose_tasks_ended_leave_nothing_behind() {
    let Some(server) = redis() else { return };
    let slots = backend(&server, 1).await;
    let model = |name: &str| {
        SlotKey::new(
            AccountId::new("acct"),
            Pool::with_model(Product::Video, name.to_owned()),
        )
    };
    for n in 0..150 {
        let reservation = slots.acquire(model(&format!("m-{n}")), 1).await.unwrap();
        let task = format!("t-{n}");
        slots.apply(hold(reservation, &task, LONG)).await.unwrap();
        slots
            .apply(ended(&task, Some(TaskStatus::Succeeded)))
            .await
            .unwrap();
    }
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pools: usize = redis::cmd("SCARD")
        .arg("test:pools")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(pools <= 65, "{pools} pools in redis");
    assert_eq!(in_use(&slots).await, 0);
}

/// A restart starts one generation, whichever script meets the empty store first: one started
/// by a create's ask notes the server, so the next maintenance pass does not take it for
/// another server's and start a second (with a second grace and a second re-registration).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_met_first_by_an_ask_starts_one_generation() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 2)
        .await
        .maintain_every(Duration::from_secs(60));
    maintained(&one).await;
    server.restart().unwrap();
    // Every write of the generation, as a keyspace event.
    let client = redis::Client::open(server.url()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("K$")
        .query_async(&mut raw)
        .await
        .unwrap();
    let mut events = client.get_async_pubsub().await.unwrap();
    events.subscribe("__keyspace@0__:test:alive").await.unwrap();
    let mut events = events.into_on_message();
    let granted = one.acquire(video(), 1).await.unwrap();
    maintained(&one).await;
    one.apply(SlotOp::GiveBack(granted)).await.unwrap();
    maintained(&one).await;
    let mut generations = 0;
    loop {
        let next = std::future::poll_fn(|cx| {
            futures_core::Stream::poll_next(std::pin::Pin::new(&mut events), cx)
        });
        match tokio::time::timeout(Duration::from_millis(200), next).await {
            Ok(Some(_)) => generations += 1,
            _ => break,
        }
    }
    assert_eq!(generations, 1, "generations started by the restart");
}

/// A create this process asks right after it recorded a 1102 is refused, though the halt's
/// script has not reached Redis yet (its change runs on the runtime, after this ask).
#[tokio::test]
async fn a_create_asked_right_after_a_halt_is_refused() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 5).await;
    let r = one.acquire(video(), 1).await.unwrap();
    let halting = one.apply(SlotOp::Halt {
        reservation: r,
        cause: outcome(1102),
    });
    let create = one.acquire(video(), 1).await;
    assert!(
        matches!(create, Err(AcquireError::Halted(_))),
        "granted after the halt: {create:?}"
    );
    halting.await.unwrap();
    assert_eq!(in_use(&one).await, 0);
}

/// A 1102 queued behind changes waiting for Redis (a command timed out) is seen by every
/// create this process asks after it, though Redis, answering again, does not have it yet;
/// once replayed, the fleet sees it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_asked_after_a_queued_halt_is_refused() {
    let Some(server) = redis() else { return };
    let impatient =
        crate::support::connect_with_timeout(server.url(), Duration::from_millis(200)).await;
    let one = RedisSlots::new(impatient, SlotsConfig::new(5))
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_secs(60))
        .grace(Duration::from_millis(300));
    // Only this test's passes replay: a pass a subscription or a reconnect woke would
    // take a kept change off the queue while the test counts it.
    kling_redis::testing::hold_maintenance(&one, true);
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(r, "t1", LONG)).await.unwrap();
    let r = one.acquire(video(), 1).await.unwrap();
    // Redis stops answering for a while: a report times out and is kept for replay.
    crate::support::client_pause(&server, 600).await;
    one.apply(running("t1")).await.unwrap();
    assert_eq!(one.pending(), 1);
    // Answering again (a ping waits out the pause); the halt goes behind the kept report.
    let _: String = redis::cmd("PING")
        .query_async(&mut crate::support::raw(&server).await)
        .await
        .unwrap();
    one.apply(SlotOp::Halt {
        reservation: r,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    let create = one.acquire(video(), 1).await;
    assert!(
        matches!(create, Err(AcquireError::Halted(_))),
        "granted after the halt: {create:?}"
    );
    maintained(&one).await;
    assert_eq!(one.pending(), 0);
    let two = backend(&server, 5).await;
    let create = two.acquire(video(), 1).await;
    assert!(matches!(create, Err(AcquireError::Halted(_))), "{create:?}");
    let create = one.acquire(video(), 1).await;
    assert!(matches!(create, Err(AcquireError::Halted(_))), "{create:?}");
}

/// An end whose report timed out after Redis ran it (Redis paused by `CLIENT PAUSE` for
/// 600 ms, commands giving up after 200 ms: the report runs when the pause ends) is kept and
/// replayed: the slot is freed once, and another process's task keeps its slot. (A task's
/// holding is found by its id only until it is released, so the replay finds none.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_whose_report_timed_out_after_redis_ran_it_frees_its_slot_once() {
    let Some(server) = redis() else { return };
    let impatient =
        crate::support::connect_with_timeout(server.url(), Duration::from_millis(200)).await;
    let one = RedisSlots::new(impatient, SlotsConfig::new(3))
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_secs(60))
        .grace(Duration::from_millis(300));
    // Only this test's passes replay: a pass a subscription or a reconnect woke would
    // take a kept change off the queue while the test counts it.
    kling_redis::testing::hold_maintenance(&one, true);
    let two = backend(&server, 3).await;
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(r, "t1", LONG)).await.unwrap();
    let r = two.acquire(video(), 1).await.unwrap();
    two.apply(hold(r, "t2", LONG)).await.unwrap();
    assert_eq!(in_use(&two).await, 2);
    crate::support::client_pause(&server, 600).await;
    for report in [ended("t1", Some(TaskStatus::Succeeded)), ended("t1", None)] {
        one.apply(report).await.unwrap();
    }
    assert_eq!(one.pending(), 2, "a report reached redis in time");
    // Redis ran the first when the pause ended.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while in_use(&two).await != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the report never ran"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    maintained(&one).await;
    assert_eq!(one.pending(), 0);
    assert_eq!(in_use(&two).await, 1, "t2's slot was freed too");
}

/// A capacity set in one process whose change timed out after Redis ran it (Redis paused by
/// `CLIENT PAUSE`) is kept and replayed; another process sets a lower capacity meanwhile. The
/// replay does not undo the later setting (the fleet would be let in up to the older, higher
/// capacity), nor does a reset of a halt, replayed, end a halt made after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_replayed_after_redis_ran_it_does_not_undo_a_later_one() {
    let Some(server) = redis() else { return };
    let impatient =
        crate::support::connect_with_timeout(server.url(), Duration::from_millis(200)).await;
    let one = RedisSlots::new(impatient, SlotsConfig::new(3))
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_secs(60))
        .grace(Duration::from_millis(300));
    // Only this test's passes replay: a pass a subscription or a reconnect woke would
    // take a kept change off the queue while the test counts it.
    kling_redis::testing::hold_maintenance(&one, true);
    let two = backend(&server, 3).await;
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(SlotOp::GiveBack(r)).await.unwrap();
    let video_pool = video().pool;
    let set = |capacity| SlotOp::SetCapacity {
        account: None,
        pool: video_pool.clone(),
        capacity,
    };
    crate::support::client_pause(&server, 600).await;
    // Both sent at once, before either timed out: Redis runs both.
    let (set, reset) = tokio::join!(
        one.apply(set(5)),
        one.apply(SlotOp::ResetHalt(video().account))
    );
    set.unwrap();
    reset.unwrap();
    assert_eq!(one.pending(), 2, "a change reached redis in time");
    // Redis runs both when the pause ends; then the other process lowers the capacity and
    // meets a 1102.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while in_use_and_capacity(&two).await.1 != 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the change never ran"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    two.apply(SlotOp::SetCapacity {
        account: None,
        pool: video().pool,
        capacity: 2,
    })
    .await
    .unwrap();
    let r = two.acquire(video(), 1).await.unwrap();
    two.apply(SlotOp::Halt {
        reservation: r,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    maintained(&one).await;
    assert_eq!(one.pending(), 0);
    assert_eq!(
        in_use_and_capacity(&two).await.1,
        2,
        "the older capacity came back"
    );
    let three = backend(&server, 3).await;
    let create = tokio::time::timeout(Duration::from_secs(2), three.acquire(video(), 1)).await;
    assert!(
        matches!(create, Ok(Err(AcquireError::Halted(_)))),
        "the later halt was reset: {create:?}"
    );
}

/// `one`, whose commands give up after 200 ms and whose maintenance runs only when the test
/// asks, with a task `t1` held.
async fn impatient_with_t1(server: &kling_redis::testing::RedisServer) -> RedisSlots {
    let impatient =
        crate::support::connect_with_timeout(server.url(), Duration::from_millis(200)).await;
    impatient_with_t1_on(impatient).await
}

/// [`impatient_with_t1`] on `impatient`, a connection whose commands give up after 200 ms.
async fn impatient_with_t1_on(impatient: kling_redis::Connection) -> RedisSlots {
    let one = RedisSlots::new(impatient, SlotsConfig::new(5))
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_secs(60))
        .grace(Duration::from_millis(300));
    // Only this test's passes replay: a pass a subscription or a reconnect woke would
    // take a kept change off the queue while the test counts it.
    kling_redis::testing::hold_maintenance(&one, true);
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(r, "t1", LONG)).await.unwrap();
    one
}

/// Pauses Redis for 600 ms while `one` ([`impatient_with_t1`]) reports `t1` running: the
/// report is kept for replay, and the changes `one` makes next queue behind it.
async fn keep_a_report(server: &kling_redis::testing::RedisServer, one: &RedisSlots) {
    crate::support::client_pause(server, 600).await;
    one.apply(running("t1")).await.unwrap();
    assert_eq!(one.pending(), 1, "the report reached redis in time");
    // Answering again (a ping waits out the pause).
    let _: String = redis::cmd("PING")
        .query_async(&mut crate::support::raw(server).await)
        .await
        .unwrap();
}

/// A reset of a halt kept for replay (queued behind a change waiting for Redis) and replayed
/// after another process met a new 1102 does not end that later halt (a create would meet
/// it): Redis knows when the halt it has was made, and drops the older reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_replayed_after_a_later_halt_leaves_that_halt() {
    let Some(server) = redis() else { return };
    let one = impatient_with_t1(&server).await;
    let two = backend(&server, 5).await;
    let first = two.acquire(video(), 1).await.unwrap();
    let second = two.acquire(video(), 1).await.unwrap();
    two.apply(SlotOp::Halt {
        reservation: first,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    keep_a_report(&server, &one).await;
    one.apply(SlotOp::ResetHalt(video().account)).await.unwrap();
    assert_eq!(one.pending(), 2, "the reset was not kept");
    // Later than the reset by more than the processes' clocks may differ.
    tokio::time::sleep(Duration::from_millis(100)).await;
    two.apply(SlotOp::Halt {
        reservation: second,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    maintained(&one).await;
    assert_eq!(one.pending(), 0);
    let three = backend(&server, 5).await;
    let create = tokio::time::timeout(Duration::from_secs(2), three.acquire(video(), 1)).await;
    assert!(
        matches!(create, Ok(Err(AcquireError::Halted(_)))),
        "the later halt was reset: {create:?}"
    );
    let create = tokio::time::timeout(Duration::from_secs(2), one.acquire(video(), 1)).await;
    assert!(
        matches!(create, Ok(Err(AcquireError::Halted(_)))),
        "granted in the process that reset: {create:?}"
    );
}

/// A 1102 kept for replay and replayed after another process reset the account's halt (a
/// reset made after it) halts nothing: the account would stay halted until reset again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_replayed_after_a_later_reset_halts_nothing() {
    let Some(server) = redis() else { return };
    let one = impatient_with_t1(&server).await;
    let r = one.acquire(video(), 1).await.unwrap();
    let two = backend(&server, 5).await;
    keep_a_report(&server, &one).await;
    one.apply(SlotOp::Halt {
        reservation: r,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    assert_eq!(one.pending(), 2, "the halt was not kept");
    // Later than the halt by more than the processes' clocks may differ.
    tokio::time::sleep(Duration::from_millis(100)).await;
    two.apply(SlotOp::ResetHalt(video().account)).await.unwrap();
    maintained(&one).await;
    assert_eq!(one.pending(), 0);
    for backend in [&two, &one] {
        let create = tokio::time::timeout(Duration::from_secs(2), backend.acquire(video(), 1))
            .await
            .expect("the create waited");
        assert!(create.is_ok(), "the earlier halt came back: {create:?}");
    }
}

/// A capacity kept for replay and replayed after another process set the same capacity does
/// not undo the later setting; with no later setting, a replayed one applies as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_replayed_after_a_later_setting_leaves_that_setting() {
    let Some(server) = redis() else { return };
    let two = backend(&server, 5).await;
    let set = |capacity| SlotOp::SetCapacity {
        account: None,
        pool: video().pool,
        capacity,
    };
    let one = impatient_with_t1(&server).await;
    keep_a_report(&server, &one).await;
    one.apply(set(5)).await.unwrap();
    assert_eq!(one.pending(), 2, "the capacity was not kept");
    // Later than the first by more than the processes' clocks may differ.
    tokio::time::sleep(Duration::from_millis(100)).await;
    two.apply(set(2)).await.unwrap();
    maintained(&one).await;
    assert_eq!(one.pending(), 0);
    assert_eq!(
        in_use_and_capacity(&two).await.1,
        2,
        "the older capacity came back"
    );
    // Kept again, with nothing later: it applies when replayed.
    keep_a_report(&server, &one).await;
    one.apply(set(4)).await.unwrap();
    assert_eq!(one.pending(), 2, "the capacity was not kept");
    maintained(&one).await;
    assert_eq!(one.pending(), 0);
    assert_eq!(
        in_use_and_capacity(&two).await.1,
        4,
        "the replay was dropped"
    );
}

/// A process's 1102 and then its own reset of it, both kept for replay, with a new
/// measurement of the server's clock between them that moved its fleet time back a little
/// (half a slow probe's round trip): replayed, the reset still ends the halt. Stamped on fleet
/// time as read, the reset was "made before" the halt replayed just ahead of it, and dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_kept_behind_its_halt_applies_though_fleet_time_went_back_between() {
    let Some(server) = redis() else { return };
    let impatient =
        crate::support::connect_with_timeout(server.url(), Duration::from_millis(200)).await;
    let one = impatient_with_t1_on(impatient.clone()).await;
    let r = one.acquire(video(), 1).await.unwrap();
    keep_a_report(&server, &one).await;
    one.apply(SlotOp::Halt {
        reservation: r,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    kling_redis::testing::shift_fleet_clock(&impatient, -50_000);
    one.apply(SlotOp::ResetHalt(video().account)).await.unwrap();
    assert_eq!(one.pending(), 3, "the halt and the reset were not kept");
    maintained(&one).await;
    assert_eq!(one.pending(), 0);
    let two = backend(&server, 5).await;
    for backend in [&two, &one] {
        let create = tokio::time::timeout(Duration::from_secs(2), backend.acquire(video(), 1))
            .await
            .expect("the create waited");
        assert!(create.is_ok(), "the reset was dropped: {create:?}");
    }
}

/// A halt stamped by a process whose fleet time ran an hour ahead (its offset measured against
/// a server whose clock was off) does not make Redis drop the fleet's replays for that hour: a
/// 1102 kept for replay, made after another process reset that halt, still halts the account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stamp_far_ahead_of_fleet_time_does_not_drop_later_replays() {
    let Some(server) = redis() else { return };
    let ahead_conn = connect(&server).await;
    kling_redis::testing::shift_fleet_clock(&ahead_conn, 3_600_000_000);
    let ahead = RedisSlots::new(ahead_conn, SlotsConfig::new(5))
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_secs(60))
        .grace(Duration::from_millis(300));
    kling_redis::testing::hold_maintenance(&ahead, true);
    let one = impatient_with_t1(&server).await;
    let r = one.acquire(video(), 1).await.unwrap();
    let two = backend(&server, 5).await;
    // Another pool of the account: its scripts, an hour ahead, run out no lease of `video()`.
    let model = SlotKey::new(
        video().account,
        Pool::with_model(Product::Video, "kling-3.0"),
    );
    let halted = ahead.acquire(model, 1).await.unwrap();
    ahead
        .apply(SlotOp::Halt {
            reservation: halted,
            cause: outcome(1102),
        })
        .await
        .unwrap();
    two.apply(SlotOp::ResetHalt(video().account)).await.unwrap();
    // Later than the reset by more than the processes' clocks may differ.
    tokio::time::sleep(Duration::from_millis(100)).await;
    keep_a_report(&server, &one).await;
    one.apply(SlotOp::Halt {
        reservation: r,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    assert_eq!(one.pending(), 2, "the halt was not kept");
    maintained(&one).await;
    assert_eq!(one.pending(), 0);
    let three = backend(&server, 5).await;
    let create = tokio::time::timeout(Duration::from_secs(2), three.acquire(video(), 1)).await;
    assert!(
        matches!(create, Ok(Err(AcquireError::Halted(_)))),
        "the replayed halt was dropped: {create:?}"
    );
}

/// A create granted from the fallback share while Redis was paused (its ask, run late, found
/// the pool full) is held by its hold alone, which took its registration's place in the replay
/// queue: replayed, that hold still proves the pool fit at the last 1303's level, as a hold of a
/// grant Redis had does, and the fleet's streak of 1303s ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_replayed_in_place_of_its_registration_proves_the_1303_level() {
    let Some(server) = redis() else { return };
    let impatient =
        crate::support::connect_with_timeout(server.url(), Duration::from_millis(200)).await;
    let one = RedisSlots::new(impatient, SlotsConfig::new(2))
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_secs(60))
        .grace(Duration::from_millis(300))
        .when_unreachable(kling_redis::WhenUnreachable::fallback(1));
    // Only this test's passes replay.
    kling_redis::testing::hold_maintenance(&one, true);
    let level = || async {
        let mut raw = crate::support::raw(&server).await;
        let metas: Vec<String> = redis::cmd("KEYS")
            .arg("test:pool:*:m")
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(metas.len(), 1, "{metas:?}");
        let lvl: Option<String> = redis::cmd("HGET")
            .arg(&metas[0])
            .arg("lvl")
            .query_async(&mut raw)
            .await
            .unwrap();
        lvl.unwrap_or_default()
    };
    let a = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(a, "ta", LONG)).await.unwrap();
    let b = one.acquire(video(), 1).await.unwrap();
    one.apply(SlotOp::Congested(b)).await.unwrap();
    assert_eq!(level().await, "2");
    crate::support::client_pause(&server, 600).await;
    let c = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(c, "tc", LONG)).await.unwrap();
    assert_eq!(one.pending(), 1, "the hold took the registration's place");
    maintained(&one).await;
    assert_eq!(one.pending(), 0);
    assert_eq!(in_use(&one).await, 2);
    assert_eq!(level().await, "0", "the streak of 1303s did not end");
}

/// A 1102 whose change timed out after Redis ran it is kept and replayed; another process
/// resets the halt meanwhile. The replay does not halt the account again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_replayed_after_redis_ran_it_does_not_undo_a_later_reset() {
    let Some(server) = redis() else { return };
    let impatient =
        crate::support::connect_with_timeout(server.url(), Duration::from_millis(200)).await;
    let one = RedisSlots::new(impatient, SlotsConfig::new(3))
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_secs(60))
        .grace(Duration::from_millis(300));
    // Only this test's passes replay: a pass a subscription or a reconnect woke would
    // take a kept change off the queue while the test counts it.
    kling_redis::testing::hold_maintenance(&one, true);
    let two = backend(&server, 3).await;
    let r = one.acquire(video(), 1).await.unwrap();
    crate::support::client_pause(&server, 600).await;
    one.apply(SlotOp::Halt {
        reservation: r,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    assert_eq!(one.pending(), 1, "the halt reached redis in time");
    // Redis runs it when the pause ends; then the other process resets it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let create = tokio::time::timeout(Duration::from_secs(2), two.acquire(video(), 1)).await;
        match create {
            Ok(Err(AcquireError::Halted(_))) => break,
            Ok(Ok(granted)) => two.apply(SlotOp::GiveBack(granted)).await.unwrap(),
            other => panic!("{other:?}"),
        };
        assert!(tokio::time::Instant::now() < deadline, "the halt never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    two.apply(SlotOp::ResetHalt(video().account)).await.unwrap();
    maintained(&one).await;
    assert_eq!(one.pending(), 0);
    let create = tokio::time::timeout(Duration::from_secs(2), two.acquire(video(), 1)).await;
    assert!(
        matches!(create, Ok(Ok(_))),
        "the reset halt came back: {create:?}"
    );
}

/// A create's answer that left Redis before this process recorded a 1102 (its ask was on
/// its way) does not end that halt here: the next create is still refused, though the halt
/// waits behind a kept change and Redis does not have it yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_to_an_ask_sent_before_a_halt_does_not_end_it() {
    let Some(server) = redis() else { return };
    // 20 ms each way: an ask is long enough on its way to record the halt meanwhile.
    let relay = crate::support::far_relay(server.port(), Duration::from_millis(20)).await;
    let far = crate::support::connect_with_timeout(
        format!("redis://127.0.0.1:{relay}/"),
        Duration::from_millis(500),
    )
    .await;
    let one = RedisSlots::new(far, SlotsConfig::new(5))
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_secs(60))
        .grace(Duration::from_millis(300));
    // Only this test's passes replay: a pass a subscription or a reconnect woke would
    // take a kept change off the queue while the test counts it.
    kling_redis::testing::hold_maintenance(&one, true);
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(r, "t1", LONG)).await.unwrap();
    let r = one.acquire(video(), 1).await.unwrap();
    crate::support::client_pause(&server, 900).await;
    one.apply(running("t1")).await.unwrap();
    assert_eq!(one.pending(), 1);
    let _: String = redis::cmd("PING")
        .query_async(&mut crate::support::raw(&server).await)
        .await
        .unwrap();
    let asked = tokio::spawn({
        let one = one.clone();
        async move { one.acquire(video(), 1).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    one.apply(SlotOp::Halt {
        reservation: r,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    // Asked before the halt: granted or refused, either is right.
    drop(asked.await.unwrap());
    let create = one.acquire(video(), 1).await;
    assert!(
        matches!(create, Err(AcquireError::Halted(_))),
        "granted after the halt: {create:?}"
    );
}

/// The finished tasks `recording` counted, and the lifetimes it recorded, since its last
/// snapshot.
fn finished(recording: &Recording) -> (u64, usize) {
    use kling_core::metrics::{TASK_LIFETIME, TASKS_FINISHED};
    use metrics_util::debugging::DebugValue;

    let (mut finished, mut lifetimes) = (0, 0);
    for (key, _, _, value) in recording.snapshotter.snapshot().into_vec() {
        match value {
            DebugValue::Counter(n) if key.key().name() == TASKS_FINISHED => finished += n,
            DebugValue::Histogram(seen) if key.key().name() == TASK_LIFETIME => {
                lifetimes += seen.len();
            }
            _ => {}
        }
    }
    (finished, lifetimes)
}

/// A task's end reported by another process, then a restart that loses Redis's state before
/// the owner's next pass: the reporter sends the end again, and the owner, registering the
/// task again, finds it ended and gives its slot back. The end is still counted once.
#[tokio::test]
async fn an_end_before_a_restart_the_owner_has_not_seen_is_counted_once() {
    let Some(mut server) = redis() else { return };
    let recording = recording();
    let one = backend(&server, 2)
        .await
        .maintain_every(Duration::from_secs(60));
    let two = backend(&server, 2)
        .await
        .maintain_every(Duration::from_secs(60));
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(r, "t1", LONG)).await.unwrap();
    let done = two
        .apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(done.released.len(), 1);
    // Redis restarts empty before the owner's next pass: it still holds t1.
    assert_eq!(one.held_here(), 1);
    server.stop();
    server.restart().unwrap();
    // The reporter's passes first: the new generation, and its end sent again.
    maintained(&two).await;
    maintained(&two).await;
    // The owner's: t1 registered again is found ended, and given back.
    maintained(&one).await;
    maintained(&one).await;
    assert_eq!(one.held_here(), 0);
    assert_eq!(in_use(&one).await, 0);
    assert_eq!(finished(&recording), (1, 1), "the end was counted again");
}

/// An end reported while Redis was away, replayed on the restarted, empty store before the
/// owner registers the task again, releases nothing there: the owner's registration gives the
/// slot back and counts the end, once.
#[tokio::test]
async fn an_end_replayed_before_the_owner_registers_again_is_counted_once() {
    let Some(mut server) = redis() else { return };
    let recording = recording();
    let one = backend(&server, 2)
        .await
        .maintain_every(Duration::from_secs(60));
    let two = backend(&server, 2)
        .await
        .maintain_every(Duration::from_secs(60));
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(r, "t1", LONG)).await.unwrap();
    server.stop();
    two.apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    server.restart().unwrap();
    maintained(&two).await;
    assert_eq!(two.pending(), 0);
    maintained(&one).await;
    maintained(&one).await;
    assert_eq!(one.held_here(), 0);
    assert_eq!(in_use(&one).await, 0);
    assert_eq!(finished(&recording), (1, 1));
}

/// `complete` by an external id before the create's answer came (told in another process):
/// the end is filed as the external id it may be, within its account, and frees the holding
/// of the create that carries that external id when it is held (answered, or its outcome
/// unknown and kept under the external id), not another account's create under it; nor is
/// such a task adopted. Once the text turned out to be an external id, a task whose id is the
/// same text is not ended by it, and the other way round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_complete_by_external_id_frees_the_create_that_carries_it() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 4).await;
    let two = backend(&server, 4).await;
    let other = AccountId::new("b");
    let complete = |account: &AccountId, id: &str| SlotOp::Update {
        account: account.clone(),
        updates: vec![TaskUpdate {
            id: id.to_owned(),
            external_id: None,
            status: None,
        }],
        lease: LONG,
    };
    let held = |id: Option<&str>, ext: Option<&str>| {
        let one = one.clone();
        let task = TaskRef {
            id: id.map(str::to_owned),
            external_id: ext.map(str::to_owned),
        };
        async move {
            let reservation = one.acquire(video(), 1).await.unwrap();
            let applied = one
                .apply(SlotOp::Hold {
                    reservation,
                    task,
                    lease: LONG,
                })
                .await
                .unwrap();
            applied.released.len()
        }
    };
    for ext in ["job-1", "job-2", "x", "job-6"] {
        let applied = two.apply(complete(&video().account, ext)).await.unwrap();
        assert!(applied.released.is_empty(), "{applied:?}");
    }
    two.apply(complete(&other, "job-3")).await.unwrap();
    // The answer names the task and echoes the external id.
    assert_eq!(held(Some("t1"), Some("job-1")).await, 1);
    assert_eq!(in_use(&one).await, 0, "job-1's create is freed");
    // The answer was lost: kept under the external id alone.
    assert_eq!(held(None, Some("job-2")).await, 1);
    assert_eq!(in_use(&one).await, 0, "job-2's create is freed");
    // Another account's end by `job-3` is not this account's.
    assert_eq!(held(Some("t3"), Some("job-3")).await, 0);
    assert_eq!(in_use(&one).await, 1);
    // `x` turns out to be an external id; a task named `x` later is another task.
    assert_eq!(held(Some("t4"), Some("x")).await, 1);
    assert_eq!(held(Some("x"), None).await, 0);
    assert_eq!(in_use(&one).await, 2, "task `x` holds its slot");
    // A task found running under an external id that ended is not adopted.
    let adopted = one
        .apply(SlotOp::Adopt {
            key: video(),
            task: TaskRef {
                id: Some("t6".to_owned()),
                external_id: Some("job-6".to_owned()),
            },
            weight: 1,
            lease: LONG,
        })
        .await
        .unwrap();
    assert!(!adopted.changed, "{adopted:?}");
    assert_eq!(in_use(&one).await, 2);
    // A `complete` by task id before the answer still frees that task's create; a create
    // whose external id is the same text is then another task.
    two.apply(complete(&video().account, "t5")).await.unwrap();
    assert_eq!(held(Some("t5"), Some("job-5")).await, 1);
    assert_eq!(in_use(&one).await, 2);
    assert_eq!(held(Some("t8"), Some("t5")).await, 0);
    assert_eq!(in_use(&one).await, 3);
    assert_eq!(one.held_here(), 3);
}

/// A 1102 outlives a restart that loses Redis's state: the processes that knew of it refuse
/// the account's creates from the moment they see the new generation, send it again with their
/// holdings, and a process that never heard of it is refused too once the fleet registered
/// again. Reset, it ends as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_outlives_a_restart_that_loses_redis_state() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 5)
        .await
        .maintain_every(Duration::from_secs(60));
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(SlotOp::Halt {
        reservation: r,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    server.restart().unwrap();
    // Before the owner's next pass: its first ask meets the new generation, and is refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let create = loop {
        match tokio::time::timeout(Duration::from_secs(2), one.acquire(video(), 1)).await {
            Ok(Err(AcquireError::Backend(_))) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other,
        }
    };
    assert!(
        matches!(create, Ok(Err(AcquireError::Halted(_)))),
        "the halt was lost: {create:?}"
    );
    maintained(&one).await;
    maintained(&one).await;
    // A process that never heard of the halt, after the grace: refused by Redis.
    let two = backend(&server, 5).await;
    let create = tokio::time::timeout(Duration::from_secs(5), two.acquire(video(), 1)).await;
    match create {
        Ok(Err(AcquireError::Halted(halted))) => {
            assert_eq!(halted.code(), kling_core::Code::ResourcePackExhausted);
            assert_eq!(halted.request_id(), Some("r-9"));
        }
        other => panic!("the halt was lost: {other:?}"),
    }
    let create = one.acquire(video(), 1).await;
    assert!(matches!(create, Err(AcquireError::Halted(_))), "{create:?}");
    two.apply(SlotOp::ResetHalt(AccountId::new("acct")))
        .await
        .unwrap();
    let granted = one.acquire(video(), 1).await.unwrap();
    one.apply(SlotOp::GiveBack(granted)).await.unwrap();
}

/// A halt another process reset is forgotten at this process's next maintenance pass, though
/// it asked nothing since: a restart after that does not bring the halt back (this process
/// would have sent it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_reset_elsewhere_is_not_sent_again_after_a_restart() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 5)
        .await
        .maintain_every(Duration::from_secs(60));
    let two = backend(&server, 5)
        .await
        .maintain_every(Duration::from_secs(60));
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(SlotOp::Halt {
        reservation: r,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    two.apply(SlotOp::ResetHalt(AccountId::new("acct")))
        .await
        .unwrap();
    maintained(&one).await;
    server.restart().unwrap();
    maintained(&one).await;
    maintained(&one).await;
    maintained(&two).await;
    let create = tokio::time::timeout(Duration::from_secs(5), two.acquire(video(), 1)).await;
    assert!(
        matches!(create, Ok(Ok(_))),
        "the reset halt came back: {create:?}"
    );
    let create = tokio::time::timeout(Duration::from_secs(5), one.acquire(video(), 1)).await;
    assert!(matches!(create, Ok(Ok(_))), "{create:?}");
}

/// A halt another process reset is forgotten at once by a process that knew of it (told on
/// `PREFIX:unhalted`), though its next maintenance pass is a minute away: a restart right after
/// the reset does not bring the halt back. (Before, the gap was one `maintain_every`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_reset_just_before_a_restart_is_not_sent_again() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 5)
        .await
        .maintain_every(Duration::from_secs(60));
    let two = backend(&server, 5)
        .await
        .maintain_every(Duration::from_secs(60));
    let r = one.acquire(video(), 1).await.unwrap();
    let granted = two.acquire(video(), 1).await.unwrap();
    two.apply(SlotOp::GiveBack(granted)).await.unwrap();
    one.apply(SlotOp::Halt {
        reservation: r,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    // Both processes listen for resets.
    crate::support::subscribed(&server, "unhalted", 2).await;
    two.apply(SlotOp::ResetHalt(AccountId::new("acct")))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.restart().unwrap();
    maintained(&one).await;
    maintained(&one).await;
    maintained(&two).await;
    let create = tokio::time::timeout(Duration::from_secs(5), two.acquire(video(), 1)).await;
    assert!(
        matches!(create, Ok(Ok(_))),
        "the reset halt came back: {create:?}"
    );
    let create = tokio::time::timeout(Duration::from_secs(5), one.acquire(video(), 1)).await;
    assert!(matches!(create, Ok(Ok(_))), "{create:?}");
}

/// A halt a process sends again after a restart that lost Redis's state does not undo a reset
/// another process made after the halt, in the new generation, before it came: the halt is
/// sent with when it was made, and Redis drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_sent_again_after_a_restart_does_not_undo_a_later_reset() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 5).await;
    // Only this test's passes send the halt again.
    kling_redis::testing::hold_maintenance(&one, true);
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(SlotOp::Halt {
        reservation: r,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    server.restart().unwrap();
    // Later than the halt by more than the processes' clocks may differ.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let two = backend(&server, 5).await;
    two.apply(SlotOp::ResetHalt(AccountId::new("acct")))
        .await
        .unwrap();
    maintained(&one).await;
    maintained(&one).await;
    assert_eq!(one.pending(), 0);
    for backend in [&two, &one] {
        let create =
            tokio::time::timeout(Duration::from_secs(5), backend.acquire(video(), 1)).await;
        assert!(
            matches!(create, Ok(Ok(_))),
            "the reset halt came back: {create:?}"
        );
    }
}

/// `learner` learns a halt `one` met (by `learn`), `one` goes, Redis restarts and loses its
/// state, and another process resets the halt: `learner`, sending again the halt it knows,
/// must not undo that reset. Whether a create of the account is granted then, in the process
/// that reset it and in `learner`.
async fn a_learnt_halt_sent_again_after_a_restart(by_broadcast: bool) -> [bool; 2] {
    let mut server = redis().expect("checked by the caller");
    let one = backend(&server, 5).await;
    let learner = backend(&server, 5).await;
    // Only this test's passes send the halt again.
    kling_redis::testing::hold_maintenance(&learner, true);
    if by_broadcast {
        // Subscribed (on first use) before the halt.
        let r = learner.acquire(video(), 1).await.unwrap();
        learner.apply(SlotOp::GiveBack(r)).await.unwrap();
        crate::support::subscribed(&server, "halted", 1).await;
    }
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(SlotOp::Halt {
        reservation: r,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    // The process that met it is gone: only `learner` knows of it.
    drop(one);
    let halts = learner.create_halts().unwrap();
    if by_broadcast {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while halts.stamp() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "not broadcast");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // (When it was made is read right after: a round trip.)
        tokio::time::sleep(Duration::from_millis(200)).await;
    } else {
        let create = learner.acquire(video(), 1).await;
        assert!(matches!(create, Err(AcquireError::Halted(_))), "{create:?}");
        assert_eq!(halts.stamp(), 1, "learnt at the ask");
    }
    server.restart().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let two = backend(&server, 5).await;
    two.apply(SlotOp::ResetHalt(AccountId::new("acct")))
        .await
        .unwrap();
    maintained(&learner).await;
    maintained(&learner).await;
    assert_eq!(learner.pending(), 0);
    let mut granted = [false; 2];
    for (i, backend) in [&two, &learner].into_iter().enumerate() {
        let create =
            tokio::time::timeout(Duration::from_secs(2), backend.acquire(video(), 1)).await;
        granted[i] = matches!(create, Ok(Ok(_)));
    }
    granted
}

/// A halt this process learnt from Redis at an ask (another process's 1102, read back) is
/// sent again after a restart with the time Redis had for it: a reset made after it in the
/// new generation stays. It was sent with none, and halted the account again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_learnt_at_an_ask_sent_again_after_a_restart_does_not_undo_a_later_reset() {
    if redis().is_none() {
        return;
    }
    let granted = a_learnt_halt_sent_again_after_a_restart(false).await;
    assert_eq!(granted, [true, true], "the reset halt came back");
}

/// The same for a halt learnt from its broadcast (`PREFIX:halted`): when it was made is read
/// with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_learnt_from_its_broadcast_sent_again_after_a_restart_does_not_undo_a_later_reset() {
    if redis().is_none() {
        return;
    }
    let granted = a_learnt_halt_sent_again_after_a_restart(true).await;
    assert_eq!(granted, [true, true], "the reset halt came back");
}

/// A create whose ask is the first script to meet a store that lost its state (emptied, as a
/// restart without persistence leaves it, on a connection that stayed up) is refused when
/// this process knew of a halt: the answer, without the halt, tells of a new generation, not
/// of a reset. The halt is sent again, and refuses the fleet's creates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ask_that_first_meets_a_lost_state_is_refused_under_a_halt() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 5)
        .await
        .maintain_every(Duration::from_secs(60));
    let r = one.acquire(video(), 1).await.unwrap();
    one.apply(SlotOp::Halt {
        reservation: r,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut crate::support::raw(&server).await)
        .await
        .unwrap();
    let create = tokio::time::timeout(Duration::from_secs(2), one.acquire(video(), 1)).await;
    assert!(
        matches!(create, Ok(Err(AcquireError::Halted(_)))),
        "the halt was lost: {create:?}"
    );
    maintained(&one).await;
    let two = backend(&server, 5).await;
    let create = tokio::time::timeout(Duration::from_secs(2), two.acquire(video(), 1)).await;
    assert!(
        matches!(create, Ok(Err(AcquireError::Halted(_)))),
        "the halt was lost: {create:?}"
    );
}

/// A report of `account`'s task `id` carrying its external id `ext`, ended with `status` or
/// running (`None`: `complete`, which carries no external id).
fn report_in(
    account: &AccountId,
    id: &str,
    ext: Option<&str>,
    status: Option<TaskStatus>,
) -> SlotOp {
    SlotOp::Update {
        account: account.clone(),
        updates: vec![TaskUpdate {
            id: id.to_owned(),
            external_id: ext.map(str::to_owned),
            status,
        }],
        lease: LONG,
    }
}

/// Acquires a slot in `backend` and holds it for the create answered with `id` (`None`: its
/// outcome unknown) carrying `ext`; the slots the hold released.
async fn create_held(backend: &RedisSlots, id: Option<&str>, ext: Option<&str>) -> usize {
    let reservation = backend.acquire(video(), 1).await.unwrap();
    let applied = backend
        .apply(SlotOp::Hold {
            reservation,
            task: TaskRef {
                id: id.map(str::to_owned),
                external_id: ext.map(str::to_owned),
            },
            lease: LONG,
        })
        .await
        .unwrap();
    applied.released.len()
}

/// A lookup by external id that finds nothing (a legacy query on another create path, or a
/// new-style lookup the server has not indexed yet) says nothing of a task whose create was
/// answered with its task id: the task exists, and its slot stays held, in Redis and in the
/// owner's record. Only a create of unknown outcome (no task id) is given back on such an
/// answer. (As kling-concurrency's
/// `a_lookup_finding_nothing_keeps_a_task_whose_create_was_answered`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_finding_nothing_keeps_a_task_whose_create_was_answered() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 3).await;
    let two = backend(&server, 3).await;
    assert_eq!(create_held(&one, Some("t1"), Some("job-1")).await, 0);
    assert_eq!(create_held(&one, None, Some("job-2")).await, 0);
    assert_eq!(in_use(&one).await, 2);

    let kept = two.apply(absent("job-1")).await.unwrap();
    assert!(kept.released.is_empty(), "{kept:?}");
    let gone = two.apply(absent("job-2")).await.unwrap();
    assert_eq!(gone.released.len(), 1, "{gone:?}");
    assert_eq!(in_use(&one).await, 1, "the answered task stays");
    // Nor does a lookup finding nothing in the owner, nor a running report by external id
    // alone, change it; its own end still frees it.
    let kept = one.apply(absent("job-1")).await.unwrap();
    assert!(kept.released.is_empty(), "{kept:?}");
    assert_eq!(in_use(&one).await, 1);
    let ended = two
        .apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(ended.released.len(), 1, "{ended:?}");
    assert_eq!(in_use(&one).await, 0);

    // The owner's record, used while Redis is away, applies the same rule.
    assert_eq!(create_held(&one, Some("t3"), Some("job-3")).await, 0);
    maintained(&one).await;
    server.stop();
    let kept = one.apply(absent("job-3")).await.unwrap();
    assert!(kept.released.is_empty(), "{kept:?}");
    assert_eq!(one.held_here(), 1);
}

/// A create under an external id that a task known by its id already carries (the caller
/// reused it while that task runs, or the server made a second task) does not give that
/// task's slot back, in Redis or in the process's record; a holding of unknown outcome under
/// that external id is still replaced (the same create sent again). (As kling-concurrency's
/// `a_create_reusing_a_running_tasks_external_id_does_not_free_its_slot`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_reusing_a_running_tasks_external_id_does_not_free_its_slot() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 3).await;
    let two = backend(&server, 3).await;
    create_held(&one, Some("t1"), Some("job-1")).await;
    create_held(&one, Some("t2"), Some("job-1")).await;
    assert_eq!(in_use(&one).await, 2, "two tasks run");
    assert_eq!(one.held_here(), 2);
    // Its outcome unknown: it may have made a third.
    create_held(&one, None, Some("job-1")).await;
    assert_eq!(in_use(&one).await, 3);
    assert_eq!(one.held_here(), 3);
    for id in ["t1", "t2"] {
        let applied = two.apply(ended(id, None)).await.unwrap();
        assert_eq!(applied.released.len(), 1, "{id} held: {applied:?}");
    }
    assert_eq!(in_use(&one).await, 1);
    // Sent again, a create of unknown outcome replaces its earlier holding.
    create_held(&one, Some("t3"), Some("job-1")).await;
    assert_eq!(in_use(&one).await, 1);
    maintained(&one).await;
    assert_eq!(one.held_here(), 1);
}

/// A callback of another process overtakes the answer of the create that made its task, and
/// that answer is then lost: the create is kept under its external id only, and the end the
/// callback reported, with that external id, frees it at once, not at its lease. The end is
/// then spent: a later create under the same external id holds its slot. (As
/// kling-concurrency's `an_end_reported_before_a_create_whose_answer_is_then_lost_frees_its_slot`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_reported_before_a_create_whose_answer_is_then_lost_frees_its_slot() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 2).await;
    let two = backend(&server, 2).await;
    let account = video().account;
    let callback = report_in(&account, "t1", Some("job-1"), Some(TaskStatus::Succeeded));
    let applied = two.apply(callback).await.unwrap();
    assert!(applied.released.is_empty(), "{applied:?}");
    assert_eq!(create_held(&one, None, Some("job-1")).await, 1);
    assert_eq!(in_use(&one).await, 0, "the task it may have made has ended");
    // Another account's create under the same external id is another task.
    let other = SlotKey::new(AccountId::new("b"), Pool::new(Product::Video));
    let r = one.acquire(other, 1).await.unwrap();
    let applied = one.apply(hold_unknown(r, "job-1")).await.unwrap();
    assert!(applied.released.is_empty(), "{applied:?}");
    assert_eq!(in_use(&one).await, 1);

    // Spent: a later create under the same external id (sent again after a lookup found
    // nothing, or a new job reusing it) holds its slot.
    assert_eq!(create_held(&one, Some("t2"), Some("job-1")).await, 0);
    assert_eq!(in_use(&one).await, 2);
    // The task id's note is kept: the task's own create, answered late, is freed.
    assert_eq!(create_held(&one, Some("t1"), None).await, 1);
    assert_eq!(in_use(&one).await, 2);
}

/// An end under an external id frees one create and is forgotten: `complete` by external id
/// before the create's answer, a callback naming the task and its external id before the
/// answer (its external id's note goes with the task id's), and `complete` by external id of
/// a create held under it. A later create reusing the external id keeps its slot each time.
/// (As kling-concurrency's `an_early_complete_by_external_id_frees_one_create_only` and
/// `an_end_reported_before_the_answer_frees_that_create_only`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_under_an_external_id_frees_one_create_only() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 3).await;
    let two = backend(&server, 3).await;
    let account = video().account;

    let applied = two.apply(ended("job-1", None)).await.unwrap();
    assert!(applied.released.is_empty(), "{applied:?}");
    assert_eq!(create_held(&one, Some("t1"), Some("job-1")).await, 1);
    assert_eq!(create_held(&one, Some("t2"), Some("job-1")).await, 0);
    assert_eq!(
        in_use(&one).await,
        1,
        "a new task under a reused external id"
    );

    let callback = report_in(&account, "t4", Some("job-4"), Some(TaskStatus::Failed));
    two.apply(callback).await.unwrap();
    assert_eq!(create_held(&one, Some("t4"), Some("job-4")).await, 1);
    assert_eq!(create_held(&one, None, Some("job-4")).await, 0);
    assert_eq!(
        in_use(&one).await,
        2,
        "a new create under a reused external id"
    );

    assert_eq!(create_held(&one, None, Some("job-5")).await, 0);
    let applied = two.apply(ended("job-5", None)).await.unwrap();
    assert_eq!(applied.released.len(), 1, "{applied:?}");
    assert_eq!(create_held(&one, Some("t6"), Some("job-5")).await, 0);
    assert_eq!(in_use(&one).await, 3);
}

/// `complete` by the external id of a holding whose task id is known (its create was
/// answered) notes that task id ended too: a reconcile whose list the server answered before
/// that end (naming the task running) adopts nothing for it, by its task id with or without
/// its external id, as kling-concurrency's in-process backend. The external id is still not
/// filed: a create reusing it keeps its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_by_external_id_ends_the_holdings_task_id_for_a_stale_list() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 3).await;
    let two = backend(&server, 3).await;
    assert_eq!(create_held(&one, Some("t1"), Some("job-1")).await, 0);
    let applied = two.apply(ended("job-1", None)).await.unwrap();
    assert_eq!(applied.released.len(), 1, "{applied:?}");
    for ext in [Some("job-1"), None] {
        let stale = SlotOp::Adopt {
            key: video(),
            task: TaskRef {
                id: Some("t1".to_owned()),
                external_id: ext.map(str::to_owned),
            },
            weight: 1,
            lease: LONG,
        };
        let adopted = one.apply(stale).await.unwrap();
        assert!(!adopted.changed, "adopted with {ext:?}: {adopted:?}");
    }
    assert_eq!(in_use(&one).await, 0);
    assert_eq!(create_held(&one, Some("t2"), Some("job-1")).await, 0);
    assert_eq!(
        in_use(&one).await,
        1,
        "a new create under a reused external id"
    );
}

/// `complete` by the external id of a held task, then Redis comes back from a snapshot taken
/// after it, before the owner's next pass: the owner registers the task again, finds its task
/// id noted ended, and gives its slot back, without counting the end a second time.
#[tokio::test]
async fn a_complete_by_external_id_is_counted_once_when_redis_comes_back_older() {
    let Some(mut server) = redis() else { return };
    let recording = recording();
    let one = backend(&server, 2)
        .await
        .maintain_every(Duration::from_secs(60));
    let two = backend(&server, 2)
        .await
        .maintain_every(Duration::from_secs(60));
    assert_eq!(create_held(&one, Some("t1"), Some("job-1")).await, 0);
    let applied = two.apply(ended("job-1", None)).await.unwrap();
    assert_eq!(applied.released.len(), 1, "{applied:?}");
    assert_eq!(finished(&recording), (1, 1));
    server.save().unwrap();
    assert_eq!(one.held_here(), 1);
    server.restart_from_snapshot().unwrap();
    maintained(&two).await;
    maintained(&two).await;
    maintained(&one).await;
    maintained(&one).await;
    assert_eq!(one.held_here(), 0);
    assert_eq!(in_use(&one).await, 0);
    assert_eq!(finished(&recording), (0, 0), "the end was counted again");
}

/// A create's hold that timed out after Redis ran it is replayed at the next maintenance pass;
/// when the create's end was reported meanwhile by its external id (which no longer leaves a
/// note that would free a later create under it), the replay does not bring it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_replayed_after_its_task_ended_by_external_id_holds_nothing() {
    let Some(server) = redis() else { return };
    let impatient =
        crate::support::connect_with_timeout(server.url(), Duration::from_millis(200)).await;
    let one = RedisSlots::new(impatient, SlotsConfig::new(3))
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_secs(60))
        .grace(Duration::from_millis(300));
    // Only this test's passes replay: a pass a subscription or a reconnect woke would
    // take a kept change off the queue while the test counts it.
    kling_redis::testing::hold_maintenance(&one, true);
    let two = backend(&server, 3).await;
    for (id, ext) in [(None, "job-1"), (Some("t2"), "job-2")] {
        let r = one.acquire(video(), 1).await.unwrap();
        crate::support::client_pause(&server, 600).await;
        let task = TaskRef {
            id: id.map(str::to_owned),
            external_id: Some(ext.to_owned()),
        };
        let hold = SlotOp::Hold {
            reservation: r,
            task,
            lease: LONG,
        };
        one.apply(hold).await.unwrap();
        assert_eq!(one.pending(), 1, "the hold reached redis in time");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let applied = two.apply(ended(ext, None)).await.unwrap();
            if !applied.released.is_empty() {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the hold never ran");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(in_use(&two).await, 0);
        maintained(&one).await;
        assert_eq!(one.pending(), 0);
        assert_eq!(in_use(&two).await, 0, "{ext}'s create is not held again");
        assert_eq!(one.held_here(), 0);
    }
}

/// Redis's fleet time now, in µs (the scripts' `now`, to within a round trip).
async fn redis_now_us(server: &kling_redis::testing::RedisServer) -> i64 {
    let (secs, micros): (i64, i64) = redis::cmd("TIME")
        .query_async(&mut crate::support::raw(server).await)
        .await
        .unwrap();
    secs * 1_000_000 + micros
}

/// Whether `member` is in `test:ended` (the prefix is `test`, `support::connect`).
async fn in_ended(server: &kling_redis::testing::RedisServer, member: &str) -> bool {
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg("test:ended")
        .arg(member)
        .query_async(&mut crate::support::raw(server).await)
        .await
        .unwrap();
    score.is_some()
}

async fn ended_entries(server: &kling_redis::testing::RedisServer) -> usize {
    redis::cmd("ZCARD")
        .arg("test:ended")
        .query_async(&mut crate::support::raw(server).await)
        .await
        .unwrap()
}

/// `PREFIX:ended` is bounded by count too, not only by age: a burst of ends that find no
/// holding (callbacks for another client's tasks, each filed under its task id and its
/// external id, three entries) evicts the oldest entries, and never the ones it files; an end
/// reported again is renewed in place and evicts nothing; the notes left still free their
/// creates. An evicted `complete` pair takes its task id's note with it (its external id's,
/// left alone, frees one create), as the in-process backend forgets the task id's twin first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ends_redis_keeps_are_bounded_by_count_the_oldest_evicted_first() {
    let Some(server) = redis() else { return };
    let kept = kling_redis::testing::ENDED_KEPT;
    let one = backend(&server, 2).await;
    let two = backend(&server, 2).await;
    let account = video().account;
    // Older than any note filed now (30 minutes): a `complete` told before any holding had its
    // text (`i:`, `x:`, `e:`, the external id's field `LEN.ACCOUNT` then the id), the oldest,
    // then plain task ids, each younger than the last.
    let base = redis_now_us(&server).await + 600_000_000;
    let mut zadd = redis::cmd("ZADD");
    zadd.arg("test:ended");
    for member in ["e:4.acctjob-e", "i:job-e", "x:4.acctjob-e"] {
        zadd.arg(base).arg(member);
    }
    for k in 0..kept - 6 {
        zadd.arg(base + 1 + k as i64).arg(format!("i:old-{k}"));
    }
    let _: () = zadd
        .query_async(&mut crate::support::raw(&server).await)
        .await
        .unwrap();
    let callback = |n: &str| {
        report_in(
            &account,
            &format!("t-{n}"),
            Some(&format!("job-{n}")),
            Some(TaskStatus::Succeeded),
        )
    };
    // An early end that matters, filed while there is room.
    two.apply(callback("0")).await.unwrap();
    assert_eq!(ended_entries(&server).await, kept);

    // One more entry evicts the oldest: the `complete` pair's `e:`, and its task id's note.
    two.apply(ended("t-x", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert!(!in_ended(&server, "e:4.acctjob-e").await);
    assert!(!in_ended(&server, "i:job-e").await, "the twin stayed");
    assert!(in_ended(&server, "x:4.acctjob-e").await);
    assert_eq!(ended_entries(&server).await, kept - 1);

    // A burst of 50 ends for tasks the fleet never held: 150 entries, 149 evicted.
    for n in 0..50 {
        let applied = two.apply(callback(&format!("b{n}"))).await.unwrap();
        assert!(applied.released.is_empty(), "{applied:?}");
    }
    assert_eq!(ended_entries(&server).await, kept, "bounded by count");
    assert!(!in_ended(&server, "x:4.acctjob-e").await);
    assert!(!in_ended(&server, "i:old-147").await, "the oldest go first");
    assert!(
        in_ended(&server, "i:old-148").await,
        "only as many as needed go"
    );
    // Sent again (a callback delivered twice): renewed in place, nothing evicted.
    two.apply(callback("b49")).await.unwrap();
    assert_eq!(ended_entries(&server).await, kept);
    assert!(
        in_ended(&server, "i:old-148").await,
        "a re-sent end took room"
    );

    // The notes kept still free the creates they name: the early end, and the burst's last.
    assert_eq!(create_held(&one, None, Some("job-0")).await, 1);
    assert_eq!(create_held(&one, None, Some("job-b49")).await, 1);
    assert_eq!(in_use(&one).await, 0);

    // The ids of the changes Redis ran (each end of one task has one) are bounded alike.
    let mut zadd = redis::cmd("ZADD");
    zadd.arg("test:done");
    for k in 0..kept {
        zadd.arg(base + k as i64).arg(format!("old#{k}"));
    }
    let _: () = zadd
        .query_async(&mut crate::support::raw(&server).await)
        .await
        .unwrap();
    two.apply(callback("c")).await.unwrap();
    let (done, oldest): (usize, Option<f64>) = redis::pipe()
        .cmd("ZCARD")
        .arg("test:done")
        .cmd("ZSCORE")
        .arg("test:done")
        .arg("old#0")
        .query_async(&mut crate::support::raw(&server).await)
        .await
        .unwrap();
    assert_eq!((done, oldest), (kept, None));
}

/// A list page (or any report of several tasks) reports many tasks long released: an end in
/// it that finds no holding is not noted (it would push the ends that matter out of the
/// bounded `PREFIX:ended`), as in the in-process backend; one that finds its holding still
/// releases it. A report of one task still notes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_report_of_one_task_notes_an_end_that_finds_no_holding() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 3).await;
    let two = backend(&server, 3).await;
    let account = video().account;
    assert_eq!(create_held(&one, Some("t-held"), None).await, 0);
    let page = SlotOp::Update {
        account: account.clone(),
        updates: ["t-held", "t-gone-1", "t-gone-2"]
            .into_iter()
            .enumerate()
            .map(|(n, id)| TaskUpdate {
                id: id.to_owned(),
                external_id: Some(format!("job-gone-{n}")),
                status: Some(TaskStatus::Succeeded),
            })
            .collect(),
        lease: LONG,
    };
    let applied = two.apply(page).await.unwrap();
    assert_eq!(applied.released.len(), 1, "{applied:?}");
    for member in ["i:t-gone-1", "z:4.acctjob-gone-1", "i:t-gone-2"] {
        assert!(!in_ended(&server, member).await, "{member} noted");
    }
    // A create under a listed external id holds its slot.
    assert_eq!(create_held(&one, None, Some("job-gone-1")).await, 0);
    assert_eq!(in_use(&one).await, 1);
    // One task's report is noted, and frees its create.
    let callback = report_in(&account, "t-3", Some("job-3"), Some(TaskStatus::Failed));
    two.apply(callback).await.unwrap();
    assert_eq!(create_held(&one, None, Some("job-3")).await, 1);
    assert_eq!(in_use(&one).await, 1);
}

/// How long the replay tests below pause Redis (`CLIENT PAUSE`): a change sent in the pause
/// must time out (200 ms) before the pause ends. 600 ms left too little margin under a cold
/// CI build's load: once a thread slept past the pause and the change was answered, not kept.
const PAUSE_MS: u64 = 2000;

/// `complete` by external id, and a callback naming a task and its external id, whose
/// change timed out after Redis ran it (Redis paused by `CLIENT PAUSE` for 600 ms, commands
/// giving up after 200 ms) are kept and replayed. Redis ran each (the create held under that
/// external id was freed), so the replay, which would find no holding and file a fresh note
/// under the external id, is skipped: a later create reusing the external id keeps its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_replayed_after_redis_ran_it_files_no_fresh_note() {
    let Some(server) = redis() else { return };
    let impatient =
        crate::support::connect_with_timeout(server.url(), Duration::from_millis(200)).await;
    let one = RedisSlots::new(impatient, SlotsConfig::new(3))
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_secs(60))
        .grace(Duration::from_millis(300));
    // Only this test's passes replay: a pass a subscription or a reconnect woke would
    // take a kept change off the queue while the test counts it.
    kling_redis::testing::hold_maintenance(&one, true);
    let two = backend(&server, 3).await;
    let account = video().account;
    let reports = [
        ("job-1", ended("job-1", None)),
        (
            "job-2",
            report_in(&account, "t2", Some("job-2"), Some(TaskStatus::Succeeded)),
        ),
    ];
    for (ext, report) in reports {
        assert_eq!(create_held(&two, None, Some(ext)).await, 0);
        assert_eq!(in_use(&two).await, 1);
        crate::support::client_pause(&server, PAUSE_MS).await;
        one.apply(report).await.unwrap();
        assert_eq!(one.pending(), 1, "the report reached redis in time");
        // Redis runs it when the pause ends.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while in_use(&two).await != 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the report never ran"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        maintained(&one).await;
        assert_eq!(one.pending(), 0);
        // A new job reusing the external id holds its slot.
        assert_eq!(
            create_held(&two, Some(&format!("t-{ext}")), Some(ext)).await,
            0
        );
        assert_eq!(
            in_use(&two).await,
            1,
            "{ext}: a replayed end freed a later create"
        );
        let applied = two
            .apply(ended(&format!("t-{ext}"), Some(TaskStatus::Succeeded)))
            .await
            .unwrap();
        assert_eq!(applied.released.len(), 1, "{applied:?}");
    }
}

/// A 1303 whose change timed out after Redis ran it (Redis paused by `CLIENT PAUSE`) is kept
/// and replayed. Redis ran it (one slot hidden); a task ended since brought the slot back. The
/// replay is skipped: it would hide the slot again from the fleet and start the recovery
/// anew, as a second 1303 would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1303_replayed_after_redis_ran_it_does_not_hide_slots_again() {
    let Some(server) = redis() else { return };
    let impatient =
        crate::support::connect_with_timeout(server.url(), Duration::from_millis(200)).await;
    let one = RedisSlots::new(impatient, SlotsConfig::new(3))
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_secs(60))
        .grace(Duration::from_millis(300));
    // Only this test's passes replay: a pass a subscription or a reconnect woke would
    // take a kept change off the queue while the test counts it.
    kling_redis::testing::hold_maintenance(&one, true);
    let two = backend(&server, 3).await;
    for id in ["t1", "t2"] {
        let r = two.acquire(video(), 1).await.unwrap();
        two.apply(hold(r, id, LONG)).await.unwrap();
    }
    let r = one.acquire(video(), 1).await.unwrap();
    crate::support::client_pause(&server, PAUSE_MS).await;
    one.apply(SlotOp::Congested(r)).await.unwrap();
    assert_eq!(one.pending(), 1, "the 1303 reached redis in time");
    // Redis runs it when the pause ends: the fleet holds 2, and believes the pool holds 2.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while in_use_and_capacity(&two).await != (2, 2) {
        assert!(tokio::time::Instant::now() < deadline, "the 1303 never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A task ends: the hidden slot comes back with it.
    two.apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(in_use_and_capacity(&two).await, (1, 3));
    maintained(&one).await;
    assert_eq!(one.pending(), 0);
    assert_eq!(
        in_use_and_capacity(&two).await,
        (1, 3),
        "the replayed 1303 hid slots again"
    );
}

/// A task's end, and a create's hold that finds its task ended, whose change timed out after
/// Redis ran it (Redis paused by `CLIENT PAUSE`): the release Redis made went to the lost
/// answer. The replay is skipped and answers with that release, so the replaying process
/// counts the end, once (before, the replay found the task released and nobody counted it).
#[tokio::test]
async fn an_end_whose_answer_was_lost_after_redis_ran_it_is_counted_once() {
    let Some(server) = redis() else { return };
    let recording = recording();
    let impatient =
        crate::support::connect_with_timeout(server.url(), Duration::from_millis(200)).await;
    let one = RedisSlots::new(impatient, SlotsConfig::new(3))
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_secs(60))
        .grace(Duration::from_millis(300));
    // Only this test's passes replay: a pass a subscription or a reconnect woke would
    // take a kept change off the queue while the test counts it.
    kling_redis::testing::hold_maintenance(&one, true);
    let two = backend(&server, 3)
        .await
        .maintain_every(Duration::from_secs(60));
    let until_idle = |what: &'static str| {
        let two = two.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while in_use(&two).await != 0 {
                assert!(tokio::time::Instant::now() < deadline, "{what} never ran");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    // A report.
    let r = two.acquire(video(), 1).await.unwrap();
    two.apply(hold(r, "t1", LONG)).await.unwrap();
    crate::support::client_pause(&server, PAUSE_MS).await;
    one.apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(one.pending(), 1, "the report reached redis in time");
    until_idle("the report").await;
    maintained(&one).await;
    assert_eq!(one.pending(), 0);
    assert_eq!(finished(&recording), (1, 1), "the report's end");

    // A hold of a task whose end a callback reported first.
    let callback = ended("t2", Some(TaskStatus::Succeeded));
    assert!(two.apply(callback).await.unwrap().released.is_empty());
    let r = one.acquire(video(), 1).await.unwrap();
    crate::support::client_pause(&server, PAUSE_MS).await;
    one.apply(hold(r, "t2", LONG)).await.unwrap();
    assert_eq!(one.pending(), 1, "the hold reached redis in time");
    until_idle("the hold").await;
    maintained(&one).await;
    assert_eq!(one.pending(), 0);
    assert_eq!(one.held_here(), 0);
    assert_eq!(finished(&recording), (1, 1), "the hold's end");
}

/// A task a reconcile adopted before its create's answer came (the server's list named it
/// first), which then ended before that answer came, holds no slot once the answer comes,
/// however its end was told: a callback (a report of one task), a list page (a report of many,
/// whose ends that find no holding are not noted) or `complete`. As kling-concurrency's
/// `leaks::an_adopted_task_ended_before_its_creates_answer_holds_no_slot`: the end of the
/// adopted holding is noted in `P:ended` by its task id like every end that frees a holding,
/// and the create's hold finds it there and gives its grant back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_task_ended_before_its_creates_answer_holds_no_slot() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 2).await;
    let two = backend(&server, 2).await;
    let list_page = |id: &str| SlotOp::Update {
        account: video().account,
        updates: vec![
            TaskUpdate {
                id: id.to_owned(),
                external_id: None,
                status: Some(TaskStatus::Failed),
            },
            TaskUpdate {
                id: "other".to_owned(),
                external_id: None,
                status: Some(TaskStatus::Succeeded),
            },
        ],
        lease: LONG,
    };
    let ends: [(&str, SlotOp); 3] = [
        ("t1", ended("t1", Some(TaskStatus::Failed))),
        ("t2", list_page("t2")),
        ("t3", ended("t3", None)),
    ];
    for (id, end) in ends {
        // The create is granted, and sent; the server makes the task.
        let granted = one.acquire(video(), 1).await.unwrap();
        // A reconcile's list names the task running before the create's answer comes.
        let adopt = SlotOp::Adopt {
            key: video(),
            task: TaskRef {
                id: Some(id.to_owned()),
                external_id: None,
            },
            weight: 1,
            lease: LONG,
        };
        assert!(one.apply(adopt).await.unwrap().changed, "{id} adopted");
        assert_eq!(
            in_use(&one).await,
            2,
            "{id}: the grant, and the adopted task"
        );
        // The task ends at once, told to another process: its adopted holding is freed.
        let freed = two.apply(end).await.unwrap();
        assert_eq!(freed.released.len(), 1, "{id}: {freed:?}");
        assert_eq!(in_use(&one).await, 1, "{id}: the grant only");
        // The create's answer comes, naming the task, which has ended.
        let kept = one.apply(hold(granted, id, LONG)).await.unwrap();
        assert_eq!(kept.released.len(), 1, "{id}: {kept:?}");
        assert_eq!(in_use(&one).await, 0, "{id} ended: nothing held for it");
        assert_eq!(one.held_here(), 0, "{id}");
    }
}

/// The reconcile's adoption of `t1` (external id `job-9`), found running by its list.
fn adopt_t1_job_9() -> SlotOp {
    SlotOp::Adopt {
        key: video(),
        task: TaskRef {
            id: Some("t1".to_owned()),
            external_id: Some("job-9".to_owned()),
        },
        weight: 1,
        lease: LONG,
    }
}

/// A reconcile adopts `t1` (external id `job-9`) in `one` while its create is on its way: the
/// grant, and the adopted task. Its create's answer is then lost (a `5000`): what the grant
/// holds is kept under `job-9` alone. `ended_first`: `t1` ends before that, its callback
/// (carrying `job-9`) told to `two`. The slots the create's hold released.
async fn adopted_then_answer_lost(one: &RedisSlots, two: &RedisSlots, ended_first: bool) -> usize {
    let granted = one.acquire(video(), 1).await.unwrap();
    assert!(
        one.apply(adopt_t1_job_9()).await.unwrap().changed,
        "adopted"
    );
    assert_eq!(in_use(one).await, 2, "the grant, and t1 adopted");
    if ended_first {
        let callback = report_in(
            &video().account,
            "t1",
            Some("job-9"),
            Some(TaskStatus::Succeeded),
        );
        let freed = two.apply(callback).await.unwrap();
        assert_eq!(freed.released.len(), 1, "{freed:?}");
        assert_eq!(in_use(one).await, 1, "the grant only");
    }
    let applied = one.apply(hold_unknown(granted, "job-9")).await.unwrap();
    applied.released.len()
}

/// A task a reconcile adopted while its create was on its way, whose create's answer was then
/// lost: the create's slot, kept under its external id alone, is the adopted task's, and the
/// task's end told by its task id alone frees it, not its lease. (As kling-concurrency's
/// `leaks::a_creates_lost_answer_after_its_task_was_adopted_holds_one_slot_freed_by_its_end`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creates_lost_answer_after_its_task_was_adopted_holds_one_slot_freed_by_its_end() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 3).await;
    let two = backend(&server, 3).await;
    adopted_then_answer_lost(&one, &two, false).await;
    assert_eq!(in_use(&one).await, 1, "one task, one slot");
    assert_eq!(one.held_here(), 1, "and so in the owner's record");
    // The retry layer's lookup by external id finds t1 running; then t1 ends, its callback
    // naming its task id only.
    let running = report_in(
        &video().account,
        "t1",
        Some("job-9"),
        Some(TaskStatus::Processing),
    );
    one.apply(running).await.unwrap();
    assert_eq!(in_use(&one).await, 1);
    let end = two
        .apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(end.released.len(), 1, "{end:?}");
    assert_eq!(in_use(&one).await, 0, "t1 ended: nothing held for it");
    maintained(&one).await;
    assert_eq!(one.held_here(), 0);
}

/// The same, with the adopted task's end (reported with its external id) coming before the
/// create's lost answer: the create's hold finds that end under the external id and gives its
/// grant back. (As kling-concurrency's
/// `leaks::an_adopted_tasks_end_frees_its_creates_slot_kept_later_under_its_external_id`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_tasks_end_frees_its_creates_slot_kept_later_under_its_external_id() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 3).await;
    let two = backend(&server, 3).await;
    assert_eq!(adopted_then_answer_lost(&one, &two, true).await, 1);
    assert_eq!(in_use(&one).await, 0, "t1 ended: nothing held for it");
    assert_eq!(one.held_here(), 0);
}

/// The owner's record, used while Redis is away, joins a task a reconcile adopted into one
/// model's pool (`video:kling-3.0`: a list does not say the model) with its lost create of
/// another model's pool of the product, as Redis does (see `paths.rs`'s
/// `a_lost_create_of_another_models_pool_takes_over_its_adopted_task`): one holding, freed by
/// the task's end there. (It kept both, so its share counted the task twice.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owners_record_joins_an_adopted_task_and_its_lost_create_of_another_model() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 5).await;
    // (No pass prunes the adopted holding meanwhile: the hold itself must.)
    kling_redis::testing::hold_maintenance(&one, true);
    let model = |name: &str| SlotKey::new(video().account, Pool::with_model(Product::Video, name));
    let granted = one.acquire(model("kling-2.6"), 1).await.unwrap();
    let adopt = SlotOp::Adopt {
        key: model("kling-3.0"),
        task: TaskRef {
            id: Some("t1".to_owned()),
            external_id: Some("job-9".to_owned()),
        },
        weight: 1,
        lease: LONG,
    };
    assert!(one.apply(adopt).await.unwrap().changed, "adopted");
    one.apply(hold_unknown(granted, "job-9")).await.unwrap();
    assert_eq!(in_use(&one).await, 1, "one task, one slot");
    assert_eq!(one.held_here(), 1, "and so in the owner's record");
    // An image `i8` adopted under `job-8` is no video create's task.
    let image = SlotKey::new(
        video().account,
        Pool::with_model(Product::Image, "kling-v2"),
    );
    let adopt = SlotOp::Adopt {
        key: image,
        task: TaskRef {
            id: Some("i8".to_owned()),
            external_id: Some("job-8".to_owned()),
        },
        weight: 1,
        lease: LONG,
    };
    assert!(one.apply(adopt).await.unwrap().changed, "adopted");
    let granted = one.acquire(model("kling-2.6"), 1).await.unwrap();
    one.apply(hold_unknown(granted, "job-8")).await.unwrap();
    assert_eq!(in_use(&one).await, 3, "t1, i8 and the job-8 create");
    assert_eq!(one.held_here(), 3, "and so in the owner's record");
    server.stop();
    let end = one
        .apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(end.released.len(), 1, "{end:?}");
    assert_eq!(end.released[0].key, model("kling-2.6"));
    assert_eq!(one.held_here(), 2, "i8 and the job-8 create");
}

/// A create whose answer was lost (kept under its external id alone), then a reconcile whose
/// list names its task: the list adopts nothing (the create's holding is the task), and the
/// holding learns the task id the list names, so that `complete` by task id (or a callback
/// without the external id) frees it, in Redis and, while Redis is away, in the owner's record.
/// (As kling-concurrency's
/// `leaks::a_listed_task_of_a_create_of_unknown_outcome_is_freed_by_its_task_id`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_task_of_a_create_of_unknown_outcome_is_freed_by_its_task_id() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 3).await;
    let two = backend(&server, 3).await;
    assert_eq!(create_held(&one, None, Some("job-9")).await, 0);
    let adopted = one.apply(adopt_t1_job_9()).await.unwrap();
    assert!(!adopted.changed, "{adopted:?}");
    assert_eq!(in_use(&one).await, 1, "one task, one slot");
    let end = two.apply(ended("t1", None)).await.unwrap();
    assert_eq!(end.released.len(), 1, "{end:?}");
    assert_eq!(in_use(&one).await, 0, "t1 ended: nothing held for it");
    maintained(&one).await;
    assert_eq!(one.held_here(), 0);

    // The owner's record, used while Redis is away, learns the task id too.
    assert_eq!(create_held(&one, None, Some("job-8")).await, 0);
    let adopt = SlotOp::Adopt {
        key: video(),
        task: TaskRef {
            id: Some("t2".to_owned()),
            external_id: Some("job-8".to_owned()),
        },
        weight: 1,
        lease: LONG,
    };
    assert!(!one.apply(adopt).await.unwrap().changed);
    maintained(&one).await;
    server.stop();
    let end = one.apply(ended("t2", None)).await.unwrap();
    assert_eq!(end.released.len(), 1, "{end:?}");
    assert_eq!(one.held_here(), 0);
}

/// A metrics recorder whose in-use, waiters and capacity gauges and finished-task counter each
/// panic at their next move once armed (a recorder's bug, or one that panics on a label),
/// once, and every one of whose metrics panics on every call while `every` is set. It sums
/// what each metric (by name, over its labels) was moved by.
#[derive(Default)]
struct PanickyRecorder {
    in_use: std::sync::Arc<std::sync::atomic::AtomicBool>,
    waiters: std::sync::Arc<std::sync::atomic::AtomicBool>,
    capacity: std::sync::Arc<std::sync::atomic::AtomicBool>,
    finished: std::sync::Arc<std::sync::atomic::AtomicBool>,
    every: std::sync::Arc<std::sync::atomic::AtomicBool>,
    values: std::sync::Arc<std::sync::Mutex<HashMap<String, f64>>>,
}

impl PanickyRecorder {
    /// What the metric `name` was moved by, summed.
    fn value(&self, name: &str) -> f64 {
        let values = self.values.lock().unwrap();
        values.get(name).copied().unwrap_or_default()
    }

    fn metric(
        &self,
        key: &metrics::Key,
        flag: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> std::sync::Arc<PanickyMetric> {
        std::sync::Arc::new(PanickyMetric {
            once: flag.clone(),
            every: self.every.clone(),
            name: key.name().to_owned(),
            values: self.values.clone(),
        })
    }
}

struct PanickyMetric {
    once: std::sync::Arc<std::sync::atomic::AtomicBool>,
    every: std::sync::Arc<std::sync::atomic::AtomicBool>,
    name: String,
    values: std::sync::Arc<std::sync::Mutex<HashMap<String, f64>>>,
}

impl PanickyMetric {
    fn touch(&self, by: f64) {
        use std::sync::atomic::Ordering;
        let panics = self.once.swap(false, Ordering::SeqCst) || self.every.load(Ordering::SeqCst);
        assert!(!panics, "the metrics recorder panics");
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        *values.entry(self.name.clone()).or_default() += by;
    }
}

impl metrics::GaugeFn for PanickyMetric {
    fn increment(&self, by: f64) {
        self.touch(by);
    }
    fn decrement(&self, by: f64) {
        self.touch(-by);
    }
    fn set(&self, _: f64) {
        self.touch(0.0);
    }
}

impl metrics::CounterFn for PanickyMetric {
    fn increment(&self, by: u64) {
        self.touch(by as f64);
    }
    fn absolute(&self, _: u64) {
        self.touch(0.0);
    }
}

impl metrics::HistogramFn for PanickyMetric {
    fn record(&self, _: f64) {
        self.touch(0.0);
    }
}

impl metrics::Recorder for PanickyRecorder {
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
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let flag = if key.name() == kling_core::metrics::TASKS_FINISHED {
            self.finished.clone()
        } else {
            std::sync::Arc::default()
        };
        metrics::Counter::from_arc(self.metric(key, &flag))
    }
    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        let flag = match key.name() {
            name if name == kling_core::metrics::SLOTS_IN_USE => self.in_use.clone(),
            name if name == kling_core::metrics::SLOTS_WAITERS => self.waiters.clone(),
            name if name == kling_core::metrics::SLOTS_CAPACITY => self.capacity.clone(),
            _ => std::sync::Arc::default(),
        };
        metrics::Gauge::from_arc(self.metric(key, &flag))
    }
    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::from_arc(self.metric(key, &std::sync::Arc::default()))
    }
}

/// Arms `flag`: the metric it is for panics at its next move.
fn arm(flag: &std::sync::atomic::AtomicBool) {
    flag.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Waits (at most 5 s) until `backend` reads `expected` slots in use.
async fn until_in_use(backend: &RedisSlots, expected: u32, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = in_use(backend).await;
        if now == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {now} in use"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A metrics recorder that panics as this process changes its record of held slots (the
/// in-use gauge) loses no change: the change reaches Redis. Before, the gauge moved while the
/// change was prepared, before it was sent: a task's end, a grant given back, never reached
/// Redis, whose slots stayed held for the whole fleet until their lease ran out (30 minutes
/// by default).
#[tokio::test]
async fn a_panicking_in_use_gauge_loses_no_change() {
    use std::panic::{AssertUnwindSafe, catch_unwind};

    let Some(server) = redis() else { return };
    let recorder = PanickyRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let one = backend(&server, 2).await;
    let held = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(held, "t1", LONG)).await.unwrap();
    let granted = one.acquire(video(), 1).await.unwrap();
    assert_eq!(in_use(&one).await, 2);

    // t1's end (a callback, `complete`): its holding leaves the record, the gauge panics.
    arm(&recorder.in_use);
    let end = ended("t1", Some(TaskStatus::Succeeded));
    assert!(catch_unwind(AssertUnwindSafe(|| drop(one.apply(end)))).is_err());
    until_in_use(&one, 1, "t1's end").await;

    // A grant given back (the create made no task).
    arm(&recorder.in_use);
    let back = SlotOp::GiveBack(granted);
    assert!(catch_unwind(AssertUnwindSafe(|| drop(one.apply(back)))).is_err());
    until_in_use(&one, 0, "the grant given back").await;
    assert_eq!(one.held_here(), 0);
}

/// A metrics recorder that panics as the tasks a change released are counted (after Redis
/// ran it) leaves this process's record of held slots right. Before, the count came before
/// the record was updated: a create's hold that Redis found ended (its callback came first)
/// stayed in the record for good (never pruned: not known to be in Redis), counted in
/// `held_here` and the in-use gauge, and in this process's share while Redis is away.
#[tokio::test]
async fn a_panicking_finished_task_counter_leaves_the_record_of_held_slots_right() {
    let Some(server) = redis() else { return };
    let recorder = PanickyRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let one = backend(&server, 2).await;
    // t1's callback comes before its create's answer.
    let callback = one.apply(ended("t1", Some(TaskStatus::Failed))).await;
    assert!(callback.unwrap().released.is_empty());
    let granted = one.acquire(video(), 1).await.unwrap();
    arm(&recorder.finished);
    // The answer: Redis gives the grant back (t1 ended), counted here, which panics.
    let kept = one.apply(hold(granted, "t1", LONG)).await;
    assert!(kept.is_err(), "{kept:?}");
    assert_eq!(in_use(&one).await, 0);
    assert_eq!(one.held_here(), 0, "t1 ended: not held here either");
}

/// A maintenance pass that panics (a metrics recorder, as it prunes a holding another process
/// released) does not end the maintenance: after Redis loses its state, this process
/// registers its slots again. Before, the panic ended the maintenance task for good: no
/// replay after an outage, no registration after a loss, no pruning.
#[tokio::test]
async fn a_panicking_maintenance_pass_does_not_end_the_maintenance() {
    let Some(mut server) = redis() else { return };
    let recorder = PanickyRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let one = backend(&server, 3).await;
    let two = backend(&server, 3).await;
    for id in ["t1", "t2"] {
        let held = one.acquire(video(), 1).await.unwrap();
        one.apply(hold(held, id, LONG)).await.unwrap();
    }
    // The other process sees t1 end; this one prunes it at its next pass, which panics.
    arm(&recorder.in_use);
    let end = two.apply(ended("t1", Some(TaskStatus::Succeeded))).await;
    assert_eq!(end.unwrap().released.len(), 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while recorder.in_use.load(std::sync::atomic::Ordering::SeqCst) || one.held_here() != 1 {
        assert!(tokio::time::Instant::now() < deadline, "t1 never pruned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Redis loses its state: t2 is registered again.
    server.restart().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // (The first scripts after the restart may fail while the connection comes back.)
        let snapshot = one.snapshot().await.unwrap_or_default();
        if snapshot.iter().map(|p| p.in_use).sum::<u32>() == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "t2 never registered again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A metrics recorder that panics as a create joins this process's waiters (the waiters
/// gauge) or leaves them granted loses nothing: no waiter is left counted (snapshots, and
/// `max_queue`, which refuses creates past it), and a grant is given back, not held for
/// nobody until its lease runs out. Before, the waiter was counted first, for good; and a
/// grant's waiter left the count after the grant was handed over, so a panic there dropped it.
#[tokio::test]
async fn a_panicking_waiters_gauge_leaves_no_waiter_and_loses_no_grant() {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::task::{Context, Poll, Waker};

    let Some(server) = redis() else { return };
    let recorder = PanickyRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let one = backend(&server, 1).await;
    let first = one.acquire(video(), 1).await.unwrap();
    let waiters = |one: RedisSlots| async move {
        let snapshot = one.snapshot().await.unwrap();
        snapshot.iter().map(|p| p.waiters).sum::<usize>()
    };

    // Joining: the gauge panics.
    arm(&recorder.waiters);
    let mut joining = one.acquire(video(), 1);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(catch_unwind(AssertUnwindSafe(|| joining.as_mut().poll(&mut cx))).is_err());
    drop(joining);
    assert_eq!(waiters(one.clone()).await, 0, "no waiter left counted");

    // Granted after waiting: the gauge panics as the create leaves the waiters.
    let mut waiting = one.acquire(video(), 1);
    assert!(waiting.as_mut().poll(&mut cx).is_pending());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while waiters(one.clone()).await != 1 {
        assert!(tokio::time::Instant::now() < deadline, "never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    arm(&recorder.waiters);
    one.apply(SlotOp::GiveBack(first)).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match catch_unwind(AssertUnwindSafe(|| waiting.as_mut().poll(&mut cx))) {
            Err(_) => break,
            Ok(Poll::Ready(granted)) => panic!("the gauge never panicked: {granted:?}"),
            Ok(Poll::Pending) => {}
        }
        assert!(tokio::time::Instant::now() < deadline, "never granted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(waiting);
    until_in_use(&one, 0, "the grant given back").await;
    assert_eq!(one.held_here(), 0);
    assert_eq!(waiters(one.clone()).await, 0);
}

/// A metrics recorder that panics as the tasks one answer ended are counted still counts
/// every other one of them. Before, the count stopped at the panic: the tasks after it in the
/// answer (a `/tasks` batch, a list page), released in Redis, were never counted, and no other
/// process counts them.
#[tokio::test]
async fn a_panicking_finished_task_counter_still_counts_the_rest_of_the_answer() {
    let Some(server) = redis() else { return };
    let recorder = PanickyRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let one = backend(&server, 3).await;
    for id in ["t1", "t2", "t3"] {
        let held = one.acquire(video(), 1).await.unwrap();
        one.apply(hold(held, id, LONG)).await.unwrap();
    }
    let batch = SlotOp::Update {
        account: video().account,
        updates: ["t1", "t2", "t3"]
            .map(|id| TaskUpdate {
                id: id.to_owned(),
                external_id: None,
                status: Some(TaskStatus::Succeeded),
            })
            .to_vec(),
        lease: LONG,
    };
    arm(&recorder.finished);
    let ended = one.apply(batch).await;
    assert!(ended.is_err(), "the recorder panicked: {ended:?}");
    assert_eq!(in_use(&one).await, 0, "all three released");
    assert_eq!(one.held_here(), 0);
    assert_eq!(
        recorder.value(kling_core::metrics::TASKS_FINISHED),
        2.0,
        "the two after the panic counted"
    );
}

/// A pool whose capacity gauge panics as this process first meets the pool (a create's
/// first poll) takes nothing out of the gauge that it did not add. Before, the pool's gauges
/// were dropped as the panic unwound, and their drop took the capacity out though it was
/// never added: the gauge showed the pool's capacity too little for good.
#[tokio::test]
async fn a_capacity_gauge_panicking_as_a_pool_is_met_is_not_taken_out() {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::task::{Context, Waker};

    let Some(server) = redis() else { return };
    let recorder = PanickyRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let one = backend(&server, 2).await;
    arm(&recorder.capacity);
    let mut first = one.acquire(video(), 1);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(catch_unwind(AssertUnwindSafe(|| first.as_mut().poll(&mut cx))).is_err());
    drop(first);
    let capacity = kling_core::metrics::SLOTS_CAPACITY;
    assert_eq!(
        recorder.value(capacity),
        0.0,
        "nothing added, nothing taken out"
    );
    let granted = one.acquire(video(), 1).await.unwrap();
    assert_eq!(recorder.value(capacity), 2.0, "the pool's capacity");
    one.apply(SlotOp::GiveBack(granted)).await.unwrap();
}

/// A waiting create dropped while its thread unwinds from a panic (a task's other future
/// panicked) takes itself out of the waiters gauge; with a recorder that panics then too,
/// at the next move. Before, the gauge was not moved while unwinding, and showed the create
/// waiting for good.
#[tokio::test]
async fn a_waiter_dropped_while_unwinding_leaves_the_waiters_gauge() {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::atomic::Ordering;
    use std::task::{Context, Waker};

    let Some(server) = redis() else { return };
    let recorder = PanickyRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let one = backend(&server, 1).await;
    let first = one.acquire(video(), 1).await.unwrap();
    let waiters = kling_core::metrics::SLOTS_WAITERS;
    let mut cx = Context::from_waker(Waker::noop());
    for every in [false, true] {
        let mut waiting = one.acquire(video(), 1);
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        assert_eq!(recorder.value(waiters), 1.0, "every: {every}");
        recorder.every.store(every, Ordering::SeqCst);
        let unwound = catch_unwind(AssertUnwindSafe(move || {
            let _gone = waiting;
            panic!("the caller panics");
        }));
        assert!(unwound.is_err());
        recorder.every.store(false, Ordering::SeqCst);
        if !every {
            assert_eq!(recorder.value(waiters), 0.0, "moved while unwinding");
        }
    }
    // The recorder panicked as the second waiter left: the next waiter's move catches up.
    let mut waiting = one.acquire(video(), 1);
    assert!(waiting.as_mut().poll(&mut cx).is_pending());
    assert_eq!(recorder.value(waiters), 1.0, "caught up");
    drop(waiting);
    assert_eq!(recorder.value(waiters), 0.0);
    one.apply(SlotOp::GiveBack(first)).await.unwrap();
    until_in_use(&one, 0, "every grant given back").await;
}

/// A metrics recorder that panics on every call does not abort the process when the last
/// clone of a backend is dropped while a panic unwinds. Before, the drop of each pool took
/// its capacity out of the gauge, and the recorder's panic there, while unwinding, aborted.
/// (Under nextest, an abort fails this test alone.)
#[tokio::test]
async fn a_metrics_recorder_panicking_on_every_call_aborts_nothing_while_unwinding() {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::atomic::Ordering;

    let Some(server) = redis() else { return };
    let recorder = PanickyRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let capacity = kling_core::metrics::SLOTS_CAPACITY;
    let mut backends = Vec::new();
    for _ in 0..2 {
        let backend = backend(&server, 2).await;
        // No pass holds the backend: dropping the last clone drops it.
        kling_redis::testing::hold_maintenance(&backend, true);
        let granted = backend.acquire(video(), 1).await.unwrap();
        backend.apply(SlotOp::GiveBack(granted)).await.unwrap();
        backends.push(backend);
    }
    until_in_use(&backends[0], 0, "both given back").await;
    assert_eq!(recorder.value(capacity), 4.0, "two pools of two");

    // The first dropped while unwinding, the recorder sound: its pool's share leaves.
    let one = backends.remove(0);
    let unwound = catch_unwind(AssertUnwindSafe(move || {
        let _gone = one;
        panic!("the caller panics");
    }));
    assert!(unwound.is_err());
    assert_eq!(
        recorder.value(capacity),
        2.0,
        "the first backend's pool dropped"
    );

    // The second likewise, the recorder panicking on every call: no abort.
    let two = backends.remove(0);
    recorder.every.store(true, Ordering::SeqCst);
    let unwound = catch_unwind(AssertUnwindSafe(move || {
        let _gone = two;
        panic!("the caller panics");
    }));
    assert!(unwound.is_err());
    recorder.every.store(false, Ordering::SeqCst);
}

/// The reconcile's adoption of `id` from a list that did not give its external id.
fn adopt_without_external(id: &str) -> SlotOp {
    SlotOp::Adopt {
        key: video(),
        task: TaskRef {
            id: Some(id.to_owned()),
            external_id: None,
        },
        weight: 1,
        lease: LONG,
    }
}

/// A task a reconcile listed without its external id, whose create's answer was lost (kept
/// under that external id alone), holds its slot once as soon as a report names it by both
/// ids, whichever came first: the create's holding takes the task id, and the adopted one
/// gives its slot back. Before, the two were two holdings of one task: the task's end by its
/// task id freed the adopted one, and the create's kept its slot until its lease. (As
/// kling-concurrency's
/// `leaks::a_task_listed_without_its_external_id_and_its_lost_create_hold_one_slot`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_listed_without_its_external_id_and_its_lost_create_hold_one_slot() {
    for adopted_first in [false, true] {
        // (A fresh store each time: the ends noted in the first are remembered.)
        let Some(server) = redis() else { return };
        let one = backend(&server, 5).await;
        let two = backend(&server, 5).await;
        if adopted_first {
            let adopted = one.apply(adopt_without_external("t1")).await.unwrap();
            assert!(adopted.changed, "{adopted:?}");
        }
        assert_eq!(create_held(&one, None, Some("job-1")).await, 0);
        if !adopted_first {
            let adopted = one.apply(adopt_without_external("t1")).await.unwrap();
            assert!(adopted.changed, "{adopted:?}");
        }
        assert_eq!(in_use(&one).await, 2, "adopted first: {adopted_first}");

        // Another process's query names t1 running, with its external id.
        let running = report_in(
            &video().account,
            "t1",
            Some("job-1"),
            Some(TaskStatus::Processing),
        );
        two.apply(running).await.unwrap();
        assert_eq!(
            in_use(&one).await,
            1,
            "one task: adopted first: {adopted_first}"
        );
        // Known by its task id from now on: its end by task id alone frees it.
        let end = two
            .apply(ended("t1", Some(TaskStatus::Succeeded)))
            .await
            .unwrap();
        assert_eq!(end.released.len(), 1, "{end:?}");
        assert_eq!(in_use(&one).await, 0, "adopted first: {adopted_first}");
        maintained(&one).await;
        assert_eq!(one.held_here(), 0, "adopted first: {adopted_first}");

        // Ended at once too.
        assert!(
            one.apply(adopt_without_external("t2"))
                .await
                .unwrap()
                .changed
        );
        assert_eq!(create_held(&one, None, Some("job-2")).await, 0);
        let end = report_in(
            &video().account,
            "t2",
            Some("job-2"),
            Some(TaskStatus::Succeeded),
        );
        let end = two.apply(end).await.unwrap();
        assert_eq!(end.released.len(), 1, "one task ended: {end:?}");
        assert_eq!(in_use(&one).await, 0, "both holdings of t2 gone");
        maintained(&one).await;
        assert_eq!(one.held_here(), 0);
    }
}

/// The same joined in the owner's record as its report is made, as in Redis: its share while
/// Redis is away counts the task once, and the task's end told by task id alone frees it
/// there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owners_record_joins_a_task_listed_without_its_external_id_and_its_lost_create() {
    let Some(mut server) = redis() else { return };
    let one = backend(&server, 5).await;
    // (No pass prunes the adopted holding meanwhile: the report itself must.)
    kling_redis::testing::hold_maintenance(&one, true);
    assert!(
        one.apply(adopt_without_external("t1"))
            .await
            .unwrap()
            .changed
    );
    assert_eq!(create_held(&one, None, Some("job-1")).await, 0);
    assert_eq!(one.held_here(), 2);
    let running = report_in(
        &video().account,
        "t1",
        Some("job-1"),
        Some(TaskStatus::Processing),
    );
    one.apply(running).await.unwrap();
    assert_eq!(one.held_here(), 1, "one task");
    assert_eq!(in_use(&one).await, 1);
    server.stop();
    let end = one
        .apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(end.released.len(), 1, "{end:?}");
    assert_eq!(one.held_here(), 0);
}

/// A task a reconcile's first page names running, whose end comes while a later page is
/// listed, then pushed out of `P:ended` by the fleet's later ends (past its 16,384 entries),
/// is not adopted: the reconcile adopts each page's tasks as soon as the page is answered,
/// while the task is still held (nothing is adopted for it), so its end need only be
/// remembered for one page's round trip. (When a reconcile adopted after its last page, the
/// end was forgotten by then, and the task held a slot for nothing until its lease ran out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_ended_after_its_page_is_not_adopted_however_many_ends_follow() {
    use std::future::Future;
    use std::pin::Pin;

    use bytes::Bytes;
    use http_body_util::Full;
    use kling_concurrency::{Reconcile, SlotsHandle, TaskSlotsLayer};

    type Answer = Result<http::Response<Full<Bytes>>, kling_core::BoxError>;
    /// Lists `t1` running on the first path; before it answers the second, `t1` ends, and so
    /// many other ends follow that `t1`'s is forgotten.
    #[derive(Clone)]
    struct Busy(SlotsHandle<RedisSlots>, redis::aio::MultiplexedConnection);
    impl tower::Service<http::Request<Full<Bytes>>> for Busy {
        type Response = http::Response<Full<Bytes>>;
        type Error = kling_core::BoxError;
        type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, request: http::Request<Full<Bytes>>) -> Self::Future {
            let (handle, mut raw) = (self.0.clone(), self.1.clone());
            let first = request.uri().path() == "/v1/videos/text2video";
            // The list ends at its first empty page: `t1` is on page 1 only.
            let later_page = request
                .uri()
                .query()
                .is_some_and(|q| !q.contains("pageNum=1&"));
            Box::pin(async move {
                let page = |data: serde_json::Value| {
                    let body = serde_json::json!({
                        "code": 0, "message": "SUCCEED", "request_id": "req-1", "data": data,
                    });
                    Ok(http::Response::new(Full::new(Bytes::from(
                        body.to_string(),
                    ))))
                };
                if first && later_page {
                    return page(serde_json::json!([]));
                }
                if first {
                    let running = serde_json::json!({"task_id": "t1", "task_status": "processing"});
                    return page(serde_json::json!([running]));
                }
                let callback = br#"{"task_id":"t1","task_status":"succeed"}"#;
                let applied = handle.on_callback(callback).await.unwrap();
                assert_eq!(applied.released.len(), 1, "the callback frees t1");
                // The fleet's other ends, as many as `P:ended` keeps, then one more.
                let mut flood = redis::cmd("ZADD");
                flood.arg("test:ended");
                for i in 0..4 * 4096_i64 {
                    flood
                        .arg(8_000_000_000_000_000_i64 + i)
                        .arg(format!("i:other{i}"));
                }
                let _: i64 = flood.query_async(&mut raw).await.unwrap();
                // (A task this process never held: its end is noted all the same.)
                let _ = handle.complete("b0").await.unwrap();
                let kept: Option<f64> = redis::cmd("ZSCORE")
                    .arg("test:ended")
                    .arg("i:t1")
                    .query_async(&mut raw)
                    .await
                    .unwrap();
                assert_eq!(kept, None, "t1's end was pushed out");
                page(serde_json::json!([]))
            })
        }
    }

    let Some(server) = redis() else { return };
    let config = SlotsConfig::new(2);
    let slots = RedisSlots::new(connect(&server).await, config.clone())
        .unwrap()
        .grace(Duration::from_millis(300));
    let handle = TaskSlotsLayer::with_backend(&config, slots.clone())
        .unwrap()
        .handle();
    let key = SlotKey::new(handle.default_account().clone(), Pool::new(Product::Video));
    let held = slots.acquire(key.clone(), 1).await.unwrap();
    slots.apply(hold(held, "t1", LONG)).await.unwrap();

    let busy = Busy(handle.clone(), crate::support::raw(&server).await);
    let plan = Reconcile::new("").legacy_paths(["/v1/videos/text2video", "/v1/videos/image2video"]);
    let found = handle.reconcile(&mut busy.clone(), &plan).await.unwrap();
    assert_eq!((found.unfinished, found.adopted), (1, 0), "t1 was held");
    assert_eq!(found.truncated_listings, 0, "each list read to its end");
    assert_eq!(in_use(&slots).await, 0, "no slot held for t1");
    assert_eq!(slots.held_here(), 0);
    // Adopted only now, as a reconcile that adopted after its last page did, t1 would be.
    let late = SlotOp::Adopt {
        key,
        task: TaskRef {
            id: Some("t1".to_owned()),
            external_id: None,
        },
        weight: 1,
        lease: LONG,
    };
    assert!(
        slots.apply(late).await.unwrap().changed,
        "t1's end is forgotten"
    );
}

/// An account's name may hold a newline (any text names an account): the scripts' places
/// (`pool key \n holding id`) must still name the holding, else a task's end finds no slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_named_with_a_newline_gets_its_slots_back() {
    let Some(server) = redis() else { return };
    let slots = backend(&server, 1).await;
    let account = AccountId::new("acme\nbeta");
    let key = SlotKey::new(account.clone(), Pool::new(Product::Video));
    let a = slots.acquire(key.clone(), 1).await.unwrap();
    slots.apply(hold(a, "t1", LONG)).await.unwrap();
    let end = SlotOp::Update {
        account,
        updates: vec![TaskUpdate {
            id: "t1".to_owned(),
            external_id: None,
            status: Some(TaskStatus::Succeeded),
        }],
        lease: LONG,
    };
    let applied = slots.apply(end).await.unwrap();
    assert_eq!(applied.released.len(), 1, "t1's end frees its slot");
    assert_eq!(in_use(&slots).await, 0);
    let next = tokio::time::timeout(Duration::from_secs(2), slots.acquire(key, 1)).await;
    assert!(next.is_ok(), "the freed slot is granted");
}

/// A task whose end is reported before its create's hold (a callback that overtakes the
/// create's answer) gives its slot back at the hold: its pool, past the first 64, is forgotten
/// then too, as after any other end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_whose_tasks_ended_before_their_hold_leave_nothing_behind() {
    let Some(server) = redis() else { return };
    let slots = backend(&server, 1).await;
    let model = |name: &str| {
        SlotKey::new(
            AccountId::new("acct"),
            Pool::with_model(Product::Video, name.to_owned()),
        )
    };
    for n in 0..150 {
        let reservation = slots.acquire(model(&format!("m-{n}")), 1).await.unwrap();
        let task = format!("t-{n}");
        slots
            .apply(ended(&task, Some(TaskStatus::Succeeded)))
            .await
            .unwrap();
        let applied = slots.apply(hold(reservation, &task, LONG)).await.unwrap();
        assert_eq!(
            applied.released.len(),
            1,
            "the hold of {task} frees its slot"
        );
    }
    let pools: usize = redis::cmd("SCARD")
        .arg("test:pools")
        .query_async(&mut crate::support::raw(&server).await)
        .await
        .unwrap();
    assert!(pools <= 65, "{pools} pools in redis");
    assert_eq!(in_use(&slots).await, 0);
}

/// Grants whose lease ran out (their process gone) give their slots back at the next ask or
/// snapshot: their pools, past the first 64, are forgotten then too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_whose_grants_expired_leave_nothing_behind() {
    let Some(server) = redis() else { return };
    let config = SlotsConfig::new(1).lease(Duration::from_millis(300));
    let slots = RedisSlots::new(connect(&server).await, config)
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_secs(60))
        .grace(Duration::from_millis(300));
    let model = |name: &str| {
        SlotKey::new(
            AccountId::new("acct"),
            Pool::with_model(Product::Video, name.to_owned()),
        )
    };
    for n in 0..150 {
        slots.acquire(model(&format!("m-{n}")), 1).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(in_use(&slots).await, 0, "every lease ran out");
    let pools: usize = redis::cmd("SCARD")
        .arg("test:pools")
        .query_async(&mut crate::support::raw(&server).await)
        .await
        .unwrap();
    assert!(pools <= 65, "{pools} pools in redis");
    let snapshot = slots.snapshot().await.unwrap();
    assert!(snapshot.len() <= 65, "{} pools listed", snapshot.len());
}

/// A pool whose only create met a 1303 hides its slots until they come back: then, past the
/// first 64, it is forgotten, as after an end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_whose_hidden_slots_came_back_leave_nothing_behind() {
    let Some(server) = redis() else { return };
    let config = SlotsConfig::new(1).recovery_interval(Duration::from_millis(200));
    let slots = RedisSlots::new(connect(&server).await, config)
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .maintain_every(Duration::from_secs(60))
        .grace(Duration::from_millis(300));
    let model = |name: &str| {
        SlotKey::new(
            AccountId::new("acct"),
            Pool::with_model(Product::Video, name.to_owned()),
        )
    };
    for n in 0..150 {
        let granted = slots.acquire(model(&format!("m-{n}")), 1).await.unwrap();
        slots.apply(SlotOp::Congested(granted)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let snapshot = slots.snapshot().await.unwrap();
    assert!(snapshot.len() <= 65, "{} pools listed", snapshot.len());
    let pools: usize = redis::cmd("SCARD")
        .arg("test:pools")
        .query_async(&mut crate::support::raw(&server).await)
        .await
        .unwrap();
    assert!(pools <= 65, "{pools} pools in redis");
}

/// A task reported running with a lease shorter than its hold's (a report through another
/// layer over the same Redis prefix) ends when renewed to: a create waiting in another
/// process, which computed its next wake from the longer lease, is served then, not at the
/// longer lease's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_renewed_shorter_lets_a_waiter_in_when_it_ends() {
    let Some(server) = redis() else { return };
    // Neither the polling fallback nor maintenance serves the waiter in this test's time.
    let slow = |slots: RedisSlots| {
        slots
            .poll_every(Duration::from_secs(30))
            .maintain_every(Duration::from_secs(30))
    };
    let one = slow(backend(&server, 1).await);
    let two = slow(backend(&server, 1).await);
    let reporter = slow(backend(&server, 1).await);
    let held = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(held, "t1", Duration::from_secs(20)))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let waiter = tokio::spawn(async move { two.acquire(video(), 1).await });
    // The waiter has asked, and sleeps until the 20 s lease ends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut renewed = ended("t1", Some(TaskStatus::Processing));
    if let SlotOp::Update { lease, .. } = &mut renewed {
        *lease = Duration::from_millis(500);
    }
    let applied = reporter.apply(renewed).await.unwrap();
    assert!(applied.released.is_empty());
    let granted = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("served when the shortened lease ends, not the held one")
        .unwrap()
        .unwrap();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(700), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    assert_eq!(granted.weight, 1);
}

/// A renewal announces on `PREFIX:freed` only when it brings the pool's next lease deadline
/// forward: a renewal that ends later (the common case), or sooner than its own old lease but
/// after the pool's next deadline (which waiters wake at anyway), wakes no process's waiters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_renewal_that_brings_the_next_deadline_forward_is_announced() {
    let Some(server) = redis() else { return };
    let one = backend(&server, 2)
        .await
        .maintain_every(Duration::from_secs(30));
    let held = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(held, "t1", Duration::from_secs(20)))
        .await
        .unwrap();
    let held = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(held, "t2", Duration::from_secs(40)))
        .await
        .unwrap();
    // The prefix is `test` (`support::connect`).
    let client = redis::Client::open(server.url()).unwrap();
    let mut events = client.get_async_pubsub().await.unwrap();
    events.subscribe("test:freed").await.unwrap();
    let mut events = events.into_on_message();
    let mut announced = async || {
        let mut pools = Vec::new();
        loop {
            let next = std::future::poll_fn(|cx| {
                futures_core::Stream::poll_next(std::pin::Pin::new(&mut events), cx)
            });
            match tokio::time::timeout(Duration::from_millis(300), next).await {
                Ok(Some(msg)) => pools.push(msg.get_payload::<String>().unwrap()),
                _ => return pools,
            }
        }
    };
    let renew = async |lease: Duration| {
        let mut renewed = ended("t2", Some(TaskStatus::Processing));
        if let SlotOp::Update { lease: l, .. } = &mut renewed {
            *l = lease;
        }
        let applied = one.apply(renewed).await.unwrap();
        assert!(applied.released.is_empty());
    };
    renew(Duration::from_secs(60)).await;
    assert_eq!(announced().await, Vec::<String>::new(), "renewed later");
    renew(Duration::from_secs(30)).await;
    assert_eq!(
        announced().await,
        Vec::<String>::new(),
        "renewed sooner, after t1's lease"
    );
    renew(Duration::from_secs(1)).await;
    assert_eq!(announced().await.len(), 1, "renewed before t1's lease");
}

/// The video pool's slots in use and capacity, as `backend` reads them now (a forged
/// reservation's pool, if one was filed, is another).
async fn video_in_use_and_capacity(backend: &RedisSlots) -> (u32, u32) {
    let snapshot = backend.snapshot().await.unwrap();
    snapshot
        .iter()
        .find(|pool| pool.key == video())
        .map_or((0, 0), |pool| (pool.in_use, pool.capacity))
}

/// The warnings of reservations no grant holds, in `logs`.
fn stale_warnings(logs: &std::sync::Mutex<Vec<String>>) -> Vec<String> {
    logs.lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains("no grant holds"))
        .cloned()
        .collect()
}

/// A reservation frees its grant's slots once, in Redis as in process (kling-concurrency's
/// `a_stale_or_forged_give_back_frees_no_slot`): handed back again (a copy of a grant given
/// back, or kept under a task already), forged (a token no grant has, a live grant's token
/// with another weight), or named under another account's or pool's key, its give-back or
/// `1303` frees nothing and hides nothing, its `1102` halts the account and frees nothing, the
/// process's record keeps what it holds, and each is logged as a warning. Before, the script
/// freed whatever holding the reservation's token named: a task's (its grant's copy given back
/// after the hold), or a live grant's under another weight, so the fleet let a create in past
/// the pool's limit; and the process dropped from its record the holding of that token in any
/// pool (its gauge, its registration after Redis lost its state).
#[tokio::test]
async fn a_stale_or_forged_reservation_frees_no_slot() {
    let Some(server) = redis() else { return };
    let (logs, _capture) = crate::support::capture_logs();
    let one = backend(&server, 2).await;
    let two = backend(&server, 2).await;
    let first = one.acquire(video(), 1).await.unwrap();
    let given_back = first.clone();
    assert!(one.apply(SlotOp::GiveBack(first)).await.unwrap().changed);
    let held = one.acquire(video(), 1).await.unwrap();
    let live = one.acquire(video(), 1).await.unwrap();
    one.apply(hold(held.clone(), "t1", LONG)).await.unwrap();
    assert_eq!(video_in_use_and_capacity(&two).await, (2, 2));
    assert!(
        stale_warnings(&logs).is_empty(),
        "{:#?}",
        stale_warnings(&logs)
    );
    let other_account = SlotKey::new(AccountId::new("other"), video().pool);
    let image = SlotKey::new(video().account, Pool::new(Product::Image));
    let forged = [
        given_back,
        held.clone(),
        Reservation {
            token: live.token + 1_000,
            ..live.clone()
        },
        Reservation {
            weight: 2,
            ..live.clone()
        },
        Reservation {
            key: other_account,
            ..live.clone()
        },
        Reservation {
            key: image,
            ..live.clone()
        },
    ];
    let count = forged.len();
    for reservation in forged {
        let given = one
            .apply(SlotOp::GiveBack(reservation.clone()))
            .await
            .unwrap();
        let congested = one
            .apply(SlotOp::Congested(reservation.clone()))
            .await
            .unwrap();
        assert_eq!(
            video_in_use_and_capacity(&two).await,
            (2, 2),
            "no slot freed or hidden by {reservation:?}"
        );
        assert_eq!(one.held_here(), 2, "{reservation:?}");
        let past = tokio::time::timeout(Duration::from_millis(100), two.acquire(video(), 1)).await;
        assert!(past.is_err(), "a slot past the limit after {reservation:?}");
        assert!(!given.changed && !congested.changed, "{reservation:?}");
    }
    // A 1102 of a stale reservation halts the account all the same, and frees nothing.
    let held_token = held.token;
    one.apply(SlotOp::Halt {
        reservation: held,
        cause: outcome(1102),
    })
    .await
    .unwrap();
    assert!(matches!(
        two.acquire(video(), 1).await,
        Err(AcquireError::Halted(_))
    ));
    assert_eq!(video_in_use_and_capacity(&two).await, (2, 2));
    assert_eq!(one.held_here(), 2);
    two.apply(SlotOp::ResetHalt(video().account)).await.unwrap();
    let warnings = stale_warnings(&logs);
    assert_eq!(warnings.len(), 2 * count + 1, "{warnings:#?}");
    for part in [
        "account=acct",
        "pool=video",
        "weight=1",
        &format!("token={held_token}"),
        r#"change="give back""#,
    ] {
        // (The give-back of the grant kept under t1.)
        assert!(warnings[2].contains(part), "{part:?} in {}", warnings[2]);
    }
    assert!(warnings[3].contains(r#"change="1303""#), "{}", warnings[3]);
    assert!(
        warnings[2 * count].contains(r#"change="halt""#),
        "{warnings:#?}"
    );
    // The grant itself still goes back, once; the task still ends.
    assert!(
        one.apply(SlotOp::GiveBack(live.clone()))
            .await
            .unwrap()
            .changed
    );
    assert!(!one.apply(SlotOp::GiveBack(live)).await.unwrap().changed);
    two.apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(video_in_use_and_capacity(&two).await, (0, 2));
    // The 1303 of a grant given back (Redis has no holding of its token) hides no slot of the
    // pool it names, as it would were it the fleet's last word on the pool.
    let given_back = one.acquire(video(), 1).await.unwrap();
    let copy = given_back.clone();
    one.apply(SlotOp::GiveBack(given_back)).await.unwrap();
    assert!(!one.apply(SlotOp::Congested(copy)).await.unwrap().changed);
    assert_eq!(video_in_use_and_capacity(&two).await, (0, 2), "none hidden");
    assert_eq!(stale_warnings(&logs).len(), 2 * count + 3);
}

/// A stale reservation kept under a task (the same grant kept twice, or kept after it was
/// given back) counts its slots anew, in Redis as in process (kling-concurrency's
/// `a_stale_reservation_held_counts_its_slots`): the task may run, and its end frees what its
/// hold took, never a slot another task holds; each is logged as a warning. Before, the second
/// hold of a grant overwrote the first task's holding: two tasks ran on one slot, the first
/// one's end freed it, and the fleet let a create in past the pool's limit.
#[tokio::test]
async fn a_stale_reservation_held_counts_its_slots() {
    let Some(server) = redis() else { return };
    let (logs, _capture) = crate::support::capture_logs();
    let one = backend(&server, 2).await;
    let two = backend(&server, 2).await;
    let first = one.acquire(video(), 1).await.unwrap();
    let copy = first.clone();
    one.apply(hold(first, "t1", LONG)).await.unwrap();
    assert!(stale_warnings(&logs).is_empty());
    one.apply(hold(copy, "t2", LONG)).await.unwrap();
    assert_eq!(video_in_use_and_capacity(&two).await, (2, 2), "both count");
    assert_eq!(one.held_here(), 2);
    let past = tokio::time::timeout(Duration::from_millis(100), two.acquire(video(), 1)).await;
    assert!(past.is_err(), "a slot past the limit");
    two.apply(ended("t1", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(video_in_use_and_capacity(&two).await, (1, 2), "t2 runs");
    let next = two.acquire(video(), 1).await.unwrap();
    let past = tokio::time::timeout(Duration::from_millis(100), two.acquire(video(), 1)).await;
    assert!(past.is_err(), "a slot past the limit");
    two.apply(ended("t2", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(video_in_use_and_capacity(&two).await, (1, 2), "next holds");
    two.apply(SlotOp::GiveBack(next)).await.unwrap();
    // A grant given back, then kept: counted anew, and its end frees what it took.
    let given_back = one.acquire(video(), 1).await.unwrap();
    let copy = given_back.clone();
    one.apply(SlotOp::GiveBack(given_back)).await.unwrap();
    one.apply(hold(copy, "t3", LONG)).await.unwrap();
    assert_eq!(video_in_use_and_capacity(&two).await, (1, 2));
    two.apply(ended("t3", Some(TaskStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(video_in_use_and_capacity(&two).await, (0, 2));
    let warnings = stale_warnings(&logs);
    assert_eq!(warnings.len(), 2, "{warnings:#?}");
    assert!(
        warnings.iter().all(|w| w.contains(r#"change="hold""#)),
        "{warnings:#?}"
    );
}
