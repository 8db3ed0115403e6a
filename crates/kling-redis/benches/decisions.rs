//! Decisions per second from one process, and decision latency, against a local
//! `redis-server` on loopback: `cargo bench -p kling-redis --bench decisions`.
//!
//! - latency: one decision at a time (p50, p99, max), the `Backend::acquire` a queue head
//!   makes, one `EVALSHA` round trip each;
//! - throughput: 64 decisions in flight at once over the process's one multiplexed connection,
//!   with the fleet's requests counted (the default) and not, twice each, taking turns;
//! - the same for task slots: `acquire` + `GiveBack` (two scripts).

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kling_concurrency::SlotsConfig;
use kling_concurrency::backend::{SlotBackend, SlotKey, SlotOp};
use kling_core::{AccountId, Pool, Product};
use kling_ratelimit::{Backend, BucketKey, Cooldown, Policy, Quota};
use kling_redis::testing::RedisServer;
use kling_redis::{Connection, RedisConfig, RedisGcra, RedisSlots};

const LATENCY_SAMPLES: usize = 20_000;
const THROUGHPUT_FOR: Duration = Duration::from_secs(3);
const IN_FLIGHT: usize = 64;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{what}: p50 {:?}, p99 {:?}, max {:?} ({} sequential samples)",
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        samples[samples.len() - 1],
        samples.len()
    );
}

/// Decisions a second with [`IN_FLIGHT`] asking at once for [`THROUGHPUT_FOR`].
async fn throughput(gcra: &Arc<RedisGcra>, key: &BucketKey, policy: Policy) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + THROUGHPUT_FOR;
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let gcra = Arc::clone(gcra);
            let done = Arc::clone(&done);
            let key = key.clone();
            tokio::spawn(async move {
                while Instant::now() < stop {
                    gcra.acquire(&key, &policy).await.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let start = Instant::now();
    for task in tasks {
        task.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some(server) = RedisServer::start_or_skip().expect("redis-server") else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let conn = Connection::connect(RedisConfig::new(server.url()).prefix("bench"))
            .await
            .unwrap();
        let gcra = Arc::new(RedisGcra::new(conn.clone()));
        // A rate no bench reaches: every decision is an admission (the common path).
        let policy = Policy::new(Quota::per_second(1e8).with_burst(1000), Cooldown::default());
        let key = BucketKey::account(Some(AccountId::new("bench")));
        for _ in 0..1000 {
            gcra.acquire(&key, &policy).await.unwrap();
        }
        let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
        for _ in 0..LATENCY_SAMPLES {
            let start = Instant::now();
            gcra.acquire(&key, &policy).await.unwrap();
            samples.push(start.elapsed());
        }
        report("gcra decision latency", samples);

        // Counting the fleet's requests on and off, taking turns so both see the same machine.
        let quiet = Arc::new(RedisGcra::new(conn.clone()).count_requests(false));
        for _ in 0..2 {
            for (backend, what) in [(&gcra, ""), (&quiet, ", requests not counted")] {
                let rate = throughput(backend, &key, policy).await;
                println!(
                    "gcra decisions per second, one process, {IN_FLIGHT} in flight{what}: {rate:.0}"
                );
            }
        }

        let slots = RedisSlots::new(conn, SlotsConfig::new(1_000_000)).unwrap();
        let slot_key = SlotKey::new(AccountId::new("bench"), Pool::new(Product::Video));
        let mut samples = Vec::with_capacity(LATENCY_SAMPLES / 4);
        for _ in 0..LATENCY_SAMPLES / 4 {
            let start = Instant::now();
            let reservation = slots.acquire(slot_key.clone(), 1).await.unwrap();
            samples.push(start.elapsed());
            slots.apply(SlotOp::GiveBack(reservation)).await.unwrap();
        }
        report("slot acquire latency", samples);
    });
}
