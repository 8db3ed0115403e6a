//! The Lua GCRA against governor's, and under a race of many connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use kling_core::AccountId;
use kling_ratelimit::GcraLayer;
use kling_ratelimit::backend::Feedback;
use kling_ratelimit::{Backend, BucketKey, Cooldown, Decision, InProcess, Mode, Policy, Quota};
use kling_redis::testing::skew_local_clock;
use kling_redis::{Connection, FleetDecision, RedisConfig, RedisGcra, WhenUnreachable};
use proptest::prelude::*;
use tower::{Layer, ServiceExt};

use crate::support::{
    client_pause, connect, far_process_gets_its_turn, gated_relay, pttl, raw, redis,
};

/// What in-process governor decides for arrivals at `offsets` (µs from the first), as
/// (admitted, not-before offset in µs).
fn in_process(quota: Quota, offsets: &[u64]) -> Vec<(bool, u64)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async {
        let backend = InProcess::new();
        let key = BucketKey::account(Some(AccountId::new("a")));
        let policy = Policy::new(quota, Cooldown::default());
        let start = tokio::time::Instant::now();
        let mut out = Vec::new();
        for &offset in offsets {
            let at = start + Duration::from_micros(offset);
            tokio::time::advance(at - tokio::time::Instant::now()).await;
            match backend.acquire_now(&key, &policy) {
                Decision::Admit => out.push((true, 0)),
                Decision::NotBefore { at, .. } => {
                    out.push((false, (at - start).as_micros() as u64));
                }
                other => panic!("{other:?}"),
            }
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Same arrivals, same answers: admitted or not, and the same "not before" instant.
    #[test]
    fn lua_gcra_admits_exactly_what_in_process_gcra_admits(
        period_ms in 1u64..50,
        burst in 1u32..6,
        gaps in proptest::collection::vec(0u64..60_000, 1..40),
    ) {
        let Some(server) = redis() else { return Ok(()) };
        let quota = Quota::with_period(Duration::from_millis(period_ms)).with_burst(burst);
        let mut offsets = Vec::new();
        let mut t = 0;
        for gap in gaps {
            t += gap;
            offsets.push(t);
        }
        let expected = in_process(quota, &offsets);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let actual = runtime.block_on(async {
            let backend = RedisGcra::new(connect(&server).await);
            let key = BucketKey::account(Some(AccountId::new("a")));
            let policy = Policy::new(quota, Cooldown::default());
            let base: i64 = 1_700_000_000_000_000;
            let mut out = Vec::new();
            for &offset in &offsets {
                let now = base + offset as i64;
                match backend.decide_at(&key, &policy, now).await.unwrap() {
                    FleetDecision::Admit => out.push((true, 0)),
                    FleetDecision::NotBefore { at_us, .. } => out.push((false, (at_us - base) as u64)),
                    other => panic!("{other:?}"),
                }
            }
            out
        });
        prop_assert_eq!(actual, expected);
    }
}

/// 16 sockets race 400 requests at a quota of 10 for an hour: never more than 10 get through.
/// A read-then-write in two commands would let several through on the same stale state.
///
/// Not "exactly 10": each connection sends fleet time corrected by its own measured offset, and
/// the residue (half a round trip) can put a late request a few microseconds before the first
/// admitted one, which the quota then rightly refuses. Exact admission counts for one clock are
/// `lua_gcra_admits_exactly_what_in_process_gcra_admits`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_racing_never_admit_more_than_the_quota() {
    let Some(server) = redis() else { return };
    let mut backends = Vec::new();
    for _ in 0..16 {
        backends.push(Arc::new(RedisGcra::new(connect(&server).await)));
    }
    let quota = Quota::with_period(Duration::from_secs(3600)).with_burst(10);
    let policy = Policy::new(quota, Cooldown::default());
    let admitted = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..400 {
        let backend = Arc::clone(&backends[i % backends.len()]);
        let admitted = Arc::clone(&admitted);
        tasks.push(tokio::spawn(async move {
            let key = BucketKey::account(Some(AccountId::new("raced")));
            if backend.acquire(&key, &policy).await.unwrap() == Decision::Admit {
                admitted.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let admitted = admitted.load(Ordering::Relaxed);
    assert!(admitted <= 10, "{admitted} admitted over a quota of 10");
    assert!(
        admitted >= 5,
        "only {admitted} admitted: the race did not run"
    );
}

/// A 1302 reported by one process pauses the key for another.
#[tokio::test]
async fn a_cooldown_reported_by_one_process_pauses_another() {
    let Some(server) = redis() else { return };
    let one = RedisGcra::new(connect(&server).await);
    let two = RedisGcra::new(connect(&server).await);
    let key = BucketKey::account(Some(AccountId::new("shared")));
    let policy = Policy::new(Quota::per_second(100.0), Cooldown::default());
    assert_eq!(one.acquire(&key, &policy).await.unwrap(), Decision::Admit);
    let now = tokio::time::Instant::now();
    let reported = one
        .feedback(
            &key,
            &policy,
            Feedback::Pause {
                sent_at: now,
                received_at: now,
                resume_at: None,
                throttled: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(reported.streak, 1);
    let until = reported
        .cooldown_until
        .expect("a first 1302 pauses the key");
    let pause = until - now;
    assert!(
        pause > Duration::from_millis(990) && pause < Duration::from_millis(1010),
        "{pause:?}"
    );
    match two.acquire(&key, &policy).await.unwrap() {
        Decision::NotBefore { at, cooldown } => {
            assert!(cooldown);
            let diff = if at > until { at - until } else { until - at };
            assert!(diff < Duration::from_millis(20), "{diff:?}");
        }
        other => panic!("{other:?}"),
    }
}

/// The adaptive rate lives in Redis: a 1302 seen by one process slows the other.
#[tokio::test]
async fn an_adaptive_rate_is_learned_by_the_whole_fleet() {
    let Some(server) = redis() else { return };
    let one = RedisGcra::new(connect(&server).await);
    let two = RedisGcra::new(connect(&server).await);
    let key = BucketKey::account(Some(AccountId::new("adaptive")));
    let adaptive = kling_ratelimit::Adaptive::new().start(Quota::per_second(100.0));
    let policy = Policy::new(
        Quota::per_second(100.0),
        Cooldown::default().first(Duration::from_millis(1)),
    )
    .with_adaptive(Some(adaptive));
    assert_eq!(one.acquire(&key, &policy).await.unwrap(), Decision::Admit);
    let now = tokio::time::Instant::now();
    one.feedback(
        &key,
        &policy,
        Feedback::Pause {
            sent_at: now,
            received_at: now,
            resume_at: None,
            throttled: true,
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Now 85 per second: two requests back to back are ~11.8 ms apart, not 10.
    let before = tokio::time::Instant::now();
    assert_eq!(two.acquire(&key, &policy).await.unwrap(), Decision::Admit);
    match two.acquire(&key, &policy).await.unwrap() {
        Decision::NotBefore {
            at,
            cooldown: false,
        } => {
            let spacing = at - before;
            assert!(spacing > Duration::from_micros(11_000), "{spacing:?}");
        }
        other => panic!("{other:?}"),
    }
}

/// One key paced at a cell every 300 ms (burst 1).
fn slow() -> (BucketKey, Policy) {
    let quota = Quota::with_period(Duration::from_millis(300));
    (
        BucketKey::account(Some(AccountId::new("fair"))),
        Policy::new(quota, Cooldown::default()),
    )
}

/// The head of one process's queue for a key, asking as `GcraLayer` does: a request asks;
/// refused, it asks again saying since when it has waited; admitted, the next one starts.
struct Head {
    backend: RedisGcra,
    key: BucketKey,
    policy: Policy,
    /// When the request now at the head began waiting, once it was refused.
    since: Option<tokio::time::Instant>,
}

impl Head {
    fn new(backend: RedisGcra, (key, policy): (BucketKey, Policy)) -> Head {
        Head {
            backend,
            key,
            policy,
            since: None,
        }
    }

    async fn ask(&mut self) -> Decision {
        let asked = tokio::time::Instant::now();
        let decision = match self.since {
            Some(since) => self.backend.acquire_waiting(&self.key, &self.policy, since),
            None => self.backend.acquire(&self.key, &self.policy),
        }
        .await
        .unwrap();
        match decision {
            Decision::Admit => self.since = None,
            _ => {
                self.since.get_or_insert(asked);
            }
        }
        decision
    }

    /// The instant a refused request was told to ask again.
    async fn refused(&mut self) -> tokio::time::Instant {
        match self.ask().await {
            Decision::NotBefore { at, .. } => at,
            other => panic!("refused, not {other:?}"),
        }
    }

    /// Asks until admitted (at each instant it is told), for at most `limit`.
    async fn ask_until_admitted(&mut self, limit: Duration) {
        let give_up = tokio::time::Instant::now() + limit;
        loop {
            match self.ask().await {
                Decision::Admit => return,
                Decision::NotBefore { at, .. } => {
                    assert!(at < give_up, "not admitted within {limit:?}");
                    tokio::time::sleep_until(at + Duration::from_millis(5)).await;
                }
                other => panic!("{other:?}"),
            }
        }
    }
}

/// `early`'s request begins waiting for the next cell before `late`'s does; when the cell
/// comes, `late` asks first (as a process nearer to Redis would). Returns whether `late` got
/// it.
async fn the_process_that_asks_first_takes_the_cell(
    server: &kling_redis::testing::RedisServer,
    arrival_order: bool,
) -> bool {
    let process = || async {
        Head::new(
            RedisGcra::new(connect(server).await).arrival_order(arrival_order),
            slow(),
        )
    };
    let (mut early, mut late) = (process().await, process().await);
    assert_eq!(early.ask().await, Decision::Admit);
    let at = early.refused().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    late.refused().await;
    tokio::time::sleep_until(at + Duration::from_millis(20)).await;
    if late.ask().await == Decision::Admit {
        return true;
    }
    assert_eq!(
        early.ask().await,
        Decision::Admit,
        "the cell waited for early"
    );
    late.ask_until_admitted(Duration::from_secs(2)).await;
    false
}

#[tokio::test]
async fn the_next_cell_goes_to_the_request_that_has_waited_longest() {
    let Some(server) = redis() else { return };
    assert!(!the_process_that_asks_first_takes_the_cell(&server, true).await);
    // The control: served in the order they ask, the process that asks first wins.
    let server = redis().expect("started above");
    assert!(the_process_that_asks_first_takes_the_cell(&server, false).await);
}

/// A process that stops asking loses its place `place_ttl` after the instant it was told; a
/// request it sends later queues from then, behind requests that waited meanwhile.
#[tokio::test]
async fn a_place_ends_when_its_process_stops_asking() {
    let Some(server) = redis() else { return };
    let early_backend =
        RedisGcra::new(connect(&server).await).place_ttl(Duration::from_millis(300));
    let mut early = Head::new(early_backend.clone(), slow());
    let mut late = Head::new(RedisGcra::new(connect(&server).await), slow());
    assert_eq!(early.ask().await, Decision::Admit);
    let at = early.refused().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    late.refused().await;
    // Early stalls. While its place lasts, the cell waits for it; then late takes it.
    tokio::time::sleep_until(at + Duration::from_millis(20)).await;
    assert_ne!(
        late.ask().await,
        Decision::Admit,
        "early's place still lasts"
    );
    tokio::time::sleep_until(at + Duration::from_millis(350)).await;
    late.ask_until_admitted(Duration::from_secs(2)).await;

    // Early's request gave up; its next one arrives after late's next, and queues behind it.
    let at = late.refused().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut early = Head::new(early_backend, slow());
    early.refused().await;
    tokio::time::sleep_until(at + Duration::from_millis(20)).await;
    assert_ne!(early.ask().await, Decision::Admit, "late has waited longer");
    assert_eq!(late.ask().await, Decision::Admit);
}

/// `early`'s request holds its process's place (its place would last 2 s) and `late`'s
/// waits behind it; then `early`'s gives up, telling the backend when `tell`. Whether `late`
/// takes the next cell.
async fn late_takes_the_next_cell_after_early_gives_up(
    server: &kling_redis::testing::RedisServer,
    tell: bool,
) -> bool {
    let early_backend = RedisGcra::new(connect(server).await).place_ttl(Duration::from_secs(2));
    let mut early = Head::new(early_backend.clone(), slow());
    let mut late = Head::new(RedisGcra::new(connect(server).await), slow());
    assert_eq!(early.ask().await, Decision::Admit);
    let at = early.refused().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    late.refused().await;
    if tell {
        early_backend.stop_waiting(&early.key);
    }
    tokio::time::sleep_until(at + Duration::from_millis(20)).await;
    late.ask().await == Decision::Admit
}

#[tokio::test]
async fn a_process_whose_waiting_requests_gave_up_leaves_its_place_at_once() {
    let Some(server) = redis() else { return };
    assert!(late_takes_the_next_cell_after_early_gives_up(&server, true).await);
    // The control: not told, the store keeps the cell for early while its place lasts.
    let server = redis().expect("started above");
    assert!(!late_takes_the_next_cell_after_early_gives_up(&server, false).await);
}

/// [`RedisGcra`] with its first ask of a reject-mode request left to the trait's default (a
/// plain first ask, [`Backend::acquire_or_refuse`]): a store that ranks a reject-mode refusal
/// in the fleet's order, as every refusal was before reject mode asked apart; and, unless
/// `tells_stop`, never told a process stopped waiting ([`Backend::stop_waiting`]: nothing).
struct Defaulted {
    redis: RedisGcra,
    tells_stop: bool,
}

impl Defaulted {
    /// Never told a process stopped waiting.
    fn not_told(redis: RedisGcra) -> Defaulted {
        Defaulted {
            redis,
            tells_stop: false,
        }
    }

    /// Ranks a reject-mode refusal in the fleet's order, told the rest.
    fn ranking_refusals(redis: RedisGcra) -> Defaulted {
        Defaulted {
            redis,
            tells_stop: true,
        }
    }
}

impl Backend for Defaulted {
    type AcquireFuture = <RedisGcra as Backend>::AcquireFuture;
    type FeedbackFuture = <RedisGcra as Backend>::FeedbackFuture;

    fn acquire(&self, key: &BucketKey, policy: &Policy) -> Self::AcquireFuture {
        self.redis.acquire(key, policy)
    }

    fn acquire_waiting(
        &self,
        key: &BucketKey,
        policy: &Policy,
        since: tokio::time::Instant,
    ) -> Self::AcquireFuture {
        self.redis.acquire_waiting(key, policy, since)
    }

    fn stop_waiting(&self, key: &BucketKey) {
        if self.tells_stop {
            self.redis.stop_waiting(key);
        }
    }

    fn feedback(
        &self,
        key: &BucketKey,
        policy: &Policy,
        feedback: Feedback,
    ) -> Self::FeedbackFuture {
        self.redis.feedback(key, policy, feedback)
    }
}

/// A process's `GcraLayer` as the layer tests send through it.
type Layered = tower::util::BoxCloneService<
    http::Request<Full<Bytes>>,
    http::Response<Full<Bytes>>,
    kling_core::BoxError,
>;

/// What the processes of a layer test served: each request's name (its path's last segment)
/// and when, from the test's start.
#[derive(Clone)]
struct Served {
    start: tokio::time::Instant,
    log: Arc<std::sync::Mutex<Vec<(String, Duration)>>>,
}

impl Served {
    fn new() -> Served {
        Served {
            start: tokio::time::Instant::now(),
            log: Arc::default(),
        }
    }

    fn names(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// A process: a `GcraLayer` (a cell every 300 ms) over `backend`, in front of a service
    /// that answers every request with success and notes it here.
    fn process(&self, backend: impl Backend) -> Layered {
        self.process_in(backend, Mode::Wait)
    }

    /// [`Served::process`] whose layer waits or refuses, as `mode` says.
    fn process_in(&self, backend: impl Backend, mode: Mode) -> Layered {
        let builder =
            GcraLayer::builder(Quota::with_period(Duration::from_millis(300))).backend(backend);
        let layer = if mode == Mode::Reject {
            builder.reject()
        } else {
            builder
        };
        self.process_of(&layer.build().unwrap())
    }

    /// A process: `layer` in front of a service that answers every request with success and
    /// notes it here.
    fn process_of<Bk: Backend>(&self, layer: &GcraLayer<Bk>) -> Layered {
        let served = self.clone();
        let inner = tower::service_fn(move |request: http::Request<Full<Bytes>>| {
            let name = request.uri().path().rsplit('/').next().unwrap().to_owned();
            served
                .log
                .lock()
                .unwrap()
                .push((name, served.start.elapsed()));
            std::future::ready(Ok::<_, kling_core::BoxError>(http::Response::new(
                Full::new(Bytes::from_static(
                    br#"{"code":0,"message":"SUCCEED","request_id":"r","data":{}}"#,
                )),
            )))
        });
        tower::util::BoxCloneService::new(layer.layer(inner))
    }
}

/// Sends request `name` through `process`, on a task of its own.
fn send(
    process: &Layered,
    name: &str,
) -> tokio::task::JoinHandle<Result<http::Response<Full<Bytes>>, kling_core::BoxError>> {
    send_to(process, &format!("/v1/videos/text2video/{name}"), None)
}

/// Sends a `GET` of `path` through `process`, of `account` if one is named, on a task of its
/// own.
fn send_to(
    process: &Layered,
    path: &str,
    account: Option<&str>,
) -> tokio::task::JoinHandle<Result<http::Response<Full<Bytes>>, kling_core::BoxError>> {
    let mut request = http::Request::get(path)
        .body(Full::new(Bytes::new()))
        .unwrap();
    if let Some(account) = account {
        request.extensions_mut().insert(AccountId::new(account));
    }
    tokio::spawn(process.clone().oneshot(request))
}

/// Through two processes' `GcraLayer`s on one key (a cell every 300 ms, places lasting 1.5 s):
/// `a` sends three requests 10 ms apart, `b` one 350 ms after the first, behind `a3`'s place. `a3` is
/// dropped at 400 ms. How long after the start `b1` was served.
async fn b_served_after_a_gives_up<Bk: Backend>(
    server: &kling_redis::testing::RedisServer,
    backend: impl Fn(RedisGcra) -> Bk,
) -> Duration {
    let served = Served::new();
    let mut process = Vec::new();
    for _ in 0..2 {
        let redis = RedisGcra::new(connect(server).await).place_ttl(Duration::from_millis(1500));
        process.push(served.process(backend(redis)));
    }
    let mut a = Vec::new();
    for name in ["a1", "a2", "a3"] {
        a.push(send(&process[0], name));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep_until(served.start + Duration::from_millis(350)).await;
    let b1 = send(&process[1], "b1");
    tokio::time::sleep_until(served.start + Duration::from_millis(400)).await;
    a[2].abort();
    b1.await.unwrap().unwrap();
    assert_eq!(served.names(), ["a1", "a2", "b1"]);
    served.log.lock().unwrap()[2].1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_layer_a_request_that_gives_up_holds_no_one_back() {
    let Some(server) = redis() else { return };
    // b1 takes the cell after the one a3 gave up (900 ms) …
    let told = b_served_after_a_gives_up(&server, |redis| redis).await;
    // … and with a store that is not told, waits until a3's place ends (600 + 1,500 ms).
    let server = redis().expect("started above");
    let not_told = b_served_after_a_gives_up(&server, Defaulted::not_told).await;
    #[allow(clippy::print_stderr)]
    {
        eprintln!("b1 served at {told:?} when told, {not_told:?} when not");
    }
    assert!(told < Duration::from_millis(1500), "told: {told:?}");
    assert!(
        not_told > Duration::from_millis(1800),
        "not told: {not_told:?}"
    );
}

/// Takes every cell of a key it can until `until`, as a queue head does: asks, and when told
/// to wait, asks again at that instant, saying since when it has waited. How many it was given.
async fn cells_taken(backend: RedisGcra, until: tokio::time::Instant) -> usize {
    let key = BucketKey::account(Some(AccountId::new("share")));
    let policy = Policy::new(
        Quota::with_period(Duration::from_millis(50)),
        Cooldown::default(),
    );
    let mut head = Head::new(backend, (key, policy));
    let mut taken = 0;
    while tokio::time::Instant::now() < until {
        match head.ask().await {
            Decision::Admit => taken += 1,
            Decision::NotBefore { at, .. } => tokio::time::sleep_until(at).await,
            other => panic!("{other:?}"),
        }
    }
    taken
}

/// Two processes with requests always waiting share one key, one of them farther from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_far_from_redis_still_gets_its_turn() {
    if redis().is_none() {
        return;
    }
    far_process_gets_its_turn(
        "cells",
        |conn, arrival_order| RedisGcra::new(conn).arrival_order(arrival_order),
        cells_taken,
    )
    .await;
}

/// Two processes' `GcraLayer`s on one key (a cell every 300 ms): process `a` sends three
/// requests 10 ms apart, process `b` one request 100 ms after them. The fleet serves them in the order
/// they began waiting: `a`'s third request waited from the start, so it does not lose its turn
/// to `b`'s by becoming its process's head only after `b`'s arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_layer_requests_are_served_in_the_order_they_began_waiting() {
    let Some(server) = redis() else { return };
    let served = Served::new();
    let a = served.process(RedisGcra::new(connect(&server).await));
    let b = served.process(RedisGcra::new(connect(&server).await));
    let mut sent = vec![send(&a, "a1")];
    tokio::time::sleep(Duration::from_millis(10)).await;
    sent.push(send(&a, "a2"));
    tokio::time::sleep(Duration::from_millis(10)).await;
    sent.push(send(&a, "a3"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    sent.push(send(&b, "b1"));
    for request in sent {
        request.await.unwrap().unwrap();
    }
    assert_eq!(served.names(), ["a1", "a2", "a3", "b1"]);
}

/// The requests a fleet was admitted under an account's key, counted in Redis: both processes'
/// admitted requests, not the refused ones, not a class key's, not another account's; gone
/// once the window has passed; and the count's hash stays bounded however long traffic runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleets_requests_over_the_window_are_counted_once_each() {
    let Some(server) = redis() else { return };
    // Long enough that the asks below fit in it however busy the machine.
    let window = Duration::from_millis(1500);
    let a = RedisGcra::new(connect(&server).await).usage_window(window);
    let b = RedisGcra::new(connect(&server).await).usage_window(window);
    // 50 cells and none back for an hour: the 60 asks below admit 50.
    let quota = Quota::with_period(Duration::from_secs(3600)).with_burst(50);
    let policy = Policy::new(quota, Cooldown::default());
    let account = AccountId::new("counted");
    let key = BucketKey::account(Some(account.clone()));
    let mut admitted = 0;
    for backend in [&a, &b] {
        for _ in 0..30 {
            if backend.acquire(&key, &policy).await.unwrap() == Decision::Admit {
                admitted += 1;
            }
        }
    }
    assert_eq!(admitted, 50);
    // A class key's and another account's requests are not this account's.
    let class = BucketKey::class(Some(account.clone()), kling_core::RequestKind::Query);
    let other = BucketKey::account(Some(AccountId::new("other")));
    for _ in 0..3 {
        assert_eq!(a.acquire(&class, &policy).await.unwrap(), Decision::Admit);
        assert_eq!(b.acquire(&other, &policy).await.unwrap(), Decision::Admit);
    }
    assert_eq!(a.fleet_requests(Some(&account)).await.unwrap(), 50);
    assert_eq!(b.fleet_requests(Some(&account)).await.unwrap(), 50);
    assert_eq!(
        a.fleet_requests(Some(&AccountId::new("other")))
            .await
            .unwrap(),
        3
    );
    tokio::time::sleep(window + Duration::from_millis(50)).await;
    assert_eq!(a.fleet_requests(Some(&account)).await.unwrap(), 0);

    // Traffic over three windows or more, a bucket (10 ms) or more between requests, so each
    // request opens a bucket of its own: 180 of them without the pruning. How many fall in the
    // last window depends on how late the sleeps wake on a busy machine, so the count is
    // checked against the times each request was sent and answered.
    let a = a.usage_window(Duration::from_millis(600));
    let steady = Policy::new(Quota::per_second(10_000.0), Cooldown::default());
    let busy = BucketKey::account(Some(AccountId::new("busy")));
    let mut asked = Vec::with_capacity(180);
    for _ in 0..180 {
        let sent = std::time::Instant::now();
        assert_eq!(a.acquire(&busy, &steady).await.unwrap(), Decision::Admit);
        asked.push((sent, std::time::Instant::now()));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut raw = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let fields: u64 = redis::cmd("HLEN")
        .arg(format!("{}:n", a.key_of(&busy)))
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!((1..=60 + 9).contains(&fields), "{fields} buckets kept");
    let before = std::time::Instant::now();
    let recent = a
        .fleet_requests(Some(&AccountId::new("busy")))
        .await
        .unwrap();
    let after = std::time::Instant::now();
    // The window is the last 60 buckets, the current one included (590 to 600 ms back from
    // when the count was asked); a bucket's more margin on each side for the clock offset.
    let surely_in = asked
        .iter()
        .filter(|(sent, _)| *sent > after - Duration::from_millis(580))
        .count() as u64;
    let maybe_in = asked
        .iter()
        .filter(|(_, answered)| *answered > before - Duration::from_millis(610))
        .count() as u64;
    assert!(surely_in >= 1, "no request in the last window to count");
    assert!(
        (surely_in..=maybe_in).contains(&recent),
        "{recent} in the last window, expected {surely_in} to {maybe_in}"
    );
}

/// A process that does not count adds nothing to the fleet's count and reports no fleet
/// figure (its monitor counts its own requests), while one that counts still does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_does_not_count_requests_adds_nothing_to_the_fleets_count() {
    let Some(server) = redis() else { return };
    let quiet = RedisGcra::new(connect(&server).await).count_requests(false);
    let counting = RedisGcra::new(connect(&server).await);
    // A burst for all six: at 10,000/s alone, two asks within 100 µs (a fast loopback) were
    // refused, and this test is about counting, not pacing.
    let policy = Policy::new(
        Quota::per_second(10_000.0).with_burst(100),
        Cooldown::default(),
    );
    let account = AccountId::new("quiet");
    let key = BucketKey::account(Some(account.clone()));
    for _ in 0..5 {
        assert_eq!(quiet.acquire(&key, &policy).await.unwrap(), Decision::Admit);
    }
    assert_eq!(
        counting.acquire(&key, &policy).await.unwrap(),
        Decision::Admit
    );
    assert!(Backend::fleet_requests(&quiet, &key).is_none());
    let read = Backend::fleet_requests(&counting, &key).expect("a counting backend's figure");
    assert_eq!(read.await.unwrap(), 1);
    assert_eq!(quiet.fleet_requests(Some(&account)).await.unwrap(), 1);
}

/// A lazy connection whose clock runs `ahead_us` off the real one (it connects and measures
/// the offset on first use).
fn lazy_skewed(server: &kling_redis::testing::RedisServer, ahead_us: i64) -> Connection {
    let conn = Connection::lazy(
        RedisConfig::new(server.url())
            .prefix("test")
            .command_timeout(Duration::from_secs(2)),
    )
    .unwrap();
    skew_local_clock(&conn, ahead_us);
    conn
}

/// Three minutes, µs.
const THREE_MINUTES_US: i64 = 180_000_000;

/// A process whose clock is three minutes fast, on a lazy connection, takes its first cell on
/// the server's clock: another process gets the next cell a period later, not three minutes
/// later.
#[tokio::test]
async fn a_lazy_process_with_a_fast_clock_decides_on_the_servers_clock_from_its_first_decision() {
    let Some(server) = redis() else { return };
    let fast = RedisGcra::new(lazy_skewed(&server, THREE_MINUTES_US));
    let other = RedisGcra::new(connect(&server).await);
    let key = BucketKey::account(Some(AccountId::new("fast-clock")));
    let policy = Policy::new(
        Quota::with_period(Duration::from_secs(1)),
        Cooldown::default(),
    );
    assert_eq!(fast.acquire(&key, &policy).await.unwrap(), Decision::Admit);
    let offset = fast.connection().clock_offset_us();
    assert!(
        (offset + THREE_MINUTES_US).abs() < 1_000_000,
        "measured offset {offset} µs"
    );
    let asked = tokio::time::Instant::now();
    match other.acquire(&key, &policy).await.unwrap() {
        Decision::NotBefore {
            at,
            cooldown: false,
        } => {
            let wait = at.saturating_duration_since(asked);
            assert!(wait <= Duration::from_millis(1050), "{wait:?}");
        }
        other => panic!("{other:?}"),
    }
}

/// The same process's first act a 1302 report: the pause it writes ends a second after the
/// server's now, not three minutes and a second.
#[tokio::test]
async fn a_lazy_process_with_a_fast_clock_reports_a_pause_on_the_servers_clock() {
    let Some(server) = redis() else { return };
    let fast = RedisGcra::new(lazy_skewed(&server, THREE_MINUTES_US));
    let other = RedisGcra::new(connect(&server).await);
    let key = BucketKey::account(Some(AccountId::new("fast-clock-pause")));
    let policy = Policy::new(Quota::per_second(100.0), Cooldown::default());
    let now = tokio::time::Instant::now();
    let reported = fast
        .feedback(
            &key,
            &policy,
            Feedback::Pause {
                sent_at: now,
                received_at: now,
                resume_at: None,
                throttled: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(reported.streak, 1);
    let asked = tokio::time::Instant::now();
    match other.acquire(&key, &policy).await.unwrap() {
        Decision::NotBefore { at, cooldown: true } => {
            let wait = at.saturating_duration_since(asked);
            assert!(wait <= Duration::from_millis(1050), "{wait:?}");
        }
        other => panic!("{other:?}"),
    }
}

/// A lazy connection to a Redis that is not there cannot measure the offset: its first
/// decision does what `when_unreachable` says (here: fall back to the process's share).
#[tokio::test]
async fn a_lazy_process_that_cannot_measure_the_offset_follows_when_unreachable() {
    let Some(mut server) = redis() else { return };
    server.stop();
    let conn = Connection::lazy(
        RedisConfig::new(server.url())
            .prefix("test")
            .command_timeout(Duration::from_millis(200))
            .connect_timeout(Duration::from_millis(200)),
    )
    .unwrap();
    let key = BucketKey::account(Some(AccountId::new("nowhere")));
    let policy = Policy::new(Quota::per_second(100.0), Cooldown::default());
    let fail = RedisGcra::new(conn.clone()).when_unreachable(WhenUnreachable::Fail);
    let error = fail.acquire(&key, &policy).await.unwrap_err();
    assert_eq!(
        error.kind(),
        kling_ratelimit::error::BackendErrorKind::Unreachable,
        "{error}"
    );
    let fallback = RedisGcra::new(conn).when_unreachable(WhenUnreachable::fallback(2));
    assert_eq!(
        fallback.acquire(&key, &policy).await.unwrap(),
        Decision::Admit
    );
    assert!(fallback.is_out());
}

/// A Retry-After of two hours reported for a key no request has been paced under yet (no
/// `t` in its hash) keeps the key, and so the pause, for the two hours and the idle TTL, not
/// for the idle TTL alone.
#[tokio::test]
async fn a_long_pause_on_a_key_without_a_pace_outlives_the_idle_ttl() {
    let Some(server) = redis() else { return };
    let backend = RedisGcra::new(connect(&server).await);
    let key = BucketKey::account(Some(AccountId::new("long-pause")));
    let policy = Policy::new(Quota::per_second(100.0), Cooldown::default());
    let now = tokio::time::Instant::now();
    let two_hours = Duration::from_secs(2 * 3600);
    let reported = backend
        .feedback(
            &key,
            &policy,
            Feedback::Pause {
                sent_at: now,
                received_at: now,
                resume_at: Some(now + two_hours),
                throttled: true,
            },
        )
        .await
        .unwrap();
    assert!(reported.cooldown_until.is_some());
    let left = pttl(&server, &backend.key_of(&key)).await;
    let at_least =
        (two_hours + kling_redis::DEFAULT_IDLE_TTL - Duration::from_secs(60)).as_millis();
    assert!(left >= at_least as i64, "the key expires in {left} ms");
}

#[tokio::test]
async fn an_idle_ttl_of_zero_is_refused_naming_the_field() {
    let conn = Connection::lazy(RedisConfig::new("redis://127.0.0.1:1/")).unwrap();
    let error = RedisGcra::new(conn.clone())
        .idle_ttl(Duration::ZERO)
        .unwrap_err();
    assert_eq!(error.field(), "idle_ttl");
    assert!(error.to_string().contains("idle_ttl"), "{error}");
    // Past a year (here, past the clock's range) too.
    let error = RedisGcra::new(conn.clone())
        .idle_ttl(Duration::MAX)
        .unwrap_err();
    assert_eq!(error.field(), "idle_ttl");
    assert!(
        RedisGcra::new(conn)
            .idle_ttl(Duration::from_millis(1))
            .is_ok()
    );
}

/// An adaptive decision on a key whose hash is gone (expired or evicted) while another
/// process still holds a place in its queue writes the starting rate, then is refused: the
/// hash it created expires too, instead of living on without a TTL.
#[tokio::test]
async fn an_adaptive_refusal_that_creates_the_keys_hash_gives_it_an_expiry() {
    let Some(server) = redis() else { return };
    let (key, plain) = slow();
    let one = RedisGcra::new(connect(&server).await);
    let two = RedisGcra::new(connect(&server).await);
    let three = RedisGcra::new(connect(&server).await);
    assert_eq!(one.acquire(&key, &plain).await.unwrap(), Decision::Admit);
    let since = tokio::time::Instant::now();
    assert!(matches!(
        two.acquire_waiting(&key, &plain, since).await.unwrap(),
        Decision::NotBefore { .. }
    ));
    let hash = three.key_of(&key);
    let _: i64 = redis::cmd("DEL")
        .arg(&hash)
        .query_async(&mut raw(&server).await)
        .await
        .unwrap();
    let adaptive = plain.with_adaptive(Some(kling_ratelimit::Adaptive::new()));
    assert!(matches!(
        three.acquire(&key, &adaptive).await.unwrap(),
        Decision::NotBefore { .. }
    ));
    let left = pttl(&server, &hash).await;
    assert!(left > 0, "the hash three created has PTTL {left}");
}

/// A connection to `server` whose commands give up after 200 ms.
async fn impatient(server: &kling_redis::testing::RedisServer) -> Connection {
    Connection::connect(
        RedisConfig::new(server.url())
            .prefix("test")
            .command_timeout(Duration::from_millis(200))
            .connect_timeout(Duration::from_millis(200)),
    )
    .await
    .expect("redis answers")
}

/// A first 1302 pauses `paused_key()` for 5 s.
fn paused_key() -> (BucketKey, Policy) {
    (
        BucketKey::account(Some(AccountId::new("lost-pause"))),
        Policy::new(
            Quota::per_second(100.0),
            Cooldown::default().first(Duration::from_secs(5)),
        ),
    )
}

/// A 1302 received at `at`.
fn throttled_at(at: tokio::time::Instant) -> Feedback {
    Feedback::Pause {
        sent_at: at,
        received_at: at,
        resume_at: None,
        throttled: true,
    }
}

/// Asks `backend` for a cell of `paused_key()` every 50 ms until it says the key is paused
/// (`Some(until)`), or for `limit` (`None`).
async fn paused_until(backend: &RedisGcra, limit: Duration) -> Option<tokio::time::Instant> {
    let (key, policy) = paused_key();
    let give_up = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < give_up {
        if let Ok(Decision::NotBefore { at, cooldown: true }) = backend.acquire(&key, &policy).await
        {
            return Some(at);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// A 1302 whose report Redis could not take (it was stopped, and came back empty) still
/// pauses the key: this process holds the pause from its next decision on, whatever Redis
/// says, and delivers it when Redis answers again, so another process pauses too. In every
/// `WhenUnreachable` mode (with `Fallback` the pause went to the fallback alone, which is not
/// asked once Redis answers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_redis_could_not_take_holds_here_and_reaches_the_fleet_when_it_is_back() {
    for mode in [
        WhenUnreachable::Wait,
        WhenUnreachable::Fail,
        WhenUnreachable::fallback(2),
    ] {
        let Some(mut server) = redis() else { return };
        let one = RedisGcra::new(impatient(&server).await)
            .when_unreachable(mode)
            .retry_every(Duration::from_millis(50));
        let other = RedisGcra::new(impatient(&server).await);
        let (key, policy) = paused_key();
        assert_eq!(one.acquire(&key, &policy).await.unwrap(), Decision::Admit);
        server.stop();
        let received = tokio::time::Instant::now();
        let reported = one.feedback(&key, &policy, throttled_at(received)).await;
        assert_eq!(
            reported.is_ok(),
            matches!(mode, WhenUnreachable::Fallback { .. }),
            "{mode:?}: {reported:?}"
        );
        server.restart().unwrap();
        // This process: paused at once, though Redis forgot everything.
        match one.acquire(&key, &policy).await {
            Ok(Decision::NotBefore { at, cooldown: true }) => {
                assert!(at >= received + Duration::from_secs(4), "{mode:?}: {at:?}");
            }
            other => panic!("{mode:?}: this process is not paused: {other:?}"),
        }
        // The fleet: the pause reaches Redis once it answers.
        let until = paused_until(&other, Duration::from_secs(3)).await;
        let until = until.unwrap_or_else(|| panic!("{mode:?}: the fleet never paused"));
        assert!(
            until >= received + Duration::from_secs(4),
            "{mode:?}: {until:?}"
        );
    }
}

/// One command timeout during a burst of 1302s (Redis paused by `CLIENT PAUSE` for 800 ms
/// while a process reports its 1302, with commands giving up after 200 ms) does not lose the
/// pause: the process holds it meanwhile, and the other process pauses once Redis answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_whose_report_timed_out_still_pauses_the_fleet() {
    let Some(server) = redis() else { return };
    let one = RedisGcra::new(impatient(&server).await).retry_every(Duration::from_millis(50));
    let other = RedisGcra::new(impatient(&server).await);
    let (key, policy) = paused_key();
    assert_eq!(one.acquire(&key, &policy).await.unwrap(), Decision::Admit);
    client_pause(&server, 800).await;
    let received = tokio::time::Instant::now();
    let reported = one.feedback(&key, &policy, throttled_at(received)).await;
    let error = reported.expect_err("the report timed out");
    assert_eq!(
        error.kind(),
        kling_ratelimit::error::BackendErrorKind::Unreachable,
        "{error}"
    );
    match one.acquire(&key, &policy).await {
        Ok(Decision::NotBefore { at, cooldown: true }) => {
            assert!(at >= received + Duration::from_secs(4), "{at:?}");
        }
        other => panic!("this process is not paused: {other:?}"),
    }
    let until = paused_until(&other, Duration::from_secs(3))
        .await
        .expect("the fleet never paused");
    assert!(until >= received + Duration::from_secs(4), "{until:?}");
}

/// A 1302 whose report timed out after Redis took it (Redis paused by `CLIENT PAUSE` for
/// 600 ms, commands giving up after 200 ms: the report runs when the pause ends) is kept and
/// delivered again: the key takes it once, and it counts once in the fleet's streak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1302_whose_report_timed_out_after_redis_ran_it_counts_once() {
    let Some(server) = redis() else { return };
    let one = RedisGcra::new(impatient(&server).await).retry_every(Duration::from_millis(50));
    let (key, policy) = paused_key();
    assert_eq!(one.acquire(&key, &policy).await.unwrap(), Decision::Admit);
    // The report script is loaded (by a success on another key): the report runs when the
    // pause ends, rather than finding no script once its sender has given up.
    let elsewhere = BucketKey::account(Some(AccountId::new("elsewhere")));
    let success = Feedback::Success {
        sent_at: tokio::time::Instant::now(),
    };
    one.feedback(&elsewhere, &policy, success).await.unwrap();
    client_pause(&server, 600).await;
    // Sent a millisecond after it was received: a report sent again counts again only if it
    // looks sent after the pause it began (see `a_kept_1302_whose_delivery_was_cut_short`).
    let received = tokio::time::Instant::now();
    let report = Feedback::Pause {
        sent_at: received + Duration::from_millis(1),
        received_at: received,
        resume_at: None,
        throttled: true,
    };
    let kept = one.feedback(&key, &policy, report).await;
    assert!(kept.is_err(), "redis answered in time: {kept:?}");
    // Redis answers again and runs the report; the kept copy is delivered after it (by the
    // background delivery, every 50 ms, and by this process's next decision).
    // (Another key: this process answers for the paused one itself.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while one.acquire(&elsewhere, &policy).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "redis never answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(one.acquire(&elsewhere, &policy).await.is_ok());
    assert_eq!(
        fleet_streak(&server, &one.key_of(&key)).await,
        1,
        "counted twice"
    );
}

/// A process whose `GcraLayer` (100 a second, a first pause of 5 s: `paused_key()`'s policy)
/// is in front of a service that pauses the Redis at `url` for 1 s (`CLIENT PAUSE`) and then
/// answers with a 1302: the layer reports that 1302 while Redis holds every command.
/// `answered` is notified as the service answers.
fn throttled_while_redis_pauses(
    backend: RedisGcra,
    url: String,
    answered: Arc<tokio::sync::Notify>,
) -> Layered {
    let inner = tower::service_fn(move |_request: http::Request<Full<Bytes>>| {
        let (url, answered) = (url.clone(), Arc::clone(&answered));
        async move {
            let mut raw = redis::Client::open(url)?
                .get_multiplexed_async_connection()
                .await?;
            let () = redis::cmd("CLIENT")
                .arg("PAUSE")
                .arg(1000)
                .arg("ALL")
                .query_async(&mut raw)
                .await?;
            answered.notify_one();
            let body = r#"{"code":1302,"message":"m","request_id":"r","data":{}}"#;
            Ok::<_, kling_core::BoxError>(
                http::Response::builder()
                    .status(429)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap(),
            )
        }
    });
    let (_, policy) = paused_key();
    let layer = GcraLayer::builder(policy.quota)
        .cooldown(policy.cooldown)
        .backend(backend)
        .build()
        .unwrap();
    tower::util::BoxCloneService::new(layer.layer(inner))
}

/// A caller that gives up on a 1302's response (a timeout around the call) while the layer's
/// report of it waits for Redis does not cancel the report: the fleet pauses. Here the report
/// is the process's first since Redis lost its scripts (restarted, or `SCRIPT FLUSH`): the
/// `EVALSHA` sent before the caller gave up is answered `NOSCRIPT` once Redis answers again,
/// and only a report that outlives its caller loads the script and sends it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1302_whose_caller_gave_up_during_its_report_still_pauses_the_fleet() {
    let Some(server) = redis() else { return };
    let answered = Arc::new(tokio::sync::Notify::new());
    let one = throttled_while_redis_pauses(
        RedisGcra::new(connect(&server).await),
        server.url(),
        Arc::clone(&answered),
    );
    let other = RedisGcra::new(connect(&server).await);
    let mut request = http::Request::new(Full::new(Bytes::new()));
    request
        .extensions_mut()
        .insert(AccountId::new("lost-pause"));
    let received = tokio::time::Instant::now();
    tokio::select! {
        result = one.oneshot(request) => panic!("answered while redis was paused: {result:?}"),
        () = async {
            answered.notified().await;
            // Its report is on its way to Redis (the layer sends it when the response comes).
            tokio::time::sleep(Duration::from_millis(100)).await;
        } => {}
    }
    let until = paused_until(&other, Duration::from_secs(3))
        .await
        .expect("the fleet never paused: the report went with its caller");
    assert!(until >= received + Duration::from_secs(4), "{until:?}");
}

/// A caller that gives up on a 1302's report while it waits for the delivery of a pause kept
/// while Redis was away (reports go after those, in order) does not cancel the report: once
/// Redis answers again, the kept pause is delivered and the 1302 after it, and the fleet
/// pauses. (The report script is loaded: only the wait for the delivery is cut short.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1302_whose_caller_gave_up_behind_a_kept_pause_still_pauses_the_fleet() {
    let Some(mut server) = redis() else { return };
    // No background delivery during the test: the report delivers the kept pause itself.
    let one = RedisGcra::new(connect(&server).await).retry_every(Duration::from_secs(3600));
    let (key, policy) = paused_key();
    let kept = BucketKey::account(Some(AccountId::new("kept")));
    let elsewhere = BucketKey::account(Some(AccountId::new("elsewhere")));
    assert_eq!(one.acquire(&kept, &policy).await.unwrap(), Decision::Admit);
    server.stop();
    let at = tokio::time::Instant::now();
    let lost = one.feedback(&kept, &policy, throttled_at(at)).await;
    assert!(
        lost.is_err(),
        "redis took the report while stopped: {lost:?}"
    );
    server.restart().unwrap();
    let other = RedisGcra::new(connect(&server).await);
    let success = Feedback::Success {
        sent_at: tokio::time::Instant::now(),
    };
    other.feedback(&elsewhere, &policy, success).await.unwrap();
    // `one` reconnects, by a command that delivers nothing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while one.fleet_requests(None).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "redis never answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client_pause(&server, 1000).await;
    let received = tokio::time::Instant::now();
    let report = one.feedback(&key, &policy, throttled_at(received));
    let gave_up = tokio::time::timeout(Duration::from_millis(100), report).await;
    assert!(
        gave_up.is_err(),
        "answered while redis was paused: {gave_up:?}"
    );
    let until = paused_until(&other, Duration::from_secs(3))
        .await
        .expect("the fleet never paused: the report went with its caller");
    assert!(until >= received + Duration::from_secs(4), "{until:?}");
}

/// While Redis does not answer (paused by `CLIENT PAUSE`, commands giving up after 200 ms) and
/// a kept report waits for delivery, concurrent decisions and reports do not queue behind one
/// another's timeouts: each waits for at most its own command, not the k-th for k of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_outage_requests_do_not_wait_in_line_for_each_others_timeouts() {
    let Some(server) = redis() else { return };
    let backend = RedisGcra::new(impatient(&server).await).retry_every(Duration::from_millis(50));
    let (key, policy) = paused_key();
    assert_eq!(
        backend.acquire(&key, &policy).await.unwrap(),
        Decision::Admit
    );
    client_pause(&server, 5000).await;
    let received = tokio::time::Instant::now();
    let kept = backend
        .feedback(&key, &policy, throttled_at(received))
        .await;
    assert!(kept.is_err(), "the report timed out and is kept: {kept:?}");

    let started = tokio::time::Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..12 {
        let backend = backend.clone();
        let (paused, policy) = paused_key();
        // Decisions on another account's key: the paused one is answered here, at once.
        let other = BucketKey::account(Some(AccountId::new(format!("other-{i}"))));
        calls.spawn(async move {
            if i % 2 == 0 {
                let success = Feedback::Success {
                    sent_at: tokio::time::Instant::now(),
                };
                drop(backend.feedback(&paused, &policy, success).await);
            } else {
                drop(backend.acquire(&other, &policy).await);
            }
            started.elapsed()
        });
    }
    let slowest = calls.join_all().await.into_iter().max().unwrap();
    // In line, the twelfth waited for twelve timeouts (2.4 s) and the background delivery's;
    // alone, each waits its own (0.2 s), with room for a loaded machine.
    assert!(
        slowest < Duration::from_millis(1500),
        "the slowest call took {slowest:?}"
    );
}

/// A process of a fleet: a `GcraLayer` (100 a second, a first pause of 100 ms) over `backend`,
/// in front of a service that answers a request whose path ends in `throttled` with a 1302
/// and any other with success.
fn answering(backend: RedisGcra) -> Layered {
    let inner = tower::service_fn(|request: http::Request<Full<Bytes>>| {
        let (status, code) = if request.uri().path().ends_with("throttled") {
            (429, 1302)
        } else {
            (200, 0)
        };
        let body = format!(r#"{{"code":{code},"message":"m","request_id":"r","data":{{}}}}"#);
        std::future::ready(Ok::<_, kling_core::BoxError>(
            http::Response::builder()
                .status(status)
                .body(Full::new(Bytes::from(body)))
                .unwrap(),
        ))
    });
    let layer = GcraLayer::builder(Quota::per_second(100.0))
        .cooldown(
            Cooldown::default()
                .first(Duration::from_millis(100))
                .backoff(Duration::from_secs(2))
                .ceiling(Duration::from_secs(2)),
        )
        .backend(backend)
        .build()
        .unwrap();
    tower::util::BoxCloneService::new(layer.layer(inner))
}

/// The 1302 streak Redis holds for the shared key (0 when none).
async fn fleet_streak(server: &kling_redis::testing::RedisServer, redis_key: &str) -> i64 {
    let streak: Option<i64> = redis::cmd("HGET")
        .arg(redis_key)
        .arg("s")
        .query_async(&mut raw(server).await)
        .await
        .unwrap();
    streak.unwrap_or(0)
}

/// Two processes on one Redis: `a` gets a 1302 (a streak of 1), then `b`, which never received
/// a pause, succeeds, and then gets a 1302 itself. `b`'s success reset the fleet's streak, so
/// its 1302 starts a new one (1, a first pause) rather than escalating it to 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_in_a_process_that_saw_no_pause_resets_the_fleets_streak() {
    let Some(server) = redis() else { return };
    let backend_a = RedisGcra::new(connect(&server).await);
    let backend_b = RedisGcra::new(connect(&server).await);
    let key = BucketKey::account(None);
    let redis_key = backend_b.key_of(&key);
    let a = answering(backend_a);
    let b = answering(backend_b.clone());
    send(&b, "ok").await.unwrap().unwrap();
    assert!(
        !backend_b.streak_running(&key),
        "no streak yet: successes are not reported"
    );
    send(&a, "throttled").await.unwrap().unwrap();
    assert_eq!(fleet_streak(&server, &redis_key).await, 1);
    // `b` waits out the pause, and its success resets the streak.
    send(&b, "ok").await.unwrap().unwrap();
    assert_eq!(fleet_streak(&server, &redis_key).await, 0);
    assert!(!backend_b.streak_running(&key), "the reset was noted");
    tokio::time::sleep(Duration::from_millis(20)).await;
    send(&b, "throttled").await.unwrap().unwrap();
    assert_eq!(fleet_streak(&server, &redis_key).await, 1);
}

/// A success of a request sent before the fleet's last pause began leaves the streak (and an
/// adaptive rate) alone, as in process; one sent after it resets the streak.
#[tokio::test]
async fn a_success_sent_before_the_pause_leaves_the_fleets_streak_running() {
    let Some(server) = redis() else { return };
    let backend = RedisGcra::new(connect(&server).await);
    let (key, policy) = paused_key();
    let redis_key = backend.key_of(&key);
    assert_eq!(
        backend.acquire(&key, &policy).await.unwrap(),
        Decision::Admit
    );
    let before = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let received = tokio::time::Instant::now();
    backend
        .feedback(&key, &policy, throttled_at(received))
        .await
        .unwrap();
    assert_eq!(fleet_streak(&server, &redis_key).await, 1);
    let stale = Feedback::Success { sent_at: before };
    let reported = backend.feedback(&key, &policy, stale).await.unwrap();
    assert_eq!(reported.streak, 1, "{reported:?}");
    assert_eq!(fleet_streak(&server, &redis_key).await, 1);
    let fresh = Feedback::Success {
        sent_at: tokio::time::Instant::now(),
    };
    backend.feedback(&key, &policy, fresh).await.unwrap();
    assert_eq!(fleet_streak(&server, &redis_key).await, 0);
}

/// A process's place is ranked by its current head: when the head that took the place gives
/// up while a later request of the same process waits, that request does not inherit the
/// earlier arrival and pass a request of another process that has waited longer.
#[tokio::test]
async fn a_head_that_gave_up_passes_no_earlier_place_to_the_next_one() {
    let Some(server) = redis() else { return };
    let a = RedisGcra::new(connect(&server).await);
    let b = RedisGcra::new(connect(&server).await);
    let (key, policy) = slow();
    assert_eq!(a.acquire(&key, &policy).await.unwrap(), Decision::Admit);
    let a1 = tokio::time::Instant::now();
    let Decision::NotBefore { at, .. } = a.acquire_waiting(&key, &policy, a1).await.unwrap() else {
        panic!("a1 refused");
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b1 = tokio::time::Instant::now();
    assert_ne!(
        b.acquire_waiting(&key, &policy, b1).await.unwrap(),
        Decision::Admit
    );
    // a1 gave up; a2, which began waiting 200 ms after a1, is A's head now.
    let a2 = a1 + Duration::from_millis(200);
    tokio::time::sleep_until(at + Duration::from_millis(20)).await;
    assert_ne!(
        a.acquire_waiting(&key, &policy, a2).await.unwrap(),
        Decision::Admit,
        "a2 took the cell b1 waited longer for"
    );
    assert_eq!(
        b.acquire_waiting(&key, &policy, b1).await.unwrap(),
        Decision::Admit
    );
}

/// Two processes on one key (a cell every 300 ms, places lasting 3 s): `a` rejects, and sends
/// `a1` (admitted) then `a2` (refused, `RateLimited`); `b` waits, and sends `b1` just after.
/// How long after `a1` was served `b1` was.
async fn b_served_after_a_refusal<Bk: Backend>(
    server: &kling_redis::testing::RedisServer,
    backend: impl Fn(RedisGcra) -> Bk,
) -> Duration {
    let served = Served::new();
    let rejecting = RedisGcra::new(connect(server).await).place_ttl(Duration::from_secs(3));
    let a = served.process_in(backend(rejecting), Mode::Reject);
    let b = served.process(RedisGcra::new(connect(server).await).place_ttl(Duration::from_secs(3)));
    send(&a, "a1").await.unwrap().unwrap();
    let refused = send(&a, "a2").await.unwrap().unwrap_err();
    assert!(
        refused.is::<kling_ratelimit::error::RateLimited>(),
        "{refused}"
    );
    send(&b, "b1").await.unwrap().unwrap();
    assert_eq!(served.names(), ["a1", "b1"]);
    let log = served.log.lock().unwrap();
    log[1].1 - log[0].1
}

/// A request refused in reject mode holds no place in the fleet's order: another process's
/// request that begins waiting just after is served a cell later, not when the place ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_in_reject_mode_holds_no_one_back() {
    let Some(server) = redis() else { return };
    let after = b_served_after_a_refusal(&server, |redis| redis).await;
    // The control: a store that ranks the refusal holds b1 until the place ends (3 s).
    let server = redis().expect("started above");
    let ranked = b_served_after_a_refusal(&server, Defaulted::ranking_refusals).await;
    #[allow(clippy::print_stderr)]
    {
        eprintln!("b1 served {after:?} after a1, {ranked:?} when the refusal is ranked");
    }
    assert!(after < Duration::from_millis(1000), "{after:?}");
    assert!(ranked > Duration::from_millis(2500), "{ranked:?}");
}

/// A process in reject mode whose account's requests go one per 10 s, its `/account/costs`
/// requests one per 10 s too (a class quota), over `backend`.
fn costs_limited(served: &Served, backend: impl Backend) -> Layered {
    let ten = Quota::with_period(Duration::from_secs(10));
    let layer = GcraLayer::builder(ten)
        .class_quota(kling_core::RequestKind::Account, ten)
        .backend(backend)
        .reject()
        .build()
        .unwrap();
    served.process_of(&layer)
}

/// Reject mode over Redis: a class request (`/account/costs`, under a class quota) takes its
/// class's turn and its account's in one script, or neither (`acquire_class_or_refuse`). For
/// account `a`, a create takes the account's turn; a costs request then passes its class but
/// not its account and is refused for the account's wait, leaving the class's turn (another
/// process takes it). For `d`, paused, the refusal is the pause's. For `b`, whose class
/// turn another process took, a costs request refused by its class leaves the account's turn.
/// For `c`, one admitted takes both, counted once in the account's requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_reject_mode_a_class_request_its_account_refuses_spends_no_class_turn() {
    let Some(server) = redis() else { return };
    let served = Served::new();
    let process = costs_limited(&served, RedisGcra::new(connect(&server).await));
    let other = RedisGcra::new(connect(&server).await);
    let ten = Policy::new(
        Quota::with_period(Duration::from_secs(10)),
        Cooldown::default(),
    );
    let costs =
        |a: &str| BucketKey::class(Some(AccountId::new(a)), kling_core::RequestKind::Account);
    let account = |a: &str| BucketKey::account(Some(AccountId::new(a)));
    let refused = |result: Result<http::Response<Full<Bytes>>, kling_core::BoxError>| {
        let error = result.expect_err("refused");
        let limited = error
            .downcast_ref::<kling_ratelimit::error::RateLimited>()
            .unwrap_or_else(|| panic!("RateLimited, not {error}"));
        assert!(
            limited.retry_after() > Duration::from_secs(3),
            "{limited:?}"
        );
        limited.in_cooldown()
    };
    let decision = |key: BucketKey| {
        let other = other.clone();
        async move {
            other
                .acquire_or_refuse(&key, &ten, &mut None)
                .await
                .unwrap()
        }
    };

    send_to(&process, "/v1/videos/text2video", Some("a"))
        .await
        .unwrap()
        .unwrap();
    let answer = send_to(&process, "/account/costs", Some("a"))
        .await
        .unwrap();
    assert!(!refused(answer), "the account's wait, not a pause");
    // Before: the class's turn was spent on the refused request, for 10 s.
    assert_eq!(
        decision(costs("a")).await,
        Decision::Admit,
        "the class's turn"
    );

    let now = tokio::time::Instant::now();
    let pause = Feedback::Pause {
        sent_at: now,
        received_at: now,
        resume_at: Some(now + Duration::from_secs(5)),
        throttled: false,
    };
    other.feedback(&account("d"), &ten, pause).await.unwrap();
    let answer = send_to(&process, "/account/costs", Some("d"))
        .await
        .unwrap();
    assert!(refused(answer), "the account's pause");
    assert_eq!(
        decision(costs("d")).await,
        Decision::Admit,
        "the class's turn"
    );

    assert_eq!(decision(costs("b")).await, Decision::Admit);
    let answer = send_to(&process, "/account/costs", Some("b"))
        .await
        .unwrap();
    assert!(!refused(answer), "the class's wait");
    assert_eq!(
        decision(account("b")).await,
        Decision::Admit,
        "the account's turn"
    );

    send_to(&process, "/account/costs", Some("c"))
        .await
        .unwrap()
        .unwrap();
    for key in [costs("c"), account("c")] {
        assert!(
            matches!(decision(key.clone()).await, Decision::NotBefore { .. }),
            "{key:?} taken"
        );
    }
    let c = AccountId::new("c");
    assert_eq!(other.fleet_requests(Some(&c)).await.unwrap(), 1);
    assert_eq!(served.names(), ["text2video", "costs"]);
}

/// More pauses than a process keeps one by one while Redis is away (1,024) lose none that
/// matters: a key's 1302, reported first, still pauses the fleet once Redis is back, and the
/// many `Retry-After`s of another key, merged past the bound, carry its latest end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_bound_on_kept_pauses_every_keys_latest_end_reaches_the_fleet() {
    let Some(mut server) = redis() else { return };
    let one = RedisGcra::new(impatient(&server).await).retry_every(Duration::from_millis(50));
    let other = RedisGcra::new(impatient(&server).await);
    // Pauses long enough to outlast the outage, however slowly the reports fail.
    let (key, _) = paused_key();
    let policy = Policy::new(
        Quota::per_second(100.0),
        Cooldown::default().first(Duration::from_secs(30)),
    );
    assert_eq!(one.acquire(&key, &policy).await.unwrap(), Decision::Admit);
    server.stop();
    let received = tokio::time::Instant::now();
    let kept = one.feedback(&key, &policy, throttled_at(received)).await;
    assert!(kept.is_err(), "redis took the report: {kept:?}");
    let noisy = BucketKey::account(Some(AccountId::new("noisy")));
    let retry_after = |resume_at| {
        let now = tokio::time::Instant::now();
        Feedback::Pause {
            sent_at: now,
            received_at: now,
            resume_at: Some(resume_at),
            throttled: false,
        }
    };
    // At once (one by one, each failed command takes a while): past the bound.
    let mut reports = tokio::task::JoinSet::new();
    for _ in 0..1100 {
        let (one, noisy) = (one.clone(), noisy.clone());
        let report = retry_after(received + Duration::from_secs(40));
        reports.spawn(async move { drop(one.feedback(&noisy, &policy, report).await) });
    }
    reports.join_all().await;
    // The last, with the latest end.
    let latest = received + Duration::from_secs(50);
    let last = one.feedback(&noisy, &policy, retry_after(latest)).await;
    assert!(last.is_err(), "redis took the report: {last:?}");
    server.restart().unwrap();
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    let until = loop {
        if let Ok(Decision::NotBefore { at, cooldown: true }) = other.acquire(&key, &policy).await {
            break at;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "the first key's pause was dropped: the fleet never paused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(until >= received + Duration::from_secs(25), "{until:?}");
    // The other key's reports are delivered one by one: once the last is, the fleet pauses
    // it to their latest end (fleet time back to this process's clock: within a few ms).
    // Asked by a process that never heard of the key's pause: one that heard of an earlier
    // end holds it without asking Redis until then.
    loop {
        let fresh = RedisGcra::new(other.connection().clone());
        let decision = fresh.acquire(&noisy, &policy).await;
        if let Ok(Decision::NotBefore { at, cooldown: true }) = decision
            && at + Duration::from_millis(50) >= latest
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "the other key is not paused to its latest end {latest:?}: {decision:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A process that falls back to its own share while Redis is away starts from the fleet's
/// pause it last heard of: another process's 1302 paused the key in Redis only, and once
/// Redis is gone this process's fallback still refuses until that pause ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_keeps_the_fleets_pause_this_process_heard_of() {
    let Some(mut server) = redis() else { return };
    let one =
        RedisGcra::new(impatient(&server).await).when_unreachable(WhenUnreachable::fallback(1));
    let other = RedisGcra::new(impatient(&server).await);
    let (key, policy) = paused_key();
    assert_eq!(other.acquire(&key, &policy).await.unwrap(), Decision::Admit);
    let received = tokio::time::Instant::now();
    other
        .feedback(&key, &policy, throttled_at(received))
        .await
        .unwrap();
    let heard = match one.acquire(&key, &policy).await.unwrap() {
        Decision::NotBefore { at, cooldown: true } => at,
        other => panic!("the fleet is not paused: {other:?}"),
    };
    server.stop();
    for _ in 0..3 {
        match one.acquire(&key, &policy).await {
            Ok(Decision::NotBefore { at, cooldown: true }) => {
                assert!(at + Duration::from_millis(5) >= heard, "{at:?} < {heard:?}");
            }
            other => panic!("the fallback admits during the fleet's pause: {other:?}"),
        }
    }
}

/// Asks `backend` for a cell of `key` until Redis answers it (`Wait` mode: a `NotBefore`
/// without cooldown, or a command timeout, while Redis is away or restarting), for `limit` at
/// most; a refusal by the key's pace is asked again too. The first other answer.
async fn first_answer(
    backend: &RedisGcra,
    key: &BucketKey,
    policy: &Policy,
    limit: Duration,
) -> Result<Decision, kling_ratelimit::error::BackendError> {
    let give_up = tokio::time::Instant::now() + limit;
    loop {
        let decision = backend.acquire(key, policy).await;
        let away = matches!(
            decision,
            Ok(Decision::NotBefore {
                cooldown: false,
                ..
            })
        ) || decision
            .as_ref()
            .is_err_and(|e| e.kind() == kling_ratelimit::error::BackendErrorKind::Unreachable);
        if !away || tokio::time::Instant::now() >= give_up {
            return decision;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fleet's pause (a 1302 with a 30 s `Retry-After`) outlives a Redis that loses it: one
/// restarted empty, or one that comes back with a snapshot from before the pause (a failover
/// to a lagging replica). Each process that knew of it (the one that reported it, one Redis
/// refused during it) holds it until it ends, as it holds a pause Redis did not take: before,
/// both were admitted by the new Redis at once, 29 s before the end of the pause the server
/// had asked for. The control, a process that never heard of the pause, is admitted: the new
/// Redis has indeed forgotten it. (What is lost with it: the processes that never heard of
/// it, and the 1302 streak.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_the_fleet_knew_of_outlives_a_redis_restart() {
    for from_snapshot in [false, true] {
        let Some(mut server) = redis() else { return };
        let reporter = RedisGcra::new(impatient(&server).await);
        let refused = RedisGcra::new(impatient(&server).await);
        let unaware = RedisGcra::new(impatient(&server).await);
        let key = BucketKey::account(Some(AccountId::new("acct")));
        let policy = Policy::new(Quota::per_second(10.0), Cooldown::default());
        assert_eq!(
            reporter.acquire(&key, &policy).await.unwrap(),
            Decision::Admit
        );
        if from_snapshot {
            server.save().unwrap();
        }
        let now = tokio::time::Instant::now();
        let resume_at = now + Duration::from_secs(30);
        let pause = Feedback::Pause {
            sent_at: now,
            received_at: now,
            resume_at: Some(resume_at),
            throttled: true,
        };
        let reported = reporter.feedback(&key, &policy, pause).await.unwrap();
        assert!(reported.cooldown_until.is_some(), "{reported:?}");
        let told = refused.acquire(&key, &policy).await.unwrap();
        assert!(
            matches!(told, Decision::NotBefore { cooldown: true, .. }),
            "{told:?}"
        );

        if from_snapshot {
            server.restart_from_snapshot().unwrap();
        } else {
            server.restart().unwrap();
        }
        for (name, backend) in [("reporter", &reporter), ("refused", &refused)] {
            let decision = first_answer(backend, &key, &policy, Duration::from_secs(5)).await;
            match decision {
                Ok(Decision::NotBefore { at, cooldown: true }) => assert!(
                    at + Duration::from_millis(50) >= resume_at,
                    "{name} (snapshot: {from_snapshot}): held until {:?} of a 30 s pause",
                    at - now
                ),
                other => panic!(
                    "{name} (snapshot: {from_snapshot}): {other:?} {:?} into a 30 s pause",
                    now.elapsed()
                ),
            }
        }
        let control = first_answer(&unaware, &key, &policy, Duration::from_secs(5)).await;
        assert!(
            matches!(control, Ok(Decision::Admit)),
            "snapshot: {from_snapshot}: redis kept the pause? {control:?}"
        );
    }
}

/// The control of the one above: a pause that ended before Redis restarted holds nobody.
/// The processes that knew of it are admitted as soon as the new Redis answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_that_ended_before_a_redis_restart_holds_nobody() {
    let Some(mut server) = redis() else { return };
    let reporter = RedisGcra::new(impatient(&server).await);
    let refused = RedisGcra::new(impatient(&server).await);
    let key = BucketKey::account(Some(AccountId::new("acct")));
    let policy = Policy::new(Quota::per_second(10.0), Cooldown::default());
    assert_eq!(
        reporter.acquire(&key, &policy).await.unwrap(),
        Decision::Admit
    );
    let now = tokio::time::Instant::now();
    let resume_at = now + Duration::from_millis(300);
    let pause = Feedback::Pause {
        sent_at: now,
        received_at: now,
        resume_at: Some(resume_at),
        throttled: true,
    };
    let reported = reporter.feedback(&key, &policy, pause).await.unwrap();
    // (The 1302's own pause, the cooldown's first second, is the longer.)
    let until = reported.cooldown_until.expect("the fleet is paused");
    let told = refused.acquire(&key, &policy).await.unwrap();
    let Decision::NotBefore { at, cooldown: true } = told else {
        panic!("the fleet is not paused: {told:?}");
    };
    let until = until.max(at);
    assert!(until < now + Duration::from_secs(2), "{:?}", until - now);
    tokio::time::sleep_until(until + Duration::from_millis(50)).await;

    server.restart().unwrap();
    for (name, backend) in [("reporter", &reporter), ("refused", &refused)] {
        let decision = first_answer(backend, &key, &policy, Duration::from_secs(5)).await;
        assert!(
            matches!(decision, Ok(Decision::Admit)),
            "{name}: {decision:?} after the pause ended"
        );
    }
}

/// A delivery of a kept 1302 cut short after Redis ran it (the request that carried it was
/// dropped before the answer came) leaves the report to be sent again by the next delivery:
/// the key takes it once, and the 1302 counts once in the fleet's streak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_1302_whose_delivery_was_cut_short_counts_once() {
    let Some(mut server) = redis() else { return };
    let (relay, gate) = gated_relay(server.port()).await;
    let conn = Connection::connect(
        RedisConfig::new(format!("redis://127.0.0.1:{relay}/"))
            .prefix("test")
            .command_timeout(Duration::from_millis(500))
            .connect_timeout(Duration::from_millis(500)),
    )
    .await
    .unwrap();
    // Delivered by requests only, not in the background.
    let one = RedisGcra::new(conn).retry_every(Duration::from_secs(3600));
    let (key, policy) = paused_key();
    let elsewhere = BucketKey::account(Some(AccountId::new("elsewhere")));
    assert_eq!(one.acquire(&key, &policy).await.unwrap(), Decision::Admit);
    server.stop();
    // Sent a millisecond after it was received: each send turns the instants into fleet time
    // afresh, a few µs off either way, and a report sent again counts again only if it looks
    // sent after the pause it began; this one surely does.
    let received = tokio::time::Instant::now();
    let report = Feedback::Pause {
        sent_at: received + Duration::from_millis(1),
        received_at: received,
        resume_at: None,
        throttled: true,
    };
    let kept = one.feedback(&key, &policy, report).await;
    assert!(kept.is_err(), "redis took the report: {kept:?}");
    server.restart().unwrap();
    // The report script is loaded on the new server (by another process), and this process's
    // connection is made again (by a count, which delivers nothing).
    let other = RedisGcra::new(connect(&server).await);
    let success = Feedback::Success {
        sent_at: tokio::time::Instant::now(),
    };
    other.feedback(&elsewhere, &policy, success).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while one.fleet_requests(None).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "no connection");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A request delivers the report; Redis runs it, and the request is dropped before the
    // answer comes.
    let streak = || async {
        let s: Option<String> = redis::cmd("HGET")
            .arg(one.key_of(&key))
            .arg("s")
            .query_async(&mut raw(&server).await)
            .await
            .unwrap();
        s
    };
    gate.send_replace(false);
    let cut = tokio::spawn({
        let (one, elsewhere) = (one.clone(), elsewhere.clone());
        async move { one.acquire(&elsewhere, &policy).await }
    });
    while streak().await.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "not delivered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cut.abort();
    assert!(cut.await.unwrap_err().is_cancelled());
    gate.send_replace(true);
    // The next request's delivery sends it again.
    assert_eq!(
        one.acquire(&elsewhere, &policy).await.unwrap(),
        Decision::Admit
    );
    assert_eq!(streak().await.as_deref(), Some("1"), "counted twice");
}

/// The pause `backend` holds for `key` in Redis (`cd`, fleet µs).
async fn fleet_pause_end(
    server: &kling_redis::testing::RedisServer,
    backend: &RedisGcra,
    key: &BucketKey,
) -> i64 {
    let cd: Option<i64> = redis::cmd("HGET")
        .arg(backend.key_of(key))
        .arg("cd")
        .query_async(&mut raw(server).await)
        .await
        .unwrap();
    cd.expect("the key is paused")
}

/// Asks `backend` for `n` cells of `key` from fleet time `from`, each time at the instant the
/// refusal before said (as a queue's head does): the admissions' fleet times.
async fn admitted_from(
    backend: &RedisGcra,
    (key, policy): (&BucketKey, &Policy),
    from: i64,
    n: usize,
) -> Vec<i64> {
    let mut at = from;
    let mut admitted = Vec::new();
    for _ in 0..4 * n {
        match backend.decide_at(key, policy, at).await.unwrap() {
            FleetDecision::Admit => admitted.push(at),
            FleetDecision::NotBefore { at_us, .. } => at = at_us,
            other => panic!("{other:?}"),
        }
        if admitted.len() == n {
            break;
        }
    }
    admitted
}

/// As kling-ratelimit's in-process `requests_queued_behind_a_pause_go_spaced_when_it_ends`:
/// the requests queued behind a pause go an interval apart when it ends, not a whole burst at
/// once into the server that just refused (at ten a second and a burst of five: at 1000,
/// 1100, 1200 and 1300 ms, not all at 1000), whichever process of the fleet asks. Long after,
/// the burst is whole again.
#[tokio::test]
async fn requests_queued_behind_a_pause_go_spaced_when_it_ends() {
    let Some(server) = redis() else { return };
    let one = RedisGcra::new(connect(&server).await);
    let two = RedisGcra::new(connect(&server).await);
    let key = BucketKey::account(Some(AccountId::new("spaced")));
    let policy = Policy::new(Quota::per_second(10.0).with_burst(5), Cooldown::default());
    let start = one.connection().now_us();
    assert_eq!(
        one.decide_at(&key, &policy, start).await.unwrap(),
        FleetDecision::Admit
    );
    let reported = one
        .feedback(&key, &policy, throttled_at(tokio::time::Instant::now()))
        .await
        .unwrap();
    assert!(reported.cooldown_until.is_some());
    let end = fleet_pause_end(&server, &one, &key).await;
    assert!(end > start + 900_000, "a 1 s pause: {}", end - start);
    let queued: Vec<i64> = admitted_from(&two, (&key, &policy), start, 4)
        .await
        .into_iter()
        .map(|at| at - end)
        .collect();
    assert_eq!(queued, [0, 100_000, 200_000, 300_000]);
    // Long after, five at once (and not a sixth).
    let later = end + 5_000_000;
    for _ in 0..5 {
        assert_eq!(
            one.decide_at(&key, &policy, later).await.unwrap(),
            FleetDecision::Admit
        );
    }
    assert_eq!(
        one.decide_at(&key, &policy, later).await.unwrap(),
        FleetDecision::NotBefore {
            at_us: later + 100_000,
            cooldown: false
        }
    );
}

/// As kling-ratelimit's `a_pause_that_ended_spends_the_burst_for_a_thread_that_remembers_the_key`:
/// a pause that is over before the next request asks still ends with the burst spent at its
/// end. With a burst of three, after a 2 s pause, requests asking 50 ms after it go at 50,
/// 100 and 200 ms past its end (the burst, spent at its end, refilled half an interval).
#[tokio::test]
async fn a_pause_over_before_the_next_ask_still_spends_the_burst() {
    let Some(server) = redis() else { return };
    let backend = RedisGcra::new(connect(&server).await);
    let key = BucketKey::account(Some(AccountId::new("ended")));
    let policy = Policy::new(Quota::per_second(10.0).with_burst(3), Cooldown::default());
    let now = tokio::time::Instant::now();
    let pause = Feedback::Pause {
        sent_at: now,
        received_at: now,
        resume_at: Some(now + Duration::from_secs(2)),
        throttled: true,
    };
    backend.feedback(&key, &policy, pause).await.unwrap();
    let end = fleet_pause_end(&server, &backend, &key).await;
    let times: Vec<i64> = admitted_from(&backend, (&key, &policy), end + 50_000, 3)
        .await
        .into_iter()
        .map(|at| at - end)
        .collect();
    assert_eq!(times, [50_000, 100_000, 200_000]);
}

/// Reports 1302s one after another, each sent when the pause before it ended and received
/// `latency` later (the first with `resume_at` as its `Retry-After`): each pause's length, and
/// the streak each reached.
async fn pauses_in_a_row(
    backend: &RedisGcra,
    account: &str,
    latency: Duration,
    first_resume_after: Option<Duration>,
    n: usize,
) -> (Vec<u128>, Vec<u32>) {
    let key = BucketKey::account(Some(AccountId::new(account)));
    let policy = Policy::new(Quota::per_second(10.0), Cooldown::default());
    let mut sent = tokio::time::Instant::now();
    let (mut pauses, mut streaks) = (Vec::new(), Vec::new());
    for i in 0..n {
        let received = sent + latency;
        let resume_at = first_resume_after
            .filter(|_| i == 0)
            .map(|after| received + after);
        let feedback = Feedback::Pause {
            sent_at: sent,
            received_at: received,
            resume_at,
            throttled: true,
        };
        let reported = backend.feedback(&key, &policy, feedback).await.unwrap();
        let until = reported.cooldown_until.expect("each 1302 pauses the key");
        // To the millisecond: fleet times are whole microseconds.
        pauses.push(((until - received).as_micros() + 500) / 1000);
        streaks.push(reported.streak);
        sent = until;
    }
    (pauses, streaks)
}

/// As kling-ratelimit's in-process `the_streak_window_counts_from_the_end_of_the_last_pause`:
/// 1302s that keep coming after each pause keep the fleet's streak at the ceiling, since the
/// window counts from the end of the last pause. Neither the 60 s ceiling (as long as the
/// default window) nor a `Retry-After` longer than the window ends the streak and drops the
/// pause back to 1 s.
#[tokio::test]
async fn the_streak_window_counts_from_the_end_of_the_last_pause() {
    let Some(server) = redis() else { return };
    let backend = RedisGcra::new(connect(&server).await);
    let (pauses, streaks) =
        pauses_in_a_row(&backend, "streak", Duration::from_millis(50), None, 6).await;
    // Before, the fifth came 60.05 s after the fourth arrived, and paused 1 s as a first one.
    assert_eq!(pauses, [1000, 2000, 30_000, 60_000, 60_000, 60_000]);
    assert_eq!(streaks, [1, 2, 3, 4, 5, 6]);
    let (pauses, streaks) = pauses_in_a_row(
        &backend,
        "retry-after",
        Duration::ZERO,
        Some(Duration::from_secs(120)),
        2,
    )
    .await;
    // The second 1302 in a row pauses 2 s (before: 1 s, a new streak).
    assert_eq!(pauses, [120_000, 2000]);
    assert_eq!(streaks, [1, 2]);
}

/// What the in-process backend admits after a first 1302 under `policy`: requests asking from
/// `ask_after` past the pause's end, each again when told; their times past its end (µs).
fn in_process_after_a_pause(policy: Policy, ask_after: Duration, n: usize) -> Vec<i64> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async {
        let backend = InProcess::new();
        let key = BucketKey::account(Some(AccountId::new("a")));
        assert_eq!(backend.acquire_now(&key, &policy), Decision::Admit);
        let now = tokio::time::Instant::now();
        let end = backend
            .feedback_now(&key, &policy, throttled_at(now))
            .cooldown_until
            .expect("a 1302 pauses the key");
        tokio::time::advance(end + ask_after - now).await;
        let mut admitted = Vec::new();
        while admitted.len() < n {
            match backend.acquire_now(&key, &policy) {
                Decision::Admit => {
                    admitted.push((tokio::time::Instant::now() - end).as_micros() as i64);
                }
                Decision::NotBefore { at, .. } => {
                    tokio::time::advance(at - tokio::time::Instant::now()).await;
                }
                other => panic!("{other:?}"),
            }
        }
        admitted
    })
}

/// With an adaptive rate, which a 1302 lowers, the burst is spent at the pace the key had
/// before the pause and then carried to the lower one, as in process: the fleet and a single
/// process space the requests after a pause alike (to the microsecond the script rounds the
/// interval up to).
#[tokio::test]
async fn after_a_pause_an_adaptive_key_spaces_its_requests_as_in_process() {
    let Some(server) = redis() else { return };
    let backend = RedisGcra::new(connect(&server).await);
    let key = BucketKey::account(Some(AccountId::new("adaptive-pause")));
    let adaptive = kling_ratelimit::Adaptive::new().start(Quota::per_second(10.0));
    let policy = Policy::new(Quota::per_second(10.0).with_burst(2), Cooldown::default())
        .with_adaptive(Some(adaptive));
    let ask_after = Duration::from_millis(50);
    // (Its own runtime, paused, on a thread of its own.)
    let expected = std::thread::spawn(move || in_process_after_a_pause(policy, ask_after, 3))
        .join()
        .unwrap();
    let start = backend.connection().now_us();
    assert_eq!(
        backend.decide_at(&key, &policy, start).await.unwrap(),
        FleetDecision::Admit
    );
    backend
        .feedback(&key, &policy, throttled_at(tokio::time::Instant::now()))
        .await
        .unwrap();
    let end = fleet_pause_end(&server, &backend, &key).await;
    let actual: Vec<i64> = admitted_from(
        &backend,
        (&key, &policy),
        end + ask_after.as_micros() as i64,
        3,
    )
    .await
    .into_iter()
    .map(|at| at - end)
    .collect();
    assert_eq!(actual.len(), expected.len());
    for (a, e) in actual.iter().zip(&expected) {
        assert!(
            (a - e).abs() <= 3,
            "in process {expected:?}, redis {actual:?}"
        );
    }
}

/// The adaptive rule in Redis is the in-process one ([`kling_ratelimit::AdaptiveState`]):
/// the same reports leave the same rate, report by report — each 1302 of a run lowers it up
/// to the cooldown's `escalate_after`-th (3), the ones after it (past the burst backoff: the
/// server refuses whatever the pace) leave it alone, the successes after climb back towards
/// the remembered limit and probe past it, and a success between two 1302s changes nothing
/// of that.
#[tokio::test]
async fn the_adaptive_rule_in_redis_is_the_in_process_one() {
    let Some(server) = redis() else { return };
    let backend = RedisGcra::new(connect(&server).await);
    let memory = InProcess::new();
    let key = BucketKey::account(Some(AccountId::new("adaptive-rule")));
    let redis_key = backend.key_of(&key);
    let adaptive = kling_ratelimit::Adaptive::new().start(Quota::per_second(5.0));
    let policy = Policy::new(
        Quota::per_second(10.0),
        Cooldown::default().first(Duration::from_millis(1)),
    )
    .with_adaptive(Some(adaptive));
    assert_eq!(
        backend.acquire(&key, &policy).await.unwrap(),
        Decision::Admit
    );
    assert_eq!(memory.acquire_now(&key, &policy), Decision::Admit);
    let fleet_rate = || async {
        let rate: Option<f64> = redis::cmd("HGET")
            .arg(&redis_key)
            .arg("r")
            .query_async(&mut raw(&server).await)
            .await
            .unwrap();
        rate.unwrap()
    };
    // 1302s in a run, recovery past the limit, then 1302s with a success between.
    let mut events = vec![true; 6];
    events.extend([false; 80]);
    events.extend([true, false, true]);
    events.extend([false; 5]);
    let mut rates = Vec::new();
    for (i, throttled) in events.into_iter().enumerate() {
        // (Each report is of a request sent after the last pause began.)
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = tokio::time::Instant::now();
        let feedback = if throttled {
            throttled_at(now)
        } else {
            Feedback::Success { sent_at: now }
        };
        backend.feedback(&key, &policy, feedback).await.unwrap();
        memory.feedback_now(&key, &policy, feedback);
        let expected = memory.key_state(&key).unwrap().adaptive_rate.unwrap();
        let actual = fleet_rate().await;
        assert!(
            (actual - expected).abs() <= expected * 1e-12,
            "report {i}: in process {expected}, redis {actual}"
        );
        rates.push(actual);
    }
    assert_eq!(rates[0], 5.0 * 0.85);
    assert_eq!(
        rates[2],
        rates[1] * 0.85,
        "each 1302 of a run lowers the rate"
    );
    assert_eq!(
        rates[3..6],
        [rates[2]; 3],
        "1302s past escalate_after leave the rate"
    );
    assert!(rates[85] > rates[5], "recovered: {}", rates[85]);
    assert_eq!(
        rates[88],
        rates[87] * 0.85,
        "a success between: lowered again"
    );
}

/// A 1302 whose `Retry-After` asks for many intervals makes the fleet's rate probe as
/// cautiously as in process (kling-ratelimit's `Adaptive::caution`), report by report: the
/// caution the key's hash holds (`k`) is the in-process rule's after each report — set by a
/// long wait (2.6 s at 5/s: three intervals past the header's resolution; 60 s: capped at ten),
/// ended by the success that takes the rate back to the limit, and 1 after a short wait —
/// and the rate is the in-process backend's.
#[tokio::test]
async fn a_long_retry_after_slows_the_fleets_probe_as_in_process() {
    let Some(server) = redis() else { return };
    let backend = RedisGcra::new(connect(&server).await);
    let memory = InProcess::new();
    let key = BucketKey::account(Some(AccountId::new("adaptive-caution")));
    let redis_key = backend.key_of(&key);
    let adaptive = kling_ratelimit::Adaptive::new().start(Quota::per_second(5.0));
    let cooldown = Cooldown::default().first(Duration::from_millis(1));
    let policy = Policy::new(Quota::per_second(10.0), cooldown).with_adaptive(Some(adaptive));
    let mut model = kling_ratelimit::AdaptiveState::new(&adaptive, 10.0);
    assert_eq!(
        backend.acquire(&key, &policy).await.unwrap(),
        Decision::Admit
    );
    assert_eq!(memory.acquire_now(&key, &policy), Decision::Admit);
    let fleet = |field: &'static str| {
        let server = &server;
        let redis_key = &redis_key;
        async move {
            let value: Option<f64> = redis::cmd("HGET")
                .arg(redis_key)
                .arg(field)
                .query_async(&mut raw(server).await)
                .await
                .unwrap();
            value
        }
    };
    // A long wait, recovery past the limit, the longest, then a short one.
    let mut events = vec![Some(Duration::from_millis(2600))];
    events.extend([None; 150]);
    events.push(Some(Duration::from_secs(60)));
    events.extend([None; 40]);
    events.push(Some(Duration::from_secs(1)));
    events.extend([None; 5]);
    let mut cautions = Vec::new();
    for (i, wait) in events.into_iter().enumerate() {
        // (Each report is of a request sent after the last pause began.)
        tokio::time::sleep(Duration::from_millis(2)).await;
        let now = tokio::time::Instant::now();
        let feedback = match wait {
            Some(wait) => {
                model.on_throttle_retry_after(&adaptive, 10.0, 1, &cooldown, Some(wait));
                Feedback::Pause {
                    sent_at: now,
                    received_at: now,
                    resume_at: Some(now + wait),
                    throttled: true,
                }
            }
            None => {
                model.on_success(&adaptive, 10.0);
                Feedback::Success { sent_at: now }
            }
        };
        backend.feedback(&key, &policy, feedback).await.unwrap();
        memory.feedback_now(&key, &policy, feedback);
        let expected = memory.key_state(&key).unwrap().adaptive_rate.unwrap();
        let actual = fleet("r").await.unwrap();
        assert!(
            (actual - expected).abs() <= expected * 1e-12,
            "report {i}: in process {expected}, redis {actual}"
        );
        assert_eq!(actual, model.rate(), "report {i}");
        let caution = fleet("k").await.unwrap_or(1.0);
        assert_eq!(caution, model.caution(), "report {i}");
        cautions.push(caution);
    }
    assert!((cautions[0] - 3.0).abs() < 1e-9, "{}", cautions[0]);
    let ended = cautions.iter().position(|&k| k == 1.0).unwrap();
    assert!(
        (90..150).contains(&ended),
        "the caution ended at report {ended}"
    );
    assert_eq!(cautions[151], 10.0, "a 60 s wait: capped");
    assert_eq!(cautions[192..], [1.0; 6], "a short wait: no caution");
}

/// A `max_caution` no layer validated (a `Policy` built by hand for the backend) bounds the
/// fleet's caution as `Adaptive::caution` does in process: NaN, below 1 and 1 read as 1, an
/// infinite one as no bound. (Lua's `math.max` keeps a NaN first argument: the script left a
/// 60 s wait's 58 with a NaN bound, 1 in process.)
#[tokio::test]
async fn a_max_caution_no_layer_validated_bounds_the_fleets_caution_as_in_process() {
    let Some(server) = redis() else { return };
    let backend = RedisGcra::new(connect(&server).await);
    let wait = Duration::from_secs(60);
    let bounds = [f64::NAN, 0.5, -3.0, 1.0, f64::INFINITY, 30.0];
    let mut cautions = Vec::new();
    for (i, most) in bounds.into_iter().enumerate() {
        let key = BucketKey::account(Some(AccountId::new(format!("caution-bound-{i}"))));
        let adaptive = kling_ratelimit::Adaptive::new()
            .start(Quota::per_second(1.0))
            .max_caution(most);
        let cooldown = Cooldown::default();
        let policy = Policy::new(Quota::per_second(1.0), cooldown).with_adaptive(Some(adaptive));
        let mut model = kling_ratelimit::AdaptiveState::new(&adaptive, 1.0);
        model.on_throttle_retry_after(&adaptive, 1.0, 1, &cooldown, Some(wait));
        assert_eq!(
            backend.acquire(&key, &policy).await.unwrap(),
            Decision::Admit
        );
        let now = tokio::time::Instant::now();
        let throttled = Feedback::Pause {
            sent_at: now,
            received_at: now,
            resume_at: Some(now + wait),
            throttled: true,
        };
        backend.feedback(&key, &policy, throttled).await.unwrap();
        let caution: Option<f64> = redis::cmd("HGET")
            .arg(backend.key_of(&key))
            .arg("k")
            .query_async(&mut raw(&server).await)
            .await
            .unwrap();
        let caution = caution.unwrap_or(1.0);
        assert_eq!(caution, model.caution(), "max_caution {most}");
        cautions.push(caution);
    }
    assert_eq!(cautions, [1.0, 1.0, 1.0, 1.0, 58.0, 30.0]);
}

/// 1302s each past the streak's window of the one before (a client that asks less often than
/// that, through an outage) lower the fleet's rate at most `escalate_after` times between two
/// successes, as in process, report by report (each lowering it, the rate fell to the floor).
#[tokio::test]
async fn sparse_1302s_in_redis_lower_the_rate_as_in_process() {
    let Some(server) = redis() else { return };
    let backend = RedisGcra::new(connect(&server).await);
    let memory = InProcess::new();
    let key = BucketKey::account(Some(AccountId::new("adaptive-sparse")));
    let redis_key = backend.key_of(&key);
    let quota = Quota::per_second(4.0);
    // Short pauses and a short window, so that real time can outlast them.
    let cooldown = Cooldown::default()
        .first(Duration::from_millis(1))
        .backoff(Duration::from_millis(4))
        .ceiling(Duration::from_millis(8))
        .window(Duration::from_millis(20));
    let policy = Policy::new(quota, cooldown)
        .with_adaptive(Some(kling_ratelimit::Adaptive::new().start(quota)));
    assert_eq!(
        backend.acquire(&key, &policy).await.unwrap(),
        Decision::Admit
    );
    assert_eq!(memory.acquire_now(&key, &policy), Decision::Admit);
    // Eight sparse 1302s, a success, two more.
    let events = [
        true, true, true, true, true, true, true, true, false, true, true,
    ];
    let mut rates = Vec::new();
    for (i, throttled) in events.into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let now = tokio::time::Instant::now();
        let feedback = if throttled {
            throttled_at(now)
        } else {
            Feedback::Success { sent_at: now }
        };
        let reported = backend.feedback(&key, &policy, feedback).await.unwrap();
        memory.feedback_now(&key, &policy, feedback);
        if throttled {
            assert_eq!(reported.streak, 1, "report {i}: the first of its streak");
        }
        let expected = memory.key_state(&key).unwrap().adaptive_rate.unwrap();
        let actual = fleet_rate(&server, &redis_key).await;
        assert!(
            (actual - expected).abs() <= expected * 1e-12,
            "report {i}: in process {expected}, redis {actual}"
        );
        rates.push(actual);
    }
    assert_eq!(rates[7], 4.0 * 0.85 * 0.85 * 0.85, "lowered three times");
    assert_eq!(
        rates[9],
        rates[8] * 0.85,
        "a success between: lowered again"
    );
    assert_eq!(rates[10], rates[9] * 0.85);
}

/// A rolling upgrade: a success reported by a process of the version before `nl` (its script
/// clears the streak, `s` and `se`, and leaves `nl`) ends the run of lowerings for this
/// version's script too, as any success does in process: the next 1302 lowers the rate.
#[tokio::test]
async fn a_success_told_by_an_older_script_ends_the_run_of_lowerings() {
    let Some(server) = redis() else { return };
    let backend = RedisGcra::new(connect(&server).await);
    let key = BucketKey::account(Some(AccountId::new("adaptive-mixed")));
    let redis_key = backend.key_of(&key);
    let quota = Quota::per_second(4.0);
    let cooldown = Cooldown::default()
        .first(Duration::from_millis(1))
        .backoff(Duration::from_millis(4))
        .ceiling(Duration::from_millis(8))
        .window(Duration::from_millis(20));
    let policy = Policy::new(quota, cooldown)
        .with_adaptive(Some(kling_ratelimit::Adaptive::new().start(quota)));
    backend.acquire(&key, &policy).await.unwrap();
    let throttle = async || {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let now = tokio::time::Instant::now();
        backend
            .feedback(&key, &policy, throttled_at(now))
            .await
            .unwrap();
        fleet_rate(&server, &redis_key).await
    };
    for _ in 0..3 {
        throttle().await;
    }
    let lowered = fleet_rate(&server, &redis_key).await;
    assert_eq!(lowered, 4.0 * 0.85 * 0.85 * 0.85);
    // The older script's success, as it wrote it (its rate change aside).
    let () = redis::pipe()
        .cmd("HSET")
        .arg(&redis_key)
        .arg("s")
        .arg(0)
        .ignore()
        .cmd("HDEL")
        .arg(&redis_key)
        .arg("se")
        .ignore()
        .query_async(&mut raw(&server).await)
        .await
        .unwrap();
    assert_eq!(throttle().await, lowered * 0.85, "lowered again");
}

/// Thirty 1302s in a row in Redis (a server refusing every request for half an hour, whatever
/// the pace) lower the fleet's rate three times, the cooldown's `escalate_after` (the ones
/// after the burst backoff leave it), so 292 successes bring it back to 90% of the ceiling it
/// began at, as in process. (Each lowering it left it at 0.8% of the ceiling, out of reach
/// of 1,000 successes.)
#[tokio::test]
async fn a_long_run_of_1302s_in_redis_lowers_the_rate_three_times_and_recovers() {
    let Some(server) = redis() else { return };
    let backend = RedisGcra::new(connect(&server).await);
    let key = BucketKey::account(Some(AccountId::new("adaptive-outage")));
    let redis_key = backend.key_of(&key);
    let quota = Quota::per_second(4.0);
    let policy = Policy::new(quota, Cooldown::default())
        .with_adaptive(Some(kling_ratelimit::Adaptive::new().start(quota)));
    assert_eq!(
        backend.acquire(&key, &policy).await.unwrap(),
        Decision::Admit
    );
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let now = tokio::time::Instant::now();
        backend
            .feedback(&key, &policy, throttled_at(now))
            .await
            .unwrap();
    }
    assert_eq!(
        fleet_rate(&server, &redis_key).await,
        4.0 * 0.85 * 0.85 * 0.85
    );
    for successes in 1..=1000 {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let sent_at = tokio::time::Instant::now();
        backend
            .feedback(&key, &policy, Feedback::Success { sent_at })
            .await
            .unwrap();
        let rate = fleet_rate(&server, &redis_key).await;
        if rate >= 0.9 * 4.0 {
            assert_eq!(successes, 292, "{rate}");
            return;
        }
    }
    panic!(
        "1,000 successes left the rate at {}",
        fleet_rate(&server, &redis_key).await
    );
}

/// A start below the floor (`ceiling / 1000`) is clamped to it in Redis as in process, where
/// the key's first decision writes it (the second request 100 s later, not 1,000 s, for a start
/// of 0.001/s under 10/s) and where its first report does (a 1302 remembers the floor as its
/// limit, not the start, which recovery would then probe from).
#[tokio::test]
async fn a_start_below_the_floor_is_clamped_in_redis_as_in_process() {
    let Some(server) = redis() else { return };
    let backend = RedisGcra::new(connect(&server).await);
    let memory = InProcess::new();
    let policy = Policy::new(
        Quota::per_second(10.0),
        Cooldown::default().first(Duration::from_millis(1)),
    )
    .with_adaptive(Some(
        kling_ratelimit::Adaptive::new().start(Quota::per_second(0.001)),
    ));
    let decided = BucketKey::account(Some(AccountId::new("below-floor-decided")));
    assert_eq!(
        backend.acquire(&decided, &policy).await.unwrap(),
        Decision::Admit
    );
    assert_eq!(fleet_rate(&server, &backend.key_of(&decided)).await, 0.01);
    let now = tokio::time::Instant::now();
    match backend.acquire(&decided, &policy).await.unwrap() {
        Decision::NotBefore { at, cooldown } => {
            assert!(!cooldown);
            let wait = at.saturating_duration_since(now);
            assert!(
                wait > Duration::from_secs(90) && wait < Duration::from_secs(110),
                "{wait:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    // A key whose first word in Redis is a report.
    let reported = BucketKey::account(Some(AccountId::new("below-floor-reported")));
    let redis_key = backend.key_of(&reported);
    for throttled in [true, false] {
        // (The success of a request sent after the pause began: a few ms later, past the
        // fleet clock's rounding.)
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = tokio::time::Instant::now();
        let feedback = if throttled {
            throttled_at(now)
        } else {
            Feedback::Success { sent_at: now }
        };
        backend
            .feedback(&reported, &policy, feedback)
            .await
            .unwrap();
        memory.feedback_now(&reported, &policy, feedback);
    }
    let limit: Option<f64> = redis::cmd("HGET")
        .arg(&redis_key)
        .arg("l")
        .query_async(&mut raw(&server).await)
        .await
        .unwrap();
    assert_eq!(limit, Some(0.01));
    let expected = memory.key_state(&reported).unwrap().adaptive_rate.unwrap();
    let actual = fleet_rate(&server, &redis_key).await;
    assert!(
        (actual - expected).abs() <= expected * 1e-12,
        "in process {expected}, redis {actual}"
    );
}

/// A decision whose answer is lost after Redis admitted it (Redis paused by `CLIENT PAUSE` for
/// 2 s, commands giving up after 200 ms: the decision runs when the pause ends) is not paid
/// for twice: the process's next ask for the key, once Redis answers, is given the cell the
/// lost answer carried (a quota of one in 10 s: no second cell is free before then), and the
/// fleet counts one request. (The asks sent again while Redis was paused were lost too, and
/// each passed the cell on to the next.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_whose_answer_was_lost_after_redis_admitted_it_takes_one_cell() {
    let Some(server) = redis() else { return };
    let backend = RedisGcra::new(impatient(&server).await).retry_every(Duration::from_millis(50));
    let key = BucketKey::account(Some(AccountId::new("lost-admission")));
    let policy = Policy::new(
        Quota::with_period(Duration::from_secs(10)),
        Cooldown::default(),
    );
    // The script is loaded (a decision on another key): the lost one runs when the pause ends.
    let elsewhere = BucketKey::account(Some(AccountId::new("elsewhere")));
    assert_eq!(
        backend.acquire(&elsewhere, &policy).await.unwrap(),
        Decision::Admit
    );
    client_pause(&server, 2000).await;
    let paused = tokio::time::Instant::now();
    let deadline = paused + Duration::from_secs(15);
    let mut asks = 0;
    let admitted = loop {
        asks += 1;
        match backend.acquire(&key, &policy).await.unwrap() {
            Decision::Admit => break tokio::time::Instant::now(),
            Decision::NotBefore { at, .. } => {
                assert!(tokio::time::Instant::now() < deadline, "never admitted");
                tokio::time::sleep_until(
                    at.min(tokio::time::Instant::now() + Duration::from_millis(50)),
                )
                .await;
            }
            other => panic!("{other:?}"),
        }
    };
    assert!(asks > 1, "the first ask was answered: Redis was not paused");
    assert!(
        admitted < paused + Duration::from_millis(2900),
        "admitted {:?} after the pause began: a second cell",
        admitted - paused
    );
    assert_eq!(backend.fleet_requests(key.account_id()).await.unwrap(), 1);
    // The one cell is spent: the next waits for the quota, from the lost ask's decision.
    match backend.acquire(&key, &policy).await.unwrap() {
        Decision::NotBefore { at, .. } => {
            assert!(at > paused + Duration::from_secs(9), "{:?}", at - paused);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(backend.fleet_requests(key.account_id()).await.unwrap(), 1);
}

/// Each process's record of its admitted asks lives in the key's hash (`a:PROCESS`, …); those of
/// processes that wrote none for the idle TTL (gone, say) are dropped when a process writes its
/// first, so a busy key's hash does not keep one per process that ever asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_gone_processes_leave_a_busy_keys_hash() {
    let Some(server) = redis() else { return };
    let key = BucketKey::account(Some(AccountId::new("records")));
    let policy = Policy::new(
        Quota::with_period(Duration::from_millis(1)),
        Cooldown::default(),
    );
    let process = |conn| {
        RedisGcra::new(conn)
            .idle_ttl(Duration::from_secs(1))
            .unwrap()
    };
    let records = || async {
        let fields: Vec<String> = redis::cmd("HKEYS")
            .arg(process(connect(&server).await).key_of(&key))
            .query_async(&mut raw(&server).await)
            .await
            .unwrap();
        fields.iter().filter(|f| f.starts_with("a:")).count()
    };
    let busy = process(connect(&server).await);
    for _ in 0..20 {
        let gone = process(connect(&server).await);
        assert_eq!(gone.acquire(&key, &policy).await.unwrap(), Decision::Admit);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(records().await, 20);
    // The key stays busy past the idle TTL, by one process.
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(busy.acquire(&key, &policy).await.unwrap(), Decision::Admit);
    }
    let new = process(connect(&server).await);
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert_eq!(new.acquire(&key, &policy).await.unwrap(), Decision::Admit);
    assert_eq!(records().await, 2, "the busy process's and the new one's");
}

/// A process's `RedisGcra` that counts the successes its layer reports (each a feedback
/// script sent to Redis), and passes everything on.
#[derive(Clone)]
struct CountingSuccesses {
    redis: RedisGcra,
    successes: Arc<AtomicUsize>,
}

impl CountingSuccesses {
    fn new(redis: RedisGcra) -> CountingSuccesses {
        CountingSuccesses {
            redis,
            successes: Arc::default(),
        }
    }

    fn successes(&self) -> usize {
        self.successes.load(Ordering::SeqCst)
    }
}

impl Backend for CountingSuccesses {
    type AcquireFuture = <RedisGcra as Backend>::AcquireFuture;
    type FeedbackFuture = <RedisGcra as Backend>::FeedbackFuture;

    fn acquire(&self, key: &BucketKey, policy: &Policy) -> Self::AcquireFuture {
        self.redis.acquire(key, policy)
    }

    fn acquire_waiting(
        &self,
        key: &BucketKey,
        policy: &Policy,
        since: tokio::time::Instant,
    ) -> Self::AcquireFuture {
        self.redis.acquire_waiting(key, policy, since)
    }

    fn stop_waiting(&self, key: &BucketKey) {
        self.redis.stop_waiting(key);
    }

    fn feedback(
        &self,
        key: &BucketKey,
        policy: &Policy,
        feedback: Feedback,
    ) -> Self::FeedbackFuture {
        if matches!(feedback, Feedback::Success { .. }) {
            self.successes.fetch_add(1, Ordering::SeqCst);
        }
        self.redis.feedback(key, policy, feedback)
    }

    fn streak_running(&self, key: &BucketKey) -> bool {
        self.redis.streak_running(key)
    }

    fn adaptive_at_ceiling(&self, key: &BucketKey, policy: &Policy) -> bool {
        self.redis.adaptive_at_ceiling(key, policy)
    }
}

/// An adaptive layer (100 a second, first pause 50 ms) starting at `start`, over `backend`,
/// in front of a service that answers every request with success; with its account policy.
fn adaptive_process(
    served: &Served,
    backend: CountingSuccesses,
    start: Quota,
) -> (Layered, Policy) {
    let quota = Quota::per_second(100.0);
    let cooldown = Cooldown::default().first(Duration::from_millis(50));
    let adaptive = kling_ratelimit::Adaptive::new().start(start);
    let layer = GcraLayer::builder(quota)
        .cooldown(cooldown)
        .adaptive(adaptive)
        .backend(backend)
        .build()
        .unwrap();
    let policy = Policy::new(quota, cooldown).with_adaptive(Some(adaptive));
    (served.process_of(&layer), policy)
}

/// Sends requests through `process` one after another until `at_ceiling` says the key is back
/// at its ceiling (at most `limit` of them), checking that the success of each one sent
/// before is reported (`counting` has counted `reported` before the first): how many were
/// sent.
async fn reported_until_at_ceiling(
    process: &Layered,
    counting: &CountingSuccesses,
    key: &BucketKey,
    policy: &Policy,
    limit: usize,
) -> usize {
    let reported = counting.successes();
    let mut sent = 0;
    loop {
        send(process, &format!("below-{sent}"))
            .await
            .unwrap()
            .unwrap();
        sent += 1;
        assert_eq!(
            counting.successes() - reported,
            sent,
            "below its ceiling, every success is reported"
        );
        if counting.adaptive_at_ceiling(key, policy) {
            return sent;
        }
        assert!(
            sent < limit,
            "not back at the ceiling after {sent} successes"
        );
    }
}

/// The adaptive rate Redis holds for `redis_key`.
async fn fleet_rate(server: &kling_redis::testing::RedisServer, redis_key: &str) -> f64 {
    let rate: Option<f64> = redis::cmd("HGET")
        .arg(redis_key)
        .arg("r")
        .query_async(&mut raw(server).await)
        .await
        .unwrap();
    rate.expect("an adaptive key's hash holds its rate")
}

/// An adaptive key at its ceiling (kling-tower's default under a rate cap: it starts there)
/// reports no success to Redis: a success there changes nothing, and the admission's reply
/// says the key is there. Another process's 1302 lowers the rate in Redis; this process
/// learns it from its next admission's reply, and from then reports every success until a
/// report's reply says the rate is back at the ceiling, and none again after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adaptive_key_at_its_ceiling_reports_no_success_until_a_1302_lowers_it() {
    let Some(server) = redis() else { return };
    let a = CountingSuccesses::new(RedisGcra::new(connect(&server).await));
    let b = RedisGcra::new(connect(&server).await);
    let key = BucketKey::account(None);
    let redis_key = b.key_of(&key);
    let served = Served::new();
    let (process, policy) = adaptive_process(&served, a.clone(), Quota::per_second(100.0));
    for i in 0..20 {
        send(&process, &format!("at-{i}")).await.unwrap().unwrap();
    }
    assert_eq!(a.successes(), 0, "at the ceiling, no success is reported");
    assert!(a.adaptive_at_ceiling(&key, &policy));
    assert_eq!(fleet_rate(&server, &redis_key).await, 100.0);
    // Another process's 1302 lowers the fleet's rate; this one learns it when next admitted.
    b.feedback(&key, &policy, throttled_at(tokio::time::Instant::now()))
        .await
        .unwrap();
    assert!(fleet_rate(&server, &redis_key).await < 100.0);
    let sent = reported_until_at_ceiling(&process, &a, &key, &policy, 500).await;
    // From 85 a second: about 12 successes to 97% of the limit, then 0.1 a success.
    assert!(sent > 30, "back at the ceiling after {sent} successes");
    assert_eq!(fleet_rate(&server, &redis_key).await, 100.0);
    for i in 0..20 {
        send(&process, &format!("again-{i}"))
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(
        a.successes(),
        sent,
        "back at the ceiling, no success is reported"
    );
}

/// A key in slow start (its adaptive rate starting below the ceiling) reports every success
/// until the rate reaches the ceiling, then none; a 1302 this process reports takes it off
/// its ceiling at once, before any admission says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adaptive_key_in_slow_start_reports_its_successes_until_at_its_ceiling() {
    let Some(server) = redis() else { return };
    let a = CountingSuccesses::new(RedisGcra::new(connect(&server).await));
    let key = BucketKey::account(None);
    let redis_key = a.redis.key_of(&key);
    let served = Served::new();
    let (process, policy) = adaptive_process(&served, a.clone(), Quota::per_second(50.0));
    // From 50 a second at +5% a success: 15 successes to the ceiling.
    let sent = reported_until_at_ceiling(&process, &a, &key, &policy, 100).await;
    assert_eq!(sent, 15);
    assert_eq!(fleet_rate(&server, &redis_key).await, 100.0);
    for i in 0..10 {
        send(&process, &format!("at-{i}")).await.unwrap().unwrap();
    }
    assert_eq!(a.successes(), sent);
    a.feedback(&key, &policy, throttled_at(tokio::time::Instant::now()))
        .await
        .unwrap();
    assert!(
        !a.adaptive_at_ceiling(&key, &policy),
        "a 1302 here lowers the rate"
    );
}

/// A key at its adaptive ceiling whose 1302 streak runs (another process, without the adaptive
/// rule, reported the 1302: the rate stays at the ceiling) is not at its ceiling for this
/// answer: a success would reset the streak, so this process reports its first success after
/// the pause, and none after that reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streak_another_process_started_is_reset_by_a_success_at_the_ceiling() {
    let Some(server) = redis() else { return };
    let a = CountingSuccesses::new(RedisGcra::new(connect(&server).await));
    let b = RedisGcra::new(connect(&server).await);
    let key = BucketKey::account(None);
    let redis_key = b.key_of(&key);
    let served = Served::new();
    let (process, policy) = adaptive_process(&served, a.clone(), Quota::per_second(100.0));
    send(&process, "first").await.unwrap().unwrap();
    assert_eq!(a.successes(), 0);
    let fixed = Policy::new(policy.quota, policy.cooldown);
    b.feedback(&key, &fixed, throttled_at(tokio::time::Instant::now()))
        .await
        .unwrap();
    assert_eq!(fleet_streak(&server, &redis_key).await, 1);
    assert_eq!(fleet_rate(&server, &redis_key).await, 100.0);
    send(&process, "after").await.unwrap().unwrap();
    assert_eq!(a.successes(), 1, "the success after the pause is reported");
    assert_eq!(
        fleet_streak(&server, &redis_key).await,
        0,
        "and resets the streak"
    );
    assert!(a.adaptive_at_ceiling(&key, &policy));
    for i in 0..10 {
        send(&process, &format!("again-{i}"))
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(a.successes(), 1);
}

/// A 1302 this process reports takes its key off the ceiling here at once, also when Redis
/// does not take the report (it is away): the successes after it are reported (they are kept
/// to the fallback, or fail), not left out on the word of an admission from before the 1302.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1302_redis_could_not_take_still_takes_the_key_off_its_ceiling_here() {
    let Some(mut server) = redis() else { return };
    let backend = RedisGcra::new(impatient(&server).await);
    let key = BucketKey::account(Some(AccountId::new("ceiling-away")));
    let quota = Quota::per_second(100.0);
    let policy = Policy::new(quota, Cooldown::default())
        .with_adaptive(Some(kling_ratelimit::Adaptive::new().start(quota)));
    assert_eq!(
        backend.acquire(&key, &policy).await.unwrap(),
        Decision::Admit
    );
    assert!(backend.adaptive_at_ceiling(&key, &policy));
    // Another ceiling (a quota changed since the admission) is not the one Redis spoke of.
    let raised = Policy::new(Quota::per_second(200.0), Cooldown::default())
        .with_adaptive(Some(kling_ratelimit::Adaptive::new().start(quota)));
    assert!(!backend.adaptive_at_ceiling(&key, &raised));
    server.stop();
    let reported = backend
        .feedback(&key, &policy, throttled_at(tokio::time::Instant::now()))
        .await;
    assert!(reported.is_err(), "{reported:?}");
    assert!(!backend.adaptive_at_ceiling(&key, &policy));
}

/// Asks `backend` for `key` under `policy` until it admits, sleeping until each instant it
/// names.
async fn admitted(backend: &RedisGcra, key: &BucketKey, policy: &Policy) {
    for _ in 0..100 {
        match backend.acquire(key, policy).await.unwrap() {
            Decision::Admit => return,
            Decision::NotBefore { at, .. } => tokio::time::sleep_until(at).await,
            other => panic!("{other:?}"),
        }
    }
    panic!("never admitted");
}

/// A key whose adaptive rate is above its ceiling (the ceiling lowered since: a quota change,
/// and no decision under it yet, which would cap the rate) is not at its ceiling: a success
/// brings the rate down to it, as `AdaptiveState` does, so it is reported, and the next 1302
/// lowers the rate below the new ceiling as in process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_above_a_lowered_ceiling_is_not_at_the_ceiling() {
    let Some(server) = redis() else { return };
    let backend = RedisGcra::new(connect(&server).await);
    let key = BucketKey::account(Some(AccountId::new("ceiling-lowered")));
    let redis_key = backend.key_of(&key);
    let quota = Quota::per_second(100.0);
    let config = kling_ratelimit::Adaptive::new().start(quota);
    let policy = Policy::new(quota, Cooldown::default()).with_adaptive(Some(config));
    admitted(&backend, &key, &policy).await;
    assert!(backend.adaptive_at_ceiling(&key, &policy));
    let lowered =
        Policy::new(Quota::per_second(50.0), Cooldown::default()).with_adaptive(Some(config));
    assert_eq!(fleet_rate(&server, &redis_key).await, 100.0);
    assert!(
        !backend.adaptive_at_ceiling(&key, &lowered),
        "a success would lower the rate to the new ceiling"
    );
    let mut model = kling_ratelimit::AdaptiveState::new(&config, 100.0);
    let now = tokio::time::Instant::now();
    backend
        .feedback(&key, &lowered, Feedback::Success { sent_at: now })
        .await
        .unwrap();
    model.on_success(&config, 50.0);
    assert_eq!(fleet_rate(&server, &redis_key).await, model.rate());
    assert!(backend.adaptive_at_ceiling(&key, &lowered));
    backend
        .feedback(&key, &lowered, throttled_at(tokio::time::Instant::now()))
        .await
        .unwrap();
    model.on_throttle(&config, 50.0, 1, &Cooldown::default());
    assert!(model.rate() < 50.0);
    assert_eq!(fleet_rate(&server, &redis_key).await, model.rate());
}

/// The adaptive limit Redis remembers for `redis_key`, if any.
async fn fleet_limit(server: &kling_redis::testing::RedisServer, redis_key: &str) -> Option<f64> {
    redis::cmd("HGET")
        .arg(redis_key)
        .arg("l")
        .query_async(&mut raw(server).await)
        .await
        .unwrap()
}

/// As kling-ratelimit's `a_1302_after_the_ceiling_is_lowered_lowers_the_rate_below_it`: a
/// ceiling lowered (a quota change) under a key whose rate was above it, then a 1302 with no
/// success between. The key's next decision caps the rate Redis holds, and the 1302 lowers the
/// rate from the rate enforced (the new ceiling) and remembers that as the limit: lowered
/// from the old rate it was clamped back to the ceiling just refused, and the limit was the
/// old rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1302_after_the_ceiling_is_lowered_lowers_the_rate_below_it() {
    let Some(server) = redis() else { return };
    let backend = RedisGcra::new(connect(&server).await);
    let key = BucketKey::account(Some(AccountId::new("ceiling-lowered-1302")));
    let redis_key = backend.key_of(&key);
    let high = Quota::per_second(100.0);
    let config = kling_ratelimit::Adaptive::new().start(high);
    let policy = Policy::new(high, Cooldown::default()).with_adaptive(Some(config));
    admitted(&backend, &key, &policy).await;
    assert_eq!(fleet_rate(&server, &redis_key).await, 100.0);
    let lowered =
        Policy::new(Quota::per_second(25.0), Cooldown::default()).with_adaptive(Some(config));
    admitted(&backend, &key, &lowered).await;
    assert_eq!(
        fleet_rate(&server, &redis_key).await,
        25.0,
        "capped by the new ceiling"
    );
    assert!(backend.adaptive_at_ceiling(&key, &lowered));
    backend
        .feedback(&key, &lowered, throttled_at(tokio::time::Instant::now()))
        .await
        .unwrap();
    let mut model = kling_ratelimit::AdaptiveState::new(&config, 100.0);
    model.on_throttle(&config, 25.0, 1, &Cooldown::default());
    assert_eq!((model.rate(), model.limit()), (25.0 * 0.85, Some(25.0)));
    assert_eq!(fleet_rate(&server, &redis_key).await, model.rate());
    assert_eq!(fleet_limit(&server, &redis_key).await, model.limit());
    assert!(!backend.adaptive_at_ceiling(&key, &lowered));
}

/// A 1302 reported under a lowered ceiling before any decision under it (its request was
/// admitted under the old quota) lowers the rate from the new ceiling, not from the rate Redis
/// still holds above it, as `AdaptiveState::on_throttle` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1302_reported_under_a_lowered_ceiling_lowers_the_rate_from_it() {
    let Some(server) = redis() else { return };
    let backend = RedisGcra::new(connect(&server).await);
    let key = BucketKey::account(Some(AccountId::new("ceiling-lowered-report")));
    let redis_key = backend.key_of(&key);
    let high = Quota::per_second(100.0);
    let config = kling_ratelimit::Adaptive::new().start(high);
    let policy = Policy::new(high, Cooldown::default()).with_adaptive(Some(config));
    admitted(&backend, &key, &policy).await;
    let lowered =
        Policy::new(Quota::per_second(25.0), Cooldown::default()).with_adaptive(Some(config));
    backend
        .feedback(&key, &lowered, throttled_at(tokio::time::Instant::now()))
        .await
        .unwrap();
    let mut model = kling_ratelimit::AdaptiveState::new(&config, 100.0);
    model.on_throttle(&config, 25.0, 1, &Cooldown::default());
    assert_eq!(fleet_rate(&server, &redis_key).await, model.rate());
    assert_eq!(fleet_limit(&server, &redis_key).await, model.limit());
}

/// Admits `key` under `policy` in `fleet` and in `memory` (in process), a moment after the
/// last decision so both have a cell.
async fn admit_in_both(fleet: &RedisGcra, memory: &InProcess, key: &BucketKey, policy: &Policy) {
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fleet.acquire(key, policy).await.unwrap(), Decision::Admit);
    assert_eq!(memory.acquire_now(key, policy), Decision::Admit);
}

/// A success of `key` under `policy`, reported to `fleet` and to `memory` as the layer does:
/// unless the backend says the key is at its ceiling.
async fn succeed_in_both(fleet: &RedisGcra, memory: &InProcess, key: &BucketKey, policy: &Policy) {
    let success = Feedback::Success {
        sent_at: tokio::time::Instant::now(),
    };
    if !fleet.adaptive_at_ceiling(key, policy) {
        fleet.feedback(key, policy, success).await.unwrap();
    }
    if !memory.adaptive_at_ceiling(key, policy) {
        memory.feedback_now(key, policy, success);
    }
}

/// The fleet's adaptive rate for `key` and whether it is at its ceiling under `policy` are
/// the in-process backend's (`memory`) at `step`, after an admission (the in-process answer
/// is the one its last decision on this thread noted).
async fn agree(
    step: &str,
    server: &kling_redis::testing::RedisServer,
    fleet: &RedisGcra,
    memory: &InProcess,
    key: &BucketKey,
    policy: &Policy,
) {
    let expected = memory.key_state(key).unwrap().adaptive_rate.unwrap();
    let actual = fleet_rate(server, &fleet.key_of(key)).await;
    assert!(
        (actual - expected).abs() <= expected * 1e-12,
        "{step}: in process {expected}, redis {actual}"
    );
    assert_eq!(
        fleet.adaptive_at_ceiling(key, policy),
        memory.adaptive_at_ceiling(key, policy),
        "{step}: at the ceiling in redis, as in process"
    );
}

/// A key is at its adaptive ceiling (its successes go unreported) only when a success would
/// change nothing, as in process: not while a caution a success would end is held (`k`: a
/// ceiling lowered near the limit of a 1302 with a long `Retry-After`), nor after a 1302 with
/// no success since (the ceiling lowered below the rate it left; a success ends the run of
/// lowerings that bounds how far 1302s lower the rate). Said at the ceiling with the caution
/// held, the fleet kept it: with the ceiling raised again, its first success took the rate to
/// 100.5/s where the process went to 132/s.
#[tokio::test]
async fn an_adaptive_key_is_at_its_ceiling_only_when_a_success_would_change_nothing() {
    let Some(server) = redis() else { return };
    let fleet = RedisGcra::new(connect(&server).await);
    let memory = InProcess::new();
    let key = BucketKey::account(Some(AccountId::new("ceiling-as-in-process")));
    let mut adaptive = kling_ratelimit::Adaptive::new().start(Quota::per_second(100.0));
    adaptive.probe = 0.35;
    let cooldown = Cooldown::default()
        .first(Duration::from_millis(1))
        .window(Duration::from_millis(1));
    let under = |ceiling: f64| {
        Policy::new(Quota::per_second(ceiling), cooldown).with_adaptive(Some(adaptive))
    };
    let (at_100, at_97, at_200) = (under(100.0), under(97.0), under(200.0));
    admit_in_both(&fleet, &memory, &key, &at_100).await;
    agree("start", &server, &fleet, &memory, &key, &at_100).await;
    assert!(fleet.adaptive_at_ceiling(&key, &at_100));
    // A 1302 with a 3 s `Retry-After` (over already): the caution is ten, the probe 3.5/s.
    let now = tokio::time::Instant::now();
    let costly = Feedback::Pause {
        sent_at: now - Duration::from_secs(4),
        received_at: now - Duration::from_secs(4),
        resume_at: Some(now - Duration::from_secs(1)),
        throttled: true,
    };
    fleet.feedback(&key, &at_100, costly).await.unwrap();
    memory.feedback_now(&key, &at_100, costly);
    agree("1302", &server, &fleet, &memory, &key, &at_100).await;
    // 85, 88.5, 92, 95.5, 99: within a probe step of the limit.
    for i in 0..4 {
        succeed_in_both(&fleet, &memory, &key, &at_100).await;
        agree(
            &format!("success {i}"),
            &server,
            &fleet,
            &memory,
            &key,
            &at_100,
        )
        .await;
    }
    // The ceiling lowered to 97/s caps the rate; a success there would end the caution.
    admit_in_both(&fleet, &memory, &key, &at_97).await;
    agree("lowered", &server, &fleet, &memory, &key, &at_97).await;
    assert!(!fleet.adaptive_at_ceiling(&key, &at_97));
    succeed_in_both(&fleet, &memory, &key, &at_97).await;
    admit_in_both(&fleet, &memory, &key, &at_97).await;
    agree("caution ended", &server, &fleet, &memory, &key, &at_97).await;
    assert!(fleet.adaptive_at_ceiling(&key, &at_97));
    // Raised again: the probe is the usual one.
    admit_in_both(&fleet, &memory, &key, &at_200).await;
    succeed_in_both(&fleet, &memory, &key, &at_200).await;
    agree("raised", &server, &fleet, &memory, &key, &at_200).await;
    assert!(fleet_rate(&server, &fleet.key_of(&key)).await > 130.0);
    // A 1302 (its pause and window over), then the ceiling lowered below the rate it left:
    // at the ceiling only after a success.
    let now = tokio::time::Instant::now();
    let bare = Feedback::Pause {
        sent_at: now - Duration::from_millis(50),
        received_at: now - Duration::from_millis(50),
        resume_at: None,
        throttled: true,
    };
    fleet.feedback(&key, &at_200, bare).await.unwrap();
    memory.feedback_now(&key, &at_200, bare);
    agree("second 1302", &server, &fleet, &memory, &key, &at_200).await;
    admit_in_both(&fleet, &memory, &key, &at_100).await;
    agree("lowered again", &server, &fleet, &memory, &key, &at_100).await;
    assert!(!fleet.adaptive_at_ceiling(&key, &at_100));
    succeed_in_both(&fleet, &memory, &key, &at_100).await;
    admit_in_both(&fleet, &memory, &key, &at_100).await;
    agree(
        "run of 1302s ended",
        &server,
        &fleet,
        &memory,
        &key,
        &at_100,
    )
    .await;
    assert!(fleet.adaptive_at_ceiling(&key, &at_100));
}

/// The adaptive rule and cooldown [`an_adaptive_key_is_at_its_ceiling_only_when_a_success_would_change_nothing`]
/// compares the fleet with the process under, at `ceiling` requests a second: a 1302 with a
/// 3 s `Retry-After` sets a caution of ten (a probe of 3.5/s), and pauses and streak windows
/// are over in milliseconds.
fn cautious_at(ceiling: f64) -> Policy {
    let mut adaptive = kling_ratelimit::Adaptive::new().start(Quota::per_second(100.0));
    adaptive.probe = 0.35;
    let cooldown = Cooldown::default()
        .first(Duration::from_millis(1))
        .window(Duration::from_millis(1));
    Policy::new(Quota::per_second(ceiling), cooldown).with_adaptive(Some(adaptive))
}

/// A 1302 that arrived 4 s ago with a 3 s `Retry-After` (its pause over), reported to `fleet`
/// and to `memory`: it lowers the rate, remembers the limit, and sets a caution of ten.
async fn costly_1302_in_both(
    fleet: &RedisGcra,
    memory: &InProcess,
    key: &BucketKey,
    policy: &Policy,
) {
    let now = tokio::time::Instant::now();
    let costly = Feedback::Pause {
        sent_at: now - Duration::from_secs(4),
        received_at: now - Duration::from_secs(4),
        resume_at: Some(now - Duration::from_secs(1)),
        throttled: true,
    };
    fleet.feedback(key, policy, costly).await.unwrap();
    memory.feedback_now(key, policy, costly);
}

/// A report's reply says the key is at its ceiling only when the next success would change
/// nothing, as an admission's does: not when the report left the rate at the ceiling with a
/// caution the next success ends, nor when a success sent before the last 1302 (which ends
/// nothing) leaves that 1302's run of lowerings in place, its streak window over. Said at the
/// ceiling, the process would leave the next success (of a request admitted before) unreported,
/// and the fleet would keep what the process ends.
#[tokio::test]
async fn a_reports_reply_is_at_the_ceiling_only_when_the_next_success_would_change_nothing() {
    let Some(server) = redis() else { return };
    let fleet = RedisGcra::new(connect(&server).await);
    let memory = InProcess::new();
    let key = BucketKey::account(Some(AccountId::new("report-at-ceiling-as-in-process")));
    let (at_100, at_97, at_50) = (cautious_at(100.0), cautious_at(97.0), cautious_at(50.0));
    admit_in_both(&fleet, &memory, &key, &at_100).await;
    costly_1302_in_both(&fleet, &memory, &key, &at_100).await;
    // Under a ceiling of 97/s: 85, 88.5, 92, 95.5.
    admit_in_both(&fleet, &memory, &key, &at_97).await;
    for i in 0..3 {
        succeed_in_both(&fleet, &memory, &key, &at_97).await;
        admit_in_both(&fleet, &memory, &key, &at_97).await;
        agree(
            &format!("success {i}"),
            &server,
            &fleet,
            &memory,
            &key,
            &at_97,
        )
        .await;
    }
    // 95.5 + 3.5 = 99: the ceiling, the caution held (below the limit, 100); the next success
    // (97 + 3.5) ends it, so this one's reply is not at the ceiling.
    succeed_in_both(&fleet, &memory, &key, &at_97).await;
    assert!(
        !fleet.adaptive_at_ceiling(&key, &at_97),
        "a caution the next success ends is held"
    );
    succeed_in_both(&fleet, &memory, &key, &at_97).await;
    admit_in_both(&fleet, &memory, &key, &at_97).await;
    agree("caution ended", &server, &fleet, &memory, &key, &at_97).await;
    assert!(fleet.adaptive_at_ceiling(&key, &at_97));
    // A 1302 (its pause and window over in milliseconds) lowers the rate; the ceiling lowered
    // below what it left puts the rate at the ceiling, the run of lowerings still there.
    let now = tokio::time::Instant::now();
    let received_at = now - Duration::from_millis(50);
    let bare = Feedback::Pause {
        sent_at: received_at,
        received_at,
        resume_at: None,
        throttled: true,
    };
    fleet.feedback(&key, &at_97, bare).await.unwrap();
    memory.feedback_now(&key, &at_97, bare);
    admit_in_both(&fleet, &memory, &key, &at_50).await;
    agree(
        "lowered below the 1302's rate",
        &server,
        &fleet,
        &memory,
        &key,
        &at_50,
    )
    .await;
    assert!(!fleet.adaptive_at_ceiling(&key, &at_50));
    // A success of a request sent before that 1302 ends nothing.
    let sent_before = Feedback::Success {
        sent_at: received_at - Duration::from_millis(20),
    };
    fleet.feedback(&key, &at_50, sent_before).await.unwrap();
    memory.feedback_now(&key, &at_50, sent_before);
    assert!(
        !fleet.adaptive_at_ceiling(&key, &at_50),
        "the 1302's run of lowerings is still there"
    );
    succeed_in_both(&fleet, &memory, &key, &at_50).await;
    admit_in_both(&fleet, &memory, &key, &at_50).await;
    agree("run of 1302s ended", &server, &fleet, &memory, &key, &at_50).await;
    assert!(fleet.adaptive_at_ceiling(&key, &at_50));
}

/// A caution a success would not end (the ceiling lowered far below the limit: the probe
/// step from the ceiling stays below it) leaves the key at its ceiling, as in process, in both
/// acquire scripts: a single key's, and Reject mode's class request, which decides the account
/// key with the adaptive target and probe too. Each is asked by a process that has not heard
/// of the key before, so only that admission's reply can say so.
#[tokio::test]
async fn a_caution_a_success_would_not_end_leaves_the_key_at_its_ceiling_in_both_scripts() {
    let Some(server) = redis() else { return };
    let fleet = RedisGcra::new(connect(&server).await);
    let memory = InProcess::new();
    let account = AccountId::new("caution-kept-at-ceiling");
    let key = BucketKey::account(Some(account.clone()));
    let class = BucketKey::class(Some(account), kling_core::RequestKind::Account);
    let class_policy = Policy::new(Quota::per_second(1000.0), Cooldown::default());
    let (at_100, at_90) = (cautious_at(100.0), cautious_at(90.0));
    admit_in_both(&fleet, &memory, &key, &at_100).await;
    costly_1302_in_both(&fleet, &memory, &key, &at_100).await;
    // Under a ceiling of 90/s: 85, 88.5, then 92 capped at 90, the caution held (below 100).
    admit_in_both(&fleet, &memory, &key, &at_90).await;
    for i in 0..2 {
        succeed_in_both(&fleet, &memory, &key, &at_90).await;
        admit_in_both(&fleet, &memory, &key, &at_90).await;
        agree(
            &format!("success {i}"),
            &server,
            &fleet,
            &memory,
            &key,
            &at_90,
        )
        .await;
    }
    // 90 + 3.5 < 100: a success changes nothing.
    assert!(memory.adaptive_at_ceiling(&key, &at_90), "in process");
    let single = RedisGcra::new(connect(&server).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(single.acquire(&key, &at_90).await.unwrap(), Decision::Admit);
    assert!(
        single.adaptive_at_ceiling(&key, &at_90),
        "a single key's admission"
    );
    let classed = RedisGcra::new(connect(&server).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let decided = classed
        .acquire_class_or_refuse(&class, &class_policy, &key, &at_90, &mut None)
        .expect("redis decides both turns in one script")
        .await
        .unwrap();
    assert_eq!(decided, Decision::Admit);
    let (in_process, _) = memory.acquire_class_now(&class, &class_policy, &key, &at_90);
    assert_eq!(in_process, Decision::Admit);
    assert!(memory.adaptive_at_ceiling(&key, &at_90), "in process");
    assert!(
        classed.adaptive_at_ceiling(&key, &at_90),
        "a class request's admission"
    );
    agree("class request", &server, &classed, &memory, &key, &at_90).await;
}

/// While Redis is away the fallback decides, and its own adaptive rate (in slow start: it
/// starts a quarter of the ceiling) grows only by the successes reported to it: a key Redis
/// said was at its ceiling before it went away is not at its ceiling for this answer then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_away_an_adaptive_key_reports_its_successes_to_the_fallback() {
    let Some(mut server) = redis() else { return };
    let backend =
        RedisGcra::new(impatient(&server).await).when_unreachable(WhenUnreachable::fallback(1));
    let key = BucketKey::account(Some(AccountId::new("ceiling-fallback")));
    let policy = Policy::new(Quota::per_second(100.0), Cooldown::default())
        .with_adaptive(Some(kling_ratelimit::Adaptive::new()));
    // Slow start in Redis, from 25 a second to the ceiling.
    let mut successes = 0;
    loop {
        admitted(&backend, &key, &policy).await;
        if backend.adaptive_at_ceiling(&key, &policy) {
            break;
        }
        let sent_at = tokio::time::Instant::now();
        backend
            .feedback(&key, &policy, Feedback::Success { sent_at })
            .await
            .unwrap();
        successes += 1;
        assert!(successes < 100, "never at the ceiling");
    }
    server.stop();
    // The fallback admits, from its own slow start.
    assert_eq!(
        backend.acquire(&key, &policy).await.unwrap(),
        Decision::Admit
    );
    assert!(
        !backend.adaptive_at_ceiling(&key, &policy),
        "the fallback's rate is not at the ceiling"
    );
    let sent_at = tokio::time::Instant::now();
    backend
        .feedback(&key, &policy, Feedback::Success { sent_at })
        .await
        .expect("the fallback takes the success");
}

/// An admission whose script ran before this process's 1302 reached Redis, and whose reply is
/// noted after that 1302 was reported, does not put the key back at its ceiling: the successes
/// after the 1302 are reported (one of them resets the streak), not left out on its word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admission_from_before_a_1302_does_not_put_the_key_back_at_its_ceiling() {
    use std::task::{Context, Waker};
    let Some(server) = redis() else { return };
    let backend = RedisGcra::new(connect(&server).await);
    let key = BucketKey::account(Some(AccountId::new("ceiling-stale")));
    let redis_key = backend.key_of(&key);
    let quota = Quota::per_second(100.0);
    let policy = Policy::new(quota, Cooldown::default())
        .with_adaptive(Some(kling_ratelimit::Adaptive::new().start(quota)));
    admitted(&backend, &key, &policy).await;
    assert!(backend.adaptive_at_ceiling(&key, &policy));
    let tat = || async {
        let tat: Option<i64> = redis::cmd("HGET")
            .arg(&redis_key)
            .arg("t")
            .query_async(&mut raw(&server).await)
            .await
            .unwrap();
        tat
    };
    // Polled once (with no waker): its script goes to Redis, and once Redis has run it, its
    // reply waits unread until the 1302 below is reported. On a fast loopback the reply can
    // come back within that first poll (the connection's driver runs on the other worker):
    // then the ask is over, and another is made.
    let mut cx = Context::from_waker(Waker::noop());
    let mut tries = 0;
    let (stale, before) = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before = tat().await;
        let mut stale = backend.acquire(&key, &policy);
        if stale.as_mut().poll(&mut cx).is_pending() {
            break (stale, before);
        }
        tries += 1;
        assert!(tries < 50, "every ask was decided within its first poll");
    };
    assert!(backend.adaptive_at_ceiling(&key, &policy));
    let mut waited = 0;
    while tat().await == before {
        tokio::time::sleep(Duration::from_millis(2)).await;
        waited += 1;
        assert!(waited < 1000, "the admission never reached Redis");
    }
    backend
        .feedback(&key, &policy, throttled_at(tokio::time::Instant::now()))
        .await
        .unwrap();
    assert!(!backend.adaptive_at_ceiling(&key, &policy));
    assert_eq!(stale.await.unwrap(), Decision::Admit);
    assert!(
        !backend.adaptive_at_ceiling(&key, &policy),
        "an admission from before the 1302 put the key back at its ceiling"
    );
}
