//! Two threads taking strict turns at a task's slot life on one `InProcess` backend (grant,
//! keep under a task id and external id, the query's answer that ends it): every turn finds
//! the lines the other thread wrote on the other core, which is what a turn at the backend
//! costs when a runtime's worker threads serve requests at once. The turns are whole lives, or
//! single steps (grant, hold, report: the threads' calls interleaved as finely as they can be).
//! One thread alone is the baseline. `cargo bench -p kling-concurrency --bench turns` prints, in ns per life, the
//! fastest of many batches and the tenth percentile: on a shared machine slower batches
//! include time a thread waited for a core (the fastest are those where both had their own).

use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use kling_concurrency::SlotsConfig;
use kling_concurrency::backend::{InProcess, SlotBackend, SlotKey};
use kling_core::{AccountId, Outcome, Pool, Product};

/// Lives per timed batch.
const BATCH: usize = 2_000;
/// Batches per run.
const BATCHES: usize = 150;
/// Task ids each thread cycles through.
const IDS: usize = 64;

/// The output of a future that is ready at once.
fn now<F: Future + Unpin>(mut future: F) -> F::Output {
    match Pin::new(&mut future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("not ready"),
    }
}

/// Thread `thread`'s tasks: id, external id, and the answer that reports the task ended.
fn tasks(thread: usize) -> Vec<(String, String, Outcome)> {
    (0..IDS)
        .map(|i| {
            let id = (800_000_000_000_000_000 + thread * 1_000 + i).to_string();
            let external = format!("kt-{thread:04}-{i:028}");
            let body = format!(
                r#"{{"code":0,"message":"SUCCEED","request_id":"r","data":{{"task_id":"{id}","task_status":"succeed"}}}}"#
            );
            let ended = Outcome::parse(
                http::StatusCode::OK,
                &http::HeaderMap::new(),
                body.as_bytes(),
                tokio::time::Instant::now(),
            )
            .expect("a task report");
            (id, external, ended)
        })
        .collect()
}

/// One life: a grant, the holding under both ids, the report that ends it; `step` is called
/// between the three.
fn life(
    backend: &InProcess,
    key: &SlotKey,
    (id, external, ended): &(String, String, Outcome),
    mut step: impl FnMut(),
) {
    let lease = Duration::from_secs(600);
    let Ok(Ok(granted)) = backend.acquire_now(key.clone(), 1) else {
        panic!("a free slot")
    };
    step();
    let answered = Some(ended.received_at());
    now(backend.hold_unread(granted, Some(id), Some(external), lease, answered)).expect("kept");
    step();
    now(backend.observe_unread(&key.account, ended, lease)).expect("ended");
}

/// Ns per life of each batch, sorted: `threads` (1 or 2) threads taking turns, a whole life
/// each turn or (`by_step`) one step of it.
fn run(threads: usize, by_step: bool) -> Vec<f64> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    let backend = InProcess::new(SlotsConfig::new(100_000)).expect("a valid config");
    let key = SlotKey::new(AccountId::interned("a"), Pool::new(Product::Video));
    let turn = AtomicUsize::new(0);
    let mut batches = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|thread| {
                let (backend, key, runtime, turn) = (&backend, &key, &runtime, &turn);
                s.spawn(move || {
                    let _entered = runtime.enter();
                    let tasks = tasks(thread);
                    let mut batches = Vec::with_capacity(BATCHES);
                    let mut start = Instant::now();
                    let wait = || {
                        while turn.load(Ordering::Acquire) % threads != thread {
                            std::hint::spin_loop();
                        }
                    };
                    let pass = || turn.fetch_add(1, Ordering::Release);
                    for j in 0..BATCHES * BATCH {
                        wait();
                        life(backend, key, &tasks[j % IDS], || {
                            if by_step {
                                pass();
                                wait();
                            }
                        });
                        pass();
                        if (j + 1) % BATCH == 0 {
                            let lives = (BATCH * threads) as f64;
                            batches.push(start.elapsed().as_nanos() as f64 / lives);
                            start = Instant::now();
                        }
                    }
                    batches
                })
            })
            .collect();
        let mut workers = workers.into_iter();
        let first = workers.next().expect("a thread").join().expect("no panic");
        workers.for_each(|worker| drop(worker.join().expect("no panic")));
        first
    });
    batches.sort_by(f64::total_cmp);
    batches
}

fn main() -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let runs = [
        (1, false, "one thread"),
        (2, false, "two threads taking turns, a life each"),
        (2, true, "two threads taking turns, a step each"),
    ];
    for (threads, by_step, name) in runs {
        let batches = run(threads, by_step);
        let (fastest, p10) = (batches[0], batches[batches.len() / 10]);
        writeln!(
            out,
            "InProcess life, {name}: fastest batch {fastest:.1} ns, 10th percentile {p10:.1} ns"
        )?;
    }
    Ok(())
}
