//! Cancellation under load: 10,000 requests against the in-process mock in paused time, a
//! random share dropped at random points — waiting for the rate limiter, waiting for a slot,
//! in flight, during a retry sleep. Afterwards every limiter is idle and the mock agrees.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use http::Method;
use kling_mock::{MockConfig, MockKling, Preset};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::support::{self, Opts, Svc, request, send};

const REQUESTS: usize = 10_000;

/// How one request ended.
enum End {
    Ok,
    Dropped,
    Failed(String),
}

/// Video slots of the account. The arrivals keep some 20 tasks running on average and 29 at
/// their peak when the slots layer holds nothing back (the control below): with 50 slots, as
/// this test once had, the mock could never refuse and "no 1303" showed nothing. At 20 the
/// control meets over two hundred 1303s (218 when last counted; it asks for 100).
const SLOTS: u32 = 20;

/// The mock of these tests: `SLOTS` video slots, 600 requests a minute; tasks last 2–10 s; a
/// fifth of the answers are 5xx (retry sleeps), a tenth are slow (in flight for 20 s).
fn mock() -> MockKling {
    MockKling::new(
        MockConfig::preset(Preset::Enterprise)
            .slots(SLOTS)
            .rate_per_minute(600.0)
            .task_duration(Duration::from_secs(2), Duration::from_secs(10))
            .unlimited_credits()
            .fault_rate(0.2)
            .slow(0.1, Duration::from_secs(20))
            .seed(99),
    )
    .expect("valid mock")
}

/// The stack's numbers: the mock's, with `slots` task slots.
fn opts(slots: u32) -> Opts {
    let mut opts = Opts::new(1.0);
    opts.slots = slots;
    opts.per_minute = 600.0;
    opts.attempt_timeout = Duration::from_secs(30);
    // Twice the longest task: a create dropped in flight that the mock never made holds its
    // slot this long (nothing can report an absent task), no longer.
    opts.lease = Duration::from_secs(120);
    opts.max_attempts = 6;
    opts
}

/// The seeded arrivals through `svc`: four creates in five, each followed until it ends, and
/// a query of the create before; 40% dropped after a random 0–60 s, wherever they are.
fn arrivals(svc: &crate::support::Svc) -> Vec<tokio::task::JoinHandle<End>> {
    let mut rng = SmallRng::seed_from_u64(2024);
    let mut tasks = Vec::with_capacity(REQUESTS);
    for i in 0..REQUESTS {
        let svc = svc.clone();
        // Arrivals over 1,500 s (about 7 a second, near both limits).
        let arrive = Duration::from_millis(rng.random_range(0..1_500_000));
        let drop_after = rng
            .random_bool(0.4)
            .then(|| Duration::from_millis(rng.random_range(0..60_000)));
        let (method, path, body) = if i % 5 == 4 {
            (
                Method::GET,
                format!("/v1/videos/text2video/c-{}", i - 1),
                String::new(),
            )
        } else {
            (
                Method::POST,
                "/v1/videos/text2video".to_owned(),
                format!(r#"{{"prompt":"p{i}","external_task_id":"c-{i}"}}"#),
            )
        };
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(arrive).await;
            // A create is followed as a client follows it: polled every 5 s until it ends.
            let call = async move {
                let outcome = send(&svc, request(method, &path, &body)).await?;
                let Some(task) = outcome.task().filter(|_| path.ends_with("text2video")) else {
                    return Ok(outcome);
                };
                let poll = format!("/v1/videos/text2video/{}", task.id);
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    let report = send(&svc, request(Method::GET, &poll, "")).await?;
                    if report.task().is_some_and(|t| t.status.is_terminal()) {
                        return Ok::<_, kling_core::error::BoxError>(report);
                    }
                }
            };
            let result = match drop_after {
                Some(after) => match tokio::time::timeout(after, call).await {
                    Ok(result) => result,
                    Err(_) => return End::Dropped,
                },
                None => call.await,
            };
            match result {
                Ok(outcome) if outcome.is_success() => End::Ok,
                Ok(outcome) => End::Failed(outcome.code().to_string()),
                Err(e) => End::Failed(
                    e.downcast_ref::<kling_retry::error::Failed>()
                        .and_then(|f| f.code())
                        .map_or_else(|| e.to_string(), |c| c.to_string()),
                ),
            }
        }));
    }
    tasks
}

/// A follower, as an application runs one: every 30 s it lists the tasks, and every ended
/// one it reports frees the slots a dropped caller left behind.
fn follower(svc: &crate::support::Svc) -> tokio::task::JoinHandle<()> {
    let svc = svc.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            list_all(svc.clone()).await;
        }
    })
}

/// The external ids of every task the mock made for the stack's account, listed through the
/// stack (its faults retried).
async fn made_by(svc: &Svc) -> HashSet<String> {
    let mut made = HashSet::new();
    for page in 1.. {
        let url = format!("/v1/videos/text2video?pageNum={page}&pageSize=500");
        let mut outcome = None;
        for _ in 0..5 {
            if let Ok(answer) = send(svc, request(Method::GET, &url, "")).await
                && answer.is_success()
            {
                outcome = Some(answer);
                break;
            }
        }
        let outcome = outcome.expect("the mock lists its tasks");
        let tasks = outcome.tasks();
        made.extend(tasks.iter().filter_map(|t| t.external_id.clone()));
        if tasks.len() < 500 {
            return made;
        }
    }
    unreachable!("the pages run out")
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn ten_thousand_requests_dropped_at_random_points_leave_every_limiter_idle() {
    let mock = mock();
    let opts = opts(SLOTS);
    let (svc, handles) = support::stack(support::mock_client(mock.clone(), 2 * 1024 * 1024), &opts);
    let tasks = arrivals(&svc);
    let follower = follower(&svc);
    // Watch the queues while the drops happen: both limiters must have had waiters to drop.
    let watch = {
        let handles = handles.clone();
        tokio::spawn(async move {
            let (mut rate, mut slots) = (0, 0);
            for _ in 0..1_600 {
                rate = rate.max(handles.gcra.waiting());
                let snapshot = handles.slots.snapshot().await.unwrap();
                slots = slots.max(snapshot.pools().iter().map(|p| p.waiters).sum::<usize>());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            (rate, slots)
        })
    };
    let mut dropped = 0;
    let mut ok = 0;
    let mut ok_creates = Vec::new();
    let mut failed: BTreeMap<String, usize> = BTreeMap::new();
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.expect("no request panicked") {
            End::Dropped => dropped += 1,
            End::Ok => {
                ok += 1;
                if i % 5 != 4 {
                    ok_creates.push(format!("c-{i}"));
                }
            }
            End::Failed(why) => *failed.entry(why).or_default() += 1,
        }
    }
    let (rate_waiters, slot_waiters) = watch.await.unwrap();
    // Awaited, so its request waiting in a queue (if any) is dropped before the queues are
    // read: `abort` alone only asks, and a list waiting at the rate limiter stays counted.
    follower.abort();
    let _ = follower.await;
    assert!(
        rate_waiters > 0 && slot_waiters > 0,
        "{rate_waiters} {slot_waiters}"
    );
    assert!(dropped > 1000, "a real share was dropped: {dropped}");
    // Every failure names its cause: a Kling code (1203 for a query of a create that was
    // dropped before it happened), or the deadline and the wait that would have passed it.
    assert!(ok > 1000, "{ok} ok, {dropped} dropped, failed: {failed:?}");
    for why in failed.keys() {
        let named = why.parse::<i64>().is_ok() || why.contains("deadline");
        assert!(named, "an unnamed failure: {why}");
    }
    assert_eq!(
        handles.gcra.waiting(),
        0,
        "nobody is left in the rate limiter's queue"
    );

    // Every task the mock made ends within a minute; a list then reports each one, and the
    // slots layer releases it by task id or by the external id the create carried.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(list_all(svc.clone()).await, 0, "every task has ended");
    // What was still held then is only creates whose fate the stack could not learn (dropped
    // after they reached the mock, or failed with an answer that may have made a task) that
    // the mock never made, so no list could name them. They wait for their lease (120 s),
    // never longer; the last of them ended more than that ago.
    let snapshot = handles.slots.snapshot().await.unwrap();
    let held: u32 = snapshot.pools().iter().map(|p| p.in_use).sum();
    assert_eq!(held, 0, "{held} held after {dropped} drops: {snapshot:?}");
    for pool in snapshot.pools() {
        assert_eq!(pool.waiters, 0, "{pool:?}");
    }
    tokio::time::sleep(Duration::from_secs(121)).await;
    handles.assert_idle().await;

    let stats = mock.stats();
    // Each create that succeeded made its task, and the mock made each task once.
    let made = made_by(&svc).await;
    for id in &ok_creates {
        assert!(
            made.contains(id),
            "{id} succeeded but the mock has no task for it"
        );
    }
    assert_eq!(stats.tasks_created as usize, made.len(), "{stats:?}");
    assert_eq!(stats.duplicate_external_ids, 0, "{stats:?}");
    assert_eq!(
        stats.in_use.values().sum::<u32>(),
        0,
        "the mock agrees: {stats:?}"
    );
    // The slots layer never let the mock refuse (it refuses a task over its slots, so its
    // peak never shows more: this is the check).
    let refused = stats.responses("1303");
    assert_eq!(
        refused, 0,
        "the slots layer never let the mock refuse: {stats:?}"
    );
}

/// The negative control: the same seeded arrivals through the same stack with slots it never
/// runs out of, and that forgets a 1303 within milliseconds (so the slots layer holds nothing
/// back: told too many slots, it would otherwise learn the mock's from its 1303s), meet the
/// mock's `SLOTS` slots.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_same_arrivals_without_the_slot_limit_are_refused_by_the_mock() {
    let mock = mock();
    let mut unlimited = opts(1_000_000);
    unlimited.recovery_interval = Duration::from_millis(1);
    let (svc, _handles) = support::stack(
        support::mock_client(mock.clone(), 2 * 1024 * 1024),
        &unlimited,
    );
    let tasks = arrivals(&svc);
    let follower = follower(&svc);
    for task in tasks {
        task.await.expect("no request panicked");
    }
    follower.abort();
    let stats = mock.stats();
    let refused = stats.responses("1303");
    assert!(
        refused >= 100,
        "the arrivals outgrow {SLOTS} slots: {stats:?}"
    );
}

/// Lists every task through the stack (so ended ones release their slots); returns how many
/// are still running.
async fn list_all(svc: crate::support::Svc) -> usize {
    let mut running = 0;
    for page in 1.. {
        let url = format!("/v1/videos/text2video?pageNum={page}&pageSize=500");
        let call = send(&svc, request(Method::GET, &url, ""));
        let Ok(outcome) = call.await else {
            break;
        };
        running += outcome
            .tasks()
            .iter()
            .filter(|t| !t.status.is_terminal())
            .count();
        if outcome.tasks().len() < 500 {
            break;
        }
    }
    running
}
