//! Property: over random mixes of creates and `/account/costs` requests (a class quota of its
//! own), 1302s that pause the account, callers that give up and quota changes, every request
//! completes, none waits on, the class requests go out in the order they arrived and a class
//! turn apart, and so do the creates.

use std::time::Duration;

use kling_core::RequestKind;
use kling_ratelimit::{GcraLayer, Quota};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

use crate::support::{Reply, Server, request, request_to};

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
}

/// Forty requests of one account, a class request (`c…`) or a create (`p…`) each, up to
/// 300 ms apart, against a server that answers one in ten with a 1302 (half of them with
/// `Retry-After: 1`) after up to 50 ms. Returns the order and instants the server saw.
fn sends(run: Run) -> Vec<(String, u128)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let seed = run.seed;
        let mut rng = Lcg(seed);
        let server = Server::with_latency(Duration::from_millis(rng.below(50)));
        let mut script = Vec::new();
        for _ in 0..200 {
            script.push(match rng.below(10) {
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
        let layer = builder.build().unwrap();
        let handle = layer.handle();
        let service = layer.layer(server.service());
        let start = Instant::now();
        let mut calls = Vec::new();
        for i in 0..40 {
            tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
            let class = rng.below(2) == 0;
            let req = if class {
                request_to("/account/costs", Some("a"), &format!("c{i}"))
            } else {
                request(Some("a"), &format!("p{i}"))
            };
            let call = tokio::spawn(service.clone().oneshot(req));
            let drop_after =
                (rng.below(4) == 0 && run.drops).then(|| Duration::from_millis(rng.below(3000)));
            calls.push((i, call, drop_after));
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            if rng.below(8) == 0 && run.changes {
                let quota = Quota::per_second(1.0 + rng.below(8) as f64);
                handle.set_quota(quota).unwrap();
            }
            if rng.below(8) == 0 && run.changes {
                let quota = Quota::per_second(0.5 + rng.below(4) as f64);
                handle.set_class_quota(RequestKind::Account, quota).unwrap();
            }
        }
        for (i, call, drop_after) in calls {
            if let Some(after) = drop_after {
                let abort = call.abort_handle();
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    abort.abort();
                });
                let _ = call.await;
                continue;
            }
            // Refusals (a full queue, a wait past its limit) are fine; waiting for ever is not.
            let answer = tokio::time::timeout(Duration::from_secs(3600), call).await;
            assert!(answer.is_ok(), "seed {seed}: request {i} never completed");
        }
        assert_eq!(handle.waiting(), 0, "seed {seed}: waiters left");
        server.times_ms(start)
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
    let sent = sends(run);
    let seed = run.seed;
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
            });
            check(Run {
                seed,
                max_queue: Some(3),
                max_wait: None,
                drops,
                changes: false,
            });
            check(Run {
                seed,
                max_queue: None,
                max_wait: Some(Duration::from_secs(2)),
                drops,
                changes: false,
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
            });
            check(Run {
                seed,
                max_queue: Some(3),
                max_wait: None,
                drops,
                changes: true,
            });
        }
    }
}
