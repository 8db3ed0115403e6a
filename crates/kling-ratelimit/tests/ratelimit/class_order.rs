//! Property: over random mixes of creates and `/account/costs` requests (a class quota of its
//! own), 1302s that pause the account, callers that give up and quota changes, every request
//! completes, none waits on, the class requests go out in the order they arrived and a class
//! turn apart, and so do the creates; and none reaches the server while a 1302 pauses the
//! account, over the in-process backend or a store whose asks and reports take a round trip.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use kling_core::{BoxError, RequestKind};
use kling_ratelimit::backend::Reported;
use kling_ratelimit::error::BackendError;
use kling_ratelimit::{
    Backend, BucketKey, Decision, Feedback, GcraHandle, GcraLayer, InProcess, Policy, Quota,
};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Layer, ServiceExt};

use crate::support::{Reply, Req, Res, Server, request, request_to};

/// The round trip of [`RoundTrips`]' asks and reports.
const ROUND_TRIP: Duration = Duration::from_millis(6);

/// The in-process backend as a remote store answers: each ask and each report takes
/// [`ROUND_TRIP`], and the store decides halfway.
#[derive(Debug, Default)]
struct RoundTrips(Arc<InProcess>);

type Boxed<T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send>>;

impl Backend for RoundTrips {
    type AcquireFuture = Boxed<Decision>;
    type FeedbackFuture = Boxed<Reported>;

    fn acquire(&self, key: &BucketKey, policy: &Policy) -> Self::AcquireFuture {
        let (store, key, policy) = (Arc::clone(&self.0), key.clone(), *policy);
        Box::pin(async move {
            tokio::time::sleep(ROUND_TRIP / 2).await;
            let decision = store.acquire_now(&key, &policy);
            tokio::time::sleep(ROUND_TRIP / 2).await;
            Ok(decision)
        })
    }

    fn feedback(
        &self,
        key: &BucketKey,
        policy: &Policy,
        feedback: Feedback,
    ) -> Self::FeedbackFuture {
        let (store, key, policy) = (Arc::clone(&self.0), key.clone(), *policy);
        Box::pin(async move {
            tokio::time::sleep(ROUND_TRIP / 2).await;
            let reported = store.feedback_now(&key, &policy, feedback);
            tokio::time::sleep(ROUND_TRIP / 2).await;
            Ok(reported)
        })
    }
}

/// What a run's requests go through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Through {
    /// The layer over the in-process backend.
    Layer,
    /// The layer over [`RoundTrips`].
    Store,
    /// The bare client: the negative control of the pause check.
    Bare,
}

/// What a run changes and reads at run time, whichever backend its layer runs on.
struct Handle {
    set_quota: Box<dyn Fn(Quota)>,
    set_class_quota: Box<dyn Fn(Quota)>,
    waiting: Box<dyn Fn() -> usize>,
}

impl<Bk: Backend> From<GcraHandle<Bk>> for Handle {
    fn from(handle: GcraHandle<Bk>) -> Self {
        let (class, count) = (handle.clone(), handle.clone());
        Handle {
            set_quota: Box::new(move |quota| handle.set_quota(quota).unwrap()),
            set_class_quota: Box::new(move |quota| {
                class.set_class_quota(RequestKind::Account, quota).unwrap();
            }),
            waiting: Box::new(move || count.waiting()),
        }
    }
}

/// A small deterministic generator (tests replay the same runs).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[derive(Clone, Copy)]
struct Run {
    seed: u64,
    max_queue: Option<usize>,
    max_wait: Option<Duration>,
    /// Callers drop a quarter of the requests at random instants.
    drops: bool,
    /// Both quotas change at random instants.
    changes: bool,
    through: Through,
}

/// What the server saw in one run.
struct Sent {
    /// The order and instants (ms from the start) the requests reached the server.
    times: Vec<(String, u128)>,
    /// The requests that reached it while a 1302 paused the account: after the 1302's answer
    /// arrived (plus a round trip of the store, whose decisions may not know of it yet) and
    /// before the shortest pause it asks for ended (1 s: a first 1302's, or its
    /// `Retry-After: 1`).
    during_pauses: Vec<String>,
}

/// Forty requests of one account, a class request (`c…`) or a create (`p…`) each, up to
/// 300 ms apart, against a server that answers one in ten with a 1302 (half of them with
/// `Retry-After: 1`) after up to 50 ms. Returns what the server saw.
fn sends(run: Run) -> Sent {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let seed = run.seed;
        let mut rng = Lcg(seed);
        let latency = Duration::from_millis(rng.below(50));
        let server = Server::with_latency(latency);
        let mut script = Vec::new();
        let mut throttled = Vec::new();
        for _ in 0..200 {
            let answer = rng.below(10);
            throttled.push(answer < 2);
            script.push(match answer {
                0 => Reply::throttled(),
                1 => Reply::throttled().header("retry-after", "1"),
                _ => Reply::ok(),
            });
        }
        server.script(script);
        let mut builder = GcraLayer::builder(Quota::per_second(5.0))
            .class_quota(RequestKind::Account, Quota::per_second(1.0));
        if let Some(max) = run.max_queue {
            builder = builder.max_queue(max);
        }
        if let Some(max) = run.max_wait {
            builder = builder.max_wait(max);
        }
        let (service, handle): (BoxCloneService<Req, Res, BoxError>, _) = match run.through {
            Through::Layer => {
                let layer = builder.build().unwrap();
                let service = BoxCloneService::new(layer.layer(server.service()));
                (service, Some(Handle::from(layer.handle())))
            }
            Through::Store => {
                let layer = builder.backend(RoundTrips::default()).build().unwrap();
                let service = BoxCloneService::new(layer.layer(server.service()));
                (service, Some(Handle::from(layer.handle())))
            }
            Through::Bare => (BoxCloneService::new(server.service()), None),
        };
        let start = Instant::now();
        let mut calls = Vec::new();
        for i in 0..40 {
            tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
            let class = rng.below(2) == 0;
            let tag = format!("{}{i}", if class { 'c' } else { 'p' });
            let req = if class {
                request_to("/account/costs", Some("a"), &tag)
            } else {
                request(Some("a"), &tag)
            };
            let call = tokio::spawn(service.clone().oneshot(req));
            let drop_after =
                (rng.below(4) == 0 && run.drops).then(|| Duration::from_millis(rng.below(3000)));
            calls.push((i, tag, call, drop_after));
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            if rng.below(8) == 0 && run.changes {
                let quota = Quota::per_second(1.0 + rng.below(8) as f64);
                if let Some(handle) = &handle {
                    (handle.set_quota)(quota);
                }
            }
            if rng.below(8) == 0 && run.changes {
                let quota = Quota::per_second(0.5 + rng.below(4) as f64);
                if let Some(handle) = &handle {
                    (handle.set_class_quota)(quota);
                }
            }
        }
        // The requests whose callers gave up before the answer: the layer never saw it.
        let mut unanswered = Vec::new();
        for (i, tag, call, drop_after) in calls {
            if let Some(after) = drop_after {
                let abort = call.abort_handle();
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    abort.abort();
                });
                if call.await.is_err() {
                    unanswered.push(tag);
                }
                continue;
            }
            // Refusals (a full queue, a wait past its limit) are fine; waiting for ever is not.
            let answer = tokio::time::timeout(Duration::from_secs(3600), call).await;
            assert!(answer.is_ok(), "seed {seed}: request {i} never completed");
        }
        let waiting = handle.as_ref().map_or(0, |handle| (handle.waiting)());
        assert_eq!(waiting, 0, "seed {seed}: waiters left");
        let hits = server.hits();
        let slack = if run.through == Through::Store {
            ROUND_TRIP
        } else {
            Duration::ZERO
        };
        let mut during_pauses = Vec::new();
        let seen = |hit: &&crate::support::Hit| !unanswered.contains(&hit.tag);
        for (hit, _) in hits.iter().zip(&throttled).filter(|(h, t)| **t && seen(h)) {
            let answered = hit.at + latency;
            let (from, until) = (answered + slack, answered + Duration::from_secs(1));
            during_pauses.extend(
                hits.iter()
                    .filter(|h| h.at > from && h.at < until)
                    .map(|h| format!("{} at {:?}", h.tag, h.at - start)),
            );
        }
        Sent {
            times: server.times_ms(start),
            during_pauses,
        }
    })
}

/// Whether the requests tagged with `prefix` reached the server in the order they arrived.
fn in_order(sent: &[(String, u128)], prefix: char) -> bool {
    let order: Vec<u32> = sent
        .iter()
        .filter_map(|(tag, _)| tag.strip_prefix(prefix)?.parse().ok())
        .collect();
    order.is_sorted()
}

fn check(run: Run) {
    let Sent {
        times: sent,
        during_pauses,
    } = sends(run);
    let seed = run.seed;
    assert!(
        during_pauses.is_empty(),
        "seed {seed}: sent during a pause: {during_pauses:?}"
    );
    assert!(
        in_order(&sent, 'c'),
        "seed {seed}: costs out of order: {sent:?}"
    );
    assert!(
        in_order(&sent, 'p'),
        "seed {seed}: creates out of order: {sent:?}"
    );
    if !run.changes {
        let costs: Vec<u128> = sent
            .iter()
            .filter(|(tag, _)| tag.starts_with('c'))
            .map(|(_, at)| *at)
            .collect();
        for pair in costs.windows(2) {
            assert!(
                pair[1] + 1 >= pair[0] + 1000,
                "seed {seed}: costs at {pair:?}"
            );
        }
    }
}

/// Class requests go out in the order they came. Before, about one run in three sent one
/// after a class request that came after it: a class request that met the account's pause at
/// the head of the account's queue went back to its class gate and joined the account's
/// queue again behind those that queued after it, and one that went back again stood behind
/// those that had gone back before it, though it passed the class gate first.
#[test]
fn class_requests_keep_their_order_through_pauses() {
    for seed in 0..200 {
        for drops in [false, true] {
            check(Run {
                seed,
                max_queue: None,
                max_wait: None,
                drops,
                changes: false,
                through: Through::Layer,
            });
            check(Run {
                seed,
                max_queue: Some(3),
                max_wait: None,
                drops,
                changes: false,
                through: Through::Layer,
            });
            check(Run {
                seed,
                max_queue: None,
                max_wait: Some(Duration::from_secs(2)),
                drops,
                changes: false,
                through: Through::Layer,
            });
        }
    }
}

/// The same while both quotas change (the class turns are then not checked).
#[test]
fn class_requests_keep_their_order_through_pauses_and_quota_changes() {
    for seed in 0..200 {
        for drops in [false, true] {
            check(Run {
                seed,
                max_queue: None,
                max_wait: None,
                drops,
                changes: true,
                through: Through::Layer,
            });
            check(Run {
                seed,
                max_queue: Some(3),
                max_wait: None,
                drops,
                changes: true,
                through: Through::Layer,
            });
        }
    }
}

/// The same over a store whose asks and reports take a round trip, as a remote one's do: the
/// pause holds in this process from the 1302's answer on ([`Through::Store`]), and no class
/// request slips out during it. The same traffic through the bare client reaches the server
/// during a pause in most runs.
#[test]
fn class_requests_keep_their_order_and_the_pause_over_a_remote_store() {
    let mut bare_sent_during_a_pause = 0;
    for seed in 0..100 {
        for drops in [false, true] {
            let run = Run {
                seed,
                max_queue: None,
                max_wait: None,
                drops,
                changes: false,
                through: Through::Store,
            };
            check(run);
            check(Run {
                max_queue: Some(3),
                ..run
            });
            let bare = sends(Run {
                through: Through::Bare,
                ..run
            });
            bare_sent_during_a_pause += usize::from(!bare.during_pauses.is_empty());
        }
    }
    assert!(
        bare_sent_during_a_pause >= 150,
        "{bare_sent_during_a_pause}"
    );
}
